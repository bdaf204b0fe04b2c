"""RECIST keypoints move with the image: checked against marks drawn into the image itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CenterSpatialCropd,
    Flipd,
    Rotated,
    SpatialCropd,
    SpatialPadd,
    Zoomd,
)

from ctzoo.datasets.deeplesion.recist import (
    LONG_A,
    LONG_B,
    SHORT_A,
    SHORT_B,
    box_from_points,
    canonical_order,
    diameters,
)
from ctzoo.datasets.keypoint_transforms import (
    invert_keypoints,
    keypoint_pipeline,
    recist_eval_transforms,
    recist_train_transforms,
)

H, W = 64, 80
# Three lesions, integer (x, y) points so single-pixel marks sit exactly on them; long_a, long_b, short_a,
# short_b, centre, already canonical. No axis is near vertical, so a rotation of <= 15 degrees cannot make
# the pair order ambiguous.
LESIONS = np.array([
    [[10, 20], [30, 30], [18, 29], [22, 21], [20, 25]],
    [[45, 38], [65, 48], [53, 47], [57, 39], [55, 43]],
    [[40, 18], [52, 6], [43, 9], [49, 15], [46, 12]],
], dtype=np.float64)


def marked_image(points: np.ndarray, sigma: float | None = None, affine=None) -> MetaTensor:
    """(N*5, H, W) image: channel 5n+k holds a mark (one pixel, or a Gaussian spot) at lesion n's point k."""
    flat = points.reshape(-1, 2)
    image = np.zeros((len(flat), H, W), np.float32)
    rows, cols = np.mgrid[0:H, 0:W]
    for channel, (x, y) in enumerate(flat):
        if sigma is None:
            image[channel, int(round(y)), int(round(x))] = 1.0
        else:
            image[channel] = np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2))
    return MetaTensor(torch.from_numpy(image), affine=affine)


def mark_positions(image: torch.Tensor, exact: bool) -> np.ndarray:
    """(N, 5, 2) (x, y) where each channel's mark is now: its argmax, or its intensity-weighted centroid.

    A mark that a crop or a rotation cut away (peak under half its height) gets NaN.
    """
    array = np.asarray(image.detach().cpu(), dtype=np.float64)
    positions = []
    for channel in array:
        if channel.max() < 0.5:
            positions.append((np.nan, np.nan))
        elif exact:
            row, col = np.unravel_index(np.argmax(channel), channel.shape)
            positions.append((col, row))
        else:
            weights = np.clip(channel, 0, None)
            rows, cols = np.mgrid[0 : channel.shape[0], 0 : channel.shape[1]]
            positions.append(((weights * cols).sum() / weights.sum(), (weights * rows).sum() / weights.sum()))
    return np.array(positions, dtype=np.float64).reshape(-1, 5, 2)


def sample(points=LESIONS, sigma=None, affine=None, **extra) -> dict:
    return {"image": marked_image(points, sigma, affine), "keypoints": torch.tensor(points, dtype=torch.float32),
            "lesion_ids": np.arange(len(points)), **extra}


def check_on_marks(out: dict, exact: bool, tolerance: float = 0.0, margin: float = 0.0) -> int:
    """Each kept lesion's keypoints sit on its own marks (pairs in canonical order); returns points checked."""
    kept = np.asarray(out["lesion_ids"])
    points = out["keypoints"].numpy().astype(np.float64)
    marks = canonical_order(mark_positions(out["image"], exact))[kept]
    h, w = out["image"].shape[-2:]
    visible = ((points[..., 0] >= margin) & (points[..., 0] <= w - 1 - margin)
               & (points[..., 1] >= margin) & (points[..., 1] <= h - 1 - margin) & ~np.isnan(marks[..., 0]))
    assert len(points) == len(kept)
    np.testing.assert_allclose(points[visible], marks[visible], atol=tolerance + 1e-4)
    return int(visible.sum())


