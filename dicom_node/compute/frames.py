"""A series' stored headers as frames, and its frames as stacks.

A *frame* is one 2D image: a single-frame instance, or one frame of an Enhanced multi-frame
instance, whose geometry then comes from its functional groups (per frame first, then shared:
PS3.3 C.7.6.16 allows either). A *stack* is the frames of a series that make one volume. Most
series are one stack. Where positions repeat, the frames are split as dcm2niix splits them: by
what the standard says sets frames apart (acquisition, echo, temporal position, stack, the
per-frame Frame Type, the echo time) and by the Dimension Index Values of every dimension the
file declares except the position within the stack. A stack is named by the values that differ
between the stacks, so that an operator reads "frame type ORIGINAL\\PRIMARY\\PHASE\\NONE" or
"echo 2", and a rule can pick it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.datadict import keyword_for_tag
from pydicom.tag import Tag

# Absolute tolerance (mm) under which two positions are one.
ALIGNMENT_TOLERANCE_MM = 0.05
# Attributes that tell apart stacks sharing positions, with the words used to name them.
STACK_ATTRIBUTES = (
    ("AcquisitionNumber", "acquisition"),
    ("EchoNumbers", "echo"),
    ("TemporalPositionIdentifier", "temporal position"),
    ("TemporalPositionIndex", "temporal position"),
    ("StackID", "stack"),
)
# Dimensions that place a frame within its stack, not in another stack.
SPATIAL_DIMENSIONS = {Tag("InStackPositionNumber"), Tag("ImagePositionPatient"), Tag("SliceLocation")}
# Dimensions already named through the attributes above (or the frame type and echo time).
NAMED_DIMENSIONS = {Tag(keyword) for keyword, _ in STACK_ATTRIBUTES} | {
    Tag("FrameType"), Tag("EffectiveEchoTime"), Tag("ComplexImageComponent")}


class GeometryError(ValueError):
    """The series cannot become one volume; the message says why, for the operator."""


@dataclass(frozen=True)
class Frame:
    """One 2D image: a single-frame instance, or one frame of a multi-frame instance."""

    header: Dataset = field(repr=False)  # the instance's header, without pixel data
    path: Path
    index: int | None  # 0-based frame number in a multi-frame instance; None for single-frame
    position: tuple[float, float, float]
    orientation: tuple[float, ...]  # row cosines then column cosines
    pixel_spacing: tuple[float, float]  # between rows, between columns
    slope: float
    intercept: float
    stack_values: tuple[tuple[str, str], ...]  # (name, value): what may set its stack apart

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.SOPInstanceUID)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.header.Rows), int(self.header.Columns)

    def attribute(self, keyword: str):
        """The value of ``keyword`` for this frame, or None: in its own functional groups
        first, then the shared ones, then the instance itself (what a rule reads)."""
        if self.index is not None:
            value = _group_attribute(self.header, self.header.PerFrameFunctionalGroupsSequence[self.index], keyword)
            if value is not None:
                return value
        return self.header[keyword].value if keyword in self.header else None


def _first(dataset: Dataset, sequence: str) -> Dataset | None:
    items = dataset.get(sequence)
    return items[0] if items else None


def _functional_group(header: Dataset, per_frame: Dataset | None, sequence: str) -> Dataset | None:
    """A functional group item, per-frame first, then shared (PS3.3 C.7.6.16)."""
    for groups in (per_frame, _first(header, "SharedFunctionalGroupsSequence")):
        if groups is not None and sequence in groups:
            return groups[sequence][0]
    return None


def _text(value) -> str:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _named_values(*datasets: Dataset | None) -> list[tuple[str, str]]:
    values = []
    for keyword, name in STACK_ATTRIBUTES:
        for dataset in datasets:
            if dataset is not None and keyword in dataset and dataset[keyword].value not in (None, ""):
                values.append((name, str(dataset[keyword].value)))
                break
    return values


def _group_attribute(header: Dataset, per_frame: Dataset, keyword: str):
    """``keyword`` in any functional group of a frame, its own first, then the shared ones;
    None when no group holds it. Frame Type, for one, lives in whichever
    ``...FrameTypeSequence`` the IOD uses."""
    for groups in (per_frame, _first(header, "SharedFunctionalGroupsSequence")):
        for element in groups or ():
            if element.VR == "SQ" and element.value and keyword in element.value[0]:
                return element.value[0][keyword].value
    return None


def _dimension_values(header: Dataset, content: Dataset | None) -> list[tuple[str, str]]:
    """The frame's index along each declared dimension that is neither spatial nor named already."""
    dimensions = header.get("DimensionIndexSequence") or []
    indices = content.get("DimensionIndexValues") if content is not None else None
    if not dimensions or indices is None:
        return []
    indices = list(indices) if isinstance(indices, (list, pydicom.multival.MultiValue)) else [indices]
    values = []
    for dimension, index in zip(dimensions, indices, strict=False):
        pointer = Tag(dimension.get("DimensionIndexPointer", 0))
        if pointer in SPATIAL_DIMENSIONS or pointer in NAMED_DIMENSIONS:
            continue
        name = keyword_for_tag(pointer) or f"({pointer.group:04X},{pointer.element:04X})"
        values.append((f"dimension {name}", str(index)))
    return values


