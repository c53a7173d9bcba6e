"""Tiled axis reversal equals a plain transposition, on shapes that do not fill the tiles."""

from __future__ import annotations

import pytest
import torch

from dicom_node.compute.tiled_transpose import copy_reversed_axes


@pytest.mark.parametrize("shape", [(1, 1, 1), (33, 7, 65), (70, 31, 3)])
def test_copy_reversed_axes_equals_permute(shape: tuple[int, int, int]) -> None:
    source = torch.rand(shape) * 200
    destination = torch.empty(shape[::-1], dtype=torch.int16)
    copy_reversed_axes(source, destination)
    assert torch.equal(destination, source.permute(2, 1, 0).to(torch.int16))


def test_copy_reversed_axes_refuses_a_wrong_destination() -> None:
    with pytest.raises(ValueError, match="reversed"):
        copy_reversed_axes(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
