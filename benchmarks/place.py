"""Baechi placement of the zoo's models (``ctzoo place``): how fast each placer is, and the step time it predicts
against one device, an expert's split and m-TOPO, all scored by the same simulator.

    python benchmarks/place.py [--rounds 3] [--devices 2]
        [--out benchmarks/results/place.json]

Models (profiled for training, on this machine's CPU, ``--rounds`` timed runs per node after 1 warm-up):

* ``recistnet-mini``: ``configs/recistnet_mini_cpu.yaml`` (its batch of 8 crops of 256 x 256);
* ``recistnet-resnet34``: ``configs/recistnet_resnet34_gpu.yaml`` at batch 2 (the GPU recipe's network);
* ``template-seg-abdomen``: ``configs/template_seg_abdomen.yaml`` (batch 8, 128 x 128);
* ``template-seg-3d x2 (LEMON)``: a 3-D template segmenter (patches of 64^3, channels 16-32-64-128) grown to twice
  its width by LEMON (``ctzoo.scaling.expand.expand_model``, checked lossless), batch 1.

Devices: ``--devices`` logical CPU devices with equal caps; the transfer model is measured here between logical
CPU devices (a ``clone``). For each model and method (the expert's contiguous split balanced by compute, m-TOPO,
m-ETF, m-SCT, each without falling back to a baseline): the smallest cap per device, as a fraction of the memory
the model peaks at on one device (the simulator's figure), at which it places the model (bisection, 1 %); then,
at one common cap (the largest of those, so every method fits and the model does not fit on one device when
that is below 100 %), the placement seconds (median of 5; m-SCT's includes its LP), the predicted step time,
and the ratio against the expert split.

What this does not show: logical CPU devices share one CPU, so the simulator's parallel speed-ups are
predictions for real separate devices, not something a CPU run can confirm; the GPU part of the issue (a model
out of memory on a capped GPU, trained once placed over GPU + CPU, predicted vs measured step time and peak) needs
a GPU, and none was lent to this work (the JSON says which machine ran it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctzoo.scaling.placement.algorithms import CapacityError  # noqa: E402
from ctzoo.scaling.placement.graph import Device  # noqa: E402
from ctzoo.scaling.placement.planner import place  # noqa: E402
from ctzoo.scaling.placement.profile import measure_comm, profile_model  # noqa: E402
from ctzoo.scaling.placement.simulate import expert_plan, simulate  # noqa: E402

sys.path.append(str(ROOT / "benchmarks"))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance  # noqa: E402

#: label, config, batch size (None: the config's)
MODELS = (("recistnet-mini", ROOT / "configs" / "recistnet_mini_cpu.yaml", None),
          ("recistnet-resnet34", ROOT / "configs" / "recistnet_resnet34_gpu.yaml", 2),
          ("template-seg-abdomen", ROOT / "configs" / "template_seg_abdomen.yaml", None))


def models() -> list[tuple[str, torch.nn.Module, tuple[torch.Tensor, ...]]]:
    from ctzoo.training.placement import load_model_for_placement

    found = []
    for label, config, batch in MODELS:
        _, model, inputs = load_model_for_placement(config, batch)
        found.append((label, model, inputs))
    found.append(("template-seg-3d x2 (LEMON)", *expanded_3d_segmenter()))
    return found


def expanded_3d_segmenter() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    from ctzoo.models.template_seg import TemplateSegNet
    from ctzoo.scaling.expand import compare_outputs, expand_model

    torch.manual_seed(0)
    source = TemplateSegNet(spatial_dims=3, in_channels=1, num_classes=4, channels=(16, 32, 64, 128)).eval()
    small = (torch.randn(1, 1, 16, 16, 16), torch.randn(1, 5, 16, 16, 16))
    grown, _ = expand_model(source, small, width_mult=2.0)
    worst_abs, worst_rel = compare_outputs(source, grown, small)
    assert worst_rel < 1e-4, f"the expansion is not lossless ({worst_abs}, {worst_rel})"
    return grown.train(), (torch.randn(1, 1, 64, 64, 64), torch.randn(1, 5, 64, 64, 64))


def median_seconds(run, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


METHODS = ("expert split", "m-topo", "m-etf", "m-sct")


def placement_for(method: str, graph, devices, comm) -> dict[str, str] | None:
    """The method's own placement within the caps (no fallback to a baseline), or None."""
    if method == "expert split":
        return expert_plan(graph, devices, comm)
    try:
        return place(graph, devices, method, comm, fallback=False, suggest_caps=False).placement
    except CapacityError:
        return None


def devices_at(fraction: float, peak: int, count: int) -> list[Device]:
    return [Device(f"cpu:{k}", int(fraction * peak)) for k in range(count)]


