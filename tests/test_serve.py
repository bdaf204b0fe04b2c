"""``ctzoo serve``: KServe v2 over HTTP with tritonclient, auth, 4xx errors, micro-batching, metrics, load.

Servers run three ways: uvicorn in a thread on 127.0.0.1 (tritonclient and raw HTTP), in-process through
httpx's ASGI transport (batching, timeouts, streaming limits), and the real ``ctzoo serve`` command in a
subprocess (the load test, which also watches the server's RSS).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
import uvicorn
from click.testing import CliRunner
from fastapi import APIRouter, Request
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from ctzoo.cli import main
from ctzoo.cli.serve import console_logging
from ctzoo.serve.app import create_app, loggable
from ctzoo.serve.batching import MicroBatcher
from ctzoo.serve.budget import ServeLimits
from ctzoo.serve.v2_codec import DecodedRequest, ServeError, decode_request, encode_response

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # tritonclient adds headers to the dict it gets: pass copies
DET, SEG = "recistnet-mini", "template-seg-abdomen"
HEADS = ("heatmaps", "offsets", "displacements")
HEADER = "Inference-Header-Content-Length"



@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    from ctzoo.export.repository import export_model

    repo = tmp_path_factory.mktemp("repository")
    for name in (DET, SEG):
        export_model(name, repo)  # checks each graph against PyTorch
    return repo


@pytest.fixture(scope="module")
def sessions(repo) -> dict[str, ort.InferenceSession]:
    """The graphs run directly in ONNX Runtime, the truth the service is compared against."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return {name: ort.InferenceSession(str(repo / name / "1" / "model.onnx"), options,
                                       providers=["CPUExecutionProvider"]) for name in (DET, SEG)}


@pytest.fixture(scope="module")
def ct_slice(sample_volume) -> np.ndarray:
    """A real preprocessed CT slice of the embedded sample, as the detector takes it: (1, 9, H, W)."""
    from ctzoo.datasets.deeplesion.dataset import SlicePreprocessing
    from ctzoo.inference.recist_volume import slice_inputs
    from ctzoo.io import reorient_lps
    from ctzoo.models import model_input_spec

    spec = model_input_spec(DET)
    prep = SlicePreprocessing(**{k: v for k, v in spec.items() if k in SlicePreprocessing.model_fields})
    for k, (image, _) in enumerate(slice_inputs(reorient_lps(sample_volume), prep)):
        if k == sample_volume.array.shape[0] // 2:
            return image.numpy()[None].astype(np.float32)
    raise AssertionError("no middle slice")


@pytest.fixture(scope="module")
def bank():
    from ctzoo.models.registry import model_entry
    from ctzoo.models.template_bank import TemplateBank

    return TemplateBank.load(model_entry(SEG).weights_dir)


@pytest.fixture(scope="module")
def server(repo):
    """uvicorn serving the repository on a free loopback port, in a thread: ``(port, url)``."""
    app = create_app(repo, [TOKEN, "second-token-abcdefghijkl"], device="cpu", threads=1, max_upload_mb=16)
    with serving(app) as port:
        yield port, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def serving(app, **connection_options):
    """uvicorn serving ``app`` on a free loopback port in a thread, with the connection options ``ctzoo serve``
    runs it with (:func:`ctzoo.serve.connections.uvicorn_connection_options` of ``connection_options``): the port."""
    from ctzoo.serve.connections import uvicorn_connection_options

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        running = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                **uvicorn_connection_options(**connection_options)))
        thread = threading.Thread(target=running.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not running.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        try:
            yield port
        finally:
            running.should_exit = True
            thread.join(10)


@pytest.fixture()
def client(server):
    with triton.InferenceServerClient(f"127.0.0.1:{server[0]}", network_timeout=120) as tc:
        yield tc


def _binary_request(inputs: dict[str, np.ndarray], **extra) -> tuple[bytes, dict[str, str]]:
    header = {"inputs": [{"name": k, "datatype": "FP32", "shape": list(v.shape),
                          "parameters": {"binary_data_size": v.nbytes}} for k, v in inputs.items()],
              "parameters": {"binary_data_output": True}, **extra}
    text = json.dumps(header).encode()
    return text + b"".join(np.ascontiguousarray(v, np.float32).tobytes() for v in inputs.values()), \
        {**AUTH, HEADER: str(len(text))}


def _binary_outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    header, offset, out = json.loads(response.content[:length]), length, {}
    for tensor in header["outputs"]:
        size = tensor["parameters"]["binary_data_size"]
        out[tensor["name"]] = np.frombuffer(response.content[offset:offset + size], np.float32).reshape(tensor["shape"])
        offset += size
    return out


def _metrics(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text)
            for s in family.samples}


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)



def test_health_and_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready()  # the probes need no token
    assert client.is_server_ready(headers=dict(AUTH))
    assert client.get_server_metadata(headers=dict(AUTH))["extensions"][0] == "binary_tensor_data"
    meta = client.get_model_metadata(DET, headers=dict(AUTH))
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 9, -1, -1]}]
    assert [o["name"] for o in meta["outputs"]] == list(HEADS)
    seg = client.get_model_metadata(SEG, model_version="1", headers=dict(AUTH))
    assert [(i["name"], i["shape"]) for i in seg["inputs"]] == [("image", [-1, 1, 128, 128]),
                                                                ("template", [-1, 6, 128, 128])]
    assert client.is_model_ready(SEG, headers=dict(AUTH))
    assert client.get_model_config(DET, headers=dict(AUTH))["max_batch_size"] == 16
    assert {m["name"] for m in client.get_model_repository_index(headers=dict(AUTH))} == {DET, SEG}


