"""``ctzoo serve --perf``: every request's stages judged in situ; a delay injected into the model stage of a few
requests is found, named and kept with its neighbours; counts in /metrics; routes behind the token."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

TOKEN = "perf-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "recistnet-mini"
DELAY_S = 0.3


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    from ctzoo.export.repository import export_model

    repo = tmp_path_factory.mktemp("repo")
    export_model(MODEL, repo)
    return repo


def _request(rng) -> tuple[bytes, dict]:
    image = rng.random((1, 9, 64, 64), np.float32)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(image.shape),
                                     "parameters": {"binary_data_size": image.nbytes}}]}).encode()
    return header + image.tobytes(), {**AUTH, "Inference-Header-Content-Length": str(len(header))}


def test_a_delay_in_the_model_stage_is_found_named_and_kept(repository, tmp_path):
    from ctzoo.perf import DetectorConfig, PerfMonitor
    from ctzoo.serve.app import create_app

    monitor = PerfMonitor(tmp_path / "perf.sqlite", DetectorConfig(algorithm="hbos"), role="serve")
    app = create_app(repository, [TOKEN], device="cpu", threads=1, batching=False, perf=monitor)
    session = app.state.repository[MODEL].session
    run, delayed = session.run, {120, 160, 200}
    calls = iter(range(10**6))

    def run_with_injected_delay(*args, **kwargs):  # a controlled fault inside the model stage, on known requests
        if next(calls) in delayed:
            time.sleep(DELAY_S)
        return run(*args, **kwargs)

    session.run = run_with_injected_delay
    rng = np.random.default_rng(0)
    with TestClient(app) as client:
        for _ in range(240):
            body, headers = _request(rng)
            assert client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers).status_code == 200
        assert client.get("/v2/perf/anomalies").status_code == 401
        found = client.get("/v2/perf/anomalies?limit=1000", headers=AUTH).json()
        stats = client.get("/v2/perf/stats", headers=AUTH).json()
        metrics = client.get("/metrics", headers=AUTH).text
    slow = [a for a in found["anomalies"] if a["stage"] == "model" and a["seconds"] >= DELAY_S]
    assert len(slow) == len(delayed), [(a["stage"], a["seconds"]) for a in found["anomalies"]]
    others = [a for a in found["anomalies"] if a not in slow]
    # the rest: calls a shared CI host really made slow (precision on an idle host is the benchmark's to measure)
    assert len(others) <= 0.03 * 4 * 240, [(a["stage"], a["seconds"]) for a in others]  # 4 stage events a request
    for anomaly in slow:
        assert anomaly["context"]["rows"] == 1 and anomaly["bucket"] == "1" and anomaly["model"] == MODEL
        assert len(anomaly["window"]) >= 10  # its neighbours: the other stages of its request and the next ones
    assert {row["stage"] for row in stats["keys"]} == {"decode", "queue", "model", "encode"}
    model_row = next(row for row in stats["keys"] if row["stage"] == "model")
    assert model_row["anomalies"] >= len(delayed) and model_row["count"] >= 200
    assert f'ctzoo_perf_anomalies_total{{model="{MODEL}",stage="model"}}' in metrics
    monitor.close()
    store = PerfMonitor(tmp_path / "perf.sqlite", role="reader").store
    reduction, [kept] = store.reduction(), store.rows("SELECT COUNT(*) AS n FROM events")
    assert reduction["seen"] == 4 * 240 and reduction["stored"] == kept["n"] < 4 * 240 / 2  # most is not kept


def test_perf_routes_say_when_it_is_off(repository):
    from ctzoo.serve.app import create_app

    with TestClient(create_app(repository, [TOKEN], device="cpu", threads=1)) as client:
        response = client.get("/v2/perf/stats", headers=AUTH)
    assert response.status_code == 404 and "--perf" in response.json()["error"]
