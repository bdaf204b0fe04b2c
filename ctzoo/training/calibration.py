"""Does a detector's score mean what it says? Reliability, expected calibration error and operating points.

A detection is *correct* when its box overlaps a lesion of its own image with IoU >= 0.5 (DeepLesion's hit
criterion, :func:`ctzoo.training.froc.box_iou_voc`); a second detection of the same lesion is correct too here,
because calibration asks "how often is a box with this score on a lesion", not "how many lesions were found".

* :func:`reliability`: detections binned by score (10 equal-width bins by default); per bin the mean score,
  the fraction correct and the count; ECE = sum over bins of count / total x |fraction correct - mean score|.
* :func:`threshold_for_fp_rate`: the lowest score threshold at which the split's FROC curve stays at or below a
  stated number of false positives per image; :func:`operating_points` reports it for several rates with the
  sensitivity there. Chosen on *val*, it becomes a model's operating point.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ctzoo.io.atomic import atomic_path
from ctzoo.training.froc import box_iou_voc, froc_curve

HIT_IOU = 0.5
#: False positives per image at which ``ctzoo eval`` reports the score threshold (choose one on val).
OPERATING_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0)


def detection_correctness(detections: list[dict], truth: list[dict],
                          iou_threshold: float = HIT_IOU) -> tuple[np.ndarray, np.ndarray]:
    """Every detection's score (D,) and whether it lies on a lesion of its image (D,) bool."""
    scores, correct = [], []
    for det, gt in zip(detections, truth, strict=True):
        boxes = np.asarray(det.get("boxes", ()), dtype=np.float64).reshape(-1, 4)
        gt_boxes = np.asarray(gt.get("boxes", ()), dtype=np.float64).reshape(-1, 4)
        scores.append(np.asarray(det.get("scores", ()), dtype=np.float64).reshape(-1))
        if len(gt_boxes) == 0 or len(boxes) == 0:
            correct.append(np.zeros(len(boxes), bool))
        else:
            correct.append(box_iou_voc(boxes, gt_boxes).max(axis=1) >= iou_threshold)
    if not scores:
        return np.zeros(0), np.zeros(0, bool)
    return np.concatenate(scores), np.concatenate(correct)


def reliability(scores: np.ndarray, correct: np.ndarray, bins: int = 10, min_score: float = 0.0) -> dict[str, Any]:
    """Reliability table and ECE of detections with ``scores`` >= ``min_score`` (see the module docstring)."""
    keep = scores >= min_score
    scores, correct = scores[keep], correct[keep]
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        if count:
            mean_score, accuracy = float(scores[inside].mean()), float(correct[inside].mean())
            ece += count / len(scores) * abs(accuracy - mean_score)
        else:
            mean_score = accuracy = None
        rows.append({"low": round(float(edges[b]), 3), "high": round(float(edges[b + 1]), 3), "count": count,
                     "mean_score": mean_score, "fraction_correct": accuracy})
    return {"bins": rows, "ece": round(ece, 4), "detections": int(len(scores)), "min_score": min_score}


def _pooled_curve(detections: list[dict], truth: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every detection's score, descending as FROC pools them (D,), and the FP rate and sensitivity after each
    (D + 1,), starting from the empty operating point."""
    fps, sens, _ = froc_curve(detections, truth)
    scores = np.sort(np.concatenate([np.asarray(d.get("scores", ()), np.float64).reshape(-1)
                                     for d in detections] or [np.zeros(0)]))[::-1]
    return scores, fps, sens


def _threshold(scores: np.ndarray, fps: np.ndarray, fp_per_image: float) -> float:
    over = np.flatnonzero(fps[1:] > fp_per_image)  # fps[i + 1] is the rate after the i-th pooled detection
    if len(over) == 0:
        return float(scores[-1]) if len(scores) else 0.0
    first_bad = scores[over[0]]
    above = scores[scores > first_bad]
    # the next float32 above: detectors compare float32 scores, and a float64 step would round back onto first_bad
    return float(np.nextafter(np.float32(first_bad), np.float32(2.0))) if len(above) == 0 else float(above.min())


def threshold_for_fp_rate(detections: list[dict], truth: list[dict], fp_per_image: float) -> float:
    """The lowest score threshold whose FROC operating point has at most ``fp_per_image`` false positives per
    image (ties at the boundary score are kept out, so the rate is never exceeded). Just above the best score
    when even the best detection is already too many."""
    scores, fps, _ = _pooled_curve(detections, truth)
    return _threshold(scores, fps, fp_per_image)


def operating_points(detections: list[dict], truth: list[dict],
                     rates: tuple[float, ...] = OPERATING_FP_RATES) -> list[dict[str, float]]:
    """Per false-positive rate (per image): the threshold of :func:`threshold_for_fp_rate` rounded up to 4
    decimals (the value reported, which keeps to the rate too), and the FP rate and sensitivity of the
    detections scoring at least that: the pooled curve's point after the last of them."""
    scores, fps, sens = _pooled_curve(detections, truth)
    points = []
    for rate in rates:
        threshold = math.ceil(_threshold(scores, fps, rate) * 1e4) / 1e4
        kept = int((scores >= threshold).sum())  # a prefix of the pooled order
        points.append({"fp_per_image": rate, "score_threshold": threshold,
                       "achieved_fp_per_image": round(float(fps[kept]), 4), "sensitivity": round(float(sens[kept]), 4)})
    return points


def plot_reliability(table: dict[str, Any], path: Path, title: str) -> Path:
    """Reliability diagram (fraction correct against mean score per bin, bar width = bin) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    filled = [row for row in table["bins"] if row["count"]]
    ax.bar([r["low"] for r in filled], [r["fraction_correct"] for r in filled],
           width=[r["high"] - r["low"] for r in filled], align="edge", edgecolor="k", alpha=0.7,
           label="fraction on a lesion")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="detection score", ylabel="fraction of detections on a lesion",
           title=f"{title}\nECE {table['ece']:.3f} over {table['detections']} detections")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