def test_detector_real_ct_binary_and_json(client, sessions, ct_slice):
    want = dict(zip(HEADS, sessions[DET].run(list(HEADS), {"image": ct_slice})))
    tensor = triton.InferInput("image", list(ct_slice.shape), "FP32")
    tensor.set_data_from_numpy(ct_slice, binary_data=True)
    result = client.infer(DET, [tensor], request_id="slice-1", headers=dict(AUTH))
    assert result.get_response()["id"] == "slice-1"
    for name in HEADS:
        _close(result.as_numpy(name), want[name])
    # JSON both ways, a crop, and only one output asked for
    crop = np.ascontiguousarray(ct_slice[:, :, 128:384, 96:352])
    want = sessions[DET].run(["heatmaps"], {"image": crop})[0]
    tensor = triton.InferInput("image", list(crop.shape), "FP32")
    tensor.set_data_from_numpy(crop, binary_data=False)
    result = client.infer(DET, [tensor], outputs=[triton.InferRequestedOutput("heatmaps", binary_data=False)],
                          headers=dict(AUTH))
    assert [o["name"] for o in result.get_response()["outputs"]] == ["heatmaps"]
    assert "data" in result.get_response()["outputs"][0]
    _close(result.as_numpy("heatmaps"), want)


def test_segmenter_bank_slices(client, sessions, bank):
    image = bank.images[[0, 3]].numpy()
    template = bank.templates([1, 2]).numpy()
    want = sessions[SEG].run(["logits"], {"image": image, "template": template})[0]
    inputs = [triton.InferInput("image", list(image.shape), "FP32"),
              triton.InferInput("template", list(template.shape), "FP32")]
    inputs[0].set_data_from_numpy(image)
    inputs[1].set_data_from_numpy(template, binary_data=False)  # one binary, one JSON input
    result = client.infer(SEG, inputs, model_version="1", headers=dict(AUTH),
                          request_compression_algorithm="gzip")
    _close(result.as_numpy("logits"), want)
    assert (result.as_numpy("logits").argmax(1) > 0).any()  # real anatomy: some organ found


