"""DeepLesion's detection evaluation (FROC), as NIH's 3DCE and MULAN code computes it.

Reference: ``rsummers11/CADLab`` ``lesion_detector_3DCE/rcnn/utils/evaluation.py`` and
``MULAN_universal_lesion_analysis/maskrcnn/data/datasets/evaluation/DeepLesion/detection_eval.py``.

* IoU uses the VOC "+1" pixel convention (a box covers pixels x1..x2 inclusive).
* All detections of all images are pooled and walked down by score. A detection whose IoU with an
  *unhit* ground truth (GT) of its own image is >= the threshold is a true positive; one whose IoU
  with every GT of its image is below it (or whose image has no GT) is a false positive (FP); one that
  overlaps only already-hit GTs is *neither*.
* Sensitivity = hit GTs / all GTs; FP rate = FPs / number of images (lesion-free images included).
  A GT that was cut off the evaluated image (``off_image``) has no box and counts as missed: DeepLesion
  scores every lesion of every key slice.
* Sensitivity at the report points [0.5, 1, 2, 4, 8, 16] FPs/image comes from ``scipy`` ``interp1d``
  on the (FP rate, sensitivity) curve, exactly as MULAN's ``sens_at_FP`` (see :func:`sensitivity_at`);
  MULAN also reports the mean over 0.5-4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.interpolate import interp1d

from ctzoo.io.atomic import atomic_path

REPORT_FPS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
MEAN_FPS = (0.5, 1.0, 2.0, 4.0)
MATCH_MODES = ("nih", "max_iou")


def box_iou_voc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a`` (N, 4) and ``b`` (M, 4), x1, y1, x2, y2 inclusive -> (N, M).

    VOC "+1" convention as 3DCE/MULAN: width = x2 - x1 + 1, so [0, 0, 9, 9] covers 100 pixels and two
    boxes sharing the column x = 9 overlap by one pixel column.
    """
    a, b = _as_boxes(a, "a"), _as_boxes(b, "b")
    ix = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1.0
    iy = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1.0
    inter = np.maximum(ix, 0.0) * np.maximum(iy, 0.0)
    area_a = (a[:, 2] - a[:, 0] + 1.0) * (a[:, 3] - a[:, 1] + 1.0)
    area_b = (b[:, 2] - b[:, 0] + 1.0) * (b[:, 3] - b[:, 1] + 1.0)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _as_boxes(boxes, name: str) -> np.ndarray:
    """Any box array (N, 4), or an empty one of any shape -> float64 (N, 4)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: boxes must have shape (N, 4), got {boxes.shape}")
    return boxes


def _pool(detections: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All detections, sorted by score descending (ties: image order, then detection order).

    Returns (image index (D,), detection index within its image (D,), box (D, 4)).
    """
    images, indices, boxes, scores = [], [], [], []
    for i, det in enumerate(detections):
        b = _as_boxes(det.get("boxes", ()), f"detections[{i}]")
        s = np.asarray(det.get("scores", ()), dtype=np.float64).reshape(-1)
        if len(s) != len(b) or not np.all(np.isfinite(s)):
            raise ValueError(f"detections[{i}]: need one finite score per box ({len(b)} boxes, {len(s)} scores)")
        if not np.all(np.isfinite(b)):  # a NaN IoU is neither >= nor < the threshold: neither hit nor FP
            bad = int(np.flatnonzero(~np.isfinite(b).all(axis=1))[0])
            raise ValueError(f"detections[{i}]: box {bad} has a non-finite coordinate ({b[bad].tolist()})")
        images.append(np.full(len(b), i, dtype=np.int64))
        indices.append(np.arange(len(b), dtype=np.int64))
        boxes.append(b)
        scores.append(s)
    if not images:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4))
    order = np.argsort(-np.concatenate(scores), kind="stable")
    return np.concatenate(images)[order], np.concatenate(indices)[order], np.vstack(boxes)[order]


