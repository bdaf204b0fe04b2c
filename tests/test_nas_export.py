"""``ctzoo nas export``: a search candidate retrained standalone and published as a bundle that ``ctzoo infer``,
``ctzoo export`` and ``ctzoo serve`` run."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.models import load_bundle
from ctzoo.models.template_seg import count_parameters
from ctzoo.nas import Architecture, SearchSpace, extract
from ctzoo.nas.handoff import export_candidate
from ctzoo.nas.search import load_supernet, search_iteration
from ctzoo.training.template_seg_task import load_seg_config

TINY = {"task": "template_seg", "data": {"spacing_mm": 6.0, "size": [64, 64], "val_slices": 4, "max_templates": 8},
        "optim": {"epochs": 1, "batch_size": 4, "num_workers": 0}, "repeats": 1}


def test_a_candidate_becomes_a_bundle_that_infer_export_and_serve_run(fetched_samples, tmp_path):
    config, run, bundle_dir = tmp_path / "tiny.yaml", tmp_path / "run", tmp_path / "picked"
    config.write_text(yaml.safe_dump(TINY))
    document = search_iteration(load_seg_config(config), run, candidates=2, device="cpu", runs=2, warmup=1)
    candidate = document["candidates"][1]
    exported = CliRunner().invoke(main, ["nas", "export", str(run), candidate["id"][:6], "--config", str(config),
                                         "--out", str(bundle_dir), "--epochs", "1", "--device", "cpu"])
    assert exported.exit_code == 0, exported.output
    assert f"template-seg-nas-{candidate['id']}" in exported.output

    bundle = load_bundle(bundle_dir)
    space, arch = SearchSpace.from_json(document["space"]), Architecture.from_json(candidate["architecture"])
    reference = extract(load_supernet(run / "supernet" / "last.pt", space), arch)
    network = bundle.network()
    assert type(network) is type(reference) and str(network) == str(reference)  # the same modules, same order
    assert {k: v.shape for k, v in network.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert count_parameters(network) == count_parameters(reference) == bundle.card.parameters
    card = bundle.card
    assert str(run) in card.training.notes and candidate["id"] in card.training.notes
    assert candidate["description"] in card.description and str(run) in card.training.command
    assert card.metrics["oneshot_latency_ms"].value == pytest.approx(candidate["latency_ms"], abs=1e-3)
    assert {"dice_mean", "dice_mean_val", "oneshot_latency_ms"} <= set(card.metrics)
    trained = yaml.safe_load((run / "export" / candidate["id"] / "config.yaml").read_text())
    assert trained["model"]["kernel_sizes"] == [level["kernel"] for level in candidate["architecture"]["levels"]]
    assert trained["init_weights"].endswith("init")

    inferred = CliRunner().invoke(main, ["infer", "--model", str(bundle_dir), "--out", str(tmp_path / "infer"),
                                         "--workers", "0", "--no-overlay", "--device", "cpu"])
    assert inferred.exit_code == 0, inferred.output
    assert list((tmp_path / "infer").glob("*/labels.nii.gz"))
    exported_and_served(bundle_dir, tmp_path)


def exported_and_served(bundle_dir, tmp_path) -> None:
    """``ctzoo export`` of the bundle (ONNX, checked against PyTorch), then ``ctzoo serve``'s study endpoint on it
    gives the label map ``ctzoo infer --backend onnx`` gives."""
    import dataclasses

    import nibabel as nib
    import numpy as np
    from fastapi.testclient import TestClient

    from ctzoo.datasets.samples import sample_ct_dicom
    from ctzoo.io import read_volume, write_volume
    from ctzoo.serve.app import create_app
    from ctzoo.serve.studies import study_router

    repo, token = tmp_path / "repo", "nas-export-test-token-0123"
    exported = CliRunner().invoke(main, ["export", str(bundle_dir), "--out", str(repo)])
    assert exported.exit_code == 0, exported.output
    [served] = [folder for folder in repo.iterdir() if folder.is_dir()]
    volume = read_volume(sample_ct_dicom(), progress=False)
    ct = write_volume(dataclasses.replace(volume, array=volume.array[4:10].copy(), dicom=None), tmp_path / "ct.nii.gz")
    inferred = CliRunner().invoke(main, ["infer", str(ct), "--model", str(served), "--backend", "onnx", "--out",
                                         str(tmp_path / "onnx"), "--workers", "0", "--no-overlay"])
    assert inferred.exit_code == 0, inferred.output
    app = create_app(repo, [token], device="cpu", threads=1, max_upload_mb=16, extra_routers=[study_router("cpu")])
    with TestClient(app) as client:
        labels = client.post(f"/studies/{served.name}?format=nifti", content=ct.read_bytes(),
                             headers={"Authorization": f"Bearer {token}"})
    assert labels.status_code == 200, labels.text
    (tmp_path / "served.nii.gz").write_bytes(labels.content)
    np.testing.assert_array_equal(nib.load(tmp_path / "served.nii.gz").get_fdata(),
                                  nib.load(tmp_path / "onnx" / "ct" / "labels.nii.gz").get_fdata())


def test_an_unknown_candidate_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    arch = {"levels": [{"width": 1.0, "units": 1, "kernel": 3, "fusion": False}] * 4, "gate": "none"}
    from ctzoo.nas.space import Architecture, SearchSpace

    document = {"schema": 1, "space": SearchSpace().to_json(),  # a well-formed run: the file is checked on reading
                "iterations": [{"iteration": 0, "constraints": {"drop": [], "lock": []}, "steps": 1,
                                "candidates": ["abcdef0123"]}],
                "candidates": [{"id": "abcdef0123", "iteration": 0, "architecture": arch, "description": "w 1/1/1/1",
                                "vector": Architecture.from_json(arch).to_vector(), "dice": 0.5, "latency_ms": 1.0,
                                "params": 1, "flops": 1}]}
    (run / "candidates.json").write_text(json.dumps(document))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    with pytest.raises(ValueError, match="no candidate 'nosuch'.*abcdef0123"):
        export_candidate(run, "nosuch", config, tmp_path / "out")
    result = CliRunner().invoke(main, ["nas", "export", str(run), "nosuch", "--config", str(config),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "abcdef0123" in result.output
    assert not (tmp_path / "out").exists() and not (run / "export").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["nas", "export", str(empty), "x", "--config", str(config),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "ctzoo nas search" in result.output
