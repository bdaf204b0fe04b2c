"""The report's subgroup metrics equal a direct computation: sensitivity at 4 FPs per key slice by brute force over
thresholds and by hand-counted overlaps, AUC by the Mann-Whitney statistic, Wilson intervals from the formula's
published values; groups under the minimum count are refused; ``unknown`` is a group."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctzoo.cohort.fit import patient_splits
from ctzoo.cohort.groups import (
    auc_by_group,
    bootstrap_auc,
    clusters,
    detection_by_group,
    false_positives,
    threshold_at_fps,
    wilson,
)


def iou(a, b) -> float:
    """VOC-style IoU (inclusive pixel boxes: +1 on each side), written out."""
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    area = lambda box: (box[2] - box[0] + 1) * (box[3] - box[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def synthetic_cohort(seed: int = 0, slices: int = 60):
    """Key slices with 1-2 lesions each, findings near some lesions (hits) and elsewhere (false positives)."""
    rng = np.random.default_rng(seed)
    lesions, key_slices = [], []
    for s in range(slices):
        sex = ["M", "F", "unknown"][s % 3] if s < 57 else "O"  # "O": 3 slices, a small group
        count = 1 + int(rng.random() < 0.4)
        truth, names = [], []
        for k in range(count):
            x, y = rng.uniform(20, 400, 2)
            size = rng.uniform(10, 40)
            truth.append([x, y, x + size, y + size])
            names.append(f"s{s}l{k}")
            lesions.append({"lesion": names[-1], "key_slice": f"s{s}", "sex": sex, "features": True,
                            "lesion_type": ["liver", "lung"][k]})
        boxes, scores = [], []
        for box in truth:
            if rng.random() < 0.7:  # a finding on the lesion, slightly shifted
                shift = rng.uniform(-2, 2, 4)
                boxes.append([c + d for c, d in zip(box, shift)])
                scores.append(float(rng.uniform(0.2, 1.0)))
        for _ in range(int(rng.integers(0, 12))):  # findings away from every lesion: 5.5 per slice
            x, y = rng.uniform(440, 480, 2)
            boxes.append([x, y, x + 15, y + 15])
            scores.append(float(rng.uniform(0.0, 0.9)))
        key_slices.append({"key_slice": f"s{s}", "lesions": names, "truth_boxes": truth, "boxes": boxes,
                           "scores": scores})
    return lesions, key_slices


def direct_false_positives(key_slices, threshold) -> int:
    return sum(1 for ks in key_slices for box, score in zip(ks["boxes"], ks["scores"])
               if score >= threshold and all(iou(box, t) < 0.5 for t in ks["truth_boxes"]))


def test_the_4_fp_threshold_is_the_lowest_score_within_the_budget():
    _, key_slices = synthetic_cohort()
    threshold = threshold_at_fps(key_slices, 4.0)
    allowed = 4.0 * len(key_slices)
    scores = sorted({s for ks in key_slices for s in ks["scores"]})
    within = [s for s in scores if direct_false_positives(key_slices, s) <= allowed]
    assert threshold == min(within) and threshold > min(scores)  # the budget binds
    assert sum(false_positives(ks, threshold) for ks in key_slices) == direct_false_positives(key_slices, threshold)
    assert threshold_at_fps(key_slices, 0.5) > threshold  # a tighter budget, a higher threshold


def test_detection_by_group_equals_counting_by_hand():
    lesions, key_slices = synthetic_cohort()
    result = detection_by_group(lesions, key_slices, "sex", fps=4.0, min_count=10)
    threshold = result["threshold"]
    assert set(result["groups"]) == {"M", "F", "unknown", "O"}  # unknown is a group; no lesion is dropped
    assert sum(g["lesions"] for g in result["groups"].values()) == len(lesions)
    for value, group in result["groups"].items():
        members = [lesion for lesion in lesions if lesion["sex"] == value]
        if len(members) < 10:
            slices_of_group = len({m["key_slice"] for m in members})
            assert group == {"lesions": len(members), "outside": 0, "key_slices": slices_of_group,
                             "refused": "fewer than 10 lesions"}
            continue
        slices = {ks["key_slice"]: ks for ks in key_slices}
        found = 0
        for lesion in members:
            ks = slices[lesion["key_slice"]]
            truth = ks["truth_boxes"][ks["lesions"].index(lesion["lesion"])]
            found += any(score >= threshold and iou(box, truth) >= 0.5 for box, score in zip(ks["boxes"], ks["scores"]))
        own = [slices[name] for name in {m["key_slice"] for m in members}]
        assert group["found"] == found and group["sensitivity"] == pytest.approx(found / len(members))
        assert group["fps_per_slice"] == pytest.approx(direct_false_positives(own, threshold) / len(own))
        assert group["ci"] == pytest.approx(list(wilson(found, len(members))))
    assert result["groups"]["O"]["refused"]  # 3 slices: under the minimum


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Table I: 81/263 -> 0.2553-0.3662; 15/148 -> 0.0624-0.1605; 0/20 -> 0-0.1611
    for (x, n), (low, high) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                                (0, 20): (0.0, 0.1611)}.items():
        assert wilson(x, n) == pytest.approx((low, high), abs=5e-5)
    assert all(math.isnan(v) for v in wilson(0, 0))


def mann_whitney_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + half the ties, over every pair."""
    pos, neg = scores[positive], scores[~positive]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


