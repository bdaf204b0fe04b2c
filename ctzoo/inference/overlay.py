"""Overlay PNGs: detected lesions drawn on their CT slice, for a person to look at."""

from __future__ import annotations

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
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctzoo.datasets.deeplesion.plots import save_figure

    lesions = sorted(document["lesions"], key=lambda lesion: -lesion["score"])[:max_panels]
    slices = sorted({lesion["slice"] for lesion in lesions}) or [volume.array.shape[0] // 2]
    figure, axes = plt.subplots(1, len(slices), figsize=(5 * len(slices), 5.3), dpi=100, squeeze=False)
    for axis, k in zip(axes[0], slices):
        axis.imshow(volume.array[k], cmap="gray", vmin=window_hu[0], vmax=window_hu[1])
        for lesion in (lesion for lesion in lesions if lesion["slice"] == k):
            points = np.asarray(lesion["points_voxel"])[:, :2]
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
