"""The parameter server (ctzoo.perf.server): exact merges of many processes' deltas, one global model for all,
hostile requests refused without harm, processes that cannot reach it judging on their own, and the issue's
end-to-end run: a 2-rank DDP ``ctzoo train`` and a 2-worker Ray ``ctzoo infer`` feeding one server, with a slow
step injected on rank 1 found and labelled with its rank."""

import http.client
import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from ctzoo.perf import AnomalyDetector, DetectorConfig, PerfMonitor, event_key
from ctzoo.perf.server import ParameterServer, ParameterServerClient, fetch_stats

TOKEN = "a-test-token-of-some-length"
KEYS = [event_key("m", "1", stage, "cpu", 8) for stage in ("read", "predict", "write")]


def latencies(seed, n=300):
    """Per key, a stream of skewed latencies with its own scale."""
    rng = np.random.default_rng(seed)
    return [(key, float(rng.lognormal(np.log(0.01 * (i + 1)), 0.3))) for _ in range(n)
            for i, key in enumerate(KEYS)]


@pytest.fixture
def parameter_server():
    server = ParameterServer(TOKEN, port=0).start()
    yield server
    server.close()


def client_for(server, detector, name):
    """A client syncing ``detector`` when the test says so."""
    return ParameterServerClient(server.url, TOKEN, detector, threading.Lock(),
                                 {"process": name, "role": "test", "rank": None}, lambda: {}, background=False)


def global_detector(server):
    """A detector holding the server's global states."""
    detector = AnomalyDetector()
    detector.merge_states(json.loads(_get(server, "/v1/states"))["states"])
    return detector


def test_merged_deltas_equal_one_detector_fed_everything_and_every_client_judges_on_them(parameter_server):
    config = DetectorConfig(skip_first=False, learn_anomalies=True)  # every event learned: the sums are exact
    first, second, everything = AnomalyDetector(config), AnomalyDetector(config), AnomalyDetector(config)
    clients = [client_for(parameter_server, first, "a"), client_for(parameter_server, second, "b")]
    streams = latencies(0), latencies(1)
    for half in (slice(0, 450), slice(450, None)):  # two rounds of syncs: deltas, not whole states, are sent
        for detector, stream in zip((first, second), streams):
            for key, seconds in stream[half]:
                detector.observe(key, seconds)
        for client in clients:
            assert client.sync()
    for stream in streams:
        for key, seconds in stream:
            everything.observe(key, seconds)
    clients[0].sync()  # the first client also gets what the second sent after its own last sync
    for detector in (first, second, global_detector(parameter_server)):
        assert set(detector.states) == set(everything.states)
        for key, state in everything.states.items():
            merged = detector.states[key]
            assert merged.histogram.counts == state.histogram.counts  # exact
            assert merged.moments.count == state.moments.count
            assert (merged.moments.min, merged.moments.max) == (state.moments.min, state.moments.max)
            for field in ("mean", "m2", "m3", "m4"):
                assert getattr(merged.moments, field) == pytest.approx(getattr(state.moments, field), rel=1e-9)
    for detector in (first, second):  # what each process learned itself, kept apart
        assert {name: s["moments"]["count"] for name, s in detector.own_state_dict().items()} == {
            "|".join(key): 300 for key in KEYS}
    for client in clients:
        client.close()
    stats = fetch_stats(parameter_server.url, TOKEN)
    for row in stats["keys"]:  # merged count = the sum of what each process contributed
        assert row["count"] == sum(p["keys"][row["key"]]["learned"] for p in stats["processes"]) == 600


def test_a_delta_is_merged_once_and_events_after_the_snapshot_are_kept(parameter_server):
    detector = AnomalyDetector(DetectorConfig(skip_first=False))
    client = client_for(parameter_server, detector, "a")
    for key, seconds in latencies(2, 10):
        detector.observe(key, seconds)
    delta = detector.take_delta()
    body = {"process": "a", "role": "test", "rank": None, "seq": 1, "delta": delta, "counts": {}}
    for _ in range(2):  # the answer was lost; the client sends the same delta again
        reply = _post(parameter_server, "/v1/sync", json.dumps(body).encode())
    detector.observe(KEYS[0], 0.5)  # learned after the snapshot: kept when the global states are adopted
    detector.adopt_global(json.loads(reply)["states"])
    assert detector.states[KEYS[0]].moments.count == 11
    assert fetch_stats(parameter_server.url, TOKEN)["keys"][0]["count"] == 10
    client.close()