def test_axis_order_pixel_content_follows_point():
    # A lone mark on pixel (row 5, col 17): after a crop and a flip, the point's new (x, y) indexes its pixel.
    points = np.array([[[17, 5], [30, 9], [22, 12], [24, 3], [23, 7]]], dtype=np.float64)
    pipeline = keypoint_pipeline([SpatialCropd(["image"], roi_start=(2, 10), roi_end=(40, 60)),
                                  Flipd(["image"], spatial_axis=1)], lesion_keys=["lesion_ids"])
    out = pipeline(sample(points))
    image = out["image"].numpy()
    for k in range(5):
        x, y = out["keypoints"][0, k].round().int().tolist()
        assert image[:, y, x].sum() == 1.0  # that pixel holds one of the marks
    # long_a (17, 5) -> crop -> (7, 3) -> flip over 50 columns -> (42, 3), now the right end: long_b.
    np.testing.assert_array_equal(out["keypoints"][0, LONG_B].numpy(), [42, 3])
    assert image[0, 3, 42] == 1.0


# An affine that swaps the axes and is left-handed must not matter: points live in the pixel frame.
SWAPPED = torch.tensor([[0.0, 0.7, 0, -90], [0.8, 0, 0, 40], [0, 0, 1, 3], [0, 0, 0, 1]], dtype=torch.float64)


@pytest.mark.parametrize("affine", [None, SWAPPED])
def test_flip_is_exact_and_keeps_canonical_order(affine):
    out = keypoint_pipeline([Flipd(["image"], spatial_axis=1)], lesion_keys=["lesion_ids"])(sample(affine=affine))
    assert check_on_marks(out, exact=True) == LESIONS.size // 2
    points = out["keypoints"].numpy()
    assert np.all(points[:, LONG_A, 0] < points[:, LONG_B, 0]) and np.all(points[:, SHORT_A, 0] < points[:, SHORT_B, 0])
    # Same anatomical spot: the old left end (mark channel 5n+0) is now the right end, long_b.
    marks = mark_positions(out["image"], exact=True)
    np.testing.assert_array_equal(points[:, LONG_B], marks[:, LONG_A])
    np.testing.assert_array_equal(points[:, LONG_A], marks[:, LONG_B])
    np.testing.assert_array_equal(points[:, :, 0], W - 1 - LESIONS[:, [1, 0, 3, 2, 4], 0])


def test_vertical_flip_keeps_left_right_pairs():
    out = keypoint_pipeline([Flipd(["image"], spatial_axis=0)], lesion_keys=["lesion_ids"])(sample())
    check_on_marks(out, exact=True)
    np.testing.assert_array_equal(out["keypoints"].numpy()[..., 1], H - 1 - LESIONS[..., 1])


@pytest.mark.parametrize("angle", [-0.26, 0.1, 0.26])
def test_rotation_follows_marks(angle):
    pipeline = keypoint_pipeline([Rotated(["image"], angle=angle, keep_size=True, padding_mode="zeros")],
                                 lesion_keys=["lesion_ids"])
    assert check_on_marks(pipeline(sample(sigma=1.5)), exact=False, tolerance=0.15, margin=5) >= 12


@pytest.mark.parametrize("zoom", [0.8, 1.17, 1.25])
def test_zoom_follows_marks(zoom):
    zoomd = Zoomd(["image"], zoom=zoom, keep_size=True, mode="bilinear", padding_mode="constant")
    pipeline = keypoint_pipeline([zoomd], lesion_keys=["lesion_ids"])
    assert check_on_marks(pipeline(sample(sigma=1.5)), exact=False, tolerance=0.15, margin=5) >= 10


def test_zoom_scales_box_pad():
    pipeline = keypoint_pipeline([Zoomd(["image"], zoom=2.0, keep_size=False)])
    out = pipeline(sample(boxes=torch.zeros(3, 4), diameters_px=np.zeros((3, 2))))
    points = out["keypoints"].numpy()
    np.testing.assert_allclose(points, 2 * LESIONS + 0.5, atol=1e-5)  # pixel centres: x' = 2 (x + 1/2) - 1/2
    np.testing.assert_allclose(out["boxes"].numpy(), box_from_points(points, pad=10.0), atol=1e-5)
    np.testing.assert_allclose(out["diameters_px"], 2 * diameters(LESIONS)[0], atol=1e-5)


