"""Pictures of a DeepLesion folder: the lesion-size histogram and key slices with their RECIST marks."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ctzoo.datasets.deeplesion.info_csv import SPLITS, LesionRow  # noqa: E402
from ctzoo.datasets.deeplesion.png_slices import read_png_hu, slice_path  # noqa: E402
from ctzoo.datasets.deeplesion.recist import points_from_measurement  # noqa: E402
from ctzoo.datasets.deeplesion.stats import long_axis_mm, type_shares  # noqa: E402
from ctzoo.io.atomic import atomic_path  # noqa: E402


def save_figure(figure, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically (temporary name, then rename) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary)
    finally:
        plt.close(figure)
    return path


def plot_size_histogram(rows: list[LesionRow], path: str | Path) -> Path:
    """Histogram of long-axis diameters (mm), stacked by split, with RECIST's 10 mm line."""
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    sizes = [[long_axis_mm(r) for r in rows if r.train_val_test == code] for code in SPLITS]
    top = max([60.0] + [max(s) for s in sizes if s])
    axis.hist(sizes, bins=np.linspace(0, top, 25), stacked=True, label=list(SPLITS.values()))
    axis.axvline(10, color="k", linestyle="--", linewidth=1, label="RECIST 10 mm")
    axis.set_xlabel("long axis (mm)")
    axis.set_ylabel("lesions")
    axis.set_title(f"DeepLesion lesion sizes ({len(rows)} lesions)")
    axis.legend()
    figure.tight_layout()
    return save_figure(figure, path)


def plot_against_deeplesion(types: list[str], sizes_mm: list[float], reference: dict, path: str | Path,
                            label: str = "this dataset") -> Path:
    """Two panels: lesion-type shares and long-axis distribution of a dataset beside DeepLesion's
    (``reference`` from :func:`ctzoo.datasets.deeplesion.stats.deeplesion_reference`)."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    shares, theirs = type_shares(types), reference["type_shares"]
    names = list(theirs)
    x = np.arange(len(names))
    left.bar(x - 0.2, [100 * theirs[n] for n in names], 0.4, label="DeepLesion", color="0.6")
    left.bar(x + 0.2, [100 * shares[n] for n in names], 0.4, label=f"{label} ({len(types)} lesions)")
    left.set_xticks(x, names, rotation=30, ha="right")
    left.set_ylabel("% of typed lesions")
    left.set_title("lesion types")
    left.legend()
    bins = np.geomspace(2, 400, 25)
    right.hist(sizes_mm, bins=bins, density=True, alpha=0.7, label=f"{label} (median {np.median(sizes_mm):.1f} mm)")
    if reference["long_axis_mm"]:
        right.hist(reference["long_axis_mm"], bins=bins, density=True, histtype="step", color="k", linewidth=1.5,
                   label=f"DeepLesion (median {reference['median_long_axis_mm']:.1f} mm)")
    else:
        right.axvline(reference["median_long_axis_mm"], color="k", linestyle="--",
                      label=f"DeepLesion median ~{reference['median_long_axis_mm']:g} mm (published)")
    right.axvline(10, color="0.5", linestyle=":", linewidth=1, label="RECIST 10 mm")
    right.set_xscale("log")
    right.set_xlabel("long axis (mm, log scale)")
    right.set_ylabel("density")
    right.set_title("lesion sizes")
    right.legend(fontsize=8)
    figure.suptitle(f"{label} vs DeepLesion ({reference['source']})", fontsize=9)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_key_slices(images_root: str | Path, rows: list[LesionRow], out_dir: str | Path,
                    limit: int = 8) -> list[Path]:
    """One PNG per key slice (up to ``limit``): the slice in its DICOM window, long axes red, short axes
    green, centres as crosses and DeepLesion's boxes in yellow."""
    by_image: dict[str, list[LesionRow]] = defaultdict(list)
    for row in rows:
        by_image[row.file_name].append(row)
    written = []
    for name, lesions in sorted(by_image.items())[:limit]:
        first = lesions[0]
        hu = read_png_hu(slice_path(images_root, first.series_folder, first.key_slice_index))
        figure, axis = plt.subplots(figsize=(6, 6), dpi=100)
        axis.imshow(hu, cmap="gray", vmin=first.dicom_windows[0], vmax=first.dicom_windows[1])
        for row in lesions:
            points = points_from_measurement(row.measurement_coordinates)
            axis.plot(points[:2, 0], points[:2, 1], "r-", linewidth=1.2)
            axis.plot(points[2:4, 0], points[2:4, 1], "g-", linewidth=1.2)
            axis.plot(*points[4], "c+", markersize=8)
            x1, y1, x2, y2 = np.asarray(row.bounding_box) - 1.0
            axis.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="y", linewidth=0.8))
            axis.annotate(f"{row.lesion_type} {long_axis_mm(row):.0f}x"
                          f"{row.lesion_diameters_px[1] * row.spacing_mm_px[0]:.0f} mm",
                          (x2, y1), color="y", fontsize=7)
        axis.set_title(f"{name} ({first.split})", fontsize=9)
        axis.set_axis_off()
        figure.tight_layout()
        written.append(save_figure(figure, Path(out_dir) / name))
    return written
