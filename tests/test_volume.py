"""Volume geometry against an independent reference (dcm2niix) and known phantoms."""

from __future__ import annotations

import subprocess

import nibabel
import numpy as np
import pytest

from dicom_node.volume import GeometryError, load_volume, order_slices, read_headers
from tests.support.ct_study import StudyInfo, ct_series, make_phantom, write_series


@pytest.fixture
def phantom():
    return make_phantom((64, 48, 12), (0.8, 0.8, 2.5), seed=3)


def test_volume_matches_the_phantom_voxel_for_voxel(tmp_path, phantom):
    paths = write_series(ct_series(phantom, StudyInfo(), 1, "axial"), tmp_path)
    volume = load_volume(list(reversed(paths)))
    expected = np.clip(np.rint(phantom.hu), -1024, 3071)
    assert volume.array.shape == phantom.hu.shape
    assert np.array_equal(volume.array, expected)
    # LPS origin (ox, oy, oz) becomes RAS (-ox, -oy, oz); i walks to patient left (R decreases).
    ox, oy, oz = phantom.origin
    assert np.allclose(volume.affine_ras, [[-0.8, 0, 0, -ox], [0, -0.8, 0, -oy], [0, 0, 2.5, oz], [0, 0, 0, 1]])


def test_volume_agrees_with_dcm2niix(tmp_path, phantom):
    paths = write_series(ct_series(phantom, StudyInfo(), 1, "axial"), tmp_path / "dicom")
    out = tmp_path / "nifti"
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "n", "-f", "ref", "-o", str(out), str(tmp_path / "dicom")], check=True,
                   capture_output=True)
    reference = nibabel.load(out / "ref.nii")
    volume = load_volume(paths)
    # dcm2niix flips rows so that its affine has a positive j axis; compare in world space instead
    # of index space: the same voxel centre must carry the same value.
    ref_data = np.asarray(reference.dataobj, dtype=np.float32)  # nibabel applies scl_slope/inter
    ijk = np.array(np.meshgrid(*[np.arange(n) for n in volume.array.shape], indexing="ij")).reshape(3, -1)
    world = volume.affine_ras @ np.vstack([ijk, np.ones(ijk.shape[1])])
    ref_index = (np.linalg.inv(reference.affine) @ world)[:3]
    ref_ijk = np.rint(ref_index).astype(int)
    assert np.abs(ref_index - ref_ijk).max() < 1e-3, "voxel centres do not coincide"
    assert np.array_equal(ref_data[tuple(ref_ijk)], volume.array.reshape(-1))


def test_uneven_spacing_is_refused_with_a_reason(tmp_path, phantom):
    images = ct_series(phantom, StudyInfo(), 1, "axial")
    del images[5]
    with pytest.raises(GeometryError, match="uneven slice spacing"):
        order_slices(read_headers(write_series(images, tmp_path)))


def test_two_stacks_in_one_series_are_refused(tmp_path, phantom):
    images = ct_series(phantom, StudyInfo(), 1, "axial")
    images[3].ImagePositionPatient = images[4].ImagePositionPatient
    with pytest.raises(GeometryError, match="share one position"):
        order_slices(read_headers(write_series(images, tmp_path)))


def test_frame_masks_follow_source_order(tmp_path, phantom):
    paths = write_series(ct_series(phantom, StudyInfo(), 1, "axial"), tmp_path)
    volume = load_volume(paths)
    frames = volume.frame_masks(phantom.labels)
    for k, source in enumerate(volume.sources):
        assert float(source.ImagePositionPatient[2]) == pytest.approx(phantom.origin[2] + k * 2.5, abs=1e-3)
        assert np.array_equal(frames[k], phantom.labels[:, :, k].T)
