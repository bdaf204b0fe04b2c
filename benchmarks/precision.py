"""bf16 and torch.compile against fp32 eager: the PyTorch backend's model stage on real CT, all in the same run.

Input: the infer benchmark's (``benchmarks/infer.py``): the TotalSegmentator sample CT resampled to 512 x 512 x
``--slices``, one case, preprocessed up front by each model's own ``task.preprocess``. Per model and device, each of
``--repeats`` repeats times ``task.predict`` (the forward pass, and for the detector its keypoint decoding) over
every batch in fp32 eager (the baseline), bf16 autocast, and both again compiled (``ctzoo infer --precision bf16
--compile``), and on CUDA bf16 replayed as CUDA graphs (``--cuda-graphs``), at the median batch's rate; the table
shows medians, each against the baseline, and the first batch's seconds (compiling, with an empty inductor cache).
Beside the speed, what ``ctzoo infer --precision`` checks before it uses bf16
(:func:`ctzoo.inference.precision.bf16_parity` on the embedded sample CT) and what the outputs of this volume
keep: detectors, lesions per slice and their end points; segmenters, the share of pixels with the same class.

    python benchmarks/precision.py [--models recistnet-mini,template-seg-abdomen] [--device auto] [--slices 48]
                                   [--repeats 3] [--batch-size 8] [--threads N] [--out results/precision.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance  # noqa: E402
from infer import batches, build_input, devices_for, inference_libraries, rate  # noqa: E402

from ctzoo.inference.allocator import keep_freed_memory  # noqa: E402
from ctzoo.inference.precision import bf16_parity  # noqa: E402
from ctzoo.inference.tasks import model_task  # noqa: E402
from ctzoo.io import read_volume  # noqa: E402
from ctzoo.models import load_bundle  # noqa: E402

VARIANTS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "fp32 compiled": ("fp32", True),
            "bf16 compiled": ("bf16", True)}
#: On CUDA also: compiled in reduce-overhead mode, each batch replayed as a CUDA graph (ctzoo infer --cuda-graphs).
CUDA_VARIANTS = {"bf16 CUDA graphs": ("bf16", "cuda-graphs")}


def variants_for(device: str) -> dict[str, tuple[str, bool | str]]:
    return {**VARIANTS, **(CUDA_VARIANTS if device.startswith("cuda") else {})}


def agreement(task: str, fp32: list, bf16: list) -> dict:
    """How much of this volume's output bf16 keeps: lesions per slice and end-point distance (detector), or the
    share of pixels with the same class (segmenter)."""
    if task == "segmentation":
        return {"class_agreement": float(np.mean([(a == b).mean() for a, b in zip(fp32, bf16)]))}
    same_count = [len(a[0]) == len(b[0]) for a, b in zip(fp32, bf16)]
    shifts = [float(np.abs(a[1] - b[1]).max()) for a, b, same in zip(fp32, bf16, same_count) if same and len(a[0])]
    return {"slices_with_the_same_lesion_count": float(np.mean(same_count)),
            "lesions": int(sum(len(a[0]) for a in fp32)),
            "max_end_point_shift_px": max(shifts, default=0.0)}


def measure(model_name: str, device: str, volume, args) -> dict:
    bundle = load_bundle(model_name)
    variants = variants_for(device)
    tasks = {name: model_task(bundle, "torch", device, threads=args.threads, precision=precision, compile=compiled)
             for name, (precision, compiled) in variants.items()}
    slices = np.stack(list(tasks["fp32"].preprocess(volume)[1]))
    items = batches(slices, args.batch_size)
    first_batch_s = {}
    for name, task in tasks.items():  # the first batch compiles a compiled model
        start = time.perf_counter()
        task.predict(items[0])
        first_batch_s[name] = time.perf_counter() - start
    repeats: list[dict] = []
    outputs: dict[str, list] = {}
    for _ in range(args.repeats):
        sample = {}
        for name, task in tasks.items():  # every variant in each repeat: a slow spell hits them alike
            sample[name], outputs[name] = rate(task.predict, items, device)
        repeats.append(sample)
    rates = {name: float(np.median([r[name]["median"] for r in repeats])) for name in variants}
    parity = bf16_parity(bundle, device)
    return {"model": model_name, "task": bundle.task, "device": device, "slices": len(slices),
            "input_shape": list(slices.shape[1:]), "slices_per_s": rates,
            "ratio": {name: rates[name] / rates["fp32"] for name in variants}, "first_batch_s": first_batch_s,
            "repeats": repeats, "this_volume": {name: agreement(bundle.task, outputs["fp32"], outputs[name])
                                                for name in variants if name != "fp32"},
            "sample_ct_check": {k: parity[k] for k in ("passed", "worst_relative_error", "errors", "failures",
                                                       "class_agreement") if k in parity}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="recistnet-mini,template-seg-abdomen")
    parser.add_argument("--device", default="auto", help="auto (the CPU, and CUDA when present), cpu or cuda")
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "precision.json")
    args = parser.parse_args()
    provenance = Provenance()
    keep_freed_memory()  # as ctzoo infer
    cpu_flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="ctzoo-bench-precision-") as tmp:
        # compile times from a cold start: inductor's on-disk cache of earlier runs would hide them
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        cases, described = build_input(Path(tmp), args.slices, 1)
        volume = read_volume(cases[0].path, progress=False)
        for device in devices_for(args.device):
            for name in [m.strip() for m in args.models.split(",") if m.strip()]:
                rows.append(measure(name, device, volume, args))
                print(f"  {name}/{device}: {rows[-1]['this_volume']}", flush=True)
    print(f"task.predict slices/s, medians of {args.repeats} repeats, (ratio to fp32 eager, the baseline); first: "
          "the first batch's seconds (compiling)")
    names = list(variants_for("cuda"))
    print(f"{'model':22s} {'device':6s}" + "".join(f" {name:>20s}" for name in names) + "  bf16 check")
    for row in rows:
        check = row["sample_ct_check"]
        cells = "".join(f" {row['slices_per_s'][n]:6.1f} ({row['ratio'][n]:.2f}x) {row['first_batch_s'][n]:4.0f}s"
                        if n in row["slices_per_s"] else f" {'-':>20s}" for n in names)
        print(f"{row['model']:22s} {row['device']:6s}{cells}  {'pass' if check['passed'] else 'FAIL'} "
              f"(worst rel. error {check['worst_relative_error']:.3g})")
    recorded = provenance.record(**inference_libraries(),
                                 bf16_cpu_instructions=sorted({f for f in cpu_flags if "bf16" in f}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "precision", "slices": args.slices, "batch_size": args.batch_size,
                                    "threads": args.threads, "input": described, "rows": rows,
                                    "provenance": recorded}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
