"""DeepLesion FROC (3DCE/MULAN protocol): IoU convention, a hand-worked example, edge cases, plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctzoo.training.froc import FrocResult, box_iou_voc, froc, froc_curve, plot_froc


def _det(boxes, scores, diameters=None):
    out = {"boxes": np.asarray(boxes, dtype=float).reshape(-1, 4), "scores": np.asarray(scores, dtype=float)}
    if diameters is not None:
        out["diameters_mm"] = np.asarray(diameters, dtype=float).reshape(-1, 2)
    return out


def _gt(boxes, diameters=None):
    out = {"boxes": np.asarray(boxes, dtype=float).reshape(-1, 4)}
    if diameters is not None:
        out["diameters_mm"] = np.asarray(diameters, dtype=float).reshape(-1, 2)
    return out


def test_iou_uses_the_voc_plus_one_convention():
    a = np.array([[0, 0, 9, 9]])  # 10 x 10 = 100 pixels under "+1"
    b = np.array([[0, 0, 9, 9], [5, 5, 14, 14], [9, 0, 18, 9], [10, 0, 19, 9], [0, 0, 0, 0]])
    iou = box_iou_voc(a, b)
    assert iou.shape == (1, 5)
    # identical; 5x5=25 shared / (100+100-25); one shared pixel column 10 / 190; adjacent, no shared pixel; one pixel.
    np.testing.assert_allclose(iou[0], [1.0, 25 / 175, 10 / 190, 0.0, 1 / 100])
    assert box_iou_voc(np.zeros((0, 4)), b).shape == (0, 5)
    np.testing.assert_allclose(box_iou_voc(b, a)[:, 0], iou[0])


# The worked example: 3 images (the third has no lesion), 4 lesions, 9 detections.
A, B = [10, 10, 29, 29], [50, 50, 69, 69]            # image 0, 20 x 20 px each
C, D = [100, 100, 139, 139], [200, 200, 219, 219]    # image 1, 40 x 40 and 20 x 20
WORKED = [  # (score, image, box, IoU with the lesion it is near, outcome)
    (0.95, 0, A, 1.0, "TP A"),
    (0.90, 2, [0, 0, 9, 9], None, "FP (image without lesion)"),
    (0.85, 0, [12, 10, 31, 29], 360 / 440, "neither (A already hit)"),
    (0.80, 1, C, 1.0, "TP C"),
    (0.70, 1, [210, 210, 229, 229], 100 / 700, "FP (IoU < 0.5 with D)"),
    (0.60, 0, [50, 50, 69, 74], 400 / 500, "TP B"),
    (0.50, 2, [40, 40, 59, 59], None, "FP (image without lesion)"),
    (0.45, 0, [300, 300, 319, 319], 0.0, "FP (far from A and B)"),
    (0.40, 1, [201, 200, 220, 219], 380 / 420, "TP D"),
]


def _worked_inputs():
    near = {0: {0: A, 2: A, 5: B, 7: B}, 1: {3: C, 4: D, 8: D}}
    for k, (_, image, box, iou, _) in enumerate(WORKED):
        if iou is not None:
            assert box_iou_voc(np.array([box]), np.array([near[image][k]]))[0, 0] == pytest.approx(iou)
    # Each image lists its detections in an order unlike the score order: froc must pool and sort them.
    detections = []
    for image in range(3):
        rows = [w for w in WORKED if w[1] == image][::-1]
        detections.append(_det([r[2] for r in rows], [r[0] for r in rows]))
    return detections, [_gt([A, B]), _gt([C, D]), _gt(np.zeros((0, 4)))]


def test_worked_example_curve_by_hand():
    detections, gts = _worked_inputs()
    fps, sens, hits = froc_curve(detections, gts)
    # Walk: TP, FP, neither, TP, FP, TP, FP, FP, TP -> hits 1 1 1 2 2 3 3 3 4, FPs 0 1 1 1 2 2 3 4 4 (3 images);
    # the curve starts at the empty operating point (0, 0).
    np.testing.assert_allclose(fps, np.array([0, 0, 1, 1, 1, 2, 2, 3, 4, 4]) / 3)
    np.testing.assert_allclose(sens, np.array([0, 1, 1, 1, 2, 2, 3, 3, 3, 4]) / 4)
    steps = [(round(t), round(f)) for t, f in zip(np.diff(sens) * 4, np.diff(fps) * 3)]
    assert steps == [(1, 0), (0, 1), (0, 0), (1, 0), (0, 1), (1, 0), (0, 1), (0, 1), (1, 0)]
    # (image, detection index within the image's own list, gt): A by its 4th, B by its 2nd, D by 1st, C by 3rd.
    assert sorted(hits) == [(0, 1, 1), (0, 3, 0), (1, 0, 1), (1, 2, 0)]


def test_worked_example_report_points():
    detections, gts = _worked_inputs()
    result = froc(detections, gts)
    assert (result.num_images, result.num_lesions) == (3, 4)
    assert result.fps_per_image == [0.5, 1, 2, 4, 8, 16]
    # 0.5 FP/image = 1.5 FPs: at most 1 FP -> 2 hits.  1 FP/image = 3 FPs: everything before the 4th FP -> 3 hits
    # (the 4th hit comes after the 4th FP).  2..16 FPs/image: beyond the curve's end (4/3) -> the last, 4/4.
    np.testing.assert_allclose(result.sensitivities, [0.5, 0.75, 1, 1, 1, 1])
    assert result.mean_sensitivity_0p5_to_4 == pytest.approx((0.5 + 0.75 + 1 + 1) / 4)
    assert len(result.curve_fps) == len(result.curve_sensitivity) == 10
    assert result.num_detections == 9
    # 0.25 -> 0.75 FPs: before the 1st FP, 1 hit.  1/3 = exactly 1 FP, reached by 3 curve points: the last one
    # counts (2 hits; 3DCE's extrapolating interp1d would take the first, 1 hit).  1.2 -> 3.6 FPs: 3 hits.
    # 4/3 = the curve's end exactly: 4 hits.  1.5: beyond the end, the last sensitivity.
    custom = froc(detections, gts, fps=(0.25, 1 / 3, 1.2, 4 / 3, 1.5))
    np.testing.assert_allclose(custom.sensitivities, [0.25, 0.5, 0.75, 1.0, 1.0])
    assert custom.mean_sensitivity_0p5_to_4 == result.mean_sensitivity_0p5_to_4
    with pytest.raises(ValueError, match="> 0"):
        froc(detections, gts, fps=(0, 1))


def test_first_detection_false_positive_starts_the_curve_at_zero():
    # One image, first detection a FP: the first detection's point is at 1 FP/image, above 0.5 -> 0 there.
    detections = [_det([[50, 50, 59, 59], [0, 0, 9, 9]], [0.9, 0.8])]
    result = froc(detections, [_gt([[0, 0, 9, 9]])])
    np.testing.assert_allclose(result.curve_fps, [0, 1, 1])
    np.testing.assert_allclose(result.curve_sensitivity, [0, 0, 1])
    np.testing.assert_allclose(result.sensitivities, [0.0, 1, 1, 1, 1, 1])


def test_ties_keep_image_then_detection_order():
    gts = [_gt([[0, 0, 9, 9]]), _gt([[0, 0, 9, 9]])]
    detections = [_det([[50, 50, 59, 59]], [0.5]), _det([[0, 0, 9, 9]], [0.5])]
    fps, sens, _ = froc_curve(detections, gts)
    np.testing.assert_allclose(fps, [0, 0.5, 0.5])
    np.testing.assert_allclose(sens, [0, 0, 0.5])


def test_one_detection_on_two_overlapping_lesions_nih_vs_max_iou():
    gts = [_gt([[0, 0, 99, 99], [0, 0, 99, 89]])]
    box = [0, 0, 99, 94]  # IoU 0.95 with the first, 9000/9500 with the second
    detections = [_det([box, box], [0.9, 0.8])]
    fps, sens, hits = froc_curve(detections, gts, match="nih")  # 3DCE/MULAN: hits every unhit GT >= 0.5
    np.testing.assert_allclose(sens, [0, 1, 1])
    np.testing.assert_allclose(fps, [0, 0, 0])  # the second one is neither
    assert hits == [(0, 0, 0), (0, 0, 1)]
    fps, sens, hits = froc_curve(detections, gts, match="max_iou")
    np.testing.assert_allclose(sens, [0, 0.5, 1])
    assert hits == [(0, 0, 0), (0, 1, 1)]
    with pytest.raises(ValueError, match="match"):
        froc_curve(detections, gts, match="greedy")


def test_perfect_and_empty_detectors():
    gts = [_gt([A, B]), _gt([C]), _gt(np.zeros((0, 4)))]
    perfect = froc([_det([A, B], [0.3, 0.9]), _det([C], [0.5]), _det(np.zeros((0, 4)), [])], gts)
    assert perfect.sensitivities == [1.0] * 6
    assert perfect.mean_sensitivity_0p5_to_4 == 1.0
    assert np.all(perfect.curve_fps == 0)
    nothing = froc([_det(np.zeros((0, 4)), [])] * 3, gts)
    assert nothing.sensitivities == [0.0] * 6
    assert nothing.mean_sensitivity_0p5_to_4 == 0.0
    assert nothing.num_detections == 0 and nothing.num_lesions == 3
    with pytest.raises(ValueError, match="no lesion"):
        froc([_det([A], [1.0])], [_gt(np.zeros((0, 4)))])
    with pytest.raises(ValueError, match="entries"):
        froc([_det([A], [1.0])], gts)


def test_ranking_true_positives_first_beats_random_scores():
    rng = np.random.default_rng(0)
    gts, boxes = [], []
    for _ in range(40):
        x, y = rng.integers(0, 400, size=2)
        lesion = [x, y, x + 19, y + 19]
        far = [[x + 40 * k, y + 40 * k, x + 40 * k + 19, y + 40 * k + 19] for k in range(1, 5)]
        gts.append(_gt([lesion]))
        boxes.append([lesion] + far)
    ranked = froc([_det(b, [0.9 + 0.1 * rng.random()] + list(0.5 * rng.random(4))) for b in boxes], gts)
    random = froc([_det(b, rng.random(5)) for b in boxes], gts)
    assert ranked.sensitivities == [1.0] * 6
    assert random.mean_sensitivity_0p5_to_4 < ranked.mean_sensitivity_0p5_to_4 - 0.1
    assert random.sensitivities[-1] == 1.0  # every lesion is found once all 4 FPs/image are allowed


def test_axis_errors_on_hits_only():
    gts = [_gt([A], [[30, 20]]), _gt([C, D], [[10, 5], [40, 30]]), _gt([[0, 0, 9, 9]])]
    detections = [
        _det([A, [11, 10, 30, 29], [300, 300, 319, 319]], [0.9, 0.8, 0.7], [[27, 21], [0, 0], [5, 5]]),  # hit, dup, FP
        _det([C, D], [0.6, 0.5], [[12, 5], [47, 26]]),
        _det([[0, 0, 9, 9]], [0.4], [[1, 1]]),  # a hit, but its lesion has no diameters
    ]
    errors = froc(detections, gts).axis_errors_mm
    assert errors["count"] == 3  # long |27-30|, |12-10|, |47-40| = 3, 2, 7;  short 1, 0, 4
    assert errors["long_mean"] == pytest.approx(4.0) and errors["long_median"] == pytest.approx(3.0)
    assert errors["short_mean"] == pytest.approx(5 / 3) and errors["short_median"] == pytest.approx(1.0)
    no_diameters = froc([_det([A], [1.0])], [_gt([A])]).axis_errors_mm
    assert no_diameters["count"] == 0 and np.isnan(no_diameters["long_mean"])


def test_table_and_dict():
    detections, gts = _worked_inputs()
    result = froc(detections, gts)
    table = result.table()
    assert "3 images (1 lesion-free), 4 lesions" in table and "mean 0.5-4" in table
    rows = table.splitlines()
    assert rows[2].split()[2:] == ["50.00", "75.00", "100.00", "100.00", "100.00", "100.00", "81.25"]
    assert len(rows[1]) == len(rows[2])  # aligned
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["sensitivities"] == [0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert data["axis_errors_mm"]["count"] == 0 and data["axis_errors_mm"]["long_mean"] is None
    assert len(data["curve_fps"]) == 10 and data["num_images"] == 3 and data["num_lesion_free"] == 1


def test_plot_froc_writes_a_png_atomically(tmp_path, monkeypatch):
    detections, gts = _worked_inputs()
    result = froc(detections, gts)
    perfect = froc([_det([A, B], [1, 1]), _det([C, D], [1, 1]), _det(np.zeros((0, 4)), [])], gts)
    single = plot_froc(result, tmp_path / "one.png")
    both = plot_froc([("worked", result), ("perfect", perfect)], tmp_path / "sub" / "two.png")
    for path in (single, both):
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["one.png", "two.png"]

    from matplotlib.figure import Figure

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plot_froc(result, tmp_path / "failed.png")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["one.png", "two.png"]
    assert isinstance(result, FrocResult)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_box_is_refused_naming_its_image(bad):
    # a NaN IoU is neither >= nor < the threshold: such a detection would be neither hit nor FP, i.e. free
    gts = [_gt([A]), _gt([C])]
    detections = [_det([A], [0.5]), _det([[bad, 50, 60, 60], C], [0.9, 0.4])]
    with pytest.raises(ValueError, match=r"detections\[1\]: box 0 has a non-finite coordinate"):
        froc(detections, gts)
    with pytest.raises(ValueError, match=r"detections\[1\]"):
        froc_curve(detections, gts)


def test_lesions_off_the_evaluated_image_count_as_missed():
    gts = [{**_gt([A]), "off_image": 1}, {**_gt(np.zeros((0, 4))), "off_image": 2}]
    result = froc([_det([A], [0.9]), _det(np.zeros((0, 4)), [])], gts)
    assert result.num_lesions == 4 and result.num_off_image == 3 and result.num_lesion_free == 0
    assert result.sensitivities == [0.25] * 6
    assert "4 lesions (3 off the evaluated image, missed)" in result.table()
    assert result.to_dict()["num_off_image"] == 3
    everything_off = froc([_det([A], [0.9])], [{**_gt(np.zeros((0, 4))), "off_image": 1}])
    assert everything_off.sensitivities == [0.0] * 6 and everything_off.num_detections == 1
    with pytest.raises(ValueError, match=r"ground_truth\[0\]: off_image must be a count"):
        froc([_det([A], [0.9])], [{**_gt([A]), "off_image": -1}])
