"""Synthetic CT of patients on a scanner table, with the truth a body/bone segmenter must learn.

Real CT cannot ship with the project, and the demo model must be trainable offline,
reproducibly, in minutes. What it must learn is what a threshold cannot do: "body" is the
patient alone, filled (lungs, airways, sinuses and bowel gas are inside the patient), and not
the table, head holder, pillow, blanket, tubes and cables around it, some of which are as dense
as tissue and touch the skin; "bone" is the bone material of the skeleton, cortex and trabecular
bone at 200 HU and above (and any implant denser still), inside it.

A *scene* is one patient on one table: anatomy described as cross-sections that vary along the
body (head with skull, brain, ventricles, sinuses and mastoid air; neck; thorax with lungs and
mediastinum; abdomen with bowel gas; pelvis; arms beside the trunk or above the head), and
objects around it. A scene is drawn from a seed and a *family* (body region, table type, arm
position), and rendered on any axial grid; :func:`acquire` then does what the scanner does to
the clean values (blur and noise of a reconstruction kernel from soft to bone, metal streaks,
the reconstruction circle, slice thickness).

Arrays are indexed ``[i, j, k]`` = (column, row, slice), as a DICOM series is as a volume, in
LPS millimetres: ``x`` to the patient's left, ``y`` posterior (the table is at +y), ``z`` to the
head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

AIR_HU = -1000.0
# Bone is bone material, cortex and trabecular bone, at 200 HU and above: a fatty marrow
# cavity or an air cell inside a bone is not bone (it is body), as on a bone window.
BONE_MINIMUM_HU = 200.0
OUTSIDE_CIRCLE_HU = -2048.0  # what scanners store outside the reconstruction circle
LABELS = {"background": 0, "body": 1, "bone": 2}
REGIONS = ("head", "neck", "thorax", "abdomen", "pelvis")
TABLES = ("flat", "curved", "railed")
ARMS = ("side", "up")
# Where each region's scan is centred, mm below the top of the head.
REGION_CENTRE_MM = {"head": 110.0, "neck": 250.0, "thorax": 420.0, "abdomen": 650.0, "pelvis": 860.0}
KERNELS = {  # name: (blur sigma mm, noise HU range, edge enhancement)
    "soft": ((0.9, 1.4), (6.0, 20.0), 0.0),
    "standard": ((0.5, 0.9), (12.0, 40.0), 0.0),
    "bone": ((0.25, 0.45), (40.0, 120.0), 0.6),
}


@dataclass(frozen=True)
class Family:
    """What a held-out check holds out: a body region, a table type, an arm position."""

    region: str
    table: str
    arms: str

    @property
    def name(self) -> str:
        return f"{self.region}, {self.table} table, arms {self.arms}"


@dataclass(frozen=True)
class Phantom:
    """A phantom on its grid: what the scanner measured, the clean values and the truth."""

    hu: np.ndarray  # float32, what the scanner "measured" (blur, noise and artefacts included)
    clean_hu: np.ndarray  # float32, the materials' values at voxel centres
    labels: np.ndarray  # uint8, 0 background, 1 body (not bone), 2 bone
    spacing: tuple[float, float, float]  # mm along i, j, k
    origin: tuple[float, float, float]  # LPS mm of voxel [0, 0, 0]


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((x - cx) / max(a, 1e-3)) ** 2 + ((y - cy) / max(b, 1e-3)) ** 2 <= 1.0


def _profile(s: float, points: list[tuple[float, float]]) -> float:
    """A size along the body, linear between (depth mm, value) points, 0 outside them."""
    depths = [p[0] for p in points]
    if s < depths[0] or s > depths[-1]:
        return 0.0
    return float(np.interp(s, depths, [p[1] for p in points]))


class Scene:
    """One patient on one table, drawn from a seed; :meth:`slice` renders one axial plane."""

    def __init__(self, seed: int, family: Family) -> None:
        rng = np.random.default_rng(seed)
        self.family = family
        self.rng_seed = seed
        u = rng.uniform
        self.size = u(0.85, 1.15)
        self.width = u(0.9, 1.1)  # left-right against front-back
        self.cx = u(-15.0, 15.0)
        self.back_y = u(60.0, 140.0)  # where the patient's back lies
        self.pad = u(0.0, 45.0) if rng.random() < 0.8 else 0.0  # foam between patient and table
        self.pad_hu = u(-900.0, -700.0)
        self.table_hu = u(120.0, 450.0)
        self.table_thickness = u(10.0, 30.0)
        self.table_width = u(380.0, 470.0)
        self.table_radius = u(260.0, 420.0)
        self.fat = u(5.0, 30.0)
        self.wobble, self.period, self.phase = u(0.0, 0.08), u(150.0, 400.0), u(0, 2 * np.pi)
        self.bone_hu = u(260.0, 500.0)  # trabecular bone: from an elderly spine to a young one
        self.cortex_hu = u(600.0, 1500.0)
        self.skull = u(5.0, 9.0)
        self.arm_gap = u(0.0, 30.0) if rng.random() < 0.85 else 0.0
        self.pillow = u(20.0, 60.0) if rng.random() < 0.7 else 0.0
        self.pillow_hu = u(-800.0, -350.0)
        self.holder_hu = u(150.0, 350.0)
        self.blanket = rng.random() < 0.6
        self.blanket_gap, self.blanket_t, self.blanket_hu = u(0.0, 8.0), u(2.0, 8.0), u(-450.0, -120.0)
        self.organs = [(u(-0.5, 0.5), u(-0.5, 0.3), u(0.12, 0.3), u(0.1, 0.25), u(20.0, 70.0), u(520.0, 900.0),
                        u(60.0, 200.0)) for _ in range(rng.integers(3, 7))]
        self.gas = [(u(-0.6, 0.6), u(-0.6, 0.3), u(5.0, 22.0), u(540.0, 900.0), u(10.0, 40.0))
                    for _ in range(rng.integers(2, 9))]
        self.tubes = [(u(0, 2 * np.pi), u(0.0, 35.0), u(2.0, 8.0), rng.random() < 0.5, u(-400.0, 1100.0),
                       u(100.0, 600.0)) for _ in range(rng.integers(0, 5))]
        self.metal = [kind for kind in ("hip", "dental", "rods") if rng.random() < 0.25]
        self.metal_hu = u(2500.0, 3071.0)
        self.streaks = (u(80.0, 350.0), int(rng.integers(6, 16)), u(0, np.pi))
        self.lung_hu = u(-900.0, -780.0)

    # -- outlines ---------------------------------------------------------------------------
    def _head(self, s: float) -> tuple[float, float, float] | None:
        """Half-widths (LR, AP) and AP centre offset of the head at depth s, or None."""
        c, centre = 112.0 * self.size, 112.0 * self.size
        if abs(s - centre) >= c:
            return None
        r = np.sqrt(1.0 - ((s - centre) / c) ** 2)
        return 72.0 * self.size * self.width * r, 92.0 * self.size * r, 0.0

    def _trunk(self, s: float) -> tuple[float, float]:
        f = self.size * (1.0 + self.wobble * np.sin(2 * np.pi * s / self.period + self.phase))
        a = _profile(s, [(190.0, 55.0), (270.0, 60.0), (300.0, 110.0), (330.0, 170.0), (560.0, 160.0),
                         (800.0, 155.0), (950.0, 175.0), (990.0, 0.0)])
        b = _profile(s, [(190.0, 52.0), (270.0, 55.0), (300.0, 85.0), (340.0, 110.0), (560.0, 115.0),
                         (800.0, 120.0), (950.0, 115.0), (990.0, 0.0)])
        return a * f * self.width, b * f

    def _legs(self, s: float) -> float:
        return _profile(s, [(940.0, 0.0), (960.0, 80.0), (1400.0, 60.0)]) * self.size

    def slice(self, x: np.ndarray, y: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray, list]:
        """Clean HU and labels of the axial plane at depth s (mm below the top of the head),
        on pixel centres ``x`` (column vector) and ``y`` (row vector), and the metal in it."""
        shape = np.broadcast(x, y).shape
        hu = np.full(shape, AIR_HU, dtype=np.float32)
        body = np.zeros(shape, dtype=bool)
        bone = np.zeros(shape, dtype=bool)
        metal_points: list[tuple[float, float, float]] = []
        self._objects_behind(hu, x, y, s)
        head = self._head(s)
        a, b = self._trunk(s)
        if head is not None:
            ha, hb, _ = head
            hcy = self.back_y - self.pillow - 92.0 * self.size
            self._draw_head(hu, body, bone, x, y, s, ha, hb, hcy, metal_points)
        if a > 0:
            cy = self.back_y - b
            self._draw_trunk(hu, body, bone, x, y, s, a, b, cy, metal_points)
            self._draw_arms_at_side(hu, body, bone, x, y, s, a, cy)
        legs = self._legs(s)
        if legs > 0 and a == 0:
            for side in (-1.0, 1.0):
                cx, cy = self.cx + side * 95.0 * self.size, self.back_y - legs
                self._limb(hu, body, bone, x, y, cx, cy, legs, legs * 0.9, 20.0 * self.size)
        self._draw_arms_up(hu, body, bone, x, y, s)
        self._objects_in_front(hu, body, x, y, s, a, b, head)
        bone &= hu >= BONE_MINIMUM_HU  # marrow cavities and air cells inside a bone are not bone
        labels = np.zeros(shape, dtype=np.uint8)
        labels[body] = LABELS["body"]
        labels[body & bone] = LABELS["bone"]
        return hu, labels, metal_points

    def _soft(self, hu, body, x, y, cx, cy, a, b) -> None:
        outline = _ellipse(x, y, cx, cy, a, b)
        hu[outline] = -100.0
        hu[_ellipse(x, y, cx, cy, a - self.fat, b - self.fat)] = 45.0
        body |= outline

    def _bone(self, hu, bone, mask, marrow: bool = True) -> None:
        hu[mask] = self.bone_hu if marrow else self.cortex_hu
        bone |= mask

    def _vertebra(self, hu, bone, x, y, cx, cy, a, b) -> None:
        """Cortex around trabecular bone, whose texture a real spine has: the whole is bone."""
        whole = _ellipse(x, y, cx, cy, a, b)
        hu[whole] = self.cortex_hu
        inner = _ellipse(x, y, cx, cy, a - 2.5, b - 2.5)
        texture = 60.0 * np.sin(x / 2.1 + y / 3.3) * np.cos(y / 1.7 - x / 4.1)
        hu[inner] = (self.bone_hu + np.broadcast_to(texture, inner.shape))[inner]
        bone |= whole

    def _limb(self, hu, body, bone, x, y, cx, cy, a, b, bone_r) -> None:
        outline = _ellipse(x, y, cx, cy, a, b)
        hu[outline] = -90.0
        hu[_ellipse(x, y, cx, cy, a - 5.0, b - 5.0)] = 50.0
        body |= outline
        self._bone(hu, bone, _ellipse(x, y, cx, cy, bone_r, bone_r), marrow=False)
        hu[_ellipse(x, y, cx, cy, bone_r * 0.5, bone_r * 0.5)] = self.bone_hu * 0.3

    def _draw_head(self, hu, body, bone, x, y, s, ha, hb, hcy, metal) -> None:
        cx = self.cx
        outline = _ellipse(x, y, cx, hcy, ha, hb)
        hu[outline] = 30.0
        body |= outline
        depth = s / self.size
        inner_a, inner_b = ha - 4.0, hb - 4.0
        if depth < 150.0:  # the vault: skull around brain, ventricles in it
            self._bone(hu, bone, outline & _ellipse(x, y, cx, hcy, inner_a, inner_b), marrow=False)
            hu[_ellipse(x, y, cx, hcy, inner_a - self.skull, inner_b - self.skull)] = 35.0
            bone &= ~_ellipse(x, y, cx, hcy, inner_a - self.skull, inner_b - self.skull)
            if 60.0 < depth < 130.0:
                for side in (-1.0, 1.0):
                    hu[_ellipse(x, y, cx + side * 9.0, hcy - 5.0, 6.0, 22.0)] = 5.0
            if 55.0 < depth < 85.0:  # frontal sinus, anterior
                hu[_ellipse(x, y, cx, hcy - inner_b + self.skull + 6.0, 14.0, 5.0)] = AIR_HU
        else:  # skull base and face: petrous bone, mastoid air, maxillary sinuses, jaw
            if depth < 172.0:
                for side in (-1.0, 1.0):
                    petrous = _ellipse(x, y, cx + side * ha * 0.55, hcy + hb * 0.25, ha * 0.3, hb * 0.12)
                    self._bone(hu, bone, petrous, marrow=False)
                    hu[_ellipse(x, y, cx + side * ha * 0.72, hcy + hb * 0.35, 7.0, 6.0)] = AIR_HU
                    hu[_ellipse(x, y, cx + side * ha * 0.4, hcy - hb * 0.55, 14.0, 12.0)] = AIR_HU
                hu[_ellipse(x, y, cx, hcy - hb * 0.6, 5.0, 18.0)] = AIR_HU  # nasal cavity
            else:
                jaw = _ellipse(x, y, cx, hcy - hb * 0.2, ha * 0.8, hb * 0.75) & ~_ellipse(
                    x, y, cx, hcy - hb * 0.2, ha * 0.8 - 7.0, hb * 0.75 - 7.0) & (y < hcy)
                self._bone(hu, bone, jaw, marrow=False)
                if "dental" in self.metal and depth < 200.0:
                    for side in (-1.0, 1.0):
                        spot = _ellipse(x, y, cx + side * ha * 0.45, hcy - hb * 0.75, 3.0, 3.0)
                        hu[spot] = self.metal_hu
                        bone |= spot
                        metal.append((cx + side * ha * 0.45, hcy - hb * 0.75, 3.0))
                hu[_ellipse(x, y, cx, hcy - hb * 0.15, 7.0, 7.0)] = AIR_HU  # pharynx
            if depth > 165.0:
                self._vertebra(hu, bone, x, y, cx, hcy + hb * 0.35, 11.0, 10.0)

    def _draw_trunk(self, hu, body, bone, x, y, s, a, b, cy, metal) -> None:
        cx = self.cx
        self._soft(hu, body, x, y, cx, cy, a, b)
        depth = s / self.size
        spine_r = 16.0 * self.size if depth > 300 else 12.0 * self.size
        spine_cy = cy + b - self.fat - 2.0 * spine_r
        if depth < 320.0:  # neck: trachea in front of the cervical spine
            hu[_ellipse(x, y, cx, cy - b * 0.35, 8.0, 8.0)] = AIR_HU
        if 310.0 < depth < 545.0:  # thorax: lungs around the mediastinum, heart, ribs, sternum
            for side in (-1.0, 1.0):
                lung = _ellipse(x, y, cx + side * a * 0.45, cy - b * 0.05, a * 0.37, b * 0.72)
                hu[lung] = self.lung_hu
            if depth < 420.0:
                hu[_ellipse(x, y, cx, cy - b * 0.1, 8.0, 8.0)] = AIR_HU
            if depth > 400.0:
                hu[_ellipse(x, y, cx - a * 0.1, cy - b * 0.15, a * 0.28, b * 0.4)] = 40.0
            angle = np.arctan2((y - cy) / b, (x - cx) / a)
            radius = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
            ribs = (radius > 1.0 - (self.fat + 9.0) / b) & (radius < 1.0 - self.fat / b) & (
                np.cos(angle * 11.0 + depth / 12.0) > 0.8)
            self._bone(hu, bone, ribs, marrow=False)
            self._bone(hu, bone, _ellipse(x, y, cx, cy - b + self.fat + 6.0, 14.0, 5.0))
        elif depth >= 545.0:  # abdomen and pelvis: organs, gas, pelvic bones
            for ox, oy, oa, ob, ohu, oz, oh in self.organs:
                if abs(depth - oz) < oh / 2:
                    hu[_ellipse(x, y, cx + ox * a, cy + oy * b, oa * a, ob * b)] = ohu
            for gx, gy, gr, gz, gh in self.gas:
                if abs(depth - gz) < gh / 2:
                    hu[_ellipse(x, y, cx + gx * a * 0.7, cy + gy * b * 0.7, gr, gr * 0.8)] = AIR_HU
            if 760.0 < depth < 870.0:
                for side in (-1.0, 1.0):
                    wing = _ellipse(x, y, cx + side * a * 0.55, cy + b * 0.25, a * 0.22, b * 0.42)
                    self._bone(hu, bone, wing & ~_ellipse(x, y, cx + side * a * 0.55, cy + b * 0.25,
                                                         a * 0.22 - 6.0, b * 0.42 - 6.0), marrow=False)
            if 860.0 < depth < 950.0:
                for side in (-1.0, 1.0):
                    head_x = cx + side * a * 0.55
                    material = self.metal_hu if ("hip" in self.metal and side > 0) else None
                    femoral = _ellipse(x, y, head_x, cy + b * 0.05, 24.0 * self.size, 24.0 * self.size)
                    if material is None:
                        self._vertebra(hu, bone, x, y, head_x, cy + b * 0.05, 24.0 * self.size, 24.0 * self.size)
                    else:
                        hu[femoral] = material
                        bone |= femoral
                        metal.append((head_x, cy + b * 0.05, 24.0 * self.size))
                hu[_ellipse(x, y, cx, cy - b * 0.2, a * 0.2, b * 0.25)] = 10.0
        self._vertebra(hu, bone, x, y, cx, spine_cy, spine_r, spine_r * 0.85)
        for side in (-1.0, 1.0):  # the arch and its processes
            self._bone(hu, bone, _ellipse(x, y, cx + side * 0.8 * spine_r, spine_cy + 1.1 * spine_r, 0.25 * spine_r,
                                          0.5 * spine_r), marrow=False)
        self._bone(hu, bone, _ellipse(x, y, cx, spine_cy + 1.4 * spine_r, 0.35 * spine_r, 0.9 * spine_r),
                   marrow=False)
        if "rods" in self.metal and 450.0 < depth < 800.0:
            for side in (-1.0, 1.0):
                rod = _ellipse(x, y, cx + side * 1.2 * spine_r, spine_cy + 0.8 * spine_r, 3.0, 3.0)
                hu[rod] = self.metal_hu
                bone |= rod
                metal.append((cx + side * 1.2 * spine_r, spine_cy + 0.8 * spine_r, 3.0))

    def _draw_arms_at_side(self, hu, body, bone, x, y, s, a, cy) -> None:
        depth = s / self.size
        if self.family.arms != "side" or not 300.0 < depth < 900.0:
            return
        arm_a, arm_b = 42.0 * self.size, 48.0 * self.size
        for side in (-1.0, 1.0):
            self._limb(hu, body, bone, x, y, self.cx + side * (a + self.arm_gap + arm_a), self.back_y - arm_b - 10.0,
                       arm_a, arm_b, 11.0 * self.size)

    def _draw_arms_up(self, hu, body, bone, x, y, s) -> None:
        depth = s / self.size
        if self.family.arms != "up" or not -250.0 < depth < 320.0:
            return
        head = 72.0 * self.size * self.width
        for side in (-1.0, 1.0):
            offset = head + self.arm_gap + 40.0 + max(0.0, depth - 200.0) * 0.5
            self._limb(hu, body, bone, x, y, self.cx + side * offset, self.back_y - 70.0 * self.size,
                       38.0 * self.size, 42.0 * self.size, 10.0 * self.size)

    def _objects_behind(self, hu, x, y, s) -> None:
        """Table, pad, head holder and pillow: at the patient's back, never body."""
        top = self.back_y + self.pad
        table = self.family.table
        if table == "curved":
            centre = top - self.table_radius
            r = np.sqrt((x - self.cx) ** 2 + (y - centre) ** 2)
            shell = (r > self.table_radius) & (r < self.table_radius + self.table_thickness) & (y > centre) & (
                np.abs(x - self.cx) < self.table_width / 2)
            hu[shell] = -850.0
            hu[shell & ((r < self.table_radius + 2.5) | (r > self.table_radius + self.table_thickness - 2.5))] = \
                self.table_hu
        else:
            slab = (y > top) & (y < top + self.table_thickness) & (np.abs(x - self.cx) < self.table_width / 2)
            hu[slab] = -850.0
            hu[slab & ((y < top + 2.5) | (y > top + self.table_thickness - 2.5))] = self.table_hu
            if table == "railed":
                for side in (-1.0, 1.0):
                    rail = (np.abs(x - self.cx - side * (self.table_width / 2 - 12.0)) < 8.0) & (
                        y > top + self.table_thickness) & (y < top + self.table_thickness + 22.0)
                    hu[rail] = 2200.0
        if self.pad > 0:
            hu[(y > self.back_y) & (y < top) & (np.abs(x - self.cx) < self.table_width / 2 - 20.0)] = self.pad_hu
        head = self._head(s)
        if head is not None:
            ha, hb, _ = head
            hcy = self.back_y - self.pillow - 92.0 * self.size
            if self.pillow > 0:
                hu[_ellipse(x, y, self.cx, self.back_y - self.pillow / 2, ha + 30.0, self.pillow / 2)] = self.pillow_hu
            r = np.sqrt(((x - self.cx) / (ha + 14.0)) ** 2 + ((y - hcy) / (hb + 14.0)) ** 2)
            holder = (r > 1.0) & (r < 1.0 + 8.0 / (hb + 14.0)) & (y > hcy - hb * 0.2)
            hu[holder] = self.holder_hu

    def _objects_in_front(self, hu, body, x, y, s, a, b, head) -> None:
        """Blanket over the patient, tubes and cables along it: never body."""
        if a > 0:
            cy, outer_a, outer_b = self.back_y - b, a, b
        elif head is not None:
            cy, outer_a, outer_b = self.back_y - self.pillow - 92.0 * self.size, head[0], head[1]
        else:
            return
        if self.blanket and a > 0:
            ga, gb = outer_a + self.blanket_gap + 45.0, outer_b + self.blanket_gap
            inner = _ellipse(x, y, self.cx, cy, ga, gb)
            outer = _ellipse(x, y, self.cx, cy, ga + self.blanket_t, gb + self.blanket_t)
            wave = np.sin(x / 9.0 + s / 13.0) * 2.0
            sheet = outer & ~inner & (y < cy + wave) & ~body
            hu[sheet] = self.blanket_hu
        for angle, gap, radius, cable, wall_hu, length in self.tubes:
            if abs(s - REGION_CENTRE_MM[self.family.region]) > length:
                continue
            angle = -abs(angle)  # on the front half, where lines and leads lie
            tx = self.cx + (outer_a + gap + radius) * np.cos(angle)
            ty = cy + (outer_b + gap + radius) * np.sin(angle)
            outer = _ellipse(x, y, tx, ty, radius, radius) & ~body
            hu[outer] = wall_hu if not cable else 250.0
            core = _ellipse(x, y, tx, ty, radius * 0.5, radius * 0.5) & ~body
            hu[core] = AIR_HU if not cable else self.metal_hu


