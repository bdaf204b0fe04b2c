"""The report's Group level: model performance by subgroup, with confidence intervals and a minimum count, and
clusters of similar lesions. Small pure functions over the cohort's files, each checkable by hand:

* :func:`threshold_at_fps`: the detector's score threshold giving at most ``fps`` false positives per key slice
  over the whole cohort (DeepLesion's matching: IoU >= 0.5 with an annotated box);
* :func:`detection_by_group`: per value of a lesion column, at that cohort-wide threshold, the sensitivity
  (lesions found / lesions, Wilson 95 % interval) and the false positives per key slice of its key slices;
* :func:`auc_by_group`: the gated model's mean one-vs-rest AUC on the group's test lesions, with a percentile
  bootstrap 95 % interval (lesions resampled), and the group's mean image weight (gate);
* :func:`clusters`: k-means (scipy) of the lesions' standardised image + context features, summarised.

A group under ``min_count`` (lesions for detection, test lesions for AUC) gets no metric, only its count and
``refused``: a proportion of three lesions is not a finding. ``unknown`` is a group like any other.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.cluster.vq import kmeans2

from ctzoo.cohort.gated import mean_auc
from ctzoo.io.projection import embedding
from ctzoo.training.froc import box_iou_voc

LESION_GROUPS = ("sex", "age_band", "thickness_band", "lesion_type")
MIN_COUNT = 10
BOOTSTRAP = 500
Z95 = 1.959964


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (NaNs for no trials)."""
    if trials == 0:
        return math.nan, math.nan
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def slice_matches(key_slice: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(scores (D,), hit (D, G))``: each finding's score and which annotated boxes it overlaps at IoU >= 0.5
    (boxes outside the evaluated frame, None, overlap nothing)."""
    scores = np.asarray(key_slice["scores"], dtype=np.float64).reshape(-1)
    truth = key_slice["truth_boxes"]
    hit = np.zeros((len(scores), len(truth)), dtype=bool)
    inside = [k for k, box in enumerate(truth) if box is not None]
    if len(scores) and inside:
        ious = box_iou_voc(np.asarray(key_slice["boxes"], dtype=np.float64).reshape(-1, 4),
                           np.asarray([truth[k] for k in inside], dtype=np.float64))
        hit[:, inside] = ious >= 0.5
    return scores, hit


def false_positives(key_slice: dict[str, Any], threshold: float) -> int:
    """Findings at or above ``threshold`` that overlap no annotated lesion."""
    scores, hit = slice_matches(key_slice)
    return int(((scores >= threshold) & ~hit.any(axis=1)).sum())


def threshold_at_fps(key_slices: Sequence[dict[str, Any]], fps: float = 4.0) -> float:
    """The lowest score threshold (among the findings' scores) at which the key slices hold at most ``fps``
    false positives each on average; +inf when even the top finding breaks it, the lowest score when none does."""
    pooled = [(score, not row.any()) for ks in key_slices for score, row in zip(*slice_matches(ks))]
    if not pooled:
        return math.inf
    allowed, spent, threshold = fps * len(key_slices), 0, math.inf
    for score, is_false in sorted(pooled, key=lambda item: -item[0]):
        if is_false and spent + 1 > allowed:
            break
        spent += is_false
        threshold = score
    # findings of equal score stand or fall together: drop the tie if it breaks the budget
    while threshold < math.inf and sum(false_positives(ks, threshold) for ks in key_slices) > allowed:
        threshold = min((s for s, _ in pooled if s > threshold), default=math.inf)
    return threshold


def lesion_found(key_slices: Sequence[dict[str, Any]], threshold: float) -> dict[str, bool]:
    """Per lesion hash: overlapped (IoU >= 0.5) by a finding at or above ``threshold``."""
    found = {}
    for key_slice in key_slices:
        scores, hit = slice_matches(key_slice)
        for k, lesion in enumerate(key_slice["lesions"]):
            found[lesion] = bool((hit[:, k] & (scores >= threshold)).any())
    return found


def detection_by_group(lesions: Sequence[dict[str, Any]], key_slices: Sequence[dict[str, Any]],
                       column: str, fps: float = 4.0, min_count: int = MIN_COUNT,
                       threshold: float | None = None) -> dict[str, Any]:
    """Per value of ``column``: sensitivity at the cohort's ``fps`` threshold with its Wilson interval, false
    positives per key slice, counts; ``refused`` under ``min_count`` lesions. Lesions whose box fell outside the
    evaluated frame are left out and counted (``outside``). ``threshold``: :func:`threshold_at_fps`'s, when
    already computed for these key slices."""
    threshold = threshold_at_fps(key_slices, fps) if threshold is None else threshold
    found = lesion_found(key_slices, threshold)
    slices_of = {ks["key_slice"]: ks for ks in key_slices}
    groups: dict[str, Any] = {}
    for value in sorted({str(lesion[column]) for lesion in lesions}):
        members = [lesion for lesion in lesions if str(lesion[column]) == value]
        inside = [lesion for lesion in members if lesion["features"]]
        own_slices = {lesion["key_slice"] for lesion in inside}
        entry = {"lesions": len(inside), "outside": len(members) - len(inside), "key_slices": len(own_slices)}
        if len(inside) < min_count:
            groups[value] = entry | {"refused": f"fewer than {min_count} lesions"}
            continue
        hits = sum(found[lesion["lesion"]] for lesion in inside)
        low, high = wilson(hits, len(inside))
        fp = sum(false_positives(slices_of[name], threshold) for name in own_slices)
        groups[value] = entry | {"found": hits, "sensitivity": hits / len(inside), "ci": [low, high],
                                 "fps_per_slice": fp / len(own_slices)}
    return {"column": column, "fps": fps, "threshold": threshold, "groups": groups}


def bootstrap_auc(logits: torch.Tensor, labels: torch.Tensor, classes: int, reps: int = BOOTSTRAP,
                  seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % interval of :func:`mean_auc` over ``reps`` resamplings of the rows (NaN resamples, with
    no class present both ways, are skipped)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(reps):
        rows = torch.as_tensor(rng.integers(0, len(labels), len(labels)))
        value = mean_auc(logits[rows], labels[rows], classes)
        if not math.isnan(value):
            values.append(value)
    if not values:
        return math.nan, math.nan
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def auc_by_group(lesions: Sequence[dict[str, Any]], predictions: Sequence[dict[str, str]], classes: Sequence[str],
                 column: str, min_count: int = MIN_COUNT, reps: int = BOOTSTRAP) -> dict[str, Any]:
    """Per value of ``column``: the gated model's mean AUC on the group's test lesions (from the stored
    probabilities; NaN when no class is present both ways), its bootstrap interval, the mean image weight;
    ``refused`` under ``min_count`` test lesions."""
    by_hash = {lesion["lesion"]: lesion for lesion in lesions}
    test = [p for p in predictions if p["split"] == "test"]
    groups: dict[str, Any] = {}
    for value in sorted({str(by_hash[p["lesion"]][column]) for p in test}):
        members = [p for p in test if str(by_hash[p["lesion"]][column]) == value]
        entry = {"test_lesions": len(members),
                 "image_weight": float(np.mean([float(p["image_weight"]) for p in members]))}
        if len(members) < min_count:
            groups[value] = entry | {"refused": f"fewer than {min_count} test lesions"}
            continue
        # log-probabilities are logits whose softmax is the stored probabilities
        logits = torch.log(torch.tensor([[float(p[f"p_{name}"]) for name in classes] for p in members]) + 1e-12)
        labels = torch.tensor([list(classes).index(p["label"]) for p in members])
        groups[value] = entry | {"auc": mean_auc(logits, labels, len(classes)),
                                 "ci": list(bootstrap_auc(logits, labels, len(classes), reps))}
    return {"column": column, "groups": groups}


def clusters(lesions: Sequence[dict[str, Any]], features: np.ndarray, context: np.ndarray, k: int = 4,
             seed: int = 0) -> dict[str, Any]:
    """k-means (scipy's kmeans2, k-means++) of the lesions with image features, on their standardised image
    features and context side by side; per cluster its size, lesion types, detection rate and mean context."""
    rows = [index for index, lesion in enumerate(lesions) if lesion["features"]]
    if len(rows) < k:
        return {"k": k, "labels": [], "clusters": [], "points": [], "lesions": []}
    matrix = np.hstack([features[rows], context[rows]]).astype(np.float64)
    sd = matrix.std(axis=0)
    matrix = (matrix - matrix.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    _, labels = kmeans2(matrix, k, minit="++", seed=np.random.default_rng(seed))
    summary = []
    for c in range(k):
        members = [lesions[rows[i]] for i in np.flatnonzero(labels == c)]
        summary.append({"cluster": c, "size": len(members),
                        "types": dict(Counter(m["lesion_type"] for m in members).most_common()),
                        "found": float(np.mean([m["found"] for m in members])) if members else math.nan,
                        "long_mm": float(np.median([m["long_mm"] for m in members])) if members else math.nan})
    return {"k": k, "labels": labels.tolist(), "clusters": summary,
            "points": embedding(matrix).points.round(4).tolist(), "lesions": [lesions[i]["lesion"] for i in rows]}