def froc_curve(detections: list[dict], ground_truth: list[dict], iou_threshold: float = 0.5, match: str = "nih"):
    """Walk the pooled detections down by score: the FROC curve and the (image, detection, GT) hits.

    ``match="nih"`` (3DCE/MULAN): a detection hits *every* unhit GT of its image with IoU >= threshold
    (more than one only where GTs overlap each other heavily). ``match="max_iou"``: only the unhit GT
    of maximum IoU. Either way an overlap with hit GTs only is neither TP nor FP.

    Returns ``fps`` (D + 1,) FP/image and ``sens`` (D + 1,) after each pooled detection, both
    preceded by the empty operating point (0, 0), and ``hits`` [(image, detection, gt), ...].
    """
    if match not in MATCH_MODES:
        raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}")
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection entries but {len(ground_truth)} ground-truth entries")
    gts = [_as_boxes(g.get("boxes", ()), f"ground_truth[{i}]") for i, g in enumerate(ground_truth)]
    num_gt = sum(len(g) for g in gts) + sum(_off_image(g, i) for i, g in enumerate(ground_truth))
    if num_gt == 0:
        raise ValueError("ground truth has no lesion: sensitivity is undefined")
    hit = [np.zeros(len(g), dtype=bool) for g in gts]
    images, indices, _ = _pool(detections)
    ious = [box_iou_voc(d.get("boxes", ()), g) for d, g in zip(detections, gts)]  # per image (D_i, G_i)
    n_hits, n_fp, tps, fps, hits = 0, 0, [0], [0], []
    for image, index in zip(images, indices):
        overlaps = ious[image][index]
        if len(overlaps) == 0 or overlaps.max() < iou_threshold:
            n_fp += 1
        else:
            new = np.flatnonzero((overlaps >= iou_threshold) & ~hit[image])
            if match == "max_iou" and len(new):
                new = new[[np.argmax(overlaps[new])]]
            hit[image][new] = True
            n_hits += len(new)
            hits += [(int(image), int(index), int(g)) for g in new]
        tps.append(n_hits)
        fps.append(n_fp)
    return np.asarray(fps, dtype=float) / len(gts), np.asarray(tps, dtype=float) / num_gt, hits


def _off_image(truth: dict, i: int) -> int:
    """How many lesions of image ``i`` were cut off the evaluated image (``off_image``, default 0): missed."""
    count = truth.get("off_image", 0)
    if int(count) != count or count < 0:
        raise ValueError(f"ground_truth[{i}]: off_image must be a count >= 0, got {count!r}")
    return int(count)


def sensitivity_at(curve_fps: np.ndarray, curve_sens: np.ndarray, fps) -> np.ndarray:
    """Sensitivity (K,) at FP rates ``fps`` (K,) > 0 on a curve from :func:`froc_curve` (P,), as MULAN.

    * Up to the curve's last FP rate: MULAN's call, ``interp1d(curve_fps, curve_sens)`` (linear; no
      extrapolation, float64, so scipy evaluates it with ``numpy.interp``). Each detection adds at most
      one FP and an FP adds no hit, so this is a step: the sensitivity reached before the
      (floor(f * num_images) + 1)-th FP, i.e. with at most f * num_images FPs. At a rate the curve
      reaches exactly (f * num_images an integer) the *last* point there counts.
    * Beyond the last FP rate: the last sensitivity reached (MULAN).
    * Below the first detection's FP rate (only when the top-scored detection is a FP): 0, from the
      (0, 0) start of the curve; that is also the first detection's own sensitivity.

    3DCE differs: ``fill_value="extrapolate"`` takes scipy's other code path, which at an exactly-reached
    rate takes the *first* point (dropping hits ranked between that FP and the next) and extrapolates
    linearly past the end (inf or values outside [0, 1]).
    """
    fps = np.asarray(fps, dtype=np.float64).reshape(-1)
    if np.any(~(fps > 0)):
        raise ValueError(f"FP rates must be > 0, got {fps.tolist()}")
    out = np.full(len(fps), float(curve_sens[-1]))
    inside = fps <= curve_fps[-1]
    if inside.any():
        out[inside] = interp1d(curve_fps, curve_sens, assume_sorted=True)(fps[inside])
    return out


