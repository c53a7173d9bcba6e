"""Tilted, unevenly spaced and gapped stacks: sampled onto a regular grid, masks back on every image.

Each series samples a phantom defined in patient space (millimetres), so the truth is known at
every pixel centre of every source image whatever the geometry: a smooth field to measure the
grid's values against, and a solid blob whose threshold a perfect model returns.
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
from dicom_node.compute.frames import GeometryError, read_frames
from dicom_node.compute.volume import load_volume
from dicom_node.results.codes import codes_for_label
from dicom_node.results.equipment import Equipment
from dicom_node.results.seg import Segment, build_seg
from dicom_node.results.seg_frames import scan_labels
from tests.support.ct_study import StudyInfo, series_from_array, write_series

COLUMNS, ROWS = 48, 40
PIXEL_MM = 0.8
ORIGIN = np.array([-19.0, -14.0, 40.0])
BLOB_HU, AIR_HU, THRESHOLD_HU = 400.0, -800.0, -200.0
# Steps between images, mm: they vary by a factor of 7 (1 to 7 mm) and one image is missing.
UNEVEN_STEPS = [1.0, 1.0, 2.0, 3.0, 7.0, 2.0, 1.0, 4.0, 4.0, 1.0, 2.0, 5.0, 1.0, 3.0]


def smooth_field(points: np.ndarray) -> np.ndarray:
    """HU at LPS points (3, n): smooth, so that linear interpolation is nearly exact."""
    x, y, z = points
    return 300 * np.sin(x / 9.0) + 250 * np.cos(y / 7.0) + 200 * np.sin(z / 11.0)


def blob(points: np.ndarray) -> np.ndarray:
    """An off-centre, asymmetric ellipsoid and a bar: any flip or shift of it shows."""
    x, y, z = points
    ellipsoid = ((x + 3) / 11.0) ** 2 + ((y - 2) / 8.0) ** 2 + ((z - 58.0) / 12.0) ** 2 <= 1.0
    bar = (x > 6) & (x < 12) & (y > -9) & (y < 5) & (z > 46.0) & (z < 66.0)
    return ellipsoid | bar


def image_geometry(tilt_degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction of an axial image acquired with the gantry tilted about x."""
    tilt = np.radians(tilt_degrees)
    return np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(tilt), np.sin(tilt)])


def pixel_centres(position: np.ndarray, row: np.ndarray, column: np.ndarray) -> np.ndarray:
    """LPS centres of one image's pixels, (3, columns, rows): [:, c, r] is pixel (r, c)."""
    c, r = np.meshgrid(np.arange(COLUMNS), np.arange(ROWS), indexing="ij")
    return position[:, None, None] + PIXEL_MM * (row[:, None, None] * c + column[:, None, None] * r)


def table_positions(steps: list[float]) -> list[np.ndarray]:
    """Image positions as the table moves along z by ``steps``, the images tilted or not."""
    z = np.concatenate([[0.0], np.cumsum(steps)])
    return [ORIGIN + np.array([0.0, 0.0, dz]) for dz in z]


def write_stack(folder: Path, tilt_degrees: float, steps: list[float], phantom) -> list[Path]:
    """Single-frame CT images of ``phantom`` at the given table positions, gantry tilted."""
    row, column = image_geometry(tilt_degrees)
    positions = table_positions(steps)
    hu = np.stack([phantom(pixel_centres(p, row, column)) for p in positions], axis=-1).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = row * PIXEL_MM, column * PIXEL_MM, [0, 0, 1], ORIGIN
    images = series_from_array(np.clip(hu, -1024, 3071), affine, StudyInfo(), 3, f"tilt {tilt_degrees}")
    for ds, position in zip(images, positions, strict=True):
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.GantryDetectorTilt = f"{tilt_degrees:g}"
    return write_series(images, folder)


def truth_on_image(frame) -> np.ndarray:
    """The blob at each pixel centre of a source image, (rows, columns)."""
    row, column = np.array(frame.orientation[:3]), np.array(frame.orientation[3:])
    return blob(pixel_centres(np.array(frame.position), row, column)).T


