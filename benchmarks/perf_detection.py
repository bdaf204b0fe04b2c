"""Does ``ctzoo serve --perf`` find slow requests, name the slow stage, keep little, and cost little?

Two real ``ctzoo serve`` processes on loopback serve recistnet-mini (exported afresh, ``--threads 1``, CPU), both
started through benchmarks/fault_injection.py (the same code: a delay is injected only into requests marked for it):
**on** with ``--perf`` (HBOS, the default, or ``--algorithm``), **off** without. ``--clients`` asyncio clients send
binary FP32 ``image`` [1, 9, 256, 256] requests back to back (8 seeded noise inputs; each request's number is
written into the image so the injector can name it). In one run:

1. **Throughput, on vs off**: ``--rounds`` rounds of ``--round-requests`` requests, alternating off, on, off, on...
   (interleaved, so a machine that gets busier or quieter affects both alike); each on round is compared with the
   mean of the off rounds either side of it, and the ratio reported is the median of those; the same for the
   server's CPU seconds per request (``/proc/PID/stat``, all its threads), steadier than requests/s on a shared
   host.
2. **A queue burst** (on): ``--requests`` requests from the clients; ``--bursts`` times the clients pause (their
   requests in flight finish) and ``--burst-size`` requests are sent at once, then the clients go on once every
   burst request is answered. The server admits ``--max-requests-per-model`` (4) at a time: the rest wait, for a
   request slot and then in the batcher's queue, for two or more model runs. Labelled: the burst's requests but
   the 4 answered first (the cause: waiting; the stage: ``queue``).
3. **A delayed stage** (on, after 2, whose waits it would otherwise disturb: requests queued behind a delayed batch
   wait long too): ``--requests`` requests, a fraction ``--delayed`` of them, spread evenly, marked; a marked
   request's model batch sleeps ``--delay-s`` inside the batcher's model run. Labelled: every request whose model
   run was delayed (the injector writes the request numbers of each delayed batch: requests merged into that batch
   were delayed too).

For 2 and 3, from the provenance store of the **on** server (read after it stopped): a request is *found* when an
anomaly of the labelled stage names its request (the hash of its v2 ``id``: ``request`` in a request's own
events, ``requests`` in a batch's ``model`` event, which lists every request the batch merged); precision = found
labelled / all requests with an anomaly in that stage during the run; recall = found labelled / labelled;
anomalies of other stages during the run are counted (knock-on waits behind a delayed batch are real, and are
shown, not scored). The provenance fraction is stored events / events seen by the **on** server over the whole
run (totals table), and per run. Detector cost: the time the **on** server spent in ``PerfMonitor.record``
(judging, provenance, metrics) per event, as it reports it in ``/v2/perf/stats`` at the end of the run.
Deep profiles: with ``--profiles N`` the **on** server runs with ``--perf-profile N``, so the first N anomalous
model runs (in run 3) are rerun under ONNX Runtime's profiler; the JSON lists each profile (rerun vs anomaly
seconds, whether the slowness reproduced, top operators). Their reruns happen during run 3, as an operator's would,
and compete with it for the machine. Off by default, as in the service.

    python benchmarks/perf_detection.py [--requests 2000] [--clients 4] [--delayed 0.01] [--delay-s 0.5]
        [--bursts 3] [--burst-size 32] [--rounds 11] [--round-requests 400] [--window 10] [--profiles 0]
        [--out benchmarks/results/perf_detection.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import Provenance, versions  # noqa: E402
from fault_injection import MARK  # noqa: E402
from serve_load import HEADER, MODEL, binary_request, good_inputs, serve_subprocess  # noqa: E402

from ctzoo.perf import request_hash  # noqa: E402

LAUNCHER = (str(Path(__file__).resolve().parent / "fault_injection.py"),)
PATH = f"/v2/models/{MODEL}/infer"


def request_body(base: np.ndarray, number: int, delayed: bool, request_id: str) -> tuple[bytes, int]:
    image = base.copy()
    image[0, 0, 0, 1] = number  # exact in float32 below 2**24
    if delayed:
        image[0, 0, 0, 0] = MARK
    return binary_request({"image": image}, request_id)


async def send(http: httpx.AsyncClient, base: np.ndarray, number: int, request_id: str, delayed: bool = False) -> dict:
    body, length = request_body(base, number, delayed, request_id)
    sent = time.time()
    start = time.perf_counter()
    response = await http.post(PATH, content=body, headers={HEADER: str(length)})
    return {"id": request_id, "number": number, "sent": sent, "seconds": time.perf_counter() - start,
            "status": response.status_code}


async def steady(url: str, token: str, clients: int, count: int, prefix: str, inputs: list[np.ndarray],
                 marked: set[int] = frozenset(), bursts: int = 0, burst_size: int = 0) -> dict:
    """``count`` requests from ``clients`` clients back to back (numbers ``prefix``-0...), with ``bursts`` bursts of
    ``burst_size`` requests at once, evenly spread over the run."""
    limits = httpx.Limits(max_connections=clients + burst_size + 4)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120,
                                 limits=limits) as http:
        numbers, done, bursts_done, burst_results = iter(range(count)), [], [], []
        go = asyncio.Event()  # cleared while a burst is served: the clients pause
        go.set()
        in_flight = [0]

        async def client() -> None:
            while True:
                await go.wait()
                number = next(numbers, None)
                if number is None:
                    return
                in_flight[0] += 1
                done.append(await send(http, inputs[number % len(inputs)], number, f"{prefix}-{number}",
                                       number in marked))
                in_flight[0] -= 1

        async def burster() -> None:
            for b in range(bursts):
                while len(done) < (b + 1) * count // (bursts + 1):
                    await asyncio.sleep(0.01)
                go.clear()
                while in_flight[0]:  # the clients' requests in flight finish first
                    await asyncio.sleep(0.005)
                results = await asyncio.gather(*(send(http, inputs[i % len(inputs)], count + b * burst_size + i,
                                                      f"{prefix}-burst{b}-{i}") for i in range(burst_size)))
                bursts_done.append(sorted(results, key=lambda r: r["seconds"]))
                burst_results.extend(results)
                go.set()

        start = time.perf_counter()
        await asyncio.gather(burster(), *(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"requests": done + burst_results, "wall_s": wall, "requests_per_s": count / wall,
            "bursts": bursts_done}


def anomalies(store: Path, since: float, until: float) -> list[dict]:
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT stage, seconds, context FROM events WHERE kind = 'anomaly' AND started >= ? AND "
                          "started <= ?", (since, until)).fetchall()
    found = []
    for stage, seconds, context in rows:
        context = json.loads(context)  # a request's own event names it, a batch's event the requests it merged
        named = context["requests"].split(",") if context.get("requests") else [context.get("request")]
        found.append({"stage": stage, "seconds": seconds, "requests": named})
    return found


def score(run: dict, labelled_ids: set[str], stage: str, store: Path) -> dict:
    """Precision/recall of ``stage``'s anomalies against the labelled requests, and the other stages' anomalies."""
    requests = run["requests"]
    since, until = min(r["sent"] for r in requests) - 1, max(r["sent"] + r["seconds"] for r in requests) + 1
    found = anomalies(store, since, until)
    hashes = {request_hash(i): i for i in (r["id"] for r in requests)}
    flagged = {hashes[h] for a in found if a["stage"] == stage for h in a["requests"] if h in hashes}
    hits = flagged & labelled_ids
    others: dict[str, int] = {}
    for a in found:
        if a["stage"] != stage:
            others[a["stage"]] = others.get(a["stage"], 0) + 1
    return {"stage": stage, "requests": len(requests), "labelled": len(labelled_ids), "flagged": len(flagged),
            "found": len(hits), "precision": len(hits) / len(flagged) if flagged else None,
            "recall": len(hits) / len(labelled_ids) if labelled_ids else None, "other_stage_anomalies": others,
            "requests_per_s": run["requests_per_s"]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def paired_ratios(rounds: list[dict], field: str) -> list[float]:
    """Each on round's ``field`` over the mean of the off rounds either side of it."""
    return [rounds[k][field] / np.mean([rounds[k - 1][field], rounds[k + 1][field]])
            for k in range(1, len(rounds) - 1, 2)]


