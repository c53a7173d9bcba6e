"""The node's reason to exist, from end to end, with real processes on both sides.

A synthetic CT study with realistic headers (a localizer, a thin and a thick axial series) is
uploaded to a real Orthanc, which pushes it to the node started as an operator would start it.
The test then finds the SEG and SR of the thin series in Orthanc, in the same study, checks them
with dciodvfy, and checks that every SEG frame lies on the right source image with the phantom's
truth (Dice >= 0.9).
"""

from __future__ import annotations

import json
import shutil

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy.ndimage import binary_erosion

from tests.support.ct_study import (
    DEMO_BUNDLE,
    StudyInfo,
    ct_series,
    localizer,
    make_phantom,
    small_study,
    write_series,
)
from tests.support.peers import ROOT, start_node, wait_for, write_node_config
from tests.support.validators import dciodvfy_errors, dciodvfy_findings

FOV_PIXELS, PIXEL_MM = 192, 1.8



CONFORMANCE = (ROOT / "docs" / "conformance.md").read_text()


def assert_valid_and_documented(path) -> None:
    """No dciodvfy error, and every warning listed in docs/conformance.md with its reason."""
    assert dciodvfy_errors(path) == [], f"dciodvfy found errors in {path.name}"
    for warning in dciodvfy_findings(path):
        assert f"`{warning}`" in CONFORMANCE, f"{path.name}: warning not in docs/conformance.md: {warning}"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.fixture
def study(tmp_path):
    info = StudyInfo()
    thin = make_phantom((FOV_PIXELS, FOV_PIXELS, 60), (PIXEL_MM, PIXEL_MM, 2.0), seed=41)
    thick = make_phantom((FOV_PIXELS, FOV_PIXELS, 24), (PIXEL_MM, PIXEL_MM, 5.0), seed=41)
    thin_images = ct_series(thin, info, 3, "Abdomen 2.0 mm")
    paths = write_series(localizer(info), tmp_path / "study" / "scout")
    paths += write_series(thin_images, tmp_path / "study" / "thin")
    paths += write_series(ct_series(thick, info, 2, "Abdomen 5.0 mm"), tmp_path / "study" / "thick")
    return info, thin, thin_images, paths


def test_pushed_study_comes_back_with_seg_and_sr(tmp_path, orthanc, node_port, study, artifacts, database_url):
    """On each database backend: the embedded SQLite, and PostgreSQL ([database] url)."""
    info, phantom, thin_images, paths = study
    config = write_node_config(
        tmp_path / "node",
        node_port,
        database_url=database_url,
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}],
        pipelines=[
            {"name": "ct-demo", "model": str(DEMO_BUNDLE), "destinations": ["pacs"], "select": {"Modality": "CT"},
             "outlines": True}
        ],
        stable_after=2,
    )
    node = start_node(config, node_port)
    try:
        study_id = orthanc.upload(paths)
        orthanc.request("POST", "/modalities/node/store", {"Resources": [study_id], "Synchronous": True})

        def results_in_pacs():
            modalities = {s["MainDicomTags"].get("Modality"): s for s in orthanc.get(f"/studies/{study_id}/series")}
            complete = {"SEG", "SR", "OT"} <= modalities.keys() and len(modalities["OT"]["Instances"]) == 60
            return modalities if complete else None

        series = wait_for(results_in_pacs, 300, "SEG and SR in Orthanc", interval=1.0)
        status = node.cli("status")
    finally:
        node.stop()
        (artifacts / "node.log").write_text(node.log())

    assert "done" in status.splitlines()[0], status
    objects = {}
    for modality in ("SEG", "SR"):
        [instance_id] = series[modality]["Instances"]
        path = artifacts / f"{modality}.dcm"
        path.write_bytes(orthanc.get(f"/instances/{instance_id}/file"))
        assert_valid_and_documented(path)
        objects[modality] = pydicom.dcmread(path)
    seg_ds, sr_ds = objects["SEG"], objects["SR"]
    outline_ids = series["OT"]["Instances"]
    assert seg_ds.StudyInstanceUID == sr_ds.StudyInstanceUID == info.study_uid

    # The SEG references the thin series (the rule's preference), frame by frame, on position.
    source_by_uid = {ds.SOPInstanceUID: ds for ds in thin_images}
    assert seg_ds.ReferencedSeriesSequence[0].SeriesInstanceUID == thin_images[0].SeriesInstanceUID
    for frame in seg_ds.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = source_by_uid[uid]
        assert np.allclose(
            frame.PlanePositionSequence[0].ImagePositionPatient, source.ImagePositionPatient, atol=1e-3
        )

    # The mask matches the phantom's Hounsfield-threshold truth on the right images.
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    labels = {d.SegmentLabel: d.SegmentNumber for d in seg.SegmentSequence}
    assert set(labels) == {"body", "bone"}
    ordered_uids = [ds.SOPInstanceUID for ds in thin_images]  # thin_images[k] is phantom slice k
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=ordered_uids, segment_numbers=[labels["body"], labels["bone"]]
    )
    truth = np.transpose(phantom.labels, (2, 1, 0))  # [k, row, column]
    for index, value in enumerate((1, 2)):
        score = dice(masks[..., index] > 0, truth == value)
        assert score >= 0.9, f"Dice of segment {value} is {score:.3f}"

    # The SR carries one volume per segment, referencing the SEG.
    sr = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert {g.tracking_identifier for g in groups} == {"body", "bone"}
    for group in groups:
        assert group.referenced_segment.referenced_sop_instance_uid == seg_ds.SOPInstanceUID
        assert (
            group.referenced_segment.source_series_for_segmentation.value == thin_images[0].SeriesInstanceUID
        )
        [volume] = group.get_measurements(name=pydicom.sr.codedict.codes.SCT.Volume)
        assert volume.value > 0 and volume.unit.value == "mL"

    # The optional outline images: valid Secondary Capture, each drawn on its own source image
    # exactly along the edges of the SEG's segments there.
    sources_in_seg = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                      for f in seg_ds.PerFrameFunctionalGroupsSequence}
    assert len(outline_ids) == len(sources_in_seg)
    for index, instance_id in enumerate(outline_ids[::15]):
        path = artifacts / f"SC-{index}.dcm"
        path.write_bytes(orthanc.get(f"/instances/{instance_id}/file"))
        assert_valid_and_documented(path)
        outline = pydicom.dcmread(path)
        source_uid = outline.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert outline.StudyInstanceUID == info.study_uid and outline.PatientID == info.patient_id
        per_segment = seg.get_pixels_by_source_instance([source_uid], segment_numbers=sorted(labels.values()))[0]
        edges = np.zeros(per_segment.shape[:2], dtype=bool)
        for channel in range(per_segment.shape[-1]):
            mask = per_segment[..., channel] > 0
            edges |= mask & ~binary_erosion(mask)
        rgb = outline.pixel_array.astype(int)
        drawn = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 60
        assert drawn.sum() > 0 and (drawn & edges).sum() >= 0.95 * drawn.sum(), "outlines off the SEG's edges"
        assert (drawn & edges).sum() >= 0.9 * edges.sum(), "segment edges missing from the outline image"