def test_auth(server, client):
    with httpx.Client(base_url=server[1]) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": "Bearer"}):
            # liveness and readiness are open (Kubernetes probes send no token); everything else is not
            assert http.get("/v2/health/live", headers=headers).json() == {"live": True}
            assert http.get("/v2/health/ready", headers=headers).json() == {"ready": True}
            for method, path in (("GET", "/v2"), ("GET", f"/v2/models/{DET}"), ("GET", f"/v2/models/{DET}/ready"),
                                 ("GET", "/metrics"), ("POST", "/v2/repository/index")):
                response = http.request(method, path, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.headers["www-authenticate"] == "Bearer" and "token" in response.json()["error"]
        response = http.post(f"/v2/models/{DET}/infer", content=b"{}", headers={"Authorization": "Bearer x"})
        assert response.status_code == 401
        assert http.get("/v2", headers={"Authorization": "Bearer second-token-abcdefghijkl"}).status_code == 200
    with pytest.raises(InferenceServerException, match="invalid bearer token"):
        client.get_model_metadata(DET, headers={"Authorization": "Bearer nope"})



def _json(inputs, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def _tensor(name="image", shape=(1, 9, 32, 32), datatype="FP32", data=None) -> dict:
    count = int(np.prod(shape))
    return {"name": name, "shape": list(shape), "datatype": datatype, "data": [0.5] * count if data is None else data}


def _binary(size: int, data: bytes = b"") -> tuple[bytes, dict]:
    text = _json([{"name": "image", "shape": [1, 9, 32, 32], "datatype": "FP32",
                   "parameters": {"binary_data_size": size}}])
    return text + data, {HEADER: str(len(text))}


BAD_REQUESTS = [
    ("unknown model", "nope", _json([_tensor()]), {}, 404, "unknown model 'nope'"),
    ("unknown version", DET + "/versions/7", _json([_tensor()]), {}, 404, "no version '7'"),
    ("wrong tensor name", DET, _json([_tensor("images")]), {}, 400, "has no input 'images'"),
    ("missing input", SEG, _json([_tensor(shape=(1, 1, 128, 128))]), {}, 400, "input 'template' is missing"),
    ("wrong datatype", DET, _json([_tensor(datatype="FP64")]), {}, 400, "must be FP32, got FP64"),
    ("unknown datatype", DET, _json([_tensor(datatype="FLOAT")]), {}, 400, "datatype must be one of"),
    # a list or an object is unhashable: the datatype lookup raised TypeError, a 500 with two tracebacks
    ("datatype a list", DET, _json([_tensor(datatype=["FP32"])]), {}, 400, "datatype must be one of"),
    ("datatype an object", DET, _json([_tensor(datatype={"a": 1})]), {}, 400, "datatype must be one of"),
    ("BYTES", DET, _json([_tensor(datatype="BYTES")]), {}, 400, "BYTES is not supported"),
    ("8 channels", DET, _json([_tensor(shape=(1, 8, 32, 32))]), {}, 400, "dimension 1 must be 9, not 8"),
    ("3 dimensions", DET, _json([_tensor(shape=(9, 32, 32))]), {}, 400, "must have 4 dimensions"),
    ("not a multiple of 32", DET, _json([_tensor(shape=(1, 9, 40, 32))]), {}, 400, "multiple of 32"),
    ("batch too big", DET, _json([_tensor(shape=(17, 9, 32, 32))]), {}, 400, "exceeds model"),
    ("data length", DET, _json([_tensor(data=[0.0] * 10)]), {}, 400, "has 10 elements but shape"),
    ("text data", DET, _json([_tensor(shape=(1, 9, 32, 32), data=["x"] * 9216)]), {}, 400, "holds strings"),
    ("NaN", DET, _json([_tensor(data=[float("nan")] + [0.0] * 9215)]), {}, 400, "NaN or infinite"),
    ("malformed JSON", DET, b'{"inputs": [', {}, 400, "not valid JSON"),
    ("no inputs", DET, b'{"id": "x"}', {}, 400, "inputs must be a non-empty list"),
    ("unknown output", DET, _json([_tensor()], outputs=[{"name": "boxes"}]), {}, 400, "has no output 'boxes'"),
    ("header beyond body", DET, _json([_tensor()]), {HEADER: "999999"}, 400, "but the body has only"),
    ("header not a number", DET, _json([_tensor()]), {HEADER: "ten"}, 400, "must be a non-negative integer"),
    # "²" is a digit to str.isdigit() but not to int(): latin-1 header bytes reach the codec as such characters
    ("header a superscript digit", DET, _json([_tensor()]), {HEADER: b"\xb2"}, 400, "must be a non-negative integer"),
    ("gzip, header a superscript digit", DET, gzip.compress(_json([_tensor()])),
     {HEADER: b"\xb2", "Content-Encoding": "gzip"}, 400, "must be a non-negative integer"),
    ("binary size beyond body", DET, *_binary(36864, b"\0" * 100), 400, "run past the end"),
    ("binary size wrong", DET, *_binary(8, b"\0" * 8), 400, "needs 36864 bytes"),
    ("binary without header", DET, _binary(36864)[0], {}, 400, "has no Inference-Header-Content-Length"),
    ("Inf in binary", DET, *_binary(36864, np.full(9216, np.inf, np.float32).tobytes()), 400, "NaN or infinite"),
    ("corrupt gzip", DET, b"not gzip", {"Content-Encoding": "gzip"}, 400, "gzip request body is corrupt"),
    ("brotli", DET, _json([_tensor()]), {"Content-Encoding": "br"}, 415, "Content-Encoding 'br' is not supported"),
    ("zstd with the binary extension", DET, _binary(36864, bytes(36864))[0],
     {**_binary(36864)[1], "Content-Encoding": "zstd"}, 415, "Content-Encoding 'zstd' is not supported"),
    # finite FP32 input the graph overflows on: its heads are NaN, which JSON cannot carry (was a bare NaN)
    ("non-finite output", DET, _json([_tensor(data=[3e38] * 9216)]), {}, 422, "non-finite values (NaN or infinity)"),
    ("nested too deeply", DET, b"[" * 100000, {}, 400, "nested too deeply"),
]


def test_bad_requests_get_4xx_and_service_keeps_serving(server, sessions):
    good_input = np.random.default_rng(0).random((1, 9, 32, 32), np.float32)
    good_body, good_headers = _binary_request({"image": good_input})
    want = sessions[DET].run(["heatmaps"], {"image": good_input})[0]
    with httpx.Client(base_url=server[1], timeout=60) as http:
        for label, model, body, headers, status, message in BAD_REQUESTS:
            response = http.post(f"/v2/models/{model}/infer", content=body, headers={**AUTH, **headers})
            assert response.status_code == status, (label, response.text)
            assert message in json.loads(response.text, parse_constant=_no_constant)["error"], (label, response.text)
            _close(_binary_outputs(http.post(f"/v2/models/{DET}/infer", content=good_body,
                                             headers=good_headers))["heatmaps"], want)


def test_an_unsupported_encoding_is_415_before_the_body_is_measured():
    """request_budget inflated a 'br' body as gzip to count its JSON values: 400 "corrupt" instead of 415."""
    from ctzoo.serve.v2_codec import request_budget

    limits = ServeLimits()
    for encoding, header_length in (("br", None), ("zstd", "2"), (" BR ", None)):
        with pytest.raises(ServeError, match="Content-Encoding .* is not supported") as refused:
            request_budget(b"{}", encoding, header_length, 1 << 20, limits.check_tensor_shape,
                           limits.max_tensor_elements)
        assert refused.value.status == 415


def _no_constant(name: str):
    raise ValueError(f"invalid JSON: {name}")


def test_non_finite_outputs_are_422_as_json_and_sent_as_they_are_as_binary():
    outputs = {"heads": np.array([[0.5, np.nan], [np.inf, 1.0]], np.float32), "count": np.array([2], np.int64)}
    with pytest.raises(ServeError, match="non-finite values .* in output 'heads'") as refused:
        encode_response("m", "1", outputs, DecodedRequest({}))
    assert refused.value.status == 422
    body, headers = encode_response("m", "1", outputs, DecodedRequest({}, binary={"heads": True}))
    length = int(headers[HEADER])
    header = json.loads(body[:length], parse_constant=_no_constant)
    assert header["outputs"][1]["data"] == [2]
    sent = np.frombuffer(body[length:], np.float32).reshape(2, 2)
    assert np.isnan(sent[0, 1]) and np.isinf(sent[1, 0])


def test_oversize_body_is_refused_before_reading(server):
    """413 from Content-Length alone: the server answers a 1 GB announcement without waiting for the bytes."""
    with socket.create_connection(("127.0.0.1", server[0]), timeout=10) as sock:
        sock.sendall(f"POST /v2/models/{DET}/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n".encode() + b"{" * 1000)
        reply = b""
        while b"upload limit" not in reply:  # headers and body may come in separate TCP segments
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        reply = reply.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413") and "upload limit" in reply


def _asgi(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


def test_streamed_oversize_gzip_bomb_and_timeout(repo):
    app = create_app(repo, [TOKEN], device="cpu", threads=1, max_upload_mb=1, request_timeout_s=0.3,
                     max_batch_size=2, max_queue_delay_ms=5000)

    async def scenario():
        async with _asgi(app) as http:
            async def chunks():  # no Content-Length: the limit counts the streamed bytes
                for _ in range(40):
                    yield b" " * 65536

            url = f"/v2/models/{DET}/infer"
            response = await http.post(url, content=chunks(), headers=dict(AUTH))
            assert response.status_code == 413 and "upload limit" in response.json()["error"]
            bomb = gzip.compress(b" " * (4 << 20))
            response = await http.post(url, content=bomb, headers={**AUTH, "Content-Encoding": "gzip"})
            assert response.status_code == 413 and "inflates" in response.json()["error"]
            # one row waits for a second one (5 s queue delay) past the 0.3 s timeout: 504
            body, headers = _binary_request({"image": np.zeros((1, 9, 32, 32), np.float32)})
            response = await http.post(url, content=body, headers=headers)
            assert response.status_code == 504 and "timeout" in response.json()["error"]
            # a full batch (2 rows) runs at once; the abandoned request does not block it
            body, headers = _binary_request({"image": np.zeros((2, 9, 32, 32), np.float32)})
            assert _binary_outputs(await http.post(url, content=body, headers=headers))["heatmaps"].shape[0] == 2

    asyncio.run(scenario())



def _json_numbers(count: int, number: bytes = b"0") -> bytes:
    """A JSON request for the detector's (1, 9, 32, 32) input (9216 elements) whose data holds ``count`` numbers."""
    return b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 9, 32, 32], "data": [%s%s]}]}' % (
        (number + b",") * (count - 1), number)