def provenance_totals(store: Path, phases: dict[str, tuple[float, float, int]]) -> dict:
    """Stored / seen over the whole run (the totals table), and per phase ``{name: (start, end, events)}``: rows
    whose event started in it over the events the server recorded in it."""
    with sqlite3.connect(store) as db:
        seen, stored = db.execute("SELECT SUM(seen), SUM(stored) FROM totals").fetchone()
        kinds = dict(db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall())
        by_phase = {}
        for name, (start, end, events) in phases.items():
            rows = dict(db.execute("SELECT kind, COUNT(*) FROM events WHERE started >= ? AND started <= ? "
                                   "GROUP BY kind", (start, end)).fetchall())
            by_phase[name] = {"events": events, "stored": sum(rows.values()), "by_kind": rows,
                              "fraction": sum(rows.values()) / events}
    return {"seen": seen, "stored": stored, "fraction": stored / seen, "by_kind": kinds, "by_phase": by_phase}


def deep_profiles(store: Path) -> list[dict]:
    """The profiles the on server took: its anomaly's stage, seconds of the anomaly and the rerun, whether the
    slowness reproduced, the 3 slowest operators."""
    from ctzoo.perf import ProvenanceStore

    reader = ProvenanceStore(store, read_only=True)
    try:
        profiles = reader.profiles()
        stages = {row["id"]: row["stage"] for row in reader.rows("SELECT id, stage FROM events WHERE kind = 'anomaly'")}
    finally:
        reader.close()
    return [{"stage": stages.get(anomaly_id), "tool": p["tool"], "anomaly_s": p["anomaly_s"], "rerun_s": p["rerun_s"],
             "reproduces": p["reproduces"], "trace_bytes": p["trace_bytes"], "top_ops": p["ops"][:3]}
            for anomaly_id, p in profiles.items()]


