"""Enhanced multi-frame images with several stacks: split as dcm2niix splits them.

Each file holds two stacks at the same positions, told apart only per frame (frame type and a
private dimension, echo time, temporal position). Each stack must be found, be the volume
dcm2niix converts for it, be what `explain` lists and a rule picks, and get a SEG that
references its own frames.
"""

from __future__ import annotations

import subprocess
from io import BytesIO
from pathlib import Path

import highdicom as hd
import nibabel
import numpy as np
import pydicom
import pytest

from dicom_node.bundle_info import BundleInfo
from dicom_node.compute.frames import GeometryError, read_frames, split_stacks
from dicom_node.compute.volume import load_volume
from dicom_node.config import Pipeline
from dicom_node.results.codes import codes_for_label
from dicom_node.results.equipment import Equipment
from dicom_node.results.seg import Segment, build_seg
from dicom_node.results.seg_frames import scan_labels
from dicom_node.state.rules import select_series, series_stacks
from tests.compute.test_volume import GEOMETRIES, distinct_volume, truth_mask
from tests.support.ct_study import StudyInfo, write_series
from tests.support.enhanced import StackKind, enhanced_stacks

PHASE = ("ORIGINAL", "PRIMARY", "PHASE", "NONE")
CASES = {
    "MR magnitude and phase": (
        "MR", ["stack", "private", "in-stack position"], [StackKind(), StackKind(frame_type=PHASE, private_index=2)],
        ["frame type ORIGINAL\\PRIMARY\\MAGNITUDE\\NONE, dimension (2005,1011) 1",
         "frame type ORIGINAL\\PRIMARY\\PHASE\\NONE, dimension (2005,1011) 2"],
    ),
    "MR two echoes": (
        "MR", ["stack", "echo time", "in-stack position"], [StackKind(echo_time=5.0), StackKind(echo_time=12.5)],
        ["echo time 5 ms", "echo time 12.5 ms"],
    ),
    "CT two temporal positions": (
        "CT", ["stack", "temporal position", "in-stack position"],
        [StackKind(("ORIGINAL", "PRIMARY", "AXIAL", "NONE"), temporal_position=t) for t in (1, 2)],
        ["temporal position 1", "temporal position 2"],
    ),
}


def stack_volumes() -> list[np.ndarray]:
    return [np.clip(distinct_volume(seed), -1024, 3071) for seed in (1, 2)]


def write_case(name: str, folder: Path) -> list[Path]:
    modality, dimensions, kinds, _ = CASES[name]
    ds = enhanced_stacks(stack_volumes(), kinds, GEOMETRIES["oblique"], StudyInfo(), modality, dimensions)
    return write_series([ds], folder)


