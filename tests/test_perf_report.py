"""``ctzoo perf report``: a real monitor's store -> the CLI -> the page, read and clicked in headless chromium.

Two processes (roles ``serve`` and ``infer``) time a synthetic but realistic stream: lognormal stage times, a
bimodal ``predict`` on the GPU in ``infer`` (two kinds of batch), a ``decode`` key that both processes share (its
states must merge exactly) and five requests whose ``predict`` in ``serve`` took 0.35-0.5 s instead of ~45 ms.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sqlite3
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.cli.perf_report import parse_since
from ctzoo.perf import DetectorConfig, KeyState, PerfMonitor, event_key
from ctzoo.perf.report import read_report_data

ROOT = Path(__file__).resolve().parents[1]
SLOW_REQUESTS = {60: 0.35, 150: 0.41, 240: 0.5, 300: 0.38, 370: 0.44}  # request -> predict seconds in serve


def screenshot_module():
    spec = importlib.util.spec_from_file_location("perf_report_screenshot",
                                                  ROOT / "benchmarks" / "perf_report_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def feed_serve(monitor: PerfMonitor, rng: np.random.Generator, start: float) -> None:
    """400 inference requests of 8 slices: decode, queue, predict, encode; five slow predicts."""
    keys = {stage: event_key("recistnet-mini", "0.3.0", stage, "cpu", 8)
            for stage in ("decode", "queue", "predict", "encode")}
    medians = {"decode": 0.004, "queue": 0.002, "predict": 0.045, "encode": 0.003}
    clock = start
    for request in range(400):
        for stage in keys:
            seconds = float(medians[stage] * rng.lognormal(0, 0.08))
            if stage == "predict" and request in SLOW_REQUESTS:
                seconds = SLOW_REQUESTS[request]
            monitor.record(keys[stage], seconds, started=clock,
                           context={"request": f"req-{request:04d}", "rows": 8, "queue_depth": int(rng.integers(4))})
            clock += seconds
        clock += 0.4


def feed_infer(monitor: PerfMonitor, rng: np.random.Generator, start: float) -> None:
    """300 batches of 8 slices: decode (the same key as serve's), a bimodal predict on the GPU (fp16 ~12 ms, fp32
    ~30 ms), write."""
    clock = start
    for batch in range(300):
        fp16 = batch % 3 != 0
        for stage, median in (("decode", 0.004), ("predict", 0.012 if fp16 else 0.030), ("write", 0.020)):
            seconds = float(median * rng.lognormal(0, 0.05))
            device = "cuda" if stage == "predict" else "cpu"
            monitor.record(event_key("recistnet-mini", "0.3.0", stage, device, 8), seconds, started=clock,
                           context={"batch": batch, "precision": "fp16" if fp16 else "fp32"})
            clock += seconds
        clock += 0.6


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The store (two real monitors), the states each process held at its close, and the CLI's page."""
    folder = tmp_path_factory.mktemp("perf-report")
    store = folder / "perf.sqlite"
    rng, start, closed_states = np.random.default_rng(7), time.time() - 300, {}
    for role, feed in (("serve", feed_serve), ("infer", feed_infer)):
        monitor = PerfMonitor(store, DetectorConfig(), role=role)
        feed(monitor, rng, start)
        closed_states[monitor.process] = monitor.detector.state_dict()
        monitor.close()
    ops = keep_a_deep_profile(store)
    result = CliRunner().invoke(main, ["perf", "report", str(store), "--out", str(folder / "report.html")])
    assert result.exit_code == 0, result.output
    return {"store": store, "html": folder / "report.html", "states": closed_states, "output": result.output,
            "profile_ops": ops}


