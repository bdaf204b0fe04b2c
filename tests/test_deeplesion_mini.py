"""make-deeplesion-mini: DeepLesion's on-disk layout, RECIST that agrees with the lesion masks, lesion HU,
determinism, the split by patient, measure_recist on hand-computed shapes, and the CLI."""

import hashlib
import json
import math
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage

from ctzoo.cli import main
from ctzoo.datasets.deeplesion.info_csv import COLUMNS, read_dl_info
from ctzoo.datasets.deeplesion.measure import measure_recist
from ctzoo.datasets.deeplesion.mini import make_deeplesion_mini
from ctzoo.datasets.deeplesion.png_slices import read_png_hu, slice_path


@pytest.fixture(scope="module")
def sample_folder(fetched_samples):
    return fetched_samples


@pytest.fixture(scope="module")
def mini(sample_folder, tmp_path_factory):
    return make_deeplesion_mini(tmp_path_factory.mktemp("dl") / "mini", cases=4, seed=0, progress=False)


@pytest.fixture(scope="module")
def rows(mini):
    return read_dl_info(mini / "DL_info.csv")


@pytest.fixture(scope="module")
def truth(mini, rows):
    records = json.loads((mini / "lesions.json").read_text())
    assert [r["file_name"] for r in records["lesions"]] == [row.file_name for row in rows]
    return records


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def _umask_mode():
    """The mode a new folder gets under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _max_feret_brute_force(mask):
    points = np.argwhere(mask)[:, ::-1].astype(float)
    best = 0.0
    for start in range(0, len(points), 512):
        chunk = points[start:start + 512]
        best = max(best, float(np.sqrt(((chunk[:, None] - points[None]) ** 2).sum(-1).max())))
    return best


def test_layout_is_deeplesions(mini, rows, truth):
    assert (mini / "DL_info.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    assert len(rows) >= 4 and {"Images_png", "masks", "lesions.json", "NOTICE.md", "LICENSE"} <= {
        p.name for p in mini.iterdir()}
    assert "TotalSegmentator 2.18.0" in (mini / "NOTICE.md").read_text()
    assert [p.name for p in mini.parent.iterdir()] == [mini.name]  # no staging folder left, hidden or not
    assert _mode(mini) == _umask_mode()  # not mkdtemp's private 0700
    images = mini / "Images_png"
    expected = set()
    slices = {s["folder"]: s["slices"] for s in truth["series"]}
    for row in rows:
        patient, study, series, key = row.file_name[:-4].split("_")
        assert (int(patient), int(study), int(series), int(key)) == (
            row.patient_index, row.study_index, row.series_id, row.key_slice_index)
        assert (images / row.key_slice_path).exists() and row.image_size == (512, 512)
        low, high = row.slice_range
        assert low <= row.key_slice_index <= high
        dz = row.spacing_mm_px[2]  # about +-30 mm of context, clipped to the series
        assert low == 1 or (row.key_slice_index - low) * dz >= 30 - dz / 2
        assert high == slices[row.series_folder] or (high - row.key_slice_index) * dz >= 30 - dz / 2
        expected |= {slice_path(images, row.series_folder, k) for k in range(low, high + 1)}
    written = set(images.rglob("*.png"))
    assert written == expected  # every Slice_range slice, nothing else (DeepLesion ships only those)
    for path in written:
        with Image.open(path) as image:
            assert image.mode in ("I;16", "I;16B") and image.size == (512, 512)
    series = truth["series"]
    assert any(set(s["written_slices"]) - set(s["lesion_slices"]) for s in series)  # negatives exist
    assert any(s["small_lesions_only"] for s in series)


def test_recist_agrees_with_the_masks(mini, rows, truth):
    for row, lesion in zip(rows, truth["lesions"]):
        with Image.open(mini / lesion["mask_file"]) as image:
            mask = np.asarray(image) > 0
        assert lesion["mask_file"].startswith(f"masks/{row.series_folder}/{row.key_slice_index:03d}_")
        points = np.asarray(row.measurement_coordinates).reshape(4, 2) - 1
        long_vec, short_vec = points[1] - points[0], points[3] - points[2]
        long_len, short_len = np.linalg.norm(long_vec), np.linalg.norm(short_vec)
        assert abs(long_len - _max_feret_brute_force(mask)) <= 1.0, row.file_name
        assert abs(np.dot(long_vec, short_vec)) / (long_len * short_len) < 0.05
        assert 0 < short_len <= long_len + 1e-9
        assert np.allclose(row.lesion_diameters_px, (long_len, short_len), atol=1e-3)
        for x, y in points[:2]:
            assert mask[round(y), round(x)]  # long-axis ends are mask pixel centres
        box = np.asarray(row.bounding_box) - 1
        assert np.allclose(box, [*(points.min(0) - 5), *(points.max(0) + 5)], atol=2e-3)
        cy, cx = np.argwhere(mask).mean(axis=0)
        assert box[0] <= cx <= box[2] and box[1] <= cy <= box[3]
        assert 5.0 <= long_len * row.spacing_mm_px[0] <= 150.0
        assert 0.7 <= row.spacing_mm_px[0] == row.spacing_mm_px[1] <= 0.95


def test_miniature_round_trips_through_the_loader(mini, rows, truth):
    """The training loader reads the miniature: every key slice once, every lesion's centre on its mask."""
    from ctzoo.datasets.deeplesion.dataset import (
        DeepLesionConfig,
        deeplesion_dataloader,
        deeplesion_dataset,
    )
    from ctzoo.datasets.keypoint_transforms import recist_eval_transforms

    cfg = DeepLesionConfig(root=mini, norm_spacing_mm=None, negatives_per_series=1)
    dataset = deeplesion_dataset(cfg, "all")
    positives = [dataset[i] for i in range(len(dataset)) if len(dataset[i]["keypoints"])]
    assert sorted(s["file_name"] for s in positives) == sorted({r.file_name for r in rows})
    assert len(dataset) > len(positives)  # lesion-free negatives too
    masks = {}
    for row, lesion in zip(rows, truth["lesions"]):
        with Image.open(mini / lesion["mask_file"]) as image:
            masks.setdefault(row.file_name, []).append(np.asarray(image) > 0)
    for sample in positives:
        assert sample["image"].shape == (3, 512, 512)
        for points in sample["keypoints"].numpy():
            x, y = points[4]
            assert any(mask[round(y), round(x)] for mask in masks[sample["file_name"]])
    resampled = deeplesion_dataset(DeepLesionConfig(root=mini), "train", transform=recist_eval_transforms((512, 512)))
    batch = next(iter(deeplesion_dataloader(resampled, batch_size=2, num_workers=0, shuffle=False)))
    assert batch["image"].shape == (2, 3, 512, 512)
    assert float(batch["spacing_mm"][0][0]) == pytest.approx(0.8, abs=0.01)


