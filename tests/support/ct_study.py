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
from scripts.phantoms import Family, Phantom, make_phantom

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


def axial_affine(spacing, origin) -> np.ndarray:
    """LPS affine of an axial stack: i to the patient's left, j posterior, k to the head."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def ct_series(
    phantom: Phantom,
    study: StudyInfo,
    series_number: int,
    description: str,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> list[Dataset]:
    """One axial CT image per phantom slice."""
    return series_from_array(
        phantom.hu, axial_affine(phantom.spacing, phantom.origin), study, series_number, description, image_type
    )


def _image_pixel_module(ds: Dataset, rows: int, columns: int) -> None:
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"


def _stored_values(hu: np.ndarray) -> np.ndarray:
    """HU + 1024 in 12 bits, the way CT scanners commonly store them (intercept -1024)."""
    return np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16)


def _geometry(affine: np.ndarray) -> tuple[list[str], list[str], float]:
    """Image Orientation, Pixel Spacing (row, column) and slice step of an LPS affine."""
    column_step, row_step = affine[:3, 0], affine[:3, 1]
    orientation = [*column_step / np.linalg.norm(column_step), *row_step / np.linalg.norm(row_step)]
    return (
        [f"{v:.8f}" for v in orientation],
        [f"{np.linalg.norm(row_step):g}", f"{np.linalg.norm(column_step):g}"],
        float(np.linalg.norm(affine[:3, 2])),
    )


def series_from_array(
    hu: np.ndarray,
    affine_lps: np.ndarray,
    study: StudyInfo,
    series_number: int,
    description: str,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> list[Dataset]:
    """Single-frame CT images of ``hu[i, j, k]`` placed in space by ``affine_lps``; image k holds
    slice k, whatever the direction the affine gives the stack."""
    series_uid = generate_uid()
    nz = hu.shape[2]
    orientation, pixel_spacing, slice_mm = _geometry(affine_lps)
    stored = _stored_values(hu)
    images = []
    for k in range(nz):
        position = affine_lps @ np.array([0.0, 0.0, k, 1.0])
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
        ds.SliceThickness = f"{slice_mm:g}"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position[:3]]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = pixel_spacing
        _image_pixel_module(ds, hu.shape[1], hu.shape[0])
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        images.append(ds)
    return images


def enhanced_ct(
    hu: np.ndarray, affine_lps: np.ndarray, study: StudyInfo, series_number: int, frame_order: list[int]
) -> Dataset:
    """One Enhanced CT instance holding slice ``frame_order[f]`` in frame f (functional groups)."""
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedCTImageStorage

    stored = _stored_values(hu)
    ds = _base(study, EnhancedCTImageStorage)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "Enhanced CT"
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.ContentDate, ds.ContentTime = study.study_date, study.study_time
    ds.AcquisitionDateTime = study.study_date + study.study_time
    _image_pixel_module(ds, hu.shape[1], hu.shape[0])
    ds.NumberOfFrames = len(frame_order)

    ds.SharedFunctionalGroupsSequence = shared_functional_groups(affine_lps, "HU")
    per_frame = []
    for number, k in enumerate(frame_order, start=1):
        position, content, item = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [f"{v:.6f}" for v in (affine_lps @ np.array([0.0, 0.0, k, 1.0]))[:3]]
        content.FrameAcquisitionNumber = 1
        content.DimensionIndexValues = [number]
        item.PlanePositionSequence = Sequence([position])
        item.FrameContentSequence = Sequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.ascontiguousarray(np.stack([stored[:, :, k].T for k in frame_order])).tobytes()
    return ds


def shared_functional_groups(affine_lps: np.ndarray, rescale_type: str):
    """The functional groups every frame of an enhanced image on ``affine_lps`` shares: pixel
    measures, plane orientation and the rescale of `_stored_values`."""
    from pydicom.sequence import Sequence

    orientation, pixel_spacing, slice_mm = _geometry(affine_lps)
    measures, plane, transform = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = pixel_spacing
    measures.SliceThickness = f"{slice_mm:g}"
    plane.ImageOrientationPatient = orientation
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = "-1024", "1", rescale_type
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([plane])
    shared.PixelValueTransformationSequence = Sequence([transform])
    return Sequence([shared])


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
    phantom = make_phantom((128, 128, slices), (2.8, 2.8, 4.0), seed=seed, family=Family("abdomen", "flat", "side"))
    return info, write_series(ct_series(phantom, info, 2, "Abdomen 4.0 mm"), folder)
