"""Nearest-neighbour resampling between axis-aligned grids, without a dense sampling grid.

A bundle's ``Invertd`` brings a label map back from the network's grid (a few million voxels)
onto the source grid (tens of millions). MONAI does this with ``affine_grid`` and
``grid_sample``: it builds three float coordinates for every output voxel, several gigabytes
and most of a job's time on a CPU. When the voxel-to-voxel transform has no rotation or shear,
which is what ``Spacingd``'s inverse produces, nearest-neighbour sampling is separable: the
source index along each axis depends only on the output index along that axis. Three small
index vectors and one gather give the same voxels at a fraction of the cost.

:class:`SeparableAffineTransform` is MONAI's ``AffineTransform`` with that shortcut; everything
it cannot prove separable goes to MONAI's own code. :func:`separable_nearest_resampling`
installs it where MONAI's spatial transforms look it up, for the duration of a ``with`` block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from monai.networks.layers import AffineTransform
from monai.transforms.spatial import functional as spatial_functional
from monai.utils import ensure_tuple

# Off-diagonal terms below this (in voxels per voxel) are rounding noise of an axis-aligned
# transform, not a rotation: over 10,000 voxels they move a coordinate by a millionth of a voxel.
_AXIS_ALIGNED_TOLERANCE = 1e-10


class SeparableAffineTransform(AffineTransform):
    """``AffineTransform`` that samples axis-aligned nearest-neighbour transforms by gathering."""

    def forward(
        self, src: torch.Tensor, theta: torch.Tensor, spatial_size: Sequence[int] | int | None = None
    ) -> torch.Tensor:
        output_size = self._output_size(src, spatial_size)
        indices = self._axis_indices(src, theta, output_size)
        if indices is None:
            return super().forward(src, theta, spatial_size)
        return _gather(src, indices, self.padding_mode)

    def _output_size(self, src: torch.Tensor, spatial_size: Sequence[int] | int | None) -> tuple[int, ...]:
        if spatial_size is not None:
            return tuple(int(s) for s in ensure_tuple(spatial_size))
        if self.spatial_size is not None:
            return tuple(int(s) for s in self.spatial_size)
        return tuple(src.shape[2:])

    def _axis_indices(
        self, src: torch.Tensor, theta: torch.Tensor, output_size: tuple[int, ...]
    ) -> list[torch.Tensor] | None:
        """Source voxel index for each output index along each axis, or None when not separable.

        In voxel coordinates (``normalized=False``) ``theta`` maps an output voxel centre to a
        source position; ``grid_sample``'s nearest mode then rounds half to even, as
        ``torch.round`` does.
        """
        rank = src.dim() - 2
        if (
            self.mode != "nearest"
            or self.normalized
            or not self.reverse_indexing
            or self.zero_centered
            or self.padding_mode not in ("zeros", "border")
            or rank != 3
            or len(output_size) != rank
            or min(*src.shape[2:], *output_size) < 2
            or not isinstance(theta, torch.Tensor)
            or theta.dim() != 2
            or tuple(theta.shape) not in ((rank, rank + 1), (rank + 1, rank + 1))
        ):
            return None
        matrix = theta.detach().to(device="cpu", dtype=torch.float64)
        linear = matrix[:rank, :rank]
        if torch.any(torch.abs(linear - torch.diag(torch.diagonal(linear))) > _AXIS_ALIGNED_TOLERANCE):
            return None
        indices = []
        for axis, size in enumerate(output_size):
            position = torch.arange(size, dtype=torch.float64) * linear[axis, axis] + matrix[axis, rank]
            indices.append(torch.round(position).to(torch.int64))
        return indices


def _gather(src: torch.Tensor, indices: list[torch.Tensor], padding_mode: str) -> torch.Tensor:
    """``src[:, :, i, j, k]`` over the outer product of the index vectors, padded as asked."""
    if padding_mode == "border":
        source = src
        axis_indices = [index.clamp(0, size - 1) for index, size in zip(indices, src.shape[2:])]
    else:
        # One plane of zeros past the end of each axis: indices outside the source point there.
        source = torch.nn.functional.pad(src, (0, 1, 0, 1, 0, 1))
        axis_indices = [
            torch.where((index >= 0) & (index < size), index, size) for index, size in zip(indices, src.shape[2:])
        ]
    i, j, k = (index.to(src.device) for index in axis_indices)
    # Innermost axis first: the last, largest selection then copies whole contiguous planes.
    return source.index_select(4, k).index_select(3, j).index_select(2, i)


@contextmanager
def separable_nearest_resampling() -> Iterator[None]:
    """Let MONAI's spatial transforms resample axis-aligned nearest-neighbour cases by gathering.

    MONAI's ``spatial_resample`` (behind ``Spacing``, ``SpatialResample`` and their inverses in
    ``Invertd``) builds its ``AffineTransform`` from the module it lives in; that one name is
    swapped for the subclass and restored on leaving, so nothing outside the block changes.
    """
    original = spatial_functional.AffineTransform
    spatial_functional.AffineTransform = SeparableAffineTransform
    try:
        yield
    finally:
        spatial_functional.AffineTransform = original
