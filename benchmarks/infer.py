"""Is ``ctzoo infer`` keeping the model busy? The batch pipeline against the model alone, in one run.

Input: a resampled real CT. The fetched TotalSegmentator sample ``example_ct.nii.gz`` (122 x 101 x 112 at 3 mm;
fetched with ``ctzoo.datasets.samples.fetch_samples`` if missing) resampled with SimpleITK (linear) to
512 x 512 in-plane and ``--slices`` slices over the same field of view, written once as int16 NIfTI
(``.nii.gz``) and copied to ``--cases`` cases.

Rows: one per backend (torch, onnx) and device (the CPU; CUDA too when present and ``--device auto``):
  * model-only slices/s (the baseline): ``task.predict`` (backend forward + keypoint decoding, the model stage
    of the pipeline) over batches of one case's slices preprocessed up front and held in memory; the backend
    forward alone is reported beside it. Single-stage rates are those of the median batch (or slice), robust to
    bursts of other work on a shared machine; the whole-pass rates are in the JSON too;
  * end-to-end slices/s: ``run_pipeline`` over the cases (NIfTI read and preprocessing in ``--workers`` reader
    processes, batched model, detections.json written; overlays off), total slices / wall time;
  * ratio = end-to-end / model-only (the target: >= 0.8), and the share of the pipeline's wall time spent
    inside ``task.predict`` (model busy), with predict's own slices/s inside the pipeline (its slowdown there
    shows readers competing for the model's cores): ratio ~= busy x (predict in pipeline / model-only). The JSON
    splits the model's idle time into before the first batch, between batches and after the last one;
  * what the readers cost in one process: NIfTI read s/case and ``task.preprocess`` slices/s with 1 torch thread
    (as in a reader process), and the writer's finish + write s/case; "serial" is the rate of one process doing
    read, preprocess, predict and write in turn (no overlap), from those single-stage timings.
Build time (weights load; ONNX export when not cached yet) is excluded from every rate and reported apart.
Model threads (torch ``set_num_threads``, ONNX Runtime intra-op) are set with ``--threads`` (default: the CPU
count, as ``ctzoo infer``), for the baseline and the pipeline alike; reader processes run 1 torch thread each
(PyTorch DataLoader workers).

    python benchmarks/infer.py [--model recistnet-mini] [--backends torch,onnx] [--device auto] [--slices 100]
                               [--cases 2] [--batch-size 8] [--workers N] [--threads N]
                               [--out benchmarks/results/infer.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ctzoo.cli.infer import _default_workers
from ctzoo.datasets.samples import fetch_samples
from ctzoo.export.repository import ensure_graphs
from ctzoo.inference.backends import make_backend
from ctzoo.inference.inputs import CaseInput
from ctzoo.inference.pipeline import PipelineOptions, run_pipeline
from ctzoo.inference.tasks import ModelTask, bundle_task
from ctzoo.io import read_volume
from ctzoo.models import load_bundle

SOURCE = "example_ct.nii.gz"


# ------------------------------------------------------------------------------------------------ input


def build_input(folder: Path, slices: int, cases: int) -> tuple[list[CaseInput], dict]:
    """``cases`` copies of the sample CT resampled to 512 x 512 x ``slices`` over its own field of view."""
    source = fetch_samples() / SOURCE
    image = sitk.ReadImage(str(source))
    old_size, old_spacing = np.array(image.GetSize()), np.array(image.GetSpacing())
    new_size = np.array([512, 512, slices])
    new_spacing = old_size * old_spacing / new_size  # the same extent, voxel edge to voxel edge
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # the first voxel's centre moves by half the change of spacing along each axis
    origin = np.array(image.GetOrigin()) + direction @ ((new_spacing - old_spacing) / 2)
    resampled = sitk.Resample(image, [int(s) for s in new_size], sitk.Transform(), sitk.sitkLinear,
                              origin.tolist(), new_spacing.tolist(), direction.ravel().tolist(), -1024.0,
                              sitk.sitkFloat32)
    resampled = sitk.Cast(sitk.Clamp(sitk.Round(resampled), sitk.sitkFloat32, -32768, 32767), sitk.sitkInt16)
    first = folder / "case000.nii.gz"
    start = time.perf_counter()
    sitk.WriteImage(resampled, str(first), useCompression=True)
    write_s = time.perf_counter() - start
    inputs = [CaseInput("case000", first)]
    for k in range(1, cases):
        path = folder / f"case{k:03d}.nii.gz"
        shutil.copyfile(first, path)
        inputs.append(CaseInput(path.name.removesuffix(".nii.gz"), path))
    description = {
        "source": f"TotalSegmentator 2.18.0 sample {SOURCE} (real CT, Apache-2.0)", "source_path": str(source),
        "original_size": old_size.tolist(), "original_spacing_mm": old_spacing.tolist(),
        "size": new_size.tolist(), "spacing_mm": np.round(new_spacing, 4).tolist(),
        "resampling": "SimpleITK linear over the same field of view, rounded to int16",
        "format": "NIfTI int16, gzip (.nii.gz)", "file_mb": round(first.stat().st_size / 2**20, 1),
        "write_s": round(write_s, 2), "cases": cases,
    }
    return inputs, description


# ------------------------------------------------------------------------------------------------ measures


def build_task(model_name: str, kind: str, device: str, threads: int):
    """(task, backend, build seconds, whether an ONNX export ran) — as ``model_task``, keeping the backend."""
    from ctzoo.datasets.samples import cache_dir

    exports = cache_dir() / "onnx"
    before = set(exports.iterdir()) if exports.is_dir() else set()
    start = time.perf_counter()
    bundle = load_bundle(model_name)
    if kind == "onnx":
        bundle = ensure_graphs(bundle)  # exported into the cache on first use, as ctzoo infer --backend onnx
    backend = make_backend(bundle, kind, device, threads=threads)
    task = bundle_task(bundle, backend)
    build_s = time.perf_counter() - start
    exported = kind == "onnx" and bool((set(exports.iterdir()) if exports.is_dir() else set()) - before)
    return task, backend, build_s, exported


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def batches(slices: np.ndarray, size: int) -> list[np.ndarray]:
    return [slices[i:i + size] for i in range(0, len(slices), size)]


def rate(function, items: list[np.ndarray], device: str, keep: bool = True) -> tuple[dict, list]:
    """Rates of ``function`` over ``items`` (after one warm-up call on the first) and its outputs (when ``keep``):
    ``median``, slices/s of the median batch (robust to bursts of other work on a shared machine; the rate used
    in the table), and ``pass``, all slices over the whole pass's time."""
    function(items[0])
    synchronize(device)
    outputs, seconds = [], []
    for batch in items:
        start = time.perf_counter()
        result = function(batch)
        if keep:
            outputs += _as_list(result)
        synchronize(device)
        seconds.append((time.perf_counter() - start) / len(batch))
    total_s = sum(per_slice * len(batch) for per_slice, batch in zip(seconds, items))
    return {"median": 1 / float(np.median(seconds)), "pass": sum(len(b) for b in items) / total_s}, outputs


