"""``augment: {resample_on: device}``: RECIST-Net's augmentation drawn in the loader and resampled per batch on the
device. Keypoints are checked against marks drawn into the image itself, as for the loader mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from test_keypoint_transforms import LESIONS, mark_positions, marked_image

from ctzoo.datasets.batch_augment import RandWindowd, augment_batch, recist_batch_train_transforms, scaled_windows
from ctzoo.datasets.deeplesion.dataset import (
    SlicePreprocessing,
    collate_lesions,
    resample_and_window,
    resampled_size,
)
from ctzoo.datasets.deeplesion.recist import canonical_order

OUT = (48, 40)  # (H, W) of the augmented output, smaller than the 64 x 80 marked image


def augmented(seed: int, transform: RandWindowd | None = None, sigma: float | None = 1.5,
              points: np.ndarray = LESIONS) -> tuple[dict, torch.Tensor]:
    """One marked sample through both halves: (the loader's sample, the device's (C, *OUT) image)."""
    transform = transform or RandWindowd(OUT, intensity=False, lesion_keys=["lesion_ids"])
    transform.set_random_state(seed)
    sample = {"image": marked_image(points, sigma), "keypoints": torch.tensor(points, dtype=torch.float32),
              "lesion_ids": np.arange(len(points)), "boxes": torch.zeros(len(points), 4), "scale": 1.0}
    out = transform(sample)
    return out, augment_batch(collate_lesions([out]), OUT, "cpu")[0]


#: One window that maps [0, 1] onto itself: the marked images read as HU stay as they are.
IDENTITY_WINDOW = SlicePreprocessing(window_hu=(0.0, 1.0))


def hu_sample(points: np.ndarray, scale: float, sigma: float | None = 1.5, spacing_mm: float = 0.8) -> dict:
    """A marked image as :class:`LoadDeepLesiond` with ``resample=False`` gives it: the planes at the original pixel
    size, the points in the frame resampled by ``scale`` (pixel centres: x -> (x + 0.5) s - 0.5)."""
    image = marked_image(points, sigma).as_tensor()
    cfg = SlicePreprocessing(norm_spacing_mm=spacing_mm / scale)
    size, scale_xy = resampled_size(tuple(image.shape[-2:]), (spacing_mm, spacing_mm), cfg)
    return {"image": image, "keypoints": torch.tensor((points + 0.5) * scale_xy - 0.5, dtype=torch.float32),
            "lesion_ids": np.arange(len(points)), "resampled_hw": size, "scale_xy": torch.as_tensor(scale_xy)}


def test_the_window_is_what_the_drawn_output_covers():
    """The loader copies only the pixels under this draw's output and their bilinear neighbours: as many as the
    output has when it is unrotated and unzoomed (a whole-pixel shift), about 1 / zoom as many along each side
    when it is zoomed out."""
    plain = RandWindowd(OUT, flip_prob=0.0, rotate_range_deg=0.0, scale_range=(1.0, 1.0), intensity=False)
    zoomed = RandWindowd(OUT, flip_prob=0.0, rotate_range_deg=0.0, scale_range=(0.8, 0.8), intensity=False)
    zoomed.zoom_prob = 1.0
    sample = {"image": marked_image(LESIONS), "keypoints": torch.tensor(LESIONS, dtype=torch.float32)}
    plain.set_random_state(0)
    zoomed.set_random_state(0)
    assert tuple(plain(sample)["image"].shape[-2:]) == OUT
    height, width = zoomed(sample)["image"].shape[-2:]  # the footprint's ends, floored and ceiled
    assert (OUT[0] - 1) / 0.8 + 1 <= height <= (OUT[0] - 1) / 0.8 + 2
    assert (OUT[1] - 1) / 0.8 + 1 <= width <= (OUT[1] - 1) / 0.8 + 2


def test_one_pass_per_window_equals_monais_windowing_then_the_intensity_change():
    from ctzoo.datasets.deeplesion.dataset import window_planes

    cfg = SlicePreprocessing(extra_windows_hu=[(-160, 240), (-1350, 150)])
    hu = torch.randn(4, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 1500
    factor = torch.tensor([1.0, 0.9, 1.1, 1.05])[:, None, None, None]
    offset = torch.tensor([0.0, 0.02, -0.05, 0.01])[:, None, None, None]
    torch.testing.assert_close(scaled_windows(hu + 1350, cfg, -1350.0, factor, offset),
                               torch.stack([window_planes(one, cfg) for one in hu]) * factor + offset, atol=1e-6,
                               rtol=0)


@pytest.mark.parametrize("seed", range(12))
def test_keypoints_land_on_their_marks(seed):
    # flips, rotations up to 15 degrees, zooms of 0.8-1.2 and lesion crops, all composed into one resample
    out, image = augmented(seed)
    kept = np.asarray(out["lesion_ids"])
    points = out["keypoints"].numpy().astype(np.float64)
    marks = canonical_order(mark_positions(image, exact=False))[kept]
    # Gaussian spots (sigma 1.5 px) cut by the border move their centroid: points 4 px inside only
    inside = ((points[..., 0] >= 4) & (points[..., 0] <= OUT[1] - 5) & (points[..., 1] >= 4)
              & (points[..., 1] <= OUT[0] - 5) & ~np.isnan(marks[..., 0]))
    assert image.shape == (len(LESIONS) * 5, *OUT) and len(points) == len(kept)
    np.testing.assert_allclose(points[inside], marks[inside], atol=0.1)
    centres = points[:, 4]
    assert np.all((centres >= -0.5) & (centres < np.array(OUT[::-1]) - 0.5))  # kept: centre on the output


@pytest.mark.parametrize("scale", [1.3, 0.85])
@pytest.mark.parametrize("seed", range(6))
def test_from_hu_planes_the_keypoints_land_on_their_marks_through_the_spacing_resample(seed, scale):
    # the spacing resample (up and down), flips, rotations, zooms and the crop in one grid_sample of the planes
    transform = RandWindowd(OUT, intensity=False, lesion_keys=["lesion_ids"], hu_fill=0.0)
    transform.set_random_state(seed)
    out = transform(hu_sample(LESIONS, scale))
    assert out["image"].shape[-2:] != OUT  # cut at the original pixel size
    image = augment_batch(collate_lesions([out]), OUT, "cpu", IDENTITY_WINDOW)[0]
    points = out["keypoints"].numpy().astype(np.float64)
    marks = canonical_order(mark_positions(image, exact=False))[np.asarray(out["lesion_ids"])]
    inside = ((points[..., 0] >= 4) & (points[..., 0] <= OUT[1] - 5) & (points[..., 1] >= 4)
              & (points[..., 1] <= OUT[0] - 5) & ~np.isnan(marks[..., 0]))
    assert inside.any()
    np.testing.assert_allclose(points[inside], marks[inside], atol=0.15)


def test_from_hu_planes_an_unaugmented_sample_is_the_loaders_resampled_and_windowed_crop():
    """Upsampled by the spacing, with values inside every window: the device's one resample and windowing give
    what the loader's Resize and ScaleIntensityRange give (only the order of the two differs)."""
    generator = torch.Generator().manual_seed(0)
    smooth = F.avg_pool2d(torch.rand(3, 1, 72, 88, generator=generator), 9, 1)[:, 0]  # (3, 64, 80)
    hu = -900 + 3800 * smooth
    cfg = SlicePreprocessing(norm_spacing_mm=0.7)  # (-1024, 3071): every value inside the window
    size, scale_xy = resampled_size((64, 80), (0.8, 0.8), cfg)
    sample = {"image": hu, "keypoints": torch.tensor([[[30.0, 30], [50, 30], [40, 25], [40, 35], [40, 30]]]),
              "resampled_hw": size, "scale_xy": torch.as_tensor(scale_xy)}
    transform = RandWindowd(OUT, flip_prob=0.0, rotate_range_deg=0.0, scale_range=(1.0, 1.0), intensity=False,
                            hu_fill=-1024.0)
    transform.set_random_state(1)
    out = transform(sample)
    image = augment_batch(collate_lesions([out]), OUT, "cpu", cfg)[0]
    expected, _ = resample_and_window(hu.numpy(), (0.8, 0.8), cfg)
    dx, dy = (out["keypoints"][0, 4] - sample["keypoints"][0, 4]).round().int().tolist()
    assert expected.shape[-2:] == size and (out["keypoints"][0] - sample["keypoints"][0] - torch.tensor(
        [dx, dy])).abs().max() < 1e-4  # a whole-pixel shift
    crop = expected[:, -dy:-dy + OUT[0], -dx:-dx + OUT[1]]
    torch.testing.assert_close(image[:, 1:-1, 1:-1], crop[:, 1:-1, 1:-1], atol=2e-5, rtol=0)