def test_json_numbers_are_counted_before_parsing_and_budgeted(repo):
    """Parsed, a JSON number is a Python object (``0,`` becomes ~32 bytes): 4 M numbers in 8 MB of text (29 KB
    gzipped) against a 1 Mi-element limit are refused from a count of the streamed text, never parsed, holding a
    few MiB; a JSON tensor the limit allows reserves its parsed size in flight, so one that does not fit the
    in-flight budget is refused while the same tensor as binary data is served; small JSON bodies, compressed or
    not, are served."""
    app = create_app(repo, [TOKEN], device="cpu", threads=1, batching=False,
                     limits=ServeLimits(max_tensor_elements=1 << 20, max_inflight_mb=32))
    bomb = gzip.compress(_json_numbers(4_000_000), 9)
    big = np.full((1, 9, 320, 320), 0.5, np.float32)  # 921,600 elements: 4.6 MB of JSON text, ~44 MB parsed

    async def scenario():
        async with _asgi(app) as http:
            url = f"/v2/models/{DET}/infer"
            tracemalloc.start()
            try:
                response = await http.post(url, content=bomb, headers={**AUTH, "Content-Encoding": "gzip"})
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert response.status_code == 413, response.text
            assert "JSON holds more than 1,048,576 numbers" in response.json()["error"]
            assert peak < 12 << 20, f"{peak / (1 << 20):.0f} MiB held while refusing"
            response = await http.post(url, content=_json_numbers(1_200_000), headers=dict(AUTH))
            assert response.status_code == 413 and "--max-tensor-elements" in response.json()["error"]
            as_json = _json([_tensor(shape=big.shape, data=big.ravel().tolist())])
            response = await http.post(url, content=as_json, headers=dict(AUTH))
            assert response.status_code == 413 and "MiB in flight" in response.json()["error"], response.text
            body, headers = _binary_request({"image": big})
            assert _binary_outputs(await http.post(url, content=body, headers=headers))["heatmaps"].shape[0] == 1
            small = _json_numbers(9216, b"0.5")
            for content, extra in ((small, {}), (gzip.compress(small), {"Content-Encoding": "gzip"})):
                response = await http.post(url, content=content, headers={**AUTH, **extra})
                assert response.status_code == 200, response.text
                assert {t["name"] for t in response.json()["outputs"]} == set(HEADS)

    asyncio.run(scenario())


