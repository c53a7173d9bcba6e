"""Coded concepts for segments: a bundle says "kidney_left", a viewer needs SNOMED CT codes.

Viewers and analytics key on the segmented property category and type codes, not on free-text
labels, so every label a bundle emits is mapped to codes taken from the DICOM standard's code
dictionary (through pydicom): the organs of the Model Zoo's CT bundles at least. A ``_left`` or
``_right`` in the name becomes a laterality modifier. An override file can set any label's name,
codes and colour. A label found nowhere still gets a valid generic code (anatomical structure)
and is flagged, so the operator sees a warning; it never stops a job.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

ANATOMY = codes.SCT.AnatomicalStructure
TISSUE = codes.SCT.Tissue
ALTERED = Code("49755003", "SCT", "Morphologically Altered Structure")
LATERALITY = {"left": codes.SCT.Left, "right": codes.SCT.Right}


@dataclass(frozen=True)
class SegmentCodes:
    label: str  # Segment Label shown in viewers
    category: Code
    property_type: Code
    modifier: Code | None = None  # laterality
    color: tuple[int, int, int] | None = None  # recommended display colour, RGB
    known: bool = True


def _sct(keyword: str) -> Code:
    return getattr(codes.SCT, keyword)


# Normalised base name (no laterality) -> (category, type). Names follow the Model Zoo bundles
# (TotalSegmentator-style for wholeBody_ct_segmentation) and common synonyms.
_TABLE: dict[str, tuple[Code, Code]] = {
    "body": (ANATOMY, _sct("EntireBody")),
    "bone": (TISSUE, _sct("Bone")),
    "tumor": (ALTERED, _sct("Neoplasm")),
    "tumour": (ALTERED, _sct("Neoplasm")),
    "lesion": (ALTERED, _sct("Lesion")),
    **{
        name: (ANATOMY, _sct(keyword))
        for name, keyword in {
            "spleen": "Spleen",
            "liver": "Liver",
            "kidney": "Kidney",
            "gallbladder": "Gallbladder",
            "stomach": "Stomach",
            "aorta": "Aorta",
            "inferior_vena_cava": "InferiorVenaCava",
            "pancreas": "Pancreas",
            "adrenal_gland": "AdrenalGland",
            "esophagus": "Esophagus",
            "trachea": "Trachea",
            "heart": "Heart",
            "heart_atrium_left": "LeftAtrium",
            "heart_atrium_right": "RightAtrium",
            "heart_ventricle_left": "LeftVentricle",
            "heart_ventricle_right": "RightVentricle",
            "pulmonary_artery": "PulmonaryArtery",
            "brain": "Brain",
            "lung": "Lung",
            "lung_upper_lobe": "UpperLobeOfLung",
            "lung_middle_lobe": "MiddleLobeOfRightLung",
            "lung_lower_lobe": "LowerLobeOfLung",
            "iliac_artery": "CommonIliacArtery",
            "iliac_vena": "CommonIliacVein",
            "small_bowel": "SmallIntestine",
            "duodenum": "Duodenum",
            "colon": "Colon",
            "urinary_bladder": "Bladder",
            "bladder": "Bladder",
            "prostate": "Prostate",
            "rib": "Rib",
            "humerus": "Humerus",
            "scapula": "Scapula",
            "clavicula": "Clavicle",
            "clavicle": "Clavicle",
            "femur": "Femur",
            "hip": "Hip",
            "sacrum": "Sacrum",
            "face": "Face",
        }.items()
    },
    **{f"vertebrae_{level}": (ANATOMY, _sct(f"{level.upper()}Vertebra"))
       for level in [f"c{i}" for i in range(1, 8)] + [f"t{i}" for i in range(1, 13)] + [f"l{i}" for i in range(1, 6)]},
}
_SIDE = re.compile(r"(^(left|right)_)|(_(left|right)$)")
_RIB = re.compile(r"^rib_(?:(left|right)_)?\d+$")


def _normalise(label: str) -> str:
    return re.sub(r"[\s\-]+", "_", label.strip().lower())


def codes_for_label(label: str, overrides: dict[str, SegmentCodes] | None = None) -> SegmentCodes:
    """Codes for a bundle's label name: an override, else the table, else a generic code."""
    name = _normalise(label)
    if overrides and name in overrides:
        return overrides[name]
    if name in _TABLE:  # sided names of their own, such as heart_atrium_left
        category, property_type = _TABLE[name]
        return SegmentCodes(label, category, property_type)
    side = _SIDE.search(name)
    base = _SIDE.sub("", name) if side else name
    laterality = LATERALITY[side.group(2) or side.group(4)] if side else None
    if rib := _RIB.match(base):
        base = "rib"
        laterality = LATERALITY[rib.group(1)] if rib.group(1) else laterality
    found = _TABLE.get(base)
    if found is None:
        return SegmentCodes(label, ANATOMY, ANATOMY, laterality, known=False)
    return SegmentCodes(label, found[0], found[1], laterality)


def _code(value, where: str) -> Code:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)):
        raise ValueError(f"{where} must be [scheme, value, meaning], got {value!r}")
    scheme, code_value, meaning = value
    return Code(code_value, scheme, meaning)


def read_overrides(path: Path) -> dict[str, SegmentCodes]:
    """Label overrides from a TOML file; see docs/segments.md for the format."""
    with open(path, "rb") as handle:
        raw = tomllib.load(handle)
    overrides = {}
    for label, entry in raw.items():
        where = f"{path}: [{label}]"
        unknown = set(entry) - {"label", "category", "type", "modifier", "color"}
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
        base = codes_for_label(label)
        color = entry.get("color")
        if color is not None and not (len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
            raise ValueError(f"{where}: color must be [red, green, blue] in 0..255")
        overrides[_normalise(label)] = replace(
            base,
            label=entry.get("label", label),
            category=_code(entry["category"], f"{where} category") if "category" in entry else base.category,
            property_type=_code(entry["type"], f"{where} type") if "type" in entry else base.property_type,
            modifier=_code(entry["modifier"], f"{where} modifier") if "modifier" in entry else base.modifier,
            color=tuple(color) if color is not None else base.color,
            known=True,
        )
    return overrides


BUNDLE_SEGMENTS_FILE = "dicom_segments.toml"  # a bundle's own segment overrides, in configs/


def bundle_overrides(bundle_dir: Path, pipeline_segments: Path | None = None) -> dict[str, SegmentCodes]:
    """The bundle's own label overrides, then the pipeline's (`segments`) on top."""
    overrides: dict[str, SegmentCodes] = {}
    for path in (bundle_dir / "configs" / BUNDLE_SEGMENTS_FILE, pipeline_segments):
        if path is not None and path.exists():
            overrides.update(read_overrides(path))
    return overrides
