"""How fast ctzoo reads a DICOM series, against SimpleITK's own series reader, in one run.

Cases: the embedded sample (JPEG 2000 lossless, 20 x 512 x 512) and the same slices re-encoded
uncompressed, each repeated to a longer series (default 100 slices; copies shifted along z).
Rows: SimpleITK ImageSeriesReader (baseline: one call, GDCM, pixel type from the first file),
ctzoo with 1 decode thread, ctzoo with N threads; for JPEG 2000 also ctzoo with nvImageCodec's batched
decoder (ctzoo infer --decode) on each ``--nvimgcodec`` device: ``cpu`` (its CPU backend) and, on a GPU,
``cuda`` (nvJPEG2000), its first call (decoder start-up) left out. Ratios are slices/s over the baseline's.

    python benchmarks/dicom_read.py [--slices 100] [--repeat 3] [--nvimgcodec cpu,cuda]
                                    [--out benchmarks/results/dicom_read.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pydicom
import SimpleITK as sitk

from ctzoo.datasets.samples import sample_ct_dicom
from ctzoo.io.dicom_scan import DicomWarning, choose_series, scan_folder
from ctzoo.io.dicom_series import volume_from_series

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance, versions  # noqa: E402


def build_series(folder: Path, slices: int, decompress: bool) -> None:
    """Copy the sample's slices (shifted along z, fresh UIDs) until the series has ``slices`` files."""
    sources = sorted(p for p in sample_ct_dicom().iterdir() if p.name.startswith("CT."))
    series_uid = pydicom.uid.generate_uid()
    for k in range(slices):
        ds = pydicom.dcmread(sources[k % len(sources)])
        ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) - 40.0 * (k // len(sources))
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, "1.2.826.0.1.3680043.8.498.7"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        if decompress:
            ds.decompress()
        ds.save_as(folder / f"{k:05d}.dcm")


def time_best(function, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def sitk_series_reader(folder: Path) -> None:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.Execute()


def ctzoo_reader(folder: Path, workers: int, decoder: str | None = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DicomWarning)
        series = choose_series(scan_folder(folder, progress=False))
        volume_from_series(series, workers=workers, progress=False, decoder=decoder)


def nvimgcodec_devices(requested: str) -> list[str]:
    """The ``--nvimgcodec`` devices this machine can run: none without the package, cuda only with a GPU."""
    from ctzoo.io.nvimgcodec_decode import nvimgcodec_installed

    wanted = [d for d in requested.split(",") if d]
    if not nvimgcodec_installed():
        return []
    import torch

    return [d for d in wanted if d == "cpu" or (d.startswith("cuda") and torch.cuda.is_available())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=100, help="slices per series (default 100)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the best is kept (default 3)")
    parser.add_argument("--nvimgcodec", default="cpu,cuda",
                        help="devices for nvImageCodec rows, where installed and present (default cpu,cuda)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dicom_read.json")
    args = parser.parse_args()
    provenance = Provenance()
    threads = os.cpu_count() or 1
    devices = nvimgcodec_devices(args.nvimgcodec)
    rows = []
    for encoding, decompress in (("JPEG 2000 lossless", False), ("uncompressed", True)):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            build_series(folder, args.slices, decompress)
            baseline = time_best(lambda: sitk_series_reader(folder), args.repeat)
            cases = [("SimpleITK ImageSeriesReader (baseline)", baseline),
                     ("ctzoo read, 1 thread", time_best(lambda: ctzoo_reader(folder, 1), args.repeat)),
                     (f"ctzoo read, {threads} threads", time_best(lambda: ctzoo_reader(folder, threads), args.repeat))]
            for device in devices if not decompress else ():
                decoder = f"nvimgcodec:{device}"
                ctzoo_reader(folder, threads, decoder)  # the decoder starts once per process
                cases.append((f"ctzoo read, {threads} threads, nvImageCodec {device}",
                              time_best(lambda: ctzoo_reader(folder, threads, decoder), args.repeat)))
            for name, seconds in cases:
                rows.append({"encoding": encoding, "reader": name, "seconds": seconds,
                             "slices_per_s": args.slices / seconds, "ratio_vs_baseline": baseline / seconds})
    print(f"{'encoding':20s} {'reader':46s} {'slices/s':>10s} {'vs baseline':>12s}")
    for row in rows:
        print(f"{row['encoding']:20s} {row['reader']:46s} {row['slices_per_s']:10.1f} "
              f"{row['ratio_vs_baseline']:11.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "dicom_read", "slices": args.slices, "rows": rows,
                                    "provenance": provenance.record(**versions("SimpleITK", "pydicom"))},
                                   indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
