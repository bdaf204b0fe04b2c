"""Is ``ctzoo infer`` keeping the model busy? The batch pipeline against the model alone, in one run.

Input: a resampled real CT. The fetched TotalSegmentator sample ``example_ct.nii.gz`` (122 x 101 x 112 at 3 mm;
fetched with ``ctzoo.datasets.samples.fetch_samples`` if missing) resampled with SimpleITK (linear) to
512 x 512 in-plane and ``--slices`` slices over the same field of view, written once as int16 NIfTI
(``.nii.gz``) and copied to ``--cases`` cases.

Rows: one per backend (torch, onnx) and device (the CPU; CUDA too when present and ``--device auto``). Each of
``--repeats`` repeats measures the model alone and then every pipeline, so a slow spell of a shared machine hits
them alike; the table shows medians, the JSON every repeat:
  * model-only slices/s (the baseline): ``task.predict`` (backend forward + keypoint decoding, the model stage
    of the pipeline) on ``--threads`` threads over batches of one case's slices preprocessed up front and held in
    memory, at the median batch's rate; on the CPU also on 1 thread (what each copy of the copies layout runs);
  * infer: ``run_pipeline`` at ``ctzoo infer``'s defaults (:func:`ctzoo.inference.schedule.choose_schedule` for
    this device, the cases and the cores; detections.json written, overlays off), total slices / wall time,
    ratio = infer / model-only (the target: >= 0.8), and busy, the share of the model copies' time inside
    ``task.predict``;
  * serial: ``ctzoo infer --workers 0`` measured the same way: one process reading, preprocessing and predicting
    (on ``--threads`` threads) in turn; infer / serial must never fall below 1;
  * shared: one model on ``--threads`` threads fed by ``--workers`` reader processes (the GPU's layout, and
    ``ctzoo infer``'s default on the CPU before the copies layout).
``--input dicom`` / ``--input j2k`` write each case as a DICOM series instead (uncompressed / JPEG 2000 lossless, the
embedded sample's headers with the resampled slices), and ``--decode`` (gdcm, nvimgcodec, auto: ``ctzoo infer
--decode``) decodes them in every pipeline row; the row then also has the decode rate alone (``read_volume`` of one
case, every thread, best of 3, slices/s) and ``ratio_vs_bound`` = infer / min(model-only, decode alone).
``--preprocess-on model`` computes the default and shared rows' inputs in the model's process, on its device
(``ctzoo infer --preprocess-on model``).
``--precision bf16`` and ``--compile`` run every torch row (the baseline too) as ``ctzoo infer --precision bf16
--compile`` does. The JSON also has the single-stage costs of one process (NIfTI read s/case,
``task.preprocess`` slices/s on 1 thread, finish + write s/case) and, per run, where the models waited (before
the first batch, between batches, after the last). Build time (weights load; ONNX export when not cached yet)
is excluded from every rate. As ``ctzoo infer``, the benchmark keeps freed memory for reuse
(:mod:`ctzoo.inference.allocator`) before it measures anything, the baseline included (the JSON's
``machine.freed_memory_kept``).

    python benchmarks/infer.py [--model recistnet-mini] [--backends torch,onnx] [--device auto] [--slices 100]
                               [--cases 6] [--repeats 3] [--batch-size 8] [--workers N] [--threads N]
                               [--precision fp32|bf16] [--compile] [--input nifti|dicom|j2k]
                               [--decode gdcm|nvimgcodec|auto] [--preprocess-on readers|model]
                               [--out benchmarks/results/infer.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import tqdm

from ctzoo.datasets.samples import fetch_samples
from ctzoo.export.repository import ensure_graphs
from ctzoo.inference.allocator import keep_freed_memory
from ctzoo.inference.backends import make_backend
from ctzoo.inference.inputs import CaseInput
from ctzoo.inference.pipeline import PipelineOptions, run_pipeline
from ctzoo.inference.schedule import choose_schedule, default_readers
from ctzoo.inference.start_method import worker_start_method
from ctzoo.inference.tasks import ModelTask, bundle_task
from ctzoo.io import read_volume
from ctzoo.models import load_bundle

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance, versions  # noqa: E402

SOURCE = "example_ct.nii.gz"


# ------------------------------------------------------------------------------------------------ input


def build_input(folder: Path, slices: int, cases: int, form: str = "nifti") -> tuple[list[CaseInput], dict]:
    """``cases`` copies of the sample CT resampled to 512 x 512 x ``slices`` over its own field of view, as NIfTI
    files or (``form`` dicom / j2k) DICOM series folders."""
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
    start = time.perf_counter()
    if form == "nifti":
        first = folder / "case000.nii.gz"
        sitk.WriteImage(resampled, str(first), useCompression=True)
    else:
        first = write_dicom_series(resampled, folder / "case000", j2k=form == "j2k")
    write_s = time.perf_counter() - start
    inputs = [CaseInput("case000", first)]
    for k in range(1, cases):
        path = folder / f"case{k:03d}{'.nii.gz' if form == 'nifti' else ''}"
        (shutil.copyfile if form == "nifti" else shutil.copytree)(first, path)
        inputs.append(CaseInput(path.name.removesuffix(".nii.gz"), path))
    description = {
        "source": f"TotalSegmentator 2.18.0 sample {SOURCE} (real CT, Apache-2.0)", "source_path": str(source),
        "original_size": old_size.tolist(), "original_spacing_mm": old_spacing.tolist(),
        "size": new_size.tolist(), "spacing_mm": np.round(new_spacing, 4).tolist(),
        "resampling": "SimpleITK linear over the same field of view, rounded to int16",
        "format": {"nifti": "NIfTI int16, gzip (.nii.gz)", "dicom": "DICOM series, uncompressed",
                   "j2k": "DICOM series, JPEG 2000 lossless"}[form],
        "file_mb": round(sum(p.stat().st_size for p in ([first] if first.is_file() else first.iterdir())) / 2**20, 1),
        "write_s": round(write_s, 2), "cases": cases,
    }
    return inputs, description


def write_dicom_series(image: sitk.Image, folder: Path, j2k: bool) -> Path:
    """``image`` (int16 HU) as an axial CT series in ``folder``: the embedded sample's first slice as the header
    template, stored = HU + 1024 (unsigned, intercept -1024, as the sample), new UIDs, positions along z."""
    import pydicom

    from ctzoo.datasets.samples import sample_ct_dicom

    folder.mkdir()
    template = pydicom.dcmread(sorted(p for p in sample_ct_dicom().iterdir() if p.name.startswith("CT."))[0])
    template.decompress()
    hu = sitk.GetArrayFromImage(image)  # (z, y, x)
    spacing, origin = image.GetSpacing(), image.GetOrigin()
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for k, plane in enumerate(hu):
        ds = copy.deepcopy(template)  # compress() changes the file meta, which a shallow copy shares
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber, ds.ImageOrientationPatient = k + 1, [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[0]], spacing[2]
        ds.Rows, ds.Columns = plane.shape
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.clip(plane.astype(np.int32) + 1024, 0, 4095).astype(np.uint16).tobytes()
        if j2k:
            ds.compress(pydicom.uid.JPEG2000Lossless)
        ds.save_as(folder / f"{k:04d}.dcm")
    return folder


def decode_rate(case: CaseInput, decoder: str | None) -> float:
    """Slices/s of reading one case alone with ``decoder`` on every thread (best of 3: the first starts it)."""
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        volume = read_volume(case.path, progress=False, decoder=decoder)
        best = max(best, volume.array.shape[0] / (time.perf_counter() - start))
    return best


# ------------------------------------------------------------------------------------------------ measures


def build_task(model_name: str, kind: str, device: str, threads: int, precision: str = "fp32",
               compile: bool = False):
    """(task, backend, build seconds, whether an ONNX export ran) — as ``model_task``, keeping the backend; the torch
    backend in ``precision`` (fp32 or bf16, unchecked: see benchmarks/precision.py) and compiled with ``compile``."""
    from ctzoo.datasets.samples import cache_dir

    exports = cache_dir() / "onnx"
    before = set(exports.iterdir()) if exports.is_dir() else set()
    start = time.perf_counter()
    bundle = load_bundle(model_name)
    if kind == "onnx":
        bundle = ensure_graphs(bundle)  # exported into the cache on first use, as ctzoo infer --backend onnx
    torch_options = {"precision": precision, "compile": compile} if kind == "torch" else {}
    backend = make_backend(bundle, kind, device, threads=threads, **torch_options)
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


def pipeline_rates(task: ModelTask, cases: list[CaseInput], options: PipelineOptions) -> dict:
    """``run_pipeline`` over ``cases``: end-to-end slices/s and, from its batch log, how busy the model was."""
    log: list = []
    options = dataclasses.replace(options, batch_log=log, overlay=False, progress=False)
    start_method = worker_start_method(options.workers, options.layout == "copies", options.copy_threads,
                                       task.runtime.get("backend"), options.decoder, options.preprocess_device)
    start = time.time()
    rows = run_pipeline(cases, task, options)
    end = time.time()
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"pipeline failed: {failed}")
    wall, total = end - start, sum(int(r["slices"]) for r in rows)
    models = max(options.workers, 1) if options.layout == "copies" else 1  # model instances running at once
    predict_s = sum(stop - begin for begin, stop, _, _ in log)
    per_slice = [(stop - begin) / count for begin, stop, count, _ in log if count]
    # where the models waited: for the first slices (fork, first read), between batches, after the last
    before, after = min(b for b, _, _, _ in log) - start, end - max(e for _, e, _, _ in log)
    return {"layout": options.layout, "workers": options.workers,
            "worker_start": start_method or (multiprocessing.get_start_method() if options.workers else None),
            "model_threads": options.copy_threads if options.layout == "copies" else None,
            "model_instances": models, "wall_s": wall, "slices": total, "end_to_end_slices_per_s": total / wall,
            "model_busy_fraction": predict_s / (wall * models),
            # all instances together, at the median batch's rate
            "predict_in_pipeline_slices_per_s": models / float(np.median(per_slice)),
            "predict_in_pipeline_pass_slices_per_s": sum(c for _, _, c, _ in log) / max(predict_s, 1e-9) * models,
            "model_idle_s": {"before_first_batch": before, "after_last_batch": after,
                             "between_batches": wall * models - predict_s - before - after},
            "reader_read_s_in_pipeline": [float(r["read_s"]) for r in rows]}


def median_of(samples: list[dict], key: str) -> float:
    return float(np.median([sample[key] for sample in samples]))


def measure(model_name: str, kind: str, device: str, cases: list[CaseInput], args, work: Path) -> dict:
    torch.set_num_threads(args.threads)
    task, backend, build_s, exported = build_task(model_name, kind, device, args.threads, args.precision, args.compile)
    device_used = getattr(backend, "device", device)
    reader = reader_costs(task, cases[0], args.threads)
    slices = reader["slices"]
    items = batches(slices, args.batch_size)
    model, outputs = rate(task.predict, items, device_used)
    heads = forward(backend)
    fwd = rate(heads, items, device_used, keep=False)[0] if heads is not None else model
    start = time.perf_counter()
    result = task.finish(reader["volume"], reader["context"], outputs)
    task.write(reader["volume"], result, work / f"single-{kind}-{device_used}", False, task.runtime)
    write_s = time.perf_counter() - start
    n = len(slices)
    # one process doing everything in turn, from the single-stage medians (no contention, no overheads)
    serial_s_per_slice = 1 / model["median"] + reader["preprocess_median_s"] + (reader["read_s"] + write_s) / n
    one_thread_task = task.replicate(1) if device_used == "cpu" else None  # what each copy runs (copies layout)
    torch.set_num_threads(args.threads)

    # ctzoo infer at its defaults (the schedule it picks for this device, these cases, this machine's cores)
    preprocess_device = device_used if args.preprocess_on == "model" else None
    schedule = choose_schedule(device_used, len(cases), can_copy=preprocess_device is None)
    here = task  # the main process runs the model when there is one copy (workers 0) or in the shared layout
    if schedule.threads not in (None, args.threads) and not (schedule.layout == "copies" and schedule.workers):
        here = task.replicate(schedule.threads)
    decoder = decoder_spec(args, device_used)
    runs = {  # name: (task in this process, options)
        "default": (here, PipelineOptions(out=work / "default", batch_size=args.batch_size, layout=schedule.layout,
                                          workers=schedule.workers, copy_threads=schedule.threads or 1,
                                          decoder=decoder, preprocess_device=preprocess_device)),
        # ctzoo infer --workers 0: read, preprocess, predict (args.threads) in turn in one process
        "serial": (task, PipelineOptions(out=work / "serial", batch_size=args.batch_size, layout="copies",
                                         workers=0, copy_threads=args.threads, decoder=decoder)),
        # one model (args.threads) fed by --workers reader processes: ctzoo infer's default before the copies
        "shared": (task, PipelineOptions(out=work / "shared", batch_size=args.batch_size, workers=args.workers,
                                         decoder=decoder, preprocess_device=preprocess_device)),
    }
    decode_alone = decode_rate(cases[0], decoder) if args.input != "nifti" else None
    samples = []  # each repeat measures the model alone and then every pipeline: a slow spell hits them alike
    for repeat in range(args.repeats):
        sample = {"model_only_slices_per_s": rate(task.predict, items, device_used, keep=False)[0]["median"]}
        if one_thread_task is not None:
            torch.set_num_threads(1)  # process-wide: the torch copy's thread count (ONNX Runtime's is its session's)
            sample["model_only_1_thread_slices_per_s"] = rate(one_thread_task.predict, items, "cpu",
                                                              keep=False)[0]["median"]
            torch.set_num_threads(args.threads)
        for name, (run_task, options) in runs.items():
            sample[name] = pipeline_rates(run_task, cases, options)
            torch.set_num_threads(args.threads)
        for name in runs:
            sample[f"{name}_ratio"] = sample[name]["end_to_end_slices_per_s"] / sample["model_only_slices_per_s"]
        sample["default_vs_serial"] = (sample["default"]["end_to_end_slices_per_s"]
                                       / sample["serial"]["end_to_end_slices_per_s"])
        samples.append(sample)
        print(f"    repeat {repeat + 1}/{args.repeats}: model-only {sample['model_only_slices_per_s']:.1f}, "
              + ", ".join(f"{name} {sample[name]['end_to_end_slices_per_s']:.1f}" for name in runs), flush=True)
    rates = {name: [s[name]["end_to_end_slices_per_s"] for s in samples] for name in runs}
    medians = {name: float(np.median(values)) for name, values in rates.items()}
    model_only = median_of(samples, "model_only_slices_per_s")
    bound = min(model_only, decode_alone) if decode_alone else model_only
    return {
        "backend": kind, "device": device_used, "model": model_name, "batch_size": args.batch_size,
        "runtime": task.runtime,
        "schedule": {"layout": schedule.layout, "workers": schedule.workers, "threads": schedule.threads,
                     "described": schedule.describe()},
        "model_threads": args.threads, "shared_readers": args.workers, "repeats": args.repeats,
        "build_s": round(build_s, 2), "onnx_exported": exported,
        # medians over the repeats; the table's rates
        "model_only_slices_per_s": model_only,
        "model_only_1_thread_slices_per_s": (median_of(samples, "model_only_1_thread_slices_per_s")
                                             if one_thread_task is not None else None),
        "end_to_end_slices_per_s": medians["default"], "serial_slices_per_s": medians["serial"],
        "shared_slices_per_s": medians["shared"],
        "ratio": median_of(samples, "default_ratio"), "serial_ratio": median_of(samples, "serial_ratio"),
        "shared_ratio": median_of(samples, "shared_ratio"),
        "default_vs_serial": median_of(samples, "default_vs_serial"),
        "min_default_vs_serial": min(s["default_vs_serial"] for s in samples),
        "default_busy": float(np.median([s["default"]["model_busy_fraction"] for s in samples])),
        "decoder": decoder or "gdcm", "decode_alone_slices_per_s": decode_alone,
        "preprocess_on": args.preprocess_on,
        "ratio_vs_bound": medians["default"] / bound,
        "samples": samples,
        # the first pass's single-stage costs (one process, no contention)
        "model_only_first_pass": model, "forward_only_slices_per_s": fwd["median"],
        "read_s_per_case": reader["read_s"], "preprocess_slices_per_s_1_thread": 1 / reader["preprocess_median_s"],
        "preprocess_pass_slices_per_s_1_thread": n / reader["preprocess_s"],
        "finish_write_s_per_case": write_s, "serial_from_stages_slices_per_s": 1 / serial_s_per_slice,
        "per_slice_ms": {"predict": 1000 / model["median"], "forward": 1000 / fwd["median"],
                         "read": 1000 * reader["read_s"] / n, "preprocess": 1000 * reader["preprocess_median_s"],
                         "finish_write": 1000 * write_s / n},
    }


# ------------------------------------------------------------------------------------------------ main


def decoder_spec(args, device: str) -> str | None:
    """The pipeline's decoder for ``--decode`` on ``device`` (as ctzoo infer chooses it; None: GDCM)."""
    from ctzoo.inference.decoding import choose_decoder

    choice = choose_decoder(args.decode, device)
    print(f"  decode on {device}: {choice.describe()}", flush=True)
    return choice.pipeline_decoder