def keep_a_deep_profile(store: Path) -> list[dict]:
    """A real torch.profiler profile of a small conv net, kept with the slowest serve predict anomaly (as the
    service's DeepProfiler keeps its ONNX Runtime ones); its ops."""
    import gzip

    import torch

    from ctzoo.perf import ProvenanceStore, profile_torch

    [(anomaly_id, seconds)] = query(store, "SELECT id, seconds FROM events WHERE kind = 'anomaly' AND stage = "
                                           "'predict' ORDER BY seconds DESC LIMIT 1")
    net, image = torch.nn.Sequential(torch.nn.Conv2d(9, 16, 3), torch.nn.ReLU()).eval(), torch.ones(2, 9, 64, 64)
    tool, rerun_s, ops, trace = profile_torch(lambda: net(image))
    assert tool == "torch" and 0 < rerun_s < seconds and json.loads(trace)["traceEvents"]
    writer = ProvenanceStore(store)
    writer.save_profile({"anomaly_id": anomaly_id, "tool": tool, "rerun_s": rerun_s, "anomaly_s": seconds,
                         "ops": ops, "trace": gzip.compress(trace)})
    writer.close()
    return ops


def query(store: Path, sql: str, parameters: tuple = ()) -> list[tuple]:
    with sqlite3.connect(store) as db:
        return db.execute(sql, parameters).fetchall()


def test_key_states_are_saved_at_close_and_merged_exactly_across_processes(report):
    rows = query(report["store"], "SELECT process, model, version, stage, device, bucket, state "
                                  "FROM key_states")
    saved = {}
    for process, *key, state in rows:
        saved.setdefault(process, {})["|".join(key)] = json.loads(state)
    assert saved == report["states"]  # what each detector knew when its monitor closed
    serve, infer = (next(p for p in saved if p.startswith(role)) for role in ("serve@", "infer@"))
    decode = "recistnet-mini|0.3.0|decode|cpu|5-8"
    data = read_report_data(report["store"])
    [merged] = [k for k in data["keys"] if k["label"] == "recistnet-mini 0.3.0 · decode · cpu · 5-8"]
    expected = KeyState.from_dict(saved[serve][decode]).merge(KeyState.from_dict(saved[infer][decode]))
    assert merged["count"] == 399 + 299  # each process skips its first event
    assert merged["histogram"] == expected.histogram.to_dict() and merged["mean"] == expected.moments.mean
    assert sorted(merged["processes"]) == sorted([serve, infer])


def test_since_and_limit_select_the_anomalies_shown_not_the_totals_or_distributions(report):
    everything = read_report_data(report["store"])
    started = [a["started"] for a in everything["anomalies"]]
    assert len(started) == everything["anomalies_total"] == len(SLOW_REQUESTS) and started == sorted(started)
    newest_two = read_report_data(report["store"], limit=2)
    assert [a["id"] for a in newest_two["anomalies"]] == [a["id"] for a in everything["anomalies"][-2:]]
    def whole_store(data: dict) -> list[tuple]:
        return [(k["label"], k["count"], k["histogram"], k["anomalies"]) for k in data["keys"]]
    assert whole_store(newest_two) == whole_store(everything) and newest_two["totals"] == everything["totals"]
    third = datetime.fromtimestamp(started[2] - 0.001).isoformat()  # local time, as an operator types it
    since_third = read_report_data(report["store"], since=parse_since(third))
    assert len(since_third["anomalies"]) == 3 and since_third["totals"] == everything["totals"]
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    result = CliRunner().invoke(main, ["perf", "report", str(report["store"]), "--since", "yesterday"])
    assert result.exit_code == 2 and "neither a duration" in result.output


def test_the_page_is_self_contained(report):
    page = report["html"].read_text(encoding="utf-8")
    external = re.findall(r"<(?:script|img|link|iframe|source)\b[^>]*\b(?:src|href)\s*=\s*['\"]?(?:https?:)?//",
                          page, re.IGNORECASE)
    assert external == [] and page.count("<script") == 3  # plotly.js, the data, the page's own script
    assert "</script" not in page.split("id='report-data'>")[1].split("</script>")[0]


