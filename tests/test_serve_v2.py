"""``ctzoo serve``'s KServe v2 endpoints against protocol abuse: an empty inference header on a gzip body, uploads
held open mid-body, batching overrides seen by validation and /config, malformed JSON tensors, the Triton
ModelConfig shape of /config, readiness during shutdown. Servers run in-process (httpx's ASGI transport)."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
import zlib

import httpx
import numpy as np
import pytest
import test_serve
from test_serve import AUTH, DET, TOKEN, _binary_outputs, _binary_request
from upload_builders import held_open

from ctzoo.serve.app import create_app
from ctzoo.serve.budget import ServeLimits
from ctzoo.serve.v2_codec import ServeError, decode_request, request_budget

repo = test_serve.repo  # the exported repository (a module fixture: exported once for this module too)


def _asgi(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


def _gzip_zeros(mib: int) -> bytes:
    compressor = zlib.compressobj(9, wbits=31)
    return b"".join(compressor.compress(bytes(1 << 20)) for _ in range(mib)) + compressor.flush()


def test_an_empty_inference_header_is_refused_without_inflating_the_body():
    """Inference-Header-Content-Length: 0 on a gzip body asked zlib to inflate it with max_length 0, which zlib
    reads as "no limit": 64 KB of gzip became 64 MiB before any limit was checked."""
    limits, bomb = ServeLimits(), _gzip_zeros(64)
    tracemalloc.start()
    try:
        with pytest.raises(ServeError, match="Inference-Header-Content-Length is 0: the inference header") as refused:
            request_budget(bomb, "gzip", "0", 512 << 20, limits.check_tensor_shape, limits.max_tensor_elements)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.status == 400 and peak < 4 << 20, f"{peak / (1 << 20):.0f} MiB inflated"
    with pytest.raises(ServeError, match="is 0: the inference header") as refused:  # uncompressed too
        decode_request(b'{"inputs": []}', "0")
    assert refused.value.status == 400


def test_uploads_held_open_mid_body_do_not_lock_other_clients_out_of_the_model(repo):
    """The model's request slot was taken before the body was read: max-requests-per-model clients trickling
    their bodies held every slot, and everyone else got 503 after --queue-wait-s."""
    app = create_app(repo, [TOKEN], device="cpu", threads=1, batching=False,
                     limits=ServeLimits(max_requests_per_model=2, queue_wait_s=1.0))
    body, headers = _binary_request({"image": np.zeros((1, 9, 32, 32), np.float32)})
    url = f"/v2/models/{DET}/infer"

    async def scenario():
        release = asyncio.Event()
        async with _asgi(app) as http:
            slow = [asyncio.ensure_future(http.post(url, content=held_open(body, release),
                                                    headers={**headers, "Content-Length": str(len(body))}))
                    for _ in range(2)]
            await asyncio.sleep(0.3)  # both uploads are mid-body
            assert not any(task.done() for task in slow)
            response = await http.post(url, content=body, headers=headers)
            assert response.status_code == 200, response.text
            assert _binary_outputs(response)["heatmaps"].shape[0] == 1
            release.set()
            assert [r.status_code for r in await asyncio.gather(*slow)] == [200, 200]
        assert app.state.budget.reserved == 0

    asyncio.run(scenario())


def test_uploads_stalled_mid_body_hold_only_the_bytes_they_sent(repo):
    """Each body reserved its Content-Length while it was read: 16 clients announcing 512 MiB and sending 1 byte
    held the whole --max-inflight-mb, and every request on every model got 503 until their deadlines. Here two
    stalled uploads announce what would leave no room for a third request; it is answered all the same."""
    body, headers = _binary_request({"image": np.zeros((1, 9, 32, 32), np.float32)})
    # room for both stalled bodies and half of another: what they announce, reserved, would lock a third out
    app = create_app(repo, [TOKEN], device="cpu", threads=1, batching=False,
                     limits=ServeLimits(max_inflight_mb=len(body) * 2.5 / (1 << 20), queue_wait_s=1.0))
    url = f"/v2/models/{DET}/infer"

    async def scenario():
        release = asyncio.Event()
        async with _asgi(app) as http:
            stalled = [asyncio.ensure_future(http.post(url, content=held_open(body, release),
                                                       headers={**headers, "Content-Length": str(len(body))}))
                       for _ in range(2)]
            await asyncio.sleep(0.3)
            assert not any(task.done() for task in stalled)
            assert app.state.budget.reserved == 2 * 10  # the bytes that arrived (held_open sends 10)
            response = await http.post(url, content=body, headers=headers)
            assert response.status_code == 200, response.text
            release.set()
            assert [r.status_code for r in await asyncio.gather(*stalled)] == [200, 200]
        assert app.state.budget.reserved == 0

    asyncio.run(scenario())


def test_a_body_announced_or_grown_past_the_whole_budget_is_413(repo):
    """What could never fit is refused at once: from Content-Length before reading, else (chunked) once the
    bytes that arrived pass it."""
    app = create_app(repo, [TOKEN], device="cpu", threads=1, limits=ServeLimits(max_inflight_mb=1 / 16))
    url = f"/v2/models/{DET}/infer"

    async def chunked():
        for _ in range(8):
            yield bytes(16 << 10)

    async def scenario():
        async with _asgi(app) as http:
            announced = await http.post(url, content=bytes(128 << 10), headers=AUTH)
            streamed = await http.post(url, content=chunked(), headers=AUTH)
        for response in (announced, streamed):
            assert response.status_code == 413, response.text
            assert "over the server's 0.0625 MiB in flight (raise it with --max-inflight-mb)" in response.text
        assert app.state.budget.reserved == 0

    asyncio.run(scenario())


def test_batching_options_reach_validation_and_config_not_only_the_batcher(repo):
    """--max-batch-size, --max-queue-delay-ms and --no-batching went to the batcher only: requests were still
    validated against ctzoo.json's max_batch_size and /config still showed its batching."""
    async def config_and_batch_of(app, rows: int) -> tuple[dict, httpx.Response]:
        async with _asgi(app) as http:
            config = (await http.get(f"/v2/models/{DET}/config", headers=AUTH)).json()
            body, headers = _binary_request({"image": np.zeros((rows, 9, 32, 32), np.float32)})
            return config, await http.post(f"/v2/models/{DET}/infer", content=body, headers=headers)

    merged = create_app(repo, [TOKEN], device="cpu", threads=1, max_batch_size=2, max_queue_delay_ms=7)
    config, response = asyncio.run(config_and_batch_of(merged, 3))
    assert config["max_batch_size"] == 2 and config["dynamic_batching"] == {"max_queue_delay_microseconds": 7000}
    assert response.status_code == 400 and "max_batch_size 2" in response.json()["error"]
    alone = create_app(repo, [TOKEN], device="cpu", threads=1, batching=False, max_batch_size=20,
                       max_queue_delay_ms=50)
    config, response = asyncio.run(config_and_batch_of(alone, 20))
    assert config["max_batch_size"] == 20 and "dynamic_batching" not in config
    assert response.status_code == 200 and _binary_outputs(response)["heatmaps"].shape[0] == 20
    assert alone.state.repository[DET].batcher.enabled is False


