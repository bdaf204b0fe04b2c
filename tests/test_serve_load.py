"""``ctzoo serve`` under attack, small: the load benchmark's server and ``run_load`` (``benchmarks/serve_load.py``)
with 32 clients, 96 good requests per phase and 8 attackers. Every good request gets 200 and the outputs its input
got alone, every attack its expected 4xx, nothing a 5xx, no temporary file is left behind and the server's memory
stays bounded."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the server's RSS")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return sys.modules[spec.name]


@pytest.mark.timeout(240)
def test_good_requests_stay_correct_while_attacked():
    bench = load_benchmark()
    started = time.monotonic()
    with bench.serve_subprocess() as server:
        result = bench.run_load(server.url, server.token, clients=32, requests=96, attackers=8, timeout_s=60,
                                pid=server.pid)
        leftovers_running = server.new_leftovers()
    attack_free, attacked = result["phases"]
    for phase in (attack_free, attacked):
        assert phase["good_ok"] == phase["good_requests"] == 96, (phase["label"], phase["good_status_codes"],
                                                                 phase["good_failure_examples"])
        assert phase["good_wrong_outputs"] == 0
    assert attack_free["attacks_sent"] == 0
    assert attacked["attacks_sent"] >= len(bench.ATTACKS), attacked["attacks"]  # every kind at least once
    for kind, row in attacked["attacks"].items():
        assert row["sent"] >= 1 and row["as_expected"] == row["sent"], (kind, row)
        assert row["leaked"] == 0
    for kind, first in result["warmup_attacks"].items():
        assert first["status"] == bench.EXPECTED[kind] and not first["leaked"], (kind, first)
    assert result["failures"]["client_5xx"] == 0 and result["server_5xx"] == {}
    assert result["ok"], result["failures"]
    # nothing left by any request, while the server runs and after it stopped
    for leftovers in (leftovers_running, server.new_leftovers(server.leftovers_after_stop)):
        assert leftovers == {"TMPDIR": [], "state/studies": [], "state/tmp": []}, leftovers
    assert server.leftovers_after_stop["state/studies"] == server.leftovers_after_stop["state/tmp"] == []
    assert server.exit_code == 0, server.log_text()[-2000:]
    assert server.token not in server.log_text()
    memory = result["memory_mb"]
    growth = memory["after_under_attack"]["rss_mb"] - memory["warm"]["rss_mb"]
    # a gzip tensor bomb is refused from its inflated JSON header alone (it inflated 257 MiB per request before)
    peak = memory["after_under_attack"]["peak_rss_mb"]
    assert growth < 400, f"RSS grew {growth:.0f} MiB under attack (peak {peak:.0f} MiB): {memory}"
    assert time.monotonic() - started < 200
