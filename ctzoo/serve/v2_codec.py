"""KServe v2 / Open Inference Protocol request and response bodies, with the binary tensor data extension.

Decoding turns a request body into ``{input name: numpy array}`` plus what the client asked back (the request
``id``, which outputs, and which of them as binary); encoding turns output arrays into a response body and its
headers. Only the protocol is checked here (structure, datatypes, shapes against data sizes, finiteness); whether
the tensors fit a model is :meth:`ctzoo.serve.repository.ServedModel.validate`'s job.

JSON tensors: ``{"name", "shape", "datatype", "data", "parameters"?}`` with ``data`` the row-major flattened
elements, or nested exactly as ``shape``; JSON numbers only (integers for an integer datatype, booleans for BOOL:
no string, boolean or null is coerced). ``binary_data`` and ``binary_data_output`` must be true or false.

Binary tensor data extension (as ``tritonclient.http`` speaks it):

* request: header ``Inference-Header-Content-Length: N`` (N >= 1: 0 is refused); the first ``N`` bytes of the
  body are the JSON request, the rest the raw little-endian row-major bytes of every input whose ``parameters`` hold
  ``binary_data_size``, back to back in the order of ``inputs``. A body compressed with ``Content-Encoding:
  gzip`` or ``deflate`` is inflated first (see :func:`inflate`; the size limit applies to the inflated bytes);
  any other encoding (br, zstd...) is 415 before the body is read (:func:`content_encoding`).
* response: an output is sent binary when its request entry has ``parameters.binary_data: true``, or, if it
  has no such entry, when the request's ``parameters.binary_data_output`` is true. Binary outputs carry
  ``parameters.binary_data_size`` and no ``data``; their bytes follow the JSON in output order, and the
  response has ``Inference-Header-Content-Length``. Responses are never compressed (clients must accept that).
  The JSON is always valid: an output holding NaN or infinity can only be sent binary (422 otherwise).

JSON costs memory beyond its text: parsed, every number is a Python object (about 32 bytes for ``0,``, two bytes
of text), so a few hundred KB of gzip can inflate to gigabytes of parsed numbers. Before any JSON is parsed,
:func:`request_budget` counts its values (an upper bound: commas and opening brackets, on the inflated text,
streamed) and refuses with 413 a request holding more than its element limit allows (plus
``JSON_VALUE_SLACK`` for shapes and parameters); it answers the bytes the request is expected to hold while
decoded, ``PARSED_BYTES_PER_JSON_VALUE`` per value included, for the service's in-flight budget.

Numeric datatypes are supported (BOOL, INT8..INT64, UINT8..UINT64, FP16, FP32, FP64); BYTES and BF16 are
refused with a 400. Every problem raises :class:`ServeError` with the HTTP status and a message for the client.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Iterable, Iterator

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
UNSUPPORTED_DATATYPES = ("BYTES", "BF16")
#: Values a JSON request may hold beyond its tensor elements: shapes, parameters, outputs (generously).
JSON_VALUE_SLACK = 1 << 16
#: Bytes a parsed JSON value is expected to hold: its list slot (8, plus growth), a float object (24) and its
#: element in the array built from the list (up to 8).
PARSED_BYTES_PER_JSON_VALUE = 48
_CHUNK = 1 << 20


class ServeError(Exception):
    """A request the service refuses: ``status`` is the HTTP status, ``str(error)`` the message for the client."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def datatype_of(dtype: np.dtype) -> str:
    """The v2 datatype name of a numpy dtype (``ServeError`` 500 if it has none: a model fault)."""
    for name, known in DATATYPES.items():
        if np.dtype(dtype) == known:
            return name
    raise ServeError(f"the model produced a tensor of unsupported type {dtype}", status=500)


@dataclass
class DecodedRequest:
    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[str] | None = None  # None: all of the model's outputs
    binary: dict[str, bool] = field(default_factory=dict)  # per requested output
    binary_default: bool = False  # the request's binary_data_output


def content_encoding(value: str | None) -> str:
    """A ``Content-Encoding`` header as ``identity``, ``gzip`` or ``deflate``; 415 for any other (br, zstd...),
    before anything is read as if it were one of these."""
    encoding = (value or "identity").strip().lower() or "identity"
    if encoding not in ("identity", "gzip", "deflate"):
        raise ServeError(f"Content-Encoding {encoding!r:.40} is not supported (use gzip, deflate or none)",
                         status=415)
    return encoding


def inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """``body`` decompressed per ``Content-Encoding`` (gzip, deflate or none); 413 past ``limit`` bytes, 400 on a
    corrupt stream, 415 on another encoding. Inflates in bounded steps, so a zip bomb never gets buffered."""
    encoding = content_encoding(encoding)
    if encoding == "identity":
        return body
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    parts, size, data = [], 0, body
    try:
        while data:
            part = inflater.decompress(data, 1 << 20)
            size += len(part)
            if size > limit:
                raise ServeError(f"the request body inflates to more than the {limit}-byte limit", status=413)
            parts.append(part)
            data = inflater.unconsumed_tail
        part = inflater.flush()
    except zlib.error as exc:
        raise ServeError(f"the {encoding} request body is corrupt: {exc}") from None
    if size + len(part) > limit:
        raise ServeError(f"the request body inflates to more than the {limit}-byte limit", status=413)
    if not inflater.eof:
        raise ServeError(f"the {encoding} request body is truncated")
    return b"".join([*parts, part])


def _json_values(chunks: Iterable[bytes], max_values: int) -> tuple[int, int]:
    """``(at most how many values the JSON text in chunks holds, its bytes)``: every value but a container's first
    follows a comma, a first one follows a bracket. 413 once that passes ``max_values``, before any parsing."""
    values, size = 1, 0
    for chunk in chunks:
        values += chunk.count(b",") + chunk.count(b"[")
        size += len(chunk)
        if values > max_values:
            raise ServeError(f"the request's JSON holds more than {max_values - JSON_VALUE_SLACK:,} numbers, the "
                             "most its tensor elements may be (--max-tensor-elements); send large tensors as "
                             "binary data", status=413)
    return values, size


def _json_chunks(body: bytes, encoding: str, size: int) -> Iterator[bytes]:
    """The first ``size`` bytes of ``body`` as sent (``encoding`` identity) or inflated (gzip, deflate), a MiB at
    a time, so that counting them never holds more (:func:`inflate` checks the stream itself later)."""
    if encoding == "identity":
        yield from (body[start:min(start + _CHUNK, size)] for start in range(0, size, _CHUNK))
        return
    inflater, data = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15), body
    try:
        while data and size > 0:
            part = inflater.decompress(data, min(_CHUNK, size))
            size -= len(part)
            data = inflater.unconsumed_tail
            yield part
    except zlib.error as exc:
        raise ServeError(f"the {encoding} request body is corrupt: {exc}") from None


def request_budget(body: bytes, encoding: str | None, header_length: str | None, limit: int,
                   check_shape: Callable[[str, tuple[int, ...], int], int], max_elements: int) -> tuple[int, int]:
    """``(the most the body may inflate to (0: not compressed), the bytes the request is expected to hold while
    it is decoded)``: the body, its inflation and its JSON parsed. A compressed JSON-only body is inflated once
    here, a MiB at a time and not kept, to measure it; with the binary extension see :func:`inflated_size`. 413
    (before parsing any JSON) when the JSON holds more values than ``max_elements`` tensor elements (and
    ``JSON_VALUE_SLACK``) allow; 415 first for an encoding other than gzip, deflate or none."""
    encoding = content_encoding(encoding)
    max_values = max_elements + JSON_VALUE_SLACK
    inflated = inflated_size(body, encoding, header_length, limit, check_shape, max_values)
    length = _header_length(header_length, inflated or len(body))
    values, size = _json_values(_json_chunks(body, encoding, inflated or len(body) if length is None else length),
                                max_values)
    if inflated and length is None:  # the inflated size measured (a stream beyond the limit stopped at it)
        inflated = max(size, 1)  # 0 would mean "not compressed"
    return inflated, len(body) + inflated + values * PARSED_BYTES_PER_JSON_VALUE


def inflated_size(body: bytes, encoding: str | None, header_length: str | None, limit: int,
                  check_shape: Callable[[str, tuple[int, ...], int], int], max_values: int | None = None) -> int:
    """How many bytes a compressed request body may inflate to, found before inflating it: with the binary
    extension, only the JSON header is inflated, its declared shapes go through ``check_shape`` (which refuses
    them with 413) and the answer is that header plus the binary sizes it declares; a JSON-only body may inflate
    to ``limit``. 0 for an uncompressed body. A body that inflates beyond this is refused by :func:`inflate`.
    ``max_values``: the header's JSON is refused with 413 before it is parsed if it holds more values."""
    encoding = content_encoding(encoding)
    if encoding == "identity":
        return 0
    if header_length is None:
        return limit
    length = _header_length(header_length, limit)
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        header = inflater.decompress(body, length)
    except zlib.error as exc:
        raise ServeError(f"the {encoding} request body is corrupt: {exc}") from None
    if len(header) < length:
        raise ServeError(f"the body inflates to fewer than the {length} bytes {HEADER_LENGTH} announces")
    if max_values is not None:
        _json_values([header], max_values)
    try:
        request = json.loads(header)
        tensors = list(request["inputs"])
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
        raise ServeError("the request header is not a JSON object with a list of inputs") from None
    declared, elements = length, 0
    for index, tensor in enumerate(tensors):
        where = f"inputs[{index}]"
        if not isinstance(tensor, dict):
            raise ServeError(f"{where} must be an object")
        elements = check_shape(str(tensor.get("name")), _shape(tensor.get("shape"), where), elements)
        size = _parameters(tensor, where).get("binary_data_size", 0)
        declared += size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0
    return min(declared, limit)