def perfect_model(volume) -> np.ndarray:
    """The label map a perfect model returns: the blob is exactly the voxels above threshold."""
    return (volume.array > THRESHOLD_HU).astype(np.uint16)


def boundary(truth: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of the other class: where a threshold of interpolated values
    may fall either way, half a voxel from the true edge."""
    padded = np.pad(truth, 1, mode="edge")
    neighbours = [padded[1:-1, :-2], padded[1:-1, 2:], padded[:-2, 1:-1], padded[2:, 1:-1]]
    return np.any([n != truth for n in neighbours], axis=0)


def compare_with_truth(volume, masks: np.ndarray) -> tuple[float, int]:
    """Dice over all source images, and the number of wrong pixels off the truth's boundary."""
    overlap = total = off_boundary = 0
    for frame, mask in zip(volume.frames, masks, strict=True):
        truth = truth_on_image(frame)
        got = mask > 0
        overlap += int(np.sum(got & truth))
        total += int(got.sum() + truth.sum())
        off_boundary += int(np.sum((got != truth) & ~boundary(truth)))
    return 2.0 * overlap / total, off_boundary


@pytest.mark.parametrize("tilt", [0.0, 7.5, 15.0, 22.0, 30.0])
@pytest.mark.parametrize("spacing", ["even", "uneven with a gap"])
def test_a_perfect_models_mask_comes_back_on_the_right_pixels_of_every_source_image(tmp_path, tilt, spacing):
    steps = [2.5] * 14 if spacing == "even" else UNEVEN_STEPS
    volume = load_volume(read_frames(write_stack(tmp_path, tilt, steps, lambda p: np.where(blob(p), BLOB_HU, AIR_HU))))
    if tilt == 0.0 and spacing == "even":
        assert volume.placement is None, "a regular stack is its own grid"
    else:
        assert volume.placement is not None
    masks = volume.frame_masks(perfect_model(volume))
    dice, off_boundary = compare_with_truth(volume, masks)
    assert off_boundary == 0, "pixels away from the blob's edge are wrong"
    assert dice >= 0.99
    # The check can fail: the same masks one pixel off are told apart.
    shifted = np.roll(masks, 1, axis=1)
    assert compare_with_truth(volume, shifted)[0] < 0.95


def test_an_untilted_stack_on_a_common_lattice_comes_back_exactly(tmp_path):
    """Uneven steps that are multiples of the smallest: every image lies on the grid."""
    paths = write_stack(tmp_path, 0.0, UNEVEN_STEPS, lambda p: np.where(blob(p), BLOB_HU, AIR_HU))
    volume = load_volume(read_frames(paths))
    assert volume.spacing[2] == pytest.approx(1.0)
    masks = volume.frame_masks(perfect_model(volume))
    for frame, mask in zip(volume.frames, masks, strict=True):
        assert np.array_equal(mask > 0, truth_on_image(frame))


@pytest.mark.parametrize("tilt", [7.5, 30.0])
def test_grid_values_are_the_phantoms_in_patient_space(tmp_path, tilt):
    volume = load_volume(read_frames(write_stack(tmp_path, tilt, UNEVEN_STEPS, smooth_field)))
    ijk = np.indices(volume.array.shape).reshape(3, -1)
    world = (volume.affine_ras @ np.vstack([ijk, np.ones(ijk.shape[1])]))[:3]
    world[:2] *= -1  # RAS to LPS
    covered = volume.array.reshape(-1) > volume.array.min() + 1  # where images reach
    error = np.abs(volume.array.reshape(-1) - smooth_field(world))[covered]
    # linear interpolation of a field that bends by up to 45 HU/mm over 7 mm gaps
    assert np.median(error) < 5.0


def test_the_grid_agrees_with_dcm2niix_tilt_correction(tmp_path):
    """dcm2niix resamples a tilted CT onto the same grid (image axes and normal): its slices must
    be ours. Its tilt-corrected data sit a constant fraction of a pixel off its own affine, so
    what is compared is the correction of the shear: slice by slice, the offset between its data
    and the phantom must be one and the same, as ours is (zero)."""
    paths = write_stack(tmp_path / "dicom", 15.0, [2.5] * 14, smooth_field)
    volume = load_volume(read_frames(paths))
    out = tmp_path / "nifti"
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "n", "-f", "ref", "-o", str(out), str(tmp_path / "dicom")],
                   check=True, capture_output=True)
    [tilted] = out.glob("ref*Tilt*.nii")
    reference = np.asarray(nibabel.load(tilted).dataobj, dtype=np.float32)[:, ::-1]  # dcm2niix flips rows
    assert reference.shape == volume.array.shape

    ijk = np.indices(volume.array.shape).reshape(3, -1).astype(float)
    shifts = np.linspace(-2.0, 2.0, 81)

    def phantom_on_grid(shift: float) -> np.ndarray:
        moved = np.vstack([ijk[0], ijk[1] + shift, ijk[2], np.ones(ijk.shape[1])])
        world = (volume.affine_ras @ moved)[:3]
        world[:2] *= -1
        return smooth_field(world).reshape(volume.array.shape)

    fields = [phantom_on_grid(s) for s in shifts]
    covered = (volume.array > volume.array.min() + 1) & (reference > reference.min() + 1)
    best = {"node": [], "dcm2niix": []}
    for k in range(volume.array.shape[2]):
        inside = covered[:, :, k]
        for name, data in (("node", volume.array), ("dcm2niix", reference)):
            errors = [np.median(np.abs(data[:, :, k] - f[:, :, k])[inside]) for f in fields]
            best[name].append(shifts[int(np.argmin(errors))])
    assert np.ptp(best["dcm2niix"]) <= 0.1, f"dcm2niix's slices are offset unevenly: {best['dcm2niix']}"
    assert np.allclose(best["node"], 0.0, atol=0.05)


