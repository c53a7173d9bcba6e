"""Argmax through torch.max gives torch.argmax's own indices, MONAI's metadata included."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import AsDiscrete

from dicom_node.compute.argmax import ArgmaxThroughMax


def _with_ties_and_nan(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 3, (4, 9, 8, 7), generator=generator).float()  # many ties
    values[2, 0, 0, 0] = values[0, 1, 1, 1] = float("nan")
    return values


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("keepdim", [False, True])
def test_same_indices_as_argmax(dim: int, keepdim: bool) -> None:
    values = _with_ties_and_nan(dim + 7 * keepdim)
    expected = torch.argmax(values, dim=dim, keepdim=keepdim)
    with ArgmaxThroughMax():
        assert torch.equal(torch.argmax(values, dim=dim, keepdim=keepdim), expected)
        assert torch.equal(values.argmax(dim, keepdim), expected)
        assert torch.equal(torch.argmax(values), torch.argmax(values.flatten()))  # no axis: untouched


def test_asdiscrete_on_a_metatensor_takes_max_and_keeps_the_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    affine = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64))
    scores = MetaTensor(_with_ties_and_nan(1), affine=affine)
    expected = AsDiscrete(argmax=True)(scores)
    calls = []
    original_max = torch.max
    monkeypatch.setattr(torch, "max", lambda *a, **k: calls.append(1) or original_max(*a, **k))
    with ArgmaxThroughMax():
        result = AsDiscrete(argmax=True)(scores)
    assert calls, "argmax did not go through torch.max"
    assert isinstance(result, MetaTensor)
    assert torch.equal(result.as_tensor(), expected.as_tensor())
    assert torch.equal(result.affine, expected.affine)