async def _concurrent(app, inputs: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    async with _asgi(app) as http:
        async def one(x):
            body, headers = _binary_request({"image": x})
            return _binary_outputs(await http.post(f"/v2/models/{DET}/infer", content=body, headers=headers))
        return await asyncio.gather(*(one(x) for x in inputs))


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "no-batching"])
def test_micro_batching(repo, sessions, batching):
    # every request may be worked on at once (a merged batch holds at most --max-requests-per-model), and the
    # queue waits long enough that a loaded machine still merges them: the count is then not a race
    app = create_app(repo, [TOKEN], device="cpu", threads=1, max_queue_delay_ms=200, batching=batching,
                     limits=ServeLimits(max_requests_per_model=16))
    rng = np.random.default_rng(1)
    # 8 requests of one size and 3 of another: only same-shaped requests may merge
    inputs = [rng.random((1, 9, 64, 64), np.float32) for _ in range(8)]
    inputs += [rng.random((1, 9, 96, 64), np.float32) for _ in range(3)]
    results = asyncio.run(_concurrent(app, inputs))
    for x, got in zip(inputs, results):  # every client gets its own result
        for name, want in zip(HEADS, sessions[DET].run(list(HEADS), {"image": x})):
            _close(got[name], want)
    samples = _metrics(generate_latest(app.state.metrics.registry).decode())
    runs, served = (samples[(f"ctzoo_batch_requests_{kind}", (("model", DET),))] for kind in ("count", "sum"))
    assert served == 11
    if batching:
        assert runs <= 4, f"{runs} model runs for 11 concurrent requests: nothing was merged"
    else:
        assert runs == 11  # batches of 1


def test_torch_backend_serves_the_graphs_tensors_from_the_bundle(repo, sessions, bank):
    """--backend torch: the same named tensors as the graph, from the module it was exported from (equal within the
    export check's tolerance), merged by the micro-batcher like the graph's; bad input is still a 400."""
    from ctzoo.export.parity import RELATIVE_TOLERANCE
    from ctzoo.inference.precision import output_error

    with pytest.raises(ValueError, match="precision bf16 runs the PyTorch backend"):
        create_app(repo, [TOKEN], device="cpu", precision="bf16")
    app = create_app(repo, [TOKEN], device="cpu", threads=1, backend="torch", max_queue_delay_ms=50)
    detector = app.state.repository[DET]
    assert detector.engine.name == "torch cpu fp32"
    assert detector.precision_reason == "auto: fp32 on the CPU, the reference"
    rng = np.random.default_rng(5)
    inputs = [rng.random((1, 9, 64, 64), np.float32) for _ in range(8)]
    seg_inputs = {"image": bank.images[[0, 3]].numpy(), "template": bank.templates([1, 2]).numpy()}

    async def scenario():
        async with _asgi(app) as http:
            meta = (await http.get(f"/v2/models/{SEG}", headers=AUTH)).json()
            body, headers = _binary_request(seg_inputs)
            logits = _binary_outputs(await http.post(f"/v2/models/{SEG}/infer", content=body, headers=headers))
            body, headers = _binary_request({"image": inputs[0][:, :4]})
            wrong = await http.post(f"/v2/models/{DET}/infer", content=body, headers=headers)
        return meta, logits, wrong

    results = asyncio.run(_concurrent(app, inputs))
    meta, logits, wrong = asyncio.run(scenario())
    for x, got in zip(inputs, results):
        for name, want in zip(HEADS, sessions[DET].run(list(HEADS), {"image": x})):
            assert output_error(got[name], want)[1] <= RELATIVE_TOLERANCE, name
    want = sessions[SEG].run(["logits"], seg_inputs)[0]
    assert output_error(logits["logits"], want)[1] <= RELATIVE_TOLERANCE
    assert (logits["logits"].argmax(1) == want.argmax(1)).mean() > 0.999
    assert meta["platform"] == "pytorch_libtorch" and [i["shape"] for i in meta["inputs"]] == [[-1, 1, 128, 128],
                                                                                                [-1, 6, 128, 128]]
    assert wrong.status_code == 400 and "dimension 1 must be 9" in wrong.json()["error"]
    samples = _metrics(generate_latest(app.state.metrics.registry).decode())
    assert samples[("ctzoo_batch_requests_count", (("model", DET),))] <= 3  # 8 concurrent requests were merged


