"""Does ``ctzoo serve`` keep serving good requests, correctly, while clients attack it? Attack-free vs under attack,
in one run against one server.

Server: the real ``ctzoo serve`` command in a subprocess on 127.0.0.1 (a free port, a random token in a mode-600
token file, ``--state-dir`` and ``TMPDIR`` in a temporary folder, ``--threads 1``, ``--device cpu``, every other
setting at its default unless ``--server-args`` says otherwise), serving ``recistnet-mini`` exported with
``ctzoo.export.repository.export_model`` into a temporary repository (or the models of ``--repository``).

Good request: ``POST /v2/models/recistnet-mini/infer``, binary tensor extension, one FP32 ``image`` [1, 9, 256, 256]
(``--inputs`` different inputs of seeded uniform noise, request k carrying input k mod ``--inputs``), outputs asked
back binary (``binary_data_output``). First each input is sent once on its own (its reference outputs), then
``--clients`` untimed good requests warm the server up, and one attack of each kind (below) is sent alone (the
first study upload loads the model's bundle for the study endpoint, a one-time cost kept out of the timed phases);
then:

* **attack-free** (the baseline): ``--clients`` asyncio + httpx clients send ``--requests`` good requests back to
  back;
* **under attack**: the same ``--requests`` good requests from ``clients - attackers`` clients, while
  ``--attackers`` clients send attacks in a loop until the last good request is answered (the attacks in flight
  then finish). The attacks cycle through (expected status):

  =================  =====  =================================================================================
  ``gzip-tensor``    413    binary request declaring [1, 9, 3776, 3776] FP32 with all its 513 MB of (zero)
                            data, gzip-compressed to about 0.5 MB (``Content-Encoding: gzip``)
  ``mha-passwd``     400    an MHA upload to /studies whose header says ``ElementDataFile = /etc/passwd``
                            (the answer must not repeat the path or any of the file)
  ``nifti-header``   413    a 52-byte .nii.gz: just a NIfTI header declaring 2048^3 int16 voxels
  ``zip-bomb``       413    a zip of one 80 MiB member of zeros (about 80 KB) to /studies
  ``wrong-token``    401    a small good tensor request ([1, 9, 32, 32]) with a wrong bearer token
  ``json-nan``       400    a JSON tensor request [1, 9, 32, 32] holding a NaN
  =================  =====  =================================================================================

Checked: every good response is 200 and its outputs match the reference outputs of its input (``np.allclose``,
atol 1e-4); every attack gets its expected status; no 5xx (client side, and ``ctzoo_requests_total`` from
/metrics for the whole run); after the load, while the server still runs, and again after it stopped (SIGTERM,
exit status 0), its ``TMPDIR`` and its state folder's ``studies/`` and ``tmp/`` hold nothing that was not there
when the server became ready (reported, not counted: a file there before any request, such as the ``$TMPDIR/.ses``
onnxruntime's telemetry writes when ctzoo has not turned it off); the token never appears in the server's log, which
has one access line per request. Reported: good requests/s
(requests / wall time from the first to the last good answer), p50 and p99 client latency (send to last byte), the
ratio under attack / attack-free of requests/s, attacks sent and answered as expected (per kind too), the server's
RSS (``/proc/<pid>/status`` VmRSS) once loaded, after the warm-ups ("before"), after each phase ("after" is after
the attacks), and its peak (VmHWM).

The core is importable (tests/test_serve_load.py): ``with serve_subprocess() as server: run_load(server.url,
server.token, clients, requests, attackers, pid=server.pid)``.

Exit status 1 when a good request failed (not 200, or wrong outputs), an attack got another status than expected
(or leaked the file it named), anything got a 5xx, a request left a file in a temporary folder, the token was
logged, or the server did not exit with 0 on SIGTERM. The RSS is reported, not judged.

    python benchmarks/serve_load.py [--repository REPO] [--requests 256] [--clients 32] [--attackers 8]
                                    [--inputs 8] [--server-args "--max-requests-per-model 8"]
                                    [--out benchmarks/results/serve_load.json]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gzip
import io
import itertools
import json
import os
import re
import secrets
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

MODEL = "recistnet-mini"
HEADER = "Inference-Header-Content-Length"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import Provenance, versions  # noqa: E402
from serve import free_port, memory_mb  # noqa: E402  (the service benchmark's helpers; run as a script or loaded)

SHAPE = (1, 9, 256, 256)
ATOL = 1e-4
BOMB_SHAPE = (1, 9, 3776, 3776)  # 513 MB of FP32: under the 512 MiB upload limit, over every tensor limit
EXPECTED = {"gzip-tensor": 413, "mha-passwd": 400, "nifti-header": 413, "zip-bomb": 413, "wrong-token": 401,
            "json-nan": 400}
ATTACKS = tuple(EXPECTED)


# ------------------------------------------------------------------------------------------------ server


@dataclass
class LoadServer:
    """A running ``ctzoo serve`` subprocess and the folders it was given."""

    url: str
    token: str
    process: subprocess.Popen
    command: list[str]
    state_dir: Path
    tmpdir: Path
    log: Path
    startup_s: float = 0.0
    at_ready: dict[str, list[str]] = field(default_factory=dict)  # leftovers() once ready, before any request
    exit_code: int | None = None
    leftovers_after_stop: dict[str, list[str]] = field(default_factory=dict)
    final_log: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def memory(self) -> dict[str, float]:
        return memory_mb(self.pid)

    def leftovers(self) -> dict[str, list[str]]:
        """What lies in the server's TMPDIR and in its state folder's studies/ and tmp/ (relative paths)."""
        folders = {"TMPDIR": self.tmpdir, "state/studies": self.state_dir / "studies",
                   "state/tmp": self.state_dir / "tmp"}
        return {name: sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []
                for name, folder in folders.items()}

    def new_leftovers(self, leftovers: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
        """:meth:`leftovers` less what was there when the server became ready (before any request): onnxruntime
        writes ``$TMPDIR/.ses`` when it is imported."""
        leftovers = self.leftovers() if leftovers is None else leftovers
        return {name: [f for f in files if f not in self.at_ready.get(name, [])] for name, files in leftovers.items()}

    def log_text(self) -> str:
        """The server's stdout and stderr so far (once it stopped: all of it, kept after the folder is gone)."""
        return self.log.read_text(errors="replace") if self.log.exists() else self.final_log