def test_lesion_hu_is_in_range_and_stands_out(mini, rows, truth):
    for row, lesion in zip(rows, truth["lesions"]):
        hu = read_png_hu(mini / "Images_png" / row.key_slice_path)
        with Image.open(mini / lesion["mask_file"]) as image:
            mask = np.asarray(image) > 0
        interior = ndimage.binary_erosion(mask, np.ones((3, 3)))
        assert interior.sum() >= 4
        low, high = lesion["hu_range"]
        mean = float(hu[interior].mean())
        # grain correlated over a source voxel moves a small lesion's mean by up to about its sd
        slack = 5 + 2 * lesion["grain_sd_hu"]
        if lesion["style"] not in ("rim", "necrotic", "cavitating"):  # a wall or core moves the mean by design
            assert low - slack <= mean <= high + slack, (row.file_name, lesion["kind"], mean)
        ring = ndimage.binary_dilation(mask, np.ones((9, 9))) & ~ndimage.binary_dilation(mask, np.ones((3, 3)))
        assert abs(mean - float(np.median(hu[ring]))) >= 10, (row.file_name, lesion["kind"])
        assert lesion["volume_mm3"] > 0 and lesion["organ"]
    assert hu.min() >= -1024 and (hu == -1024).any()  # padded outside the scan


def test_same_seed_same_bytes_other_seed_differs(mini, tmp_path):
    """Same seed, same bytes, also when the cases are built by two processes (``mini`` was built serially)."""
    again = make_deeplesion_mini(tmp_path / "again", cases=4, seed=0, progress=False, workers=2)
    assert _digests(again) == _digests(mini)
    other = _digests(make_deeplesion_mini(tmp_path / "other", cases=2, seed=1, progress=False))
    assert other["DL_info.csv"] != _digests(mini)["DL_info.csv"]
    pngs = {v for k, v in other.items() if k.startswith("Images_png")}
    assert pngs.isdisjoint(v for k, v in _digests(mini).items() if k.startswith("Images_png"))


