"""Coded concepts for segment labels: a bundle says "spleen", a viewer needs SNOMED CT.

Viewers and downstream analytics key on the segmented property category and type codes, not
on free-text labels, so every label is mapped to codes. A label missing from the table still
gets a valid generic code and a warning; it never stops a job.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code


@dataclass(frozen=True)
class SegmentCodes:
    category: Code
    property_type: Code
    known: bool = True


ANATOMY = codes.SCT.AnatomicalStructure
TISSUE = codes.SCT.Tissue

LABEL_CODES: dict[str, SegmentCodes] = {
    "body": SegmentCodes(ANATOMY, codes.SCT.EntireBody),
    "bone": SegmentCodes(TISSUE, codes.SCT.Bone),
    "spleen": SegmentCodes(ANATOMY, codes.SCT.Spleen),
    "liver": SegmentCodes(ANATOMY, codes.SCT.Liver),
}


def _normalise(label: str) -> str:
    return label.strip().lower().replace(" ", "_").replace("-", "_")


def codes_for_label(label: str) -> SegmentCodes:
    """Codes for a bundle's label name; unknown names get a generic anatomical structure."""
    found = LABEL_CODES.get(_normalise(label))
    if found is not None:
        return found
    return SegmentCodes(ANATOMY, ANATOMY, known=False)
