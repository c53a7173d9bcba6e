"""Pipeline selection: which series of a complete study each pipeline takes.

Only cross-sectional image series are candidates: localizers, secondary captures, dose reports
and other non-image objects are never sent to a model. Among the candidates, every condition of
``[pipelines.select]`` must hold (DICOM keyword equals value). When several series qualify, the
one with the thinnest slices wins, then the one with the most images: the reconstruction a
volumetric model is normally trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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

from .config import Pipeline
from .volume import read_headers, slice_normal

VOLUME_SOP_CLASSES = {
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    PositronEmissionTomographyImageStorage,
    EnhancedPETImageStorage,
}


@dataclass
class SeriesFacts:
    """What selection knows about one series, read from its stored headers."""

    series_uid: str
    header: Dataset  # the first instance, representative of the series
    image_count: int
    slice_spacing: float | None  # median distance between positions along the normal
    paths: list[Path] = field(repr=False, default_factory=list)

    @property
    def label(self) -> str:
        number = self.header.get("SeriesNumber", "?")
        return f"series {number} {self.header.get('SeriesDescription', '')!r} ({self.image_count} images)"


def series_facts(series_uid: str, paths: list[Path]) -> SeriesFacts:
    headers = read_headers(paths)
    spacing = None
    positioned = [ds for ds in headers if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds]
    if len(positioned) > 1:
        normal = slice_normal(positioned[0])
        along = np.sort([np.dot(normal, np.asarray(ds.ImagePositionPatient, float)) for ds in positioned])
        spacing = float(np.median(np.diff(along)))
    return SeriesFacts(series_uid, headers[0], len(headers), spacing, paths)


def why_not_an_image_series(facts: SeriesFacts) -> str | None:
    """The reason a series is never a model input, or None when it is a candidate."""
    header = facts.header
    if str(header.get("SOPClassUID", "")) not in VOLUME_SOP_CLASSES:
        return f"not a cross-sectional image series (SOP class {header.get('SOPClassUID', 'missing')})"
    image_type = [str(v).upper() for v in (header.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "a localizer"
    return None


def _value_text(value) -> str:
    if isinstance(value, (list, tuple)) or getattr(value, "VM", 1) > 1:
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def why_not_selected(select: dict[str, str | int | float], header: Dataset) -> str | None:
    """The first condition of ``select`` the header fails, or None when all hold."""
    for keyword, wanted in select.items():
        if keyword not in header:
            return f"{keyword} is absent"
        actual = header.data_element(keyword).value
        if isinstance(wanted, (int, float)) and not isinstance(wanted, bool):
            try:
                if float(actual) == float(wanted):
                    continue
            except (TypeError, ValueError):
                pass
        elif _value_text(actual) == str(wanted):
            continue
        return f"{keyword} is {_value_text(actual)!r}, not {wanted!r}"
    return None


@dataclass
class Selection:
    chosen: SeriesFacts | None
    reasons: dict[str, str]  # series UID -> why it was taken or not


def select_series(pipeline: Pipeline, candidates: list[SeriesFacts]) -> Selection:
    reasons: dict[str, str] = {}
    eligible = []
    for facts in candidates:
        reason = why_not_an_image_series(facts) or why_not_selected(pipeline.select, facts.header)
        if reason:
            reasons[facts.series_uid] = f"not taken: {reason}"
        else:
            eligible.append(facts)
    eligible.sort(key=lambda f: (f.slice_spacing if f.slice_spacing is not None else np.inf, -f.image_count))
    for runner_up in eligible[1:]:
        reasons[runner_up.series_uid] = (
            f"not taken: matches, but {eligible[0].label} has thinner slices or more images"
        )
    if eligible:
        reasons[eligible[0].series_uid] = "taken"
    return Selection(eligible[0] if eligible else None, reasons)