def _as_list(result) -> list:
    return result if isinstance(result, list) else [result]


def forward(backend):
    """The backend's network alone (no keypoint decoding), or None when predict is nothing more."""
    return backend.heads if hasattr(backend, "heads") else None


def reader_costs(task: ModelTask, case: CaseInput, threads: int) -> dict:
    """One case in one process: NIfTI read, then ``task.preprocess`` with 1 torch thread (as a reader has),
    timed per slice."""
    start = time.perf_counter()
    volume = read_volume(case.path, progress=False)
    read_s = time.perf_counter() - start
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        context, images = task.preprocess(volume)
        slices, seconds = [], []
        while True:
            tick = time.perf_counter()
            image = next(images, None)
            if image is None:
                break
            seconds.append(time.perf_counter() - tick)
            slices.append(image)
        preprocess_s = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"volume": volume, "context": context, "slices": np.stack(slices), "read_s": read_s,
            "preprocess_s": preprocess_s, "preprocess_median_s": float(np.median(seconds))}


def timed_predict(task: ModelTask) -> tuple[ModelTask, list]:
    """``task`` whose predict appends (start, end, slices) per call to the returned list (main process only)."""
    calls: list[tuple[float, float, int]] = []

    def predict(batch: np.ndarray):
        start = time.perf_counter()
        result = task.predict(batch)
        calls.append((start, time.perf_counter(), len(batch)))
        return result

    return dataclasses.replace(task, predict=predict), calls


