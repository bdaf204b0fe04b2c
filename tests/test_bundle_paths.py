"""One bundle through every path: a model trained here is published as a bundle folder, and that folder runs in
``ctzoo infer --model PATH``, in ``ctzoo export`` + the service's ``/studies``, and in ``ctzoo pacs`` against a
real Orthanc, with nothing of the package's own weights involved."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from click.testing import CliRunner
from fastapi.testclient import TestClient
from orthanc_server import OrthancServer, storescu
from test_pacs_cli import Watcher, results_in_orthanc, wait_for, write_pacs_config
from test_training import run_train, tiny_config

from ctzoo.cli import main
from ctzoo.models import load_bundle, model_entry

pytestmark = pytest.mark.timeout(600)
TOKEN = "bundle-paths-token"


def test_a_published_bundle_runs_in_infer_export_serve_and_pacs(small_deeplesion_mini, sent_files, tmp_path):
    shipped = (model_entry("recistnet-mini").weights_dir / "card.json").read_bytes()
    config = tiny_config(tmp_path, small_deeplesion_mini, epochs=1)
    run_train(config, "--out", tmp_path / "run")
    bundle_dir = tmp_path / "my-bundle"
    published = CliRunner().invoke(main, ["zoo", "publish", str(tmp_path / "run"), "--config", str(config),
                                          "--name", "recistnet-mini", "--version", "0.0.7", "--split", "val",
                                          "--out", str(bundle_dir)])
    assert published.exit_code == 0, published.output
    bundle = load_bundle(bundle_dir)
    assert (bundle.version, bundle.task, bundle.network_def.config["width"]) == ("0.0.7", "detection", 8)
    assert (model_entry("recistnet-mini").weights_dir / "card.json").read_bytes() == shipped  # the zoo untouched

    # ctzoo infer --model PATH
    result = CliRunner().invoke(main, ["infer", "--model", str(bundle_dir), "--out", str(tmp_path / "infer"),
                                       "--workers", "0", "--no-overlay", "--score-threshold", "0.0"])
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "infer" / "sample_ct" / "detections.json").read_text())
    assert document["model_version"] == "0.0.7"

    # ctzoo export PATH, then /studies of the service answers from that export's graph
    exported = CliRunner().invoke(main, ["export", str(bundle_dir), "--out", str(tmp_path / "repo"),
                                         "--name", "mine"])
    assert exported.exit_code == 0, exported.output
    from ctzoo.serve.app import create_app
    from ctzoo.serve.studies import study_router

    app = create_app(tmp_path / "repo", [TOKEN], device="cpu", extra_routers=[study_router("cpu")])
    nifti = tmp_path / "ct.nii.gz"
    assert CliRunner().invoke(main, ["data", "sample", str(nifti)]).exit_code == 0
    with TestClient(app) as client:
        study = client.post("/studies/mine?score_threshold=0.0", content=nifti.read_bytes(),
                            headers={"Authorization": f"Bearer {TOKEN}"})
    assert study.status_code == 200, study.text
    assert study.json()["model_version"] == "0.0.7" and study.json()["graph"]["file"] == "mine/1/model.onnx"

    # ctzoo pacs watch, with the bundle folder as its model, against a real Orthanc
    server = OrthancServer(tmp_path / "orthanc")
    orthanc = server.start()
    watcher = None
    try:
        pacs_config = write_pacs_config(tmp_path, orthanc)
        settings = yaml.safe_load(pacs_config.read_text())
        settings.update(models=[str(bundle_dir)], backend="torch")
        pacs_config.write_text(yaml.safe_dump(settings))
        watcher = Watcher(pacs_config, orthanc, tmp_path / "watcher.log")
        storescu(orthanc, sent_files)
        wait_for(lambda: results_in_orthanc(orthanc).get("SR"), 240, "the SR of the bundle's model", watcher)
        time.sleep(0.5)
        assert watcher.stop() == 0, watcher.output()
        assert "Traceback" not in watcher.output()
    finally:
        if watcher is not None and watcher.process.poll() is None:
            watcher.kill()
        server.stop()
