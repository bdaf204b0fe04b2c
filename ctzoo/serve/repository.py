"""Load a model repository (as ``ctzoo export`` writes it) into ONNX Runtime sessions, one per model.

Layout::

    REPO/<name>/ctzoo.json     name, version, task, max_batch_size, max_queue_delay_ms, inputs, outputs, ...
    REPO/<name>/<version>/model.onnx   (the highest numeric version folder is served)
    REPO/<name>/config.pbtxt, card.json, README.md, ...   (not read here)

Every model gets one shared :class:`onnxruntime.InferenceSession`. Execution providers are chosen explicitly
(:func:`choose_providers`): with ``device`` ``auto`` or ``cuda``, TensorRT then CUDA where this onnxruntime build
has them, always with the CPU last; ``cpu`` uses the CPU alone. The providers a session really got are logged.
On a GPU the session runs through IOBinding (inputs copied in once, outputs allocated on the device and copied
out once); on the CPU plain ``session.run`` is used, since IOBinding buys nothing there.

:class:`ServedModel` checks requests against the model before they are batched (:meth:`ServedModel.validate`),
so one bad request can never fail the requests it would have been merged with, and runs them
(:meth:`ServedModel.infer`, through the model's micro-batcher, see :mod:`ctzoo.serve.batching`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ctzoo.perf.deep_profile import ProfiledRun, profile_onnxruntime
from ctzoo.serve.batching import MicroBatcher
from ctzoo.serve.v2_codec import DATATYPES, ServeError, datatype_of

logger = logging.getLogger(__name__)

CONFIG_FILE, GRAPH_FILE = "ctzoo.json", "model.onnx"
PLATFORM = "onnxruntime_onnx"
DEFAULT_MAX_BATCH_SIZE, DEFAULT_QUEUE_DELAY_MS = 16, 2.0
ORT_DATATYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
                 "tensor(bool)": "BOOL", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
                 "tensor(int64)": "INT64", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
                 "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64"}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: ``shape`` has -1 for any size (the first axis is the batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def choose_providers(device: str = "auto", tensorrt: bool = True, trt_cache: Path | None = None) -> list:
    """ONNX Runtime providers for ``device`` (``auto``, ``cpu`` or ``cuda``), best first, the CPU always last.

    ``cuda`` without a GPU-enabled onnxruntime raises ``RuntimeError`` (install ``ctzoo[gpu]``); ``auto`` falls
    back to the CPU. TensorRT builds engines on first use (minutes); they are cached in ``trt_cache``.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    providers: list = []
    if tensorrt and "TensorrtExecutionProvider" in available:
        options = {"trt_engine_cache_enable": True}
        if trt_cache is not None:
            trt_cache.mkdir(parents=True, exist_ok=True)
            options["trt_engine_cache_path"] = str(trt_cache)
        providers.append(("TensorrtExecutionProvider", options))
    if "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")
    if device == "cuda" and not providers:
        raise RuntimeError("--device cuda, but this onnxruntime has no CUDA provider (available: "
                           f"{', '.join(available)}); install onnxruntime-gpu (pip install 'ctzoo[gpu]')")
    return [*providers, "CPUExecutionProvider"]


def _session_specs(args: list) -> list[TensorSpec]:
    return [TensorSpec(a.name, ORT_DATATYPES.get(a.type, a.type),
                       tuple(s if isinstance(s, int) and s >= 0 else -1 for s in a.shape)) for a in args]


def _config_specs(entries: list[dict], found: list[TensorSpec], kind: str, folder: Path) -> list[TensorSpec]:
    """The specs in ctzoo.json, checked against the graph's (names must match; the graph's dtype wins)."""
    graph = {spec.name: spec for spec in found}
    declared = [entry["name"] for entry in entries]
    if sorted(declared) != sorted(graph):
        raise ValueError(f"{folder / CONFIG_FILE} lists {kind} {declared}, the graph has {sorted(graph)}")
    return [TensorSpec(e["name"], graph[e["name"]].datatype,
                       tuple(int(s) for s in e.get("shape", graph[e["name"]].shape))) for e in entries]