def _header_length(value: str | None, body_size: int) -> int | None:
    if value is None:
        return None
    digits = value.strip()
    # ASCII digits only: str.isdigit() also accepts digits such as "²" that int() refuses
    if not (digits.isascii() and digits.isdigit()):
        raise ServeError(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r:.40}")
    length = int(digits)
    if length == 0:  # never a request: and zlib reads max_length 0 as "no limit" (an unbounded inflation)
        raise ServeError(f"{HEADER_LENGTH} is 0: the inference header (the JSON request) is empty")
    if length > body_size:
        raise ServeError(f"{HEADER_LENGTH} is {length} but the body has only {body_size} bytes")
    return length


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ServeError(f"{where}.parameters must be an object")
    return params


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise ServeError(f"{where}.shape must be a list of integers, got {value!r:.80}")
    if any(s < 0 for s in value):
        raise ServeError(f"{where}.shape must not have negative sizes, got {value}")
    return tuple(value)


def _dtype(value: Any, where: str) -> np.dtype:
    if not isinstance(value, str):  # a list or object would be unhashable in the lookups below (a 500)
        raise ServeError(f"{where}.datatype must be one of {', '.join(DATATYPES)}, got {value!r:.40}")
    if value in UNSUPPORTED_DATATYPES:
        raise ServeError(f"{where}.datatype {value} is not supported by this service")
    if value not in DATATYPES:
        raise ServeError(f"{where}.datatype must be one of {', '.join(DATATYPES)}, got {value!r:.40}")
    return DATATYPES[value]


#: What JSON calls the values of each Python type a parsed value can have, for messages
_JSON_VALUES = {str: "strings", bool: "booleans", type(None): "null", list: "arrays", dict: "objects",
                int: "numbers", float: "numbers"}


def _row_major_elements(data: Any, shape: tuple[int, ...], where: str) -> list:
    """The elements of a tensor's JSON ``data``: flat (exactly as many as ``shape`` needs) or nested exactly as
    ``shape`` (every level a list of the declared length). Walked a level at a time, in C (``map``, ``chain``),
    never a Python step per element."""
    if not isinstance(data, list):
        raise ServeError(f"{where}.data must be a list of numbers")
    expected = math.prod(shape)
    if not data or not isinstance(data[0], list):  # flat
        if len(data) != expected:
            raise ServeError(f"{where}.data has {len(data)} elements but shape {list(shape)} needs {expected}")
        return data
    level = [data]
    for depth, size in enumerate(shape):
        if level and (set(map(type, level)) != {list} or set(map(len, level)) != {size}):
            raise ServeError(f"{where}.data is nested but its level {depth} does not hold lists of {size} (shape "
                             f"{list(shape)}): send the elements flat, or nested exactly as the shape")
        level = list(chain.from_iterable(level))
    return level


def _json_data(data: Any, shape: tuple[int, ...], dtype: np.dtype, where: str) -> np.ndarray:
    """A JSON tensor's data as an array: JSON numbers only (integers for an integer datatype), booleans only for
    BOOL; never a string, boolean or null coerced into a number."""
    elements = _row_major_elements(data, shape, where)
    allowed = {bool} if dtype.kind == "b" else {int} if dtype.kind in "iu" else {int, float}
    wrong = set(map(type, elements)) - allowed
    if wrong:
        found = sorted({_JSON_VALUES.get(kind, kind.__name__) for kind in wrong})
        if dtype.kind in "iu":
            found = ["non-integer numbers" if kind == "numbers" else kind for kind in found]
        takes = "true or false" if dtype.kind == "b" else "integers" if dtype.kind in "iu" else "numbers"
        hint = " (NaN and infinity can only be sent as binary data)" if "null" in found else ""
        raise ServeError(f"{where}.data holds {' and '.join(found)}, but {datatype_of(dtype)} takes only "
                         f"{takes}{hint}")
    try:
        return np.asarray(elements, dtype=dtype).reshape(shape)
    except OverflowError:
        raise ServeError(f"{where}.data holds a number out of the range of {datatype_of(dtype)}") from None


def _flag(params: dict, name: str, where: str) -> bool:
    """A boolean parameter (absent: False); 400 for anything but true or false (the string "false" is not)."""
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise ServeError(f"{where}.parameters.{name} must be true or false, got {json.dumps(value)!s:.40}")
    return value