# kept lesions, and how many of their points keep their mark (the others were cropped away)
@pytest.mark.parametrize("roi, kept, marked", [(((0, 0), (40, 50)), [0, 2], 9), (((10, 20), (64, 80)), [0, 1, 2], 11)])
def test_crop_and_pad_are_exact(roi, kept, marked):
    spatial = [SpatialCropd(["image"], roi_start=roi[0], roi_end=roi[1]), SpatialPadd(["image"], spatial_size=(70, 90))]
    out = keypoint_pipeline(spatial, lesion_keys=["lesion_ids"])(sample())
    assert out["image"].shape[-2:] == (70, 90)
    # L2's centre (55, 43) is cut off by the first crop; the pad that follows must not bring the lesion back.
    assert out["lesion_ids"].tolist() == kept
    assert check_on_marks(out, exact=True) == marked


def test_crop_drops_lesions_consistently():
    data = sample(boxes=torch.tensor(box_from_points(LESIONS, 5.0), dtype=torch.float32),
                  diameters_px=diameters(LESIONS)[0], names=["L1", "L2", "L3"])
    # Centred 32 x 32 crop keeps rows 16..47, columns 24..55: only L2's centre (55, 43) stays on the image.
    out = recist_eval_transforms((32, 32), lesion_keys=["lesion_ids", "names"])(data)
    assert out["keypoints"].shape == (1, 5, 2) and out["boxes"].shape == (1, 4) and out["diameters_px"].shape == (1, 2)
    assert out["names"] == ["L2"] and out["lesion_ids"].tolist() == [1]
    expected = LESIONS[1] - [24, 16]
    np.testing.assert_array_equal(out["keypoints"][0].numpy(), expected)
    np.testing.assert_array_equal(out["boxes"][0].numpy(), box_from_points(expected, 5.0))
    np.testing.assert_allclose(out["diameters_px"][0], diameters(LESIONS[1])[0])
    assert isinstance(out["diameters_px"], np.ndarray) and out["boxes"].dtype == torch.float32


def test_no_lesions():
    data = {"image": torch.rand(3, H, W), "keypoints": np.zeros((0, 5, 2)), "boxes": np.zeros((0, 4)),
            "diameters_px": np.zeros((0, 2))}
    out = recist_train_transforms((48, 48), seed=3)(data)
    assert out["image"].shape == (3, 48, 48)
    assert out["keypoints"].shape == (0, 5, 2) and out["boxes"].shape == (0, 4) and out["diameters_px"].shape == (0, 2)
    assert invert_keypoints(out, out["keypoints"]).shape == (0, 5, 2)


@pytest.mark.parametrize("seed", range(8))
def test_random_composite_follows_marks(seed):
    pipeline = recist_train_transforms((56, 72), rotate_prob=0.8, zoom_prob=0.8, intensity=False,
                                       lesion_keys=["lesion_ids"], seed=seed)
    out = pipeline(sample(sigma=1.5))
    assert out["image"].shape == (15, 56, 72)
    assert check_on_marks(out, exact=False, tolerance=0.15, margin=5) >= 8


def test_intensity_transforms_leave_keypoints_alone():
    kwargs = dict(spatial_size=(56, 72), rotate_prob=1.0, zoom_prob=1.0, seed=11)
    plain = recist_train_transforms(intensity=False, **kwargs)(sample(sigma=1.5))
    noisy_pipeline = recist_train_transforms(intensity=True, **kwargs)
    noisy_pipeline.transforms[-1].prob = noisy_pipeline.transforms[-2].prob = noisy_pipeline.transforms[-3].prob = 1.0
    noisy = noisy_pipeline(sample(sigma=1.5))
    assert not torch.allclose(plain["image"], noisy["image"])
    np.testing.assert_array_equal(plain["keypoints"].numpy(), noisy["keypoints"].numpy())
    # Intensity-only: no spatial change at all, the points come out exactly as they went in.
    still = recist_train_transforms((H, W), flip_prob=0.0, rotate_prob=0.0, zoom_prob=0.0, seed=1)(sample())
    np.testing.assert_array_equal(still["keypoints"].numpy(), LESIONS)


