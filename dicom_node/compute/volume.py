"""A DICOM series to a volume with its exact geometry, and a volume's masks back to the images.

The volume array is indexed ``[i, j, k]`` = (column, row, slice), as NIfTI tools such as
dcm2niix lay it out, and comes with its affine in RAS millimetres, the convention MONAI's
readers give bundles. A slice is a *frame*: a single-frame image, or one frame of an Enhanced
multi-frame image (:mod:`dicom_node.compute.frames`). Frames are ordered by the projection of
their Image Position (Patient) on the slice normal, never by Instance Number, and slice spacing
comes from those positions, never from Slice Thickness.

Stacks that are not one regular volume of their own images (gantry tilt, uneven spacing, a
missing slice) are sampled onto a regular grid in patient space, and the bundle's output comes
back onto each source image at its own pixel centres (:mod:`dicom_node.compute.regular_grid`).
What cannot be one volume at all is refused, naming every problem found:

- several frames at one position are first split into stacks (`frames.split_stacks`); a stack that
  still repeats a position is refused;
- frames of different orientation, size or pixel spacing are refused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset

from dicom_node.compute.frames import ALIGNMENT_TOLERANCE_MM, Frame, GeometryError
from dicom_node.compute.native_pixels import read_native_pixels
from dicom_node.compute.regular_grid import GridPlacement, regular_grid, sample_onto_grid

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Relative tolerance on slice spacing.
SPACING_TOLERANCE = 0.01


def order_frames(frames: list[Frame]) -> list[Frame]:
    """Sorted along the slice normal; raises, naming every problem found, when the frames
    cannot be one volume at all. Tilt and uneven steps are not problems (`is_regular`)."""
    if not frames:
        raise GeometryError("the series has no images")
    first = frames[0]
    problems = []
    orientations = {tuple(np.round(f.orientation, 4)) for f in frames}
    if len(orientations) > 1:
        problems.append(f"images in {len(orientations)} different orientations")
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        problems.append("images of different sizes (" + ", ".join(f"{r} x {c}" for r, c in sorted(sizes)) + ")")
    spacings = {tuple(np.round(f.pixel_spacing, 4)) for f in frames}
    if len(spacings) > 1:
        problems.append("images with different pixel spacings (" +
                        ", ".join(f"{r:g} x {c:g} mm" for r, c in sorted(spacings)) + ")")
    normal = first.normal
    ordered = sorted(frames, key=lambda f: float(np.dot(normal, f.position)))
    steps = np.diff([float(np.dot(normal, f.position)) for f in ordered])
    if np.any(steps < ALIGNMENT_TOLERANCE_MM):
        problems.append(f"{int(np.sum(steps < ALIGNMENT_TOLERANCE_MM)) + 1} images share a position "
                        "(several stacks in one series)")
    if problems:
        raise GeometryError("; ".join(problems))
    return ordered


def irregularity(ordered: list[Frame]) -> str | None:
    """What keeps an ordered stack off one regular grid of its own images (gantry tilt, uneven
    steps), in words for the operator; None for a regular stack."""
    if len(ordered) < 2:
        return None
    normal = ordered[0].normal
    positions = np.array([f.position for f in ordered], dtype=np.float64)
    steps = np.diff(positions @ normal)
    found = []
    offsets = positions - positions[0]
    sideways = offsets - np.outer(offsets @ normal, normal)
    if np.abs(sideways).max() > ALIGNMENT_TOLERANCE_MM:
        travel = offsets[-1]
        tilt = np.degrees(np.arccos(min(1.0, abs(float(travel @ normal)) / float(np.linalg.norm(travel)))))
        found.append(f"images drift {np.abs(sideways).max():.1f} mm sideways (gantry tilt {tilt:.1f} degrees)")
    if steps.max() - steps.min() > SPACING_TOLERANCE * steps.mean():
        found.append(f"uneven slice spacing ({steps.min():.2f} to {steps.max():.2f} mm: a missing slice or variable pitch)")
    return "; ".join(found) or None


def affine_lps(ordered: list[Frame]) -> np.ndarray:
    """Voxel [i, j, k] to LPS mm, with the slice axis taken from the first and last positions."""
    first = ordered[0]
    row_cosine, column_cosine = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    row_spacing, column_spacing = first.pixel_spacing
    origin = np.array(first.position, dtype=np.float64)
    if len(ordered) > 1:
        slice_step = (np.array(ordered[-1].position) - origin) / (len(ordered) - 1)
    else:
        slice_step = first.normal * float(first.header.get("SliceThickness", 1.0) or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = row_cosine * column_spacing  # i walks along a row: the column index
    affine[:3, 1] = column_cosine * row_spacing
    affine[:3, 2] = slice_step
    affine[:3, 3] = origin
    return affine


@dataclass
class Volume:
    """A stack as the bundle sees it: modality values on a regular grid, with its affine.

    For a regular stack the grid is the images themselves (slice k is ``frames[k]``). For a
    tilted or unevenly spaced one (`irregularity`) it is the grid of :mod:`regular_grid`, and
    ``placement`` says where each source image lies on it; ``resampled`` names why."""

    array: np.ndarray  # float32 [i, j, k], modality values (e.g. Hounsfield units), stored [k, j, i]
    affine_ras: np.ndarray  # 4x4, voxel index to RAS mm
    frames: list[Frame]  # the source images, ordered along the normal
    placement: GridPlacement | None = None  # None: slice k is frames[k]
    resampled: str | None = None  # why the images were sampled onto a grid of their own

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(np.linalg.norm(self.affine_ras[:3, axis])) for axis in range(3))

    @property
    def name(self) -> str:
        """What the bundle's transforms see as the file the image came from: its series."""
        return self.frames[0].header.SeriesInstanceUID if self.frames else "synthetic"

    @property
    def source_headers(self) -> list[Dataset]:
        """Each source instance once, in the order of first appearance along k, with the Type 2
        attributes that results copy from it (`TYPE_2_COPIED`) present, empty where the source
        leaves them out: PS3.5 7.4 lets a Type 2 attribute be empty, never absent."""
        unique: dict[str, Dataset] = {}
        for frame in self.frames:
            unique.setdefault(frame.sop_instance_uid, frame.header)
        for header in unique.values():
            for keyword in TYPE_2_COPIED:
                if keyword not in header:
                    setattr(header, keyword, "")
        return list(unique.values())

    def frame_masks(self, labels: np.ndarray) -> np.ndarray:
        """Masks in source-image layout: ``result[k]`` is ``(rows, columns)`` of ``frames[k]``."""
        if labels.shape != self.array.shape:
            raise GeometryError(f"mask shape {labels.shape} does not match the volume {self.array.shape}")
        if self.placement is not None:
            return self.placement.frame_masks(labels)
        # No copy when labels come from Bundle.predict, which lays them out frame by frame.
        return np.ascontiguousarray(np.transpose(labels, (2, 1, 0)))

    def frame_voxel_ml(self) -> np.ndarray:
        """The volume each source image's voxels stand for, in mL, image by image: its pixel
        area times the slab it covers, half-way to each neighbour along the normal (the step
        of a regular stack; at the ends of an uneven one, the step to the one neighbour)."""
        first = self.frames[0]
        area = first.pixel_spacing[0] * first.pixel_spacing[1]
        if self.placement is None or len(self.frames) < 2:
            return np.full(len(self.frames), abs(float(np.linalg.det(self.affine_ras[:3, :3]))) / 1000.0)
        along = np.array([np.dot(first.normal, f.position) for f in self.frames])
        steps = np.diff(along)
        slab = (np.concatenate([[steps[0]], steps]) + np.concatenate([steps, [steps[-1]]])) / 2.0
        return area * slab / 1000.0

    def source_images(self) -> Iterator[np.ndarray]:
        """Each source image's modality values, ``(rows, columns)``, in the order of ``frames``."""
        if self.placement is None:
            for k in range(len(self.frames)):
                yield self.array[:, :, k].T
            return
        decoded = _DecodedFiles(self.frames)
        for frame in self.frames:
            yield _modality_values(decoded.plane(frame), frame)