class ServedModel:
    """One model of the repository: ``name``, ``folder``, ``version``, ``config`` (ctzoo.json), ``session``
    (the shared InferenceSession), ``inputs``/``outputs`` (:class:`TensorSpec`), ``max_batch_size``,
    ``max_queue_delay_ms`` and, once the app set it up, ``batcher``."""

    def __init__(self, folder: Path, providers: list, threads: int | None = None) -> None:
        self.folder = folder
        versions = sorted((int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / GRAPH_FILE).is_file()))
        if not versions:
            raise FileNotFoundError(f"{folder} has no <version>/{GRAPH_FILE}")
        self.version = str(versions[-1])
        config_path = folder / CONFIG_FILE
        self.config: dict[str, Any] = json.loads(config_path.read_text("utf-8")) if config_path.is_file() else {}
        self.name = str(self.config.get("name", folder.name))
        self._threads, self._providers = threads, providers
        self.session = self._new_session()
        self.providers = self.session.get_providers()
        self.on_gpu = self.providers[0] in GPU_PROVIDERS
        self.io_device = "cuda"  # where IOBinding allocates outputs when on_gpu
        found_in, found_out = _session_specs(self.session.get_inputs()), _session_specs(self.session.get_outputs())
        self.inputs = _config_specs(self.config["inputs"], found_in, "inputs", folder) if "inputs" in self.config \
            else found_in
        self.outputs = _config_specs(self.config["outputs"], found_out, "outputs", folder) \
            if "outputs" in self.config else found_out
        self.max_batch_size = int(self.config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        self.max_queue_delay_ms = float(self.config.get("max_queue_delay_ms", DEFAULT_QUEUE_DELAY_MS))
        self.size_multiple = int((self.config.get("input_spec") or {}).get("size_multiple", 1))
        self.batcher: MicroBatcher | None = None
        logger.info("model %s version %s: providers %s%s", self.name, self.version, ", ".join(self.providers),
                    " (IOBinding)" if self.on_gpu else " (plain session.run: IOBinding buys nothing on the CPU)")

    def _new_session(self, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
        """A session of the served graph with the service's settings (``options``: a profiling run's own)."""
        options = options or ort.SessionOptions()
        if self._threads:
            options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        # a service idles between requests: spinning worker threads would burn the cores other models need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(self.folder / self.version / GRAPH_FILE), options, providers=self._providers)

    def profile_run(self, members: list[dict[str, np.ndarray]]) -> ProfiledRun:
        """A batch's requests (``members``: their validated inputs) merged and run again on a new session with
        ONNX Runtime's profiler on (:func:`~ctzoo.perf.deep_profile.profile_onnxruntime`); the served session is
        not touched."""
        merged = {name: np.concatenate([m[name] for m in members]) for name in members[0]}
        return profile_onnxruntime(self._new_session, merged)

    # ------------------------------------------------------------------------------------------ metadata

    def metadata(self) -> dict[str, Any]:
        """The KServe v2 model metadata."""
        return {"name": self.name, "versions": [self.version], "platform": PLATFORM,
                "inputs": [s.metadata() for s in self.inputs], "outputs": [s.metadata() for s in self.outputs]}

    def triton_config(self) -> dict[str, Any]:
        """A Triton-style model configuration (what ``tritonclient``'s ``get_model_config`` expects)."""
        def dims(spec: TensorSpec) -> dict[str, Any]:
            return {"name": spec.name, "data_type": f"TYPE_{spec.datatype}",
                    "dims": list(spec.shape[1:])}
        return {"name": self.name, "platform": PLATFORM, "backend": "onnxruntime",
                "max_batch_size": self.max_batch_size, "input": [dims(s) for s in self.inputs],
                "output": [dims(s) for s in self.outputs],
                "dynamic_batching": {"max_queue_delay_microseconds": int(self.max_queue_delay_ms * 1000)},
                "parameters": {"ctzoo": self.config}}

    # -------------------------------------------------------------------------------------------- checks

    def validate(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``inputs`` checked against the model (names, datatypes, shapes, batch size, NaN/Inf), as aligned
        C-contiguous arrays in the model's input order; ``ServeError`` (400) naming the problem otherwise."""
        expected = {spec.name: spec for spec in self.inputs}
        unknown = [name for name in inputs if name not in expected]
        if unknown:
            raise ServeError(f"model {self.name!r} has no input {unknown[0]!r} (its inputs: {', '.join(expected)})")
        missing = [name for name in expected if name not in inputs]
        if missing:
            raise ServeError(f"input {missing[0]!r} is missing (model {self.name!r} takes {', '.join(expected)})")
        checked, batch = {}, None
        for spec in self.inputs:
            array = inputs[spec.name]
            datatype = datatype_of(array.dtype)
            if datatype != spec.datatype:
                raise ServeError(f"input {spec.name!r} must be {spec.datatype}, got {datatype}")
            shape = list(array.shape)
            if len(shape) != len(spec.shape):
                raise ServeError(f"input {spec.name!r} must have {len(spec.shape)} dimensions {list(spec.shape)} "
                                 f"(-1: any size), got shape {shape}")
            for axis, (got, want) in enumerate(zip(shape, spec.shape)):
                if want >= 0 and got != want:
                    raise ServeError(f"input {spec.name!r} has shape {shape} but model {self.name!r} takes "
                                     f"{list(spec.shape)}: dimension {axis} must be {want}, not {got}")
            if 0 in shape:
                raise ServeError(f"input {spec.name!r} has an empty dimension: shape {shape}")
            if self.size_multiple > 1 and len(shape) > 2 and any(s % self.size_multiple for s in shape[2:]):
                raise ServeError(f"input {spec.name!r} has spatial size {shape[2:]}: each must be a multiple of "
                                 f"{self.size_multiple} (pad the image)")
            if batch is not None and shape[0] != batch:
                raise ServeError(f"inputs have different batch sizes ({batch} and {shape[0]})")
            batch = shape[0]
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise ServeError(f"input {spec.name!r} contains NaN or infinite values")
            checked[spec.name] = np.require(array, DATATYPES[spec.datatype], ["C_CONTIGUOUS", "ALIGNED"])
        if self.max_batch_size and batch > self.max_batch_size:
            raise ServeError(f"batch of {batch} exceeds model {self.name!r}'s max_batch_size {self.max_batch_size}; "
                             "split the request")
        return checked

    def check_outputs(self, names: list[str] | None) -> list[str]:
        """The output names to return (all when ``names`` is None or empty); ``ServeError`` for an unknown one."""
        known = [spec.name for spec in self.outputs]
        for name in names or []:
            if name not in known:
                raise ServeError(f"model {self.name!r} has no output {name!r} (its outputs: {', '.join(known)})")
        return list(names) if names else known

    # ----------------------------------------------------------------------------------------------- run

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on validated ``inputs`` (blocking; the batcher calls it in its worker thread). An
        argument ONNX Runtime rejects is a ``ServeError`` 400; anything else propagates (a server fault)."""
        names = [spec.name for spec in self.outputs]
        try:
            if not self.on_gpu:
                return dict(zip(names, self.session.run(names, inputs)))
            binding = self.session.io_binding()
            for name, array in inputs.items():
                binding.bind_cpu_input(name, array)
            for name in names:
                binding.bind_output(name, self.io_device)
            self.session.run_with_iobinding(binding)
            return dict(zip(names, binding.copy_outputs_to_cpu()))
        except ort.capi.onnxruntime_pybind11_state.InvalidArgument as exc:
            raise ServeError(f"model {self.name!r} rejected the input: {str(exc)[:300]}") from None

    async def infer(self, inputs: dict[str, np.ndarray], *, validated: bool = False,
                    timing: dict | None = None) -> dict[str, np.ndarray]:
        """Validate ``inputs`` (unless the caller just did, ``validated=True``) and run them through the
        micro-batcher (or a worker thread without one); all outputs, with the request's batch size. ``timing``
        receives the queue and model seconds (:meth:`MicroBatcher.submit`)."""
        checked = inputs if validated else self.validate(inputs)
        if self.batcher is not None:
            return await self.batcher.submit(checked, timing)
        started, wall = time.perf_counter(), time.time()
        outputs = await asyncio.to_thread(self.run, checked)
        if timing is not None:
            rows = next(iter(checked.values())).shape[0]
            timing.update(queue_s=0.0, model_s=time.perf_counter() - started, batch_rows=rows, batch_requests=1,
                          queue_depth=0, batch_first=True, model_started=wall,
                          batch_members=[timing.get("request")], batch_inputs=[checked])
        return outputs


def load_repository(repository: Path, device: str = "auto", threads: int | None = None,
                    tensorrt: bool = True) -> dict[str, ServedModel]:
    """Every model of ``repository`` (each subfolder holding ``<version>/model.onnx``), by name."""
    repository = Path(repository)
    if not repository.is_dir():
        raise FileNotFoundError(f"model repository {repository} is not a folder")
    trt_root = None
    if device != "cpu" and tensorrt and "TensorrtExecutionProvider" in ort.get_available_providers():
        from ctzoo.datasets.samples import cache_dir

        trt_root = cache_dir() / "tensorrt"
    models: dict[str, ServedModel] = {}
    for folder in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not any((v / GRAPH_FILE).is_file() for v in folder.iterdir() if v.name.isdigit()):
            logger.info("skipping %s: no <version>/%s", folder, GRAPH_FILE)
            continue
        providers = choose_providers(device, tensorrt, trt_root / folder.name if trt_root else None)
        model = ServedModel(folder, providers, threads)
        if model.name in models:
            raise ValueError(f"two models in {repository} are named {model.name!r}")
        if device == "cuda" and not model.on_gpu:
            raise RuntimeError(f"--device cuda, but model {model.name} runs on {model.providers[0]} (no usable GPU?)")
        models[model.name] = model
    if not models:
        raise FileNotFoundError(f"no models in {repository}: expected <name>/<version>/{GRAPH_FILE} folders "
                                "(write them with 'ctzoo export')")
    return models