def deterministic_composite() -> list:
    keys = ["image"]
    return [Flipd(keys, spatial_axis=1), Rotated(keys, angle=math.radians(12), keep_size=True, padding_mode="zeros"),
            Zoomd(keys, zoom=1.15, keep_size=True, mode="bilinear", padding_mode="constant"),
            CenterSpatialCropd(keys, roi_size=(52, 70))]


@pytest.mark.parametrize("affine", [None, torch.diag(torch.tensor([0.7, 0.7, 2.5, 1.0], dtype=torch.float64))])
def test_transform_then_invert_returns_original_points(affine):
    pipeline = keypoint_pipeline(deterministic_composite(), lesion_keys=["lesion_ids"])
    out = pipeline(sample(sigma=1.5, affine=affine))
    kept = out["lesion_ids"]
    assert len(kept) >= 2
    assert check_on_marks(out, exact=False, tolerance=0.15, margin=5) >= 8
    back = invert_keypoints(out, out["keypoints"])
    assert isinstance(back, torch.Tensor) and back.shape == (len(kept), 5, 2)
    np.testing.assert_allclose(back.numpy(), LESIONS[kept], atol=1e-3)

    # Compose.inverse undoes the image geometry: original shape and affine, marks back on the original points.
    restored = pipeline.inverse(out)
    assert restored["image"].shape == (15, H, W)
    original_affine = torch.eye(4, dtype=torch.float64) if affine is None else affine
    torch.testing.assert_close(restored["image"].affine, original_affine, atol=1e-4, rtol=0)  # float32 inside
    marks = mark_positions(restored["image"], exact=False)[kept]
    # Marks the crop cut into stay cut; compare those that were >= 5 px inside the transformed image.
    moved, (h, w) = mark_positions(out["image"], exact=False)[kept], out["image"].shape[-2:]  # channel order
    survived = (moved.min(-1) >= 5) & (moved[..., 0] <= w - 6) & (moved[..., 1] <= h - 6)
    assert survived.sum() >= 8
    np.testing.assert_allclose(marks[survived], LESIONS[kept][survived], atol=0.1)
    np.testing.assert_allclose(invert_keypoints(restored, back), LESIONS[kept], atol=1e-3)


def test_random_transforms_invert():
    pipeline = recist_train_transforms((56, 72), rotate_prob=1.0, zoom_prob=1.0, lesion_keys=["lesion_ids"], seed=5)
    out = pipeline(sample())
    np.testing.assert_allclose(invert_keypoints(out, out["keypoints"]).numpy(), LESIONS[out["lesion_ids"]], atol=1e-3)
    assert pipeline.inverse(out)["image"].shape == (15, H, W)


def test_seed_makes_pipeline_reproducible():
    a = recist_train_transforms((56, 72), seed=7)(sample(sigma=1.5))
    b = recist_train_transforms((56, 72), seed=7)(sample(sigma=1.5))
    torch.testing.assert_close(a["image"], b["image"])
    np.testing.assert_array_equal(a["keypoints"].numpy(), b["keypoints"].numpy())


@pytest.mark.parametrize("seed", range(6))
def test_lesion_crop_keeps_a_lesion_and_its_marks(seed):
    """With lesion_crop_prob=1 a small crop of the slice always holds a lesion, whose points sit on their marks."""
    pipeline = recist_train_transforms((24, 24), rotate_prob=0.0, zoom_prob=0.0, intensity=False,
                                       lesion_keys=["lesion_ids"], seed=seed, lesion_crop_prob=1.0)
    out = pipeline(sample())
    assert out["image"].shape[-2:] == (24, 24) and len(out["lesion_ids"]) >= 1
    check_on_marks(out, exact=True)
    uniform = recist_train_transforms((24, 24), rotate_prob=0.0, zoom_prob=0.0, intensity=False,
                                      lesion_keys=["lesion_ids"], seed=seed, lesion_crop_prob=0.0)
    assert uniform(sample())["image"].shape[-2:] == (24, 24)
