"""Lesion styles of the DeepLesion miniature: RECIST measured from their masks stays correct, the HU profile
is what each style promises, and lesion grain follows the tissue's own noise."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial import ConvexHull

from ctzoo.datasets.deeplesion import lesion_synthesis as synth
from ctzoo.datasets.deeplesion.lesion_shapes import KIND_STYLES, draw_style
from ctzoo.datasets.deeplesion.measure import measure_recist
from ctzoo.datasets.deeplesion.recist import diameters

STYLES = ("round", "lobulated", "spiculated", "rim", "necrotic", "cavitating")
SPACING = (0.8, 0.8, 2.0)


def _style(name: str, kind: str, size_mm: float):
    for seed in range(500):  # the first seed whose draw is this style
        style = draw_style(np.random.default_rng(seed), kind, size_mm)
        if style.name == name:
            return style
    raise AssertionError(f"{kind} never draws {name}")


def _kind_for(style: str) -> str:
    return next(kind for kind, styles in KIND_STYLES.items() if style in styles)


def _drawn(style_name: str, size_mm: float = 30.0, seed: int = 0, edge_mm: float = 0.0):
    kind = synth.KINDS[_kind_for(style_name)]
    grid = synth.CaseGrid(np.array([-200.0, -200.0, 60.0]), SPACING, 60, (0, 59))
    centre = grid.points(np.array([[256, 256, 30]]))[0]
    lesion = synth.make_lesion(np.random.default_rng(seed), kind, centre, size_mm, synth.TissueStats(-100.0, 8.0),
                               kind.type_code, _style(style_name, kind.name, size_mm), edge_mm)
    return lesion, synth.rasterise(lesion, grid), grid


def _max_feret(mask: np.ndarray) -> float:
    points = np.argwhere(mask)[:, ::-1].astype(float)
    return float(np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1)).max())


@pytest.mark.parametrize("style", STYLES)
def test_recist_from_the_mask_of_every_style(style):
    lesion, placed, grid = _drawn(style)
    mask = placed.key_mask()
    points = measure_recist(mask, SPACING[:2]).reshape(4, 2)
    pixels, mm = diameters(points, SPACING[:2])
    assert abs(pixels[0] - _max_feret(mask)) <= 1.0  # long axis: the largest diameter of the mask
    long_vec, short_vec = points[1] - points[0], points[3] - points[2]
    assert abs(np.dot(long_vec, short_vec)) / (np.linalg.norm(long_vec) * np.linalg.norm(short_vec)) < 0.05
    assert 0 < pixels[1] <= pixels[0]
    for x, y in points:
        assert mask[round(y), round(x)]  # every end point on the lesion
    assert mm[0] <= 30.0 + 2 * SPACING[0]  # never beyond the nominal long axis (plus the soft edge)
    # nothing is drawn beyond the lesion's bound, which the placement relies on to keep lesions apart
    k, j, i = np.nonzero(placed.alpha)
    offsets = grid.points(np.stack([i, j, k], 1) + placed.first) - lesion.centre
    assert np.linalg.norm(offsets, axis=1).max() <= lesion.max_radius + 2 * SPACING[0] + SPACING[2] / 3


def _solidity(mask: np.ndarray) -> float:
    centres = np.argwhere(mask).astype(float)
    corners = (centres[:, None] + np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])).reshape(-1, 2)
    return mask.sum() / ConvexHull(corners).volume  # pixel area over its convex hull's area


def test_lobulated_and_spiculated_lesions_are_not_convex_blobs():
    solidity = {style: np.mean([_solidity(_drawn(style, seed=seed)[1].key_mask()) for seed in range(4)])
                for style in ("round", "lobulated", "spiculated")}
    assert solidity["round"] > 0.95
    assert solidity["lobulated"] < solidity["round"] - 0.02
    assert solidity["spiculated"] < solidity["round"] - 0.03


def test_each_style_has_the_hu_profile_it_promises():
    def centre_and_wall(style):
        lesion, placed, grid = _drawn(style, size_mm=40.0)
        key = placed.key_slice - placed.first[2]
        inside = placed.alpha[key] >= 0.99
        hu = placed.hu[key]
        k, j, i = np.nonzero(inside[None])
        points = grid.points(np.stack([i + placed.first[0], j + placed.first[1],
                                       np.full(len(i), placed.key_slice)], 1))
        depth = lesion.signed_distance(points)
        return lesion, hu[inside], depth

    lesion, hu, depth = centre_and_wall("rim")
    assert hu[depth < lesion.style.rim_mm * 0.8].mean() > hu[depth > lesion.style.rim_mm + 2].mean() + 20
    lesion, hu, depth = centre_and_wall("cavitating")
    assert hu[depth > 0.8 * depth.max()].mean() < -700  # air in the middle
    assert hu[depth < 1.0].mean() > -200  # a solid wall around it
    lesion, hu, depth = centre_and_wall("necrotic")
    assert hu[depth > 0.8 * depth.max()].mean() < hu[depth < 1.5].mean() - 15


def test_grain_follows_the_tissue_noise():
    rng = np.random.default_rng(0)
    volume = 40.0 + 12.0 * rng.standard_normal((30, 60, 60))
    volume[:, :, :20] = -100.0 + 12.0 * rng.standard_normal((30, 60, 20))  # an edge: the shell spans two tissues
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing((1.0, 1.0, 1.0))
    stats = synth.tissue_stats(image, np.array([30, 30, 15]), 6.0)
    assert stats.noise_sd_hu == pytest.approx(12.0, rel=0.12)  # the edge does not inflate the noise
    _, placed, _ = _drawn("round", size_mm=40.0)
    interior = placed.alpha >= 0.99
    smooth = _drawn("round", size_mm=40.0)[0]
    assert smooth.grain_sd == 8.0  # the tissue's noise, from TissueStats
    residual = placed.hu[interior] - np.clip(placed.hu[interior], -1e9, 1e9).mean()
    assert 5.0 < residual.std() < 20.0


def test_partial_volume_edge_is_as_wide_as_the_source_voxel():
    def ramp_pixels(edge_mm):
        _, placed, _ = _drawn("round", size_mm=30.0, edge_mm=edge_mm)
        key = placed.key_slice - placed.first[2]
        plane = placed.alpha[key]
        return int(((plane > 0.05) & (plane < 0.95)).sum())

    assert ramp_pixels(3.0) > 2 * ramp_pixels(0.0)  # a 3 mm source voxel blurs the edge over ~4 pixels


def test_deeplesion_reference_and_type_shares():
    from ctzoo.datasets.deeplesion.stats import DEEPLESION_TYPE_COUNTS, deeplesion_reference, type_shares

    published = deeplesion_reference()
    assert sum(DEEPLESION_TYPE_COUNTS.values()) == 4889 + 4927  # the typed lesions: val + test
    assert published["type_shares"]["lung"] == pytest.approx(2394 / 9816)
    assert published["long_axis_mm"] is None and published["median_long_axis_mm"] == 20.0
    shares = type_shares(["lung", "lung", "bone", "unknown"])
    assert shares["lung"] == pytest.approx(2 / 3) and shares["bone"] == pytest.approx(1 / 3)
    assert set(shares) == set(DEEPLESION_TYPE_COUNTS)