def measure(model_name: str, kind: str, device: str, cases: list[CaseInput], args, work: Path) -> dict:
    torch.set_num_threads(args.threads)
    task, backend, build_s, exported = build_task(model_name, kind, device, args.threads)
    device_used = getattr(backend, "device", device)
    reader = reader_costs(task, cases[0], args.threads)
    slices = reader["slices"]
    items = batches(slices, args.batch_size)
    model, outputs = rate(task.predict, items, device_used)
    heads = forward(backend)
    fwd = rate(heads, items, device_used, keep=False)[0] if heads is not None else model
    start = time.perf_counter()
    result = task.finish(reader["volume"], reader["context"], outputs)
    task.write(reader["volume"], result, work / f"single-{kind}-{device_used}", False)
    write_s = time.perf_counter() - start

    counted, calls = timed_predict(task)
    out = work / f"pipeline-{kind}-{device_used}"
    options = PipelineOptions(out=out, batch_size=args.batch_size, workers=args.workers, overlay=False,
                              progress=False)
    start = time.perf_counter()
    rows = run_pipeline(cases, counted, options)
    end = time.perf_counter()
    wall = end - start
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"pipeline failed: {failed}")
    total = sum(int(r["slices"]) for r in rows)
    end_to_end = total / wall
    n = len(slices)
    predict_s = sum(stop - begin for begin, stop, _ in calls)
    in_pipeline_median = 1 / float(np.median([(stop - begin) / count for begin, stop, count in calls if count]))
    # where the model waited: for the first slices (fork, first read and chunk), between batches, after the last
    before, after = calls[0][0] - start, end - calls[-1][1]
    # one process doing everything in turn (single-stage medians): what overlap could gain over none at all
    serial_s_per_slice = 1 / model["median"] + reader["preprocess_median_s"] + (reader["read_s"] + write_s) / n
    return {
        "backend": kind, "device": device_used, "model": model_name, "batch_size": args.batch_size,
        "workers": args.workers, "model_threads": args.threads, "torch_threads": torch.get_num_threads(),
        "reader_torch_threads": 1 if args.workers > 0 else args.threads,
        "build_s": round(build_s, 2), "onnx_exported": exported,
        "model_only_slices_per_s": model["median"], "model_only_pass_slices_per_s": model["pass"],
        "forward_only_slices_per_s": fwd["median"], "forward_only_pass_slices_per_s": fwd["pass"],
        "end_to_end_slices_per_s": end_to_end, "ratio": end_to_end / model["median"],
        "ratio_vs_pass": end_to_end / model["pass"],
        "pipeline_wall_s": wall, "pipeline_slices": total,
        "model_busy_fraction": predict_s / wall,
        "predict_in_pipeline_slices_per_s": in_pipeline_median,
        "predict_in_pipeline_pass_slices_per_s": sum(c for _, _, c in calls) / max(predict_s, 1e-9),
        "model_idle_s": {"before_first_batch": before, "between_batches": wall - predict_s - before - after,
                         "after_last_batch": after},
        "read_s_per_case": reader["read_s"],
        "preprocess_slices_per_s_1_thread": 1 / reader["preprocess_median_s"],
        "preprocess_pass_slices_per_s_1_thread": n / reader["preprocess_s"],
        "finish_write_s_per_case": write_s, "serial_slices_per_s": 1 / serial_s_per_slice,
        "reader_read_s_in_pipeline": [float(r["read_s"]) for r in rows],
        "per_slice_ms": {"predict": 1000 / model["median"], "forward": 1000 / fwd["median"],
                         "read": 1000 * reader["read_s"] / n, "preprocess": 1000 * reader["preprocess_median_s"],
                         "finish_write": 1000 * write_s / n, "predict_in_pipeline": 1000 / in_pipeline_median},
    }