def _request(server, path, body=None, token=TOKEN, headers=None):
    request = urllib.request.Request(server.url + path, data=body, method="POST" if body is not None else "GET",
                                     headers={"Authorization": f"Bearer {token}", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def oversized_post(server):
    """The status of a POST declaring a body over the cap (the server answers before reading any of it)."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        connection.putrequest("POST", "/v1/sync")
        connection.putheader("Authorization", f"Bearer {TOKEN}")
        connection.putheader("Content-Length", str(server.max_body_bytes + 1))
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


def _post(server, path, body):
    status, answer = _request(server, path, body)
    assert status == 200, answer
    return answer


def _get(server, path):
    status, answer = _request(server, path)
    assert status == 200, answer
    return answer


def test_bad_requests_are_refused_and_the_server_goes_on(parameter_server):
    state = {"moments": {"count": 1, "mean": 0.1, "m2": 0, "m3": 0, "m4": 0, "min": 0.1, "max": 0.1},
             "histogram": {"-213": 1}}
    good = {"process": "p", "role": "test", "rank": 0, "seq": 1, "delta": {"m|1|s|cpu|1": state}, "counts": {}}
    assert _request(parameter_server, "/v1/stats", token="wrong")[0] == 401
    assert _request(parameter_server, "/v1/sync", json.dumps(good).encode(), token="")[0] == 401
    for body in (b"{not json", b"[]", json.dumps({**good, "seq": -1}).encode(),
                 json.dumps({**good, "delta": {"too|few": state}}).encode(),
                 json.dumps({**good, "delta": {"m|1|s|cpu|1": {**state, "histogram": {"-213": 2}}}}).encode(),
                 json.dumps({**good, "delta": {"m|1|s|cpu|1": {**state, "moments": {**state["moments"],
                                                                                   "mean": "fast"}}}}).encode()):
        status, answer = _request(parameter_server, "/v1/sync", body)
        assert status == 400, (body, answer)
    assert oversized_post(parameter_server) == 413
    assert fetch_stats(parameter_server.url, TOKEN)["keys"] == []  # nothing bad was merged
    assert json.loads(_post(parameter_server, "/v1/sync", json.dumps(good).encode()))["states"]  # still serving
    assert fetch_stats(parameter_server.url, TOKEN)["keys"][0]["count"] == 1


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_without_its_server_a_monitor_judges_on_its_own_statistics_and_says_so_once(tmp_path, caplog):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = DetectorConfig(min_samples=20)
    with caplog.at_level(logging.WARNING, logger="ctzoo.perf"):
        monitor = PerfMonitor(tmp_path / "perf.sqlite", config, role="infer", server=url, token=TOKEN,
                              sync_every_s=0.05)
        for i in range(60):
            label = monitor.record(KEYS[0], 0.010 + 0.0001 * (i % 7))
        assert not label.anomalous and label.judged  # judged: on this process's statistics
        assert monitor.record(KEYS[0], 0.5).anomalous
        time.sleep(0.3)  # several failed syncs
        assert monitor.connected is False and monitor.server_status()["last_error"]
        monitor.close()
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1 and "judging on this process's statistics" in warnings[0] and url in warnings[0]


def test_a_monitor_reconnects_and_sends_what_it_learned_meanwhile(tmp_path, caplog):
    port = free_port()
    monitor = PerfMonitor(None, DetectorConfig(skip_first=False), role="serve", server=f"http://127.0.0.1:{port}",
                          token=TOKEN, sync_every_s=0.05)
    for _ in range(5):
        monitor.record(KEYS[1], 0.02)
    time.sleep(0.2)
    assert monitor.connected is False
    server = ParameterServer(TOKEN, port=port).start()
    try:
        with caplog.at_level(logging.WARNING, logger="ctzoo.perf"):
            deadline = time.monotonic() + 10
            while not monitor.connected and time.monotonic() < deadline:
                time.sleep(0.05)
        assert monitor.connected and any("reachable again" in r.getMessage() for r in caplog.records)
        monitor.close()
        [row] = fetch_stats(server.url, TOKEN)["keys"]
        assert row["count"] == row["events"] == 5  # learned while the server was away, sent once
    finally:
        server.close()


# ----------------------------------------------------------------------------------------- end to end

SLOW_STEP, SLOW_S = 36, 1.5  # of 48 steps per rank; steps take tens of ms here


def test_ddp_train_and_ray_infer_feed_one_server_and_the_slow_step_is_found_on_its_rank(
        small_deeplesion_mini, tmp_path):
    pytest.importorskip("ray")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CTZOO_PERF_TOKEN": TOKEN, "CTZOO_TEST_SLOW_RANK": "1",
           "CTZOO_TEST_SLOW_STEP": str(SLOW_STEP), "CTZOO_TEST_SLOW_S": str(SLOW_S)}
    env.pop("RAY_ADDRESS", None)
    server = subprocess.Popen([sys.executable, "-m", "ctzoo", "perf", "server", "--port", str(port)], env=env,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on" in server.stderr.readline()
        config = tmp_path / "tiny.yaml"  # tests/test_training.py's DDP config, 24 steps per epoch and rank
        config.write_text(yaml.safe_dump({
            "task": "recistnet", "data": {"root": str(small_deeplesion_mini), "negatives_per_series": 1},
            "model": {"backbone": "light", "width": 8, "head_channels": 16}, "repeats": 8,
            "optim": {"epochs": 2, "batch_size": 1, "lr": 0.004, "num_workers": 0, "eval_every": 100},
            "train_size": [128, 128], "eval_size": [512, 512]}))
        perf = ["--perf", "--perf-server", url]
        train = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                  str(Path(__file__).with_name("perf_slow_step_launcher.py")), "train", str(config),
                                  "--out", str(tmp_path / "run"), *perf], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        infer = subprocess.run([sys.executable, "-m", "ctzoo", "infer", "--engine", "ray", "--workers", "2",
                                "--device", "cpu", "--no-overlay", "--out", str(tmp_path / "infer"), *perf],
                               env=env, capture_output=True, text=True, timeout=300)
        trained = train.communicate(timeout=300)
        assert infer.returncode == 0, infer.stderr[-3000:]
        assert train.returncode == 0, trained[1][-3000:]
        stats = fetch_stats(url, TOKEN)
    finally:
        server.terminate()
        server.wait(timeout=30)
    processes = {p["process"].split("@")[0]: p for p in stats["processes"]}
    assert set(processes) == {"train[rank0]", "train[rank1]", "infer"}
    stages = {(row["model"], row["stage"]) for row in stats["keys"]}
    assert {("recistnet", s) for s in ("data_wait", "forward_backward", "comm_hook", "optimizer_step")} <= stages
    # one case: its read and write are each key's first event (skipped: warm-up), its batches' predict learned
    assert {("recistnet-mini", s) for s in ("read", "preprocess", "predict", "finish", "write")} <= stages
    assert sum(c["learned"] for name, c in processes["infer"]["keys"].items() if "|predict|" in name) > 0
    for row in stats["keys"]:  # merged = the sum of the contributions
        mine = [p["keys"][row["key"]] for p in stats["processes"] if row["key"] in p["keys"]]
        assert row["count"] == sum(c["learned"] for c in mine)
        assert row["events"] == sum(c["events"] for c in mine) and row["anomalies"] == sum(c["anomalies"] for c in mine)
        if row["model"] == "recistnet":  # both ranks contributed to every training key
            assert {p["rank"] for p in stats["processes"] if row["key"] in p["keys"]} == {0, 1}
    slow = anomalies(tmp_path / "run" / "perf.rank1.sqlite", "optimizer_step")
    assert [(a["context"]["rank"], a["context"]["step"]) for a in slow if a["seconds"] >= SLOW_S] == [(1, SLOW_STEP)]
    assert not [a for a in anomalies(tmp_path / "run" / "perf.rank0.sqlite", "optimizer_step")
                if a["context"]["step"] == SLOW_STEP]


def anomalies(store, stage):
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT seconds, context FROM events WHERE kind = 'anomaly' AND stage = ?", (stage,))
        return [{"seconds": seconds, "context": json.loads(context)} for seconds, context in rows]


# ----------------------------------------------------------------------------------------- impossible states

POSSIBLE = {"moments": {"count": 30, "mean": 0.01, "m2": 0.0, "m3": 0.0, "m4": 0.0, "min": 0.01, "max": 0.01},
            "histogram": {"-426": 30}}  # 30 events of 10 ms: fine bin floor(log2(0.01) * 64) = -426
NAME = "m|1|model|cpu|1"


def impossible(histogram=None, **moments):
    """POSSIBLE with some of its moments (or its histogram) changed."""
    return {"moments": {**POSSIBLE["moments"], **moments}, "histogram": histogram or POSSIBLE["histogram"]}


@pytest.mark.parametrize("state, why", [
    (impossible(m2=-1.0), "m2 -1.0 is negative"),
    (impossible(m4=-1e-9), "m4 -1e-09 is negative"),
    (impossible(min=0.02), "min 0.02 > max 0.01"),
    (impossible(mean=0.5), "mean 0.5 outside [min, max] = [0.01, 0.01]"),
    (impossible(min=None), "count 30 needs a finite min and max"),
    (impossible(mean=float("inf")), "mean: not a finite number"),
    (impossible(count=0, histogram={}), "count 0 but moments not 0"),
    (impossible(histogram={"-426": 29}), "histogram total 29 differs from the moments' count 30"),
    (impossible(histogram={"-426": 29, "-300": 1}), "histogram bins [-300] outside -427..-425"),
    (impossible(histogram={"-426": 29, str(10**6): 1}), "histogram bins [1000000] outside -427..-425"),
])
def test_impossible_states_get_400_with_why_and_the_server_goes_on(parameter_server, state, why):
    body = {"process": "x", "seq": 1, "delta": {NAME: state}}
    status, answer = _request(parameter_server, "/v1/sync", json.dumps(body).encode())
    assert status == 400 and json.loads(answer)["error"].startswith(NAME) and why in json.loads(answer)["error"], \
        answer
    assert fetch_stats(parameter_server.url, TOKEN)["keys"] == []  # nothing merged, and /v1/stats still answers
    _post(parameter_server, "/v1/sync", json.dumps({**body, "delta": {NAME: POSSIBLE}}).encode())
    [row] = fetch_stats(parameter_server.url, TOKEN)["keys"]
    assert (row["count"], row["mean_s"], row["std_s"]) == (30, 0.01, 0.0)


def test_a_state_a_real_detector_learned_is_accepted(parameter_server):
    """The checks refuse no honest delta (a refused one would be sent again for ever): skewed, spread and tiny
    durations, and zero ones (counted in the lowest bin)."""
    detector = AnomalyDetector(DetectorConfig(skip_first=False))
    for key, seconds in latencies(3, 200):
        detector.observe(key, seconds)
    for seconds in (0.0, 1e-9, 3e-7, 1e-7):
        detector.observe(KEYS[0], seconds)
    client = client_for(parameter_server, detector, "honest")
    assert client.sync(), client.last_error
    assert sum(row["count"] for row in fetch_stats(parameter_server.url, TOKEN)["keys"]) == 604


def test_a_refused_delta_is_dropped_once_and_what_follows_still_reaches_the_server(parameter_server, caplog):
    """A delta the server refuses (400: here an impossible state) would be refused again at every retry, and the
    process would never sync again: it is dropped, said once, and the next delta is merged."""
    from ctzoo.perf import KeyState

    detector = AnomalyDetector(DetectorConfig(skip_first=False))
    detector._delta[tuple(NAME.split("|"))] = KeyState.from_dict(impossible(m2=-1.0))
    client = client_for(parameter_server, detector, "poisoned")
    with caplog.at_level(logging.WARNING, logger="ctzoo.perf"):
        assert not client.sync()
    assert "HTTP 400" in client.last_error and "m2 -1.0 is negative" in client.last_error
    [warning] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert "not sent again" in warning
    for key, seconds in latencies(4, 10):
        detector.observe(key, seconds)
    assert client.sync(), client.last_error
    rows = fetch_stats(parameter_server.url, TOKEN)["keys"]
    assert sorted(row["count"] for row in rows) == [10, 10, 10]  # the honest events; none of the refused 30


def test_a_monitor_does_not_adopt_an_impossible_global_state_and_its_timed_blocks_never_raise(
        parameter_server, caplog):
    """Defence in depth: a server that merged an impossible state (an older one, without the checks; put in
    directly here) must not break the monitors that sync with it."""
    from ctzoo.perf import KeyState

    parameter_server.statistics.states[NAME] = KeyState.from_dict(impossible(m2=-1.0))
    monitor = PerfMonitor(None, DetectorConfig(algorithm="sstd"), server=parameter_server.url, token=TOKEN,
                          sync_every_s=0.05)
    try:
        with caplog.at_level(logging.WARNING, logger="ctzoo.perf"):
            deadline = time.monotonic() + 10
            while monitor.client.syncs < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            for _ in range(3):
                with monitor.timed("m", "1", "model", "cpu", 1):
                    pass
    finally:
        monitor.close()
    [row] = monitor.stats()
    assert row["count"] == 2  # its own events (the first skipped), not the server's 30 impossible ones
    warnings = [r.getMessage() for r in caplog.records if "impossible state" in r.getMessage()]
    # the server answers a key once the process names it, so its own events may be merged into the bad m2 by then
    assert len(warnings) == 1 and NAME in warnings[0] and "m2 -" in warnings[0] and "is negative" in warnings[0]


def test_the_spread_of_an_impossible_state_is_0_and_judging_with_it_does_not_raise():
    detector = AnomalyDetector(DetectorConfig(algorithm="sstd", skip_first=False))
    detector.merge_states({NAME: impossible(m2=-1.0)})  # merge_states does not check: the stats must not raise
    key = tuple(NAME.split("|"))
    assert detector.states[key].moments.std == 0.0
    assert detector.observe(key, 0.01).judged and detector.observe(key, 0.5).anomalous


def _count(server, name=NAME):
    return server.statistics.states[name].moments.count


def test_a_restarted_server_is_reseeded_with_each_process_history(caplog):
    server = ParameterServer(TOKEN, port=0).start()
    port, detector = server.server_address[1], AnomalyDetector()
    client = client_for(server, detector, "p")
    key = tuple(NAME.split("|"))
    for _ in range(201):
        detector.observe(key, 0.02)
    assert client.sync() and _count(server) == 200
    server.close()
    server = ParameterServer(TOKEN, port=port).start()  # a redeploy: the new server remembers nothing
    try:
        for _ in range(5):
            detector.observe(key, 0.02)
        with caplog.at_level(logging.WARNING, logger="ctzoo.perf"):
            assert client.sync()
        # the adopted global state still holds this process's history, and so does the new server
        assert detector.states[key].moments.count == 205 == _count(server)
        assert detector.observe(key, 1.0).anomalous
        assert sum("restarted" in r.getMessage() for r in caplog.records) == 1
        assert client.sync() and _count(server) == 205  # then increments again
    finally:
        server.close()


def test_a_restarted_process_reusing_its_name_is_merged(parameter_server):
    key = tuple(NAME.split("|"))
    for incarnation, events in enumerate((300, 50)):  # PID 1 in a container: the same name after a restart
        detector = AnomalyDetector()
        client = client_for(parameter_server, detector, "serve@pod:1")
        for _ in range(events + 1):
            detector.observe(key, 0.02)
        for _ in range(3 - 2 * incarnation):  # the first incarnation's seq got ahead of the second's
            assert client.sync()
    assert _count(parameter_server) == 350
    [process] = fetch_stats(parameter_server.url, TOKEN)["processes"]
    assert process["keys"][NAME]["learned"] == 350


def test_a_process_gets_only_its_keys_and_idle_keys_and_processes_expire():
    server = ParameterServer(TOKEN, port=0, expire_after_s=0.3).start()
    try:
        mine, theirs = AnomalyDetector(), AnomalyDetector()
        for k in range(50):  # another job's many keys
            for _ in range(3):
                theirs.observe(("old", f"run{k}", "step", "cpu", "1"), 0.02)
        assert client_for(server, theirs, "old").sync() and len(server.statistics.states) == 50
        for _ in range(3):
            mine.observe(tuple(NAME.split("|")), 0.02)
        assert client_for(server, mine, "new").sync()
        assert list(mine.states) == [tuple(NAME.split("|"))]  # not the 50 keys of the other job
        time.sleep(0.4)
        assert client_for(server, mine, "new").sync()
        assert list(server.statistics.states) == [NAME] and list(server.statistics.processes) == ["new"]
    finally:
        server.close()


def test_global_states_are_checked_outside_the_monitor_lock(parameter_server, monkeypatch):
    from ctzoo.perf import KeyState

    lock, held, parse = threading.Lock(), [], KeyState.from_dict.__func__
    monkeypatch.setattr(KeyState, "from_dict", classmethod(lambda cls, data: held.append(lock.locked()) or
                                                           parse(cls, data)))
    detector = AnomalyDetector()
    client = ParameterServerClient(parameter_server.url, TOKEN, detector, lock,
                                   {"process": "p", "role": "test", "rank": None}, lambda: {}, background=False)
    for key, seconds in latencies(0, 30):
        detector.observe(key, seconds)
    assert client.sync() and held and not any(held)


def test_close_gives_up_within_its_timeout_on_a_hung_server():
    hung = socket.socket()  # accepts connections, never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    try:
        client = ParameterServerClient(f"http://127.0.0.1:{hung.getsockname()[1]}", TOKEN, AnomalyDetector(),
                                       threading.Lock(), {"process": "p", "role": "test", "rank": None},
                                       lambda: {}, sync_every_s=0.01)
        time.sleep(0.2)  # the thread is inside its first sync
        started = time.monotonic()
        client.close(timeout_s=1.0)
        assert time.monotonic() - started < 1.5
    finally:
        hung.close()


def test_a_client_that_dies_or_stalls_mid_request_is_one_log_line_not_a_traceback(capfd, caplog, monkeypatch):
    """A client that declares 5000 bytes, sends 100 and closes; one that stalls past the client timeout; a request
    the handler fails on unexpectedly: each is one warning, no traceback on stderr, and the server goes on."""
    server = ParameterServer(TOKEN, port=0, client_timeout_s=0.5).start()
    host, port = server.server_address[:2]
    head = (f"POST /v1/sync HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json"
            "\r\nContent-Length: 5000\r\n\r\n").encode() + b'{"process": "' + b"x" * 87

    def said(part):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            found = [r.getMessage() for r in caplog.records if part in r.getMessage()]
            if found:
                return found
            time.sleep(0.05)
        return []

    try:
        with caplog.at_level(logging.WARNING, logger="ctzoo.perf"):
            with socket.create_connection((host, port)) as died:
                died.sendall(head)
            assert said("sent a truncated body (100 of 5000 bytes)")
            with socket.create_connection((host, port)) as stalled:
                stalled.sendall(head)
                assert said("sent no whole body (TimeoutError)")
            monkeypatch.setattr(server.statistics, "sync", lambda payload: 1 / 0)
            with pytest.raises((http.client.HTTPException, OSError)):  # the connection closes with no answer
                _request(server, "/v1/sync", json.dumps({"process": "p", "seq": 0}).encode())
            assert said("failed (ZeroDivisionError: division by zero)")
            monkeypatch.undo()
            assert json.loads(_get(server, "/v1/stats"))["keys"] == []  # the server goes on
    finally:
        server.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("perf server:")]
    assert len(lines) == 3, lines  # (other tests' clients may still log, from their own threads)
    assert "Traceback" not in capfd.readouterr().err
