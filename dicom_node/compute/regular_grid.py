"""Stacks that are not one regular volume (gantry tilt, uneven spacing, gaps), on a regular grid.

A bundle expects a volume whose voxels lie on a regular grid. A CT acquired with gantry tilt
has parallel images whose origins drift sideways along the stack; a series with a missing slice
or variable pitch has uneven steps between images. Both are sampled here onto one grid in
patient space, and the bundle's output is brought back by sampling it at each source image's
own pixel centres, so the SEG still describes the very images the radiologist reads. One
mechanism covers tilt, uneven spacing, gaps and their combinations; nothing depends on the
Gantry/Detector Tilt attribute, which only says what the positions already show.

The grid is that of the images themselves, extended to cover every image: its columns and rows
run along the images' row and column directions at their pixel spacing, its slices along the
images' normal at the smallest step between images, shortened so that the last image falls on a
slice too (dcm2niix's tilt-corrected grid, with a finer slice step where the spacing varies). Its lattice is that of the first image, so that images
that fall on it (an untilted stack whose steps are multiples of the smallest) are copied exactly
and their masks come back exactly. Between images, values are interpolated linearly along the
normal; within an image, bilinearly; where no image reaches, the grid holds the stack's lowest
value (air, for CT).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Offsets closer than this to a whole voxel are taken as whole: positions come as decimal
# strings with a few digits, so a stack on the lattice still lands a hair off it.
_ON_LATTICE = 1e-3
# The grid's slice step is at least the stack's length over this many times its image count:
# two images almost at one position must not make a grid of thousands of slices.
MAX_SLICES_PER_IMAGE = 4


@dataclass(frozen=True)
class GridPlacement:
    """Where each source image lies on the grid, in grid voxels: pixel (row r, column c) of
    image n is at grid index (columns[n] + c, rows[n] + r, slices[n])."""

    columns: np.ndarray  # (images,) offset along the grid's i axis (the images' rows)
    rows: np.ndarray  # (images,) offset along j (the images' columns)
    slices: np.ndarray  # (images,) position along k (the normal)
    image_shape: tuple[int, int]  # rows, columns of every source image
    grid_shape: tuple[int, int, int]  # i, j, k

    def frame_masks(self, labels: np.ndarray) -> np.ndarray:
        """The label map ``[i, j, k]`` on the grid, sampled at each source image's pixel
        centres (nearest grid voxel): ``result[n]`` is ``(rows, columns)`` of image n."""
        rows, columns = self.image_shape
        result = np.empty((len(self.slices), rows, columns), dtype=labels.dtype)
        by_slice = labels.transpose(2, 1, 0)  # [k, j, i]: a view, no copy for frame-major maps
        for n in range(len(self.slices)):
            i, j, k = (int(np.rint(v)) for v in (self.columns[n], self.rows[n], self.slices[n]))
            result[n] = by_slice[k, j:j + rows, i:i + columns]
        return result


@dataclass(frozen=True)
class RegularGrid:
    """The grid a stack is sampled onto: LPS affine of voxel ``[i, j, k]``, its shape, and
    where each source image lies on it."""

    affine_lps: np.ndarray
    placement: GridPlacement

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.placement.grid_shape


def _whole(values: np.ndarray) -> np.ndarray:
    """Offsets within `_ON_LATTICE` of a whole voxel snapped onto it."""
    nearest = np.rint(values)
    return np.where(np.abs(values - nearest) < _ON_LATTICE, nearest, values)


def regular_grid(
    positions: np.ndarray, orientation: tuple[float, ...], pixel_spacing: tuple[float, float],
    image_shape: tuple[int, int],
) -> RegularGrid:
    """The grid covering a stack whose images share orientation, size and pixel spacing.

    ``positions``: Image Position (Patient) of each image, ordered along the normal."""
    row_cosine, column_cosine = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row_cosine, column_cosine)
    row_spacing, column_spacing = pixel_spacing
    offsets = positions - positions[0]
    along = offsets @ normal
    steps = np.diff(along)
    finest = max(steps.min(), along[-1] / (MAX_SLICES_PER_IMAGE * (len(positions) - 1)))
    slice_step = float(along[-1] / np.ceil(along[-1] / finest - _ON_LATTICE))  # last image on a slice
    columns = _whole(offsets @ row_cosine / column_spacing)
    rows = _whole(offsets @ column_cosine / row_spacing)
    slices = _whole(along / slice_step)
    first_column, first_row = np.floor(columns.min()), np.floor(rows.min())
    columns, rows = columns - first_column, rows - first_row
    image_rows, image_columns = image_shape
    shape = (
        int(np.ceil(columns.max())) + image_columns,
        int(np.ceil(rows.max())) + image_rows,
        int(np.ceil(slices[-1])) + 1,
    )
    affine = np.eye(4)
    affine[:3, 0] = row_cosine * column_spacing
    affine[:3, 1] = column_cosine * row_spacing
    affine[:3, 2] = normal * slice_step
    affine[:3, 3] = positions[0] + affine[:3, 0] * first_column + affine[:3, 1] * first_row
    return RegularGrid(affine, GridPlacement(columns, rows, slices, (image_rows, image_columns), shape))


def _shift_plan(offset: float, length: int, source_length: int) -> tuple[np.ndarray, np.ndarray, float]:
    """For grid indices 0..length-1 along one axis, the two indices into the source padded by
    one fill value at each end, and the weight of the first, for a source placed at ``offset``."""
    whole = int(np.floor(offset))
    fraction = float(offset - whole)
    at = np.arange(length) - whole  # source index of the grid index when the fraction is 0
    upper = np.clip(at + 1, 0, source_length + 1)  # padded index of source[at]
    lower = np.clip(at, 0, source_length + 1)  # padded index of source[at - 1]
    return upper, lower, 1.0 - fraction


def _placed(padded: np.ndarray, column: float, row: float, grid_rows: int, grid_columns: int) -> np.ndarray:
    """One source image (padded by one fill pixel all round), bilinearly placed on a grid slice."""
    source_rows, source_columns = padded.shape[0] - 2, padded.shape[1] - 2
    upper, lower, weight = _shift_plan(row, grid_rows, source_rows)
    along_rows = padded[upper] if weight == 1.0 else weight * padded[upper] + (1.0 - weight) * padded[lower]
    upper, lower, weight = _shift_plan(column, grid_columns, source_columns)
    if weight == 1.0:
        return along_rows[:, upper]
    return weight * along_rows[:, upper] + (1.0 - weight) * along_rows[:, lower]


def sample_onto_grid(planes: np.ndarray, grid: RegularGrid) -> np.ndarray:
    """The source images ``planes[n]`` (rows, columns) on the grid, as a float32 array indexed
    ``[i, j, k]`` and laid out frame by frame like the node's other volumes."""
    placement = grid.placement
    grid_columns, grid_rows, grid_slices = grid.shape
    fill = np.float32(planes.min())
    padded = np.full((planes.shape[0], planes.shape[1] + 2, planes.shape[2] + 2), fill, dtype=np.float32)
    padded[:, 1:-1, 1:-1] = planes
    by_slice = np.empty((grid_slices, grid_rows, grid_columns), dtype=np.float32)
    for k in range(grid_slices):
        above = int(np.searchsorted(placement.slices, k, side="left"))
        if above < len(placement.slices) and placement.slices[above] == k:
            below, weight = above, 1.0
        else:
            below = above - 1
            weight = float((placement.slices[above] - k) / (placement.slices[above] - placement.slices[below]))
        by_slice[k] = _placed(padded[below], placement.columns[below], placement.rows[below], grid_rows, grid_columns)
        if weight < 1.0:
            by_slice[k] *= weight
            by_slice[k] += (1.0 - weight) * _placed(
                padded[above], placement.columns[above], placement.rows[above], grid_rows, grid_columns
            )
    return by_slice.transpose(2, 1, 0)