# ------------------------------------------------------------------------------------------------ main


def devices_for(requested: str) -> list[str]:
    if requested != "auto":
        return [requested]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def machine_info() -> dict:
    import onnxruntime as ort

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
            "simpleitk": sitk.Version.VersionString(), "numpy": np.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="recistnet-mini")
    parser.add_argument("--backends", default="torch,onnx", help="comma-separated: torch, onnx")
    parser.add_argument("--device", default="auto", help="auto (the CPU, and CUDA when present), cpu or cuda")
    parser.add_argument("--slices", type=int, default=100, help="slices per case (default 100)")
    parser.add_argument("--cases", type=int, default=2, help="copies of the case in the pipeline run (default 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=_default_workers(),
                        help=f"reader processes (default: ctzoo infer's, here {_default_workers()})")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="model threads: torch set_num_threads / ORT intra-op (default: the CPU count, as "
                             "ctzoo infer)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "infer.json")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ctzoo-bench-infer-") as tmp:
        work = Path(tmp)
        (work / "cases").mkdir()
        cases, described = build_input(work / "cases", args.slices, args.cases)
        print(f"input: {described['source']}, {described['original_size']} voxels at "
              f"{described['original_spacing_mm']} mm -> {described['size']} at {described['spacing_mm']} mm "
              f"({described['format']}, {described['file_mb']} MB), {args.cases} cases")
        for device in devices_for(args.device):
            for kind in backends:
                if device.startswith("cuda") and kind == "onnx":
                    import onnxruntime as ort

                    if "CUDAExecutionProvider" not in ort.get_available_providers():
                        print("onnx on cuda: skipped (no CUDAExecutionProvider)")
                        continue
                row = measure(args.model, kind, device, cases, args, work)
                rows.append(row)
                print(f"  {kind}/{row['device']}: build {row['build_s']:.1f} s"
                      f"{' (ONNX export included)' if row['onnx_exported'] else ''}, "
                      f"pipeline {row['pipeline_slices']} slices in {row['pipeline_wall_s']:.1f} s", flush=True)
    load_after = os.getloadavg()
    header = (f"{'backend':8s} {'device':6s} {'model-only':>10s} {'forward':>8s} {'end-to-end':>10s} {'ratio':>6s} "
              f"{'busy':>5s} {'predict@pipe':>12s} {'serial':>6s} {'prep 1 thr':>10s} {'read s':>6s} {'workers':>7s} "
              f"{'threads':>7s}")
    print("slices/s (busy: share of pipeline wall time inside task.predict; prep 1 thr: task.preprocess in one "
          "process, 1 torch thread; read s: NIfTI read per case)")
    print(header)
    for row in rows:
        print(f"{row['backend']:8s} {row['device']:6s} {row['model_only_slices_per_s']:10.2f} "
              f"{row['forward_only_slices_per_s']:8.2f} {row['end_to_end_slices_per_s']:10.2f} {row['ratio']:5.2f}x "
              f"{row['model_busy_fraction']:5.0%} {row['predict_in_pipeline_slices_per_s']:12.2f} "
              f"{row['serial_slices_per_s']:6.2f} "
              f"{row['preprocess_slices_per_s_1_thread']:10.2f} {row['read_s_per_case']:6.2f} {row['workers']:7d} "
              f"{row['model_threads']:7d}")
    machine = machine_info()
    machine.update(load_average_before=[round(x, 2) for x in load_before],
                   load_average_after=[round(x, 2) for x in load_after])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "infer", "model": args.model, "slices": args.slices,
                                    "cases": args.cases, "batch_size": args.batch_size, "workers": args.workers,
                                    "threads": args.threads, "input": described,
                                    "machine": machine, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