def dcm2niix_volumes(folder: Path, out: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every volume dcm2niix writes for the folder, with its affine."""
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "n", "-f", "ref", "-o", str(out), str(folder)], check=True, capture_output=True)
    volumes = []
    for path in sorted(out.glob("*.nii")):
        image = nibabel.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
        for t in range(data.shape[3] if data.ndim == 4 else 1):
            volumes.append((data[..., t] if data.ndim == 4 else data, image.affine))
    return volumes


def same_in_world_space(volume, data: np.ndarray, affine: np.ndarray) -> bool:
    """Every voxel centre of the node's volume holds the value dcm2niix has at that point."""
    if data.shape != volume.array.shape:
        return False
    ijk = np.indices(volume.array.shape).reshape(3, -1)
    world = volume.affine_ras @ np.vstack([ijk, np.ones(ijk.shape[1])])
    index = (np.linalg.inv(affine) @ world)[:3]
    nearest = np.rint(index).astype(int)
    if np.abs(affine[:3, :3] @ (index - nearest)).max() > 1e-3 or nearest.min() < 0:
        return False
    if np.any(nearest.max(axis=1) >= np.array(data.shape)):
        return False
    return bool(np.array_equal(data[tuple(nearest)], volume.array.reshape(-1)))


@pytest.mark.parametrize("case", CASES)
def test_each_stack_is_found_and_is_the_volume_dcm2niix_converts_for_it(tmp_path, case):
    """dcm2niix converts each stack written alone (given both at once, it keeps frames in the
    order it sorts them by position and cuts that list in two, mixing the stacks)."""
    modality, dimensions, kinds, names = CASES[case]
    paths = write_case(case, tmp_path / "dicom")
    stacks = split_stacks(read_frames(paths))
    assert list(stacks) == names
    for s, ((name, frames), written) in enumerate(zip(stacks.items(), stack_volumes(), strict=True)):
        assert len(frames) == written.shape[2]
        volume = load_volume(frames)
        assert volume.placement is None
        assert np.array_equal(volume.array, written), f"stack {name!r} holds another stack's pixels"
        alone = tmp_path / f"stack {s}"
        write_series([enhanced_stacks([written], [kinds[s]], GEOMETRIES["oblique"], StudyInfo(), modality,
                                      dimensions)], alone)
        [(data, affine)] = dcm2niix_volumes(alone, tmp_path / f"nifti {s}")
        assert same_in_world_space(volume, data, affine), f"stack {name!r} is not where dcm2niix puts it"


@pytest.mark.parametrize("case", CASES)
def test_a_seg_references_the_frames_of_the_stack_it_was_made_from(tmp_path, case):
    paths = write_case(case, tmp_path)
    stacks = split_stacks(read_frames(paths))
    name = list(stacks)[1]
    volume = load_volume(stacks[name])
    truth = truth_mask()
    masks = volume.frame_masks(truth.astype(np.uint16))
    scanned = scan_labels(masks, [1], volume.frame_voxel_ml())
    segment = Segment(1, 1, "bone", codes_for_label("bone"), scanned.counts[1], scanned.volumes_ml[1])
    encoded = build_seg(volume, scanned, [segment], BundleInfo("t", "1", {1: "bone"}, ""), Equipment("N"), 900, "s")
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(BytesIO(encoded.encode())))
    own = {frame.index + 1 for frame in volume.frames}
    referenced = {
        int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for item in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced and referenced <= own, f"frames of another stack referenced: {sorted(referenced - own)}"
    for k, frame in enumerate(volume.frames):
        if not truth[:, :, k].any():
            continue
        read = seg.get_pixels_by_source_frame(frame.sop_instance_uid, [frame.index + 1], segment_numbers=[1])
        assert np.array_equal(read[0, ..., 0] > 0, truth[:, :, k].T)


def test_explain_lists_each_stack_with_its_frames_and_a_rule_picks_the_magnitude(tmp_path):
    paths = write_case("MR magnitude and phase", tmp_path)
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    stacks = series_stacks(header.SeriesInstanceUID, paths)
    assert [facts.problem for facts in stacks] == [None, None]
    assert all("(12 frames, axial, 1.50 mm)" in facts.label for facts in stacks)
    assert "[frame type ORIGINAL\\PRIMARY\\PHASE\\NONE, dimension (2005,1011) 2]" in stacks[1].label
    rule = Pipeline(name="p", model=Path("m"), select={"Modality": "MR", "FrameType": {"contains": ["MAGNITUDE"]}})
    selection = select_series(rule, stacks)
    assert selection.chosen == [stacks[0]]
    assert "does not contain MAGNITUDE" in selection.reasons[stacks[1].key]


def test_a_private_dimension_alone_sets_stacks_apart(tmp_path):
    kinds = [StackKind(private_index=1), StackKind(private_index=2)]
    ds = enhanced_stacks(stack_volumes(), kinds, GEOMETRIES["axial"], StudyInfo(), "MR",
                         ["stack", "private", "in-stack position"])
    stacks = split_stacks(read_frames(write_series([ds], tmp_path)))
    assert list(stacks) == ["dimension (2005,1011) 1", "dimension (2005,1011) 2"]


def test_frames_that_nothing_sets_apart_are_refused_by_name(tmp_path):
    ds = enhanced_stacks(stack_volumes(), [StackKind(), StackKind()], GEOMETRIES["axial"], StudyInfo(), "MR",
                         ["stack", "in-stack position"])
    with pytest.raises(GeometryError, match="frame type, dimension index"):
        split_stacks(read_frames(write_series([ds], tmp_path)))