def test_a_bundle_made_for_an_older_monai_runs_in_its_runtime_from_push_to_pacs(tmp_path, orthanc, node_port,
                                                                                 old_monai, artifacts):
    """The MONAI 1.3.0 bundle (`tests.support.old_monai`), which the node's MONAI cannot even
    instantiate, with ``runtime = "bundle"``: a study pushed by Orthanc comes back as a valid SEG
    with the bundle's labels and their codes, and an SR. Beside it, a bundle whose runtime was
    never prepared is disabled with what to run, and does not hold the other up."""
    unprepared = tmp_path / "unprepared"
    shutil.copytree(old_monai.bundle, unprepared)
    metadata = json.loads((unprepared / "configs" / "metadata.json").read_text())
    (unprepared / "configs" / "metadata.json").write_text(json.dumps({**metadata, "monai_version": "1.2.0"}))
    config = write_node_config(
        tmp_path / "node", node_port,
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}],
        pipelines=[
            {"name": "old-monai", "model": str(old_monai.bundle_copy(tmp_path)), "runtime": "bundle", "device": "cpu",
             "destinations": ["pacs"], "select": {"Modality": "CT"}},
            {"name": "unprepared", "model": str(unprepared), "runtime": "bundle", "destinations": ["pacs"],
             "select": {"Modality": "CT"}},
        ],
        stable_after=2, min_free_disk_mb=0,
    )
    old_monai.use_in(tmp_path / "node" / "data")
    node = start_node(config, node_port)
    try:
        info, paths = small_study(tmp_path / "study", slices=24)
        study_id = orthanc.upload(paths)
        orthanc.request("POST", "/modalities/node/store", {"Resources": [study_id], "Synchronous": True})
        wait_for(lambda: {"SEG", "SR"} <= orthanc.modality_counts(info.study_uid).keys(), 300,
                 "SEG and SR in Orthanc", 1.0)
        status = node.cli("status")
    finally:
        node.stop()
        (artifacts / "node.log").write_text(node.log())
    assert "old-monai done" in status, status
    assert ("pipeline unprepared DISABLED: its runtime monai-1.2.0-" in status
            and "is not prepared: run `dicom-node bundle prepare" in status), status
    assert "loaded bundle Spleen and liver CT segmentation (older MONAI) 0.3.1 in runtime monai-1.3.0-" in node.log()
    assert "ready: old-monai on cpu in its bundle's runtime, unprepared disabled" in node.log()
    objects = {}
    for series in orthanc.series_of_study(info.study_uid):
        modality = series["MainDicomTags"].get("Modality")
        if modality in ("SEG", "SR"):
            [instance_id] = series["Instances"]
            path = artifacts / f"{modality}.dcm"
            path.write_bytes(orthanc.get(f"/instances/{instance_id}/file"))
            assert_valid_and_documented(path)
            objects[modality] = pydicom.dcmread(path)
    seg = objects["SEG"]
    assert "spleen_liver" not in seg.SeriesDescription and "older MONAI" in seg.SeriesDescription
    codes = {d.SegmentLabel: d.SegmentedPropertyTypeCodeSequence[0].CodeValue for d in seg.SegmentSequence}
    assert codes and set(codes) <= {"spleen", "liver"}
    assert {"spleen": "78961009", "liver": "10200004"}.items() >= codes.items()
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(paths[0]).SeriesInstanceUID
    sr = hd.sr.Comprehensive3DSR.from_dataset(objects["SR"])
    assert {g.tracking_identifier for g in sr.content.get_volumetric_roi_measurement_groups()} == set(codes)