def decode_request(body: bytes, header_length: str | None,
                   check_shape: Callable[[str, tuple[int, ...], int], int] | None = None) -> DecodedRequest:
    """Parse a v2 inference request body (JSON, or JSON + binary tensors). ``ServeError`` (400) says what is
    wrong: malformed JSON, a missing field, a datatype, a data size that does not match the shape, or a binary
    section that does not match the ``binary_data_size`` parameters. Binary inputs are read-only views of
    ``body``. ``check_shape(name, shape, elements so far)`` sees every declared shape before its tensor is built
    and returns the running element count (the service's tensor limits; it raises to refuse)."""
    length = _header_length(header_length, len(body))
    json_part = body if length is None else memoryview(body)[:length]
    try:
        request = json.loads(bytes(json_part))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServeError(f"the request is not valid JSON: {exc}") from None
    except RecursionError:
        raise ServeError("the request JSON is nested too deeply") from None
    if not isinstance(request, dict):
        raise ServeError("the request must be a JSON object")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ServeError("id must be a string")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ServeError("inputs must be a non-empty list of tensors")
    offset = length if length is not None else len(body)
    inputs: dict[str, np.ndarray] = {}
    elements = 0
    for index, tensor in enumerate(raw_inputs):
        where = f"inputs[{index}]"
        if not isinstance(tensor, dict):
            raise ServeError(f"{where} must be an object")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise ServeError(f"{where}.name must be a non-empty string")
        where = f"input {name!r}"
        if name in inputs:
            raise ServeError(f"{where} is given twice")
        shape, dtype = _shape(tensor.get("shape"), where), _dtype(tensor.get("datatype"), where)
        if check_shape is not None:
            elements = check_shape(name, shape, elements)
        size = _parameters(tensor, where).get("binary_data_size")
        if size is None:
            if "data" not in tensor:
                raise ServeError(f"{where} has neither data nor a binary_data_size parameter")
            array = _json_data(tensor["data"], shape, dtype, where)
        else:
            if "data" in tensor:
                raise ServeError(f"{where} has both data and a binary_data_size parameter")
            if length is None:
                raise ServeError(f"{where} is binary (binary_data_size) but the request has no {HEADER_LENGTH} "
                                 "header")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ServeError(f"{where}.parameters.binary_data_size must be a non-negative integer")
            expected = math.prod(shape) * dtype.itemsize
            if size != expected:
                raise ServeError(f"{where} has binary_data_size {size} but shape {list(shape)} of "
                                 f"{datatype_of(dtype)} needs {expected} bytes")
            if offset + size > len(body):
                raise ServeError(f"{where}: its {size} binary bytes run past the end of the body "
                                 f"({len(body) - offset} bytes left)")
            array = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
            offset += size
        inputs[name] = array
    if offset != len(body):
        raise ServeError(f"the body has {len(body) - offset} bytes after the JSON and the binary tensors it "
                         "announces")
    decoded = DecodedRequest(inputs, request_id)
    decoded.binary_default = _flag(_parameters(request, "request"), "binary_data_output", "request")
    outputs = request.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise ServeError("outputs must be a list")
        decoded.outputs = []
        for index, entry in enumerate(outputs):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ServeError(f"outputs[{index}] must be an object with a name")
            where = f"output {entry['name']!r}"
            params = _parameters(entry, where)
            if params.get("classification"):
                raise ServeError("the classification extension is not supported")
            if entry["name"] not in decoded.outputs:
                decoded.outputs.append(entry["name"])
            if "binary_data" in params:
                decoded.binary[entry["name"]] = _flag(params, "binary_data", where)
    return decoded


#: The status of a request whose input made the model produce what JSON cannot carry (NaN, infinity): the request
#: is well formed, the server works, but this input cannot be answered so (WebDAV's "Unprocessable Content").
UNPROCESSABLE = 422


def encode_response(model_name: str, model_version: str, outputs: dict[str, np.ndarray],
                    request: DecodedRequest) -> tuple[bytes, dict[str, str]]:
    """The response body and headers for ``outputs`` (in the order given): binary where the request asked so.
    Always valid JSON: an output sent as JSON that holds NaN or infinity (JSON has neither) is refused with 422
    naming it; sent as binary data, its values go as they are."""
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        header["id"] = request.id
    tensors, chunks = [], []
    for name, array in outputs.items():
        tensor: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if request.binary.get(name, request.binary_default):
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise ServeError(f"the model produced non-finite values (NaN or infinity) in output {name!r} for "
                                 "this input, which JSON cannot carry: check the input's values (their range), or "
                                 "ask for the output as binary data (binary_data: true) to receive them as they are",
                                 status=UNPROCESSABLE)
            tensor["data"] = array.ravel().tolist()
        tensors.append(tensor)
    header["outputs"] = tensors
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return text, {"content-type": "application/json"}
    return b"".join([text, *chunks]), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(text))}