def smallest_fraction(method: str, graph, peak: int, args) -> float | None:
    """The smallest cap per device, as a fraction of the one-device peak, at which the method places the graph
    (bisection to 1 %; the methods are heuristics, so a larger cap is assumed to fit when a smaller one does)."""
    low, high = 0.05, 1.0
    if placement_for(method, graph, devices_at(high, peak, args.devices), args.comm) is None:
        return None
    while high - low > 0.01:
        middle = (low + high) / 2
        fits = placement_for(method, graph, devices_at(middle, peak, args.devices), args.comm) is not None
        low, high = (low, middle) if fits else (middle, high)
    return high


def bench_model(label: str, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], args) -> dict:
    started = time.perf_counter()
    graph = profile_model(model, inputs, "cpu", rounds=args.rounds, warmup=1, training=True, name=label)
    profile_s = time.perf_counter() - started
    alone = simulate(graph, {n.name: "cpu:0" for n in graph.nodes}, [Device("cpu:0", 1 << 50)], args.comm)
    peak = alone.peak_bytes["cpu:0"]
    row = {"model": label, "nodes": len(graph.nodes), "edges": len(graph.edges), "profile_s": profile_s,
           "input_shapes": [list(t.shape) for t in inputs], "parameters": sum(p.numel() for p in model.parameters()),
           "one_device": {"step_s": alone.makespan_s, "peak_bytes": peak},
           "smallest_cap_fraction": {m: smallest_fraction(m, graph, peak, args) for m in METHODS}}
    # one cap for all: the largest any method needs (each of them fits under it), below one device's peak
    needed = [f for f in row["smallest_cap_fraction"].values() if f is not None]
    row["cap_fraction"] = min(1.0, max(needed, default=1.0) * 1.02)
    devices = devices_at(row["cap_fraction"], peak, args.devices)
    row["cap_bytes"], row["plans"] = devices[0].memory_bytes, {}
    for method in METHODS:
        placement = placement_for(method, graph, devices, args.comm)
        entry = score(graph, placement, devices, args.comm)
        if placement is not None and method != "expert split":
            entry["placement_s"] = median_seconds(
                lambda: place(graph, devices, method, args.comm, fallback=False, suggest_caps=False))
        row["plans"][method] = entry
    base = row["plans"]["expert split"].get("step_s")
    for entry in row["plans"].values():
        if entry.get("step_s") and base:
            entry["vs_expert"] = entry["step_s"] / base
    return row


def score(graph, placement, devices, comm) -> dict:
    if placement is None:
        return {"fits": False}
    result = simulate(graph, placement, devices, comm)
    return {"fits": all(result.peak_bytes[d.name] <= d.memory_bytes for d in devices), "step_s": result.makespan_s,
            "peak_bytes": result.peak_bytes, "transfer_s": result.transfer_s,
            "nodes_per_device": {d.name: sum(v == d.name for v in placement.values()) for d in devices}}


def table(rows: list[dict]) -> str:
    lines = ["| model | nodes | one device: step, peak | plan | smallest cap per device | placement time | "
             "predicted step at the common cap | vs expert |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        for k, name in enumerate(METHODS):
            entry, fraction = row["plans"][name], row["smallest_cap_fraction"][name]
            head = (f"| {row['model']} | {row['nodes']} | {1000 * row['one_device']['step_s']:.0f} ms, "
                    f"{row['one_device']['peak_bytes'] / 2**20:.0f} MiB " if k == 0 else "| | | ")
            cap = "does not fit under one device's peak" if fraction is None else f"{100 * fraction:.0f} %"
            placed = f"{1000 * entry['placement_s']:.1f} ms" if "placement_s" in entry else "-"
            step = f"{1000 * entry['step_s']:.0f} ms" if "step_s" in entry else "does not fit"
            ratio = f"{entry['vs_expert']:.3f}" if "vs_expert" in entry else "-"
            lines.append(f"{head}| {name} | {cap} | {placed} | {step} | {ratio} |")
        lines.append(f"| | | | common cap: {100 * row['cap_fraction']:.0f} % = {row['cap_bytes'] / 2**20:.0f} MiB "
                     f"x {len(row['plans']['m-etf'].get('peak_bytes', {})) or '-'} | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "place.json")
    args = parser.parse_args()
    provenance = Provenance(*(config for _, config, _ in MODELS))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    args.comm = measure_comm([Device("cpu:0", 1 << 40), Device("cpu:1", 1 << 40)])
    rows = []
    for label, model, inputs in models():
        print(f"{label}: profiling", flush=True)
        rows.append(bench_model(label, model, inputs, args))
    result = {"benchmark": "place", "rows": rows, "comm": args.comm.to_dict(), "table": table(rows),
              "settings": {"rounds": args.rounds, "devices": args.devices},
              "gpu_part": "not run: no GPU was lent to this work", "wall_s": time.perf_counter() - started,
              "provenance": provenance.record()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["table"])


if __name__ == "__main__":
    main()
