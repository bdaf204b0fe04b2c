"""What runs a served model's ``model.onnx`` graph for ``/v2/models/<m>/infer``: ONNX Runtime, or PyTorch.

* :class:`OnnxEngine` (``ctzoo serve --backend onnx``, the default): the exported graph in one shared
  :class:`onnxruntime.InferenceSession`, with the providers :func:`choose_providers` picked. On a GPU it runs
  through IOBinding (inputs copied in once, outputs allocated on the device and copied out once); on the CPU plain
  ``session.run``, since IOBinding buys nothing there.
* :class:`TorchEngine` (``--backend torch``): the folder's own bundle (an export folder is a whole bundle) in the
  PyTorch module the graph was exported from (:func:`ctzoo.export.graphs.graph_module`), on the unmodified network:
  the same named inputs and outputs, the truth the export check compared the graph with. For a GPU without
  onnxruntime-gpu (its wheels follow CUDA releases late), and for bf16 autocast where it agrees with fp32 on the
  sample CT (:func:`ctzoo.inference.precision.choose_precision`, as ``ctzoo infer --precision`` decides it).

Both give ``run(inputs, names) -> [np.ndarray]`` on validated float32 inputs, ``profile`` (an anomalous batch
again under the runtime's profiler), ``name`` (what the log, the metadata and the perf events call it) and
``device`` (``cpu`` or ``cuda``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ctzoo.perf.deep_profile import ProfiledRun, profile_onnxruntime, profile_torch
from ctzoo.serve.v2_codec import ServeError

logger = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
BACKENDS = ("onnx", "torch")
ORT_DATATYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
                 "tensor(bool)": "BOOL", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
                 "tensor(int64)": "INT64", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
                 "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64"}


@dataclass(frozen=True)
class Runtime:
    """How the models of a repository run: ``kind`` ``onnx`` with ``providers`` (:func:`choose_providers`) and
    ``threads`` intra-op threads, or ``torch`` on ``device`` (``cpu``, ``cuda``, ``cuda:N``) in ``precision``
    (``auto``, ``fp32`` or ``bf16``; auto: bf16 on CUDA where its check passes)."""

    kind: str = "onnx"
    providers: tuple = ("CPUExecutionProvider",)
    threads: int | None = None
    device: str = "cpu"
    precision: str = "fp32"


def choose_providers(device: str = "auto", tensorrt: bool = True, trt_cache: Path | None = None) -> list:
    """ONNX Runtime providers for ``device`` (``auto``, ``cpu`` or ``cuda``), best first, the CPU always last.

    ``cuda`` without a GPU-enabled onnxruntime raises ``RuntimeError`` (install ``ctzoo[gpu]``, or serve with
    ``--backend torch``); ``auto`` falls back to the CPU. TensorRT builds engines on first use (minutes); they are
    cached in ``trt_cache``.
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
                           f"{', '.join(available)}); install onnxruntime-gpu (pip install 'ctzoo[gpu]') or serve "
                           "the bundles' own networks with --backend torch")
    return [*providers, "CPUExecutionProvider"]


