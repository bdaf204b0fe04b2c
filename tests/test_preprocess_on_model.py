"""``ctzoo infer --preprocess-on model``: readers only read; the network inputs are computed where the model is.

On the CPU the device path must give the readers' inputs exactly (the same torch and MONAI operations); on a GPU
(run there by benchmarks/gpu/run.sh's check) within float rounding."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from series_variants import lowest_slices

from ctzoo.cli import main
from ctzoo.datasets.samples import sample_ct_dicom
from ctzoo.inference.backends import make_backend
from ctzoo.inference.tasks import bundle_task, preprocess_on
from ctzoo.io import read_volume
from ctzoo.models import load_bundle

MODELS = ("recistnet-mini", "template-seg-abdomen")


@pytest.fixture(scope="module")
def sample_volume():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_volume(sample_ct_dicom(), progress=False)


@pytest.fixture(scope="module")
def tasks():
    return {name: bundle_task(bundle, make_backend(bundle, "torch", "cpu"))
            for name, bundle in ((name, load_bundle(name)) for name in MODELS)}


def _inputs(task, volume):
    context, images = task.preprocess(volume)
    return context, [torch.as_tensor(image) for image in images]


@pytest.mark.parametrize("name", MODELS)
def test_inputs_computed_on_a_device_are_the_readers_inputs(name, tasks, sample_volume):
    task = tasks[name]
    reference_context, reference = _inputs(task, sample_volume)
    context, images = _inputs(preprocess_on(task, "cpu"), sample_volume)
    assert len(images) == len(reference) == sample_volume.array.shape[0]
    assert all(isinstance(image, torch.Tensor) for image in images)
    assert all(torch.equal(a, b) for a, b in zip(images, reference))
    assert str(context) == str(reference_context)  # the detector's scales, the segmenter's geometry
    devices = ["cuda"] if torch.cuda.is_available() else []
    for device in devices:  # a GPU: the same inputs within float rounding of the resampling
        _, moved = _inputs(preprocess_on(task, device), sample_volume)
        assert all(m.device.type == "cuda" for m in moved)
        assert max(float((m.cpu() - r).abs().max()) for m, r in zip(moved, reference)) < 1e-4


def test_onnx_backends_take_host_inputs(tasks):
    onnx_task = dataclasses.replace(tasks[MODELS[0]], runtime={"backend": "onnx"})  # what an ONNX task records
    with pytest.raises(ValueError, match="ONNX Runtime"):
        preprocess_on(onnx_task, "cpu")


@pytest.fixture(scope="module")
def short_series(tmp_path_factory):
    """The sample's 4 lowest slices (the detector finds a lesion there): the inputs of the other 16 are checked
    above; here the pipeline's wiring is, at a fifth of the model time."""
    return lowest_slices(sample_ct_dicom(), 4, tmp_path_factory.mktemp("short") / "lowest")


def _infer(out, series, *options):
    result = CliRunner().invoke(main, ["infer", str(series), "--model", MODELS[0], "--model", MODELS[1], "--out",
                                       str(out), "--no-overlay", *options])
    assert result.exit_code == 0, result.output
    folder = out / "lowest"
    return (result.output, json.loads((folder / "detections.json").read_text()),
            json.loads((folder / "segmentation.json").read_text()), (folder / "labels.nii.gz").read_bytes())


@pytest.fixture(scope="module")
def readers_results(tmp_path_factory, short_series):
    return _infer(tmp_path_factory.mktemp("readers"), short_series, "--preprocess-on", "readers")


def test_infer_with_inputs_computed_on_the_model_side_gives_the_same_results(tmp_path, short_series, readers_results):
    """One reader process reads; this process computes the inputs (the GPU's arrangement, on the CPU here)."""
    _, expected_detections, expected_segmentation, expected_labels = readers_results
    output, detections, segmentation, labels = _infer(tmp_path, short_series, "--preprocess-on", "model", "--workers",
                                                      "1")
    assert "inputs computed on cpu" in output and "inputs computed" not in readers_results[0]
    assert detections["lesions"] == expected_detections["lesions"] != []
    assert segmentation["classes"] == expected_segmentation["classes"] and labels == expected_labels
    assert detections["runtime"]["preprocessing"] == "cpu"


@pytest.mark.parametrize("options", [["--backend", "onnx"], ["--engine", "ray"], ["--layout", "copies"]])
def test_preprocess_on_model_refuses_what_cannot_feed_it(options):
    result = CliRunner().invoke(main, ["infer", "--preprocess-on", "model", *options])
    assert result.exit_code == 2 and "--backend torch, --engine local and the shared layout" in result.output
