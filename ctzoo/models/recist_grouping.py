"""Grouping RECIST-Net's keypoint maps into lesions: pure torch with fixed output shapes, so that it can be traced
or exported with the network.

:func:`group_keypoints` turns the heatmaps, offsets and displacements of :class:`~ctzoo.models.recistnet.RecistNet`
into lesions two ways — combinations of end-point peaks checked against the centre heatmap (``exdet``, the
paper's decoder), and centre peaks whose regressed end points snap to nearby peaks (CenterNet-style, added here)
— drops ghosts (one lesion's ends and a neighbour's, :func:`ghosts`) and keeps the best by NMS. ``decode=``
selects either set alone, for the ablation.

Coordinates: points are ``(x, y)`` in input pixels, 0-based pixel centres (see :mod:`ctzoo.datasets.deeplesion.recist`).
Heatmap cell ``(u, v)`` covers input pixels ``[u * R, (u + 1) * R)`` (``R = down_ratio``); its centre is at
``(u + 0.5) * R - 0.5``, so a point at cell ``u`` with offset ``dx`` is ``x = (u + dx + 0.5) * R - 0.5``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ctzoo.datasets.deeplesion.recist import POINT_NAMES, VERTICAL_EPS

NUM_POINTS = len(POINT_NAMES)  # 5: four end points and the centre
NUM_ENDPOINTS = 4
#: Candidate sets :func:`group_keypoints` can decode: the union, RECIST-Net's grouping alone, centre peaks alone.
DECODE_MODES = ("both", "grouping", "centre")


def box_from_points(points: torch.Tensor) -> torch.Tensor:
    """Tight boxes (..., 4) [x1, y1, x2, y2] of the four end points of ``points`` (..., 4 or 5, 2) (torch twin
    of :func:`ctzoo.datasets.deeplesion.recist.box_from_points` without padding)."""
    ends = points[..., :NUM_ENDPOINTS, :]
    return torch.cat([ends.amin(dim=-2), ends.amax(dim=-2)], dim=-1)


def heatmap_peaks(heat: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """Keep only local maxima of heat (B, C, h, w) (CenterNet's max-pool NMS); other cells become 0."""
    pooled = F.max_pool2d(heat, kernel, stride=1, padding=kernel // 2)
    return heat * (pooled == heat).to(heat.dtype)


def cells_to_pixels(flat_index: torch.Tensor, offsets: torch.Tensor, width: int, down_ratio: int) -> torch.Tensor:
    """Input-pixel (x, y) (..., 2) of heatmap cells ``flat_index`` (...) = v * width + u, refined by ``offsets``
    (..., 2) in cells."""
    u = flat_index % width
    v = torch.div(flat_index, width, rounding_mode="floor")
    return (torch.stack([u, v], dim=-1).to(offsets.dtype) + offsets + 0.5) * down_ratio - 0.5


def _gather_offsets(offsets: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """offsets (B, P, 2, h*w) at flat_index (B, P, K) -> (B, P, K, 2)."""
    index = flat_index.unsqueeze(2).expand(-1, -1, 2, -1)
    return offsets.gather(3, index).transpose(2, 3)


def _best_pairs(a_xy: torch.Tensor, a_score: torch.Tensor, b_xy: torch.Tensor, b_score: torch.Tensor,
                keep: int, order_tolerance: float, score_threshold: float):
    """All (a, b) peak pairs of one axis in canonical order; the ``keep`` best by a + b score.

    a_xy, b_xy (B, K, 2); a_score, b_score (B, K) -> ends (B, keep, 2, 2), scores (B, keep, 2), peaks (B, keep, 2)
    (which a and b peak), valid (B, keep).
    Canonical order is "a left of b" up to ``order_tolerance`` pixels. Within that band of a vertical axis both
    y orders are accepted, because the ground truth order itself flips there with a sub-pixel tilt.
    """
    num_a, num_b = a_xy.shape[1], b_xy.shape[1]
    ordered = (b_xy[:, None, :, 0] - a_xy[:, :, None, 0]) >= -order_tolerance
    strong = (a_score[:, :, None] >= score_threshold) & (b_score[:, None, :] >= score_threshold)
    # invalid pairs get -1 (valid sums are >= 0) so that they sort last instead of needing a boolean index
    pair_score = torch.where(ordered & strong, a_score[:, :, None] + b_score[:, None, :],
                             torch.full_like(ordered, -1.0, dtype=a_score.dtype))
    best, index = pair_score.flatten(1).topk(min(keep, num_a * num_b), dim=1)
    ia, ib = torch.div(index, num_b, rounding_mode="floor"), index % num_b
    ends = torch.stack([a_xy.gather(1, ia[..., None].expand(-1, -1, 2)),
                        b_xy.gather(1, ib[..., None].expand(-1, -1, 2))], dim=2)
    scores = torch.stack([a_score.gather(1, ia), b_score.gather(1, ib)], dim=2)
    return ends, scores, torch.stack([ia, ib], dim=2), best >= 0


def _cross(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]


def axes_geometry(long_ends: torch.Tensor, short_ends: torch.Tensor, tolerance: float, max_abs_cos: float,
                  min_axis: float = 1.0, crossing: tuple[float, float] = (0.0, 1.0)):
    """Check every long pair against every short pair.

    long_ends (B, L, 2, 2), short_ends (B, S, 2, 2) -> intersection (B, L, S, 2) of the two lines and ok
    (B, L, S): the short axis is at most ``tolerance`` px longer than the long one, both axes are at least
    ``min_axis`` px long, |cos| of their angle <= ``max_abs_cos``, and the intersection lies within the
    ``crossing`` fraction of both segments (0 and 1 are the ends), give or take ``tolerance`` px.
    """
    la, lb = long_ends[:, :, None, 0], long_ends[:, :, None, 1]
    sa, sb = short_ends[:, None, :, 0], short_ends[:, None, :, 1]
    d1, d2, w = lb - la, sb - sa, sa - la
    len1, len2 = d1.norm(dim=-1), d2.norm(dim=-1)
    eps = 1e-6
    cos = (d1 * d2).sum(-1).abs() / (len1 * len2).clamp_min(eps)
    denom = _cross(d1, d2)
    # parallel axes fail the |cos| test anyway; this only keeps t and s finite for them
    denom = torch.where(denom.abs() < eps, torch.full_like(denom, eps), denom)
    t, s = _cross(w, d2) / denom, _cross(w, d1) / denom  # la + t d1 == sa + s d2
    slack_t, slack_s = tolerance / len1.clamp_min(eps), tolerance / len2.clamp_min(eps)
    low, high = crossing
    crosses = (t >= low - slack_t) & (t <= high + slack_t) & (s >= low - slack_s) & (s <= high + slack_s)
    ok = crosses & (cos <= max_abs_cos) & (len2 <= len1 + tolerance) & (len1 >= min_axis) & (len2 >= min_axis)
    return la + t[..., None] * d1, ok


def box_iou(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU (B, N, N) of boxes (B, N, 4)."""
    low = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
    high = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    inter = (high - low).clamp_min(0).prod(-1)
    area = (boxes[..., 2:] - boxes[..., :2]).clamp_min(0).prod(-1)
    return inter / (area[:, :, None] + area[:, None, :] - inter).clamp_min(1e-6)


def greedy_select(scores: torch.Tensor, conflict: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS as a fixed-length loop: ``count`` times, take the best remaining candidate and drop everything
    that conflicts with it.

    scores (B, N), negative = invalid; conflict (B, N, N) bool, symmetric, true on the diagonal ->
    picked scores (B, count), descending, -1 where nothing was left, and picked indices (B, count).
    The loop runs ``count`` times whatever the data, so it traces to a fixed graph.
    """
    remaining, picked_scores, picked = scores, [], []
    for _ in range(count):
        best, index = remaining.max(dim=1)
        picked_scores.append(best)
        picked.append(index)
        dropped = conflict.gather(1, index[:, None, None].expand(-1, 1, conflict.shape[2]))[:, 0]
        remaining = torch.where(dropped, torch.full_like(remaining, -1.0), remaining)
    return torch.stack(picked_scores, dim=1), torch.stack(picked, dim=1)


def group_keypoints(heatmaps: torch.Tensor, offsets: torch.Tensor, down_ratio: int, max_lesions: int = 20,
                    top_k: int = 24, score_threshold: float = 0.05, cell_tolerance: float = 1.0,
                    max_abs_cos: float = 0.5, axis_crossing: tuple[float, float] = (0.1, 0.9), nms_iou: float = 0.5,
                    pre_nms: int = 200, displacements: torch.Tensor | None = None,
                    snap_fraction: float = 0.3, decode: str = "both") -> dict[str, torch.Tensor]:
    """Group keypoint heatmaps into RECIST lesions (CenterNet ``exct_decode`` adapted to RECIST, plus, with
    ``displacements``, CenterNet ``multi_pose_decode`` candidates from the centre heatmap).

    Args:
        heatmaps: (B, 5, h, w) logits; offsets: (B, 10, h, w) (dx, dy) per point, in cells.
        displacements: (B, 8, h, w) (dx, dy) from a centre cell to each end point, in cells, or None for the
            end-point combinations alone. Each of the top_k centre peaks then proposes a lesion too: its
            regressed end points, each snapped to the nearest peak of its own heatmap within ``snap_fraction``
            of the regressed long axis (at least ``cell_tolerance``). A small lesion whose four end peaks are
            a few pixels off still gets found this way, where the combinations' peak pairing rejects it.
        decode: which candidates enter NMS (:data:`DECODE_MODES`): ``"grouping"`` the end-point combinations
            alone (RECIST-Net's own decoder: extreme points + centre, geometric grouping), ``"centre"`` the
            centre-peak proposals alone (needs ``displacements``), ``"both"`` (the default) the union.
        down_ratio: output stride R; points come back in input pixels.
        max_lesions: lesions returned per image. top_k: peaks per end-point heatmap, and pairs kept per axis.
        score_threshold: minimum sigmoid score of every end-point peak a candidate uses (a combination's four, the
            peaks a centre proposal snaps to) and of the centre. A centre proposal's unsnapped end point is not
            held to it: it scores the heatmap's value where it was regressed, however low, since finding lesions
            without end-point peaks is what the proposals are for.
        cell_tolerance: geometric slack in heatmap cells (pair order, short <= long, segment crossing).
        max_abs_cos: the axes must be within acos(0.5) = 60 deg of perpendicular.
        axis_crossing: where along each axis (fraction from its first end) the other must cross it. RECIST's
            diameters cross inside the lesion, away from the ends; without this, the short axis of a small
            lesion plus any long pair whose line passes through it (one end of this lesion, one of another)
            forms a valid-looking lesion. It does not stop every such pair: with two neighbours whose long axes
            are aligned, the crossing lands at ~20 % of the borrowed axis, which :func:`ghosts` catches.
        nms_iou: box IoU above which a lesion suppresses a lower-scored one.
        pre_nms: candidates (best scores first) that enter NMS.

    Steps: sigmoid + 3x3 max-pool NMS, top_k peaks per end-point heatmap; the candidates of
    :func:`endpoint_combinations` and/or :func:`centre_candidates`, their axes made RECIST axes where they are
    not (:func:`recist_axes`: every lesion reported has axes within 60 deg of perpendicular that cross); greedy NMS
    (:func:`greedy_select`) where a lesion suppresses a lower-scored one whose end-point box overlaps it by IoU >
    ``nms_iou`` *or that uses any of its end-point peaks*: a peak belongs to one lesion, and without this rule
    regroupings that borrow two lesions' peaks (a long axis from one lesion's end to another's) score as high as
    real ones while their boxes overlap little. That rule alone lets such a regrouping, taken first, suppress both
    lesions whose peaks it borrows; so before NMS, :func:`ghosts` drops every candidate whose peaks two
    smaller, mutually compatible candidates explain with a higher total score.

    Points come out in the documented order (:func:`recist_order`).

    Returns fixed shapes: ``points`` (B, M, 5, 2), ``scores`` (B, M) descending (0 where empty), ``boxes``
    (B, M, 4) tight end-point boxes, ``valid`` (B, M) bool, M = min(max_lesions, candidates).
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode == "centre" and displacements is None:
        raise ValueError("decode='centre' needs the displacement head's output")
    batch, _, height, width = heatmaps.shape
    tolerance = cell_tolerance * down_ratio
    heat = torch.sigmoid(heatmaps)
    offsets = offsets.reshape(batch, NUM_POINTS, 2, height * width)
    peak_xy, peak_score = endpoint_peaks(heat[:, :NUM_ENDPOINTS], offsets[:, :NUM_ENDPOINTS], top_k, down_ratio)
    candidates = []
    if decode != "centre":
        candidates.append(endpoint_combinations(heat, offsets, peak_xy, peak_score, down_ratio, top_k, score_threshold,
                                                tolerance, max_abs_cos, axis_crossing))
    if displacements is not None and decode != "grouping":
        candidates.append(centre_candidates(heat, offsets, displacements, peak_xy, peak_score, down_ratio, top_k,
                                            score_threshold, tolerance, snap_fraction))
    points, peak_ids, score = (torch.cat(parts, dim=1) for parts in zip(*candidates))
    points, score = recist_axes(points, score, max_abs_cos, axis_crossing)
    return select_lesions(points, peak_ids, score, max_lesions, nms_iou, pre_nms)


def endpoint_combinations(heat: torch.Tensor, offsets: torch.Tensor, peak_xy: torch.Tensor, peak_score: torch.Tensor,
                          down_ratio: int, top_k: int, score_threshold: float, tolerance: float, max_abs_cos: float,
                          axis_crossing: tuple[float, float]):
    """RECIST-Net's own grouping: every long pair x short pair of end-point peaks, checked geometrically and
    against the centre heatmap (see :func:`group_keypoints`).

    heat (B, 5, h, w) probabilities, offsets (B, 5, 2, h*w), end-point peaks peak_xy (B, 4, K, 2) and peak_score
    (B, 4, K) -> points (B, N, 5, 2), peak ids (B, N, 4), scores (B, N) (-1 = invalid).
    Pairs in canonical order per axis, best top_k kept; every long pair x short pair checked by
    :func:`axes_geometry`; the centre score is the 3x3 maximum of the centre heatmap around the lines'
    intersection (one cell of slack, like the geometry); score = (la + lb + sa + sb + 2 c) / 6. The centre point
    is the centre peak (refined by its offset) when the 3x3 maximum around the intersection is a local peak,
    since that is the network's direct estimate; otherwise the intersection itself.
    """
    batch = heat.shape[0]
    long_ends, long_scores, long_peaks, long_valid = _best_pairs(
        peak_xy[:, 0], peak_score[:, 0], peak_xy[:, 1], peak_score[:, 1], top_k, tolerance, score_threshold)
    short_ends, short_scores, short_peaks, short_valid = _best_pairs(
        peak_xy[:, 2], peak_score[:, 2], peak_xy[:, 3], peak_score[:, 3], top_k, tolerance, score_threshold)
    num_long, num_short = long_ends.shape[1], short_ends.shape[1]

    intersection, geometry_ok = axes_geometry(long_ends, short_ends, tolerance, max_abs_cos,
                                              crossing=axis_crossing)
    centre_score, centre = centre_near(heat[:, NUM_ENDPOINTS:], offsets[:, NUM_ENDPOINTS:],
                                       intersection.reshape(batch, -1, 2), down_ratio)

    # every long pair with every short pair, flattened to (B, L*S, ...)
    ends = torch.cat([long_ends[:, :, None].expand(-1, -1, num_short, -1, -1),
                      short_ends[:, None].expand(-1, num_long, -1, -1, -1)], dim=3)
    points = torch.cat([ends.reshape(batch, -1, NUM_ENDPOINTS, 2), centre[:, :, None]], dim=2)
    peak_ids = torch.cat([long_peaks[:, :, None].expand(-1, -1, num_short, -1),
                          short_peaks[:, None].expand(-1, num_long, -1, -1)], dim=3).reshape(batch, -1, NUM_ENDPOINTS)
    end_sum = (long_scores.sum(-1)[:, :, None] + short_scores.sum(-1)[:, None, :]).reshape(batch, -1)
    score = (end_sum + 2 * centre_score) / 6
    valid = ((long_valid[:, :, None] & short_valid[:, None, :] & geometry_ok).reshape(batch, -1)
             & (centre_score >= score_threshold))
    return points, peak_ids, torch.where(valid, score, torch.full_like(score, -1.0))


def recist_order(points: torch.Tensor) -> torch.Tensor:
    """points (..., 5, 2) in the documented order: the longer axis first (RECIST's long axis is the longer
    diameter by definition, whichever heatmaps found its ends), each pair in canonical order (torch twin of
    :func:`ctzoo.datasets.deeplesion.recist.canonical_order`). Regressed and snapped points, and pairs within
    the grouping's tolerance, can come out otherwise."""
    long_len = (points[..., 1, :] - points[..., 0, :]).norm(dim=-1)
    short_len = (points[..., 3, :] - points[..., 2, :]).norm(dim=-1)
    points = torch.where((short_len > long_len)[..., None, None], points[..., [2, 3, 0, 1, 4], :], points)
    a, b = points[..., [0, 2], :], points[..., [1, 3], :]
    delta = b - a
    swap = ((delta[..., 0] < -VERTICAL_EPS) | ((delta[..., 0].abs() <= VERTICAL_EPS) & (delta[..., 1] < 0)))[..., None]
    first, second = torch.where(swap, b, a), torch.where(swap, a, b)
    return torch.stack([first[..., 0, :], second[..., 0, :], first[..., 1, :], second[..., 1, :], points[..., 4, :]],
                       dim=-2)


def perpendicular_short_axis(points: torch.Tensor, crossing: tuple[float, float]) -> torch.Tensor:
    """points (..., 5, 2) in RECIST order with the short axis turned perpendicular to the long one: its length
    (the network's short diameter) kept, centred on the long axis where the midpoint of its ends projects onto
    it, within the ``crossing`` fraction of it. The long axis and the centre point stay."""
    first, second = points[..., 0, :], points[..., 1, :]
    along = second - first
    length = along.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    unit = along / length
    half = (points[..., 3, :] - points[..., 2, :]).norm(dim=-1, keepdim=True) / 2
    across = torch.stack([-unit[..., 1], unit[..., 0]], dim=-1) * half
    middle = (points[..., 2, :] + points[..., 3, :]) / 2
    foot = first + (((middle - first) * unit).sum(-1, keepdim=True) / length).clamp(*crossing) * along
    return torch.stack([first, second, foot - across, foot + across, points[..., 4, :]], dim=-2)


def recist_axes(points: torch.Tensor, scores: torch.Tensor, max_abs_cos: float, crossing: tuple[float, float],
                min_axis: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates points (B, N, 5, 2) and scores (B, N) in RECIST order and with RECIST axes: where the axes are
    within 60 deg of perpendicular (``max_abs_cos``) and cross each other on both segments they stay; elsewhere
    the short axis is turned perpendicular across the long one (:func:`perpendicular_short_axis`). The
    combinations' geometry check passes pairs that cross a little beyond an end, and the centre proposals have
    none: their regressed pairs of a small, roundish lesion often point the same way. A short axis shorter than
    ``min_axis`` px makes the candidate invalid (-1), as it does a combination."""
    def crossing_axes(candidate: torch.Tensor) -> torch.Tensor:
        flat = candidate.reshape(-1, 1, NUM_POINTS, 2)
        return axes_geometry(flat[:, :, :2], flat[:, :, 2:4], 0.0, max_abs_cos, min_axis,
                             crossing=(0.0, 1.0))[1].reshape(scores.shape)

    points = recist_order(points)
    as_is = crossing_axes(points)
    repaired = recist_order(perpendicular_short_axis(points, crossing))
    short_enough = (repaired[..., 3, :] - repaired[..., 2, :]).norm(dim=-1) >= min_axis
    points = torch.where(as_is[..., None, None], points, repaired)
    return points, torch.where(as_is | short_enough, scores, torch.full_like(scores, -1.0))


def centre_candidates(heat: torch.Tensor, offsets: torch.Tensor, displacements: torch.Tensor,
                      peak_xy: torch.Tensor, peak_score: torch.Tensor, down_ratio: int, top_k: int,
                      score_threshold: float, tolerance: float, snap_fraction: float):
    """Lesions proposed by the top_k centre peaks (see :func:`group_keypoints`).

    heat (B, 5, h, w) probabilities, offsets (B, 5, 2, h*w), displacements (B, 8, h, w), end-point peaks
    peak_xy (B, 4, K, 2) and peak_score (B, 4, K) -> points (B, top_k, 5, 2), peak ids (B, top_k, 4) (the
    snapped peak's index, or a negative id of its own where an end point is not snapped), scores (B, top_k)
    (same formula as the combinations, -1 = invalid). Only snapping is held to ``score_threshold``: an unsnapped
    end point scores its heatmap's value there, below the threshold or not.
    """
    batch, _, height, width = heat.shape
    centre_score, index = heatmap_peaks(heat[:, NUM_ENDPOINTS:]).flatten(1).topk(min(top_k, height * width), dim=1)
    centre = cells_to_pixels(index, _gather_offsets(offsets[:, NUM_ENDPOINTS:], index[:, None])[:, 0], width,
                             down_ratio)  # (B, C, 2)
    shift = displacements.reshape(batch, NUM_ENDPOINTS, 2, height * width)
    regressed = cells_to_pixels(index[:, None], _gather_offsets(shift, index[:, None].expand(-1, NUM_ENDPOINTS, -1)),
                                width, down_ratio).transpose(1, 2)  # (B, C, 4, 2)
    radius = (snap_fraction * (regressed[:, :, 1] - regressed[:, :, 0]).norm(dim=-1)).clamp_min(tolerance)
    distance = (regressed[:, :, :, None, :] - peak_xy[:, None]).norm(dim=-1)  # (B, C, 4, K)
    usable = (distance <= radius[:, :, None, None]) & (peak_score[:, None] >= score_threshold)
    nearest, nearest_id = torch.where(usable, distance, torch.full_like(distance, float("inf"))).min(dim=-1)
    snapped = torch.isfinite(nearest)  # (B, C, 4)
    snapped_xy = peak_xy[:, None].expand(-1, regressed.shape[1], -1, -1, -1).gather(
        3, nearest_id[..., None, None].expand(-1, -1, -1, 1, 2))[:, :, :, 0]
    snapped_score = peak_score[:, None].expand(-1, regressed.shape[1], -1, -1).gather(3, nearest_id[..., None])[..., 0]
    cell = torch.div(regressed + 0.5, down_ratio, rounding_mode="floor").long()
    flat = cell[..., 1].clamp(0, height - 1) * width + cell[..., 0].clamp(0, width - 1)  # (B, C, 4)
    there = heat[:, :NUM_ENDPOINTS].flatten(2).gather(2, flat.transpose(1, 2)).transpose(1, 2)
    ends = torch.where(snapped[..., None], snapped_xy, regressed)
    end_score = torch.where(snapped, snapped_score, there)
    own_ids = -1 - torch.arange(regressed.shape[1], device=heat.device)[None, :, None].expand_as(nearest_id)
    peak_ids = torch.where(snapped, nearest_id, own_ids)
    score = (end_score.sum(-1) + 2 * centre_score) / 6
    score = torch.where(centre_score >= score_threshold, score, torch.full_like(score, -1.0))
    return torch.cat([ends, centre[:, :, None]], dim=2), peak_ids, score


def endpoint_peaks(heat: torch.Tensor, offsets: torch.Tensor, top_k: int, down_ratio: int):
    """The top_k local maxima of each end-point heatmap.

    heat (B, 4, h, w) probabilities, offsets (B, 4, 2, h*w) -> input-pixel (x, y) (B, 4, K, 2) and scores (B, 4, K).
    """
    height, width = heat.shape[-2:]
    score, index = heatmap_peaks(heat).flatten(2).topk(min(top_k, height * width), dim=2)
    return cells_to_pixels(index, _gather_offsets(offsets, index), width, down_ratio), score


def centre_near(heat: torch.Tensor, offsets: torch.Tensor, points: torch.Tensor, down_ratio: int):
    """Centre evidence around input-pixel points (B, N, 2), given the centre heatmap (B, 1, h, w) and its
    offsets (B, 1, 2, h*w).

    Returns the 3x3 maximum of the heatmap around each point's cell (B, N) (one cell of slack: the points are
    intersections of four noisy predictions) and the centre (B, N, 2): that maximum's cell refined by its
    offset when it is a local peak, else the point itself.
    """
    height, width = heat.shape[-2:]
    cell = torch.div(points + 0.5, down_ratio, rounding_mode="floor").long()
    flat = cell[..., 1].clamp(0, height - 1) * width + cell[..., 0].clamp(0, width - 1)
    window_max, window_argmax = F.max_pool2d(heat, 3, stride=1, padding=1, return_indices=True)
    score = window_max.flatten(1).gather(1, flat)
    index = window_argmax.flatten(1).gather(1, flat)
    is_peak = heatmap_peaks(heat).flatten(1).gather(1, index) > 0
    refined = cells_to_pixels(index, _gather_offsets(offsets, index[:, None])[:, 0], width, down_ratio)
    return score, torch.where(is_peak[..., None], refined, points)


def ghosts(scores: torch.Tensor, shares_peak: torch.Tensor, conflict: torch.Tensor, boxes: torch.Tensor,
           supporters: int = 8) -> torch.Tensor:
    """Which candidates (B, N) are ghosts of two lesions: valid, and among the ``supporters`` best valid candidates
    with a smaller box that share an end-point peak with it, two do not conflict with each other (``conflict``
    (B, N, N), NMS's) and together score more than it.

    scores (B, N) (-1 = invalid), shares_peak (B, N, N), boxes (B, N, 4). Such a candidate is one lesion's ends
    and another's (two neighbours with aligned long axes: one's left end, the other's right end, the first's
    short axis and centre pass every check of a combination), and greedy NMS, taking it first about half the
    time, would suppress both lesions whose peaks it uses. Since a peak belongs to one lesion, the two explain
    those peaks with more evidence than the one (ExtremeNet's "ghost boxes", which it halves instead). Smaller
    boxes only: a real lesion between two neighbours is no ghost of the longer regroupings that borrow its ends.
    """
    valid = scores >= 0
    area = (boxes[..., 2:] - boxes[..., :2]).clamp_min(0).prod(-1)
    # supports[b, x, y]: y is a valid, smaller candidate sharing a peak with x (never x itself)
    supports = shares_peak & valid[:, None, :] & (area[:, None, :] < area[:, :, None])
    best, index = torch.where(supports, scores[:, None, :], torch.full_like(supports, -1.0, dtype=scores.dtype)).topk(
        min(supporters, scores.shape[1]), dim=2)  # (B, x, k): each x's best supporters, -1 = none
    batch, num, k = index.shape
    # conflict between x's supporters i and j: conflict[b, index[x, i], index[x, j]], gathered as (B, x, k, k)
    rows = conflict.gather(1, index.reshape(batch, num * k, 1).expand(-1, -1, num))  # (B, x*k, N)
    apart = ~rows.gather(2, index.repeat_interleave(k, dim=1)).reshape(batch, num, k, k)
    together = best[..., :, None] + best[..., None, :]
    pair = apart & (best[..., :, None] >= 0) & (best[..., None, :] >= 0) & (together > scores[:, :, None, None])
    return valid & pair.flatten(2).any(dim=-1)


def select_lesions(points: torch.Tensor, peak_ids: torch.Tensor, scores: torch.Tensor, max_lesions: int,
                   nms_iou: float, pre_nms: int) -> dict[str, torch.Tensor]:
    """Candidates points (B, N, 5, 2), their end-point peak ids (B, N, 4) and scores (B, N) (-1 = invalid) ->
    the :func:`group_keypoints` output after dropping :func:`ghosts` and greedy NMS on box IoU and shared peaks."""
    ranked, order = scores.topk(min(pre_nms, scores.shape[1]), dim=1)  # invalid ones, at -1, sort last
    points = points.gather(1, order[:, :, None, None].expand(-1, -1, NUM_POINTS, 2))
    peak_ids = peak_ids.gather(1, order[:, :, None].expand(-1, -1, NUM_ENDPOINTS))
    boxes = box_from_points(points)
    shares_peak = (peak_ids[:, :, None, :] == peak_ids[:, None, :, :]).any(dim=-1)
    conflict = shares_peak | (box_iou(boxes) > nms_iou)
    ranked = torch.where(ghosts(ranked, shares_peak, conflict, boxes), torch.full_like(ranked, -1.0), ranked)
    final, pick = greedy_select(ranked, conflict, min(max_lesions, ranked.shape[1]))
    return {"points": points.gather(1, pick[:, :, None, None].expand(-1, -1, NUM_POINTS, 2)),
            "scores": final.clamp_min(0.0), "boxes": boxes.gather(1, pick[:, :, None].expand(-1, -1, 4)),
            "valid": final >= 0}
