"""The content of the SEG and SR, read back with highdicom, and what happens when a job re-runs.

Each object is checked against what the standard and a PACS expect of it: the patient and study
exactly as in the source (character set included), the node named as the equipment, segment
codes, volumes that equal voxel count times voxel volume, and references that resolve to the
source instances. A re-run makes new instances and records which ones they supersede.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from dicom_node.bundle_info import BundleInfo
from dicom_node.compute.frames import read_frames
from dicom_node.compute.volume import load_volume
from dicom_node.results import file_bytes
from dicom_node.results.equipment import Equipment
from dicom_node.results.seg import build_seg, segments_of
from dicom_node.results.seg_frames import scan_labels
from dicom_node.results.sr import build_sr
from tests.support.ct_study import DEMO_BUNDLE, StudyInfo, ct_series, make_phantom, small_study, write_series
from tests.support.peers import start_node, storescu, wait_for, write_node_config
from tests.support.validators import dciodvfy_errors

PATIENT_AND_STUDY = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName",
    "StudyDescription",
)
INFO = BundleInfo("test model", "2.1", {1: "body", 2: "bone", 3: "liver"}, "", "MONAI team")  # liver: never found



@pytest.fixture
def results(tmp_path):
    """A SEG and an SR of a small phantom in a UTF-8 study, written to disk and read back."""
    info = StudyInfo(patient_name="Müller^Zoë", referring_physician="Ørsted^Hans")
    phantom = make_phantom((64, 64, 12), (3.0, 3.0, 5.0), seed=3)
    images = ct_series(phantom, info, 2, "Abdomen")
    for image in images:
        image.SpecificCharacterSet = "ISO_IR 192"
    volume = load_volume(read_frames(write_series(images, tmp_path / "ct")))
    labels = np.ascontiguousarray(phantom.labels.astype(np.uint16))
    scanned = scan_labels(volume.frame_masks(labels), list(INFO.labels), volume.frame_voxel_ml())
    segments = segments_of(scanned, INFO)
    equipment = Equipment("NODE1")
    seg = build_seg(volume, scanned, segments, INFO, equipment, 900, "SEG test")
    sr = build_sr(volume, seg.dataset, segments, INFO, equipment, 901, "SR test")
    paths = {}
    for name, data in (("seg", seg.encode()), ("sr", file_bytes(sr))):
        paths[name] = tmp_path / f"{name}.dcm"
        paths[name].write_bytes(data)
    return volume, labels, images, paths


def test_seg_and_sr_carry_the_source_patient_and_study_and_name_the_node_and_the_algorithm(results):
    _, _, images, paths = results
    for path in paths.values():
        assert dciodvfy_errors(path) == [], path.name
        dataset = pydicom.dcmread(path)
        for keyword in PATIENT_AND_STUDY:
            assert dataset.get(keyword) == images[0].get(keyword), f"{path.name}: {keyword}"
        assert dataset.Manufacturer == dataset.ManufacturerModelName == "dicom-node"
        assert dataset.DeviceSerialNumber == "NODE1" and dataset.SoftwareVersions
        if dataset.Modality == "SEG":
            assert dataset.FrameOfReferenceUID == images[0].FrameOfReferenceUID
        # IHE AI Results: the algorithm as processing equipment, beside the node as the creator
        [algorithm] = [item for item in dataset.ContributingEquipmentSequence
                       if item.get("ManufacturerModelName") == INFO.name]
        assert algorithm.PurposeOfReferenceCodeSequence[0].CodeValue == codes.DCM.ProcessingEquipment.value
        assert (algorithm.Manufacturer, algorithm.SoftwareVersions) == ("MONAI team", "2.1"), path.name
        assert algorithm.ContributionDateTime
    assert str(pydicom.dcmread(paths["seg"]).PatientName) == "Müller^Zoë"


def test_seg_segments_are_coded_and_each_frame_references_its_source_image(results):
    _, labels, images, paths = results
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(paths["seg"]))
    described = {d.SegmentLabel: d for d in seg.SegmentSequence}
    assert set(described) == {"body", "bone"}  # liver was not found: not in the SEG
    assert described["bone"].SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Bone.value
    assert described["body"].SegmentAlgorithmType == "AUTOMATIC"
    assert described["body"].SegmentAlgorithmName == "test model"
    assert described["body"].SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0].CodeMeaning \
        == "Artificial Intelligence"
    source_uids = {image.SOPInstanceUID for image in images}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == images[0].SeriesInstanceUID
    for frame in seg.PerFrameFunctionalGroupsSequence:
        assert frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID in source_uids
    masks = seg.get_pixels_by_source_instance(
        [image.SOPInstanceUID for image in images], segment_numbers=[described["bone"].SegmentNumber]
    )
    assert np.array_equal(masks[..., 0] > 0, np.transpose(labels == 2, (2, 1, 0)))


def test_sr_volumes_equal_voxel_count_times_voxel_volume_and_absent_labels_are_stated(results):
    volume, labels, _, paths = results
    seg_ds = pydicom.dcmread(paths["seg"])
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(paths["sr"]))
    voxel_ml = 3.0 * 3.0 * 5.0 / 1000
    groups = {g.tracking_identifier: g for g in sr.content.get_volumetric_roi_measurement_groups()}
    assert set(groups) == {"body", "bone"}
    for name, value in (("body", 1), ("bone", 2)):
        [measured] = groups[name].get_measurements(name=codes.SCT.Volume)
        assert measured.unit.value == "mL"
        assert measured.value == pytest.approx(int((labels == value).sum()) * voxel_ml, abs=1e-3)
        segment = groups[name].referenced_segment
        assert segment.referenced_sop_instance_uid == seg_ds.SOPInstanceUID
        segment_numbers = {d.SegmentLabel: d.SegmentNumber for d in seg_ds.SegmentSequence}
        assert segment.referenced_segment_numbers == [segment_numbers[name]]
        assert segment.source_series_for_segmentation.value == volume.frames[0].header.SeriesInstanceUID
    plain = sr.content.get_planar_roi_measurement_groups() + sr.content.get_volumetric_roi_measurement_groups()
    assert "liver" not in {g.tracking_identifier for g in plain}
    content = pydicom.dcmread(paths["sr"])
    text = str(content.ContentSequence)
    assert "liver" in text and "Absent" in text, "the label the model did not find is not stated as absent"
    assert content.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_a_rerun_makes_new_instances_that_supersede_the_old(tmp_path, node_port):
    config = write_node_config(
        tmp_path / "node", node_port, destinations=[],
        pipelines=[{"name": "body", "model": str(DEMO_BUNDLE),
                    "select": {"Modality": "CT"}}],
        stable_after=2, min_free_disk_mb=0,  # counts results: no second completion
    )
    node = start_node(config, node_port)
    try:
        info, paths = small_study(tmp_path / "study", slices=16)
        assert storescu(node.ae_title, node.port, paths).returncode == 0
        wait_for(lambda: node.query("SELECT count(*) FROM results") == [(2,)], 180, "the first results")
        assert "1 job(s) queued to run again" in node.cli("rerun", info.study_uid)
        wait_for(lambda: node.query("SELECT count(*) FROM results") == [(4,)], 180, "the results of the re-run")
        assert set(wait_for(node.finished_job_states, 60, "the re-run to finish")) == {"done"}
        rows = node.query("SELECT id, kind, sop_instance_uid, series_uid, path, supersedes FROM results ORDER BY id")
        status = node.cli("status")
    finally:
        node.stop()
    first, second = rows[:2], rows[2:]
    assert len({row[2] for row in rows}) == 4 and len({row[3] for row in rows}) == 4, "a UID was reused"
    by_kind = {row[1]: row for row in first}
    for row in second:
        assert row[5] == by_kind[row[1]][0], f"the new {row[1]} does not record the one it supersedes"
    new_sr = pydicom.dcmread(next(row[4] for row in second if row[1] == "SR"))
    predecessor = new_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == by_kind["SR"][2]
    assert dciodvfy_errors(next(row[4] for row in second if row[1] == "SR")) == []
    assert status.count("(superseded)") == 2, status


def test_a_multi_frame_source_with_its_pixel_measures_per_frame_gets_a_valid_seg_and_sr(tmp_path):
    """Siemens XA Enhanced MR gives Pixel Measures in each frame's functional groups, not in
    the shared ones; PS3.3 allows both, and the results are built from either."""
    import copy

    from tests.support.ct_study import enhanced_ct

    hu = np.random.default_rng(1).integers(-1000, 2000, size=(32, 24, 4)).astype(np.float32)
    ds = enhanced_ct(hu, np.diag([2.0, 2.0, 3.0, 1.0]), StudyInfo(), 5, [0, 1, 2, 3])
    shared = ds.SharedFunctionalGroupsSequence[0]
    for item in ds.PerFrameFunctionalGroupsSequence:
        item.PixelMeasuresSequence = copy.deepcopy(shared.PixelMeasuresSequence)
    del shared.PixelMeasuresSequence
    volume = load_volume(read_frames(write_series([ds], tmp_path / "source")))
    info = BundleInfo("threshold", "1", {1: "body"}, "")
    scanned = scan_labels(volume.frame_masks((volume.array > 0).astype(np.uint16)), [1], volume.frame_voxel_ml())
    segments = segments_of(scanned, info)
    seg = build_seg(volume, scanned, segments, info, Equipment("NODE"), 900, "per frame")
    sr = build_sr(volume, seg.dataset, segments, info, Equipment("NODE"), 901, "per frame")
    for name, data in (("seg.dcm", seg.encode()), ("sr.dcm", file_bytes(sr))):
        (tmp_path / name).write_bytes(data)
        assert dciodvfy_errors(tmp_path / name) == [], name
    assert "PixelMeasuresSequence" not in volume.source_headers[0].SharedFunctionalGroupsSequence[0], "source untouched"