def test_an_item_with_a_focus_is_cropped_around_it():
    """A mined hard negative's crop stays in the box around its false detection, as CropToFocusd kept it."""
    rows, cols = torch.meshgrid(torch.arange(300.0), torch.arange(400.0), indexing="ij")
    sample = {"image": torch.stack([cols, rows]), "keypoints": torch.zeros(0, 5, 2), "focus": np.array([40.0, 330.0])}
    transform = RandWindowd(OUT, intensity=False, focus_size=(80, 72))
    for seed in range(20):
        transform.set_random_state(seed)
        out = transform(sample)
        assert "focus" not in out
        centre_x, centre_y = augment_batch(collate_lesions([out]), OUT, "cpu")[0][:, OUT[0] // 2, OUT[1] // 2]
        assert 330 - 36 <= centre_x <= 330 + 36 and 0 <= centre_y <= 80  # the box, kept on the slice at its top
    with pytest.raises(ValueError, match="focus_size"):
        RandWindowd(OUT)(sample)


def test_an_unrotated_unzoomed_sample_is_a_copy_of_the_slice():
    transform = RandWindowd(OUT, flip_prob=0.0, rotate_range_deg=0.0, scale_range=(1.0, 1.0), intensity=False,
                            lesion_keys=["lesion_ids"])
    out, image = augmented(3, transform, sigma=None)
    source = marked_image(LESIONS).as_tensor()
    shift = (out["keypoints"].numpy() - LESIONS[np.asarray(out["lesion_ids"])]).reshape(-1, 2)
    dx, dy = shift[0]
    assert np.allclose(shift, shift[0]) and float(dx).is_integer() and float(dy).is_integer()
    # output pixel (x, y) shows slice pixel (x - dx, y - dy): the crop, with zeros beyond the slice
    expected = torch.zeros_like(image)
    rows, cols = torch.meshgrid(torch.arange(OUT[0]), torch.arange(OUT[1]), indexing="ij")
    src_rows, src_cols = rows - int(dy), cols - int(dx)
    on = (src_rows >= 0) & (src_rows < source.shape[1]) & (src_cols >= 0) & (src_cols < source.shape[2])
    expected[:, on] = source[:, src_rows[on], src_cols[on]]
    torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)


