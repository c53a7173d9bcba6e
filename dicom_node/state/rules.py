"""Pipeline selection: which series (stacks) of a complete study each pipeline takes, and why.

Only cross-sectional image stacks are candidates: localizers, secondary captures, dose reports
and other non-image objects are never sent to a model. A candidate is taken when every condition
of one ``select`` block holds (several blocks are alternatives). Conditions read DICOM keywords
of the stack's first image (for a frame of a multi-frame image, its own functional groups first,
so that ``FrameType`` is the frame's), or facts the node computes (lower-case names, see ``FACTS``). Among
the matching stacks the pipeline takes one, by its ``prefer`` order, or all of them.
See docs/rules.md for the syntax.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
)

from dicom_node.compute.frames import Frame, GeometryError, read_frames, split_stacks
from dicom_node.compute.volume import SPACING_TOLERANCE
from dicom_node.config import Condition, Pipeline, Scalar, SelectBlock

VOLUME_SOP_CLASSES = {
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    PositronEmissionTomographyImageStorage,
    EnhancedPETImageStorage,
}
FACTS = ("images", "orientation", "slice_spacing", "uniform_spacing")
# A normal this close to an axis (cosine) names the plane; anything else is oblique.
PLANE_COSINE = 0.95


def plane_of(normal: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < PLANE_COSINE:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


@dataclass
class StackFacts:
    """What selection knows about one stack of one series, read from its stored headers."""

    series_uid: str
    stack: str  # "" for a series that is one stack
    header: Dataset  # the first instance, representative of the series
    frames: list[Frame] = field(repr=False)
    problem: str | None = None  # why this cannot be a volume at all, when known already

    @property
    def images(self) -> int:
        return len(self.frames)

    @property
    def orientation(self) -> str | None:
        return plane_of(self.frames[0].normal) if self.frames else None

    @cached_property
    def _steps(self) -> np.ndarray:
        """Distances between consecutive positions along the normal; computed once per stack,
        since the label, the preference order and the facts all ask for it."""
        if len(self.frames) < 2:
            return np.array([])
        normal = self.frames[0].normal
        return np.diff(np.sort([np.dot(normal, f.position) for f in self.frames]))

    @property
    def slice_spacing(self) -> float | None:
        steps = self._steps
        return float(np.median(steps)) if steps.size else None

    @property
    def uniform_spacing(self) -> bool:
        steps = self._steps
        return bool(steps.size) and bool(steps.min() > 0) and steps.max() - steps.min() <= SPACING_TOLERANCE * steps.mean()

    @property
    def label(self) -> str:
        number = self.header.get("SeriesNumber", "?")
        text = f"series {number} {self.header.get('SeriesDescription', '')!r}"
        if self.stack:
            text += f" [{self.stack}]"
        multi_frame = bool(self.frames) and self.frames[0].index is not None
        details = [f"{self.images} {'frames' if multi_frame else 'images'}"]
        if self.orientation:
            details.append(self.orientation)
        if self.slice_spacing is not None:
            details.append(f"{self.slice_spacing:.2f} mm")
        return f"{text} ({', '.join(details)})"

    @property
    def key(self) -> tuple[str, str]:
        return self.series_uid, self.stack


def series_stacks(series_uid: str, paths: list[Path]) -> list[StackFacts]:
    """The stacks of one series: usually one, several when positions repeat per echo or phase."""
    import pydicom

    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    if why_not_an_image_series(header):
        return [StackFacts(series_uid, "", header, [])]
    try:
        frames = read_frames(paths)
        stacks = split_stacks(frames)
    except GeometryError as error:
        return [StackFacts(series_uid, "", header, [], problem=str(error))]
    except Exception as error:  # noqa: BLE001 - a malformed value or a file gone: this series' problem only
        return [StackFacts(series_uid, "", header, [], problem=f"its images cannot be read ({error})")]
    return [StackFacts(series_uid, name, members[0].header, members) for name, members in stacks.items()]


def why_not_an_image_series(header: Dataset) -> str | None:
    """The reason a series is never a model input, or None when it is a candidate."""
    if str(header.get("SOPClassUID", "")) not in VOLUME_SOP_CLASSES:
        return f"not a cross-sectional image series (SOP class {header.get('SOPClassUID', 'missing')})"
    image_type = [str(v).upper() for v in (header.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "a localizer"
    return None


def _present(key: str, facts: StackFacts) -> tuple[bool, object]:
    if key in FACTS:
        value = getattr(facts, key)
        return value is not None, value
    if facts.frames:  # a multi-frame stack's own frame type, echo...: its frames' functional groups
        value = facts.frames[0].attribute(key)
        return value is not None, value
    if key not in facts.header:
        return False, None
    return True, facts.header.data_element(key).value


def _values(value) -> list[str]:
    """The values of an attribute as text; a multi-valued one (pydicom MultiValue) gives several."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def _text(value) -> str:
    return "\\".join(_values(value))


