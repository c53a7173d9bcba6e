"""The SEG whose frames the node encodes itself equals, element for element, the SEG highdicom
builds alone from the same label map: on every geometry of the volume tests, with planes and
segments left out, with one segment (Dimension Organization Type 3D) and with many (the counting
path), and with frames that do not start on a byte. Only what is made fresh for each instance
(UIDs, creation times) is left out of the comparison.
"""

from __future__ import annotations

import logging
from io import BytesIO

import numpy as np
import pydicom
import pytest

from dicom_node.bundle_info import BundleInfo
from dicom_node.compute.frames import read_frames
from dicom_node.compute.volume import load_volume
from dicom_node.results import file_bytes
from dicom_node.results import seg as seg_module
from dicom_node.results.codes import codes_for_label
from dicom_node.results.equipment import Equipment
from dicom_node.results.seg import Segment, build_seg, segment_description
from dicom_node.results.seg_frames import LABELS_TESTED_ONE_BY_ONE, element, scan_labels
from tests.compute.test_volume import GEOMETRIES, distinct_volume, write_geometry
from tests.support.ct_study import StudyInfo, series_from_array, write_series

# Made fresh for every instance: they cannot match between two builds.
FRESH = {
    "SOPInstanceUID", "MediaStorageSOPInstanceUID", "SeriesInstanceUID", "DimensionOrganizationUID",
    "InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "ContributionDateTime",
}
FRESH_TAGS = {f"{pydicom.datadict.tag_for_keyword(keyword):08X}" for keyword in FRESH}


def _without_fresh(value):
    if isinstance(value, dict):
        return {tag: _without_fresh(item) for tag, item in value.items() if tag not in FRESH_TAGS}
    if isinstance(value, list):
        return [_without_fresh(item) for item in value]
    return value


def _read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(BytesIO(data))


def _segments(labels: np.ndarray, count: int) -> list[Segment]:
    names = ["body", "bone", "liver", "spleen", "kidney", "aorta", "lung"]
    return [
        Segment(number, number, names[number - 1], codes_for_label(names[number - 1]),
                int((labels == number).sum()), 1.0)
        for number in range(1, count + 1)
    ]


def _both_ways(volume, labels: np.ndarray, count: int, caplog) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """The node's SEG and highdicom's, read back from their bytes."""
    info = BundleInfo("test model", "1.0", {n: n for n in range(1, count + 1)}, "")
    equipment = Equipment("NODE")
    segments = _segments(labels, count)
    masks = volume.frame_masks(labels)
    with caplog.at_level(logging.WARNING):
        node = build_seg(volume, scan_labels(masks, range(1, count + 1), volume.frame_voxel_ml()), segments, info, equipment, 900, "frames")
    assert "left to highdicom" not in caplog.text, "the node's frame encoder was not used"
    descriptions = [segment_description(segment, info) for segment in segments]
    for ours, theirs in zip(node.dataset.SegmentSequence, descriptions):
        theirs.TrackingUID = ours.TrackingUID
    alone = seg_module._highdicom_seg(
        volume.source_headers, masks, descriptions, info, equipment, 900, "frames"
    )
    return _read(node.encode()), _read(file_bytes(alone))


def _assert_same(node: pydicom.Dataset, alone: pydicom.Dataset) -> None:
    assert node.file_meta.TransferSyntaxUID == alone.file_meta.TransferSyntaxUID
    ours, theirs = _without_fresh(node.to_json_dict()), _without_fresh(alone.to_json_dict())
    assert ours.keys() == theirs.keys()
    for tag in theirs.keys() - {"7FE00010"}:
        assert ours[tag] == theirs[tag], f"({tag[:4]},{tag[4:]}) {pydicom.datadict.keyword_for_tag(int(tag, 16))}"
    # Every pixel equal; the bits after the last pixel, which pydicom leaves as they come, are zero here.
    pixels = int(alone.NumberOfFrames) * alone.Rows * alone.Columns
    our_bits, their_bits = (
        np.unpackbits(np.frombuffer(ds.PixelData, np.uint8), bitorder="little") for ds in (node, alone)
    )
    assert len(our_bits) == len(their_bits)
    assert np.array_equal(our_bits[:pixels], their_bits[:pixels])
    assert not our_bits[pixels:].any()