def test_split_by_patient_and_types(rows, truth):
    splits = {}
    for row in rows:
        splits.setdefault(row.patient_index, set()).add(row.train_val_test)
    assert all(len(s) == 1 for s in splits.values())
    assert set().union(*splits.values()) == {1, 2, 3}
    for row, lesion in zip(rows, truth["lesions"]):
        assert 1 <= lesion["type"] <= 8
        assert row.coarse_lesion_type == (-1 if row.train_val_test == 1 else lesion["type"])
        assert not row.possibly_noisy and row.patient_gender in ("M", "F") and 18 <= row.patient_age <= 90
        assert all(0 <= v <= 1 for v in row.normalized_lesion_location)
        if lesion["type"] == 5:
            assert row.dicom_windows == (-1350, 150)


def test_held_out_scan_is_the_whole_test_split_and_nothing_else(mini, tmp_path):
    """--test-source: every test case, and no train or val case, comes from the held-out scan (so no source slice
    of it is trained on); re-splitting a built miniature gives the same files as a fresh build."""
    fresh = make_deeplesion_mini(tmp_path / "fresh", cases=4, seed=0, progress=False, test_source="aorta_example_ct")
    summary = json.loads((fresh / "lesions.json").read_text())
    assert summary["test_source"] == "aorta_example_ct.nii.gz"
    by_split = {}
    for series in summary["series"]:
        by_split.setdefault(series["split"], set()).add(series["source"])
    assert by_split["test"] == {"aorta_example_ct.nii.gz"}
    assert "aorta_example_ct.nii.gz" not in by_split["train"] | by_split["val"]
    held_slices = {s for series in summary["series"] if series["split"] == "test"
                   for s in range(series["source_slices"][0], series["source_slices"][1] + 1)}
    assert held_slices
    seen = [series for series in summary["series"] if series["split"] != "test"]
    assert all(series["source"] != "aorta_example_ct.nii.gz" for series in seen)
    rows = read_dl_info(fresh / "DL_info.csv")
    assert {row.train_val_test for row in rows} == {1, 2, 3}
    assert all(row.coarse_lesion_type == -1 for row in rows if row.train_val_test == 1)
    assert "Held-out source" in (fresh / "NOTICE.md").read_text()
    # the same cases and images as the plain build: only the splits moved
    assert {k: v for k, v in _digests(fresh).items() if k.startswith("Images_png")} == \
        {k: v for k, v in _digests(mini).items() if k.startswith("Images_png")}
    resplit = CliRunner().invoke(main, ["data", "make-deeplesion-mini", str(tmp_path / "resplit"), "--test-source",
                                        "aorta_example_ct", "--from", str(mini)])
    assert resplit.exit_code == 0, resplit.output
    assert _digests(tmp_path / "resplit") == _digests(fresh)
    assert _mode(tmp_path / "resplit") == _umask_mode() == _mode(fresh)
    refused = CliRunner().invoke(main, ["data", "make-deeplesion-mini", str(tmp_path / "again"), "--test-source",
                                        "sample_ct", "--from", str(fresh)])
    assert refused.exit_code != 0 and "already holds out" in refused.output


def _ordered_lengths(points, spacing=(1.0, 1.0)):
    p = points.reshape(4, 2) * spacing
    return np.linalg.norm(p[1] - p[0]), np.linalg.norm(p[3] - p[2]), p


def test_measure_recist_rectangle():
    mask = np.zeros((40, 50), bool)
    mask[5:16, 10:31] = True  # pixel centres span x 10..30, y 5..15
    long, short, p = _ordered_lengths(measure_recist(mask))
    assert long == pytest.approx(math.hypot(20, 10))  # the diagonal
    assert {tuple(p[0]), tuple(p[1])} in ({(10, 5), (30, 15)}, {(10, 15), (30, 5)})
    # longest chord perpendicular to a 20 x 10 diagonal: top edge to bottom edge, 10 / cos(atan(1/2)) = 5 sqrt(5)
    assert short == pytest.approx(5 * math.sqrt(5), abs=0.01)
    assert abs(np.dot(p[1] - p[0], p[3] - p[2])) < 1e-6


def test_measure_recist_anisotropic_spacing_measures_in_mm():
    mask = np.zeros((40, 100), bool)
    mask[5:16, 10:51] = True  # 40 px x 0.5 mm = 20 mm wide, 10 px x 1 mm = 10 mm tall
    long, short, p = _ordered_lengths(measure_recist(mask, (0.5, 1.0)), (0.5, 1.0))
    assert long == pytest.approx(math.hypot(20, 10)) and short == pytest.approx(5 * math.sqrt(5), abs=0.01)
    assert abs(np.dot(p[1] - p[0], p[3] - p[2])) < 1e-6  # perpendicular in mm, not in pixels


