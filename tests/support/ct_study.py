"""Synthetic CT studies with realistic headers, built from the demo bundle's phantoms.

Tests need studies whose truth is known voxel by voxel: a phantom gives the HU values and the
label truth; this module writes them as a CT study the way a scanner would (patient and study
modules, a localizer, several reconstructions, stored values with a rescale intercept).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[2]
DEMO_BUNDLE = ROOT / "models" / "ct_body_demo"
sys.path.insert(0, str(DEMO_BUNDLE))
from scripts.phantoms import Phantom, make_phantom  # noqa: E402

__all__ = ["DEMO_BUNDLE", "Phantom", "StudyInfo", "ct_series", "make_phantom", "write_series"]


@dataclass
class StudyInfo:
    patient_name: str = "PHANTOM^ABDOMEN"
    patient_id: str = "PH-0001"
    issuer_of_patient_id: str = "DICOMNODE-TEST"
    patient_birth_date: str = "19700101"
    patient_sex: str = "O"
    study_uid: str = field(default_factory=generate_uid)
    study_date: str = "20261128"
    study_time: str = "101500"
    accession_number: str = "ACC0001"
    study_id: str = "S1"
    referring_physician: str = "REFERRING^DOCTOR"
    study_description: str = "CT ABDOMEN"
    frame_of_reference_uid: str = field(default_factory=generate_uid)


def _base(study: StudyInfo, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.IssuerOfPatientID = study.issuer_of_patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.StudyID = study.study_id
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyDescription = study.study_description
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "SYNTHETIC"
    ds.Modality = "CT"
    return ds


def ct_series(
    phantom: Phantom,
    study: StudyInfo,
    series_number: int,
    description: str,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> list[Dataset]:
    """One axial CT image per phantom slice, stored as HU + 1024 with intercept -1024."""
    series_uid = generate_uid()
    nx, ny, nz = phantom.hu.shape
    sx, sy, sz = phantom.spacing
    stored = np.clip(np.rint(phantom.hu + 1024.0), 0, 4095).astype(np.uint16)
    images = []
    for k in range(nz):
        ds = _base(study, CTImageStorage)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = nz - k  # scanners often number head to feet: order must not rely on it
        ds.ImageType = list(image_type)
        ds.SeriesDate = ds.ContentDate = study.study_date
        ds.SeriesTime = ds.ContentTime = study.study_time
        ds.BodyPartExamined = "ABDOMEN"
        ds.PatientPosition = "HFS"
        ds.KVP = "120"
        ds.SliceThickness = f"{sz:g}"
        ds.ImagePositionPatient = [f"{v:.4f}" for v in (phantom.origin[0], phantom.origin[1], phantom.origin[2] + k * sz)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = f"{phantom.origin[2] + k * sz:.4f}"
        ds.PixelSpacing = [f"{sy:g}", f"{sx:g}"]  # row spacing, column spacing
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        images.append(ds)
    return images


def localizer(study: StudyInfo, series_number: int = 1) -> list[Dataset]:
    """A single coronal scout, as scanners send ahead of the axial series."""
    phantom = make_phantom((128, 128, 1), (3.0, 3.0, 3.0), seed=7, noise_hu=5.0)
    [ds] = ct_series(phantom, study, series_number, "Topogram", ("ORIGINAL", "PRIMARY", "LOCALIZER"))
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    return [ds]


def write_series(images: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in images:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def small_study(folder: Path, slices: int = 40, seed: int = 11, info: StudyInfo | None = None) -> tuple[StudyInfo, list[Path]]:
    """A one-series CT study small enough to process in seconds, for tests about the flow."""
    info = info or StudyInfo()
    phantom = make_phantom((128, 128, slices), (2.8, 2.8, 4.0), seed=seed)
    return info, write_series(ct_series(phantom, info, 2, "Abdomen 4.0 mm"), folder)
