"""A DICOM series to a volume with its exact geometry, and a volume's masks back to the images.

The volume array is indexed ``[i, j, k]`` = (column, row, slice), as NIfTI tools such as
dcm2niix lay it out, and comes with its affine in RAS millimetres, the convention MONAI's
readers give bundles. Slices are ordered by the projection of Image Position (Patient) on the
slice normal, never by Instance Number, and slice spacing comes from those positions, never
from Slice Thickness. What cannot be represented exactly (uneven spacing, tilted stacks,
mixed geometry) is refused with a reason rather than silently distorted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Relative tolerance on slice spacing, and absolute tolerance (mm) on stack alignment.
SPACING_TOLERANCE = 0.01
ALIGNMENT_TOLERANCE_MM = 0.05


class GeometryError(ValueError):
    """The series cannot become one regular volume; the message says why, for the operator."""


@dataclass
class Volume:
    array: np.ndarray  # float32 [i, j, k], modality values (e.g. Hounsfield units)
    affine_ras: np.ndarray  # 4x4, voxel index to RAS mm
    sources: list[Dataset]  # source headers (no pixels), sources[k] is slice k

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(np.linalg.norm(self.affine_ras[:3, axis])) for axis in range(3))

    def frame_masks(self, labels: np.ndarray) -> np.ndarray:
        """Masks in source-image layout: ``result[k]`` is ``(rows, columns)`` of ``sources[k]``."""
        if labels.shape != self.array.shape:
            raise GeometryError(f"mask shape {labels.shape} does not match the volume {self.array.shape}")
        return np.ascontiguousarray(np.transpose(labels, (2, 1, 0)))


def _orientation(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    return iop[:3], iop[3:]


def slice_normal(ds: Dataset) -> np.ndarray:
    row_cosine, column_cosine = _orientation(ds)
    return np.cross(row_cosine, column_cosine)


def order_slices(headers: list[Dataset]) -> list[Dataset]:
    """Sorted along the slice normal; raises when the stack is not one regular volume."""
    if not headers:
        raise GeometryError("the series has no images")
    first = headers[0]
    for ds in headers:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise GeometryError("multi-frame images are not supported yet")
        for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
            if keyword not in ds:
                raise GeometryError(f"instance {ds.SOPInstanceUID} has no {keyword}")
        if not np.allclose(ds.ImageOrientationPatient, first.ImageOrientationPatient, atol=1e-4):
            raise GeometryError("images have different orientations")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise GeometryError("images have different sizes")
        if not np.allclose(ds.PixelSpacing, first.PixelSpacing, atol=1e-4):
            raise GeometryError("images have different pixel spacings")
    normal = slice_normal(first)
    ordered = sorted(headers, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    positions = np.array([ds.ImagePositionPatient for ds in ordered], dtype=np.float64)
    if len(ordered) > 1:
        steps = np.diff(positions @ normal)
        if np.any(steps < ALIGNMENT_TOLERANCE_MM):
            raise GeometryError("several images share one position (several stacks in one series)")
        if steps.max() - steps.min() > SPACING_TOLERANCE * steps.mean():
            raise GeometryError(
                f"uneven slice spacing ({steps.min():.3f} to {steps.max():.3f} mm); refusing to guess"
            )
        in_plane = positions - positions[0] - np.outer((positions - positions[0]) @ normal, normal)
        if np.abs(in_plane).max() > ALIGNMENT_TOLERANCE_MM:
            raise GeometryError("slices are not stacked along their normal (gantry tilt or shear)")
    return ordered


def affine_lps(ordered: list[Dataset]) -> np.ndarray:
    """Voxel [i, j, k] to LPS mm, with the slice axis taken from the first and last positions."""
    first = ordered[0]
    row_cosine, column_cosine = _orientation(first)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    origin = np.asarray(first.ImagePositionPatient, dtype=np.float64)
    if len(ordered) > 1:
        last = np.asarray(ordered[-1].ImagePositionPatient, dtype=np.float64)
        slice_step = (last - origin) / (len(ordered) - 1)
    else:
        slice_step = slice_normal(first) * float(first.get("SliceThickness", 1.0) or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = row_cosine * column_spacing  # i walks along a row: the column index
    affine[:3, 1] = column_cosine * row_spacing
    affine[:3, 2] = slice_step
    affine[:3, 3] = origin
    return affine


def read_headers(paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]


def load_volume(paths: list[Path]) -> Volume:
    """Read a single-frame series into a float32 volume with modality values."""
    headers = read_headers(paths)
    path_of = {str(ds.SOPInstanceUID): path for ds, path in zip(headers, paths)}
    ordered_headers = order_slices(headers)
    first = ordered_headers[0]
    array = np.empty((int(first.Columns), int(first.Rows), len(ordered_headers)), dtype=np.float32)
    for k, header in enumerate(ordered_headers):
        ds = pydicom.dcmread(path_of[str(header.SOPInstanceUID)])
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        array[:, :, k] = ds.pixel_array.T.astype(np.float32) * slope + intercept
    return Volume(array=array, affine_ras=LPS_TO_RAS @ affine_lps(ordered_headers), sources=ordered_headers)
