"""How a synthetic lesion looks beyond a convex blob: lobulated, spiculated, rim-enhancing, necrotic, cavitating.

The surface stays star-shaped around the lesion's centre (every ray from the centre leaves it once, so RECIST
measured on the drawn mask is well defined and the along-ray distance is a usable soft edge). Its radius along
a unit direction ``u`` is scaled by ``1 + sum_b a_b exp(k_b (u . d_b - 1))`` on top of the smooth irregularity of
:mod:`.lesion_synthesis`: bumps around directions ``d_b`` that are wide (small ``k``: lobes, as in lobulated
metastases and nodes) or narrow and long (large ``k``: spicules, as in lung cancers).

Inside, the HU profile follows what readers see: an enhancing **rim** (a wall denser than the lesion, e.g.
abscesses and treated metastases), a **necrotic** core (fluid, near water) or a **cavity** (air, in lung
nodules). The mask, and so RECIST, always covers the whole lesion, core included, as a reader measures it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Styles a kind may take, with their weights (kinds not listed are round).
KIND_STYLES = {
    "lung": {"round": 3.0, "lobulated": 2.0, "spiculated": 3.0, "cavitating": 1.0},
    "liver": {"round": 3.0, "lobulated": 2.0, "rim": 2.0, "necrotic": 1.0},
    "kidney_solid": {"round": 2.0, "lobulated": 1.0, "necrotic": 1.0},
    "lymph_node": {"round": 3.0, "lobulated": 1.0, "necrotic": 1.0},
    "soft_tissue": {"round": 2.0, "lobulated": 2.0, "rim": 1.0, "necrotic": 1.0},
    "mediastinal_node": {"round": 3.0, "lobulated": 1.0, "necrotic": 1.0},
    "abdomen_organ": {"round": 2.0, "lobulated": 1.0, "rim": 1.0},
    "bone_lytic": {"round": 2.0, "lobulated": 1.0},
    "bone_sclerotic": {"round": 2.0, "lobulated": 1.0},
}
#: Lesion cores: necrosis this many HU below the lesion (down to water), air in a cavity.
NECROTIC_DROP_HU = (25.0, 50.0)
WATER_HU = 0.0
CAVITY_HU = (-950.0, -800.0)
#: Lesions smaller than this (mm) have no room for a visible wall or core: they are drawn round.
MIN_STRUCTURED_MM = 12.0


@dataclass(frozen=True)
class LesionStyle:
    """One lesion's surface bumps and HU profile (see the module docstring)."""

    name: str = "round"
    directions: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (B, 3) unit vectors
    amplitudes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (B,) radius gain at the bump's peak
    sharpness: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (B,) k: ~1/(angular width in rad)^2
    rim_mm: float = 0.0  # wall thickness
    rim_hu: float = 0.0  # added to the wall
    core_fraction: float = 0.0  # the core is the inner core_fraction of every ray
    core_hu: float = 0.0  # a cavity's HU
    core_drop_hu: float = 0.0  # a necrotic core's HU below the lesion's (not below water)

    def bumps(self, u: np.ndarray) -> np.ndarray:
        """(N,) radius gain along unit directions ``u`` (N, 3)."""
        if not len(self.amplitudes):
            return np.zeros(len(u))
        return np.exp(self.sharpness * (u @ self.directions.T - 1.0)) @ self.amplitudes

    def profile(self, hu: np.ndarray, depth_mm: np.ndarray, relative_radius: np.ndarray) -> np.ndarray:
        """Lesion HU with the wall and core applied; ``depth_mm`` from the surface inwards, ``relative_radius``
        the point's distance from the centre over the surface's along its ray (0 centre .. 1 surface)."""
        hu = hu + self.rim_hu * (depth_mm < self.rim_mm)
        if self.core_fraction:
            core = np.maximum(hu - self.core_drop_hu, min(WATER_HU, hu.min())) if self.core_drop_hu else self.core_hu
            # a one-voxel-ish blend into the core, so the core has a partial-volume edge too
            weight = np.clip((self.core_fraction - relative_radius) / 0.08 + 0.5, 0.0, 1.0)
            hu = weight * core + (1.0 - weight) * hu
        return hu


def _unit(rng: np.random.Generator, count: int) -> np.ndarray:
    v = rng.normal(size=(count, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def draw_style(rng: np.random.Generator, kind: str, long_axis_mm: float) -> LesionStyle:
    """A random style for a lesion of ``kind`` and nominal size (round when the kind has no styles)."""
    choices = KIND_STYLES.get(kind, {"round": 1.0})
    names = list(choices)
    if long_axis_mm < MIN_STRUCTURED_MM:  # too small for a visible wall or core
        names = [n for n in names if n in ("round", "lobulated", "spiculated")]
    weights = np.array([choices[n] for n in names])
    name = names[rng.choice(len(names), p=weights / weights.sum())]
    radius = long_axis_mm / 2
    if name == "lobulated":
        count = int(rng.integers(3, 7))
        # lobes about 0.3-0.5 rad wide: bumps with notches between them, not a uniformly larger blob
        return LesionStyle(name, _unit(rng, count), rng.uniform(0.25, 0.5, count), rng.uniform(12.0, 30.0, count))
    if name == "spiculated":
        count = int(rng.integers(6, 15))
        return LesionStyle(name, _unit(rng, count), rng.uniform(0.3, 0.8, count), rng.uniform(80.0, 250.0, count))
    if name == "rim":
        return LesionStyle(name, rim_mm=float(min(rng.uniform(1.5, 4.0), 0.3 * radius)),
                           rim_hu=float(rng.uniform(30.0, 90.0)))
    if name == "cavitating":
        return LesionStyle(name, core_fraction=float(rng.uniform(0.35, 0.65)), core_hu=float(rng.uniform(*CAVITY_HU)))
    if name == "necrotic":
        return LesionStyle(name, core_fraction=float(rng.uniform(0.35, 0.65)),
                           core_drop_hu=float(rng.uniform(*NECROTIC_DROP_HU)))
    return LesionStyle()