def test_flip_alone_mirrors_and_keeps_pairs_canonical():
    transform = RandWindowd(OUT, flip_prob=1.0, rotate_range_deg=0.0, scale_range=(1.0, 1.0), intensity=False,
                            lesion_keys=["lesion_ids"])
    out, image = augmented(5, transform, sigma=None)
    points = out["keypoints"].numpy()
    np.testing.assert_array_equal(points, canonical_order(points))
    marks = canonical_order(mark_positions(image, exact=True))[np.asarray(out["lesion_ids"])]
    whole = ~np.isnan(marks[..., 0]).any(axis=1)  # lesions with every mark on the output: pairs comparable
    assert whole.any()
    np.testing.assert_allclose(points[whole], marks[whole], atol=1e-4)


def test_boxes_and_diameters_follow_the_zoom():
    transform = RandWindowd(OUT, flip_prob=0.0, rotate_range_deg=0.0, scale_range=(1.2, 1.2), intensity=False,
                            lesion_keys=["lesion_ids"])
    transform.zoom_prob = 1.0
    sample = {"image": marked_image(LESIONS[:1]), "keypoints": torch.tensor(LESIONS[:1], dtype=torch.float32),
              "lesion_ids": np.arange(1), "boxes": torch.zeros(1, 4), "diameters_px": torch.zeros(1, 2),
              "scale": 2.0}
    transform.set_random_state(0)
    out = transform(sample)
    long_before = np.linalg.norm(LESIONS[0, 1] - LESIONS[0, 0])
    assert out["diameters_px"][0, 0].item() == pytest.approx(1.2 * long_before, rel=1e-5)
    points = out["keypoints"][0, :4].numpy()
    box = out["boxes"][0].numpy()
    pad = 5.0 * 2.0 * 1.2  # DeepLesion's 5 original px, times the loader's scale and the zoom
    np.testing.assert_allclose(box, [points[:, 0].min() - pad, points[:, 1].min() - pad,
                                     points[:, 0].max() + pad, points[:, 1].max() + pad], atol=1e-4)


