"""Reversing the axis order of a 3D array, ``[i, j, k]`` to ``[k, j, i]`` and back, in tiles.

Volumes are indexed ``[i, j, k]`` (column, row, slice), as MONAI and NIfTI expect; DICOM images
and SEG frames are ``[k, j, i]``. Turning one into the other as a single strided copy reads or
writes with a stride of a whole plane and misses the cache on almost every voxel. Copying tile
by tile keeps both sides in cache: about four times faster on a 300-slice CT.
"""

from __future__ import annotations

import torch

# Edge of a tile, in voxels along the two reversed axes: 32 x 32 columns of a plane stay in
# cache on both sides of the copy (measured: 16 and 64 are slower on 512 x 512 planes).
_TILE = 32


def copy_reversed_axes(source: torch.Tensor, destination: torch.Tensor) -> None:
    """``destination[a, b, c] = source[c, b, a]``, converting the type as ``copy_`` does."""
    if tuple(destination.shape) != tuple(source.shape)[::-1]:
        raise ValueError(f"cannot copy {tuple(source.shape)} reversed into {tuple(destination.shape)}")
    first, _, last = destination.shape
    for a in range(0, first, _TILE):
        for c in range(0, last, _TILE):
            destination[a : a + _TILE, :, c : c + _TILE].copy_(source[c : c + _TILE, :, a : a + _TILE].permute(2, 1, 0))
