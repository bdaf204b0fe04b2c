"""An exported bundle is a MONAI bundle: MONAI's own CLI verifies its metadata and runs it on a NIfTI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from series_variants import lowest_slices

from ctzoo.datasets.samples import sample_ct_dicom
from ctzoo.export.repository import export_model
from ctzoo.inference.inputs import CaseInput
from ctzoo.inference.pipeline import PipelineOptions, run_pipeline
from ctzoo.inference.tasks import model_task
from ctzoo.io import read_volume, write_volume

#: MONAI's metadata schema, as MONAI publishes it (see tests/data/monai/NOTICE.md): verify_metadata reads this
#: file instead of downloading it, and checks its sha256 first.
SCHEMA = Path(__file__).parent / "data" / "monai" / "meta_schema_20240725.json"
SCHEMA_SHA256 = "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"


def monai_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def nifti(tmp_path_factory) -> Path:
    """The sample's 6 lowest slices (the detector finds a lesion there) as NIfTI: each model runs on it twice."""
    folder = tmp_path_factory.mktemp("ct")
    return write_volume(read_volume(lowest_slices(sample_ct_dicom(), 6, folder / "dicom"), progress=False),
                        folder / "ct.nii.gz")


def test_schema_is_the_one_monai_publishes():
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256


@pytest.mark.parametrize(("name", "result"), [("recistnet-mini", "detections.json"),
                                              ("template-seg-abdomen", "segmentation.json")])
def test_monai_verifies_and_runs_an_exported_bundle(name, result, nifti, tmp_path):
    folder = export_model(name, tmp_path / "bundles", monai=True)
    for path in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.onnx",
                 "1/model.onnx", "bundle.json", "model.safetensors"):
        assert (folder / path).is_file(), path
    metadata = json.loads((folder / "configs" / "metadata.json").read_text())
    assert metadata["name"] == name and metadata["version"] == json.loads((folder / "card.json").read_text())["version"]
    verified = monai_cli("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(SCHEMA),
                         "--hash_val", SCHEMA_SHA256, "--hash_type", "sha256", cwd=folder)
    assert verified.returncode == 0, verified.stderr[-3000:]
    assert "metadata is verified with no error" in verified.stdout + verified.stderr
    out = tmp_path / "monai-out"
    run = monai_cli("run", "--config_file", str(folder / "configs" / "inference.json"), "--bundle_root", str(folder),
                    "--image", str(nifti), "--output_dir", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    # what MONAI's run wrote is what ctzoo infer writes for the same file with the same bundle (PyTorch backend)
    [row] = run_pipeline([CaseInput("ct", nifti)], model_task(folder, "torch", "cpu"),
                         PipelineOptions(out=tmp_path / "ctzoo-out", workers=0, overlay=False, progress=False))
    assert row["status"] == "ok"
    got = json.loads((out / "ct" / result).read_text())
    expected = json.loads((tmp_path / "ctzoo-out" / "ct" / result).read_text())
    assert got == expected
    assert got["model"] == name and (got["lesions"] if name == "recistnet-mini" else got["classes"])


def test_changelog_is_a_sentence():
    from ctzoo.export.monai_bundle import metadata
    from ctzoo.models import load_bundle

    bundle = load_bundle("recistnet-mini")
    training = bundle.card.training
    assert (training.epochs, training.epochs_planned, training.best_epoch) == (95, 120, 90)
    sentence = f"ctzoo recistnet-mini {bundle.version}: 95 of 120 planned epochs; weights from epoch 90 (best on " \
        "validation)"
    assert metadata(bundle)["changelog"] == {bundle.version: sentence}
    assert training.model_copy(update={"epochs_planned": None, "best_epoch": None}).epochs_text(" epochs") == \
        "95 epochs"


def test_metadata_that_breaks_the_schema_is_refused(tmp_path):
    folder = export_model("recistnet-mini", tmp_path / "bundles", monai=True)
    metadata = json.loads((folder / "configs" / "metadata.json").read_text())
    del metadata["network_data_format"]
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    verified = monai_cli("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(SCHEMA),
                         cwd=folder)
    assert verified.returncode != 0 and "network_data_format" in verified.stdout + verified.stderr