def _multi_frame_stack_values(header: Dataset, per_frame: Dataset) -> tuple[tuple[str, str], ...]:
    content = _first(per_frame, "FrameContentSequence")
    values = _named_values(content, header)
    frame_type = _group_attribute(header, per_frame, "FrameType")
    if frame_type is not None:
        values.append(("frame type", _text(frame_type)))
    echo = _functional_group(header, per_frame, "MREchoSequence")
    if echo is not None and echo.get("EffectiveEchoTime") is not None:
        values.append(("echo time", f"{float(echo.EffectiveEchoTime):g} ms"))
    values.extend(_dimension_values(header, content))
    return tuple(values)


def frames_of(header: Dataset, path: Path) -> list[Frame]:
    """The frames of one stored instance with the geometry each one has."""
    if "PerFrameFunctionalGroupsSequence" not in header:
        for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
            if keyword not in header:
                raise GeometryError(f"instance {header.SOPInstanceUID} has no {keyword}")
        return [_frame(header, path, None, header, header, header, header, tuple(_named_values(header)))]
    frames = []
    for index, per_frame in enumerate(header.PerFrameFunctionalGroupsSequence):
        position = _functional_group(header, per_frame, "PlanePositionSequence")
        orientation = _functional_group(header, per_frame, "PlaneOrientationSequence")
        measures = _functional_group(header, per_frame, "PixelMeasuresSequence")
        transform = _functional_group(header, per_frame, "PixelValueTransformationSequence")
        if position is None or orientation is None or measures is None:
            raise GeometryError(f"frame {index + 1} of {header.SOPInstanceUID} lacks plane position or orientation")
        frames.append(_frame(header, path, index, position, orientation, measures, transform,
                             _multi_frame_stack_values(header, per_frame)))
    return frames


def _frame(header, path, index, position, orientation, measures, transform, stack_values) -> Frame:
    """A frame from the datasets holding its geometry: the image itself for a single-frame
    image, its functional group items for a frame of a multi-frame one."""
    return Frame(
        header=header,
        path=path,
        index=index,
        position=tuple(float(v) for v in position.ImagePositionPatient),
        orientation=tuple(float(v) for v in orientation.ImageOrientationPatient),
        pixel_spacing=tuple(float(v) for v in measures.PixelSpacing),
        slope=float(transform.get("RescaleSlope", 1.0) or 1.0) if transform is not None else 1.0,
        intercept=float(transform.get("RescaleIntercept", 0.0) or 0.0) if transform is not None else 0.0,
        stack_values=stack_values,
    )


def read_frames(paths: list[Path]) -> list[Frame]:
    frames = []
    for path in paths:
        frames.extend(frames_of(pydicom.dcmread(path, stop_before_pixels=True), path))
    return frames


def _position_key(frame: Frame) -> tuple[float, ...]:
    return tuple(round(v / ALIGNMENT_TOLERANCE_MM) for v in frame.position)


def split_stacks(frames: list[Frame]) -> dict[str, list[Frame]]:
    """Frames grouped into stacks; one stack named "" unless positions repeat. A stack is named
    by the values that differ between stacks, in the order of `_multi_frame_stack_values`."""
    if len({_position_key(f) for f in frames}) == len(frames):
        return {"": frames}
    seen: dict[str, set[str]] = defaultdict(set)
    for frame in frames:
        for name, value in frame.stack_values:
            seen[name].add(value)
    differing = {name for name, values in seen.items() if len(values) > 1}
    stacks: dict[str, list[Frame]] = defaultdict(list)
    for frame in frames:
        stacks[", ".join(f"{name} {value}" for name, value in frame.stack_values if name in differing)].append(frame)
    if len(stacks) == 1:
        raise GeometryError(
            "several images share one position and nothing (acquisition, echo, temporal position, frame type, "
            "dimension index) tells them apart"
        )
    return dict(sorted(stacks.items(), key=lambda item: _natural_order(item[0])))


def _natural_order(name: str) -> list:
    """Numbers in a stack's name compare as numbers: echo time 5 ms before 12.5 ms."""
    return [float(part) if index % 2 else part for index, part in enumerate(re.split(r"(\d+(?:\.\d+)?)", name))]
