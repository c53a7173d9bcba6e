"""Synthetic abdominal CT phantoms with a Hounsfield-threshold ground truth.

The demo model must be trainable offline, reproducibly, in minutes; real CT cannot ship with the
project. These phantoms imitate what matters for a body/bone segmenter: air around the patient,
a fat layer under the skin, soft-tissue organs, a spine and pelvis in bone density, scanner
noise and partial-volume blur, on grids of varied spacing.

Arrays are indexed ``[i, j, k]`` = (column, row, slice), the layout a DICOM series takes as a
volume, with patient coordinates in LPS millimetres: ``x`` grows to the patient's left, ``y``
to the posterior, ``z`` to the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

AIR_HU = -1000.0
BODY_THRESHOLD_HU = -500.0
BONE_THRESHOLD_HU = 200.0
LABELS = {"background": 0, "body": 1, "bone": 2}


@dataclass(frozen=True)
class Phantom:
    """A phantom on its grid: noisy HU image, clean HU values and the label truth."""

    hu: np.ndarray  # float32, what the scanner "measured" (noise and blur included)
    clean_hu: np.ndarray  # float32, the tissue values at voxel centres
    labels: np.ndarray  # uint8, 0 background, 1 body (not bone), 2 bone
    spacing: tuple[float, float, float]  # mm along i, j, k
    origin: tuple[float, float, float]  # LPS mm of voxel [0, 0, 0]


def truth_from_hu(clean_hu: np.ndarray) -> np.ndarray:
    """The ground truth is a plain Hounsfield threshold of the noise-free phantom."""
    labels = np.zeros(clean_hu.shape, dtype=np.uint8)
    labels[clean_hu > BODY_THRESHOLD_HU] = LABELS["body"]
    labels[clean_hu >= BONE_THRESHOLD_HU] = LABELS["bone"]
    return labels


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def make_phantom(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    seed: int,
    noise_hu: float | None = None,
) -> Phantom:
    """Draw one phantom; the same seed, shape and spacing always give the same arrays."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    sx, sy, sz = spacing
    origin = (-(nx - 1) * sx / 2.0, -(ny - 1) * sy / 2.0, -(nz - 1) * sz / 2.0)
    x = origin[0] + np.arange(nx, dtype=np.float32)[:, None] * sx
    y = origin[1] + np.arange(ny, dtype=np.float32)[None, :] * sy
    z_mm = origin[2] + np.arange(nz) * sz

    fov_x, fov_y = nx * sx, ny * sy
    body_a = rng.uniform(0.30, 0.42) * fov_x
    body_b = min(rng.uniform(0.62, 0.8) * body_a, 0.45 * fov_y)
    body_cx = rng.uniform(-0.04, 0.04) * fov_x
    body_cy = rng.uniform(-0.05, 0.05) * fov_y
    fat = rng.uniform(8.0, 25.0)
    wobble = rng.uniform(0.0, 0.12)
    period = rng.uniform(250.0, 500.0)
    phase = rng.uniform(0, 2 * np.pi)
    organs = [
        (
            rng.uniform(-0.5, 0.5),
            rng.uniform(-0.5, 0.2),
            rng.uniform(0.15, 0.3),
            rng.uniform(0.12, 0.25),
            rng.uniform(20.0, 70.0),
            rng.uniform(-150.0, 150.0),
            rng.uniform(60.0, 200.0),
        )
        for _ in range(rng.integers(2, 5))
    ]
    spine_r = rng.uniform(14.0, 22.0)
    bone_hu = rng.uniform(350.0, 800.0)
    pelvis_from = rng.uniform(-0.5, 0.1) * nz * sz
    pelvis_a = rng.uniform(0.12, 0.2)
    pelvis_b = rng.uniform(0.2, 0.35)

    clean = np.full(shape, AIR_HU, dtype=np.float32)
    for k, zk in enumerate(z_mm):
        scale = 1.0 + wobble * np.sin(2 * np.pi * zk / period + phase)
        a, b = body_a * scale, body_b * scale
        sl = clean[:, :, k]
        sl[_ellipse(x, y, body_cx, body_cy, a, b)] = -100.0  # subcutaneous fat
        sl[_ellipse(x, y, body_cx, body_cy, a - fat, b - fat)] = 40.0  # muscle and soft tissue
        for ox, oy, oa, ob, ohu, oz, oh in organs:
            if abs(zk - oz) < oh / 2:
                sl[_ellipse(x, y, body_cx + ox * a, body_cy + oy * b, oa * a, ob * b)] = ohu
        spine_cy = body_cy + b - fat - 2.2 * spine_r
        sl[_ellipse(x, y, body_cx, spine_cy, spine_r, spine_r * 0.85)] = bone_hu
        sl[_ellipse(x, y, body_cx, spine_cy + 1.4 * spine_r, 0.35 * spine_r, 0.9 * spine_r)] = bone_hu + 200
        if zk < pelvis_from:
            for side in (-1.0, 1.0):
                sl[
                    _ellipse(
                        x, y, body_cx + side * 0.6 * a, body_cy + 0.25 * b, pelvis_a * a, pelvis_b * b
                    )
                ] = bone_hu + 100

    blur_mm = rng.uniform(0.6, 1.2)
    hu = ndimage.gaussian_filter(clean, sigma=[blur_mm / s for s in spacing], mode="nearest")
    sigma = rng.uniform(8.0, 35.0) if noise_hu is None else noise_hu
    hu += rng.normal(0.0, sigma, size=shape).astype(np.float32)
    return Phantom(
        hu=hu.astype(np.float32),
        clean_hu=clean,
        labels=truth_from_hu(clean),
        spacing=(float(sx), float(sy), float(sz)),
        origin=tuple(float(o) for o in origin),
    )


def random_geometry(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """A scanner-like grid: 0.6 to 1.0 mm pixels over a 300-400 mm field, 1 to 5 mm slices."""
    fov = rng.uniform(300.0, 400.0)
    pixel = rng.uniform(0.6, 1.0)
    slice_mm = float(rng.choice([1.0, 1.25, 2.0, 2.5, 3.0, 5.0]))
    n = int(round(fov / pixel))
    nz = int(round(rng.uniform(120.0, 300.0) / slice_mm))
    return (n, n, nz), (pixel, pixel, slice_mm)
