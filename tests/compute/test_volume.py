"""Volume geometry against an independent reference (dcm2niix), and masks back on the images.

Every geometry a scanner produces is written as a synthetic series whose voxels are all
different, so any flip, transposition or shift shows; the node's volume must place each voxel
where dcm2niix places it, and a mask must come back, through a bundle's reorientation and its
inverse and a SEG, onto exactly the pixels it came from.
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
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, Orientationd

from dicom_node.bundle_info import BundleInfo
from dicom_node.compute.bundle import as_loaded
from dicom_node.compute.frames import GeometryError, read_frames, split_stacks
from dicom_node.compute.volume import load_volume
from dicom_node.results.codes import codes_for_label
from dicom_node.results.equipment import Equipment
from dicom_node.results.seg import Segment, build_seg
from dicom_node.results.seg_frames import scan_labels
from tests.support.ct_study import StudyInfo, enhanced_ct, series_from_array, write_series

SHAPE = (40, 32, 12)


def rotation(x_degrees: float, z_degrees: float) -> np.ndarray:
    ax, az = np.radians([x_degrees, z_degrees])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def affine(directions: np.ndarray, spacing, origin=(-20.0, 35.5, 101.25)) -> np.ndarray:
    """LPS affine whose columns are unit ``directions`` scaled by ``spacing``."""
    result = np.eye(4)
    result[:3, :3] = directions * np.asarray(spacing)
    result[:3, 3] = origin
    return result


GEOMETRIES = {
    "axial": affine(np.eye(3), (0.8, 0.8, 2.5)),
    "reversed": affine(np.diag([1.0, 1.0, -1.0]), (0.8, 0.8, 2.5)),
    "sagittal": affine(np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float), (0.9, 0.9, 3.0)),
    "coronal": affine(np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float), (0.7, 0.7, 2.0)),
    "oblique": affine(rotation(17.0, 11.0), (0.75, 0.75, 1.5)),
    "non-square": affine(np.eye(3), (0.6, 1.1, 2.0)),
}


def distinct_volume(seed: int = 0) -> np.ndarray:
    """HU values in the scanner's range, no two neighbours alike: any misplacement shows."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 3000, size=SHAPE).astype(np.float32)


def truth_mask() -> np.ndarray:
    """An asymmetric blob: a flip or transposition of it is never itself."""
    i, j, k = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    return (((i - 12) / 9.0) ** 2 + ((j - 20) / 6.0) ** 2 + ((k - 4) / 3.0) ** 2 <= 1.0) | (
        (i > 30) & (j < 5) & (k > 8)
    )


def write_geometry(name: str, folder: Path, hu: np.ndarray) -> list[Path]:
    study = StudyInfo()
    if name == "multi-frame":
        frame_order = [5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6]  # stored out of order on purpose
        return write_series([enhanced_ct(hu, GEOMETRIES["oblique"], study, 7, frame_order)], folder)
    return write_series(series_from_array(hu, GEOMETRIES[name], study, 7, name), folder)


def expected_affine_lps(name: str) -> np.ndarray:
    return GEOMETRIES["oblique" if name == "multi-frame" else name]


ALL = [*GEOMETRIES, "multi-frame"]


def dcm2niix(folder: Path, out: Path) -> nibabel.Nifti1Image:
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "n", "-f", "ref", "-o", str(out), str(folder)], check=True, capture_output=True)
    [nifti] = out.glob("ref*.nii")
    return nibabel.load(nifti)


@pytest.mark.parametrize("geometry", ALL)
def test_volume_agrees_with_dcm2niix(tmp_path, geometry):
    hu = np.clip(distinct_volume(), -1024, 3071)
    write_geometry(geometry, tmp_path / "dicom", hu)
    volume = load_volume(read_frames(sorted((tmp_path / "dicom").iterdir())))
    reference = dcm2niix(tmp_path / "dicom", tmp_path / "nifti")

    # Compare in world space: the same voxel centre must carry the same value in both.
    ijk = np.indices(volume.array.shape).reshape(3, -1)
    world = volume.affine_ras @ np.vstack([ijk, np.ones(ijk.shape[1])])
    ref_index = (np.linalg.inv(reference.affine) @ world)[:3]
    ref_ijk = np.rint(ref_index).astype(int)
    residual_mm = np.abs(reference.affine[:3, :3] @ (ref_index - ref_ijk)).max()
    assert residual_mm < 1e-3, f"voxel centres differ by {residual_mm:.2e} mm"
    ref_data = np.asarray(reference.dataobj, dtype=np.float32)
    assert np.array_equal(ref_data[tuple(ref_ijk)], volume.array.reshape(-1))


