"""Model Zoo bundles, unmodified: their own configs with random weights, on a synthetic CT.

The configuration files of spleen_ct_segmentation (2 channels) and wholeBody_ct_segmentation
(105 channels) are copied as they are from ../shared/monai-bundles; the test only saves randomly
initialised weights beside them, as a downloaded bundle has real ones.
"""

from __future__ import annotations

import os
import shutil
import stat
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser

from dicom_node.bundle_info import read_bundle_info
from dicom_node.compute.bundle import Bundle
from dicom_node.compute.frames import read_frames
from dicom_node.compute.volume import load_volume
from dicom_node.results import file_bytes
from dicom_node.results.codes import ANATOMY
from dicom_node.results.equipment import Equipment
from dicom_node.results.seg import build_seg, segments_of
from dicom_node.results.seg_frames import scan_labels
from dicom_node.results.sr import build_sr
from tests.support.ct_study import StudyInfo, ct_series, make_phantom, write_series
from tests.support.validators import dciodvfy_errors

# The project's shared folder sits beside the repository (as in CI); another place can be named.
ZOO = Path(os.environ.get("DICOM_NODE_ZOO_BUNDLES", Path(__file__).resolve().parents[3] / "shared" / "monai-bundles"))
CPU = torch.device("cpu")


def zoo_bundle(name: str, folder: Path, torchscript: bool = False) -> Path:
    """The Zoo bundle's files untouched, plus random weights as models/model.pt (or .ts)."""
    if not (ZOO / name).is_dir():
        pytest.fail(f"Model Zoo bundle configs not found at {ZOO / name}; set DICOM_NODE_ZOO_BUNDLES")
    bundle = folder / name
    shutil.copytree(ZOO / name, bundle)
    for path in [bundle, *bundle.rglob("*")]:  # the shared copy may be read-only
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    parser = ConfigParser()
    parser.read_config(next((bundle / "configs").glob("inference.*")))
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def").eval()
    (bundle / "models").mkdir()
    if torchscript:
        torch.jit.script(network).save(str(bundle / "models" / "model.ts"))
    else:
        torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


@pytest.fixture(scope="module")
def ct_volume(tmp_path_factory):
    phantom = make_phantom((64, 56, 20), (3.2, 3.2, 4.0), seed=21)
    paths = write_series(ct_series(phantom, StudyInfo(), 5, "zoo input"), tmp_path_factory.mktemp("ct"))
    return load_volume(read_frames(paths))


def saved_errors(data: bytes, folder: Path) -> list[str]:
    path = folder / "object.dcm"
    path.write_bytes(data)
    return dciodvfy_errors(path)


@pytest.mark.parametrize("name, channels", [
    ("spleen_ct_segmentation", 2),
    ("wholeBody_ct_segmentation", 105),
    ("pediatric_abdominal_ct_segmentation", 4),  # configs in YAML, scripts of its own, labels in label_def
])
def test_zoo_bundle_runs_unmodified_and_its_labels_become_coded_segments(tmp_path, ct_volume, name, channels):
    bundle = Bundle(zoo_bundle(name, tmp_path), CPU)
    assert len(bundle.info.labels) == channels - 1
    labels = bundle.predict(ct_volume)
    assert labels.shape == ct_volume.array.shape  # back on the source grid, voxel for voxel
    assert labels.max() < channels
    assert bundle.timings["network"] > 0

    scanned = scan_labels(ct_volume.frame_masks(labels), list(bundle.info.labels), ct_volume.frame_voxel_ml())
    segments = segments_of(scanned, bundle.info)
    assert [s.name for s in segments] == [bundle.info.labels[v] for v in sorted(bundle.info.labels)]
    present = [s for s in segments if s.present]
    assert present, "random weights still label something"
    equipment = Equipment("NODE")
    seg = build_seg(ct_volume, scanned, segments, bundle.info, equipment, 900, "zoo")
    sr = build_sr(ct_volume, seg.dataset, segments, bundle.info, equipment, 901, "zoo")
    assert saved_errors(seg.encode(), tmp_path) == []
    assert saved_errors(file_bytes(sr), tmp_path) == []

    read_back = hd.seg.Segmentation.from_dataset(pydicom.dcmread(BytesIO(seg.encode())))
    by_label = {d.SegmentLabel: d for d in read_back.SegmentSequence}
    assert set(by_label) == {s.codes.label for s in present}
    for segment in present:
        description = by_label[segment.codes.label]
        assert description.SegmentedPropertyTypeCodeSequence[0].CodeValue == segment.codes.property_type.value
        assert description.TrackingID == segment.name
        if segment.codes.known:
            assert segment.codes.property_type != ANATOMY, f"{segment.name} should have its own code"
    if name == "spleen_ct_segmentation":
        assert by_label["spleen"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
    else:
        kidney = by_label.get("kidney_left")
        if kidney is not None:
            assert kidney.SegmentedPropertyTypeCodeSequence[0].CodeValue == "64033007"
            assert kidney.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    # Labels the model left empty are absent from the SEG and stated absent in the SR.
    absent = [s.name for s in segments if not s.present]
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    measured = report.get_volumetric_roi_measurement_groups()
    assert sorted(g.tracking_identifier for g in measured) == sorted(s.name for s in present)
    stated_absent = [
        g.tracking_identifier for g in report.get_image_measurement_groups()
        if any(item.ConceptNameCodeSequence[0].CodeValue == "705057003"
               and item.ConceptCodeSequence[0].CodeValue == "272519000"
               for item in g[0].ContentSequence if "ConceptCodeSequence" in item)
    ]
    assert sorted(stated_absent) == sorted(absent)


def test_torchscript_gives_the_same_output_as_the_state_dict(tmp_path, ct_volume):
    from_state = Bundle(zoo_bundle("spleen_ct_segmentation", tmp_path / "pt"), CPU).predict(ct_volume)
    from_script = Bundle(zoo_bundle("spleen_ct_segmentation", tmp_path / "ts", torchscript=True), CPU)
    assert not (from_script.bundle_dir / "models" / "model.pt").exists()
    assert np.array_equal(from_script.predict(ct_volume), from_state)


def test_a_wrapped_checkpoint_loads_too(tmp_path, ct_volume):
    bundle_dir = zoo_bundle("spleen_ct_segmentation", tmp_path)
    plain = Bundle(bundle_dir, CPU).predict(ct_volume)
    weights = bundle_dir / "models" / "model.pt"
    torch.save({"model": torch.load(weights, weights_only=True), "epoch": 12}, weights)
    assert np.array_equal(Bundle(bundle_dir, CPU).predict(ct_volume), plain)


def test_bundle_labels_come_from_channel_def():
    info = read_bundle_info(ZOO / "wholeBody_ct_segmentation")
    assert info.labels[1] == "spleen" and info.labels[104] == "urinary_bladder" and 0 not in info.labels
