"""The separable shortcut gives MONAI's own resampling: the same voxels for nearest-neighbour,
the same values to float rounding for linear interpolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.layers import AffineTransform
from monai.transforms import Compose, Invertd, Orientationd, Spacingd

from dicom_node.compute import resampling
from dicom_node.compute.resampling import SeparableAffineTransform, separable_resampling


def _random_axis_aligned(rng: np.random.Generator) -> torch.Tensor:
    theta = np.eye(4)
    for axis in range(3):
        theta[axis, axis] = rng.choice([-1, 1]) * rng.uniform(0.2, 4.5)
        theta[axis, 3] = rng.uniform(-15, 40)
    return torch.as_tensor(theta)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_axis_aligned_nearest_equals_grid_sample(padding_mode: str, align_corners: bool) -> None:
    rng = np.random.default_rng(7)
    for _ in range(12):
        source = torch.as_tensor(rng.integers(0, 5, size=(1, 2, *rng.integers(2, 30, size=3))).astype(np.float64))
        theta = _random_axis_aligned(rng)
        size = tuple(int(s) for s in rng.integers(2, 40, size=3))
        options = {"normalized": False, "mode": "nearest", "padding_mode": padding_mode, "align_corners": align_corners}
        expected = AffineTransform(**options)(source, theta=theta, spatial_size=size)
        fast = SeparableAffineTransform(**options)
        assert fast._axis_plans(source, theta, size) is not None, "the shortcut was not taken"
        assert torch.equal(fast(source, theta=theta, spatial_size=size), expected)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_axis_aligned_linear_equals_grid_sample_to_rounding(padding_mode: str, align_corners: bool) -> None:
    rng = np.random.default_rng(11)
    for _ in range(12):
        source = torch.as_tensor(rng.uniform(-1, 1, size=(1, 2, *rng.integers(2, 30, size=3))).astype(np.float32))
        theta = _random_axis_aligned(rng).float()
        size = tuple(int(s) for s in rng.integers(2, 40, size=3))
        options = {"normalized": False, "mode": "bilinear", "padding_mode": padding_mode, "align_corners": align_corners}
        expected = AffineTransform(**options)(source, theta=theta, spatial_size=size)
        fast = SeparableAffineTransform(**options)
        assert fast._axis_plans(source, theta, size) is not None, "the shortcut was not taken"
        result = fast(source, theta=theta, spatial_size=size)
        assert result.dtype == expected.dtype
        assert torch.allclose(result, expected, atol=1e-5), float((result - expected).abs().max())


def test_results_on_the_source_grid_are_laid_out_frame_by_frame() -> None:
    """What the block promises the volume's label map: same values, ``[k, j, i]`` memory."""
    rng = np.random.default_rng(5)
    source = torch.as_tensor(rng.integers(0, 4, size=(1, 1, 12, 10, 8)).astype(np.float32))
    theta = torch.diag(torch.tensor([0.23, 0.29, 0.47, 1.0]))  # no output centre halfway between two voxels
    options = {"normalized": False, "mode": "nearest", "padding_mode": "border"}
    expected = AffineTransform(**options)(source, theta=theta, spatial_size=(48, 33, 16))
    with separable_resampling(frame_major_shape=(48, 33, 16)):
        from monai.transforms.spatial import functional

        result = functional.AffineTransform(**options)(source, theta=theta, spatial_size=(48, 33, 16))
        other_grid = functional.AffineTransform(**options)(source, theta=theta, spatial_size=(20, 33, 16))
    assert torch.equal(result, expected)
    assert result[0, 0].permute(2, 1, 0).is_contiguous()
    assert other_grid.is_contiguous()


def test_a_frame_major_volume_is_resampled_like_a_c_ordered_one() -> None:
    """The node's volumes are laid out frame by frame; the result must not depend on it."""
    rng = np.random.default_rng(9)
    by_frame = torch.as_tensor(rng.normal(size=(1, 1, 37, 50, 61)).astype(np.float32))
    volume = by_frame.permute(0, 1, 4, 3, 2)
    theta = torch.diag(torch.tensor([4.3, 4.1, 3.1, 1.0]))
    theta[:3, 3] = torch.tensor([0.4, -0.2, 0.3])
    options = {"normalized": False, "mode": "bilinear", "padding_mode": "zeros"}
    expected = AffineTransform(**options)(volume.contiguous(), theta=theta, spatial_size=(15, 13, 12))
    result = SeparableAffineTransform(**options)(volume, theta=theta, spatial_size=(15, 13, 12))
    assert result.is_contiguous()
    # grid_sample finds positions in single precision: a few millionths of a voxel off here
    assert torch.allclose(result, expected, atol=1e-4)


def test_rotation_falls_back_to_monai() -> None:
    source = torch.rand(1, 1, 10, 11, 12, dtype=torch.float64)
    angle = 0.3
    rotation = torch.eye(4, dtype=torch.float64)
    rotation[:2, :2] = torch.tensor([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    nearest = {"normalized": False, "mode": "nearest", "padding_mode": "zeros"}
    assert SeparableAffineTransform(**nearest)._axis_plans(source, rotation, (10, 11, 12)) is None
    assert torch.equal(
        SeparableAffineTransform(**nearest)(source, theta=rotation, spatial_size=(10, 11, 12)),
        AffineTransform(**nearest)(source, theta=rotation, spatial_size=(10, 11, 12)),
    )
    bilinear = {"normalized": False, "mode": "bilinear", "padding_mode": "zeros"}
    assert SeparableAffineTransform(**bilinear)._axis_plans(source, rotation, (10, 11, 12)) is None


def test_invertd_gives_the_same_label_map_inside_and_outside_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle-like round trip: LPS source, RAS orientation, 3 mm spacing, inverted with nearest."""
    gathers = []
    original_gather = resampling._sample
    monkeypatch.setattr(resampling, "_sample", lambda *args, **kwargs: gathers.append(1) or original_gather(*args, **kwargs))
    rng = np.random.default_rng(3)
    affine = torch.as_tensor(
        [[-0.7, 0, 0, 120.0], [0, -0.7, 0, 95.0], [0, 0, 1.25, -300.0], [0, 0, 0, 1]], dtype=torch.float64
    )
    image = MetaTensor(torch.as_tensor(rng.normal(size=(1, 97, 83, 41)).astype(np.float32)), affine=affine)
    preprocessing = Compose(
        [Orientationd(keys="image", axcodes="RAS"), Spacingd(keys="image", pixdim=(3.0, 3.0, 3.0), mode="bilinear")]
    )
    item = preprocessing({"image": image})
    labels = (item["image"] > 0.3).float() + (item["image"] > 1.0).float()
    inverse = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True)
    reference = inverse({"image": item["image"], "pred": MetaTensor(labels, meta=item["image"].meta,
                         applied_operations=item["image"].applied_operations)})["pred"]
    with separable_resampling():
        fast = inverse({"image": item["image"], "pred": MetaTensor(labels, meta=item["image"].meta,
                        applied_operations=item["image"].applied_operations)})["pred"]
    assert fast.shape == reference.shape == image.shape
    assert torch.equal(fast.as_tensor(), reference.as_tensor())
    assert torch.allclose(fast.affine, reference.affine)
    assert reference.as_tensor().sum() > 0
    assert gathers == [1], "Invertd did not take the shortcut inside the block"