def _labels(shape: tuple[int, int, int], count: int, seed: int) -> np.ndarray:
    """Segments 1..count scattered in blocks; plane 3 empty and segment 2 missing from plane 5."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint16)
    for number in range(1, count + 1):
        i, j = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        labels[i: i + 4, j: j + 4, 1:] = number
    labels[:, :, 3] = 0
    labels[:, :, 5][labels[:, :, 5] == 2] = 0
    return labels


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_frames_equal_highdicoms_on_every_geometry(tmp_path, geometry, caplog):
    hu = np.clip(distinct_volume(), -1024, 3071)
    volume = load_volume(read_frames(write_geometry(geometry, tmp_path, hu)))
    labels = _labels(volume.array.shape, 3, seed=1)
    _assert_same(*_both_ways(volume, labels, 3, caplog))


def test_one_segment_on_regular_planes_is_organised_3d(tmp_path, caplog):
    volume = load_volume(read_frames(write_geometry("axial", tmp_path, distinct_volume())))
    labels = np.zeros(volume.array.shape, dtype=np.uint16)
    labels[5:20, 6:12, 2:9] = 1
    node, alone = _both_ways(volume, labels, 1, caplog)
    assert alone.DimensionOrganizationType == "3D"
    _assert_same(node, alone)

    labels[:, :, 5] = 0  # a gap: the kept planes are no longer regular
    node, alone = _both_ways(volume, labels, 1, caplog)
    assert "DimensionOrganizationType" not in alone
    _assert_same(node, alone)


def test_many_segments_frames_that_do_not_start_on_a_byte_and_a_given_spacing(tmp_path, caplog):
    count = LABELS_TESTED_ONE_BY_ONE + 3
    hu = np.zeros((13, 11, 9), dtype=np.float32)  # 143 pixels a frame: not a multiple of 8
    images = series_from_array(hu, GEOMETRIES["oblique"], StudyInfo(), 3, "odd")
    for image in images:  # given by the images here, where the other tests let highdicom derive it
        image.SpacingBetweenSlices = "1.5"
    volume = load_volume(read_frames(write_series(images, tmp_path)))
    labels = np.zeros(volume.array.shape, dtype=np.uint16)
    for number in range(1, count + 1):
        labels[number % 13, :, (number % 8) + 1] = number
        labels[:, number % 11, number % 9] = number
    node, alone = _both_ways(volume, labels, count, caplog)
    assert int(alone.NumberOfFrames) > count
    _assert_same(node, alone)


def test_elements_are_padded_to_even_length():
    assert element(0x00081155, b"UI", b"1.2.3") == bytes.fromhex("0800 5511") + b"UI\x06\x00" + b"1.2.3\x00"
    assert element(0x00080104, b"LO", b"abc") == bytes.fromhex("0800 0401") + b"LO\x04\x00" + b"abc "
    assert element(0x7FE00010, b"OB", b"\x01") == bytes.fromhex("E07F 1000") + b"OB\x00\x00\x02\x00\x00\x00\x01\x00"


@pytest.mark.parametrize("label_count", [2, LABELS_TESTED_ONE_BY_ONE + 2])
def test_a_scan_counts_every_label_and_packs_every_image_that_holds_it(label_count):
    rng = np.random.default_rng(label_count)
    masks = rng.integers(0, label_count + 2, size=(6, 9, 7)).astype(np.uint16)  # values beyond the labels too
    masks[2] = 0
    wanted = list(range(1, label_count + 1))
    voxel_ml = np.linspace(0.5, 1.5, 6)  # images of an uneven stack stand for different slabs
    scanned = scan_labels(masks, wanted, voxel_ml)
    expected = np.bincount(masks.ravel(), minlength=label_count + 2)
    assert scanned.counts == {value: int(expected[value]) for value in wanted}
    for value in wanted:
        per_plane = (masks == value).sum(axis=(1, 2))
        assert scanned.volumes_ml[value] == pytest.approx(float(per_plane @ voxel_ml))
    holding = {(plane, value) for plane in range(6) for value in wanted if (masks[plane] == value).any()}
    assert set(scanned.packed) == holding
    for (plane, value), bits in scanned.packed.items():
        unpacked = np.unpackbits(bits, count=masks[plane].size, bitorder="little").reshape(masks[plane].shape)
        assert np.array_equal(unpacked.astype(bool), masks[plane] == value)