def _request(data, shape=(2, 3), datatype="FP32", **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": list(shape), "datatype": datatype, "data": data}],
                       **extra}).encode()


MALFORMED_JSON_TENSORS = [
    ("strings", _request(["1", "2", "3", "4", "5", "6"]), "holds strings, but FP32 takes only numbers"),
    ("booleans as numbers", _request([True, 1, 2, 3, 4, 5]), "holds booleans, but FP32 takes only numbers"),
    ("null", _request([None, 1, 2, 3, 4, 5]), "holds null, but FP32 takes only numbers (NaN and infinity"),
    ("numbers as booleans", _request([1, 0, 1, 0, 1, 0], datatype="BOOL"), "holds numbers, but BOOL takes only"),
    ("fractions as integers", _request([1.5, 2, 3, 4, 5, 6], datatype="INT32"), "holds non-integer numbers"),
    ("out of range", _request([300, 2, 3, 4, 5, 6], datatype="INT8"), "out of the range of INT8"),
    ("nested against the shape", _request([[1, 2], [3, 4], [5, 6]]), "level 0 does not hold lists of 2"),
    ("ragged", _request([[1, 2, 3], [4, 5]]), "level 1 does not hold lists of 3"),
    ("nested too shallow", _request([[1, 2, 3, 4, 5, 6]], shape=(1, 2, 3)), "level 1 does not hold lists of 2"),
    ("mixed flat and nested", _request([1, [2], 3, 4, 5, 6]), "holds arrays"),
    ("binary_data a string", _request([0] * 6, outputs=[{"name": "y", "parameters": {"binary_data": "false"}}]),
     "output 'y'.parameters.binary_data must be true or false, got \"false\""),
    ("binary_data_output a number", _request([0] * 6, parameters={"binary_data_output": 1}),
     "request.parameters.binary_data_output must be true or false, got 1"),
]


@pytest.mark.parametrize("body, message", [case[1:] for case in MALFORMED_JSON_TENSORS],
                         ids=[case[0] for case in MALFORMED_JSON_TENSORS])
def test_json_tensors_hold_json_numbers_nested_exactly_as_their_shape(body, message):
    """The JSON decoder coerced strings, booleans and null into numbers (null: a NaN error later), reshaped nesting
    that disagreed with the shape when the sizes matched, and took the string "false" for true."""
    with pytest.raises(ServeError) as refused:
        decode_request(body, None)
    assert refused.value.status == 400 and message in str(refused.value), str(refused.value)


def test_well_formed_json_tensors_are_decoded():
    decoded = decode_request(_request([[1, 2.5, 3], [4, 5, 6]], outputs=[
        {"name": "y", "parameters": {"binary_data": False}}], parameters={"binary_data_output": True}), None)
    np.testing.assert_array_equal(decoded.inputs["x"], np.array([[1, 2.5, 3], [4, 5, 6]], np.float32))
    assert decoded.binary == {"y": False} and decoded.binary_default is True
    assert decode_request(_request([1, 2, 3, 4, 5, 6], datatype="INT8"), None).inputs["x"].dtype == np.int8
    flags = decode_request(_request([True, False] * 3, datatype="BOOL"), None).inputs["x"]
    assert flags.dtype == np.bool_ and flags.sum() == 3
    assert decode_request(_request([], shape=(2, 0)), None).inputs["x"].shape == (2, 0)


def test_config_parses_as_tritons_model_config(repo):
    """/config sent ctzoo.json as a JSON object under parameters.ctzoo, where Triton's ModelConfig has a
    ModelParameter ({"string_value": "..."}): protobuf clients could not parse it."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    app = create_app(repo, [TOKEN], device="cpu", threads=1)

    async def config() -> dict:
        async with _asgi(app) as http:
            return (await http.get(f"/v2/models/{DET}/config", headers=AUTH)).json()

    parsed = json_format.ParseDict(asyncio.run(config()), model_config_pb2.ModelConfig())
    assert parsed.name == DET and parsed.max_batch_size == 16 and parsed.input[0].name == "image"
    assert json.loads(parsed.parameters["ctzoo"].string_value) == app.state.repository[DET].config
