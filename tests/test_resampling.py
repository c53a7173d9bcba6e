"""The gathering shortcut for nearest-neighbour resampling gives MONAI's own voxels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.layers import AffineTransform
from monai.transforms import Compose, Invertd, Orientationd, Spacingd

from dicom_node import resampling
from dicom_node.resampling import SeparableAffineTransform, separable_nearest_resampling


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
        assert fast._axis_indices(source, theta, size) is not None, "the shortcut was not taken"
        assert torch.equal(fast(source, theta=theta, spatial_size=size), expected)


def test_rotation_and_bilinear_fall_back_to_monai() -> None:
    source = torch.rand(1, 1, 10, 11, 12, dtype=torch.float64)
    angle = 0.3
    rotation = torch.eye(4, dtype=torch.float64)
    rotation[:2, :2] = torch.tensor([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    nearest = {"normalized": False, "mode": "nearest", "padding_mode": "zeros"}
    assert SeparableAffineTransform(**nearest)._axis_indices(source, rotation, (10, 11, 12)) is None
    assert torch.equal(
        SeparableAffineTransform(**nearest)(source, theta=rotation, spatial_size=(10, 11, 12)),
        AffineTransform(**nearest)(source, theta=rotation, spatial_size=(10, 11, 12)),
    )
    bilinear = {"normalized": False, "mode": "bilinear", "padding_mode": "zeros"}
    scale = torch.diag(torch.tensor([0.5, 0.5, 0.5, 1.0], dtype=torch.float64))
    assert SeparableAffineTransform(**bilinear)._axis_indices(source, scale, (20, 22, 24)) is None


def test_invertd_gives_the_same_label_map_inside_and_outside_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle-like round trip: LPS source, RAS orientation, 3 mm spacing, inverted with nearest."""
    gathers = []
    original_gather = resampling._gather
    monkeypatch.setattr(resampling, "_gather", lambda *args: gathers.append(1) or original_gather(*args))
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
    with separable_nearest_resampling():
        fast = inverse({"image": item["image"], "pred": MetaTensor(labels, meta=item["image"].meta,
                        applied_operations=item["image"].applied_operations)})["pred"]
    assert fast.shape == reference.shape == image.shape
    assert torch.equal(fast.as_tensor(), reference.as_tensor())
    assert torch.allclose(fast.affine, reference.affine)
    assert reference.as_tensor().sum() > 0
    assert gathers == [1], "Invertd did not take the shortcut inside the block"