@pytest.mark.parametrize("geometry", ALL)
def test_volume_is_the_array_that_was_written(tmp_path, geometry):
    hu = np.clip(distinct_volume(), -1024, 3071)
    write_geometry(geometry, tmp_path, hu)
    volume = load_volume(read_frames(sorted(tmp_path.iterdir())))
    expected = expected_affine_lps(geometry)
    # The node always orders k along +normal; a stack written the other way comes back flipped.
    normal = np.cross(expected[:3, 0], expected[:3, 1])
    if np.dot(normal, expected[:3, 2]) < 0:
        hu = hu[:, :, ::-1]
        expected = expected @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, SHAPE[2] - 1], [0, 0, 0, 1]])
    assert np.array_equal(volume.array, hu)
    assert np.allclose(np.diag([-1, -1, 1, 1]) @ expected, volume.affine_ras, atol=1e-4)


def perfect_model_round_trip(volume, truth: np.ndarray) -> np.ndarray:
    """The truth passed through a bundle's reorientation and its Invertd, as a model that
    predicts it perfectly would return it. (Resampling is left out: it is lossy by nature, and
    what is tested here is that no axis is flipped, swapped or shifted on the way.)"""
    keys = ["image", "label"]
    preprocessing = Compose([EnsureChannelFirstd(keys=keys), Orientationd(keys=keys, axcodes="RAS")])
    item = preprocessing(
        {"image": as_loaded(volume.array, volume.affine_ras, "v"),
         "label": as_loaded(truth.astype(np.float32), volume.affine_ras, "t")}
    )
    item["pred"] = item["label"]
    inverted = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True)(item)
    return np.rint(np.asarray(inverted["pred"][0])).astype(np.uint8)


@pytest.mark.parametrize("geometry", ALL)
def test_truth_comes_back_on_the_right_pixels_of_the_right_images(tmp_path, geometry):
    hu = np.clip(distinct_volume(), -1024, 3071)
    truth = truth_mask()
    paths = write_geometry(geometry, tmp_path, hu)
    volume = load_volume(read_frames(paths))
    # The truth is defined on the written array; the node's volume may hold it flipped along k.
    flipped = not np.array_equal(volume.array, hu)
    truth_in_volume = truth[:, :, ::-1] if flipped else truth
    labels = perfect_model_round_trip(volume, truth_in_volume)
    assert np.array_equal(labels, truth_in_volume)

    info = BundleInfo("test", "1", {1: "bone"}, "")
    segment = Segment(1, 1, "bone", codes_for_label("bone"), int(labels.sum()), 1.0)
    scanned = scan_labels(volume.frame_masks(labels.astype(np.uint16)), [1], volume.frame_voxel_ml())
    seg = build_seg(volume, scanned, [segment], info, Equipment("NODE"), 900, "round trip")
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(BytesIO(seg.encode())))
    for frame in volume.frames:
        k_written = int(round(np.linalg.solve(
            expected_affine_lps(geometry)[:3, :3], np.array(frame.position) - expected_affine_lps(geometry)[:3, 3]
        )[2]))
        if frame.index is None:
            mask = seg.get_pixels_by_source_instance([frame.sop_instance_uid], segment_numbers=[1])[0, ..., 0]
        else:
            mask = seg.get_pixels_by_source_frame(
                frame.sop_instance_uid, [frame.index + 1], segment_numbers=[1]
            )[0, ..., 0]
        assert np.array_equal(mask > 0, truth[:, :, k_written].T), f"wrong pixels on the image of slice {k_written}"


def test_repeated_positions_split_into_stacks_per_echo(tmp_path):
    study = StudyInfo()
    first = series_from_array(distinct_volume(1), GEOMETRIES["axial"], study, 1, "echoes")
    second = series_from_array(distinct_volume(2), GEOMETRIES["axial"], study, 1, "echoes")
    for echo, images in ((1, first), (2, second)):
        for ds in images:
            ds.SeriesInstanceUID = first[0].SeriesInstanceUID
            ds.EchoNumbers = echo
    stacks = split_stacks(read_frames(write_series(first + second, tmp_path)))
    assert sorted(stacks) == ["echo 1", "echo 2"]
    assert np.array_equal(load_volume(stacks["echo 2"]).array, np.clip(distinct_volume(2), -1024, 3071))


def test_repeated_positions_with_nothing_to_tell_them_apart_are_refused(tmp_path):
    images = series_from_array(distinct_volume(), GEOMETRIES["axial"], StudyInfo(), 1, "twice")
    images[3].ImagePositionPatient = images[4].ImagePositionPatient
    with pytest.raises(GeometryError, match="share one position"):
        split_stacks(read_frames(write_series(images, tmp_path)))


def test_per_instance_rescale_is_applied(tmp_path):
    hu = np.clip(distinct_volume(), -1024, 3071)
    images = series_from_array(hu, GEOMETRIES["axial"], StudyInfo(), 1, "rescale")
    stored = np.frombuffer(images[2].PixelData, dtype=np.uint16).reshape(SHAPE[1], SHAPE[0]).astype(np.int32)
    images[2].RescaleSlope, images[2].RescaleIntercept = "2", "-2048"
    images[2].PixelData = ((stored + 1024) // 2).astype(np.uint16).tobytes()  # same HU, other encoding
    volume = load_volume(read_frames(write_series(images, tmp_path)))
    assert np.abs(volume.array[:, :, 2] - hu[:, :, 2]).max() <= 1.0