def test_a_file_that_is_not_a_perf_store_is_a_clear_error(tmp_path):
    runner = CliRunner()
    not_sqlite = tmp_path / "notes.sqlite"
    not_sqlite.write_text("not a database\n" * 100)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE things (x)")
    for path in (not_sqlite, other):
        result = runner.invoke(main, ["perf", "report", str(path), "--out", str(tmp_path / "r.html")])
        assert result.exit_code == 1 and "is not a ctzoo perf store" in result.output, result.output
        assert isinstance(result.exception, SystemExit)  # a click error, not a traceback
    missing = runner.invoke(main, ["perf", "report", str(tmp_path / "missing.sqlite")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    assert not (tmp_path / "r.html").exists() and query(other, "SELECT name FROM sqlite_master") == [("things",)]


def test_the_page_in_headless_chromium_shows_the_store_and_the_provenance_of_a_clicked_anomaly(report, tmp_path):
    from selenium.webdriver.common.by import By

    assert shutil.which("chromium") and Path("/usr/bin/chromedriver").exists(), \
        "needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver"
    browser = screenshot_module()
    store = report["store"]
    driver = browser.headless_chromium(tmp_path / "chromium-profile")
    try:
        driver.get(report["html"].resolve().as_uri())
        browser.wait_until_drawn(driver)
        # header: the totals per process and overall, as the store holds them
        totals_text = driver.find_element(By.ID, "totals").text
        for process, seen, stored in query(store, "SELECT process, seen, stored FROM totals"):
            assert f"{process} {seen:,} {stored:,} {seen / stored:.2f}×" in totals_text
        seen, stored = query(store, "SELECT SUM(seen), SUM(stored) FROM totals")[0]
        assert seen == 1600 + 900 and f"all processes {seen:,} {stored:,} {seen / stored:.2f}×" in totals_text
        # timeline: one point per anomaly in the store, one row per process
        anomalies = query(store, "SELECT id, stage, seconds, process FROM events WHERE kind = 'anomaly'")
        assert len(anomalies) >= len(SLOW_REQUESTS)
        points = driver.find_elements(By.CSS_SELECTOR, "#timeline .scatterlayer path.point")
        assert len(points) == len(anomalies)
        rows = driver.execute_script("return [...document.querySelectorAll('#timeline .ytick text')]"
                                     ".map(t => t.textContent)")
        assert sorted(rows) == sorted(process for (process,) in query(store, "SELECT process FROM totals"))
        # distributions: one per key, drawn, with the merged count and the key's anomalies as markers
        keys = query(store, "SELECT DISTINCT model, version, stage, device, bucket FROM key_states")
        shown = {k.get_attribute("data-key"): k for k in driver.find_elements(By.CSS_SELECTOR, "#distributions .key")}
        assert set(shown) == {f"{m} {v} · {s} · {d} · {b}" for m, v, s, d, b in keys}
        for label, element in shown.items():
            assert element.find_elements(By.CSS_SELECTOR, ".scatterlayer .js-fill"), label  # the histogram
        assert "n=698 " in shown["recistnet-mini 0.3.0 · decode · cpu · 5-8"].text  # merged over both processes
        markers = driver.find_elements(By.CSS_SELECTOR, "#distributions .scatterlayer path.point")
        assert len(markers) == len(anomalies)
        # a real click on the slowest injected anomaly's point in the timeline
        target_id, target_stage, target_seconds, target_process = max(
            (a for a in anomalies if a[1] == "predict" and a[3].startswith("serve@")), key=lambda a: a[2])
        assert target_seconds == max(SLOW_REQUESTS.values())
        assert driver.find_elements(By.CSS_SELECTOR, "#provenance .field-stage") == []  # empty before the click
        browser.click_anomaly(driver, target_id)  # ActionChains: pointer to the point's SVG marker, then click
        panel = driver.find_element(By.ID, "provenance")
        assert panel.find_element(By.CSS_SELECTOR, ".field-stage").text == target_stage == "predict"
        assert panel.find_element(By.CSS_SELECTOR, ".field-key").text == "recistnet-mini 0.3.0 · predict · cpu · 5-8"
        assert float(panel.find_element(By.CSS_SELECTOR, ".field-seconds").text.removesuffix(" s")) == \
            pytest.approx(target_seconds, rel=1e-3)
        assert "req-0240" in panel.find_element(By.CSS_SELECTOR, "table.context").text and target_process in panel.text
        window = query(store, "SELECT stage, seconds FROM events WHERE anomaly_id = ? ORDER BY started, id",
                       (target_id,))
        assert len(window) == 10  # 5 events before it and 5 after it, from its own process
        shown_window = driver.execute_script(  # one round trip for the table's cells, not one per cell
            "return [...document.querySelectorAll('#provenance table.window tr.window-event')]"
            ".map(row => [...row.cells].map(cell => cell.textContent))")
        assert [cells[1] for cells in shown_window] == [stage for stage, _ in window]
        assert [float(cells[3].removesuffix(" s")) for cells in shown_window] == \
            pytest.approx([seconds for _, seconds in window], rel=1e-3)
        assert panel.find_elements(By.CSS_SELECTOR, "table.window tr.is-anomaly")
        # its deep profile: the slowest operators of the rerun, and that the slowness did not reproduce
        profile_rows = driver.execute_script("return [...document.querySelectorAll('#provenance table.profile tr')]"
                                             ".slice(1).map(r => [...r.cells].map(c => c.textContent))")
        assert [cells[0] for cells in profile_rows] == [op["op"] for op in report["profile_ops"]]
        assert any("conv" in cells[0] for cells in profile_rows)
        assert "not the input" in panel.find_element(By.CSS_SELECTOR, ".profile-verdict").text
        # nothing came over the network: no http(s) resource was even asked for
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert [name for name in resources if not name.startswith(("file:", "data:", "blob:"))] == []
    finally:
        driver.quit()


def a_store_of(path: Path, events: int) -> Path:
    """A closed store of ``events`` anomaly rows (one process, one key)."""
    from ctzoo.perf import Label, ProvenanceStore
    from ctzoo.perf.events import Event

    store, key = ProvenanceStore(path), event_key("recistnet-mini", "0.3.0", "model", "cpu", 1)
    for k in range(events):
        store.insert("anomaly", Event(key, 1.0, 1e9 + k, "serve@h:1", {"request": f"r{k}"}), Label(True, 100, 99),
                     "hbos")
    store.close()
    return path


def test_a_damaged_or_truncated_store_is_a_clear_error_not_a_traceback(tmp_path):
    """A store whose events table has a page overwritten (a bad disk block: the table's root, which every read of
    an event passes through; opening reads only the schema), and one cut after its second page (a copy cut
    short): a one-line error that says the store is damaged, not a traceback, and not "not a ctzoo perf store"."""
    damaged = a_store_of(tmp_path / "damaged.sqlite", 5000)  # about 200 pages
    truncated = tmp_path / "truncated.sqlite"
    truncated.write_bytes(damaged.read_bytes()[:8192])
    [(page_size,)] = query(damaged, "PRAGMA page_size")
    [(root,)] = query(damaged, "SELECT rootpage FROM sqlite_master WHERE name = 'events'")
    with open(damaged, "r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xff" * page_size)
    for path in (damaged, truncated):
        result = CliRunner().invoke(main, ["perf", "report", str(path), "--out", str(tmp_path / "r.html")])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert f"{path} is damaged or truncated (" in result.output, result.output
        assert "not a ctzoo perf store" not in result.output
    assert not (tmp_path / "r.html").exists()


def test_a_report_leaves_no_wal_or_shm_files_beside_a_closed_store(tmp_path):
    store = a_store_of(tmp_path / "perf.sqlite", 50)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["perf.sqlite"]
    data = read_report_data(store)
    assert data["anomalies_total"] == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["perf.sqlite"]