@contextmanager
def serve_subprocess(repository: Path | None = None, threads: int = 1, device: str = "cpu",
                     extra_args: Sequence[str] = (), ready_timeout_s: float = 180,
                     launcher: Sequence[str] = ("-m", "ctzoo"), env: dict[str, str] | None = None
                     ) -> Iterator[LoadServer]:
    """``python -m ctzoo serve`` on a free loopback port with a fresh token (file mode 600), ``--state-dir`` and
    ``TMPDIR`` in a temporary folder; yields once /v2/health/ready answers 200. ``repository=None``: recistnet-mini
    is exported into the temporary folder first. On exit: SIGTERM (then kill after 30 s), the exit code and what
    was left in the temporary folders and the server's log are kept on the yielded object, and the temporary
    folder is removed. ``launcher``: what ``python`` runs (a script that takes ctzoo's arguments, such as
    benchmarks/fault_injection.py); ``env``: more environment variables for the server."""
    with tempfile.TemporaryDirectory(prefix="ctzoo-serve-load-") as tmp:
        tmp = Path(tmp)
        if repository is None:
            from ctzoo.export.repository import export_model

            repository = tmp / "repository"
            with warnings.catch_warnings():  # the sample CT's empty UIDs are filled in, with a warning each
                warnings.simplefilter("ignore")
                export_model(MODEL, repository, progress=lambda message: None)
        token = secrets.token_hex(24)
        token_file = tmp / "tokens"
        token_file.touch(mode=0o600)
        token_file.chmod(0o600)
        token_file.write_text(token + "\n", encoding="utf-8")
        state_dir, tmpdir, log = tmp / "state", tmp / "tmpdir", tmp / "server.log"
        tmpdir.mkdir(mode=0o700)
        port = free_port()
        command = [sys.executable, *launcher, "serve", "--repository", str(repository), "--host", "127.0.0.1",
                   "--port", str(port), "--token-file", str(token_file), "--state-dir", str(state_dir),
                   "--threads", str(threads), "--device", device, *extra_args]
        env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": str(threads), **(env or {})}
        env.pop("CTZOO_SERVE_TOKENS", None)
        with log.open("wb") as sink:  # a file, not a pipe: the access log must never block the server
            process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        server = LoadServer(f"http://127.0.0.1:{port}", token, process, command, state_dir, tmpdir, log)
        try:
            start = time.monotonic()
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"ctzoo serve exited with {process.returncode}: {server.log_text()[-3000:]}")
                try:
                    if httpx.get(server.url + "/v2/health/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() - start > ready_timeout_s:
                    raise RuntimeError(f"ctzoo serve was not ready in {ready_timeout_s:g} s: "
                                       f"{server.log_text()[-3000:]}")
                time.sleep(0.2)
            server.startup_s = time.monotonic() - start
            server.at_ready = server.leftovers()
            yield server
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            server.exit_code = process.returncode
            server.leftovers_after_stop = server.leftovers()
            server.final_log = server.log_text()


# ------------------------------------------------------------------------------------------------ requests


def binary_request(inputs: dict[str, np.ndarray], request_id: str | None = None) -> tuple[bytes, int]:
    """A KServe v2 request with binary FP32 inputs and binary outputs, and its JSON header's length."""
    header = {"inputs": [{"name": name, "datatype": "FP32", "shape": list(value.shape),
                          "parameters": {"binary_data_size": value.nbytes}} for name, value in inputs.items()],
              "parameters": {"binary_data_output": True}}
    if request_id is not None:
        header["id"] = request_id
    text = json.dumps(header).encode()
    return text + b"".join(np.ascontiguousarray(v, np.float32).tobytes() for v in inputs.values()), len(text)


def binary_outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    """The binary outputs of a 200 answer (ValueError when it is malformed)."""
    length = int(response.headers[HEADER])
    header, offset, out = json.loads(response.content[:length]), length, {}
    for tensor in header["outputs"]:
        if tensor.get("datatype") != "FP32":
            raise ValueError(f"output {tensor['name']} is {tensor.get('datatype')}, expected FP32")
        size = tensor["parameters"]["binary_data_size"]
        out[tensor["name"]] = np.frombuffer(response.content[offset:offset + size], np.float32).reshape(
            tensor["shape"])
        offset += size
    if offset != len(response.content):
        raise ValueError(f"{len(response.content) - offset} bytes after the outputs")
    return out


def matches(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> bool:
    return sorted(got) == sorted(want) and all(
        got[k].shape == want[k].shape and np.allclose(got[k], want[k], atol=ATOL) for k in want)


def good_inputs(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(SHAPE, dtype=np.float32) for _ in range(count)]


def gzip_of_zeros(prefix: bytes, zeros: int, block: int = 1 << 20) -> bytes:
    """gzip of ``prefix`` followed by ``zeros`` zero bytes, in a fraction of the time zlib takes on all of it:
    after a full flush deflate starts afresh, so every MiB of zeros compresses to the same bytes, written once and
    repeated; the trailer's CRC-32 and length are computed over the real data."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = deflate.compress(prefix) + deflate.flush(zlib.Z_FULL_FLUSH)
    count, rest = divmod(zeros, block)
    one = deflate.compress(bytes(block)) + deflate.flush(zlib.Z_FULL_FLUSH)
    last = deflate.compress(bytes(rest)) + deflate.flush(zlib.Z_FULL_FLUSH) if rest else b""
    crc, zero_block = zlib.crc32(prefix), bytes(block)
    for _ in range(count):
        crc = zlib.crc32(zero_block, crc)
    crc = zlib.crc32(bytes(rest), crc)
    size = len(prefix) + zeros
    return head + one * count + last + b"\x03\x00" + struct.pack("<II", crc, size & 0xFFFFFFFF)  # 03 00: final block


@functools.lru_cache(maxsize=1)
def attack_requests(model: str = MODEL) -> dict[str, tuple[str, bytes, dict[str, str]]]:
    """kind -> (path, body, headers without the Authorization), built once per process."""
    infer, study = f"/v2/models/{model}/infer", f"/studies/{model}"
    header = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(BOMB_SHAPE),
                                     "parameters": {"binary_data_size": 4 * int(np.prod(BOMB_SHAPE))}}],
                         "parameters": {"binary_data_output": True}}).encode()
    bomb = gzip_of_zeros(header, 4 * int(np.prod(BOMB_SHAPE)))
    mha = (b"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
           b"DimSize = 64 64 64\nElementSpacing = 1 1 1\nElementType = MET_SHORT\nElementDataFile = /etc/passwd\n")
    import nibabel as nib

    nifti = nib.Nifti1Header()
    nifti.set_data_shape((2048, 2048, 2048))
    nifti.set_data_dtype(np.int16)
    nifti_gz = gzip.compress(nifti.binaryblock + b"\x00" * 4, 9, mtime=0)  # 348-byte header + empty extension flag
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("series/bomb.dcm", bytes(80 << 20))
    small, small_length = binary_request({"image": np.zeros((1, 9, 32, 32), np.float32)})
    nan = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 9, 32, 32],
                                  "data": [float("nan")] + [0.0] * (9 * 32 * 32 - 1)}]}).encode()
    return {
        "gzip-tensor": (infer, bomb, {HEADER: str(len(header)), "Content-Encoding": "gzip"}),
        "mha-passwd": (study, mha, {}),
        "nifti-header": (study, nifti_gz, {}),
        "zip-bomb": (study, archive.getvalue(), {}),
        "wrong-token": (infer, small, {HEADER: str(small_length), "Authorization": "Bearer not-the-token-0123"}),
        "json-nan": (infer, nan, {"Content-Type": "application/json"}),
    }


# ------------------------------------------------------------------------------------------------ load


def _percentiles(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p99": None, "max": None}
    values = 1000 * np.asarray(latencies)
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "max": float(values.max())}


async def _phase(good_http: httpx.AsyncClient, attack_http: httpx.AsyncClient | None, bodies, references,
                 count: int, good_clients: int, attackers: int) -> dict:
    """``count`` good requests from ``good_clients`` clients back to back, while ``attackers`` clients loop
    through the attacks until the last good answer (then the attacks in flight finish)."""
    path = f"/v2/models/{MODEL}/infer"
    counter, attack_counter, done = itertools.count(), itertools.count(), asyncio.Event()
    good: list[dict] = []
    attacks: list[dict] = []

    async def good_client() -> None:
        while (k := next(counter)) < count:
            index = k % len(bodies)
            body, length = bodies[index]
            start, status, correct, error = time.perf_counter(), -1, False, ""
            try:
                response = await good_http.post(path, content=body, headers={HEADER: str(length)})
                status = response.status_code
                if status == 200:
                    correct = matches(binary_outputs(response), references[index])
                else:
                    error = response.text[:200]
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:200]
            good.append({"seconds": time.perf_counter() - start, "status": status, "correct": correct,
                         "error": error})

    async def attacker() -> None:
        while not done.is_set():
            attacks.append(await send_attack(attack_http, ATTACKS[next(attack_counter) % len(ATTACKS)]))

    start = time.perf_counter()
    attack_tasks = [asyncio.create_task(attacker()) for _ in range(attackers)]
    try:
        await asyncio.gather(*(good_client() for _ in range(good_clients)))
        wall = time.perf_counter() - start
    finally:
        done.set()
        await asyncio.gather(*attack_tasks, return_exceptions=True)
    statuses = [g["status"] for g in good]
    failed = [g for g in good if not (g["status"] == 200 and g["correct"])]
    by_kind = attack_summary(attacks)
    return {"good_clients": good_clients, "attackers": attackers, "good_requests": count, "wall_s": wall,
            "requests_per_s": count / wall, "latency_ms": _percentiles([g["seconds"] for g in good]),
            "good_ok": count - len(failed), "good_failed": len(failed),
            "good_status_codes": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "good_wrong_outputs": sum(1 for g in good if g["status"] == 200 and not g["correct"]),
            "good_failure_examples": [f"{g['status']} {g['error']}" for g in failed][:5],
            "attacks_sent": len(attacks),
            "attacks_as_expected": sum(v["as_expected"] for v in by_kind.values()),
            "attacks": by_kind,
            "client_5xx": sum(1 for s in statuses if s >= 500) + sum(1 for a in attacks if a["status"] >= 500)}


async def send_attack(http: httpx.AsyncClient, kind: str) -> dict:
    """One attack of ``kind``: its status (-1: a transport error), seconds, and whether the answer leaked the
    file an MHA header named."""
    target, body, headers = attack_requests()[kind]
    start, status, text = time.perf_counter(), -1, ""
    try:
        response = await http.post(target, content=body, headers=headers)
        status, text = response.status_code, response.text
    except httpx.HTTPError as exc:
        text = f"{type(exc).__name__}: {exc}"
    leaked = kind == "mha-passwd" and ("/etc/passwd" in text or "root:" in text)
    return {"kind": kind, "seconds": time.perf_counter() - start, "status": status, "expected": EXPECTED[kind],
            "leaked": leaked, "error": text[:200]}


def attack_summary(attacks: list[dict]) -> dict[str, dict]:
    by_kind = {}
    for kind in ATTACKS:
        sent = [a for a in attacks if a["kind"] == kind]
        seen = [a["status"] for a in sent]
        by_kind[kind] = {"expected": EXPECTED[kind], "sent": len(sent),
                         "as_expected": sum(1 for a in sent if a["status"] == a["expected"] and not a["leaked"]),
                         "statuses": {str(s): seen.count(s) for s in sorted(set(seen))},
                         "leaked": sum(a["leaked"] for a in sent),
                         "latency_ms": _percentiles([a["seconds"] for a in sent]),
                         "unexpected_examples": [f"{a['status']} {a['error']}" for a in sent
                                                 if a["status"] != a["expected"] or a["leaked"]][:3]}
    return by_kind


async def _server_5xx(http: httpx.AsyncClient) -> dict[str, float]:
    """``ctzoo_requests_total`` samples with a 5xx code, from /metrics: {"endpoint code": count}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = await http.get("/metrics")
    response.raise_for_status()
    return {f"{s.labels.get('endpoint')} {s.labels['code']}": s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples
            if s.name == "ctzoo_requests_total" and s.labels.get("code", "").startswith("5") and s.value}


async def _run_load(url: str, token: str, clients: int, requests: int, attackers: int, *, inputs: int, seed: int,
                    timeout_s: float, pid: int | None) -> dict:
    if not 0 <= attackers < clients:
        raise ValueError(f"attackers must be in [0, clients): got {attackers} of {clients}")
    auth = {"Authorization": f"Bearer {token}"}
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30))
    memory: dict[str, dict[str, float]] = {}
    bodies = [binary_request({"image": x}) for x in good_inputs(inputs, seed)]
    attack_requests()  # built before anything is timed
    good_limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    attack_limits = httpx.Limits(max_connections=max(attackers, 1), max_keepalive_connections=max(attackers, 1))
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=good_limits, headers=auth) as http, \
            httpx.AsyncClient(base_url=url, timeout=timeout, limits=attack_limits, headers=auth) as attack_http:
        references = []
        for body, length in bodies:  # each input alone, one at a time: its reference outputs
            response = await http.post(f"/v2/models/{MODEL}/infer", content=body, headers={HEADER: str(length)})
            if response.status_code != 200:
                raise RuntimeError(f"reference request got {response.status_code}: {response.text[:300]}")
            references.append({k: v.copy() for k, v in binary_outputs(response).items()})
        warmup = await _phase(http, None, bodies, references, clients, clients, 0)
        if pid is not None:
            memory["after_good_warmup"] = memory_mb(pid)
        first_attacks = [await send_attack(attack_http, kind) for kind in ATTACKS]  # one of each, alone
        first = attack_summary(first_attacks)
        if pid is not None:
            memory["warm"] = memory_mb(pid)
        baseline = await _phase(http, None, bodies, references, requests, clients, 0)
        if pid is not None:
            memory["after_attack_free"] = memory_mb(pid)
        attacked = await _phase(http, attack_http, bodies, references, requests, clients - attackers, attackers)
        if pid is not None:
            memory["after_under_attack"] = memory_mb(pid)
        server_5xx = await _server_5xx(http)
    baseline["label"], attacked["label"] = "attack-free", "under attack"
    for row in (baseline, attacked):
        row["ratio_vs_attack_free"] = row["requests_per_s"] / baseline["requests_per_s"]
    first_unexpected = len(first_attacks) - sum(v["as_expected"] for v in first.values())
    failures = {"good_failed": baseline["good_failed"] + attacked["good_failed"] + warmup["good_failed"],
                "attacks_unexpected": attacked["attacks_sent"] - attacked["attacks_as_expected"] + first_unexpected,
                "client_5xx": warmup["client_5xx"] + baseline["client_5xx"] + attacked["client_5xx"]
                + sum(1 for a in first_attacks if a["status"] >= 500),
                "server_5xx": int(sum(server_5xx.values()))}
    posts = len(bodies) + warmup["good_requests"] + len(first_attacks) + sum(
        row["good_requests"] + row["attacks_sent"] for row in (baseline, attacked))
    return {"url": url, "model": MODEL, "posts_sent": posts, "input_shape": list(SHAPE), "inputs": inputs, "seed": seed,
            "clients": clients, "requests": requests, "attackers": attackers, "atol": ATOL, "timeout_s": timeout_s,
            "expected_status": EXPECTED,
            "attack_sizes_bytes": {kind: len(body) for kind, (_, body, _) in attack_requests().items()},
            "warmup": {k: warmup[k] for k in ("good_requests", "good_ok", "good_failed", "wall_s")},
            "warmup_attacks": {kind: {"status": a["status"], "expected": a["expected"], "leaked": a["leaked"],
                                      "ms": 1000 * a["seconds"], "answer": a["error"]}
                               for kind, a in zip(ATTACKS, first_attacks)},
            "phases": [baseline, attacked], "memory_mb": memory, "server_5xx": server_5xx, "failures": failures,
            "ok": not any(failures.values())}


