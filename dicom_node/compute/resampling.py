"""Resampling between axis-aligned grids one axis at a time, without a dense sampling grid.

A bundle's ``Spacingd`` brings the source volume (tens of millions of voxels) onto the network's
grid, and its ``Invertd`` brings the label map back. MONAI does both with ``affine_grid`` and
``grid_sample``: three float coordinates for every output voxel, and a copy of the source into
C order first. When the voxel-to-voxel transform has no rotation or shear, which is what
``Spacingd`` and its inverse produce, both interpolations MONAI offers there are separable:
nearest-neighbour picks, along each axis, a source index that depends only on the output index
along that axis; trilinear interpolation is linear interpolation along one axis after the other.
Small per-axis index and weight vectors then do the work of the dense grid.

:class:`SeparableAffineTransform` is MONAI's ``AffineTransform`` with that shortcut; everything
it cannot prove separable goes to MONAI's own code. Nearest-neighbour results are identical to
MONAI's voxel for voxel; linear ones equal them to float rounding (the weights are computed in
double precision, MONAI's in single). :func:`separable_resampling` installs it where MONAI's
spatial transforms look it up, for the duration of a ``with`` block, and lays out results on
the source grid frame by frame like the node's volumes (:func:`dicom_node.compute.volume.load_volume`),
so that a label map comes back in the layout the SEG is built from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from monai.networks.layers import AffineTransform
from monai.transforms.spatial import functional as spatial_functional
from monai.utils import ensure_tuple

# Off-diagonal terms below this (in voxels per voxel) are rounding noise of an axis-aligned
# transform, not a rotation: over 10,000 voxels they move a coordinate by a millionth of a voxel.
_AXIS_ALIGNED_TOLERANCE = 1e-10
# Spatial axes of a (batch, channel, i, j, k) tensor, and the same axes of its frame-major view.
_SPATIAL_DIMS = (2, 3, 4)
_FRAME_MAJOR_DIMS = (4, 3, 2)
# Result planes resampled together when the outermost axis shrinks (a few MB at 512 x 512).
_PLANES_PER_PIECE = 4


@dataclass(frozen=True)
class _AxisPlan:
    """How one output axis is sampled from the source axis: each output index takes
    ``weights[0] * source[lower] + weights[1] * source[upper]`` (only ``lower`` for nearest),
    and is zero where ``outside`` is set (zero padding)."""

    lower: torch.Tensor
    upper: torch.Tensor | None
    weights: tuple[torch.Tensor, torch.Tensor] | None
    outside: torch.Tensor | None

    @property
    def size(self) -> int:
        return len(self.lower)

    def part(self, start: int, stop: int) -> _AxisPlan:
        """The plan of output indices ``start:stop`` alone."""
        return _AxisPlan(
            self.lower[start:stop],
            None if self.upper is None else self.upper[start:stop],
            None if self.weights is None else (self.weights[0][start:stop], self.weights[1][start:stop]),
            None if self.outside is None else self.outside[start:stop],
        )


class SeparableAffineTransform(AffineTransform):
    """``AffineTransform`` that samples axis-aligned transforms one axis at a time.

    ``frame_major_shape``: spatial shape of the grid whose results are laid out frame by frame
    (``[k, j, i]`` memory behind ``[i, j, k]`` indices); other results are C-ordered.
    """

    frame_major_shape: tuple[int, ...] | None = None

    def forward(
        self, src: torch.Tensor, theta: torch.Tensor, spatial_size: Sequence[int] | int | None = None
    ) -> torch.Tensor:
        output_size = self._output_size(src, spatial_size)
        plans = self._axis_plans(src, theta, output_size)
        if plans is None:
            return super().forward(src, theta, spatial_size)
        return _sample(src, plans, frame_major=output_size == self.frame_major_shape)

    def _output_size(self, src: torch.Tensor, spatial_size: Sequence[int] | int | None) -> tuple[int, ...]:
        if spatial_size is not None:
            return tuple(int(s) for s in ensure_tuple(spatial_size))
        if self.spatial_size is not None:
            return tuple(int(s) for s in self.spatial_size)
        return tuple(src.shape[2:])

    def _axis_plans(
        self, src: torch.Tensor, theta: torch.Tensor, output_size: tuple[int, ...]
    ) -> list[_AxisPlan] | None:
        """Per output axis, what to take from the source, or None when not separable.

        In voxel coordinates (``normalized=False``) ``theta`` maps an output voxel centre to a
        source position. ``grid_sample``'s nearest mode rounds it half to even, as
        ``torch.round`` does; its bilinear mode weighs the two neighbours by distance; its
        border mode first clamps the position into the source.
        """
        rank = src.dim() - 2
        if (
            self.mode not in ("nearest", "bilinear")
            or (self.mode == "bilinear" and not src.is_floating_point())
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
        plans = []
        for axis, size in enumerate(output_size):
            position = torch.arange(size, dtype=torch.float64) * linear[axis, axis] + matrix[axis, rank]
            plans.append(self._axis_plan(position, int(src.shape[2 + axis]), src.dtype))
        return plans

    def _axis_plan(self, position: torch.Tensor, source_size: int, dtype: torch.dtype) -> _AxisPlan:
        last = source_size - 1
        if self.padding_mode == "border":
            position = position.clamp(0, last)
        if self.mode == "nearest":
            index = torch.round(position).to(torch.int64)
            outside = (index < 0) | (index > last)
            return _AxisPlan(index.clamp(0, last), None, None, outside if bool(outside.any()) else None)
        lower = torch.floor(position)
        upper_weight = position - lower
        lower = lower.to(torch.int64)
        upper = lower + 1
        lower_weight = 1.0 - upper_weight
        # a neighbour outside the source counts as zero (zeros) or is never weighed (border)
        lower_weight = torch.where((lower < 0) | (lower > last), 0.0, lower_weight)
        upper_weight = torch.where((upper < 0) | (upper > last), 0.0, upper_weight)
        outside = (lower_weight == 0) & (upper_weight == 0)
        return _AxisPlan(
            lower.clamp(0, last),
            upper.clamp(0, last),
            (lower_weight.to(dtype), upper_weight.to(dtype)),
            outside if bool(outside.any()) else None,
        )


def _sample_axis(tensor: torch.Tensor, dim: int, plan: _AxisPlan) -> torch.Tensor:
    device = tensor.device
    if plan.weights is None or plan.upper is None:
        result = tensor.index_select(dim, plan.lower.to(device))
    elif dim == 2:
        result = _interpolate_planes(tensor, plan.lower, plan.upper, plan.weights)
    else:
        shape = [1] * tensor.dim()
        shape[dim] = -1
        lower_weight, upper_weight = (w.to(device).view(shape) for w in plan.weights)
        result = tensor.index_select(dim, plan.lower.to(device)).mul_(lower_weight)
        result.add_(tensor.index_select(dim, plan.upper.to(device)).mul_(upper_weight))
    if plan.outside is not None:
        result.index_fill_(dim, torch.nonzero(plan.outside).flatten().to(device), 0)
    return result


def _interpolate_planes(
    tensor: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Linear interpolation along the outermost spatial axis, one result plane at a time.

    Along that axis whole planes are weighed, so each result plane is written once from its two
    source planes while they are in cache. Selecting all lower and all upper planes first, as
    along the other axes, made four passes over a result of a third of a gigabyte (a 300-slice
    CT) and took most of the time of bringing a label map back to the source grid.
    """
    shape = list(tensor.shape)
    shape[2] = len(lower)
    result = tensor.new_empty(shape)
    planes = zip(lower.tolist(), upper.tolist(), weights[0].tolist(), weights[1].tolist(), strict=True)
    for index, (below, above, below_weight, above_weight) in enumerate(planes):
        plane = result[:, :, index]
        torch.mul(tensor[:, :, below], below_weight, out=plane)
        if above_weight:
            plane.add_(tensor[:, :, above], alpha=above_weight)
    return result