def test_a_failing_request_does_not_fail_its_batch():
    def run(inputs):  # fails on any batch holding a negative row
        if (inputs["x"] < 0).any():
            raise RuntimeError("poisoned row")
        return {"y": inputs["x"] * 2}

    async def scenario(values):
        batcher = MicroBatcher("toy", run, max_batch_size=8, max_queue_delay_ms=50)
        results = await asyncio.gather(*(batcher.submit({"x": np.full((1, 2), v, np.float32)}) for v in values),
                                       return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(scenario([1.0, 2.0, -1.0, 3.0]))
    assert isinstance(results[2], RuntimeError)
    assert [r["y"][0, 0] for k, r in enumerate(results) if k != 2] == [2.0, 4.0, 6.0]


def test_one_request_per_merged_batch_reports_the_batch_with_every_member():
    """A merged model run is one perf event, not one per request: the batch's first request gets the batch's
    formation and run times and the request hashes of all its members."""
    async def scenario():
        batcher = MicroBatcher("toy", lambda inputs: {"y": inputs["x"] * 2}, max_batch_size=8,
                               max_queue_delay_ms=100)
        timings = [{"request": f"r{k}"} for k in range(3)]
        await asyncio.gather(*(batcher.submit({"x": np.ones((1, 2), np.float32)}, t) for t in timings))
        await batcher.stop()
        return timings

    timings = asyncio.run(scenario())
    assert [t.get("batch_first", False) for t in timings] == [True, False, False]
    first = timings[0]
    assert first["batch_members"] == ["r0", "r1", "r2"] and first["batch_rows"] == 3
    # it held the batch open for more rows (up to the 100 ms delay) and then ran it once
    assert 0 <= first["batch_s"] <= 0.5 and all(t["model_s"] == first["model_s"] for t in timings)


def test_extra_routers_reach_models_through_the_batcher_behind_auth(repo, sessions):
    router = APIRouter()  # (Request is imported at module level: FastAPI resolves annotations in its globals)

    @router.post("/study/{model}/mean-heat")
    async def mean_heat(model: str, request: Request) -> dict:
        served = request.app.state.repository[model]
        image = np.frombuffer(await request.body(), np.float32).reshape(1, 9, 32, 32)
        outputs = await served.infer({"image": image})
        return {"task": served.config["task"], "mean": float(outputs["heatmaps"].mean())}

    app = create_app(repo, [TOKEN], device="cpu", threads=1, extra_routers=[router])
    image = np.random.default_rng(3).random((1, 9, 32, 32), np.float32)
    want = float(sessions[DET].run(["heatmaps"], {"image": image})[0].mean())

    async def scenario():
        async with _asgi(app) as http:
            assert (await http.post(f"/study/{DET}/mean-heat", content=image.tobytes())).status_code == 401
            response = await http.post(f"/study/{DET}/mean-heat", content=image.tobytes(), headers=AUTH)
            assert response.json() == {"task": "detection", "mean": pytest.approx(want, rel=1e-6)}
            bad = np.full_like(image, np.nan)  # the model's own checks apply: a JSON 400, not a 500
            response = await http.post(f"/study/{DET}/mean-heat", content=bad.tobytes(), headers=AUTH)
            assert response.status_code == 400 and "NaN" in response.json()["error"]

    asyncio.run(scenario())
    assert app.state.metrics.batch_size.labels(DET)._sum.get() == 1  # it went through the batcher


ACCESS_LINE = re.compile(r"^(GET|POST) (.+) (\d{3}) (\d+\.\d) ms$")


def test_access_log_lifecycle_lines_and_open_readiness(repo, caplog):
    """One INFO line per request (method, path, status, ms; no query, body, header or token), the path made safe;
    readiness without a token, 503 once shutting down; the lifespan's shutdown lines with the request count."""
    caplog.set_level(logging.INFO, logger="ctzoo.serve.access")
    caplog.set_level(logging.INFO, logger="ctzoo.serve.lifecycle")
    app = create_app(repo, [TOKEN], device="cpu", threads=1)
    request_id, forged = "patient-0042-secret", "/v2/models/x%0A2025-01-01 GET /v2 200 0.1 ms%0D%1B[2J%E2%80%A8"

    async def scenario():
        async with app.router.lifespan_context(app), _asgi(app) as http:
            assert (await http.get("/v2/health/ready")).status_code == 200
            body = _json([_tensor()], id=request_id)
            response = await http.post(f"/v2/models/{DET}/infer?token={TOKEN}&id={request_id}", content=body,
                                       headers=AUTH)
            assert response.status_code == 200 and response.json()["id"] == request_id
            assert (await http.get(forged + "y" * 300, headers=AUTH)).status_code == 404
            app.state.ready = False  # as in the lifespan's shutdown
            assert (await http.get("/v2/health/ready")).status_code == 503

    asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "ctzoo.serve.access"]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "ctzoo.serve.access")
    parsed = [ACCESS_LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [m.group(1, 3) for m in parsed] == [("GET", "200"), ("POST", "200"), ("GET", "404"), ("GET", "503")]
    assert [m[2] for m in parsed[:2]] == ["/v2/health/ready", f"/v2/models/{DET}/infer"]  # no query string
    assert float(parsed[1][4]) > 0
    path = parsed[2][2]  # one line: the client's line break and escape sequence are escaped, the path cut
    assert path.startswith("/v2/models/x\\x0a2025-01-01") and "\\x0d\\x1b[2J\\u2028y" in path
    assert len(path) == 200 and path.endswith("...")
    assert TOKEN not in caplog.text and request_id not in caplog.text and "inputs" not in caplog.text
    assert loggable("a\tb\x7f\u202ec") == "a\\x09b\\x7f\\u202ec" and loggable("/a\tb", 6) == "/a\\..."
    lifecycle = [r.getMessage() for r in caplog.records if r.name == "ctzoo.serve.lifecycle"]
    assert lifecycle == ["ctzoo serve: shutting down (4 requests served)", "ctzoo serve: stopped"]


def test_console_logging_shows_access_lines_unless_turned_off(capsys):
    """What ``ctzoo serve`` sets up: access lines (with a timestamp) and lifecycle lines on stderr, once each
    (not again through the root logger), the access log off with --no-access-log."""
    access, lifecycle = logging.getLogger("ctzoo.serve.access"), logging.getLogger("ctzoo.serve.lifecycle")
    try:
        console_logging(access_log=True)
        console_logging(access_log=True)  # again: no second handler
        access.info("%s %s %d %.1f ms", "GET", "/v2", 200, 1.25)
        lifecycle.info("ctzoo serve: stopped")
        console_logging(access_log=False)
        access.info("%s %s %d %.1f ms", "GET", "/hidden", 200, 1.0)
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 2 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} GET /v2 200 1\.2 ms", err[0])
        assert err[1] == "ctzoo serve: stopped"
    finally:
        for log in (access, lifecycle):
            log.handlers = [h for h in log.handlers if not getattr(h, "_ctzoo_serve", False)]
            log.setLevel(logging.NOTSET)
            log.propagate = True