def family_of(seed: int) -> Family:
    """The family a plain seed draws from: any region, table and arm position."""
    rng = np.random.default_rng(seed + 7919)
    return Family(str(rng.choice(REGIONS)), str(rng.choice(TABLES)), str(rng.choice(ARMS)))


def render(scene: Scene, shape: tuple[int, int, int], spacing, origin) -> tuple[np.ndarray, np.ndarray, list]:
    """Clean HU, labels and metal of the scene on an axial grid (origin: LPS mm of voxel 0)."""
    nx, ny, nz = shape
    x = (origin[0] + np.arange(nx, dtype=np.float32) * spacing[0])[:, None]
    y = (origin[1] + np.arange(ny, dtype=np.float32) * spacing[1])[None, :]
    clean = np.empty(shape, dtype=np.float32)
    labels = np.empty(shape, dtype=np.uint8)
    metal = []
    for k in range(nz):
        s = -(origin[2] + k * spacing[2])  # depth below the top of the head
        clean[:, :, k], labels[:, :, k], found = scene.slice(x, y, s)
        metal.append(found)
    return clean, labels, metal


def _streaks(x, y, metal, strength: float, count: int, phase: float) -> np.ndarray:
    """Metal streaks: bright and dark rays from each metal object, fading with distance, and a
    dark band between two of them (beam hardening)."""
    out = np.zeros(np.broadcast(x, y).shape, dtype=np.float32)
    for mx, my, r in metal:
        d = np.sqrt((x - mx) ** 2 + (y - my) ** 2) + 1e-3
        theta = np.arctan2(y - my, x - mx)
        out += strength * np.cos(count * theta + phase) * np.exp(-np.maximum(d - r, 0) / 60.0) * (d > r)
    if len(metal) >= 2:
        (x0, y0, _), (x1, y1, _) = metal[:2]
        length = np.hypot(x1 - x0, y1 - y0) + 1e-3
        along = ((x - x0) * (x1 - x0) + (y - y0) * (y1 - y0)) / length
        across = np.abs((x - x0) * (y1 - y0) - (y - y0) * (x1 - x0)) / length
        out -= strength * ((along > 0) & (along < length)) * np.exp(-across / 10.0)
    return out