# Patient and General Study attributes (Type 2) that the SEG and SR copy from their sources.
TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


class _DecodedFiles:
    """Decodes each file once and keeps its pixels only until its last frame has been placed."""

    def __init__(self, ordered: list[Frame]) -> None:
        self._uses_left = Counter(frame.path for frame in ordered)
        self._pixels: dict[Path, np.ndarray] = {}

    def plane(self, frame: Frame) -> np.ndarray:
        pixels = self._pixels.get(frame.path)
        if pixels is None:
            pixels = read_native_pixels(frame.path, frame.header)
            if pixels is None:
                pixels = pydicom.dcmread(frame.path).pixel_array
            pixels = _as_frames(pixels, frame)
            self._pixels[frame.path] = pixels
        self._uses_left[frame.path] -= 1
        if self._uses_left[frame.path] == 0:
            del self._pixels[frame.path]
        return pixels[frame.index or 0]


def _as_frames(pixels: np.ndarray, frame: Frame) -> np.ndarray:
    """A file's decoded pixels as ``(frames, rows, columns)``, checked against its header.

    pydicom gives a one-frame image as ``(rows, columns)`` whatever its Number of Frames, and
    several frames as ``(frames, rows, columns)``: taken as the other, one image row would be
    spread over the whole image, silently. Anything but the Rows and Columns of the header (a
    colour image, a decoder's surprise) is refused here instead."""
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    frames = int(frame.header.get("NumberOfFrames", 1) or 1)
    if pixels.ndim != 3 or pixels.shape[1:] != tuple(frame.shape) or len(pixels) != frames:
        raise GeometryError(f"{frame.path.name}: decoded pixels of shape {pixels.shape}, not the {frames} frame(s) "
                            f"of {frame.shape[0]} x {frame.shape[1]} its header gives")
    return pixels