def run_load(url: str, token: str, clients: int, requests: int, attackers: int, *, inputs: int = 8, seed: int = 0,
             timeout_s: float = 120.0, pid: int | None = None) -> dict:
    """Reference outputs, a warm-up, then ``requests`` good requests attack-free from ``clients`` clients and
    again from ``clients - attackers`` clients while ``attackers`` clients attack (module docstring). ``pid``: the
    server's process id, to record its memory after the warm-up and after each phase (Linux /proc)."""
    return asyncio.run(_run_load(url, token, clients, requests, attackers, inputs=inputs, seed=seed,
                                 timeout_s=timeout_s, pid=pid))


# ------------------------------------------------------------------------------------------------ main


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def report(result: dict) -> str:
    lines = ["| run | good requests | throughput req/s | p50 ms | p99 ms | ratio vs attack-free | attacks sent | "
             "attacks answered as expected |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["phases"]:
        lines.append(f"| {row['label']} ({row['good_clients']} good + {row['attackers']} attacking clients) | "
                     f"{row['good_ok']}/{row['good_requests']} | {row['requests_per_s']:.2f} | "
                     f"{_ms(row['latency_ms']['p50'])} | {_ms(row['latency_ms']['p99'])} | "
                     f"{row['ratio_vs_attack_free']:.2f} | {row['attacks_sent']} | {row['attacks_as_expected']} |")
    lines += ["", "| attack | expected | sent | as expected | statuses | p50 ms | p99 ms | body bytes |",
              "|---|---:|---:|---:|---|---:|---:|---:|"]
    for kind, row in result["phases"][1]["attacks"].items():
        statuses = ", ".join(f"{s}: {n}" for s, n in row["statuses"].items()) or "-"
        lines.append(f"| {kind} | {row['expected']} | {row['sent']} | {row['as_expected']} | {statuses} | "
                     f"{_ms(row['latency_ms']['p50'])} | {_ms(row['latency_ms']['p99'])} | "
                     f"{result['attack_sizes_bytes'][kind]:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=None,
                        help="serve this model repository (must hold recistnet-mini; default: export it afresh)")
    parser.add_argument("--requests", type=int, default=256, help="good requests per phase (default 256)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--attackers", type=int, default=8,
                        help="of the clients, how many attack in the second phase (default 8)")
    parser.add_argument("--inputs", type=int, default=8, help="different good inputs (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="the server's --threads (default 1)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="client timeout per request (default 120)")
    parser.add_argument("--server-args", default="", help="more ctzoo serve options, e.g. \"--max-requests-per-model "
                        "8\"")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_load.json")
    args = parser.parse_args()
    if not 0 <= args.attackers < args.clients:
        parser.error("--attackers must be at least 0 and fewer than --clients")
    provenance = Provenance()
    print(f"load average before: {provenance.load_start}", flush=True)
    started = time.perf_counter()
    with serve_subprocess(args.repository, threads=args.threads, extra_args=shlex.split(args.server_args)) as server:
        print(f"server up in {server.startup_s:.1f} s (pid {server.pid}, RSS {server.memory()['rss_mb']:.0f} MiB): "
              f"{' '.join(server.command[2:])}", flush=True)
        loaded = server.memory()
        result = run_load(server.url, server.token, args.clients, args.requests, args.attackers, inputs=args.inputs,
                          seed=args.seed, timeout_s=args.timeout_s, pid=server.pid)
        result["memory_mb"] = {"loaded": loaded, **result["memory_mb"]}
        leftovers_running = server.leftovers()
    log = server.log_text()
    leftovers = {"at_ready": server.at_ready, "after_load": leftovers_running,
                 "after_stop": server.leftovers_after_stop}
    new_files = {when: server.new_leftovers(leftovers[when]) for when in ("after_load", "after_stop")}
    result.update(command=server.command[2:], startup_s=server.startup_s, exit_code=server.exit_code,
                  leftovers=leftovers, new_leftovers=new_files,
                  server_log={"lines": len(log.splitlines()), "tracebacks": log.count("Traceback"),
                              "token_in_log": server.token in log, "tail": log.splitlines()[-2:],
                              "access_post_lines": len(re.findall(r" POST /\S* \d{3} [\d.]+ ms", log)),
                              "access_5xx_lines": len(re.findall(r" (?:GET|POST) /\S* 5\d\d [\d.]+ ms", log))},
                  total_s=time.perf_counter() - started)
    result["failures"].update(
        leftover_files=sum(len(files) for when in new_files.values() for files in when.values()),
        token_in_log=int(server.token in log), exit_code=int(server.exit_code != 0))
    result["ok"] = not any(result["failures"].values())
    memory = result["memory_mb"]
    growth = memory["after_under_attack"]["rss_mb"] - memory["warm"]["rss_mb"]
    result["rss_growth_mb"] = growth

    print()
    print(f"ctzoo serve under attack: {args.requests} good requests {list(SHAPE)} per phase, {args.clients} clients "
          f"({args.attackers} attacking in the second phase), --threads {args.threads}, {os.cpu_count()} CPUs")
    print(report(result))
    print()
    first = ", ".join(f"{kind} {a['status']} in {a['ms']:.0f} ms" for kind, a in result["warmup_attacks"].items())
    print(f"warm-up: {result['warmup']['good_ok']}/{result['warmup']['good_requests']} good; one attack of each "
          f"kind alone: {first}")
    print(f"server RSS (MiB): loaded {memory['loaded']['rss_mb']:.0f}, after the good warm-up "
          f"{memory['after_good_warmup']['rss_mb']:.0f}, after one attack of each kind {memory['warm']['rss_mb']:.0f} "
          f"(before), after attack-free {memory['after_attack_free']['rss_mb']:.0f}, after under attack "
          f"{memory['after_under_attack']['rss_mb']:.0f} (after; {growth:+.0f} MiB); peak (VmHWM) "
          f"{memory['after_under_attack']['peak_rss_mb']:.0f}")
    print(f"5xx: {result['failures']['client_5xx']} seen by clients, {result['failures']['server_5xx']} in the "
          f"server's /metrics {result['server_5xx'] or ''}")
    print("temporary folders when the server was ready: " + ", ".join(
        f"{name} {files or 'empty'}" for name, files in server.at_ready.items()))
    for when, folders in new_files.items():
        print(f"new files in them {when.replace('_', ' ')}: " + ", ".join(
            f"{name} {'none' if not files else f'{len(files)}: {files[:3]}'}" for name, files in folders.items()))
    logged = result["server_log"]
    print(f"server exit code after SIGTERM: {server.exit_code}; log: {logged['lines']} lines, "
          f"{logged['access_post_lines']} access lines for the {result['posts_sent']} POSTs sent "
          f"({logged['access_5xx_lines']} with a 5xx), {logged['tracebacks']} tracebacks, token in log: "
          f"{logged['token_in_log']}; last line: {logged['tail'][-1] if logged['tail'] else '-'}")
    for kind, attack in result["warmup_attacks"].items():
        if attack["status"] != attack["expected"] or attack["leaked"]:
            print(f"  attack {kind} alone unexpected: {attack['status']} {attack['answer']}")
    for row in result["phases"]:
        for example in row["good_failure_examples"]:
            print(f"  good request failed ({row['label']}): {example}")
        for kind, attack in row["attacks"].items():
            for example in attack["unexpected_examples"]:
                print(f"  attack {kind} unexpected: {example}")
    print(f"verdict: {'OK' if result['ok'] else 'FAILED'} {result['failures']}")
    result["benchmark"] = "serve_load"
    result["provenance"] = provenance.record(**versions("onnxruntime", "httpx"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
