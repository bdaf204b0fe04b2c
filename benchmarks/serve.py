"""Does ``ctzoo serve`` keep up under concurrent load? Micro-batching on vs off, and the model alone, in one run.

Models: the zoo models given by ``--models`` (default recistnet-mini and template-seg-abdomen), exported with
``ctzoo.export.repository.export_model`` into a temporary model repository (each graph checked against PyTorch there).

Input: real CT, the embedded 20-slice sample series (``ctzoo/datasets/sample_ct``), prepared as ``ctzoo infer``
prepares it; ``--slices`` different slices per model, each request carrying one of them (in turn):
  * detector: one preprocessed 9-channel slice (``slice_inputs`` on the 512 x 512 inference canvas), cut to the
    central ``--crop`` x ``--crop`` pixels (default 256, to keep CPU time sane; 0: the whole 512 canvas);
  * segmenter: one 128 x 128 slice (``volume_to_slices``) with its nearest bank template (image + masks).

Rows:
  * service: the real ``ctzoo serve`` command in a subprocess on 127.0.0.1 (a free port, a bearer token,
    ``--device cpu --threads T``), twice and at the same time: with micro-batching (each model's max batch from
    ctzoo.json, 16, and ``--max-queue-delay-ms``, default 5) and with ``--no-batching``. For each model and
    concurrency C (``--concurrency``, default 1, 8, 32), C asyncio + httpx clients send single-slice KServe v2
    requests (binary tensor extension, binary outputs) back to back, ``--requests`` in all, first to the batching
    server then to the other (so both see the same machine load); C untimed requests warm each setting up (and a
    burst at the highest concurrency warms each model up once per server). Reported: requests/s (requests / wall
    time), p50 and p99 latency (client side, send to last byte), rows per model run and mean queue wait (from the
    server's /metrics over the timed requests), server and client CPU ms per request, and the ratio batching on /
    off of requests/s (the target: >= 1.3 at concurrency 32). Every response is checked: status 200, each output's
    shape, and its values against ONNX Runtime on that slice alone (max relative error); non-200s, transport errors
    and wrong outputs are counted (must all be 0);
  * model only: the repository graph in ONNX Runtime with the service's own session (``ServedModel.run``: intra-op
    threads T, inter-op 1, spinning off) and with ORT's default spinning on, against PyTorch eager on the same
    weights (``torch.set_num_threads(T)``, inference mode; the segmenter as the graph computes it,
    ``model(image, template)``) at batch 1 and 16, slices/s of the median call; ratio ORT (as served) / eager
    (the target: >= 1, ORT no slower). Both are timed again with one thread (eager: ``set_num_threads(1)``; ORT:
    the service's session options with 1 intra-op thread): PyTorch's OpenMP threads wait for each other at every
    parallel region, so on a machine with other work on its cores eager with T threads can be many times slower
    than with one; the 1-thread pair shows the runtimes without that effect.
  * stability: each server's RSS (``/proc/<pid>/status`` VmRSS) once loaded, after the warm-up, after each setting
    and after all load, then after the highest-concurrency setting of each model is run once more (it levelled
    off if that repeat grew it by at most 5% + 10 MiB), and its peak (VmHWM).
Threads: ``--threads`` (default: the CPU count) for the service's ONNX Runtime, ORT and PyTorch alike. The client
runs in this process on the same machine, so it takes CPU from the server too (its CPU per request is reported).

Both servers admit ``max(--concurrency)`` requests per model at once (``--max-requests-per-model``): the service's
default, 4, is a memory bound chosen under attack (``benchmarks/serve_load.py``) and would cap every merged batch
at 4 requests.

Backend (``--backend torch --device cuda [--precision fp32|bf16|auto]``): both servers run ``ctzoo serve --backend
torch`` on that device (each model's bundle in PyTorch, the module its graph was exported from); responses are still
checked against ONNX Runtime on the CPU, within 1e-3 in fp32 and within the bf16 check's tolerance (0.1) otherwise.
The model-only rows are then the served engine itself (``ServedModel.run``) at each batch size, against batch 1:
what merging can buy at most. ``--target-ratio`` sets the batching target (1.3 on the CPU; the GPU issue asks 2).

    python benchmarks/serve.py [--models recistnet-mini,template-seg-abdomen] [--requests 128]
                               [--concurrency 1,8,32] [--queue-delay-ms 5] [--crop 256] [--threads N]
                               [--backend onnx|torch] [--device cpu|cuda] [--precision fp32]
                               [--out benchmarks/results/serve.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import torch
from prometheus_client.parser import text_string_to_metric_families

from ctzoo.inference.precision import BF16_RELATIVE_TOLERANCE
from ctzoo.models import load_bundle
from ctzoo.serve.engines import Runtime
from ctzoo.serve.repository import GRAPH_FILE, ServedModel

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance, versions  # noqa: E402

HEADER = "Inference-Header-Content-Length"
TOLERANCE = 1e-3  # max relative error of a served output against ORT on the slice alone


# ------------------------------------------------------------------------------------------------ input


@dataclass
class Workload:
    """One model's requests: ``slices[k]`` is one request's inputs (each with batch 1), ``reference[k]`` ORT's
    outputs on it alone, ``model`` the PyTorch model (eager baseline)."""

    name: str
    task: str
    slices: list[dict[str, np.ndarray]]
    reference: list[dict[str, np.ndarray]] = field(default_factory=list)
    model: torch.nn.Module | None = None
    description: str = ""
    tolerance: float = TOLERANCE  # of a served output against ``reference``


def _spread(count: int, wanted: int) -> list[int]:
    """``wanted`` indices spread over ``range(count)`` (repeating when there are fewer)."""
    return [int(round(x)) % count for x in np.linspace(0, count - 1, wanted)] if wanted <= count else \
        [k % count for k in range(wanted)]


def build_workload(name: str, volume, count: int, crop: int) -> Workload:
    item = load_bundle(name)
    if item.task == "detection":
        from ctzoo.inference.recist_volume import canvas_size, slice_inputs
        from ctzoo.io import reorient_lps

        prep = item.preprocessing
        canvas = canvas_size(prep)
        images = [image.numpy() for image, _ in slice_inputs(reorient_lps(volume), prep, canvas=canvas)]
        if crop and crop < canvas:
            lo = (canvas - crop) // 2
            images = [image[:, lo:lo + crop, lo:lo + crop] for image in images]
        picked = [np.ascontiguousarray(images[k][None], np.float32) for k in _spread(len(images), count)]
        shape = "x".join(map(str, picked[0].shape))
        text = (f"{count} of the {len(images)} slices, each one preprocessed 9-channel slice on the {canvas} px "
                f"canvas" + (f", central {crop} x {crop} crop" if crop and crop < canvas else "") + f": {shape}")
        return Workload(name, item.task, [{"image": image} for image in picked], model=item.network(),
                        description=text)
    from ctzoo.datasets.seg_preprocessing import volume_to_slices

    slices, _ = volume_to_slices(volume, item.preprocessing)
    slices = torch.from_numpy(np.ascontiguousarray(slices.numpy(), dtype=np.float32))
    with torch.inference_mode():
        nearest = item.template_bank.nearest(item.network(), slices).cpu()
    templates = item.template_bank.templates(nearest).numpy()
    picked = _spread(len(slices), count)
    requests = [{"image": np.ascontiguousarray(slices[k:k + 1].numpy()),
                 "template": np.ascontiguousarray(templates[k:k + 1])} for k in picked]
    text = (f"{count} of the {len(slices)} slices, each one slice {'x'.join(map(str, requests[0]['image'].shape))} "
            f"+ its nearest bank template {'x'.join(map(str, requests[0]['template'].shape))}")
    return Workload(name, item.task, requests, model=item.network(), description=text)


# ------------------------------------------------------------------------------------------------ model only


def median_rate(function, batch: dict[str, np.ndarray], min_s: float, min_runs: int = 3) -> dict:
    """Slices/s of the median call of ``function(batch)`` after one warm-up call, over at least ``min_runs``
    calls and ``min_s`` seconds."""
    function(batch)
    rows = next(iter(batch.values())).shape[0]
    seconds, start = [], time.perf_counter()
    while len(seconds) < min_runs or time.perf_counter() - start < min_s:
        tick = time.perf_counter()
        function(batch)
        seconds.append(time.perf_counter() - tick)
    return {"slices_per_s": rows / float(np.median(seconds)), "calls": len(seconds),
            "median_call_ms": 1000 * float(np.median(seconds))}


def eager(workload: Workload):
    model = workload.model

    def run(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            if workload.task == "detection":
                outputs = model(torch.from_numpy(batch["image"]))
                return {name: value.numpy() for name, value in outputs.items()}
            return {"logits": model(torch.from_numpy(batch["image"]), torch.from_numpy(batch["template"])).numpy()}

    return run


def spinning_session(graph: Path, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda batch: dict(zip(names, session.run(names, batch)))


def model_only(workload: Workload, served: ServedModel, threads: int, sizes: list[int], min_s: float) -> list[dict]:
    torch.set_num_threads(threads)
    spin = spinning_session(served.folder / served.version / GRAPH_FILE, threads)
    served_one = ServedModel(served.folder, Runtime(threads=1))
    rows = []
    for size in sizes:
        picked = [workload.slices[k % len(workload.slices)] for k in range(size)]
        batch = {name: np.concatenate([s[name] for s in picked]) for name in picked[0]}
        ort_served = median_rate(served.run, batch, min_s)
        ort_spin = median_rate(spin, batch, min_s)
        torch_eager = median_rate(eager(workload), batch, min_s)
        torch.set_num_threads(1)  # process-wide: only for this measurement
        try:
            torch_one = median_rate(eager(workload), batch, min_s)
        finally:
            torch.set_num_threads(threads)
        ort_one = median_rate(served_one.run, batch, min_s)
        rows.append({"model": workload.name, "batch": size, "threads": threads,
                     "input": {k: list(v.shape) for k, v in batch.items()},
                     "eager_slices_per_s": torch_eager["slices_per_s"], "eager": torch_eager,
                     "ort_slices_per_s": ort_served["slices_per_s"], "ort": ort_served,
                     "ort_spinning_slices_per_s": ort_spin["slices_per_s"], "ort_spinning": ort_spin,
                     "ratio_ort_vs_eager": ort_served["slices_per_s"] / torch_eager["slices_per_s"],
                     "one_thread": {"eager_slices_per_s": torch_one["slices_per_s"], "eager": torch_one,
                                    "ort_slices_per_s": ort_one["slices_per_s"], "ort": ort_one,
                                    "ratio_ort_vs_eager": ort_one["slices_per_s"] / torch_one["slices_per_s"]}})
        print(f"  model only {workload.name} batch {size}: eager {torch_eager['slices_per_s']:.1f} (1 thread "
              f"{torch_one['slices_per_s']:.1f}), ORT {ort_served['slices_per_s']:.1f} (1 thread "
              f"{ort_one['slices_per_s']:.1f}, "
              f"spinning {ort_spin['slices_per_s']:.1f}) slices/s", flush=True)
    return rows


def served_engine_only(workload: Workload, served: ServedModel, sizes: list[int], min_s: float) -> list[dict]:
    """The served engine alone (``ServedModel.run``: a torch backend on its device) at each batch size: slices/s of
    the median call and the ratio to batch 1, the most that merging requests can buy."""
    rows = []
    for size in sizes:
        picked = [workload.slices[k % len(workload.slices)] for k in range(size)]
        batch = {name: np.concatenate([s[name] for s in picked]) for name in picked[0]}
        rate = median_rate(served.run, batch, min_s)
        rows.append({"model": workload.name, "batch": size, "engine": served.engine.name,
                     "input": {k: list(v.shape) for k, v in batch.items()},
                     "served_slices_per_s": rate["slices_per_s"], "served": rate})
        print(f"  model only {workload.name} batch {size}: {served.engine.name} {rate['slices_per_s']:.1f} slices/s",
              flush=True)
    for row in rows:
        row["ratio_vs_batch_1"] = row["served_slices_per_s"] / rows[0]["served_slices_per_s"]
    return rows


# ------------------------------------------------------------------------------------------------ service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in MiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    values = stat[stat.rindex(")") + 2:].split()
    return (int(values[11]) + int(values[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """``ctzoo serve`` in a subprocess on a free loopback port."""

    def __init__(self, label: str, repo: Path, token: str, threads: int, batching: bool, delay_ms: float,
                 log: Path, backend: list[str]) -> None:
        self.label, self.batching, self.port = label, batching, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "ctzoo", "serve", "--repository", str(repo), "--host", "127.0.0.1",
                   "--port", str(self.port), "--threads", str(threads), *backend,
                   "--state-dir", str(log.parent / f"{label}-state")]  # one each: a service locks its own
        command += ["--max-queue-delay-ms", str(delay_ms)] if batching else ["--no-batching"]
        self.command, self.log = command, log
        self._log = log.open("wb")
        self.process = subprocess.Popen(command, env={**os.environ, "CTZOO_SERVE_TOKENS": token},
                                        stdout=self._log, stderr=subprocess.STDOUT)
        self.memory: dict[str, dict[str, float]] = {}

    def wait_live(self, timeout_s: float = 180) -> float:
        start = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} server exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.url + "/v2/health/live", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"{self.label} server did not come up in {timeout_s:g} s")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def request_body(inputs: dict[str, np.ndarray]) -> tuple[bytes, str]:
    """A KServe v2 request with binary inputs and binary outputs, and its JSON header's length."""
    header = {"inputs": [{"name": name, "datatype": "FP32", "shape": list(value.shape),
                          "parameters": {"binary_data_size": value.nbytes}} for name, value in inputs.items()],
              "parameters": {"binary_data_output": True}}
    text = json.dumps(header).encode()
    return text + b"".join(np.ascontiguousarray(v, np.float32).tobytes() for v in inputs.values()), str(len(text))