def test_seg_of_a_tilted_stack_references_each_image_with_its_own_mask(tmp_path):
    paths = write_stack(tmp_path, 20.0, UNEVEN_STEPS, lambda p: np.where(blob(p), BLOB_HU, AIR_HU))
    volume = load_volume(read_frames(paths))
    masks = volume.frame_masks(perfect_model(volume))
    scanned = scan_labels(masks, [1], volume.frame_voxel_ml())
    segment = Segment(1, 1, "bone", codes_for_label("bone"), scanned.counts[1], scanned.volumes_ml[1])
    seg = build_seg(volume, scanned, [segment], BundleInfo("test", "1", {1: "bone"}, ""), Equipment("NODE"), 900, "t")
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(BytesIO(seg.encode())))
    for frame, mask in zip(volume.frames, masks, strict=True):
        read = seg.get_pixels_by_source_instance([frame.sop_instance_uid], segment_numbers=[1])[0, ..., 0]
        assert np.array_equal(read > 0, mask > 0)
    # The volume the SR reports: each image's pixels times the slab it stands for.
    exact = 4.0 / 3.0 * np.pi * 11 * 8 * 12 / 1000 + 6 * 14 * 20 / 1000
    assert scanned.volumes_ml[1] == pytest.approx(exact, rel=0.08)


def test_mixed_orientations_and_sizes_are_refused_naming_each_problem(tmp_path):
    paths = write_stack(tmp_path, 0.0, [2.5] * 6, smooth_field)
    odd = pydicom.dcmread(paths[2])
    odd.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    odd.save_as(paths[2])
    small = pydicom.dcmread(paths[4])
    small.Rows = 20
    small.PixelData = small.PixelData[: 20 * COLUMNS * 2]
    small.save_as(paths[4])
    with pytest.raises(GeometryError) as refused:
        load_volume(read_frames(paths))
    assert "2 different orientations" in str(refused.value)
    assert "different sizes (20 x 48, 40 x 48)" in str(refused.value)
