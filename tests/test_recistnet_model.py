"""RECIST-Net: network shapes, targets, losses, the grouping decode on perfect maps, and a tiny overfit."""

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from ctzoo.datasets.deeplesion.recist import canonical_order
from ctzoo.models.recist_grouping import box_from_points, group_keypoints, recist_order
from ctzoo.models.recistnet import RecistNet, pool_box_features
from ctzoo.models.recistnet_targets import (
    focal_loss,
    make_targets,
    offset_loss,
    recistnet_loss,
)

R = 4


def lesion(cx, cy, long_len, short_len, angle_deg, t=0.5, s=0.5):
    """(5, 2) RECIST points: axes crossing at (cx, cy), the long one at angle_deg, fractions t, s before it."""
    u = np.array([math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))])
    v = np.array([-u[1], u[0]])
    c = np.array([cx, cy])
    ends = np.array([c - t * long_len * u, c + (1 - t) * long_len * u, c - s * short_len * v,
                     c + (1 - s) * short_len * v])
    return np.vstack([canonical_order(ends), c[None]])


def perfect_outputs(keypoints, size):
    """Network outputs that match make_targets exactly: logit(clamped heatmap) and offsets at each point's cell,
    displacements at each centre's cell."""
    targets = make_targets([torch.as_tensor(k, dtype=torch.float32) for k in keypoints], None, size, R)
    heatmaps = torch.logit(targets["heatmaps"].clamp(1e-4, 1 - 1e-4))
    batch, _, height, width = heatmaps.shape
    offsets = torch.zeros(batch, 5, 2, height * width)
    displacements = torch.zeros(batch, 8, height * width)
    for b, n, k in targets["point_mask"].nonzero().tolist():
        offsets[b, k, :, targets["indices"][b, n, k]] = targets["offset_targets"][b, n, k]
        if k == 4:
            displacements[b, :, targets["indices"][b, n, 4]] = targets["displacement_targets"][b, n].reshape(8)
    targets["displacements"] = displacements.reshape(batch, 8, height, width)
    return heatmaps, offsets.reshape(batch, 10, height, width), targets


# ------------------------------------------------------------------------------------------------ network


@pytest.mark.parametrize("backbone, size, low, high", [("light", 128, 0.3e6, 1.0e6),
                                                       ("resnet34_fpn", 64, 21e6, 23e6)])