def _equals(value, wanted: Scalar) -> bool:
    if isinstance(wanted, bool):
        return bool(value) == wanted if isinstance(value, bool) else _text(value).lower() == str(wanted).lower()
    if isinstance(wanted, (int, float)):
        try:
            return float(value) == float(wanted)
        except (TypeError, ValueError):
            return False
    return _text(value) == wanted


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def why_condition_fails(key: str, condition: Scalar | Condition, facts: StackFacts) -> str | None:
    present, value = _present(key, facts)
    if not present:
        return f"{key} is absent"
    shown = _text(value)
    if not isinstance(condition, Condition):
        return None if _equals(value, condition) else f"{key} is {shown!r}, not {condition!r}"
    if condition.regex is not None:
        flags = re.IGNORECASE if condition.ignore_case else 0
        if not re.fullmatch(condition.regex, shown, flags):
            return f"{key} {shown!r} does not match {condition.regex!r}"
    if condition.min is not None or condition.max is not None:
        number = _number(value)
        if number is None:
            return f"{key} {shown!r} is not a number"
        if condition.min is not None and number < condition.min:
            return f"{key} {number:g} is below {condition.min:g}"
        if condition.max is not None and number > condition.max:
            return f"{key} {number:g} is above {condition.max:g}"
    if condition.in_ is not None and not any(_equals(value, option) for option in condition.in_):
        return f"{key} {shown!r} is not one of {condition.in_}"
    members = {v.upper() for v in _values(value)}
    if condition.contains is not None:
        missing = [v for v in condition.contains if v.upper() not in members]
        if missing:
            return f"{key} {shown!r} does not contain {', '.join(missing)}"
    if condition.excludes is not None:
        present_ones = [v for v in condition.excludes if v.upper() in members]
        if present_ones:
            return f"{key} {shown!r} contains {', '.join(present_ones)}"
    if condition.not_ is not None:
        forbidden = condition.not_ if isinstance(condition.not_, list) else [condition.not_]
        if any(_equals(value, option) for option in forbidden):
            return f"{key} is {shown!r}"
    return None


def why_block_fails(block: SelectBlock, facts: StackFacts) -> str | None:
    for key, condition in block.items():
        reason = why_condition_fails(key, condition, facts)
        if reason:
            return reason
    return None


def why_not_selected(blocks: list[SelectBlock], facts: StackFacts) -> str | None:
    """None when one block holds; else the reason of each block that failed."""
    reasons = []
    for block in blocks:
        reason = why_block_fails(block, facts)
        if reason is None:
            return None
        reasons.append(reason)
    return reasons[0] if len(reasons) == 1 else "; ".join(f"alternative {i + 1}: {r}" for i, r in enumerate(reasons))


@dataclass
class Selection:
    chosen: list[StackFacts]
    reasons: dict[tuple[str, str], str]  # (series UID, stack) -> why it was taken or not
    # Stacks the rules take that cannot be a volume, when no other stack is taken: the pipeline
    # would run on them, so they fail (with `StackFacts.problem`) rather than pass unnoticed.
    failed: list[StackFacts] = field(default_factory=list)


def _preference(prefer: str):
    def thinnest(f: StackFacts):
        return (f.slice_spacing if f.slice_spacing is not None else np.inf, -f.images)

    def most_images(f: StackFacts):
        return (-f.images, f.slice_spacing if f.slice_spacing is not None else np.inf)

    return thinnest if prefer == "thinnest" else most_images


def select_series(pipeline: Pipeline, candidates: list[StackFacts]) -> Selection:
    reasons: dict[tuple[str, str], str] = {}
    eligible, blocked = [], []
    for facts in candidates:
        reason = why_not_an_image_series(facts.header) or why_not_selected(pipeline.select_blocks, facts)
        if reason is None and facts.problem:
            blocked.append(facts)
            reason = f"cannot be a volume: {facts.problem}"
        if reason:
            reasons[facts.key] = f"not taken: {reason}"
        else:
            eligible.append(facts)
    eligible.sort(key=_preference(pipeline.prefer))
    chosen = eligible if pipeline.take == "all" else eligible[:1]
    for facts in eligible[len(chosen):]:
        wording = "thinner slices" if pipeline.prefer == "thinnest" else "more images"
        reasons[facts.key] = f"not taken: matches, but {chosen[0].label} has {wording} (prefer = {pipeline.prefer})"
    for facts in chosen:
        reasons[facts.key] = "taken"
    failed = [] if chosen else blocked if pipeline.take == "all" else blocked[:1]
    for facts in failed:
        reasons[facts.key] = f"taken, and failed: cannot be a volume: {facts.problem}"
    return Selection(chosen, reasons, failed)