def span(run: dict, events: int) -> tuple[float, float, int]:
    requests = run["requests"]
    return (min(r["sent"] for r in requests), max(r["sent"] + r["seconds"] for r in requests), events)


def events_seen(server) -> int:
    """The events the server's monitor has recorded so far (its stats route first records the queued ones)."""
    stats = httpx.get(server.url + "/v2/perf/stats", headers={"Authorization": f"Bearer {server.token}"}).json()
    return stats["overhead"]["events"]


def run(args: argparse.Namespace) -> dict:
    inputs = good_inputs(8, args.seed)
    with tempfile.TemporaryDirectory(prefix="ctzoo-perf-bench-") as tmp:
        truth = Path(tmp) / "delayed-requests.txt"
        env = {"CTZOO_FAULT_STAGE": "model", "CTZOO_FAULT_DELAY_S": str(args.delay_s), "CTZOO_FAULT_TRUTH": str(truth)}
        common = ["--max-queue-delay-ms", "5"] if args.server_args is None else args.server_args.split()
        store = Path(tmp) / "perf.sqlite"  # outlives the server's state folder: read once the server stopped
        on_args = [*common, "--perf", "--perf-algorithm", args.algorithm, "--perf-store", str(store),
                   "--perf-window", str(args.window), "--perf-profile", str(args.profiles)]
        with serve_subprocess(extra_args=common, launcher=LAUNCHER, env=env) as off, \
                serve_subprocess(extra_args=on_args, launcher=LAUNCHER, env=env) as on:
            print(f"servers up: off {off.url}, on {on.url}", flush=True)
            for server in (off, on):  # warm-up: sessions, first calls, the detector's first 20 events per key
                asyncio.run(steady(server.url, server.token, args.clients, 100, "warmup", inputs))
            rounds, phases = [], {}
            started = time.time()
            for k in range(args.rounds):
                server, label = (off, "off") if k % 2 == 0 else (on, "on")
                cpu = cpu_seconds(server.pid)
                result = asyncio.run(steady(server.url, server.token, args.clients, args.round_requests,
                                            f"round{k}", inputs))
                cpu_ms = 1000 * (cpu_seconds(server.pid) - cpu) / args.round_requests
                rounds.append({"perf": label, "requests_per_s": result["requests_per_s"], "wall_s": result["wall_s"],
                               "server_cpu_ms_per_request": cpu_ms})
                print(f"round {k} ({label}): {result['requests_per_s']:.2f} req/s, server CPU {cpu_ms:.1f} ms per "
                      f"request", flush=True)
            seen = events_seen(on)
            phases["warm-up and throughput rounds"] = (started - 600, time.time(), seen)
            burst_run = asyncio.run(steady(on.url, on.token, args.clients, args.requests, "burst", inputs,
                                           bursts=args.bursts, burst_size=args.burst_size))
            print(f"burst run: {burst_run['requests_per_s']:.2f} req/s", flush=True)
            burst_events = events_seen(on) - seen
            seen += burst_events
            step = max(1, round(1 / args.delayed))
            marked = set(range(step // 2, args.requests, step))
            delayed_run = asyncio.run(steady(on.url, on.token, args.clients, args.requests, "delay", inputs, marked))
            print(f"delayed-stage run: {delayed_run['requests_per_s']:.2f} req/s", flush=True)
            delayed_events = events_seen(on) - seen
            stats = httpx.get(on.url + "/v2/perf/stats", headers={"Authorization": f"Bearer {on.token}"}).json()
        delayed_numbers = {int(line) for line in truth.read_text().split()} if truth.exists() else set()
        delayed_ids = {r["id"] for r in delayed_run["requests"] if r["number"] in delayed_numbers}
        # a burst's requests but the ones admitted at once (the first answered), which did not wait for a slot
        burst_ids = {r["id"] for burst in burst_run["bursts"] for r in burst[args.slots:]}
        if args.keep_store:
            args.keep_store.write_bytes(store.read_bytes())
        statuses = [r["status"] for run_ in (delayed_run, burst_run) for r in run_["requests"]]
        paired = paired_ratios(rounds, "requests_per_s")
        cpu_paired = paired_ratios(rounds, "server_cpu_ms_per_request")
        return {"rounds": rounds, "throughput_ratio_on_vs_off": float(np.median(paired)),
                "throughput_ratios_paired": paired, "server_cpu_ratio_on_vs_off": float(np.median(cpu_paired)),
                "server_cpu_ratios_paired": cpu_paired,
                "delayed_stage": {**score(delayed_run, delayed_ids, "model", store), "delay_s": args.delay_s,
                                  "marked": len(marked)},
                "burst": {**score(burst_run, burst_ids, "queue", store), "bursts": args.bursts,
                          "burst_size": args.burst_size, "unlabelled_first_answered": args.slots},
                "provenance": provenance_totals(store, {**phases, "burst run": span(burst_run, burst_events),
                                                        "delayed-stage run": span(delayed_run, delayed_events)}),
                "detector_cost": stats["overhead"], "deep_profiles": deep_profiles(store),
                "window": args.window, "algorithm": args.algorithm,
                "non_200": sum(s != 200 for s in statuses), "server_exit_codes": [off.exit_code, on.exit_code]}


def report(result: dict) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f} %"

    lines = ["| run | requests | labelled | flagged in stage | precision | recall | other-stage anomalies |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name in ("delayed_stage", "burst"):
        row = result[name]
        others = ", ".join(f"{k}: {v}" for k, v in sorted(row["other_stage_anomalies"].items())) or "none"
        title = (f"model stage +{row['delay_s']:g} s on {row['marked']} requests" if name == "delayed_stage"
                 else f"{row['bursts']} bursts of {row['burst_size']} (stage queue)")
        lines.append(f"| {title} | {row['requests']} | {row['labelled']} | {row['flagged']} | {pct(row['precision'])} "
                     f"| {pct(row['recall'])} | {others} |")
    prov, cost = result["provenance"], result["detector_cost"]
    lines += ["", "| phase (on server) | events | stored (anomalies + windows + normal samples) | fraction |",
              "|---|---:|---:|---:|"]
    for name, row in prov["by_phase"].items():
        lines.append(f"| {name} | {row['events']} | {row['stored']} | {pct(row['fraction'])} |")
    lines += ["", f"provenance: {prov['stored']} of {prov['seen']} events stored ({pct(prov['fraction'])}); "
              f"detector cost {cost['us_per_event']:.1f} us per event; throughput on/off "
              f"{result['throughput_ratio_on_vs_off']:.3f} and server CPU per request on/off "
              f"{result['server_cpu_ratio_on_vs_off']:.3f} (medians of {len(result['throughput_ratios_paired'])} "
              f"on rounds, each against the off rounds either side)"]
    for p in result["deep_profiles"]:
        lines.append(f"deep profile ({p['tool']}) of a {p['stage']} anomaly of {p['anomaly_s']:.3f} s: rerun "
                     f"{p['rerun_s']:.3f} s ({'reproduced' if p['reproduces'] else 'not reproduced'}); slowest "
                     + ", ".join(f"{op['op']} {1000 * op['seconds']:.1f} ms" for op in p["top_ops"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per detection run (default 2000)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--delayed", type=float, default=0.01, help="fraction of requests delayed (default 0.01)")
    parser.add_argument("--delay-s", type=float, default=0.5, help="the injected model-stage delay (default 0.5)")
    parser.add_argument("--bursts", type=int, default=3, help="bursts in the burst run (default 3)")
    parser.add_argument("--burst-size", type=int, default=32, help="requests per burst (default 32)")
    parser.add_argument("--slots", type=int, default=4, help="the servers' --max-requests-per-model (default 4): "
                        "the burst requests answered first that many are not labelled")
    parser.add_argument("--rounds", type=int, default=11,
                        help="interleaved throughput rounds, off/on/.../off (odd; default 11)")
    parser.add_argument("--round-requests", type=int, default=400, help="requests per round (default 400)")
    parser.add_argument("--window", type=int, default=10, help="the on server's --perf-window (default 10)")
    parser.add_argument("--algorithm", choices=("hbos", "sstd"), default="hbos")
    parser.add_argument("--profiles", type=int, default=0, help="the on server's --perf-profile (default 0, the "
                        "service's default: deep profiles are armed on demand)")
    parser.add_argument("--server-args", default=None, help="ctzoo serve options for both servers "
                        "(default \"--max-queue-delay-ms 5\")")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-store", type=Path, default=None,
                        help="copy the on server's provenance store here (for ctzoo perf report)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "perf_detection.json")
    args = parser.parse_args()
    if args.rounds < 3 or args.rounds % 2 == 0:
        parser.error("--rounds must be odd and at least 3 (off, on, off, ...)")
    provenance = Provenance()
    started = time.perf_counter()
    result = {"benchmark": "perf_detection", **run(args)}
    result.update(settings=vars(args) | {"out": str(args.out), "keep_store": str(args.keep_store)},
                  wall_s=time.perf_counter() - started,
                  provenance=provenance.record(**versions("onnxruntime", "httpx")))
    table = report(result)
    result["table"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    ok = (result["non_200"] == 0 and result["server_exit_codes"] == [0, 0]
          and all((result[n]["precision"] or 0) >= 0.9 and (result[n]["recall"] or 0) >= 0.9
                  for n in ("delayed_stage", "burst")))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