def check_response(response: httpx.Response, reference: dict[str, np.ndarray]) -> tuple[bool, float]:
    """(every output there with the right shape, worst max relative error against ``reference``)."""
    length = int(response.headers[HEADER])
    header, offset, worst = json.loads(response.content[:length]), length, 0.0
    got = {}
    for tensor in header["outputs"]:
        size = tensor["parameters"]["binary_data_size"]
        got[tensor["name"]] = np.frombuffer(response.content[offset:offset + size], np.float32).reshape(
            tensor["shape"])
        offset += size
    if sorted(got) != sorted(reference) or offset != len(response.content):
        return False, float("inf")
    for name, want in reference.items():
        if got[name].shape != want.shape:
            return False, float("inf")
        worst = max(worst, float(np.abs(got[name] - want).max() / (np.abs(want).max() + 1e-6)))
    return True, worst


async def drive(server: Server, token: str, workload: Workload, bodies: list[tuple[bytes, str]], concurrency: int,
                requests: int, warmup: int) -> dict:
    """``warmup`` untimed requests, then ``requests`` timed ones, from ``concurrency`` clients back to back."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    auth = {"Authorization": f"Bearer {token}"}
    path = f"/v2/models/{workload.name}/infer"
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits, headers=auth) as http:

        async def run(count: int) -> list[tuple[float, int, bool, float]]:
            counter, results = itertools.count(), []

            async def client() -> None:
                while (k := next(counter)) < count:
                    index = k % len(bodies)
                    body, length = bodies[index]
                    start = time.perf_counter()
                    try:
                        response = await http.post(path, content=body, headers={HEADER: length})
                        seconds = time.perf_counter() - start
                    except httpx.HTTPError:
                        results.append((time.perf_counter() - start, -1, False, float("inf")))
                        continue
                    ok, error = check_response(response, workload.reference[index]) \
                        if response.status_code == 200 else (False, float("inf"))
                    results.append((seconds, response.status_code, ok, error))

            await asyncio.gather(*(client() for _ in range(concurrency)))
            return results

        if warmup:
            await run(warmup)
        if not requests:
            return {}
        before = await scrape(http, workload.name)
        cpu_server, cpu_client = cpu_seconds(server.process.pid), time.process_time()
        start = time.perf_counter()
        results = await run(requests)
        wall = time.perf_counter() - start
        cpu_server, cpu_client = cpu_seconds(server.process.pid) - cpu_server, time.process_time() - cpu_client
        after = await scrape(http, workload.name)
    latencies = np.array([r[0] for r in results])
    statuses = [r[1] for r in results]
    served = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    runs = served.get("ctzoo_batch_size_count", 0.0)
    queued = served.get("ctzoo_request_stage_seconds_count|queue", 0.0)
    return {"model": workload.name, "server": server.label, "batching": server.batching, "concurrency": concurrency,
            "requests": requests, "warmup_requests": warmup, "wall_s": wall, "requests_per_s": requests / wall,
            "latency_ms": {"p50": 1000 * float(np.percentile(latencies, 50)),
                           "p90": 1000 * float(np.percentile(latencies, 90)),
                           "p99": 1000 * float(np.percentile(latencies, 99)),
                           "mean": 1000 * float(latencies.mean()), "max": 1000 * float(latencies.max())},
            "non_200": sum(1 for s in statuses if s != 200), "transport_errors": statuses.count(-1),
            "status_codes": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "bad_outputs": sum(1 for r in results if r[1] == 200 and not (r[2] and r[3] <= workload.tolerance)),
            "max_rel_error": max((r[3] for r in results if r[1] == 200), default=None),
            "model_runs": runs, "rows_per_run": served.get("ctzoo_batch_size_sum", 0.0) / runs if runs else None,
            "mean_queue_ms": 1000 * served.get("ctzoo_request_stage_seconds_sum|queue", 0.0) / queued
            if queued else None,
            "mean_inference_ms": 1000 * served.get("ctzoo_request_stage_seconds_sum|inference", 0.0) / queued
            if queued else None,
            "server_cpu_ms_per_request": 1000 * cpu_server / requests,
            "server_cpu_utilisation": cpu_server / wall,
            "client_cpu_ms_per_request": 1000 * cpu_client / requests}


async def scrape(http: httpx.AsyncClient, model: str) -> dict[str, float]:
    """The model's batch-size and request-stage counters from the server's /metrics."""
    text = (await http.get("/metrics")).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name in ("ctzoo_batch_size_sum", "ctzoo_batch_size_count"):
                values[sample.name] = sample.value
            elif sample.name.startswith("ctzoo_request_stage_seconds_") and not sample.name.endswith("_bucket"):
                values[f"{sample.name}|{sample.labels['stage']}"] = sample.value
    return values


# ------------------------------------------------------------------------------------------------ main


def print_model_only(rows: list[dict], threads: int) -> None:
    if rows and "served_slices_per_s" in rows[0]:
        print(f"model only: slices/s of the median call of the served engine ({rows[0]['engine']})")
        print(f"{'model':22s} {'batch':>5s} {'slices/s':>9s} {'vs batch 1':>10s}")
        for row in rows:
            print(f"{row['model']:22s} {row['batch']:5d} {row['served_slices_per_s']:9.1f} "
                  f"{row['ratio_vs_batch_1']:9.2f}x")
        return
    print(f"model only: slices/s of the median call, {threads} threads (ORT: the service's session, spinning "
          "off; spin: ORT's default spinning on)")
    print(f"{'':29s}{f'{threads} threads':<37s}| 1 thread")
    print(f"{'model':22s} {'batch':>5s} {'eager':>8s} {'ORT':>8s} {'ORT spin':>8s} {'ORT/eager':>9s} | "
          f"{'eager':>8s} {'ORT':>8s} {'ORT/eager':>9s}")
    for row in rows:
        one = row["one_thread"]
        print(f"{row['model']:22s} {row['batch']:5d} {row['eager_slices_per_s']:8.2f} {row['ort_slices_per_s']:8.2f} "
              f"{row['ort_spinning_slices_per_s']:8.2f} {row['ratio_ort_vs_eager']:8.2f}x | "
              f"{one['eager_slices_per_s']:8.2f} {one['ort_slices_per_s']:8.2f} {one['ratio_ort_vs_eager']:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="recistnet-mini,template-seg-abdomen")
    parser.add_argument("--requests", type=int, default=128, help="timed requests per setting (default 128)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    parser.add_argument("--queue-delay-ms", type=float, default=5.0,
                        help="the batching server's --max-queue-delay-ms (default 5; ctzoo.json says 2)")
    parser.add_argument("--crop", type=int, default=256,
                        help="detector slices: central crop side in pixels, a multiple of 32 (default 256; 0: the "
                             "whole 512 canvas)")
    parser.add_argument("--slices", type=int, default=16, help="different CT slices per model (default 16)")
    parser.add_argument("--batch-sizes", default="1,16", help="model-only batch sizes (default 1,16)")
    parser.add_argument("--min-s", type=float, default=1.5, help="model only: seconds per measurement (at least)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="ONNX Runtime intra-op threads (service and model only) and torch threads (default: "
                             "the CPU count)")
    parser.add_argument("--backend", choices=["onnx", "torch"], default="onnx", help="ctzoo serve --backend")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="ctzoo serve --device")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                        help="ctzoo serve --precision (--backend torch)")
    parser.add_argument("--target-ratio", type=float, default=1.3,
                        help="batching on/off target at the highest concurrency (default 1.3)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve.json")
    args = parser.parse_args()
    if args.crop % 32:
        parser.error("--crop must be a multiple of 32")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    # every client's request admitted at once, so full batches can form (the default, 4, caps a batch at 4 requests)
    backend = ["--backend", args.backend, "--device", args.device, "--max-requests-per-model", str(max(levels))]
    backend += ["--precision", args.precision] if args.backend == "torch" else []
    provenance = Provenance()
    print(f"load average before: {provenance.load_start}")
    from ctzoo.datasets.samples import sample_ct_dicom
    from ctzoo.export.repository import export_model
    from ctzoo.io import read_volume

    with warnings.catch_warnings():  # the sample's empty UIDs are filled in, with a warning each
        warnings.simplefilter("ignore")
        volume = read_volume(sample_ct_dicom(), progress=False)
    token = secrets.token_hex(24)
    model_rows, serve_rows, repeat_rows, servers, exported = [], [], [], [], {}
    with tempfile.TemporaryDirectory(prefix="ctzoo-bench-serve-") as tmp:
        repo = Path(tmp) / "repository"
        workloads = []
        for name in names:
            start = time.perf_counter()
            export_model(name, repo, progress=lambda message: None)
            exported[name] = round(time.perf_counter() - start, 1)
            workload = build_workload(name, volume, args.slices, args.crop)
            served = ServedModel(repo / name, Runtime(threads=args.threads))
            workload.reference = [served.run(inputs) for inputs in workload.slices]
            print(f"{name}: exported in {exported[name]:.1f} s; input: {workload.description}", flush=True)
            if args.backend == "torch":
                engine = ServedModel(repo / name, Runtime("torch", threads=args.threads, device=args.device,
                                                          precision=args.precision))
                workload.tolerance = TOLERANCE if engine.runtime.precision == "fp32" else BF16_RELATIVE_TOLERANCE
                model_rows += served_engine_only(workload, engine, sizes, args.min_s)
            else:
                model_rows += model_only(workload, served, args.threads, sizes, args.min_s)
            workloads.append(workload)
        try:
            for batching in (True, False):
                label = "batching" if batching else "no-batching"
                servers.append(Server(label, repo, token, args.threads, batching, args.queue_delay_ms,
                                      Path(tmp) / f"{label}.log", backend))
            for server in servers:
                start_s = server.wait_live()
                server.memory["loaded"] = memory_mb(server.process.pid)
                print(f"{server.label} server up in {start_s:.1f} s (pid {server.process.pid}, RSS "
                      f"{server.memory['loaded']['rss_mb']:.0f} MiB): {' '.join(server.command[2:])}", flush=True)
            for workload in workloads:
                bodies = [request_body(inputs) for inputs in workload.slices]
                for server in servers:  # one burst at the highest concurrency: every batch size's first run
                    asyncio.run(drive(server, token, workload, bodies, max(levels), 0, 2 * max(levels)))
            for server in servers:
                server.memory["warm"] = memory_mb(server.process.pid)
            for workload in workloads:
                bodies = [request_body(inputs) for inputs in workload.slices]
                for concurrency in levels:
                    for server in servers:
                        row = asyncio.run(drive(server, token, workload, bodies, concurrency, args.requests,
                                                concurrency))
                        row["server_rss_mb_after"] = memory_mb(server.process.pid)["rss_mb"]
                        serve_rows.append(row)
                        print(f"  {workload.name} c={concurrency} {server.label}: {row['requests_per_s']:.2f} req/s, "
                              f"p50 {row['latency_ms']['p50']:.0f} ms, p99 {row['latency_ms']['p99']:.0f} ms, "
                              f"non-200 {row['non_200']}, bad {row['bad_outputs']}", flush=True)
            for server in servers:
                server.memory["after_load"] = memory_mb(server.process.pid)
            for workload in workloads:  # the heaviest setting once more: does the RSS level off?
                bodies = [request_body(inputs) for inputs in workload.slices]
                for server in servers:
                    row = asyncio.run(drive(server, token, workload, bodies, max(levels), args.requests, 0))
                    row["server_rss_mb_after"] = memory_mb(server.process.pid)["rss_mb"]
                    repeat_rows.append(row)
                    print(f"  repeat {workload.name} c={max(levels)} {server.label}: {row['requests_per_s']:.2f} "
                          f"req/s, non-200 {row['non_200']}, bad {row['bad_outputs']}, RSS "
                          f"{row['server_rss_mb_after']:.0f} MiB", flush=True)
            for server in servers:
                server.memory["after_repeat"] = memory_mb(server.process.pid)
        finally:
            for server in servers:
                server.stop()
    recorded = provenance.record(**versions("onnxruntime", "httpx"))  # the load as the measurements end

    print()
    print(f"service: requests/s and client latency (ms), {args.requests} single-slice requests per setting; "
          f"batching = max batch 16, queue delay {args.queue_delay_ms:g} ms; threads {args.threads}")
    print(f"{'model':22s} {'conc':>4s} | {'on req/s':>8s} {'p50':>6s} {'p99':>6s} {'rows/run':>8s} | "
          f"{'off req/s':>9s} {'p50':>6s} {'p99':>6s} | {'on/off':>6s} | {'srv cpu ms/req on/off':>21s} "
          f"{'non-200':>7s} {'bad':>3s}")
    ratios = {}
    for workload in workloads:
        for concurrency in levels:
            on, off = (next(r for r in serve_rows if r["model"] == workload.name and r["concurrency"] == concurrency
                            and r["batching"] is b) for b in (True, False))
            ratio = on["requests_per_s"] / off["requests_per_s"]
            ratios[(workload.name, concurrency)] = ratio
            on["ratio_on_vs_off"] = off["ratio_on_vs_off"] = ratio
            rows_per_run = f"{on['rows_per_run']:.1f}" if on["rows_per_run"] else "-"
            print(f"{workload.name:22s} {concurrency:4d} | {on['requests_per_s']:8.2f} {on['latency_ms']['p50']:6.0f} "
                  f"{on['latency_ms']['p99']:6.0f} {rows_per_run:>8s} | {off['requests_per_s']:9.2f} "
                  f"{off['latency_ms']['p50']:6.0f} {off['latency_ms']['p99']:6.0f} | {ratio:5.2f}x | "
                  f"{on['server_cpu_ms_per_request']:10.0f} / {off['server_cpu_ms_per_request']:<8.0f} "
                  f"{on['non_200'] + off['non_200']:7d} {on['bad_outputs'] + off['bad_outputs']:3d}")
    print()
    print_model_only(model_rows, args.threads)
    print()
    print(f"server memory (MiB RSS): loaded -> after warm-up -> after the load -> after the concurrency-{max(levels)} "
          "settings once more (peak); levelled off: the repeat grew it by <= 5% + 10 MiB")
    for server in servers:
        m = server.memory
        growth = m["after_repeat"]["rss_mb"] - m["after_load"]["rss_mb"]
        m["levelled_off"] = growth <= 0.05 * m["after_load"]["rss_mb"] + 10
        print(f"  {server.label:12s} {m['loaded']['rss_mb']:6.0f} -> {m['warm']['rss_mb']:6.0f} -> "
              f"{m['after_load']['rss_mb']:6.0f} -> {m['after_repeat']['rss_mb']:6.0f} "
              f"({m['after_repeat']['peak_rss_mb']:.0f}): repeat {growth:+.0f} MiB, "
              f"{'levelled off' if m['levelled_off'] else 'STILL GROWING'}")
    top = max(levels)
    failures = sum(r["non_200"] + r["bad_outputs"] for r in serve_rows + repeat_rows)
    print()
    for workload in workloads:
        if (workload.name, top) in ratios:
            ratio = ratios[(workload.name, top)]
            print(f"target batching on/off >= {args.target_ratio:g}x at concurrency {top}, {workload.name}: "
                  f"{ratio:.2f}x ({'met' if ratio >= args.target_ratio else 'NOT met'})")
    for row in model_rows if args.backend == "onnx" else []:
        print(f"target ORT >= eager, {row['model']} batch {row['batch']}, {args.threads} threads: "
              f"{row['ratio_ort_vs_eager']:.2f}x ({'met' if row['ratio_ort_vs_eager'] >= 1 else 'NOT met'}); "
              f"1 thread: {row['one_thread']['ratio_ort_vs_eager']:.2f}x")
    print(f"non-200 responses and wrong outputs over all settings: {failures}")
    print(f"load average after: {recorded['load_average']['end']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "serve", "models": names, "requests": args.requests, "concurrency": levels,
        "queue_delay_ms": args.queue_delay_ms, "max_batch_size": "each model's ctzoo.json (16)",
        "threads": args.threads, "crop": args.crop, "backend": args.backend, "device": args.device,
        "precision": args.precision if args.backend == "torch" else None,
        "tolerance_max_rel": {w.name: w.tolerance for w in workloads}, "export_s": exported,
        "inputs": {w.name: w.description for w in workloads},
        "servers": [{"label": s.label, "command": s.command[2:], "memory_mb": s.memory} for s in servers],
        "serve": serve_rows, "repeat": repeat_rows, "model_only": model_rows, "provenance": recorded,
        "targets": {"batching_on_vs_off_at_top_concurrency": {n: ratios.get((n, top)) for n in names},
                    "batching_target": args.target_ratio, "failures": failures,
                    **({"ort_vs_eager": {f"{r['model']}/b{r['batch']}": r["ratio_ort_vs_eager"] for r in model_rows},
                        "ort_vs_eager_one_thread": {f"{r['model']}/b{r['batch']}":
                                                    r["one_thread"]["ratio_ort_vs_eager"] for r in model_rows}}
                       if args.backend == "onnx" else {})},
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