def devices_for(requested: str) -> list[str]:
    if requested != "auto":
        return [requested]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def inference_libraries() -> dict:
    """The versions of what the inference path runs on beyond torch and numpy (for the JSON's provenance)."""
    import onnxruntime as ort

    return {**versions("onnxruntime", "SimpleITK"), "onnxruntime_providers": ort.get_available_providers()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="recistnet-mini")
    parser.add_argument("--backends", default="torch,onnx", help="comma-separated: torch, onnx")
    parser.add_argument("--device", default="auto", help="auto (the CPU, and CUDA when present), cpu or cuda")
    parser.add_argument("--slices", type=int, default=100, help="slices per case (default 100)")
    parser.add_argument("--cases", type=int, default=6, help="copies of the case in the pipeline runs (default 6)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="each repeat measures the model alone and every pipeline; medians (default 3)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=default_readers(),
                        help=f"reader processes of the shared-layout row (default: ctzoo infer's for that layout, "
                             f"here {default_readers()})")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="model threads: torch set_num_threads / ORT intra-op (default: the CPU count, as "
                             "ctzoo infer)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="the torch backend's precision (ctzoo infer --precision; default fp32)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the torch backend (ctzoo infer --compile)")
    parser.add_argument("--input", choices=["nifti", "dicom", "j2k"], default="nifti",
                        help="the cases' format: NIfTI, or DICOM series uncompressed / JPEG 2000 (default nifti)")
    parser.add_argument("--decode", choices=["auto", "gdcm", "nvimgcodec"], default="auto",
                        help="DICOM's JPEG 2000 decoder (ctzoo infer --decode; default auto)")
    parser.add_argument("--preprocess-on", choices=["readers", "model"], default="readers",
                        help="where the default and shared rows compute the network inputs (ctzoo infer "
                             "--preprocess-on; default readers)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "infer.json")
    args = parser.parse_args()
    # as ctzoo infer does before its pipeline: every row, the model-only baseline too, runs with freed memory kept,
    # and no tqdm monitor thread makes the pipeline start its workers from a fork server instead of forking them
    memory_kept = keep_freed_memory()
    tqdm.tqdm.monitor_interval = 0
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.preprocess_on == "model" and backends != ["torch"]:
        # checked before the input is built, as ctzoo infer does: ONNX Runtime takes its inputs from the CPU
        parser.error("--preprocess-on model feeds the PyTorch model on its device: use it with --backends torch")
    provenance = Provenance()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ctzoo-bench-infer-") as tmp:
        work = Path(tmp)
        (work / "cases").mkdir()
        cases, described = build_input(work / "cases", args.slices, args.cases, args.input)
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
                      f"{' (ONNX export included)' if row['onnx_exported'] else ''}; ctzoo infer's defaults: "
                      f"{row['schedule']['described']}", flush=True)
    recorded = provenance.record(**inference_libraries(), freed_memory_kept=memory_kept)  # the load as the rows end
    print(f"slices/s, medians of {args.repeats} repeats. model-only: task.predict alone on --threads threads (the "
          "baseline); 1 thread: the same on 1 thread; infer: ctzoo infer's defaults end to end; serial: ctzoo infer "
          "--workers 0 (one process: read, preprocess, predict in turn); shared: one model fed by reader processes; "
          "busy: share of the copies' time inside task.predict")
    print(f"{'backend':8s} {'device':6s} {'model-only':>10s} {'1 thread':>8s} {'infer':>6s} {'ratio':>6s} "
          f"{'busy':>5s} {'serial':>6s} {'ratio':>6s} {'infer/serial':>12s} {'shared':>6s} {'ratio':>6s}  schedule")
    for row in rows:
        one = row["model_only_1_thread_slices_per_s"]
        print(f"{row['backend']:8s} {row['device']:6s} {row['model_only_slices_per_s']:10.2f} "
              f"{one if one is not None else float('nan'):8.2f} {row['end_to_end_slices_per_s']:6.2f} "
              f"{row['ratio']:5.2f}x {row['default_busy']:5.0%} {row['serial_slices_per_s']:6.2f} "
              f"{row['serial_ratio']:5.2f}x {row['default_vs_serial']:11.2f}x {row['shared_slices_per_s']:6.2f} "
              f"{row['shared_ratio']:5.2f}x  {row['schedule']['described']}")
        if row["decode_alone_slices_per_s"] is not None:
            print(f"{'':15s} decode alone ({row['decoder']}) {row['decode_alone_slices_per_s']:.1f} slices/s; "
                  f"infer / min(model-only, decode alone) {row['ratio_vs_bound']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "infer", "model": args.model, "slices": args.slices,
                                    "cases": args.cases, "batch_size": args.batch_size, "workers": args.workers,
                                    "threads": args.threads, "input": described, "rows": rows,
                                    "provenance": recorded}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