def test_no_auth_only_when_asked_and_iobinding_path(repo, sessions):
    with pytest.raises(ValueError, match="no API token"):
        create_app(repo, [], device="cpu")
    app = create_app(repo, [], insecure_no_auth=True, device="cpu", threads=1)

    async def scenario():
        async with _asgi(app) as http:
            assert (await http.get(f"/v2/models/{SEG}")).status_code == 200

    asyncio.run(scenario())
    # the GPU path (IOBinding) exercised on the CPU: same outputs as session.run
    model = app.state.repository[SEG]
    assert not model.engine.on_gpu and model.engine.providers == ["CPUExecutionProvider"]
    inputs = {"image": np.random.default_rng(4).random((2, 1, 128, 128), np.float32),
              "template": np.zeros((2, 6, 128, 128), np.float32)}
    model.engine.on_gpu, model.engine.io_device = True, "cpu"
    _close(model.run(inputs)["logits"], sessions[SEG].run(["logits"], inputs)[0])



def test_metrics(server):
    with httpx.Client(base_url=server[1]) as http:
        http.get(f"/v2/models/{DET}", headers=dict(AUTH))
        http.get("/v2", headers={"Authorization": "Bearer wrong"})
        body, headers = _binary_request({"image": np.zeros((1, 9, 32, 32), np.float32)})
        assert http.post(f"/v2/models/{DET}/infer", content=body, headers=headers).status_code == 200
        text = http.get("/metrics", headers=dict(AUTH)).text
    samples = _metrics(text)
    ok = samples[("ctzoo_requests_total", (("code", "200"), ("endpoint", "infer"), ("model", DET)))]
    assert ok >= 1 and samples[("ctzoo_requests_total", (("code", "401"), ("endpoint", "server"), ("model", "")))]
    for stage in ("decode", "queue", "inference", "encode", "total"):
        assert samples[("ctzoo_request_stage_seconds_count", (("model", DET), ("stage", stage)))] >= 1
    assert samples[("ctzoo_batch_size_count", (("model", DET),))] >= 1
    assert ("ctzoo_queue_depth", (("model", SEG),)) in samples
    assert "ctzoo_requests_total" in text and "ctzoo_batch_requests_bucket" in text


def test_codec_round_trip():
    arrays = {"a": np.arange(6, dtype=np.float16).reshape(2, 3), "b": np.array([True, False]),
              "c": np.arange(4, dtype=np.int64)}
    request = DecodedRequest({}, id="r", binary={"a": True, "c": True})
    body, headers = encode_response("m", "1", arrays, request)
    length = int(headers[HEADER])
    header = json.loads(body[:length])
    assert header["id"] == "r" and header["outputs"][1]["data"] == [True, False]
    text = json.dumps({"inputs": header["outputs"]}).encode()  # response tensors are valid request tensors
    decoded = decode_request(text + body[length:], str(len(text)))
    for name, array in arrays.items():
        np.testing.assert_array_equal(decoded.inputs[name], array)
        assert decoded.inputs[name].dtype == array.dtype
    with pytest.raises(ServeError, match="after the JSON"):
        decode_request(text + body[length:] + b"x", str(len(text)))



def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.parametrize("content", [b"\x1f\x8b\x08\x00secret-token-0123456789",
                                     b"NRRD0004\nsecret-token-0123456789\n\0\0"], ids=["not-utf8", "nul-bytes"])
