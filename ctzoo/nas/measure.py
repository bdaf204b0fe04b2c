"""What a sub-network costs: parameters, FLOPs and latency, each of the *extracted* :class:`TemplateSegNet`.

* parameters: distinct ones (the Siamese encoders' shared levels counted once);
* FLOPs: ``2 x`` the multiply-accumulates of every convolution (transposed ones included) that one forward of a
  single ``(image, template)`` pair runs, counted by forward hooks from the real output shapes (so a template
  encoder that no fused level needs is not counted, as the network skips it); norms, activations and the
  cosine attention's few per-pixel products are left out;
* latency: the network exported as the zoo exports it (:func:`ctzoo.export.graphs.segmenter_graph`, through the
  one exporter) and timed with ONNX Runtime on the CPU, one intra-op thread by default so that numbers taken on
  a busy machine or different runs compare; on a GPU (``device="cuda"``) the PyTorch network itself, timed with
  CUDA synchronisation. Both report the median of ``runs`` timed calls after ``warmup`` untimed ones.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctzoo.export.graphs import export_graph, segmenter_graph
from ctzoo.models.template_seg import TemplateSegNet, count_parameters

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def example_pair(net: TemplateSegNet, size: tuple[int, ...], batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random ``{"image": (B, in, *size), "template": (B, in + C, *size)}`` (binary masks)."""
    generator = torch.Generator().manual_seed(seed)
    masks = (torch.rand(batch, net.num_classes, *size, generator=generator) > 0.7).float()
    return {"image": torch.rand(batch, net.in_channels, *size, generator=generator),
            "template": torch.cat([torch.rand(batch, net.in_channels, *size, generator=generator), masks], dim=1)}


def conv_macs(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of the convolutions one ``model(*inputs)`` runs (batch included)."""
    total = 0

    def count(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        kernel = math.prod(module.kernel_size)
        if isinstance(module, TRANSPOSED):  # every input value is scattered over out_channels x kernel
            total += args[0].numel() * module.out_channels // module.groups * kernel
        else:  # every output value gathers in_channels x kernel
            total += output.numel() * module.in_channels // module.groups * kernel

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, CONVS + TRANSPOSED)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def median_ms(call: Callable[[], Any], runs: int, warmup: int, synchronize: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``call`` in milliseconds over ``runs`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    synchronize()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def onnx_latency_ms(net: TemplateSegNet, size: tuple[int, ...], runs: int = 20, warmup: int = 5,
                    threads: int = 1, opset: int = 17) -> float:
    """Median ONNX Runtime (CPU) latency of one ``(image, template)`` pair of ``size`` through ``net``'s
    exported graph, with ``threads`` intra-op threads (and one inter-op thread)."""
    import onnxruntime as ort

    inputs = example_pair(net, size)
    with tempfile.TemporaryDirectory(prefix="ctzoo-nas-") as folder:
        path = Path(folder) / "model.onnx"
        export_graph(segmenter_graph(net.eval(), [("latency", inputs)]), path, opset)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {name: tensor.numpy() for name, tensor in inputs.items()}  # every input is declared: keep_declared_inputs
    return median_ms(lambda: session.run(None, feed), runs, warmup)


def torch_latency_ms(net: TemplateSegNet, size: tuple[int, ...], device: str = "cuda", runs: int = 20,
                     warmup: int = 5) -> float:
    """Median PyTorch latency of one pair on ``device`` (a GPU: timed up to ``torch.cuda.synchronize``)."""
    net = net.to(device).eval()
    inputs = [t.to(device) for t in example_pair(net, size).values()]
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with torch.inference_mode():
        return median_ms(lambda: net(*inputs), runs, warmup, synchronize)


def measure(net: TemplateSegNet, size: tuple[int, ...] = (128, 128), runs: int = 20, warmup: int = 5,
            threads: int = 1, device: str = "cpu") -> dict[str, Any]:
    """``{"params", "flops", "latency_ms", "latency_backend", "size"}`` of ``net`` (an extracted sub-network)
    for one pair of ``size``; ``device="cuda"`` times PyTorch on the GPU, anything else ONNX Runtime on the CPU."""
    net = net.eval()
    pair = example_pair(net, size)
    flops = 2 * conv_macs(net, pair["image"], pair["template"])
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        latency, backend = torch_latency_ms(net, size, device, runs, warmup), f"torch {device}"
        net.cpu()
    else:
        latency, backend = onnx_latency_ms(net, size, runs, warmup, threads), f"onnxruntime cpu x{threads}"
    return {"params": count_parameters(net), "flops": int(flops), "latency_ms": float(latency),
            "latency_backend": backend, "size": list(size)}
