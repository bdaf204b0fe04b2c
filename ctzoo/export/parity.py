"""Parity of an exported graph with PyTorch: the one checker every export passes before it is kept.

The error is ``max |onnx - torch| / (max |torch| + 1e-6)`` per output and check input, measured with ONNX Runtime
(CPU) against the unmodified PyTorch network in fp32. Above the tolerance the export raises ``RuntimeError``
naming every output, and nothing is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ctzoo.export.graphs import Graph
from ctzoo.inference.precision import output_error

#: Largest accepted ``max |onnx - torch| / (max |torch| + 1e-6)`` per output for fp32 graphs on the CPU.
RELATIVE_TOLERANCE = 1e-4
#: The same for ``--fp16`` graphs. fp16 keeps 11 significant bits (2^-11 = 5e-4 per rounding); measured on
#: recistnet-mini 0.4-1.8e-3 (worst: displacements on real CT) and on template-seg-abdomen 5e-4, so 1e-2
#: leaves a 5x margin while still catching a broken conversion (a wrong cast or overflow is >> 1e-2).
FP16_RELATIVE_TOLERANCE = 1e-2
Progress = Callable[[str], None]


def check_parity(path: Path, graph: Graph, tolerance: float, progress: Progress | None = None) -> dict[str, Any]:
    """ONNX Runtime (CPU) on ``path`` against ``graph.reference`` (PyTorch fp32) on every labelled check input.

    Returns the ``parity`` record of ctzoo.json; ``RuntimeError`` naming every output (and input) whose relative
    error exceeds ``tolerance`` (NaN included), or whose shape differs, after all checks ran.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the fp16 graph's cast-related warnings are expected
    # PyTorch's reference runs between the session's runs: spinning threads would take its cores meanwhile
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    results: dict[str, Any] = {}
    failures: list[str] = []
    for label, inputs in graph.checks:
        shapes = {name: list(value.shape) for name, value in inputs.items()}
        if progress:
            progress(f"  checking {label}: " + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items()))
        with torch.inference_mode():
            expected = graph.reference(*inputs.values())
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(graph.outputs, {name: value.numpy() for name, value in inputs.items()})
        errors = {}
        for name, reference, result in zip(graph.outputs, expected, got):
            if tuple(result.shape) != tuple(reference.shape):
                failures.append(f"output {name!r} on {label} has shape {tuple(result.shape)} in ONNX Runtime but "
                                f"{tuple(reference.shape)} in PyTorch")
                continue
            max_abs, max_rel = output_error(result, reference)
            errors[name] = {"max_abs": max_abs, "max_rel": max_rel}
            if not max_rel <= tolerance:  # 'not <=' so that NaN fails too
                failures.append(f"output {name!r} on {label} ({_shapes_text(shapes)}): max abs error {max_abs:.3g}, "
                                f"max relative error {max_rel:.3g} > {tolerance:g}")
        results[label] = {"inputs": shapes, "errors": errors}
    if failures:
        raise RuntimeError(f"{path.name}: ONNX Runtime and PyTorch disagree: " + "; ".join(failures))
    worst = {name: {"max_abs": max(r["errors"][name]["max_abs"] for r in results.values()),
                    "max_rel": max(r["errors"][name]["max_rel"] for r in results.values())} for name in graph.outputs}
    return {"metric": "max|onnx - torch| / (max|torch| + 1e-6), per output", "relative_tolerance": tolerance,
            "reference": "PyTorch fp32, the unmodified model", "runtime": f"onnxruntime {ort.__version__} CPU",
            "checks": results, "worst": worst}


def _shapes_text(shapes: dict[str, list[int]]) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in shapes.items())


def parity_table(parity: dict[str, Any]) -> str:
    """The parity record as a short text table: one row per check and output."""
    rows = [("check", "inputs", "output", "max abs", "max rel")]
    for label, result in parity["checks"].items():
        for k, (name, errors) in enumerate(result["errors"].items()):
            rows.append((label if k == 0 else "", _shapes_text(result["inputs"]) if k == 0 else "", name,
                         f"{errors['max_abs']:.2e}", f"{errors['max_rel']:.2e}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([*lines, f"all within max rel <= {parity['relative_tolerance']:g} ({parity['runtime']})"])
