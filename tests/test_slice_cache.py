"""The decoded-slice store (``ctzoo data cache``): built from the DeepLesion-format miniature, every slice it holds
is the PNG's HU bit for bit, every training sample read through it is identical to the one decoded from the PNGs,
and a series whose PNGs changed is read from them again until the store is rebuilt."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.datasets.deeplesion.dataset import DeepLesionConfig, LoadDeepLesiond, key_slice_items
from ctzoo.datasets.deeplesion.info_csv import read_dl_info
from ctzoo.datasets.deeplesion.png_slices import read_png_hu, write_png_hu
from ctzoo.datasets.deeplesion.slice_cache import INDEX_FILE, SLICES_FILE, SliceCache


@pytest.fixture(scope="module")
def store(deeplesion_mini16, tmp_path_factory) -> Path:
    """``ctzoo data cache`` of the (read-only) 16-series miniature, written beside it."""
    out = tmp_path_factory.mktemp("store") / "slice_cache"
    result = CliRunner().invoke(main, ["data", "cache", str(deeplesion_mini16), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "16 series" in result.output and "slices/s" in result.output
    return out


def test_the_store_holds_every_slice_as_its_png_decodes(deeplesion_mini16, store):
    cache = SliceCache(store)
    pngs = sorted((deeplesion_mini16 / "Images_png").glob("*/*.png"))
    assert len(cache.index) == 16 and sum(entry["count"] for entry in cache.index.values()) == len(pngs)
    assert (store / SLICES_FILE).stat().st_size == 2 * sum(e["count"] * e["rows"] * e["columns"]
                                                         for e in cache.index.values())
    for path in pngs[::7]:
        from_store, from_png = cache.read(path), read_png_hu(path)
        assert from_store.dtype == from_png.dtype == np.float32 and np.array_equal(from_store, from_png)
    with pytest.raises(FileNotFoundError, match="is not in the store"):
        cache.plane(pngs[0].parent.name, 999)


def test_training_samples_from_the_store_are_identical_to_those_from_the_pngs(deeplesion_mini16, store):
    plain = DeepLesionConfig(root=deeplesion_mini16, num_slices=3, max_size=256)
    cached = plain.model_copy(update={"slice_cache": store})
    items = key_slice_items(read_dl_info(deeplesion_mini16 / "DL_info.csv"), "all")
    assert len(items) >= 10
    from_png, from_store = LoadDeepLesiond(plain), LoadDeepLesiond(cached)
    for item in items:
        a, b = from_png(item), from_store(item)
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


def test_hu_planes_read_lazily_from_the_store_are_those_decoded_from_the_pngs(deeplesion_mini16, store):
    """``augment: {resample_on: device}`` reads only a training window's part of each slice from the store: the
    same float32 HU as the whole planes decoded from the PNGs, and the same window once augmented."""
    from ctzoo.datasets.batch_augment import RandWindowd
    from ctzoo.datasets.deeplesion.context import ContextPlanes

    plain = DeepLesionConfig(root=deeplesion_mini16, num_slices=5)  # 2 mm apart: interpolated between slices
    cached = plain.model_copy(update={"slice_cache": store})
    from_png, lazy = LoadDeepLesiond(plain, resample=False), LoadDeepLesiond(cached, resample=False, lazy=True)
    window = RandWindowd((96, 96), hu_fill=-1024.0)
    for item in key_slice_items(read_dl_info(deeplesion_mini16 / "DL_info.csv"), "all")[::3]:
        whole, planes = from_png(item), lazy(item)
        assert isinstance(planes["image"], ContextPlanes) and planes["image"].shape == tuple(whole["image"].shape)
        part = planes["image"].window(slice(100, 220), slice(-150, None))
        assert part.dtype == np.float32 and np.array_equal(part, whole["image"][:, 100:220, -150:].numpy())
        assert torch.equal(planes["scale_xy"], whole["scale_xy"]) and planes["resampled_hw"] == whole["resampled_hw"]
        window.set_random_state(7)
        a = window(whole)
        window.set_random_state(7)
        b = window(planes)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["grid_affine"], b["grid_affine"])


def test_a_series_whose_pngs_changed_is_read_from_them_again(deeplesion_mini16, tmp_path, caplog):
    root = tmp_path / "root"
    series = sorted(p.name for p in (deeplesion_mini16 / "Images_png").iterdir())[:2]
    for name in series:
        shutil.copytree(deeplesion_mini16 / "Images_png" / name, root / "Images_png" / name)
    shutil.copy(deeplesion_mini16 / "DL_info.csv", root)  # names all 16 series: the store needs the 2 present
    from ctzoo.datasets.deeplesion.slice_cache import build_slice_cache

    report = build_slice_cache(root / "Images_png", series, root / "slice_cache", workers=1)
    assert report["series"] == 2 and (root / "slice_cache" / INDEX_FILE).exists()
    changed = sorted((root / "Images_png" / series[0]).glob("*.png"))[1]
    new_hu = read_png_hu(changed) + 7.0
    write_png_hu(changed, new_hu)
    cache = SliceCache(root / "slice_cache")
    with caplog.at_level(logging.WARNING):
        assert np.array_equal(cache.read(changed), new_hu)
    assert f"{series[0]} changed since the slice store was built" in caplog.text
    untouched = sorted((root / "Images_png" / series[1]).glob("*.png"))[0]
    assert cache.fresh(untouched.parent) and np.array_equal(cache.read(untouched), read_png_hu(untouched))
    assert not cache.fresh(changed.parent)


def test_a_bad_root_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["data", "cache", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "DL_info.csv" in result.output
    assert not (tmp_path / "empty" / "slice_cache").exists()


@pytest.fixture(scope="module")
def small_root(deeplesion_mini16, tmp_path_factory) -> Path:
    """Two series of the miniature with their DL_info.csv rows: a ROOT that builds in a second (read only)."""
    root = tmp_path_factory.mktemp("small") / "root"
    series = sorted(p.name for p in (deeplesion_mini16 / "Images_png").iterdir())[:2]
    for name in series:
        shutil.copytree(deeplesion_mini16 / "Images_png" / name, root / "Images_png" / name)
    lines = (deeplesion_mini16 / "DL_info.csv").read_text().splitlines(keepends=True)
    (root / "DL_info.csv").write_text(lines[0] + "".join(line for line in lines[1:] if line[:12] in series))
    return root


def cache_cli(*arguments: str | Path):
    return CliRunner().invoke(main, ["data", "cache", *map(str, arguments), "--workers", "1"])


def test_out_that_holds_or_lies_in_the_dataset_is_refused_and_nothing_lost(small_root):
    before = sorted(small_root.rglob("*"))
    for out, why in [(small_root, "holds"), (small_root / "Images_png", "holds"),
                     (small_root.parent, "holds"), (small_root / "Images_png" / "store", "lies inside")]:
        result = cache_cli(small_root, "--out", out)
        assert result.exit_code == 1 and why in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert sorted(small_root.rglob("*")) == before


def test_out_that_is_another_folder_is_refused_and_kept(small_root, tmp_path):
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "thesis.txt").write_text("my notes")
    result = cache_cli(small_root, "--out", tmp_path / "scratch")
    assert result.exit_code == 1 and "is not a slice store" in result.output
    assert (tmp_path / "scratch" / "thesis.txt").read_text() == "my notes"
    assert [p.name for p in tmp_path.iterdir()] == ["scratch"]  # no staging folder left either


def test_out_that_is_a_store_or_empty_is_replaced(small_root, tmp_path):
    (tmp_path / "empty").mkdir()
    assert cache_cli(small_root, "--out", tmp_path / "empty").exit_code == 0  # an empty folder holds nothing to lose
    out = tmp_path / "store"
    first = cache_cli(small_root, "--out", out)
    assert first.exit_code == 0 and "2 series" in first.output, first.output
    (out / SLICES_FILE).write_bytes(b"")  # even a damaged store is a store: a re-run replaces it
    again = cache_cli(small_root, "--out", out)
    assert again.exit_code == 0 and "2 series" in again.output, again.output
    assert len(SliceCache(out).index) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "store"]


def test_damaged_pngs_and_stray_names_are_refused_naming_the_file(small_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(small_root, root)
    series = sorted((root / "Images_png").iterdir())[0]
    png = sorted(series.glob("*.png"))[1]
    png.write_bytes(png.read_bytes()[:3000])
    result = cache_cli(root)
    assert result.exit_code == 1 and f"{png}: cannot decode this PNG" in result.output, result.output
    shutil.copy(small_root / "Images_png" / series.name / png.name, png)
    stray = series / "002 (1).png"
    shutil.copy(png, stray)
    result = cache_cli(root)
    assert result.exit_code == 1 and f"{stray}: not a DeepLesion slice name" in result.output, result.output
    assert not (root / "slice_cache").exists()


def test_a_full_disk_is_one_line_naming_the_store(small_root, tmp_path, monkeypatch):
    import errno
    from collections import namedtuple

    from ctzoo.datasets.deeplesion import slice_cache

    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as patch:
        patch.setattr(slice_cache.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
        result = cache_cli(small_root, "--out", tmp_path / "store")
    assert result.exit_code == 1 and "GB free" in result.output and "Traceback" not in result.output, result.output

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(slice_cache, "build_slice_cache", full)
    result = cache_cli(small_root, "--out", tmp_path / "store")
    assert result.exit_code == 1 and "Traceback" not in result.output and result.output.strip().splitlines()[-1] == (
        f"Error: {tmp_path / 'store'}: building the slice store failed: [Errno 28] No space left on device")


def test_a_root_naming_no_series_is_refused(small_root, tmp_path):
    root = tmp_path / "root"
    (root / "Images_png").mkdir(parents=True)
    (root / "DL_info.csv").write_text((small_root / "DL_info.csv").read_text().splitlines()[0] + "\n")
    result = cache_cli(root)
    assert result.exit_code == 1 and "no series to store" in result.output, result.output


@pytest.fixture(scope="module")
def small_store(small_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small-store") / "slice_cache"
    assert cache_cli(small_root, "--out", out).exit_code == 0
    return out


@pytest.mark.parametrize("damage, error, message", [
    ("truncate", ValueError, "bytes, its index says .* bytes \\(truncated"),
    ("no slices", ValueError, "missing, its index says"),
    ("empty", ValueError, "an empty slice store"),
    ("index not json", ValueError, "damaged slice store"),
    ("no index", FileNotFoundError, "no slice store here"),
])
def test_a_damaged_store_is_refused_on_opening_naming_it(small_store, tmp_path, damage, error, message):
    store = tmp_path / "store"
    shutil.copytree(small_store, store)
    if damage == "truncate":
        with open(store / SLICES_FILE, "r+b") as handle:
            handle.truncate((store / SLICES_FILE).stat().st_size // 2)
    elif damage == "no slices":
        (store / SLICES_FILE).unlink()
    elif damage == "empty":
        (store / INDEX_FILE).write_text('{"schema": 1, "series": {}}')
        (store / SLICES_FILE).write_bytes(b"")
    elif damage == "index not json":
        (store / INDEX_FILE).write_text((store / INDEX_FILE).read_text()[:40])
    else:
        (store / INDEX_FILE).unlink()
    with pytest.raises(error, match=message) as caught:
        SliceCache(store)
    assert str(store) in str(caught.value) and "ctzoo data cache" in str(caught.value)