def _modality_values(stored: np.ndarray, frame: Frame, out: np.ndarray | None = None) -> np.ndarray:
    """Stored pixel values through the frame's rescale, as float32."""
    if out is None:
        out = np.empty(stored.shape, dtype=np.float32)
    if frame.slope == 1.0:  # the usual CT case: one pass over the image instead of two
        np.add(stored, np.float32(frame.intercept), out=out, casting="unsafe")
    else:
        np.multiply(stored, frame.slope, out=out, casting="unsafe")
        out += frame.intercept
    return out


def load_volume(frames: list[Frame]) -> Volume:
    """Decode the frames of one stack into a float32 volume of modality values.

    The array is indexed ``[i, j, k]`` but its memory is laid out frame by frame (``[k, j, i]``,
    as the images themselves are): each decoded image is then one contiguous write, the label
    map comes back in the same layout (:mod:`dicom_node.compute.resampling`), and the SEG's frames are
    views of it, with no transposition anywhere. Peak memory stays near the volume itself:
    besides it, only a file's pixels until its frames are placed. A tilted or unevenly spaced
    stack is then sampled onto a regular grid (:mod:`dicom_node.compute.regular_grid`), which
    holds both for a moment.
    """
    ordered = order_frames(frames)
    rows, columns = ordered[0].shape
    by_frame = np.empty((len(ordered), rows, columns), dtype=np.float32)
    decoded = _DecodedFiles(ordered)
    for k, frame in enumerate(ordered):
        _modality_values(decoded.plane(frame), frame, out=by_frame[k])
    why = irregularity(ordered)
    if why is None:
        return Volume(array=by_frame.transpose(2, 1, 0), affine_ras=LPS_TO_RAS @ affine_lps(ordered), frames=ordered)
    first = ordered[0]
    grid = regular_grid(np.array([f.position for f in ordered]), first.orientation, first.pixel_spacing, first.shape)
    array = sample_onto_grid(by_frame, grid)
    return Volume(array=array, affine_ras=LPS_TO_RAS @ grid.affine_lps, frames=ordered,
                  placement=grid.placement, resampled=why)