def test_forward_shapes_and_parameter_counts(backbone, size, low, high):
    model = RecistNet(in_channels=3, backbone=backbone)
    count = sum(p.numel() for p in model.parameters())
    assert low <= count <= high, f"{backbone}: {count} parameters"
    out = model(torch.randn(2, 3, size, size + 32))
    assert out["heatmaps"].shape == (2, 5, size // 4, (size + 32) // 4)
    assert out["offsets"].shape == (2, 10, size // 4, (size + 32) // 4)
    assert out["displacements"].shape == (2, 8, size // 4, (size + 32) // 4)
    assert type(model(MetaTensor(torch.zeros(1, 3, 64, 64)))["heatmaps"]) is torch.Tensor  # plain tensors out
    # CenterNet prior: every heatmap starts near p = 0.1
    assert torch.allclose(model.heatmap_head[-1].bias, torch.full((5,), -2.19))


def test_feature_map_and_heads_are_forward_and_boxes_pool_their_cells():
    net = RecistNet(in_channels=3, width=8, head_channels=16).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = net.feature_map(x)
        split, whole = net.heads(features), net(x)
    assert features.shape == (1, 16, 16, 16)
    assert all(torch.equal(split[key], whole[key]) for key in whole)
    plane = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 16, 16)
    boxes = torch.tensor([[8.0, 4.0, 15.0, 11.0],  # cells x 2-3, y 1-2
                          [-20.0, -20.0, -10.0, -10.0],  # outside: the corner cell
                          [60.0, 60.0, 200.0, 200.0]])  # clipped to the last cell
    pooled = pool_box_features(plane, boxes, down_ratio=4)
    assert torch.equal(pooled[0], plane[:, 1:3, 2:4].mean(dim=(1, 2)))
    assert torch.equal(pooled[1], plane[:, 0, 0]) and torch.equal(pooled[2], plane[:, 15, 15])
    assert pool_box_features(plane, torch.zeros((0, 4)), 4).shape == (0, 2)


def test_unknown_backbone_and_stride_are_refused():
    with pytest.raises(ValueError):
        RecistNet(backbone="vgg")
    with pytest.raises(ValueError):
        RecistNet(down_ratio=3)


# ------------------------------------------------------------------------------------------------ targets


def test_make_targets_peaks_offsets_indices():
    points = torch.tensor([[[41.3, 60.0], [90.0, 62.9], [64.0, 40.2], [66.5, 85.1], [65.2, 61.4]],
                           [[-9.0, 30.0], [20.0, 30.0], [10.0, 20.0], [10.0, 300.0], [10.0, 30.0]]])
    t = make_targets([points, torch.zeros(0, 5, 2)], None, (128, 128), R, max_objects=4)
    assert t["heatmaps"].shape == (2, 5, 32, 32) and t["offset_targets"].shape == (2, 4, 5, 2)
    assert t["indices"].shape == (2, 4, 5) and t["indices"].dtype == torch.int64
    assert t["mask"].tolist() == [[True, True, False, False], [False] * 4]
    assert t["point_mask"][0, 1].tolist() == [False, True, True, False, True]  # x < 0 and y >= 128 skipped
    assert t["heatmaps"].min() >= 0 and t["heatmaps"].max() <= 1 and t["heatmaps"][1].sum() == 0
    for n in range(2):
        for k in range(5):
            x, y = points[n, k].tolist()
            if not t["point_mask"][0, n, k]:
                continue
            u, v = int((x + 0.5) // R), int((y + 0.5) // R)
            assert t["heatmaps"][0, k, v, u] == 1.0
            assert t["indices"][0, n, k] == v * 32 + u
            dx, dy = t["offset_targets"][0, n, k].tolist()
            assert -0.5 <= dx < 0.5 and -0.5 <= dy < 0.5
            assert (u + dx + 0.5) * R - 0.5 == pytest.approx(x, abs=1e-4)
            assert (v + dy + 0.5) * R - 0.5 == pytest.approx(y, abs=1e-4)
            if k < 4:  # the displacement from the centre's cell reaches the same point
                cu, cv = (int(c) for c in (points[n, 4] + 0.5) // R)
                sx, sy = t["displacement_targets"][0, n, k].tolist()
                assert (cu + sx + 0.5) * R - 0.5 == pytest.approx(x, abs=1e-4)
                assert (cv + sy + 0.5) * R - 0.5 == pytest.approx(y, abs=1e-4)
    # exactly one peak per on-grid point (no two points of a channel share a cell here)
    assert int((t["heatmaps"][0] == 1).sum()) == int(t["point_mask"][0].sum())
    assert t["displacement_targets"].shape == (2, 4, 4, 2)
    assert 0 < t["heatmaps"][0, 0, 15, 11] < 1.0  # the Gaussian around the peak


# ------------------------------------------------------------------------------------------------- decode


def test_group_keypoints_recovers_perfect_lesions():
    truth = np.stack([lesion(70.2, 60.6, 50, 24, 0.0),  # vertical short axis
                      lesion(180.4, 90.3, 60, 30, 35.0, t=0.4, s=0.6),  # rotated, off-centre crossing
                      lesion(110.7, 190.2, 44, 20, 90.0, t=0.55)])  # vertical long axis
    heatmaps, offsets, _ = perfect_outputs([truth], (256, 256))
    out = group_keypoints(heatmaps, offsets, R)
    assert out["points"].shape[-2:] == (5, 2) and out["valid"].dtype == torch.bool
    found = out["points"][0][out["valid"][0] & (out["scores"][0] > 0.5)]
    assert len(found) == len(truth)
    for points in truth:
        error = (found - torch.as_tensor(points, dtype=torch.float32)).norm(dim=-1).amax(dim=-1)
        assert error.min() < 0.05
    scores = out["scores"][0][out["valid"][0]]
    assert torch.all(scores[:-1] >= scores[1:])
    boxes = out["boxes"][0][out["valid"][0] & (out["scores"][0] > 0.5)]
    assert torch.allclose(boxes, box_from_points(found))


@pytest.mark.parametrize("case", ["axes_do_not_cross", "short_longer_than_long", "not_perpendicular"])
def test_group_keypoints_rejects_bad_geometry(case):
    points = {
        # the short axis sits beyond the long axis' right end: the lines meet outside the long segment
        "axes_do_not_cross": [[40, 100], [100, 100], [130, 85], [130, 115], [130, 100]],
        "short_longer_than_long": [[60, 100], [90, 100], [75, 70], [75, 130], [75, 100]],
        "not_perpendicular": [[40, 100], [100, 100], [60, 80], [90, 120], [75, 100]],
    }[case]
    heatmaps, offsets, _ = perfect_outputs([np.array(points, dtype=np.float64)[None]], (256, 256))
    out = group_keypoints(heatmaps, offsets, R)
    assert not out["valid"].any()


def test_centre_candidates_find_lesions_whose_end_points_the_combinations_reject():
    """Two small lesions whose end-point peaks sit a few pixels off (as a trained network's do): the noisy
    short axis comes out longer than the long one, so the combinations reject it; the centre peak with its
    regressed displacements still finds it, snapped to the nearby peaks. A lesion with no end-point evidence
    at all is proposed from its centre alone, at a lower score."""
    truth = np.stack([lesion(60.2, 60.6, 16, 14, 10.0), lesion(180.4, 150.3, 40, 20, 0.0)])
    heatmaps, offsets, targets = perfect_outputs([truth], (256, 256))
    jittered = truth.copy()
    jittered[0, :2] += [[4.0, 0.0], [-4.0, 0.0]]  # long axis 8 px shorter: now shorter than the short one
    noisy, noisy_offsets, _ = perfect_outputs([jittered], (256, 256))
    noisy[:, :, 30:, 30:], noisy_offsets[:, :, 30:, 30:] = heatmaps[:, :, 30:, 30:], offsets[:, :, 30:, 30:]
    noisy[:, :4, 30:, 30:] = -9.0  # the second lesion is perfect, except that its end points are not found
    without = group_keypoints(noisy, noisy_offsets, R)
    assert not without["valid"].any()
    out = group_keypoints(noisy, noisy_offsets, R, displacements=targets["displacements"])
    found = out["points"][0][out["valid"][0]]
    scores = out["scores"][0][out["valid"][0]]
    assert len(found) == 2
    snapped, regressed = found[0], found[1]  # the lesion with end-point evidence scores higher
    # snapped to the jittered peaks, reported with the (now) longer axis first
    expected = recist_order(torch.as_tensor(jittered[0], dtype=torch.float32))
    assert torch.allclose(expected[:2], torch.as_tensor(jittered[0, 2:4], dtype=torch.float32))
    assert torch.allclose(snapped[:4], expected[:4], atol=1.0)
    assert torch.allclose(regressed, torch.as_tensor(truth[1], dtype=torch.float32), atol=0.05)
    assert scores[0] > 0.9 and 0.3 < scores[1] < 0.4  # no end-point evidence: only the centre's 2/6


def _recist_axes(points: torch.Tensor) -> torch.Tensor:
    """(N, 5, 2) -> (N,) whether each lesion's axes cross on both segments within 60 deg of perpendicular."""
    a, b, w = (p.double() for p in (points[:, 1] - points[:, 0], points[:, 3] - points[:, 2],
                                     points[:, 2] - points[:, 0]))
    cos = (a * b).sum(-1).abs() / (a.norm(dim=-1) * b.norm(dim=-1))

    def cross(p, q):
        return p[:, 0] * q[:, 1] - p[:, 1] * q[:, 0]

    denom = cross(a, b)  # zero for parallel axes, which the |cos| test fails anyway
    t, s = cross(w, b) / denom, cross(w, a) / denom  # points[0] + t a == points[2] + s b
    eps = 1e-4
    return (cos <= 0.5 + eps) & (t >= -eps) & (t <= 1 + eps) & (s >= -eps) & (s <= 1 + eps)


@pytest.mark.parametrize(("case", "expected"), [
    # 53 deg off perpendicular: turned perpendicular about the midpoint's projection, its 50 px kept
    ("not_perpendicular", [[40, 100], [100, 100], [75, 75], [75, 125], [75, 100]]),
    # perpendicular but beside the long axis: moved onto it, within 90 % of its length
    ("axes_do_not_cross", [[40, 100], [100, 100], [94, 85], [94, 115], [130, 100]]),
    # in line with the long axis (the audit's sample lesion: 6.5 deg, beside it): turned across it
    ("in_line", [[40, 100], [100, 100], [75, 85], [75, 115], [75, 100]]),
    # a short axis under a pixel: no short axis to be had, dropped (as a combination would be)
    ("no_short_axis", None),
])
def test_centre_proposals_report_recist_axes_or_nothing(case, expected):
    """The audit's sample lesion had axes 6.5 deg apart that did not cross, from a centre proposal, which no
    geometry check saw. A reported lesion now has RECIST axes: the short axis turned perpendicular across the long
    one where the proposal's is not, its length kept."""
    points = {"not_perpendicular": [[40, 100], [100, 100], [60, 80], [90, 120], [75, 100]],
              "axes_do_not_cross": [[40, 100], [100, 100], [130, 85], [130, 115], [130, 100]],
              "in_line": [[40, 100], [100, 100], [60, 101], [90, 101], [75, 100]],
              "no_short_axis": [[40, 100], [100, 100], [75, 100.2], [75, 100.6], [75, 100]]}[case]
    heatmaps, offsets, targets = perfect_outputs([np.array(points, dtype=np.float64)[None]], (256, 256))
    out = group_keypoints(heatmaps, offsets, R, displacements=targets["displacements"])
    found = out["points"][0][out["valid"][0]]
    if expected is None:
        assert len(found) == 0
        return
    assert len(found) == 1 and _recist_axes(found).all()
    assert torch.allclose(found[0], torch.tensor(expected, dtype=torch.float32), atol=0.05)
    short = np.linalg.norm(np.subtract(points[3], points[2]))
    assert (found[0, 3] - found[0, 2]).norm() == pytest.approx(short, abs=0.05)  # the measurement stays


def test_every_reported_lesion_has_recist_axes_on_noisy_maps():
    """Whatever the maps (random heads, as an untrained or confused network gives), every lesion reported by
    either decoder has axes that cross within 60 deg of perpendicular."""
    generator = torch.Generator().manual_seed(0)
    heatmaps = torch.randn(4, 5, 32, 32, generator=generator) * 2 - 1
    offsets = torch.rand(4, 10, 32, 32, generator=generator) - 0.5
    displacements = torch.randn(4, 8, 32, 32, generator=generator) * 4
    out = group_keypoints(heatmaps, offsets, R, displacements=displacements, score_threshold=0.05)
    found = out["points"][out["valid"]]
    assert len(found) > 20
    assert _recist_axes(found).all()


def test_decode_modes_split_the_candidates():
    """grouping = RECIST-Net's combinations alone (displacements ignored), centre = the centre proposals alone,
    both = their union: on the case above, grouping misses the lesion without end-point evidence and the
    jittered one, centre finds both, both finds both with the snapped, higher score."""
    truth = np.stack([lesion(60.2, 60.6, 16, 14, 10.0), lesion(180.4, 150.3, 40, 20, 0.0),
                      lesion(90.3, 190.7, 50, 24, 30.0)])
    heatmaps, offsets, targets = perfect_outputs([truth], (256, 256))
    jittered = truth.copy()
    jittered[0, :2] += [[4.0, 0.0], [-4.0, 0.0]]
    noisy, noisy_offsets, _ = perfect_outputs([jittered], (256, 256))
    noisy[:, :, 30:, 30:], noisy_offsets[:, :, 30:, 30:] = heatmaps[:, :, 30:, 30:], offsets[:, :, 30:, 30:]
    noisy[:, :4, 30:42, 40:] = -9.0  # the second lesion's end points are not found; the third's are
    decoded = {mode: group_keypoints(noisy, noisy_offsets, R, displacements=targets["displacements"], decode=mode)
               for mode in ("grouping", "centre", "both")}
    centres = {mode: out["points"][0][out["valid"][0], 4] for mode, out in decoded.items()}

    def found(mode, k):
        return bool((centres[mode] - torch.as_tensor(truth[k, 4], dtype=torch.float32)).norm(dim=-1).lt(3).any())

    assert [found("grouping", k) for k in range(3)] == [False, False, True]
    assert [found("centre", k) for k in range(3)] == [True, True, True]
    assert [found("both", k) for k in range(3)] == [True, True, True]
    plain = group_keypoints(noisy, noisy_offsets, R, decode="grouping")
    for key in ("points", "scores", "valid"):
        assert torch.equal(plain[key], decoded["grouping"][key])
    with pytest.raises(ValueError, match="displacement"):
        group_keypoints(noisy, noisy_offsets, R, decode="centre")
    with pytest.raises(ValueError, match="decode must be one of"):
        group_keypoints(noisy, noisy_offsets, R, decode="exdet")


@pytest.mark.parametrize(("shift", "tilt"), [(0.0, 0.0), (4.0, 0.0), (8.0, 10.0), (12.0, 0.0)])
def test_two_aligned_neighbours_are_two_lesions_whatever_their_peak_heights(shift, tilt):
    """Two 30 x 16 px lesions 10 px apart, long axes on one line (or the second shifted and tilted a little): one
    lesion's left end, the other's right end and the first's short axis and centre pass every check of a
    combination (the crossing sits at 21 % of that 70 px long axis), and scored first about half the time, which
    then suppressed both real lesions, whose peaks it uses. Now it is a ghost of the two and is dropped: both are
    found, each with its own axes, for random peak heights as a trained network gives them."""
    truth = [lesion(60, 100, 30, 16, 0.0), lesion(100, 100 + shift, 30, 16, tilt)]
    heights = torch.as_tensor(np.random.default_rng(0).uniform(0.5, 0.95, (6, 2, 5)), dtype=torch.float32)
    maps = [perfect_outputs([k[None]], (128, 128)) for k in truth]
    heat = torch.stack([torch.sigmoid(heatmaps[0]) * heights[:, n, :, None, None]
                        for n, (heatmaps, _, _) in enumerate(maps)]).amax(dim=0).clamp(1e-4, 1 - 1e-4)
    offsets = sum(m[1] for m in maps).expand(len(heights), -1, -1, -1)
    displacements = sum(m[2]["displacements"] for m in maps).expand(len(heights), -1, -1, -1)
    for mode in ("grouping", "both"):
        out = group_keypoints(torch.logit(heat), offsets, R, displacements=displacements, decode=mode)
        for b in range(len(heights)):
            found = out["points"][b][out["valid"][b]]
            for points in truth:
                error = (found - torch.as_tensor(points, dtype=torch.float32)).norm(dim=-1).amax(dim=-1)
                assert error.min() < 0.05, (mode, heights[b].tolist(), found[:2].tolist())


def test_recist_order_puts_the_longer_axis_first_and_orders_each_pair():
    points = torch.tensor([[[50.0, 40.0], [50.0, 60.0], [70.0, 50.0], [30.0, 50.0], [50.0, 50.0]],  # short longer
                           [[70.0, 50.0], [30.0, 50.0], [50.0, 45.0], [50.0, 55.0], [50.0, 50.0]]])  # long reversed
    ordered = recist_order(points)
    expected = np.stack([canonical_order(p.numpy()) for p in points[:, [2, 3, 0, 1, 4]]])
    assert torch.allclose(ordered[0], torch.as_tensor(expected[0], dtype=torch.float32))
    assert torch.allclose(ordered[1], torch.as_tensor(canonical_order(points[1].numpy()), dtype=torch.float32))


def test_group_keypoints_on_empty_maps():
    out = group_keypoints(torch.full((2, 5, 16, 16), -9.0), torch.zeros(2, 10, 16, 16), R, max_lesions=5)
    assert out["points"].shape == (2, 5, 5, 2) and not out["valid"].any()
    out = group_keypoints(torch.full((2, 5, 16, 16), -9.0), torch.zeros(2, 10, 16, 16), R, max_lesions=5,
                          displacements=torch.zeros(2, 8, 16, 16))
    assert not out["valid"].any()


# ------------------------------------------------------------------------------------------------- losses


def test_loss_is_small_for_perfect_outputs_and_positive_otherwise():
    truth = np.stack([lesion(70.2, 60.6, 50, 24, 20.0)])
    heatmaps, offsets, targets = perfect_outputs([truth], (128, 128))
    one_hot = torch.where(targets["heatmaps"] >= 1, 12.0, -12.0)
    total, parts = recistnet_loss({"heatmaps": one_hot, "offsets": offsets,
                                   "displacements": targets["displacements"]}, targets)
    assert total.item() < 1e-3 and parts["offset"] < 1e-6 and parts["displacement"] < 1e-6
    _, parts = recistnet_loss({"heatmaps": one_hot, "offsets": offsets,
                               "displacements": torch.zeros_like(targets["displacements"])}, targets)
    assert parts["displacement"] > 1.0  # the end points are cells away from the centre
    total_gauss, _ = recistnet_loss({"heatmaps": heatmaps, "offsets": offsets}, targets)
    total_flat, parts_flat = recistnet_loss({"heatmaps": torch.full_like(heatmaps, -2.19),
                                             "offsets": torch.zeros_like(offsets)}, targets)
    assert 0 < total_gauss.item() < total_flat.item()
    assert parts_flat["heatmap"] > 1.0 and parts_flat["offset"] > 0.05
    assert offset_loss(offsets, targets["offset_targets"], targets["indices"], targets["mask"]) < 1e-6


def test_focal_loss_finite_under_bf16_autocast():
    target = make_targets([torch.as_tensor(lesion(30, 30, 20, 10, 10.0), dtype=torch.float32)[None]], None,
                          (64, 64), R)["heatmaps"]
    conv = torch.nn.Conv2d(5, 5, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(torch.randn(1, 5, 16, 16) * 50)  # bf16, extreme values
        assert logits.dtype == torch.bfloat16
        loss = focal_loss(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    assert torch.isfinite(focal_loss(torch.tensor([-200.0, 200.0]), torch.tensor([1.0, 0.0])))


# ----------------------------------------------------------------------------------------------- learning


def synthetic_image(points, size=128, seed=0):
    """A bright ellipse with the RECIST axes of ``points`` (5, 2) on a noisy background, (3, size, size)."""
    rng = np.random.default_rng(seed)
    centre = points[4]
    u = (points[1] - points[0]) / np.linalg.norm(points[1] - points[0])
    a, b = np.linalg.norm(points[1] - points[0]) / 2, np.linalg.norm(points[3] - points[2]) / 2
    y, x = np.mgrid[:size, :size].astype(np.float64)
    du, dv = (x - centre[0]) * u[0] + (y - centre[1]) * u[1], -(x - centre[0]) * u[1] + (y - centre[1]) * u[0]
    inside = (du / a) ** 2 + (dv / b) ** 2 <= 1
    image = 0.2 + 0.6 * inside + rng.normal(0, 0.08, (3, size, size))
    return torch.as_tensor(image, dtype=torch.float32)


def test_light_recistnet_overfits_two_images():
    torch.manual_seed(0)
    truth = [lesion(60.3, 66.7, 50, 28, 25.0), lesion(70.6, 55.2, 40, 26, -60.0)]
    images = torch.stack([synthetic_image(p, seed=i) for i, p in enumerate(truth)])
    targets = make_targets([torch.as_tensor(p[None], dtype=torch.float32) for p in truth], None, (128, 128), R)
    model = RecistNet(in_channels=3, backbone="light")
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(150):
        loss, _ = recistnet_loss(model(images), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    found = model.detect(images)
    assert model.training  # detect restores the mode
    for result, points in zip(found, truth):
        assert len(result["points"]) >= 1 and result["scores"][0] > 0.5 and (result["scores"] > 0.5).sum() == 1
        error = (result["points"][0] - torch.as_tensor(points, dtype=torch.float32)).norm(dim=-1)
        assert error.max() < 2.0, error
        assert torch.allclose(result["boxes"][0], box_from_points(result["points"][0]))
