"""Detector calibration: which detections lie on a lesion, the reliability table and its ECE by hand, and the
score threshold for a stated false-positive rate."""

import numpy as np
import pytest

from ctzoo.training.calibration import detection_correctness, reliability, threshold_for_fp_rate
from ctzoo.training.froc import froc_curve

LESION = [10, 10, 29, 29]


def test_correctness_uses_iou_with_any_lesion_of_the_same_image():
    detections = [{"boxes": [LESION, [11, 11, 30, 30], [60, 60, 70, 70]], "scores": [0.9, 0.8, 0.7]},
                  {"boxes": [LESION], "scores": [0.6]}]
    truth = [{"boxes": [LESION]}, {"boxes": np.zeros((0, 4))}]
    scores, correct = detection_correctness(detections, truth)
    assert scores.tolist() == [0.9, 0.8, 0.7, 0.6]
    # a second box on the same lesion is still "on a lesion"; a box on a lesion-free image never is
    assert correct.tolist() == [True, True, False, False]


def test_reliability_table_and_ece_by_hand():
    scores = np.array([0.05, 0.15, 0.15, 0.85, 0.95, 0.95, 0.95, 0.95])
    correct = np.array([False, False, True, True, True, True, True, False])
    table = reliability(scores, correct, bins=10)
    by_low = {row["low"]: row for row in table["bins"]}
    assert by_low[0.1]["count"] == 2 and by_low[0.1]["fraction_correct"] == 0.5
    assert by_low[0.9]["count"] == 4 and by_low[0.9]["fraction_correct"] == 0.75
    assert by_low[0.5]["count"] == 0 and by_low[0.5]["mean_score"] is None
    expected = (1 * 0.05 + 2 * abs(0.5 - 0.15) + 1 * abs(1 - 0.85) + 4 * abs(0.75 - 0.95)) / 8
    assert table["ece"] == pytest.approx(expected, abs=1e-4)
    assert reliability(scores, correct, min_score=0.5)["detections"] == 5
    perfect = reliability(np.array([1.0, 1.0, 0.0]), np.array([True, True, False]))
    assert perfect["ece"] == 0.0  # a score of 1.0 falls in the last bin, 0.0 in the first


def test_threshold_for_fp_rate_never_exceeds_the_rate():
    """Four images, one lesion each; false positives scored 0.9, 0.7, 0.5, 0.3, 0.1 among hits at 0.8, 0.6."""
    detections = [{"boxes": [LESION, [60, 60, 70, 70]], "scores": [0.8, 0.9]},
                  {"boxes": [LESION, [60, 60, 70, 70]], "scores": [0.6, 0.7]},
                  {"boxes": [[60, 60, 70, 70]], "scores": [0.5]},
                  {"boxes": [[60, 60, 70, 70], [80, 80, 90, 90]], "scores": [0.3, 0.1]}]
    truth = [{"boxes": [LESION]} for _ in range(4)]
    # 0.5 FP/image = 2 FPs: keep 0.9 (FP), 0.8, 0.7 (FP), 0.6; the third FP at 0.5 is excluded
    assert threshold_for_fp_rate(detections, truth, 0.5) == pytest.approx(0.6, abs=1e-7)
    assert threshold_for_fp_rate(detections, truth, 0.25) == pytest.approx(0.8)  # one FP: 0.9 only
    assert threshold_for_fp_rate(detections, truth, 10) == pytest.approx(0.1)  # everything
    too_strict = threshold_for_fp_rate(detections, truth, 0.0)
    assert too_strict > 0.9  # even the best detection is a false positive
    for rate in (0.25, 0.5, 1.0):
        kept = [{"boxes": np.asarray(d["boxes"])[np.asarray(d["scores"]) >= threshold_for_fp_rate(
            detections, truth, rate)], "scores": [s for s in d["scores"] if s >= threshold_for_fp_rate(
                detections, truth, rate)]} for d in detections]
        fps, _, _ = froc_curve(kept, truth)
        assert fps[-1] <= rate


def test_findings_on_lesion_free_ct_counts_what_infer_reports():
    from ctzoo.datasets.samples import real_ct_scan
    from ctzoo.inference.tasks import model_task, run_task
    from ctzoo.io import read_volume
    from ctzoo.training.evaluate import findings_on_lesion_free_ct

    scans = {"sample_ct": real_ct_scan("sample_ct")}
    none = findings_on_lesion_free_ct("recistnet-mini", scans, 0.999)
    assert (none["findings"], none["slices"], none["findings_per_slice"]) == (0, 20, 0.0)
    some = findings_on_lesion_free_ct("recistnet-mini", scans, 0.05)
    reported = run_task(model_task("recistnet-mini", "torch", "cpu", 0.05), read_volume(scans["sample_ct"],
                                                                                        progress=False))["lesions"]
    assert some["findings"] == len(reported) > 0 and some["scans"][0]["scores"] == [r["score"] for r in reported]
    assert some["findings_per_slice"] == round(len(reported) / 20, 4)
