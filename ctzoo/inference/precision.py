"""bf16 prediction for the PyTorch backend, used only where it agrees with fp32 on real CT.

bf16 keeps 8 significant bits (2^-8 = 3.9e-3 per rounding) and fp32's range, so autocast runs convolutions and
matrix products in bf16 without overflow; on GPUs with tensor cores, and on CPUs with native bf16 dot products
(AVX512-BF16, AMX), that is the faster arithmetic. Whether a model's outputs survive it is measured, never
assumed: :func:`bf16_parity` runs the bundle's network on the embedded sample CT (the real-CT slices the ONNX
export check uses, :func:`ctzoo.inference.sample_inputs.sample_ct_inputs`) in fp32 and under bf16 autocast, on the
device that will run it, and compares what the pipeline keeps:

* detectors: every head, by the export check's measure (:func:`output_error`, relative to the head's largest
  fp32 value) against :data:`BF16_RELATIVE_TOLERANCE`;
* template segmenters: the logits the same way, and the class map the backend returns (its bank template chosen in
  bf16 too) pixel by pixel against :data:`BF16_MIN_AGREEMENT`.

``ctzoo infer --precision auto`` (the default) runs bf16 on CUDA where the check passes and fp32 on the CPU (fp32
is the reference every test and published figure uses); ``--precision bf16`` asks for it anywhere and fails with
the check's numbers where it does not pass; ONNX graphs carry their own precision (``ctzoo export --fp16``).
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ctzoo.inference.backends import autocast, make_backend
from ctzoo.models.bundle import ModelBundle

__all__ = ["PRECISIONS", "PrecisionChoice", "bf16_parity", "check_request", "choose_precision", "output_error"]

PRECISIONS = ("auto", "fp32", "bf16")
#: Largest accepted ``max |bf16 - fp32| / (max |fp32| + 1e-6)`` per output. Measured on the sample CT (CPU,
#: AVX512-BF16): recistnet-mini 0.6e-2 (heatmaps) to 2.1e-2 (offsets), template-seg-abdomen 1.6e-2 (logits); 0.1
#: leaves a 5x margin and still fails a broken cast or an overflow (errors of order 1, or NaN).
BF16_RELATIVE_TOLERANCE = 0.1
#: bf16 that takes this many times fp32's time in the check is named slow in the choice's reason (measured: 130x on
#: a 2-core AMD EPYC without AVX512-BF16, where every bf16 product is emulated).
SLOW_BF16_RATIO = 2.0
#: Smallest accepted share of pixels whose class is the same in bf16 and fp32 (measured: 0.9994).
BF16_MIN_AGREEMENT = 0.99


def output_error(result: np.ndarray, reference: torch.Tensor | np.ndarray) -> tuple[float, float]:
    """``(max |result - reference|, that / (max |reference| + 1e-6))`` in float64, for outputs of equal shape: the
    measure every parity check uses (ONNX export, bf16). Bool outputs count too (a flipped flag is an error of 1);
    NaN propagates, so a ``not max_rel <= tolerance`` test fails on it."""
    reference = reference.numpy() if isinstance(reference, torch.Tensor) else np.asarray(reference)
    reference = reference.astype(np.float64)
    max_abs = float(np.abs(result.astype(np.float64) - reference).max(initial=0.0))
    return max_abs, max_abs / (float(np.abs(reference).max(initial=0.0)) + 1e-6)


@dataclass(frozen=True)
class PrecisionChoice:
    """What a run predicts in (``fp32`` or ``bf16``: the torch backend's ``precision``), why, and the bf16 check's
    record where one ran; ``own``: the backend runs in a precision of its own (an ONNX graph as exported), which
    ``reason`` names."""

    precision: str
    reason: str
    parity: dict[str, Any] | None = field(default=None, compare=False)
    own: bool = False

    def describe(self) -> str:
        return self.reason if self.own else f"{self.precision} ({self.reason})"


def choose_precision(bundle: ModelBundle, requested: str, backend_kind: str, device: str,
                     placed: bool = False) -> PrecisionChoice:
    """The precision ``requested`` (:data:`PRECISIONS`) resolves to for ``bundle`` on ``device`` (a resolved device,
    not ``auto``). ``auto``: bf16 on CUDA where :func:`bf16_parity` passes, else fp32. ``bf16``: the check must pass
    (RuntimeError with its numbers otherwise). ValueError where bf16 cannot apply: the ONNX backend (its graph has
    its own precision) or a placed network (``placed``: spread over devices, run as placed)."""
    check_request(requested, backend_kind, placed)
    if backend_kind != "torch":
        graph = bundle.graphs.precision if bundle.graphs is not None else "fp32"
        return PrecisionChoice("fp32", f"the {graph} ONNX graph as exported", own=True)
    if placed:
        return PrecisionChoice("fp32", "a placed network runs as placed")
    if requested == "fp32":
        return PrecisionChoice("fp32", "asked for")
    if requested == "auto" and not device.startswith("cuda"):
        return PrecisionChoice("fp32", "auto: fp32 on the CPU, the reference")
    parity = bf16_parity(bundle, device)
    if parity["passed"]:
        reason = (f"{'auto: ' if requested == 'auto' else ''}agrees with fp32 on the sample CT, worst relative error "
                  f"{parity['worst_relative_error']:.2g}")
        slower = parity["seconds"]["bf16"] / max(parity["seconds"]["fp32"], 1e-9)
        if slower >= SLOW_BF16_RATIO:  # e.g. a CPU without bf16 dot products, where autocast emulates them
            reason += f"; but it took {slower:.0f}x fp32's time there on {device}: fp32 is faster"
        return PrecisionChoice("bf16", reason, parity)
    failures = "; ".join(parity["failures"])
    if requested == "bf16":
        raise RuntimeError(f"{bundle.name}: bf16 disagrees with fp32 on the sample CT on {device}: {failures}; "
                           "run with --precision fp32")
    return PrecisionChoice("fp32", f"auto: bf16 failed its check ({failures})", parity)


def check_request(requested: str, backend_kind: str, placed: bool = False, compile: bool = False) -> None:
    """ValueError for a precision (or ``compile``) that cannot apply (see :func:`choose_precision`), before any
    model runs."""
    if compile and (backend_kind != "torch" or placed):
        raise ValueError("--compile compiles the PyTorch backend's own network: use --backend torch, without "
                         "--placement")
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested == "bf16" and (backend_kind != "torch" or placed):
        raise ValueError("precision bf16 runs the PyTorch backend's own network: "
                         + ("ONNX graphs carry their own precision (ctzoo export --fp16)" if backend_kind != "torch"
                            else "a placed network runs in fp32 as placed"))


def bf16_parity(bundle: ModelBundle, device: str) -> dict[str, Any]:
    """``bundle``'s network on the sample CT in fp32 and in bf16 on ``device`` (see the module docstring): a record
    with each output's errors, the class-map agreement of a segmenter, each precision's ``seconds``, ``passed`` and
    the ``failures``. The networks run once per process for a bundle's weights and a device (the comparison is a
    fact of those two: several model copies, a PACS bridge's tasks and a server's reloads share it); the record is
    judged against the tolerances at every call."""
    key = (str(bundle.folder.resolve()), bundle.weights_digest(), device)
    with _MEASURED_LOCK:
        if key not in _MEASURED:
            _MEASURED[key] = _measure_bf16(bundle, device)
        record = copy.deepcopy(_MEASURED[key])
    failures = [f"{name}: relative error {e['max_rel']:.3g} > {BF16_RELATIVE_TOLERANCE:g}"
                for name, e in record["errors"].items() if not e["max_rel"] <= BF16_RELATIVE_TOLERANCE]
    record["relative_tolerance"] = BF16_RELATIVE_TOLERANCE
    if "class_agreement" in record:
        record["min_class_agreement"] = BF16_MIN_AGREEMENT
        if not record["class_agreement"] >= BF16_MIN_AGREEMENT:
            failures.append(f"classes agree on {record['class_agreement']:.2%} of pixels < {BF16_MIN_AGREEMENT:.0%}")
    return {**record, "passed": not failures, "failures": failures}


#: What :func:`_measure_bf16` measured, per (bundle folder, weights digest, device), in this process.
_MEASURED: dict[tuple[str, str, str], dict[str, Any]] = {}
_MEASURED_LOCK = threading.Lock()


def _measure_bf16(bundle: ModelBundle, device: str) -> dict[str, Any]:
    """The fp32 and bf16 runs of :func:`bf16_parity`, unjudged: the errors, the class agreement of a segmenter,
    and each precision's wall time on the sample (its first run on the device, warm-up included)."""
    from ctzoo.inference.sample_inputs import sample_ct_inputs

    inputs = sample_ct_inputs(bundle)
    backends = {p: make_backend(bundle, "torch", device, precision=p) for p in ("fp32", "bf16")}
    images = inputs["image"].numpy()
    outputs, seconds = {}, {}
    for p, backend in backends.items():
        started = time.perf_counter()
        if bundle.task == "detection":
            outputs[p] = backend.heads(images)
        else:  # the logits with the sample's (fp32-chosen) templates: the network alone, as the ONNX check runs it
            with torch.inference_mode(), autocast(device, p):
                logits = backend.model(*(value.to(device) for value in inputs.values()))
            outputs[p] = {"logits": logits.float().cpu().numpy()}
        seconds[p] = time.perf_counter() - started
    errors = {name: dict(zip(("max_abs", "max_rel"), output_error(outputs["bf16"][name], outputs["fp32"][name])))
              for name in outputs["fp32"]}
    record: dict[str, Any] = {
        "metric": "max|bf16 - fp32| / (max|fp32| + 1e-6), per output", "device": device, "slices": int(len(images)),
        "errors": errors, "worst_relative_error": max((e["max_rel"] for e in errors.values()), default=0.0),
        "seconds": seconds}
    if bundle.task == "segmentation":
        classes = [backend.segment(images) for backend in backends.values()]
        record["class_agreement"] = float((classes[0] == classes[1]).mean())
    return record