def acquire(clean: np.ndarray, labels: np.ndarray, metal: list, spacing, origin, rng: np.random.Generator,
            kernel: str | None = None, noise_hu: float | None = None, fov_mm: float | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """What the scanner reconstructs from the clean values: streaks, kernel blur and noise, slice
    thickness, and the reconstruction circle (outside it the scanner stores a fill value, and
    the truth there is background: nothing was measured)."""
    kernel = kernel or str(rng.choice(list(KERNELS)))
    (blur_low, blur_high), (noise_low, noise_high), sharpen = KERNELS[kernel]
    nx, ny, nz = clean.shape
    x = (origin[0] + np.arange(nx) * spacing[0])[:, None]
    y = (origin[1] + np.arange(ny) * spacing[1])[None, :]
    hu = clean.copy()
    strength, count, phase = rng.uniform(80.0, 350.0), int(rng.integers(6, 16)), rng.uniform(0, np.pi)
    for k in range(nz):
        if metal[k]:
            hu[:, :, k] += _streaks(x, y, metal[k], strength, count, phase)
    blur = rng.uniform(blur_low, blur_high)
    thickness_sigma = max(spacing[2], 0.5) / 2.355  # a slice covers its thickness, about
    hu = ndimage.gaussian_filter(hu, sigma=[blur / spacing[0], blur / spacing[1], thickness_sigma / spacing[2]],
                                 mode="nearest")
    if sharpen:
        hu += sharpen * (hu - ndimage.gaussian_filter(hu, sigma=[1.5 / spacing[0], 1.5 / spacing[1], 0]))
    sigma = rng.uniform(noise_low, noise_high) if noise_hu is None else noise_hu
    noise = rng.normal(0.0, 1.0, size=clean.shape).astype(np.float32)
    correlation = 0.6 if kernel == "soft" else 0.3
    noise = ndimage.gaussian_filter(noise, sigma=[correlation, correlation, 0])
    noise *= sigma / max(float(noise.std()), 1e-6)
    hu += noise
    labels = labels.copy()
    if fov_mm is not None:
        centre_x, centre_y = origin[0] + (nx - 1) * spacing[0] / 2, origin[1] + (ny - 1) * spacing[1] / 2
        outside = (x - centre_x) ** 2 + (y - centre_y) ** 2 > (fov_mm / 2) ** 2
        hu[np.broadcast_to(outside[:, :, None], hu.shape)] = OUTSIDE_CIRCLE_HU
        labels[np.broadcast_to(outside[:, :, None], labels.shape)] = 0
    return np.clip(hu, OUTSIDE_CIRCLE_HU, 3071.0).astype(np.float32), labels


def scan_origin(scene: Scene, shape, spacing) -> tuple[float, float, float]:
    """Grid origin centring the scan on the family's region and on the patient."""
    nx, ny, nz = shape
    centre_depth = REGION_CENTRE_MM[scene.family.region] * scene.size
    return (
        scene.cx - (nx - 1) * spacing[0] / 2.0,
        scene.back_y - 100.0 * scene.size - (ny - 1) * spacing[1] / 2.0,
        -centre_depth - (nz - 1) * spacing[2] / 2.0,
    )


def make_phantom(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    seed: int,
    noise_hu: float | None = None,
    family: Family | None = None,
    kernel: str | None = None,
    fov_mm: float | None = None,
) -> Phantom:
    """One patient scan; the same arguments always give the same arrays."""
    scene = Scene(seed, family or family_of(seed))
    origin = scan_origin(scene, shape, spacing)
    clean, labels, metal = render(scene, shape, spacing, origin)
    rng = np.random.default_rng(seed + 104729)
    hu, labels = acquire(clean, labels, metal, spacing, origin, rng, kernel, noise_hu, fov_mm)
    return Phantom(hu=hu, clean_hu=clean, labels=labels, spacing=tuple(float(s) for s in spacing),
                   origin=tuple(float(o) for o in origin))


def random_geometry(rng: np.random.Generator, pixels: int = 512, max_slices: int = 80
                    ) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """A scanner's grid: ``pixels`` square at 0.3 to 1 mm (a partial field of view when small),
    slices 0.5 to 10 mm thick, at most ``max_slices`` of them."""
    pixel = float(rng.uniform(0.3, 1.0)) * 512 / pixels
    slice_mm = float(rng.choice([0.5, 0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0, 7.5, 10.0]))
    slices = int(min(max_slices, max(8, round(rng.uniform(100.0, 300.0) / slice_mm))))
    return (pixels, pixels, slices), (pixel, pixel, slice_mm)
