"""``ctzoo serve --perf``: every request's stages judged in situ; a delay injected into the model stage of a few
requests is found, named and kept with its neighbours; counts in /metrics; routes behind the token."""

from __future__ import annotations

import gzip
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


def _request(rng, request_id: str | None = None) -> tuple[bytes, dict]:
    image = rng.random((1, 9, 64, 64), np.float32)
    tensor = {"name": "image", "datatype": "FP32", "shape": list(image.shape),
              "parameters": {"binary_data_size": image.nbytes}}
    header = json.dumps({**({"id": request_id} if request_id else {}), "inputs": [tensor]}).encode()
    return header + image.tobytes(), {**AUTH, "Inference-Header-Content-Length": str(len(header))}


def test_a_delay_in_the_model_stage_is_found_named_and_kept(repository, tmp_path):
    from ctzoo.perf import DetectorConfig, PerfMonitor, request_hash
    from ctzoo.serve.app import create_app

    monitor = PerfMonitor(tmp_path / "perf.sqlite", DetectorConfig(algorithm="hbos"), role="serve")
    app = create_app(repository, [TOKEN], device="cpu", threads=1, batching=False, perf=monitor)
    session = app.state.repository[MODEL].engine.session
    run, delayed = session.run, {120, 160, 200}
    calls = iter(range(10**6))

    def run_with_injected_delay(*args, **kwargs):  # a controlled fault inside the model stage, on known requests
        if next(calls) in delayed:
            time.sleep(DELAY_S)
        return run(*args, **kwargs)

    session.run = run_with_injected_delay
    rng = np.random.default_rng(0)
    with TestClient(app) as client:
        assert client.post("/v2/perf/profile?count=1").status_code == 401
        assert client.post("/v2/perf/profile?count=0", headers=AUTH).status_code == 400
        for k in range(240):
            if k == min(delayed):  # armed just before the first delayed run (on a busy host, earlier runs can be
                # slow enough to be anomalies of their own, and would take the budget)
                assert client.post("/v2/perf/profile?count=1", headers=AUTH).json()["budget"] == 1
            body, headers = _request(rng, f"req-{k}")
            assert client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers).status_code == 200
        assert client.get("/v2/perf/anomalies").status_code == 401
        for _ in range(300):  # the profile is taken on the profiler's own thread
            if client.get("/v2/perf/stats", headers=AUTH).json()["profiles"]["done"] == 1:
                break
            time.sleep(0.1)
        found = client.get("/v2/perf/anomalies?limit=1000", headers=AUTH).json()
        # an operator finds a request by its id: the service hashes it with its own key
        by_id = client.get(f"/v2/perf/anomalies?request=req-{min(delayed)}", headers=AUTH).json()["anomalies"]
        profiled = [a for a in found["anomalies"] if a["profile"]]
        trace = client.get(f"/v2/perf/profiles/{profiled[0]['profile']['id']}", headers=AUTH) if profiled else None
        assert client.get("/v2/perf/profiles/999", headers=AUTH).status_code == 404
        stats = client.get("/v2/perf/stats", headers=AUTH).json()
        metrics = client.get("/metrics", headers=AUTH).text
    slow = [a for a in found["anomalies"] if a["stage"] == "model" and a["seconds"] >= DELAY_S]
    assert len(slow) == len(delayed), [(a["stage"], a["seconds"]) for a in found["anomalies"]]
    others = [a for a in found["anomalies"] if a not in slow]
    assert [a["id"] for a in by_id if a["stage"] == "model" and a["seconds"] >= DELAY_S] == [min(
        slow, key=lambda a: a["started"])["id"]]
    # the rest: calls a shared CI host really made slow (precision on an idle host is the benchmark's to measure)
    assert len(others) <= 0.03 * 4 * 240, [(a["stage"], a["seconds"]) for a in others]  # 4 stage events a request
    for anomaly in slow:
        assert anomaly["context"]["batch_rows"] == 1 and anomaly["bucket"] == "1" and anomaly["model"] == MODEL
        # the request it ran for, by the hash of its v2 id (the k-th session call is the k-th request here)
        assert anomaly["context"]["requests"] in {request_hash(f"req-{k}") for k in delayed}
        assert len(anomaly["window"]) >= 5  # its neighbours: the other stages of its request and the next ones
    # the deep profile: the first delayed run, rerun under ONNX Runtime's profiler on a fresh session (not the
    # delayed one): its operators, and that the injected slowness did not reproduce
    [profile] = [a["profile"] for a in profiled]
    assert profiled[0] == min(slow, key=lambda a: a["started"]) and profile["tool"] == "onnxruntime"
    assert profile["anomaly_s"] >= DELAY_S > profile["rerun_s"] and not profile["reproduces"]
    assert "Conv" in {op["op"] for op in profile["ops"]} and stats["profiles"]["budget"] == 0
    events = json.loads(gzip.decompress(trace.content))
    assert trace.headers["content-type"] == "application/gzip" and any(e["name"] == "model_run" for e in events)
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


def test_a_profile_id_beyond_sqlite_integers_is_404(repository, tmp_path):
    """Ids past a 64-bit integer (which SQLite cannot bind) are no profile, like any other unknown id."""
    from ctzoo.perf import DetectorConfig, PerfMonitor
    from ctzoo.serve.app import create_app

    monitor = PerfMonitor(tmp_path / "perf.sqlite", DetectorConfig(algorithm="hbos"), role="serve")
    with TestClient(create_app(repository, [TOKEN], device="cpu", threads=1, perf=monitor)) as client:
        for profile_id in ("99999999999999999999999", str(2**63), "0", "-1"):
            response = client.get(f"/v2/perf/profiles/{profile_id}", headers=AUTH)
            assert response.status_code == 404, (profile_id, response.text)
            assert f"no deep profile {profile_id}" in response.json()["error"]
    monitor.close()
