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
from ctzoo.datasets.deeplesion.stats import long_axis_mm  # noqa: E402
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
