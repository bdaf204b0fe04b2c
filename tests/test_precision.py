"""bf16 prediction (``ctzoo infer --precision``): checked against fp32 on the sample CT before it is used, on the
device that runs it; auto keeps fp32 on the CPU; a model that disagrees is refused (bf16) or kept in fp32 (auto)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from series_variants import lowest_slices

from ctzoo.cli import main
from ctzoo.inference import precision
from ctzoo.inference.backends import make_backend
from ctzoo.inference.precision import (
    BF16_MIN_AGREEMENT,
    BF16_RELATIVE_TOLERANCE,
    bf16_parity,
    choose_precision,
    output_error,
)
from ctzoo.inference.tasks import model_task
from ctzoo.models.bundle import load_bundle


@pytest.fixture(scope="module")
def detector():
    return load_bundle("recistnet-mini")


def test_bf16_agrees_with_fp32_on_real_ct_for_both_zoo_models(detector):
    record = bf16_parity(detector, "cpu")
    assert record["passed"] and not record["failures"] and record["slices"] == 3
    assert set(record["errors"]) == {"heatmaps", "offsets", "displacements"}
    # bf16 rounds (8 significant bits): the outputs differ, by a few parts in a thousand to a few in a hundred
    assert all(1e-4 < e["max_rel"] <= BF16_RELATIVE_TOLERANCE for e in record["errors"].values()), record
    assert set(record["seconds"]) == {"fp32", "bf16"} and min(record["seconds"].values()) > 0
    segmenter = bf16_parity(load_bundle("template-seg-abdomen"), "cpu")
    assert segmenter["passed"] and set(segmenter["errors"]) == {"logits"}
    assert segmenter["class_agreement"] >= BF16_MIN_AGREEMENT


def test_the_check_runs_once_per_process_for_a_bundles_weights_and_is_judged_at_every_call(detector, monkeypatch):
    """A second check of the same weights on the same device (a fresh load of the bundle, as another model copy
    makes) runs no network and gives the same record; a stricter tolerance still fails it."""
    first = bf16_parity(detector, "cpu")
    monkeypatch.setattr(precision, "make_backend", lambda *args, **kwargs: pytest.fail("the networks ran again"))
    again = bf16_parity(load_bundle("recistnet-mini"), "cpu")
    assert again == first and again is not first
    monkeypatch.setattr(precision, "BF16_RELATIVE_TOLERANCE", 1e-6)
    strict = bf16_parity(detector, "cpu")
    assert not strict["passed"] and strict["errors"] == first["errors"] and strict["relative_tolerance"] == 1e-6


def test_bf16_that_is_slower_than_fp32_says_so(detector, monkeypatch):
    """As on a CPU that emulates bf16 (measured: 39 s against 0.3 s for the check's 3 slices)."""
    timed = {"passed": True, "failures": [], "worst_relative_error": 0.02}
    monkeypatch.setattr(precision, "bf16_parity", lambda bundle, device: {**timed, "seconds": {"fp32": 0.3,
                                                                                              "bf16": 39.0}})
    chosen = choose_precision(detector, "bf16", "torch", "cpu")
    assert chosen.precision == "bf16" and chosen.describe().endswith("but it took 130x fp32's time there on cpu: "
                                                                     "fp32 is faster)")
    monkeypatch.setattr(precision, "bf16_parity", lambda bundle, device: {**timed, "seconds": {"fp32": 0.3,
                                                                                              "bf16": 0.2}})
    assert "fp32's time" not in choose_precision(detector, "bf16", "torch", "cpu").describe()


def test_auto_is_fp32_on_the_cpu_without_a_check_and_bf16_is_checked(detector, monkeypatch):
    ran = []
    monkeypatch.setattr(precision, "bf16_parity", lambda bundle, device: ran.append(device) or bf16_parity(
        bundle, device))
    assert choose_precision(detector, "auto", "torch", "cpu").precision == "fp32" and not ran
    chosen = choose_precision(detector, "bf16", "torch", "cpu")
    assert chosen.precision == "bf16" and ran == ["cpu"] and chosen.parity["passed"]
    assert "agrees with fp32 on the sample CT" in chosen.describe()
    assert choose_precision(detector, "auto", "onnx", "cuda").precision == "fp32" and ran == ["cpu"]


def test_a_model_that_disagrees_is_refused_in_bf16_and_kept_in_fp32_by_auto(detector, monkeypatch):
    monkeypatch.setattr(precision, "BF16_RELATIVE_TOLERANCE", 1e-6)  # no bf16 run is that close
    with pytest.raises(RuntimeError, match=r"bf16 disagrees with fp32 on the sample CT on cpu: heatmaps: relative "
                                           r"error .* > 1e-06.*run with --precision fp32"):
        choose_precision(detector, "bf16", "torch", "cpu")
    monkeypatch.setattr(precision, "bf16_parity", lambda bundle, device: bf16_parity(bundle, "cpu"))
    kept = choose_precision(detector, "auto", "torch", "cuda")  # as on a GPU whose bf16 disagrees
    assert kept.precision == "fp32" and kept.describe().startswith("fp32 (auto: bf16 failed its check (heatmaps")


@pytest.mark.parametrize(("arguments", "message"), [
    (["--precision", "bf16", "--backend", "onnx"], "ONNX graphs carry their own precision"),
    (["--precision", "fp16"], "'fp16' is not one of 'auto', 'fp32', 'bf16'"),
    (["--compile", "--backend", "onnx"], "--compile compiles the PyTorch backend's own network"),
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs replays CUDA graphs: it needs a CUDA device"),
])
def test_infer_refuses_a_precision_that_cannot_apply_before_reading_anything(arguments, message, tmp_path):
    result = CliRunner().invoke(main, ["infer", "--out", str(tmp_path / "out"), *arguments])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_the_chosen_precision_and_compilation_reach_every_model_copy(detector):
    task = model_task(detector, "torch", "cpu", precision="bf16", compile=True)  # compiles at its first batch
    for runtime in (task.runtime, task.replicate(1).runtime):
        assert runtime["precision"] == "bf16" and runtime["compiled"]
    assert model_task(detector, "torch", "cpu").replicate(1).runtime | {"backend": "torch"} == {
        "backend": "torch", "device": "cpu", "precision": "fp32", "compiled": False}


def test_infer_in_bf16_finds_what_fp32_finds_on_the_sample(sample_dir, tmp_path):
    """The lesions of a bf16 run are the fp32 run's, their end points within a pixel: on the sample's 4 lowest
    slices, where fp32 finds a lesion on slice 2 (bf16 is emulated, about 130x slower, on a CPU without
    AVX512-BF16: each slice costs seconds)."""
    series = lowest_slices(sample_dir, 4, tmp_path / "lowest")
    found = {}
    for name in ("fp32", "bf16"):
        result = CliRunner().invoke(main, ["infer", str(series), "--precision", name, "--out", str(tmp_path / name),
                                           "--no-overlay"])
        assert result.exit_code == 0, result.output
        assert f"; {name} (" in result.output
        document = json.loads((tmp_path / name / "lowest" / "detections.json").read_text())
        assert document["runtime"] == {"backend": "torch", "device": "cpu", "precision": name, "compiled": False,
                                       "decoder": "gdcm", "preprocessing": "cpu"}
        found[name] = document["lesions"]
    assert len(found["bf16"]) == len(found["fp32"]) > 0
    for ours, theirs in zip(found["bf16"], found["fp32"]):
        assert ours["slice"] == theirs["slice"] and abs(ours["score"] - theirs["score"]) < 0.05
        assert np.abs(np.subtract(ours["points_voxel"], theirs["points_voxel"])).max() <= 1.0


def test_a_compiled_detector_equals_eager_and_compiles_once_for_a_smaller_last_batch(detector):
    from torch._dynamo.utils import counters

    eager, compiled = (make_backend(detector, "torch", "cpu", compile=flag) for flag in (False, True))
    channels = next(m for m in detector.network().modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    images = np.random.default_rng(0).normal(0, 1, (3, channels, 64, 96)).astype(np.float32)
    counters.clear()
    for batch in (images, images[:1]):
        got, want = compiled.heads(batch), eager.heads(batch)
        for name in want:
            assert got[name].shape == want[name].shape
            assert output_error(got[name], want[name])[1] < 1e-4, name
    assert compiled.fixed.batch == 3 and counters["stats"]["unique_graphs"] == 1


def test_cuda_graphs_need_a_cuda_device(detector):
    with pytest.raises(ValueError, match="CUDA graphs .* replay on a CUDA device, not cpu"):
        make_backend(detector, "torch", "cpu", compile="cuda-graphs")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs replay on a GPU")
def test_cuda_graphs_equal_eager_on_the_gpu_for_a_smaller_last_batch_too(detector):
    """(Runs in benchmarks/gpu/run.sh's check step.) The replayed graph's outputs are the eager network's, each
    batch's copied out before the next one overwrites the graph's output buffers."""
    eager, replayed = (make_backend(detector, "torch", "cuda", compile=mode) for mode in (False, "cuda-graphs"))
    channels = next(m for m in detector.network().modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    images = np.random.default_rng(0).normal(0, 1, (3, channels, 64, 96)).astype(np.float32)
    results = [(replayed.heads(batch), eager.heads(batch)) for batch in (images, images[::-1].copy(), images[:1])]
    for got, want in results:  # compared after every batch ran: earlier outputs must not have been overwritten
        for name in want:
            assert output_error(got[name], want[name])[1] < 1e-3, name
    assert replayed.fixed.batch == 3 and model_task(detector, "torch", "cuda", compile="cuda-graphs").runtime[
        "compiled"] == "cuda-graphs"


def test_the_pacs_bridge_resolves_its_configured_precision_per_model():
    from click import ClickException

    from ctzoo.cli.pacs import _tasks
    from ctzoo.pacs.config import PacsConfig

    (task,) = _tasks(PacsConfig(models=["recistnet-mini"], backend="torch", device="cpu", precision="bf16"))
    assert task.runtime["precision"] == "bf16"
    (task,) = _tasks(PacsConfig(models=["recistnet-mini"], backend="torch", device="cpu"))
    assert task.runtime["precision"] == "fp32"  # auto on the CPU
    with pytest.raises(ClickException, match="cannot load the models: precision bf16 runs the PyTorch backend's own "
                                             "network: ONNX graphs carry their own precision"):
        _tasks(PacsConfig(models=["recistnet-mini"], backend="onnx", precision="bf16"))
