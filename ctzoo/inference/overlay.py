"""Overlay PNGs for a person to look at: detected lesions drawn on their CT slice, label contours on theirs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctzoo.io import Volume


def plot_detections(volume: Volume, document: dict[str, Any], path: str | Path,
                    window_hu: tuple[float, float] = (-175.0, 275.0), max_panels: int = 4) -> Path:
    """Draw the slices holding the best ``max_panels`` lesions of ``document`` (detections.json) on ``volume``.

    Long axes red, short axes green, centres as cyan crosses, each labelled with score and size in mm.
    With no lesion, the middle slice is drawn and says so. Slices are shown as stored (array row 0 on top), each
    titled as a radiologist finds it: ``InstanceNumber 12, z -804.5 mm (index 11)`` (:meth:`Volume.slice_label`).
    A sagittal or coronal input (``"slice_grid": "axial"``) is drawn on the axial slices the model ran on, as the
    document numbers them (:func:`ctzoo.io.reorient_lps`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctzoo.datasets.deeplesion.plots import save_figure

    if document.get("slice_grid") == "axial":
        from ctzoo.io import reorient_lps

        volume = reorient_lps(volume)
    lesions = sorted(document["lesions"], key=lambda lesion: -lesion["score"])[:max_panels]
    slices = sorted({lesion["slice"] for lesion in lesions}) or [volume.array.shape[0] // 2]
    figure, axes = plt.subplots(1, len(slices), figsize=(5 * len(slices), 5.3), dpi=100, squeeze=False)
    for axis, k in zip(axes[0], slices):
        axis.imshow(volume.array[k], cmap="gray", vmin=window_hu[0], vmax=window_hu[1])
        for lesion in (lesion for lesion in lesions if lesion["slice"] == k):
            points = _drawn_points(volume, document, lesion)
            axis.plot(points[:2, 0], points[:2, 1], "r-", linewidth=1.5)
            axis.plot(points[2:4, 0], points[2:4, 1], "g-", linewidth=1.5)
            axis.plot(*points[4], "c+", markersize=9)
            axis.annotate(f"{lesion['score']:.2f}  {lesion['long_axis_mm']:.0f} x {lesion['short_axis_mm']:.0f} mm",
                          points[:4].max(axis=0) + 4, color="yellow", fontsize=8)
        axis.set_title(volume.slice_label(k) + ("" if lesions else "\nno lesion above the threshold"), fontsize=10)
        axis.set_axis_off()
    figure.suptitle(f"{document.get('model', '')} {document.get('model_version', '')}", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def _drawn_points(volume: Volume, document: dict[str, Any], lesion: dict[str, Any]) -> np.ndarray:
    """The lesion's five points as (column, row) of the slice drawn: the input's voxels, or on the axial grid of a
    sagittal or coronal input the points in mm mapped onto it."""
    if document.get("slice_grid") != "axial":
        return np.asarray(lesion["points_voxel"], dtype=float)[:, :2]
    to_grid = np.linalg.inv(volume.affine_lps)
    return (np.asarray(lesion["points_mm"], dtype=float) @ to_grid[:3, :3].T + to_grid[:3, 3])[:, :2]


def plot_seg_overlay(image: np.ndarray, truth: np.ndarray, predictions: Mapping[str, np.ndarray],
                     class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """One panel per prediction: the CT slice ``(H, W)`` in [0, 1], predicted contours solid, true ones dashed,
    one colour per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from ctzoo.datasets.deeplesion.plots import save_figure

    colours = plt.get_cmap("tab10").colors
    figure, axes = plt.subplots(1, len(predictions), figsize=(5 * len(predictions), 5.6), dpi=100, squeeze=False)
    for axis, (name, predicted) in zip(axes[0], predictions.items()):
        axis.imshow(image, cmap="gray", vmin=0, vmax=1)
        for c in range(1, len(class_names) + 1):
            colour = colours[(c - 1) % len(colours)]
            for labels, style in ((truth, "--"), (predicted, "-")):
                if (labels == c).any():
                    axis.contour((labels == c).astype(float), levels=[0.5], colors=[colour], linestyles=style,
                                 linewidths=1.2)
        axis.set_title(name, fontsize=10)
        axis.set_axis_off()
    handles = [Line2D([], [], color=colours[(c - 1) % len(colours)], label=n) for c, n in enumerate(class_names, 1)]
    handles.append(Line2D([], [], color="w", linestyle="-", label="predicted"))
    if truth.any():  # inference has no truth to draw
        handles.append(Line2D([], [], color="w", linestyle="--", label="truth"))
    columns = min(len(handles), 4 * len(predictions))  # wraps on narrow (one-panel) figures instead of clipping
    figure.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, facecolor="0.3")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.04 * math.ceil(len(handles) / columns) + 0.01, 1, 1))
    return save_figure(figure, path)
