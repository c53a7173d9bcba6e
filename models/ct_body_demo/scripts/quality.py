"""The demo model's quality, per phantom family, on families it never saw.

Whole families are held out of training (the neck, the curved table), not only seeds: a model
that learned "a table is flat" or "a body is a thorax or an abdomen" fails here. Each check
phantom is scanned the way a scanner would (512 x 512, 0.3 to 1 mm pixels, slices 0.5 to 10 mm,
a kernel from soft to bone, the reconstruction circle), run through the bundle's own
preprocessing, inferer and postprocessing, and compared with the truth at its own resolution.
"""

from __future__ import annotations

import numpy as np

from scripts.phantoms import ARMS, Family, make_phantom, random_geometry

HELD_OUT_REGIONS = ("neck",)
HELD_OUT_TABLES = ("curved",)
CHECK_SEED = 9000
# Below these, on any group of families, training exits non-zero and the bundle's test fails.
MINIMUM_DICE = {"body": 0.9, "bone": 0.9}


def trained_on(family: Family) -> bool:
    return family.region not in HELD_OUT_REGIONS and family.table not in HELD_OUT_TABLES


def check_families() -> dict[str, list[Family]]:
    """Named groups of families, each checked on phantoms of its own."""
    return {
        "neck (held out)": [Family("neck", "flat", "side"), Family("neck", "railed", "up")],
        "curved table (held out)": [Family(region, "curved", arms) for region, arms in
                                    (("head", "up"), ("thorax", "side"), ("abdomen", "side"), ("pelvis", "up"))],
        "neck on a curved table (both held out)": [Family("neck", "curved", "side")],
        "seen families, new patients": [Family(region, table, ARMS[i % 2]) for i, (region, table) in enumerate(
            (("head", "flat"), ("thorax", "railed"), ("abdomen", "flat"), ("pelvis", "railed")))],
    }


def quality_table(segment, max_slices: int = 60) -> dict[str, dict[str, float]]:
    """Dice of body and bone per group of families, pooled over its phantoms. ``segment`` takes
    (HU array, spacing, origin) and returns the label map on the same grid."""
    table = {}
    seed = CHECK_SEED
    for name, families in check_families().items():
        overlap, total = {1: 0, 2: 0}, {1: 0, 2: 0}
        for family in families:
            seed += 1
            shape, spacing = random_geometry(np.random.default_rng(seed), max_slices=max_slices)
            phantom = make_phantom(shape, spacing, seed, family=family, fov_mm=shape[0] * spacing[0])
            labels = segment(phantom.hu, phantom.spacing, phantom.origin)
            for value in (1, 2):
                overlap[value] += 2 * int(np.sum((labels == value) & (phantom.labels == value)))
                total[value] += int(np.sum(labels == value)) + int(np.sum(phantom.labels == value))
        table[name] = {label: overlap[value] / max(total[value], 1) for label, value in (("body", 1), ("bone", 2))}
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    lines = ["| families | Dice body | Dice bone |", "| --- | --- | --- |"]
    lines += [f"| {name} | {scores['body']:.3f} | {scores['bone']:.3f} |" for name, scores in table.items()]
    return "\n".join(lines)
