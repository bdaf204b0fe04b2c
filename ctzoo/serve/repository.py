"""Load a model repository (as ``ctzoo export`` writes it), one engine per model.

Layout::

    REPO/<name>/ctzoo.json     name, version, task, max_batch_size, max_queue_delay_ms, inputs, outputs, ...
    REPO/<name>/1/model.onnx   the graph ctzoo.json describes, the one served
    REPO/<name>/config.pbtxt, card.json, README.md, model.safetensors, ...   (the bundle: the torch backend's)

A model folder is read as every command reads an exported bundle (:func:`ctzoo.models.bundle.read_graphs`), so
``/v2`` and the study endpoints run the same checked graph. A folder holding another version folder
(``2/model.onnx``) is refused: ctzoo.json describes and checks version 1 only, and a server that picked another
graph than the one the export checked, or than its study endpoints run, would answer from an unchecked graph.

Each model's ``model.onnx`` graph defines its tensor interface (names, datatypes, shapes) and runs in an engine
(:mod:`ctzoo.serve.engines`): ONNX Runtime with the providers chosen explicitly (:func:`choose_providers`; the ones
a session really got are logged), or, with ``backend="torch"``, the folder's own bundle in PyTorch, the module the
graph was exported from, in the precision :func:`ctzoo.inference.precision.choose_precision` resolves.

:class:`ServedModel` checks requests against the model before they are batched (:meth:`ServedModel.validate`),
so one bad request can never fail the requests it would have been merged with, and runs them
(:meth:`ServedModel.infer`, through the model's micro-batcher, see :mod:`ctzoo.serve.batching`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ctzoo.models.bundle import EXPORT_INFO_FILE, GRAPH_DIR, GRAPH_FILE, ExportedGraphs, read_graphs
from ctzoo.perf.deep_profile import ProfiledRun
from ctzoo.serve.batching import MicroBatcher
from ctzoo.serve.engines import BACKENDS, OnnxEngine, Runtime, TorchEngine, choose_providers
from ctzoo.serve.v2_codec import DATATYPES, ServeError, datatype_of

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE, DEFAULT_QUEUE_DELAY_MS = 16, 2.0


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: ``shape`` has -1 for any size (the first axis is the batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _specs(entries: list[dict[str, Any]]) -> list[TensorSpec]:
    return [TensorSpec(e["name"], e["datatype"], tuple(int(x) for x in e["shape"])) for e in entries]


def _config_specs(entries: list[dict], found: list[TensorSpec], kind: str, folder: Path) -> list[TensorSpec]:
    """The specs in ctzoo.json, checked against the graph's (names must match; the graph's dtype wins)."""
    graph = {spec.name: spec for spec in found}
    declared = [entry["name"] for entry in entries]
    if sorted(declared) != sorted(graph):
        raise ValueError(f"{folder / EXPORT_INFO_FILE} lists {kind} {declared}, the graph has {sorted(graph)}")
    return [TensorSpec(e["name"], graph[e["name"]].datatype,
                       tuple(int(s) for s in e.get("shape", graph[e["name"]].shape))) for e in entries]


class ServedModel:
    """One model of the repository: ``name``, ``folder``, ``version``, ``config`` (ctzoo.json), ``engine`` (what
    runs it, :mod:`ctzoo.serve.engines`), ``bundle`` (the torch backend's, else None), ``inputs``/``outputs``
    (:class:`TensorSpec`), ``max_batch_size``, ``max_queue_delay_ms``, ``batching`` (ctzoo.json's, unless
    :meth:`override_batching` replaced them) and, once the app set it up, ``batcher``.
    ``runtime``: how it runs (:class:`~ctzoo.serve.engines.Runtime`; a torch runtime's precision resolved)."""

    def __init__(self, folder: Path, runtime: Runtime = Runtime()) -> None:
        self.folder = folder
        graphs = served_graphs(folder)
        self.version, self.config = GRAPH_DIR, graphs.info
        self.name = str(self.config.get("name", folder.name))
        graph = graphs.model
        self.bundle, self.precision_reason = None, None
        if runtime.kind == "torch":
            self.bundle = torch_bundle(folder, self.name)
            runtime, self.precision_reason = _torch_precision(self.bundle, runtime)
            self.engine = TorchEngine(self.bundle, graph, runtime.device, runtime.precision, runtime.threads)
        elif runtime.kind == "onnx":
            graphs.verify()  # BundleError when the graph was changed since the export checked it
            self.engine = OnnxEngine(graph, runtime.providers, runtime.threads)
        else:
            raise ValueError(f"unknown backend {runtime.kind!r}: use one of {', '.join(BACKENDS)}")
        self.runtime = runtime
        found_in, found_out = (_specs(entries) for entries in self.engine.io())
        self.inputs = _config_specs(self.config["inputs"], found_in, "inputs", folder) if "inputs" in self.config \
            else found_in
        self.outputs = _config_specs(self.config["outputs"], found_out, "outputs", folder) \
            if "outputs" in self.config else found_out
        self.max_batch_size = int(self.config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        self.max_queue_delay_ms = float(self.config.get("max_queue_delay_ms", DEFAULT_QUEUE_DELAY_MS))
        self.batching = True  # dynamic batching: off with ctzoo serve --no-batching (override_batching)
        self.size_multiple = int((self.config.get("input_spec") or {}).get("size_multiple", 1))
        self.batcher: MicroBatcher | None = None
        logger.info("model %s version %s: %s%s", self.name, self.version, self.engine.describe(),
                    f" ({self.precision_reason})" if self.precision_reason else "")

    def override_batching(self, max_batch_size: int | None = None, max_queue_delay_ms: float | None = None,
                          enabled: bool = True) -> None:
        """The service's batching options (``--max-batch-size``, ``--max-queue-delay-ms``, ``--no-batching``) in
        place of ctzoo.json's, where given: the one source the batcher, :meth:`validate` and
        :meth:`triton_config` read."""
        self.max_batch_size = max_batch_size or self.max_batch_size
        self.max_queue_delay_ms = self.max_queue_delay_ms if max_queue_delay_ms is None else max_queue_delay_ms
        self.batching = enabled

    def profile_run(self, members: list[dict[str, np.ndarray]]) -> ProfiledRun:
        """A batch's requests (``members``: their validated inputs) merged and run again under the engine's
        profiler (ONNX Runtime's on a new session, or ``torch.profiler``)."""
        merged = {name: np.concatenate([m[name] for m in members]) for name in members[0]}
        return self.engine.profile(merged)

    # ------------------------------------------------------------------------------------------ metadata

    def metadata(self) -> dict[str, Any]:
        """The KServe v2 model metadata."""
        return {"name": self.name, "versions": [self.version], "platform": self.engine.platform,
                "inputs": [s.metadata() for s in self.inputs], "outputs": [s.metadata() for s in self.outputs]}

    def triton_config(self) -> dict[str, Any]:
        """The model's configuration as Triton's ``ModelConfig`` in JSON (what ``tritonclient``'s
        ``get_model_config`` gets; it parses into ``model_config_pb2.ModelConfig``): the batching the service
        applies (no ``dynamic_batching`` when it is off), ctzoo.json as JSON text in
        ``parameters.ctzoo.string_value``."""
        def dims(spec: TensorSpec) -> dict[str, Any]:
            return {"name": spec.name, "data_type": f"TYPE_{spec.datatype}",
                    "dims": list(spec.shape[1:])}
        config = {"name": self.name, "platform": self.engine.platform,
                  "backend": "onnxruntime" if self.engine.kind == "onnx" else "pytorch",
                  "max_batch_size": self.max_batch_size, "input": [dims(s) for s in self.inputs],
                  "output": [dims(s) for s in self.outputs],
                  # Triton's ModelParameter: a string; ctzoo.json travels as JSON text
                  "parameters": {"ctzoo": {"string_value": json.dumps(self.config, separators=(",", ":"))}}}
        if self.batching:
            config["dynamic_batching"] = {"max_queue_delay_microseconds": int(self.max_queue_delay_ms * 1000)}
        return config

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
        """Run the engine on validated ``inputs`` (blocking; the batcher calls it in its worker thread). An
        argument ONNX Runtime rejects is a ``ServeError`` 400; anything else propagates (a server fault)."""
        names = [spec.name for spec in self.outputs]
        try:
            return dict(zip(names, self.engine.run(inputs, names)))
        except ServeError as exc:
            raise ServeError(f"model {self.name!r}: {exc}") from None

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


def served_graphs(folder: Path) -> ExportedGraphs:
    """The graphs of the model folder ``folder`` as ctzoo.json records them (:func:`read_graphs`: BundleError for an
    unreadable ctzoo.json or a recorded graph that is missing); ValueError for a folder without ctzoo.json, or with
    another version folder beside ``1/`` (see the module's doc)."""
    graphs = read_graphs(folder)
    if graphs is None:
        raise ValueError(f"{folder} has no {EXPORT_INFO_FILE}: ctzoo serve serves model folders as 'ctzoo export' "
                         "writes them; export the model with it")
    others = sorted(p.name for p in folder.iterdir() if p.name.isdigit() and p.name != GRAPH_DIR
                    and (p / GRAPH_FILE).is_file())
    if others:
        raise ValueError(f"{folder / others[0] / GRAPH_FILE}: {folder / EXPORT_INFO_FILE} describes version "
                         f"{GRAPH_DIR} only, the graph ctzoo export checked, and that is the one ctzoo serve runs; "
                         f"export the other graph as a model of its own ('ctzoo export --name') and remove "
                         f"{folder / others[0]}")
    return graphs


def torch_bundle(folder: Path, name: str):
    """The bundle of a served model's folder, for the torch backend (``ValueError`` when it is not a whole one)."""
    from ctzoo.models.bundle import BundleError, load_bundle

    try:
        return load_bundle(folder)
    except BundleError as exc:
        raise ValueError(f"model {name}: --backend torch runs the bundle's own network, but {folder} is not a whole "
                         f"bundle ({exc}); export it again with this version of ctzoo, or serve it with --backend "
                         "onnx") from None


def _torch_precision(bundle, runtime: Runtime) -> tuple[Runtime, str]:
    """``runtime`` with its precision resolved for ``bundle`` on its device (as ``ctzoo infer --precision``), and
    why."""
    import torch

    from ctzoo.inference.backends import resolve_device
    from ctzoo.inference.precision import choose_precision

    device = resolve_device(runtime.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {runtime.device}, but PyTorch sees no GPU (torch {torch.__version__})")
    choice = choose_precision(bundle, runtime.precision, "torch", device)
    return replace(runtime, device=device, precision=choice.precision), choice.reason


def load_repository(repository: Path, device: str = "auto", threads: int | None = None, tensorrt: bool = True,
                    backend: str = "onnx", precision: str = "auto") -> dict[str, ServedModel]:
    """Every model of ``repository`` (each subfolder holding ``<version>/model.onnx``), by name, each run by
    ``backend``: ``onnx`` (ONNX Runtime on ``device``: auto, cpu or cuda; ``tensorrt`` tries TensorRT first) or
    ``torch`` (the folder's bundle in PyTorch on ``device``: auto, cpu, cuda or cuda:N, in ``precision``: auto,
    fp32 or bf16). ``threads``: intra-op threads (ONNX Runtime's per session; torch's are process-wide)."""
    from ctzoo.inference.precision import check_request

    repository = Path(repository)
    if not repository.is_dir():
        raise FileNotFoundError(f"model repository {repository} is not a folder")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    check_request(precision, backend)
    trt_root = None
    if backend == "onnx" and device != "cpu" and tensorrt and \
            "TensorrtExecutionProvider" in ort.get_available_providers():
        from ctzoo.datasets.samples import cache_dir

        trt_root = cache_dir() / "tensorrt"
    models: dict[str, ServedModel] = {}
    for folder in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (folder / EXPORT_INFO_FILE).is_file() and \
                not any((v / GRAPH_FILE).is_file() for v in folder.iterdir() if v.name.isdigit()):
            logger.info("skipping %s: no %s and no <version>/%s", folder, EXPORT_INFO_FILE, GRAPH_FILE)
            continue
        if backend == "torch":
            runtime = Runtime("torch", threads=threads, device=device, precision=precision)
        else:
            runtime = Runtime("onnx", tuple(choose_providers(device, tensorrt, trt_root / folder.name if trt_root
                                                             else None)), threads)
        model = ServedModel(folder, runtime)
        if model.name in models:
            raise ValueError(f"two models in {repository} are named {model.name!r}")
        if device.startswith("cuda") and not model.engine.on_gpu:
            raise RuntimeError(f"--device cuda, but model {model.name} runs on {model.engine.name} (no usable GPU?)")
        models[model.name] = model
    if not models:
        raise FileNotFoundError(f"no models in {repository}: expected <name>/<version>/{GRAPH_FILE} folders "
                                "(write them with 'ctzoo export')")
    return models

