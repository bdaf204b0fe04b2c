"""The provenance store keeps anomalies, their neighbours and one normal sample per key, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from ctzoo.perf import DetectorConfig, PerfMonitor, event_key, slice_bucket


def test_slice_buckets_are_powers_of_two():
    assert [slice_bucket(n) for n in (None, 1, 2, 3, 4, 5, 8, 9, 300)] == \
        ["-", "1", "2", "3-4", "3-4", "5-8", "5-8", "9-16", "257-512"]


def test_only_anomalies_their_windows_and_one_normal_sample_are_stored(tmp_path):
    rng = np.random.default_rng(0)
    monitor = PerfMonitor(tmp_path / "perf.sqlite", DetectorConfig(algorithm="sstd"), role="test", window=10)
    predict = event_key("recistnet-mini", "0.3.0", "predict", "cpu", 8)
    slow_at = {300, 600, 900}
    for k in range(1200):
        seconds = 1.0 if k in slow_at else float(rng.normal(0.05, 0.002))
        label = monitor.record(predict, seconds, started=1e9 + k, context={"batch": 8, "request": f"r{k}"})
        assert label.anomalous == (k in slow_at), k
    monitor.close()
    store = PerfMonitor(tmp_path / "perf.sqlite", role="reader").store
    anomalies = store.anomalies()
    assert sorted(a["context"]["request"] for a in anomalies) == ["r300", "r600", "r900"]
    for anomaly in anomalies:
        k = int(anomaly["context"]["request"][1:])
        neighbours = [int(w["context"]["request"][1:]) for w in anomaly["window"]]
        assert neighbours == [*range(k - 5, k), *range(k + 1, k + 6)]  # a window of 10: 5 before, 5 after
        assert anomaly["stage"] == "predict" and anomaly["score"] > 6 and anomaly["algorithm"] == "sstd"
    normal = store.rows("SELECT * FROM events WHERE kind = 'normal'")
    assert len(normal) == 1 and normal[0]["bucket"] == "5-8"
    reduction = store.reduction()
    assert reduction["seen"] == 1200 and reduction["stored"] == 3 * 11 + 1
    assert reduction["ratio"] == pytest.approx(1200 / 34)


def test_patient_identifiers_never_enter_an_event(tmp_path):
    monitor = PerfMonitor(None, role="test")
    with pytest.raises(ValueError, match="patient identifiers"):
        monitor.record(event_key("m", "1", "read", "cpu", 1), 0.1, context={"PatientID": "PAT-1"})


def test_timed_blocks_are_events_and_stats_per_key():
    monitor = PerfMonitor(None, DetectorConfig(min_samples=10), role="test")  # all five in the warm-up
    for _ in range(5):
        with monitor.timed("m", "1", "write", "cpu", slices=20) as context:
            context["files"] = 2
    [row] = monitor.stats()
    assert (row["stage"], row["bucket"], row["count"]) == ("write", "17-32", 4)  # the first event is skipped
    assert row["anomalies"] == 0 and 0 <= row["min_s"] <= row["mean_s"] <= row["max_s"]


def test_a_full_store_drops_its_oldest_anomalies_and_keeps_the_normal_samples(tmp_path):
    """An always-on service must not fill its disk: beyond ``max_events`` anomaly/window rows the oldest go."""
    from ctzoo.perf import Label, ProvenanceStore
    from ctzoo.perf.events import Event

    store = ProvenanceStore(tmp_path / "perf.sqlite", max_events=50)
    key = event_key("recistnet-mini", "0.3.0", "model", "cpu", 1)
    store.insert("normal", Event(key, 0.05, 1e9, "serve@h:1", {}), Label(False, 1.0, 99.0), "hbos")
    for k in range(200):
        store.insert("anomaly", Event(key, 1.0, 1e9 + k, "serve@h:1", {"request": f"r{k}"}), Label(True, 100, 99),
                     "hbos")
    kept = store.rows("SELECT kind, context FROM events ORDER BY id")
    assert kept[0]["kind"] == "normal" and len(kept) <= 1 + 50 + 5  # pruned every max_events / 10 inserts
    assert [row["context"]["request"] for row in kept[1:]][-1] == "r199"  # the newest stay
    store.close()


def test_a_normal_sample_just_before_an_anomaly_is_in_its_window(tmp_path):
    """Key B's normal sample (its first judged event) comes right before key A's anomaly: it is one of the 5 just
    before it in the store's window and in the report's, not skipped for an older event."""
    from ctzoo.perf.report import read_report_data

    monitor = PerfMonitor(tmp_path / "perf.sqlite", DetectorConfig(), role="t", window=10)
    a, b = event_key("m", "1", "a", "cpu", 1), event_key("m", "1", "b", "cpu", 1)
    stream = [(a, 0.010 + 0.0001 * (i % 5)) for i in range(40)] + [(b, 0.002 + 0.00001 * (i % 5)) for i in range(22)]
    stream += [(a, 0.5)] + [(a, 0.010)] * 6
    for i, (key, seconds) in enumerate(stream):
        monitor.record(key, seconds, started=1e9 + i, context={"i": i})
    monitor.close()
    store = PerfMonitor(tmp_path / "perf.sqlite", role="reader").store
    normal_b = store.rows("SELECT context FROM events WHERE kind = 'normal' AND stage = 'b'")
    assert [row["context"]["i"] for row in normal_b] == [61]  # B's 22nd event: its first judged one
    [anomaly] = store.anomalies()
    assert anomaly["context"]["i"] == 62
    expected = [*range(57, 62), *range(63, 68)]
    assert [event["context"]["i"] for event in anomaly["window"]] == expected
    [shown] = read_report_data(tmp_path / "perf.sqlite")["anomalies"]
    assert [event["context"]["i"] for event in shown["window"]] == expected
    assert store.reduction()["stored"] == len(store.rows("SELECT id FROM events")) == 2 + 1 + 10


def test_a_locked_store_never_fails_the_monitored_work_and_is_switched_off_after_repeated_failures(tmp_path, caplog):
    import logging
    import sqlite3

    from ctzoo.perf import ProvenanceStore
    from ctzoo.perf.monitor import MAX_STORE_FAILURES

    rng = np.random.default_rng(0)
    path = tmp_path / "perf.sqlite"
    monitor = PerfMonitor(ProvenanceStore(path, busy_timeout_s=0.05), DetectorConfig(algorithm="sstd"), role="test")
    predict = event_key("m", "1", "predict", "cpu", 1)
    for _ in range(100):
        monitor.record(predict, float(rng.normal(0.05, 0.002)))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another writer (a backup, a VACUUM) holds the lock
    try:
        with caplog.at_level(logging.WARNING, logger="ctzoo.perf"):
            labels = [monitor.record(predict, 1.0) for _ in range(3 * MAX_STORE_FAILURES)]
    finally:
        other.execute("COMMIT")
        other.close()
    assert all(label.anomalous for label in labels)  # judged all the same
    assert monitor.store_disabled is not None and monitor.overhead()["store_errors"] == MAX_STORE_FAILURES
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "failed" in said[0] and "not writing to it any more" in said[1], said
    monitor.record(predict, 1.0)  # switched off: nothing more is tried
    monitor.close()
    assert monitor.overhead()["store_errors"] == MAX_STORE_FAILURES


def test_windows_are_read_through_an_index_also_in_an_older_store(tmp_path):
    import sqlite3

    from ctzoo.perf import ProvenanceStore

    path = tmp_path / "perf.sqlite"
    ProvenanceStore(path).close()
    with sqlite3.connect(path) as old:  # a store written before the index existed
        old.execute("DROP INDEX events_anomaly")
    store = ProvenanceStore(path)
    plan = store.rows("EXPLAIN QUERY PLAN SELECT * FROM events WHERE anomaly_id IN (?, ?) ORDER BY started, id",
                      (1, 2))
    assert any("events_anomaly" in row["detail"] for row in plan), plan
    store.close()


def test_request_hashes_are_keyed_and_a_request_is_found_by_its_id(tmp_path):
    import hashlib

    from ctzoo.perf import request_hash

    assert request_hash("MRN-4711023") == request_hash("MRN-4711023")
    assert request_hash("MRN-4711023") != hashlib.sha256(b"MRN-4711023").hexdigest()[:16]
    rng = np.random.default_rng(0)
    monitor = PerfMonitor(tmp_path / "perf.sqlite", DetectorConfig(algorithm="sstd"), role="test", window=10)
    predict, model = event_key("m", "1", "predict", "cpu", 1), event_key("m", "1", "model", "cpu", 2)
    for k in range(400):
        monitor.record(predict, 1.0 if k == 300 else float(rng.normal(0.05, 0.002)), started=1e9 + k,
                       context={"request": request_hash(f"id-{k}")})
        monitor.record(model, 1.0 if k == 350 else float(rng.normal(0.05, 0.002)), started=1e9 + k + 0.5,
                       context={"requests": f"{request_hash(f'id-{k}')},{request_hash(f'other-{k}')}"})
    monitor.close()
    store = PerfMonitor(tmp_path / "perf.sqlite", role="reader").store
    assert len(store.anomalies()) == 2
    [own] = store.anomalies(request=request_hash("id-300"))
    assert own["stage"] == "predict" and own["seconds"] == 1.0 and len(own["window"]) == 10
    assert [a["id"] for a in store.anomalies(request=request_hash("id-302"))] == [own["id"]]  # in its window
    [batch] = store.anomalies(request=request_hash("other-350"))  # one of the requests a batch merged
    assert batch["stage"] == "model"
    assert store.anomalies(request=request_hash("id-100")) == []


def test_a_separator_in_a_key_part_never_fails_the_work_and_its_statistics_are_kept(tmp_path, monkeypatch):
    """A training run in folder ``exp|lr=1e-3`` is the events' version: the key's parts are joined with ``|`` in the
    store's key states and the parameter server's JSON, so event_key puts ``¦`` in its place. A key made by hand
    with a ``|`` is refused by the store, and that failed write is counted, not raised into the timed work."""
    from ctzoo.perf import ProvenanceStore

    monkeypatch.setattr("ctzoo.perf.provenance.TOTALS_EVERY_S", 0.0)  # every event writes the totals and states
    key = event_key("recistnet", "exp|lr=1e-3", "optimizer_step", "cpu", 2)
    assert key == ("recistnet", "exp¦lr=1e-3", "optimizer_step", "cpu", "2")
    monitor = PerfMonitor(tmp_path / "perf.sqlite", role="train")
    for _ in range(30):
        monitor.record(key, 0.01)
    monitor.close()
    assert monitor.overhead()["store_errors"] == 0
    store = ProvenanceStore(tmp_path / "perf.sqlite", read_only=True)
    [state] = store.key_states()
    assert state["version"] == "exp¦lr=1e-3" and state["state"]["moments"]["count"] == 29  # the first is skipped
    store.close()

    by_hand = PerfMonitor(tmp_path / "other.sqlite", role="train")
    labels = [by_hand.record(("recistnet", "a|b", "optimizer_step", "cpu", "2"), 0.01) for _ in range(2)]
    assert not any(label.anomalous for label in labels)
    assert by_hand.overhead()["store_errors"] == 1  # the second event's: the first is not learned, no state to save
    by_hand.close()


def test_the_event_cap_holds_across_processes_that_each_insert_less_than_a_tenth_of_it(tmp_path):
    """Thirty processes in turn, nine anomaly rows each, against a cap of 100: before, each counted its own inserts
    from zero and never reached the tenth (10) at which it pruned, and the store kept 270 rows."""
    from ctzoo.perf import Label, ProvenanceStore
    from ctzoo.perf.events import Event

    key = event_key("m", "1", "model", "cpu", 1)
    for run in range(30):
        store = ProvenanceStore(tmp_path / "bound.sqlite", max_events=100)
        for k in range(9):
            store.insert("anomaly", Event(key, 1.0, 1e9 + 9 * run + k, f"p{run}", {"k": 9 * run + k}),
                         Label(True, 100, 99), "hbos")
        store.close()
    store = ProvenanceStore(tmp_path / "bound.sqlite", read_only=True)
    kept = [row["context"]["k"] for row in store.rows("SELECT context FROM events ORDER BY id")]
    assert kept == list(range(170, 270))  # the newest 100
    store.close()


def test_old_processes_are_folded_so_totals_and_key_states_stay_bounded_and_exact(tmp_path):
    """Forty processes in turn (restarts), and one restart under the name of the process before it (PID 1 in a
    container): the totals and key states of all but the newest 32 ended processes are folded into one row each,
    summed and merged exactly, so the store stops growing and the report's totals and distributions are those of
    every event; a process silent for a week (crashed) is folded too."""
    import time

    from ctzoo.perf import ProvenanceStore
    from ctzoo.perf.report import read_report_data
    from ctzoo.perf.store_upkeep import EARLIER_PROCESSES, KEEP_ENDED_PROCESSES, SILENT_PROCESS_S

    path, key = tmp_path / "perf.sqlite", event_key("m", "1", "model", "cpu", 1)
    rng = np.random.default_rng(0)
    for role in [f"p{k}" for k in range(40)] + ["p39"]:  # the last one restarts under the same name
        monitor = PerfMonitor(path, DetectorConfig(min_samples=5), role=role)
        for _ in range(25):
            monitor.record(key, float(rng.normal(0.05, 0.002)))
        monitor.close()
    store = ProvenanceStore(path)  # opening for writing tidies the store
    totals = store.rows("SELECT process, seen FROM totals")
    states = store.key_states()
    assert len(totals) == len(states) == KEEP_ENDED_PROCESSES + 1
    assert EARLIER_PROCESSES in {row["process"] for row in totals}
    assert sum(row["seen"] for row in totals) == 41 * 25
    data = read_report_data(path)
    assert data["totals"]["overall"]["seen"] == 41 * 25
    assert [k["count"] for k in data["keys"]] == [41 * 24]  # each process skips its key's first event
    newest = max((row for row in totals if row["process"] != EARLIER_PROCESSES), key=lambda row: row["process"])
    store._db.execute("UPDATE totals SET updated = ? WHERE process = ?", (time.time() - SILENT_PROCESS_S - 1,
                                                                           newest["process"]))
    store._db.execute("UPDATE key_states SET updated = ? WHERE process = ?", (time.time() - SILENT_PROCESS_S - 1,
                                                                               newest["process"]))
    store._db.execute("DELETE FROM ended WHERE process = ?", (newest["process"],))  # it crashed: never said so
    store.close()
    store = ProvenanceStore(path)
    assert newest["process"] not in {row["process"] for row in store.rows("SELECT process FROM totals")}
    assert store.reduction()["seen"] == 41 * 25
    store.close()


def test_anomalies_close_together_show_the_events_before_each_of_them(tmp_path):
    """Events 150 and 152 of 300 (~10 ms each) take 1 s: 152's own rows hold only the 5 after it, as the events
    before it are filed under 150. Its window (the store's and the report's) is the stored events of its process
    nearest it in time, whichever anomaly they are filed under: 147-151 (150 among them) and 153-157."""
    from ctzoo.perf.report import read_report_data

    rng = np.random.default_rng(0)
    monitor = PerfMonitor(tmp_path / "perf.sqlite", DetectorConfig(), role="t", window=10)
    key, clock = event_key("m", "1", "predict", "cpu", 1), 1e9
    for i in range(300):
        seconds = 1.0 if i in (150, 152) else float(0.010 * rng.uniform(0.95, 1.05))
        monitor.record(key, seconds, started=clock, context={"i": i})
        clock += seconds
    monitor.close()
    expected = {150: [*range(145, 150), 151, 152, 153, 154, 155], 152: [*range(147, 152), *range(153, 158)]}
    store = PerfMonitor(tmp_path / "perf.sqlite", role="reader").store
    found = {a["context"]["i"]: [e["context"]["i"] for e in a["window"]] for a in store.anomalies()}
    shown = {a["context"]["i"]: [e["context"]["i"] for e in a["window"]]
             for a in read_report_data(tmp_path / "perf.sqlite")["anomalies"]}
    assert found == shown == expected