def _axis_errors(hits, detections, ground_truth) -> dict:
    """Absolute long/short-axis errors (mm) over hits where both sides give ``diameters_mm`` (., 2)."""
    errors = []
    for image, index, gt in hits:
        det_d, gt_d = detections[image].get("diameters_mm"), ground_truth[image].get("diameters_mm")
        if det_d is not None and gt_d is not None:
            det_row = np.asarray(det_d, dtype=np.float64).reshape(-1, 2)[index]
            errors.append(np.abs(det_row - np.asarray(gt_d, dtype=np.float64).reshape(-1, 2)[gt]))
    e = np.asarray(errors, dtype=np.float64).reshape(-1, 2)
    stat = (lambda f, col: float(f(e[:, col])) if len(e) else math.nan)  # noqa: E731
    return {"long_mean": stat(np.mean, 0), "long_median": stat(np.median, 0),
            "short_mean": stat(np.mean, 1), "short_median": stat(np.median, 1), "count": len(e)}


@dataclass
class FrocResult:
    """FROC of one detector on one test set.

    ``curve_fps`` / ``curve_sensitivity`` (D + 1,): the full curve, the empty operating point (0, 0)
    first, then one point per pooled detection. ``axis_errors_mm``: long/short mean and median absolute
    error (mm) over hits with diameters on both sides, NaN when ``count`` is 0.
    """

    fps_per_image: list[float]
    sensitivities: list[float]
    mean_sensitivity_0p5_to_4: float
    curve_fps: np.ndarray
    curve_sensitivity: np.ndarray
    num_images: int
    num_lesions: int
    axis_errors_mm: dict = field(default_factory=dict)
    iou_threshold: float = 0.5
    num_detections: int = 0
    num_lesion_free: int = 0  # images without a lesion (DeepLesion's key-slice protocol has none)
    num_off_image: int = 0  # lesions cut off the evaluated image: in num_lesions, counted as missed

    def table(self) -> str:
        """An aligned text table: sensitivity (%) at each report point, the 0.5-4 mean, axis errors."""
        heads = [f"{f:g}" for f in self.fps_per_image] + ["mean 0.5-4"]
        cells = [f"{100 * s:.2f}" for s in self.sensitivities] + [f"{100 * self.mean_sensitivity_0p5_to_4:.2f}"]
        widths = [max(len(h), len(c)) for h, c in zip(heads, cells)]
        lesion_free = f" ({self.num_lesion_free} lesion-free)" if self.num_lesion_free else ""
        off_image = f" ({self.num_off_image} off the evaluated image, missed)" if self.num_off_image else ""
        lines = [f"FROC, IoU >= {self.iou_threshold:g}: {self.num_images} images{lesion_free}, {self.num_lesions} "
                 f"lesions{off_image}, {self.num_detections} detections",
                 "FPs per image    " + "  ".join(h.rjust(w) for h, w in zip(heads, widths)),
                 "Sensitivity (%)  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths))]
        ax = self.axis_errors_mm
        if ax.get("count"):
            lines.append(f"Axis error on {ax['count']} hits (mm): long mean {ax['long_mean']:.2f}, median "
                         f"{ax['long_median']:.2f}; short mean {ax['short_mean']:.2f}, median {ax['short_median']:.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-friendly: plain lists, ints and floats; NaN axis errors become None."""
        clean = (lambda v: None if isinstance(v, float) and math.isnan(v) else v)  # noqa: E731
        return {"fps_per_image": [float(f) for f in self.fps_per_image],
                "sensitivities": [float(s) for s in self.sensitivities],
                "mean_sensitivity_0p5_to_4": float(self.mean_sensitivity_0p5_to_4),
                "curve_fps": np.asarray(self.curve_fps, dtype=float).tolist(),
                "curve_sensitivity": np.asarray(self.curve_sensitivity, dtype=float).tolist(),
                "num_images": int(self.num_images), "num_lesions": int(self.num_lesions),
                "axis_errors_mm": {k: clean(v) for k, v in self.axis_errors_mm.items()},
                "iou_threshold": float(self.iou_threshold), "num_detections": int(self.num_detections),
                "num_lesion_free": int(self.num_lesion_free), "num_off_image": int(self.num_off_image)}


def froc(detections: list[dict], ground_truth: list[dict], iou_threshold: float = 0.5, fps=REPORT_FPS,
         match: str = "nih") -> FrocResult:
    """DeepLesion FROC: sensitivity at ``fps`` FPs per image, the 0.5-4 mean, the curve, axis errors.

    ``detections[i]`` / ``ground_truth[i]`` describe test image i (same order, same length):
    ``{"boxes": (D, 4) x1, y1, x2, y2, "scores": (D,), "diameters_mm": (D, 2) long, short (optional)}``
    and ``{"boxes": (G, 4), "diameters_mm": (G, 2) (optional), "off_image": int (optional)}``, ``off_image`` the
    image's lesions cut off the evaluated image: missed, in the sensitivity denominator. Images without lesions
    (G = 0, none off the image) are allowed and count in the FP-rate denominator (number of images); each of
    their detections is a FP.
    DeepLesion's official test set has none, nor do ctzoo's val and test sets unless asked for. Raises
    ValueError when there is no lesion at all. Ties in score keep image order, then detection order (a stable sort;
    NIH's ``argsort()[::-1]`` leaves tie order unspecified). ``match``: see :func:`froc_curve`.
    Interpolation, including beyond the curve's end: see :func:`sensitivity_at`.
    """
    curve_fps, curve_sens, hits = froc_curve(detections, ground_truth, iou_threshold, match)
    report = sensitivity_at(curve_fps, curve_sens, fps)
    off_image = [_off_image(g, i) for i, g in enumerate(ground_truth)]
    lesions_per_image = [len(_as_boxes(g.get("boxes", ()), "gt")) + off for g, off in zip(ground_truth, off_image)]
    return FrocResult(
        fps_per_image=[float(f) for f in np.asarray(fps, dtype=float).reshape(-1)],
        sensitivities=[float(s) for s in report],
        mean_sensitivity_0p5_to_4=float(np.mean(sensitivity_at(curve_fps, curve_sens, MEAN_FPS))),
        curve_fps=curve_fps, curve_sensitivity=curve_sens, num_images=len(ground_truth),
        num_lesions=sum(lesions_per_image), axis_errors_mm=_axis_errors(hits, detections, ground_truth),
        iou_threshold=float(iou_threshold), num_detections=len(curve_fps) - 1,
        num_lesion_free=lesions_per_image.count(0), num_off_image=sum(off_image))


def plot_froc(result, path: str | Path) -> Path:
    """FROC curve(s) as a PNG at ``path``, written atomically (temporary name, then os.replace).

    ``result``: a :class:`FrocResult` or a list of ``(label, FrocResult)``. x: FPs per image, log
    scale 0.125-32; y: sensitivity 0-1; markers at the report points; beyond a curve's last FP rate a
    dotted line holds its last sensitivity (what the report points use); the legend gives each mean
    sensitivity over 0.5-4 FPs.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = [("detector", result)] if isinstance(result, FrocResult) else list(result)
    figure = Figure(figsize=(6, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    for label, res in curves:
        x, y = np.asarray(res.curve_fps, dtype=float), np.asarray(res.curve_sensitivity, dtype=float)
        line, = axis.plot(np.maximum(x, 1e-3), y, linewidth=1.5,
                          label=f"{label} (mean 0.5-4 FPs: {100 * res.mean_sensitivity_0p5_to_4:.2f}%)")
        if x[-1] < 32:
            axis.plot([max(x[-1], 1e-3), 32], [y[-1], y[-1]], linestyle=":", color=line.get_color())
        axis.plot(res.fps_per_image, res.sensitivities, "o", color=line.get_color(), markersize=5, clip_on=False)
    axis.set_xscale("log", base=2)
    axis.set_xlim(0.125, 32)
    axis.set_ylim(0, 1)
    axis.set_xticks([0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32], ["1/8", "1/4", "0.5", "1", "2", "4", "8", "16", "32"])
    axis.set_xlabel("false positives per image")
    axis.set_ylabel("sensitivity")
    axis.set_title("FROC")
    axis.grid(True, which="major", alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return path