class OnnxEngine:
    """``graph`` in one shared ONNX Runtime session (``session``); ``providers``: those it really got."""

    kind, platform = "onnx", "onnxruntime_onnx"
    precision = None  # the graph's own (ctzoo.json "precision")

    def __init__(self, graph: Path, providers: list | tuple, threads: int | None = None) -> None:
        self.graph, self._providers, self._threads = graph, list(providers), threads
        self.session = self.new_session()
        self.providers = self.session.get_providers()
        self.name = self.providers[0]
        self.on_gpu = self.name in GPU_PROVIDERS
        self.device = "cuda" if self.on_gpu else "cpu"
        self.io_device = "cuda"  # where IOBinding allocates outputs when on_gpu

    def new_session(self, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
        """A session of the graph with the service's settings (``options``: a profiling run's own)."""
        options = options or ort.SessionOptions()
        if self._threads:
            options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        # a service idles between requests: spinning worker threads would burn the cores other models need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(self.graph), options, providers=self._providers)

    def describe(self) -> str:
        return (f"providers {', '.join(self.providers)}"
                + (" (IOBinding)" if self.on_gpu else " (plain session.run: IOBinding buys nothing on the CPU)"))

    def io(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The graph's inputs and outputs as ``{"name", "datatype", "shape"}`` (-1: any size)."""
        def specs(args: list) -> list[dict[str, Any]]:
            return [{"name": a.name, "datatype": ORT_DATATYPES.get(a.type, a.type),
                     "shape": [s if isinstance(s, int) and s >= 0 else -1 for s in a.shape]} for a in args]
        return specs(self.session.get_inputs()), specs(self.session.get_outputs())

    def run(self, inputs: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        try:
            if not self.on_gpu:
                return self.session.run(names, inputs)
            binding = self.session.io_binding()
            for name, array in inputs.items():
                binding.bind_cpu_input(name, array)
            for name in names:
                binding.bind_output(name, self.io_device)
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        except ort.capi.onnxruntime_pybind11_state.InvalidArgument as exc:
            raise ServeError(f"the graph rejected the input: {str(exc)[:300]}") from None

    def profile(self, merged: dict[str, np.ndarray]) -> ProfiledRun:
        """``merged`` again on a new session with ONNX Runtime's profiler on; the served session is not touched."""
        return profile_onnxruntime(self.new_session, merged)


class TorchEngine:
    """``bundle``'s network on ``device`` in ``precision`` (``fp32`` or ``bf16``, resolved), run as the module its
    ``model.onnx`` was exported from; ``backend``: the pipeline backend holding that network (one copy on the
    device for both endpoints). ``threads`` sets ``torch.set_num_threads`` (process-wide)."""

    kind, platform = "torch", "pytorch_libtorch"

    def __init__(self, bundle, graph: Path, device: str, precision: str = "fp32", threads: int | None = None) -> None:
        import torch

        from ctzoo.export.graphs import graph_module
        from ctzoo.inference.backends import autocast, make_backend, resolve_device

        # the pipeline's own torch backend (its copy of the network on the device, its threads and precision):
        # the tensor endpoint runs its network as the graph's module, and the study endpoint runs the backend itself
        self.backend = make_backend(bundle, "torch", device, threads=threads, precision=precision)
        self._torch, self._autocast = torch, autocast
        self.torch_device = resolve_device(device)
        self.device, self.precision = torch.device(self.torch_device).type, precision
        self.graph, self.graph_file = graph_module(bundle.task, self.backend.model), graph
        self.name = f"torch {self.torch_device} {precision}"
        self.on_gpu = self.device == "cuda"

    def describe(self) -> str:
        return f"PyTorch on {self.torch_device}, {self.precision}"

    def io(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The exported graph's inputs and outputs (the tensor interface, whichever backend runs it), checked
        against the module's names."""
        from ctzoo.export.repository import graph_io

        inputs, outputs = graph_io(self.graph_file)
        found = (tuple(e["name"] for e in inputs), tuple(e["name"] for e in outputs))
        if found != (self.graph.inputs, self.graph.outputs):
            raise ValueError(f"{self.graph_file} takes {found[0]} and gives {found[1]}, the network "
                             f"{self.graph.inputs} and {self.graph.outputs}: export it again")
        return inputs, outputs

    def run(self, inputs: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        torch = self._torch
        try:
            with torch.inference_mode(), self._autocast(self.torch_device, self.precision):
                outputs = self.graph.module(*(torch.from_numpy(inputs[name]).to(self.torch_device)
                                              for name in self.graph.inputs))
        except ValueError as exc:  # the networks' own input checks (shapes they cannot take)
            raise ServeError(f"the network rejected the input: {str(exc)[:300]}") from None
        by_name = dict(zip(self.graph.outputs, outputs if isinstance(outputs, tuple) else (outputs,)))
        return [by_name[name].float().cpu().numpy() for name in names]

    def profile(self, merged: dict[str, np.ndarray]) -> ProfiledRun:
        """``merged`` again under ``torch.profiler`` (on the served module: a profile run is one more call)."""
        return profile_torch(lambda: self.run(merged, list(self.graph.outputs)))