def _frame_major(tensor: torch.Tensor) -> torch.Tensor:
    """The ``(batch, channel, k, j, i)`` view of a ``(batch, channel, i, j, k)`` tensor."""
    return tensor.permute(0, 1, 4, 3, 2)


def _sample(src: torch.Tensor, plans: list[_AxisPlan], frame_major: bool) -> torch.Tensor:
    """``src`` resampled axis by axis, every step reading and writing in memory order.

    Each ``index_select`` writes a new tensor in the order of the view it reads, so the work is
    done in the view in which the source is contiguous (frame-major for the node's volumes), or
    the one the result must have. Axes that shrink go first, outermost first: whole planes and
    rows are copied or skipped. Axes that grow go last, innermost first: the data stay small
    until the final step copies whole planes.
    """
    in_frame_major = frame_major or _frame_major(src).is_contiguous()
    tensor, dims = (
        (_frame_major(src).contiguous(), _FRAME_MAJOR_DIMS)
        if in_frame_major
        else (src.contiguous(), _SPATIAL_DIMS)
    )
    shrinking = [axis for axis in range(3) if plans[axis].size < src.shape[2 + axis]]
    growing = [axis for axis in range(3) if axis not in shrinking]
    order = sorted(shrinking, key=lambda axis: dims[axis]) + sorted(growing, key=lambda axis: -dims[axis])
    if shrinking and dims[order[0]] == 2:
        # The outermost axis shrinks: a few result planes at a time through all steps, so that
        # no intermediate holds more than those planes at the source's size.
        outer, rest = plans[order[0]], order[1:]
        pieces = []
        for start in range(0, outer.size, _PLANES_PER_PIECE):
            piece = _sample_axis(tensor, 2, outer.part(start, start + _PLANES_PER_PIECE))
            for axis in rest:
                piece = _sample_axis(piece, dims[axis], plans[axis])
            pieces.append(piece)
        tensor = torch.cat(pieces, dim=2)
    else:
        for axis in order:
            tensor = _sample_axis(tensor, dims[axis], plans[axis])
    if not in_frame_major:
        return tensor
    result = _frame_major(tensor)
    return result if frame_major else result.contiguous()


@contextmanager
def separable_resampling(frame_major_shape: Sequence[int] | None = None) -> Iterator[None]:
    """Let MONAI's spatial transforms resample axis-aligned cases one axis at a time.

    MONAI's ``spatial_resample`` (behind ``Spacing``, ``SpatialResample`` and their inverses in
    ``Invertd``) builds its ``AffineTransform`` from the module it lives in; that one name is
    swapped for the subclass and restored on leaving, so nothing outside the block changes.
    Results whose spatial shape is ``frame_major_shape`` are laid out frame by frame.
    """
    shape = tuple(int(s) for s in frame_major_shape) if frame_major_shape is not None else None
    transform = type(
        "SeparableAffineTransformHere", (SeparableAffineTransform,), {"frame_major_shape": shape}
    )
    original = spatial_functional.AffineTransform
    spatial_functional.AffineTransform = transform
    try:
        yield
    finally:
        spatial_functional.AffineTransform = original