def test_intensity_draws_are_applied_on_the_device_from_the_loaders_seed():
    transform = recist_batch_train_transforms(OUT, flip_prob=0.0, rotate_range_deg=0.0, scale_range=(1.0, 1.0))
    window = transform.transforms[0]
    sample = {"image": torch.full((2, 64, 80), 0.5), "keypoints": torch.zeros(0, 5, 2)}
    draws = []
    for seed in range(40):
        transform.set_random_state(seed=seed)
        out = transform(sample)
        factor, offset, sigma = out["intensity"].tolist()
        image = augment_batch(collate_lesions([out, out]), OUT, "cpu")
        torch.testing.assert_close(image[0], image[1])  # the noise comes from the sample's own seed
        centre = image[0][:, 8:-8, 8:-8]
        assert centre.mean().item() == pytest.approx(0.5 * factor + offset, abs=3 * sigma + 1e-6)
        if sigma == 0:
            torch.testing.assert_close(centre, torch.full_like(centre, 0.5 * factor + offset))
        else:
            assert centre.std().item() == pytest.approx(sigma, rel=0.2)
        draws.append((factor, offset, sigma))
    factors, offsets, sigmas = np.array(draws).T
    assert np.all(np.abs(factors - 1) <= 0.1) and np.all(np.abs(offsets) <= 0.05) and np.all(sigmas <= 0.01)
    assert 0 < np.mean(factors != 1) < 1 and 0 < np.mean(sigmas > 0) < 0.5 and window.intensity


def test_a_lesion_far_out_of_the_crop_is_dropped_with_its_per_lesion_keys():
    transform = RandWindowd((16, 16), flip_prob=0.0, rotate_range_deg=0.0, scale_range=(1.0, 1.0), intensity=False,
                            lesion_prob=1.0, jitter=0.0, lesion_keys=["lesion_ids"])
    for seed in range(6):
        transform.set_random_state(seed)
        out = transform({"image": marked_image(LESIONS), "keypoints": torch.tensor(LESIONS, dtype=torch.float32),
                         "lesion_ids": np.arange(3)})
        assert len(out["lesion_ids"]) == len(out["keypoints"]) == 1  # the lesions are 25+ px apart
        assert np.allclose(out["keypoints"][0, 4].numpy(), [7.5, 7.5], atol=0.5)  # centred, no jitter


def test_a_training_step_and_a_fit_run_on_device_augmented_batches(small_deeplesion_mini, tmp_path):
    from click.testing import CliRunner

    from ctzoo.cli import main
    from ctzoo.training.recistnet_task import RecistNetTask, load_train_config

    config = {"task": "recistnet", "data": {"root": str(small_deeplesion_mini), "negatives_per_series": 1},
              "model": {"backbone": "light", "width": 8, "head_channels": 16},
              "optim": {"epochs": 2, "batch_size": 4, "lr": 0.004, "num_workers": 1, "eval_every": 1},
              "augment": {"resample_on": "device"}, "train_size": [128, 128], "eval_size": [512, 512]}
    path = tmp_path / "device.yaml"
    path.write_text(yaml.safe_dump(config))
    task = RecistNetTask(load_train_config(path))
    batch = next(iter(task.train_batches(7, 4, 0, 0, 1)))
    again = next(iter(task.train_batches(7, 4, 0, 0, 1)))
    # HU planes at the original pixel size: the window's size follows each slice's spacing
    assert batch["image"].shape[1] == 3 and batch["image"].shape[-1] >= 128 / max(s.max() for s in batch["scale_xy"])
    images = augment_batch(batch, (128, 128), "cpu", task.cfg.data)
    torch.testing.assert_close(images, augment_batch(again, (128, 128), "cpu", task.cfg.data))  # seeded per item
    assert images.shape == (4, 3, 128, 128) and torch.isfinite(images).all()
    loss, parts = task.loss(task.build_model(), batch, torch.device("cpu"))
    assert torch.isfinite(loss) and loss.item() > 0
    result = CliRunner().invoke(main, ["train", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    history = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["history"]
    assert len(history) == 2 and all(math.isfinite(h["train_loss"]) for h in history)


def test_a_draw_leaves_the_cached_sample_as_it_was():
    # the in-memory cache hands RandWindowd its cached sample itself (copy_cache=False), so a draw must not write
    # into it
    import copy

    transform = RandWindowd(OUT, lesion_keys=["lesion_ids"])
    sample = {"image": marked_image(LESIONS, 1.5), "keypoints": torch.tensor(LESIONS, dtype=torch.float32),
              "lesion_ids": np.arange(3), "boxes": torch.ones(3, 4), "diameters_px": torch.ones(3, 2), "scale": 1.0}
    before = copy.deepcopy(sample)
    for seed in range(8):
        transform.set_random_state(seed)
        transform(sample)
    for key, value in before.items():
        assert np.array_equal(np.asarray(sample[key]), np.asarray(value)), key