def test_a_binary_token_file_is_one_error_line_showing_none_of_it(tmp_path, monkeypatch, content):
    """It used to end in a UnicodeDecodeError traceback, whose message quotes the file's bytes, or (binary that
    decodes as UTF-8) to serve with its lines as tokens."""
    monkeypatch.setenv("CTZOO_SERVE_TOKENS", "")
    token_file = tmp_path / "ct.nrrd"
    token_file.write_bytes(content)
    token_file.chmod(0o644)  # no advice to chmod a file that is no token file
    result = CliRunner().invoke(main, ["serve", "--repository", str(tmp_path), "--token-file", str(token_file),
                                       "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output == f"Error: {token_file}: not a text token file (one token per line)\n"


def test_a_token_file_with_a_byte_order_mark_keeps_its_first_token_valid(repo, tmp_path, monkeypatch):
    """The BOM an editor writes became part of the first token, which then never matched (401 for its holders)."""
    from fastapi.testclient import TestClient

    from ctzoo.cli.serve import read_tokens

    monkeypatch.setenv("CTZOO_SERVE_TOKENS", "")
    token_file = tmp_path / "tokens"
    token_file.write_bytes(f"\ufeff{TOKEN}\r\nsecond-token-abcdefghijkl\r\n".encode())
    token_file.chmod(0o600)
    assert read_tokens(token_file) == [TOKEN, "second-token-abcdefghijkl"]
    with TestClient(create_app(repo, read_tokens(token_file), device="cpu", threads=1)) as http:
        assert http.get("/v2", headers=AUTH).status_code == 200


@pytest.mark.parametrize("where,token", [("file", "caf\u00e9-secret-token-0123456789"),
                                         ("file", "secret-token\x010123456789"),
                                         ("env", "ok-token-0123456789abcdef,\u00e9-secret-token-0123456789")])
def test_a_token_no_client_could_send_is_refused_at_start_up_without_showing_it(tmp_path, monkeypatch, where,
                                                                                   token):
    """HTTP headers are read as Latin-1 and tokens hashed as UTF-8: a non-ASCII or control character never matches,
    and the service started with a token nobody could use."""
    token_file = tmp_path / "tokens"
    token_file.write_text("# tokens\n" + (token if where == "file" else "") + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    monkeypatch.setenv("CTZOO_SERVE_TOKENS", token if where == "env" else "")
    result = CliRunner().invoke(main, ["serve", "--repository", str(tmp_path), "--token-file", str(token_file),
                                       "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    named = f"the token on line 2 of {token_file}" if where == "file" else "token 2 of $CTZOO_SERVE_TOKENS"
    assert result.output.startswith(f"Error: {named} holds a character other than printable ASCII"), result.output
    assert "secret" not in result.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the server's RSS")
def test_cli_server_under_load_has_no_5xx_and_stable_memory(repo, tmp_path, bank, monkeypatch):
    """Also: its access log and shutdown lines on stderr, and SIGTERM ending it gracefully with status 0."""
    monkeypatch.delenv("CTZOO_SERVE_TOKENS", raising=False)
    refused = CliRunner().invoke(main, ["serve", "--repository", str(repo)])
    assert refused.exit_code != 0 and "no API token" in refused.output
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port, url = probe.getsockname()[1], f"http://127.0.0.1:{probe.getsockname()[1]}"
    (tmp_path / "tokens").write_text(f"# comment\n{TOKEN}\n", encoding="utf-8")
    (tmp_path / "tokens").chmod(0o600)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stderr = tmp_path / "stderr.txt"  # a file, not a pipe: 400+ access lines must never block the server
    with stderr.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "ctzoo", "serve", "--repository", str(repo), "--port",
                                    str(port), "--token-file", str(tmp_path / "tokens"), "--threads", "1",
                                    "--state-dir", str(tmp_path / "state")],
                                   env=env, stdout=subprocess.DEVNULL, stderr=sink)
    seg_request = _binary_request({"image": bank.images[:1].numpy(), "template": bank.templates(0).numpy()})
    rng = np.random.default_rng(2)

    async def round_of(count: int) -> list[int]:  # 3 detector requests to 1 segmenter request
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            async def one(k: int) -> int:
                model, (body, headers) = (SEG, seg_request) if k % 4 == 3 else \
                    (DET, _binary_request({"image": rng.random((1, 9, 64, 64), np.float32)}))
                return (await http.post(f"/v2/models/{model}/infer", content=body, headers=headers)).status_code
            return await asyncio.gather(*(one(k) for k in range(count)))

    try:
        deadline = time.monotonic() + 60
        while not _is_live(url):
            assert process.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, "ctzoo serve did not come up"
            time.sleep(0.1)
        started = time.monotonic()
        assert asyncio.run(round_of(200)) == [200] * 200
        first = _rss_mb(process.pid)
        assert asyncio.run(round_of(200)) == [200] * 200
        second, elapsed = _rss_mb(process.pid), time.monotonic() - started
        assert second <= first * 1.15 + 30, f"RSS grew from {first:.0f} MB to {second:.0f} MB"
        samples = _metrics(httpx.get(url + "/metrics", headers=AUTH).text)
        assert not any(name == "ctzoo_requests_total" and int(dict(labels)["code"]) >= 500 and value
                       for (name, labels), value in samples.items())
        runs = samples[("ctzoo_batch_requests_count", (("model", DET),))]
        assert runs < 300, f"{runs} model runs for 300 detector requests: nothing was merged"
        print(f"load: 400 requests in {elapsed:.1f} s, RSS {first:.0f} -> {second:.0f} MB, {runs:.0f} detector runs")
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, stderr.read_text()[-2000:]
        lines = stderr.read_text().splitlines()
        access = [line.split(" ", 1)[1] for line in lines if re.match(r"\d{4}-\d\d-\d\dT[\d:.]+ (GET|POST) ", line)]
        assert sum(bool(re.fullmatch(rf"POST /v2/models/({DET}|{SEG})/infer 200 \d+\.\d ms", a))
                   for a in access) == 400
        assert any(re.fullmatch(r"GET /metrics 200 \d+\.\d ms", a) for a in access)
        assert any(a.startswith("GET /v2/health/live 200 ") for a in access)
        served = int(re.fullmatch(r"ctzoo serve: shutting down \((\d+) requests served\)", lines[-2])[1])
        assert served == len(access) and lines[-1] == "ctzoo serve: stopped"
        assert TOKEN not in "\n".join(lines)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _is_live(url: str) -> bool:
    try:
        return httpx.get(url + "/v2/health/live").status_code == 200
    except httpx.TransportError:
        return False