def test_auc_by_group_equals_the_mann_whitney_statistic():
    rng = np.random.default_rng(1)
    classes = ["liver", "lung", "kidney"]
    lesions, predictions = [], []
    for k in range(90):
        label = int(rng.integers(3))
        p = rng.dirichlet(np.ones(3)) * 0.5 + 0.5 * np.eye(3)[label] * rng.random()
        p = p / p.sum()
        sex = ["M", "F", "unknown"][k % 3] if k < 84 else "O"
        lesions.append({"lesion": f"l{k}", "sex": sex})
        predictions.append({"lesion": f"l{k}", "split": "test" if k % 5 else "train", "label": classes[label],
                            "image_weight": str(round(float(rng.random()), 5)),
                            **{f"p_{c}": str(round(float(q), 5)) for c, q in zip(classes, p)}})
    result = auc_by_group(lesions, predictions, classes, "sex", min_count=10, reps=50)
    for value, group in result["groups"].items():
        members = [p for p, lesion in zip(predictions, lesions) if lesion["sex"] == value and p["split"] == "test"]
        assert group["test_lesions"] == len(members)
        assert group["image_weight"] == pytest.approx(np.mean([float(p["image_weight"]) for p in members]))
        if len(members) < 10:
            assert group["refused"] == "fewer than 10 test lesions" and "auc" not in group
            continue
        probabilities = np.array([[float(p[f"p_{c}"]) for c in classes] for p in members])
        labels = np.array([classes.index(p["label"]) for p in members])
        direct = [mann_whitney_auc(probabilities[:, c] / probabilities.sum(axis=1), labels == c)
                  for c in range(3) if 0 < (labels == c).sum() < len(labels)]
        assert group["auc"] == pytest.approx(np.mean(direct), abs=1e-4)
        assert group["ci"][0] <= group["auc"] + 0.02 and group["ci"][1] >= group["auc"] - 0.02
    assert "refused" in result["groups"]["O"]


def test_bootstrap_interval_of_a_perfect_model_is_one():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]] * 10)
    labels = torch.tensor([0, 1] * 10)
    assert bootstrap_auc(logits, labels, 2, reps=30) == (1.0, 1.0)


def test_patient_splits_cover_all_three_and_hold_patients_together():
    assert sorted(set(patient_splits(["c", "a", "b"]).values())) == ["test", "train", "val"]
    splits = patient_splits([f"p{k}" for k in range(50)] * 2)
    counts = {name: sum(v == name for v in splits.values()) for name in ("train", "val", "test")}
    assert counts == {"train": 30, "val": 10, "test": 10}


def test_clusters_separate_two_kinds_of_lesion():
    rng = np.random.default_rng(2)
    lesions = [{"lesion": f"l{k}", "features": True, "lesion_type": "liver" if k < 20 else "lung",
                "found": k % 2 == 0, "long_mm": 10.0 + k} for k in range(40)]
    features = np.vstack([rng.normal(0, 0.1, (20, 8)), rng.normal(3, 0.1, (20, 8))])
    result = clusters(lesions, features, np.zeros((40, 2)), k=2)
    assert sorted(c["size"] for c in result["clusters"]) == [20, 20]
    assert sorted(tuple(c["types"]) for c in result["clusters"]) == [("liver",), ("lung",)]
    assert len(result["points"]) == 40