def test_measure_recist_rotated_ellipse():
    y, x = np.mgrid[:128, :128]
    angle = math.radians(30)
    u = (x - 64.3) * math.cos(angle) + (y - 63.7) * math.sin(angle)
    v = -(x - 64.3) * math.sin(angle) + (y - 63.7) * math.cos(angle)
    long, short, p = _ordered_lengths(measure_recist((u / 30) ** 2 + (v / 12) ** 2 <= 1))
    assert 59 <= long <= 60 and 22.5 <= short <= 24  # 2a = 60, 2b = 24, between pixel centres
    direction = math.degrees(math.atan2(*(p[1] - p[0])[::-1])) % 180
    assert abs(direction - 30) < 2.5


def test_measure_recist_disc_and_degenerate():
    y, x = np.mgrid[:100, :100]
    long, short, p = _ordered_lengths(measure_recist((x - 50) ** 2 + (y - 49) ** 2 <= 15 ** 2))
    assert long == pytest.approx(30, abs=0.01) and short == pytest.approx(30, abs=1.0)
    one = np.zeros((5, 5), bool)
    one[2, 3] = True
    assert np.array_equal(measure_recist(one), [3, 2] * 4)
    with pytest.raises(ValueError):
        measure_recist(np.zeros((5, 5), bool))


def test_cli_writes_and_refuses_a_non_empty_out(sample_folder, tmp_path):
    out = tmp_path / "cli"
    args = ["data", "make-deeplesion-mini", str(out), "--cases", "1", "--seed", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "1 series" in result.output and read_dl_info(out / "DL_info.csv")
    stamp = (out / "DL_info.csv").stat().st_mtime_ns
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code != 0 and "--force" in refused.output
    assert (out / "DL_info.csv").stat().st_mtime_ns == stamp
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0
    assert not [p for p in tmp_path.iterdir() if p.name != "cli"]  # no partial or old folders left
    assert "make-deeplesion-mini" in CliRunner().invoke(main, ["data", "--help"]).output


def test_a_killed_build_leaves_nothing_that_the_next_build_keeps(sample_folder, tmp_path):
    """A killed build (kill -9, the OOM killer) left its staging folder OUT.partial-XXXX, not hidden, and no later
    build removed it. Now it is hidden, and the next build into OUT removes it."""
    out = tmp_path / "mini"
    build = subprocess.Popen([sys.executable, "-m", "ctzoo", "data", "make-deeplesion-mini", str(out), "--cases", "1",
                              "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(tmp_path.iterdir()) and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    build.kill()
    build.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".mini.") and left[0].endswith(".partial"), left
    result = CliRunner().invoke(main, ["data", "make-deeplesion-mini", str(out), "--cases", "1"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["mini"]


def test_stats_counts_and_draws(mini, rows, tmp_path):
    result = CliRunner().invoke(main, ["data", "stats", str(mini), "--png", str(tmp_path / "sizes.png"),
                                       "--overlays", str(tmp_path / "overlays"), "--limit", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[: result.output.rindex("}") + 1])
    assert summary["lesions"] == len(rows)
    assert sum(v["lesions"] for v in summary["by_split"].values()) == len(rows)
    assert summary["by_type"]["unknown"]["train"] == sum(r.train_val_test == 1 for r in rows)
    assert sum(summary["long_axis_mm"]["counts"]) == len(rows)
    for png in [tmp_path / "sizes.png", *sorted((tmp_path / "overlays").iterdir())]:
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 300
    assert len(list((tmp_path / "overlays").iterdir())) == 2
    result = CliRunner().invoke(main, ["data", "stats", str(mini), "--png", str(tmp_path / "sizes.png"),
                                       "--vs-deeplesion", str(tmp_path / "versus.png"), "--reference",
                                       str(mini / "DL_info.csv")])
    assert result.exit_code == 0 and "types and sizes vs DeepLesion" in result.output, result.output
    with Image.open(tmp_path / "versus.png") as image:
        assert image.format == "PNG" and image.size[0] > 600
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "DL_info.csv").write_text(",".join(COLUMNS) + "\n" + "x" * 5 + "\n")
    result = CliRunner().invoke(main, ["data", "stats", str(bad)])
    assert result.exit_code == 1 and "column File_name" in result.output
