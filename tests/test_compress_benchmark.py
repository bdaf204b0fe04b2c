"""``benchmarks/compress.py``'s arithmetic, from hand-written metrics.csv files (no training): CSER's per-epoch
consensus counted in the bytes, time per step from the training time alone, and a table that never compares with a
baseline that failed."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["epoch", "step", "train_s", "wall_s", "comm_bytes_per_step", "comm_reduction", "consensus_bytes",
          "val_dice_mean"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compress_benchmark", ROOT / "benchmarks" / "compress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder: Path, rows: list[dict]) -> Path:
    """A run's folder as ``ctzoo train`` leaves it: ``template_seg/metrics.csv``."""
    (folder / "template_seg").mkdir(parents=True)
    with (folder / "template_seg" / "metrics.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return folder


def _epochs(bytes_per_step: float, consensus: int, dice: list[float], steps: int = 5) -> list[dict]:
    """Epochs of ``steps`` steps, 1 s of training and 10 s of validation and files each; ``consensus`` bytes sent
    to worker 0 after every epoch but the last (none in the synchronous modes)."""
    return [{"epoch": e + 1, "step": steps * (e + 1), "train_s": 1.0, "wall_s": 11.0 * (e + 1),
             "comm_bytes_per_step": bytes_per_step, "comm_reduction": 8000 / bytes_per_step,
             "consensus_bytes": consensus if e + 1 < len(dice) and consensus else "", "val_dice_mean": d}
            for e, d in enumerate(dice)]


def test_cser_consensus_is_counted_in_the_bytes(bench, tmp_path):
    """CSER's per-epoch consensus (a model sent to worker 0) is part of what a worker moves: in the total the
    reduction is computed from, and in a column of its own; the plot's megabytes include it."""
    row = bench.summarize("cser", {}, _run(tmp_path / "cser", _epochs(100.0, 4000, [0.5, 0.6, 0.7, 0.8])))
    assert row["steps"] == 20
    assert row["training_bytes_per_step"] == 100.0
    assert row["consensus_bytes_per_step"] == 3 * 4000 / 20
    assert row["bytes_per_step"] == 100.0 + 3 * 4000 / 20
    assert [mb for _, mb, _ in row["curve_step_mb_dice"]] == pytest.approx([0.0045, 0.009, 0.0135, 0.014])
    plain = bench.summarize("none", {}, _run(tmp_path / "none", _epochs(8000.0, 0, [0.5, 0.6, 0.7, 0.8])))
    assert plain["consensus_bytes_per_step"] == 0 and plain["bytes_per_step"] == 8000.0


def test_time_per_step_is_training_time_without_validation(bench, tmp_path):
    """ms/step's compute part is the epochs' train_s over the steps, not wall time (validation, checkpoints)."""
    row = bench.summarize("none", {}, _run(tmp_path / "none", _epochs(8000.0, 0, [0.5, 0.6])))
    assert row["wall_s"] == 22.0
    assert row["compute_s_per_step"] == pytest.approx(2.0 / 10)


def _args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(out=tmp_path / "compress.json", collect=False, device="cpu", runs_dir=None)


def test_without_the_baseline_no_column_compares_with_another_method(bench, tmp_path, capsys):
    """With 'none' failed the columns against it are left out (they used to compare with the first method
    silently), and the JSON holds the failure."""
    rows = [bench.summarize(m, {}, _run(tmp_path / m, _epochs(b, c, [0.5, 0.7])))
            for m, b, c in (("cser", 100.0, 4000), ("twoway_sign", 900.0, 0))]
    failed = [{"method": "none", "settings": {}, "error": "none: torchrun failed:\nboom"}]
    bench.report(rows, failed, _args(tmp_path), bench.Provenance())
    printed = capsys.readouterr().out
    assert "vs none" not in printed and "reduction" not in printed and "none                   failed: boom" in printed
    written = json.loads((tmp_path / "compress.json").read_text())
    assert written["baseline"] is None and written["failed"] == failed
    assert all("reduction" not in row and "dice_vs_none" not in row for row in written["rows"])
    assert (tmp_path / "compress.png").exists()


def test_with_the_baseline_the_reduction_counts_the_consensus(bench, tmp_path, capsys):
    rows = [bench.summarize(m, {}, _run(tmp_path / m, _epochs(b, c, [0.5, 0.7])))
            for m, b, c in (("none", 8000.0, 0), ("cser", 100.0, 4000))]
    bench.report(rows, [], _args(tmp_path), bench.Provenance())
    assert "vs none" in capsys.readouterr().out
    written = {row["method"]: row for row in json.loads((tmp_path / "compress.json").read_text())["rows"]}
    assert written["cser"]["reduction"] == pytest.approx(8000 / (100 + 4000 / 10))
    assert written["none"]["reduction"] == 1.0


def test_every_method_failed_writes_the_failures_then_stops(bench, tmp_path):
    failed = [{"method": m, "settings": {}, "error": f"{m}: torchrun failed"} for m in ("none", "cser")]
    with pytest.raises(SystemExit, match="every method failed"):
        bench.report([], failed, _args(tmp_path), bench.Provenance())
    written = json.loads((tmp_path / "compress.json").read_text())
    assert written["rows"] == [] and written["failed"] == failed
    assert not (tmp_path / "compress.png").exists()
