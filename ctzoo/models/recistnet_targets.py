"""RECIST-Net training targets and losses (CenterNet ``exdet``: Gaussian heatmaps, focal loss, offset L1).

Coordinates follow :mod:`ctzoo.models.recistnet`: an input pixel point ``x`` lies at heatmap coordinate
``c = (x + 0.5) / R - 0.5`` (``R = down_ratio``, cell centres at integers). Its cell is ``round(c)`` =
``floor((x + 0.5) / R)``, the cell whose pixels contain it, and its offset target is ``c - cell`` in
[-0.5, 0.5), so that ``x = (cell + offset + 0.5) * R - 0.5`` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ctzoo.datasets.deeplesion.recist import box_from_points

NUM_POINTS = 5


def gaussian_radius(det_size: tuple[float, float], min_overlap: float = 0.7) -> float:
    """CenterNet's ``gaussian_radius`` for a box of (height, width) cells, kept as CenterNet ships it
    (its quadratic roots divide by 2 instead of 2a; published CenterNet results use exactly this)."""
    height, width = det_size
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def gaussian_2d(radius: int) -> np.ndarray:
    """(2r+1, 2r+1) Gaussian with sigma = (2r+1)/6 and exactly 1 at its centre (CenterNet ``gaussian2D``)."""
    sigma = (2 * radius + 1) / 6
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    g = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    g[g < np.finfo(g.dtype).eps * g.max()] = 0
    return g


def draw_gaussian(heatmap: np.ndarray, centre: tuple[int, int], radius: int) -> None:
    """Draw a Gaussian peak at integer cell ``centre`` (u, v) into heatmap (h, w) in place, by elementwise max,
    so nearby lesions never lower each other's peaks (CenterNet ``draw_umich_gaussian``)."""
    g = gaussian_2d(radius)
    u, v = centre
    height, width = heatmap.shape
    left, right = min(u, radius), min(width - u, radius + 1)
    top, bottom = min(v, radius), min(height - v, radius + 1)
    region = heatmap[v - top:v + bottom, u - left:u + right]
    np.maximum(region, g[radius - top:radius + bottom, radius - left:radius + right], out=region)


def point_cells(points: np.ndarray, down_ratio: int) -> tuple[np.ndarray, np.ndarray]:
    """Input-pixel points (..., 2) -> their integer cells (..., 2) and sub-cell offsets (..., 2) in [-0.5, 0.5)."""
    scaled = (np.asarray(points, dtype=np.float64) + 0.5) / down_ratio
    cells = np.floor(scaled)
    return cells.astype(np.int64), scaled - 0.5 - cells


#: Smallest Gaussian radius (cells). CenterNet's formula gives radius 0 (a single hot cell) for lesions only a few
#: cells wide, which most DeepLesion lesions are at stride 4; a one-cell target among thousands gives the focal
#: loss almost no gradient early on, so small lesions get at least this much spread.
MIN_RADIUS = 2


def make_targets(keypoints: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor] | None,
                 image_size: tuple[int, int], down_ratio: int = 4, max_objects: int = 32,
                 min_radius: int = MIN_RADIUS) -> dict[str, torch.Tensor]:
    """Targets for a batch of B images of ``image_size`` (H, W), both multiples of ``down_ratio``.

    Args:
        keypoints: per image, (N_i, 5, 2) input-pixel (x, y) points in :mod:`.recist` order (N_i may be 0).
        boxes: per image, (N_i, 4) boxes used to size each lesion's Gaussian (DeepLesion's padded boxes);
            None uses the tight box of the end points.

    Returns (all on CPU):
        ``heatmaps`` (B, 5, H/R, W/R) float32 in [0, 1], 1 exactly at each point's cell;
        ``offset_targets`` (B, max_objects, 5, 2) float32 sub-cell offsets in cells;
        ``displacement_targets`` (B, max_objects, 4, 2) float32: each end point minus its centre's cell, in
        cells (what the displacement head predicts at the centre; valid where the centre is on the grid);
        ``indices`` (B, max_objects, 5) int64 flat cell indices v * (W/R) + u (0 where unused);
        ``mask`` (B, max_objects) bool, a lesion with at least one point on the grid;
        ``point_mask`` (B, max_objects, 5) bool, that point is on the grid.
    Points off the output grid are skipped (no peak, no offset). Lesions beyond ``max_objects`` still get
    their heatmap peaks but no offset targets.
    """
    height, width = image_size[0] // down_ratio, image_size[1] // down_ratio
    batch = len(keypoints)
    heatmaps = np.zeros((batch, NUM_POINTS, height, width), dtype=np.float32)
    offsets = np.zeros((batch, max_objects, NUM_POINTS, 2), dtype=np.float32)
    displacements = np.zeros((batch, max_objects, NUM_POINTS - 1, 2), dtype=np.float32)
    indices = np.zeros((batch, max_objects, NUM_POINTS), dtype=np.int64)
    point_mask = np.zeros((batch, max_objects, NUM_POINTS), dtype=bool)
    for b in range(batch):
        points = torch.as_tensor(keypoints[b]).detach().cpu().double().numpy().reshape(-1, NUM_POINTS, 2)
        if boxes is None:
            sizes = box_from_points(points).reshape(-1, 4)
        else:
            sizes = torch.as_tensor(boxes[b]).detach().cpu().double().numpy().reshape(-1, 4)
        cells, remainders = point_cells(points, down_ratio)
        inside = (cells[..., 0] >= 0) & (cells[..., 0] < width) & (cells[..., 1] >= 0) & (cells[..., 1] < height)
        for n in range(points.shape[0]):
            box_h, box_w = (sizes[n, 3] - sizes[n, 1]) / down_ratio, (sizes[n, 2] - sizes[n, 0]) / down_ratio
            radius = max(min_radius, int(gaussian_radius((math.ceil(box_h), math.ceil(box_w)))))
            for k in np.flatnonzero(inside[n]):
                draw_gaussian(heatmaps[b, k], (int(cells[n, k, 0]), int(cells[n, k, 1])), radius)
            if n < max_objects:
                point_mask[b, n] = inside[n]
                offsets[b, n] = np.where(inside[n, :, None], remainders[n], 0.0)
                displacements[b, n] = (cells[n, :-1] + remainders[n, :-1]) - cells[n, -1]
                indices[b, n] = np.where(inside[n], cells[n, :, 1] * width + cells[n, :, 0], 0)
    return {"heatmaps": torch.from_numpy(heatmaps), "offset_targets": torch.from_numpy(offsets),
            "displacement_targets": torch.from_numpy(displacements),
            "indices": torch.from_numpy(indices), "mask": torch.from_numpy(point_mask.any(-1)),
            "point_mask": torch.from_numpy(point_mask)}


def focal_loss(pred_logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0,
               positives: torch.Tensor | None = None) -> torch.Tensor:
    """CornerNet focal loss of logits vs Gaussian target (same shape), normalised by the number of positives
    (cells where target == 1; at least 1), or by ``positives`` when given (:func:`loss_counts`).

    pos: -log(p) (1-p)^alpha; neg: -log(1-p) p^alpha (1-y)^beta. Computed in float32 from log-sigmoids with
    autocast off, so fp16/bf16 logits neither overflow nor hit log(0) (CenterNet clamps p instead).
    """
    with torch.autocast(device_type=pred_logits.device.type, enabled=False):
        logits, target = pred_logits.float(), target.float()
        positive = target >= 1.0
        prob = torch.sigmoid(logits)
        pos_loss = F.logsigmoid(logits) * (1 - prob).pow(alpha)
        neg_loss = F.logsigmoid(-logits) * prob.pow(alpha) * (1 - target).pow(beta)
        total = torch.where(positive, pos_loss, neg_loss).sum()
        count = positive.sum() if positives is None else positives
        return -total / count.clamp_min(1).to(total.dtype)


def gather_offsets(pred_offsets: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """pred_offsets (B, 10, h, w) at indices (B, K, 5) -> (B, K, 5, 2): each point's (dx, dy) at its own cell."""
    batch, _, height, width = pred_offsets.shape
    flat = pred_offsets.reshape(batch, NUM_POINTS, 2, height * width)
    index = indices.permute(0, 2, 1)[:, :, None, :].expand(-1, -1, 2, -1)  # (B, 5, 2, K)
    return flat.gather(3, index).permute(0, 3, 1, 2)


def _point_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, K, 5): a per-lesion mask (B, K) spread over its points; a per-point one as it is."""
    return mask[:, :, None].expand(-1, -1, NUM_POINTS) if mask.dim() == 2 else mask


def _centre_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, K): the lesions whose centre (the last point) is on the grid."""
    return mask[..., -1] if mask.dim() == 3 else mask


def offset_loss(pred_offsets: torch.Tensor, offset_targets: torch.Tensor, indices: torch.Tensor,
                mask: torch.Tensor, points: torch.Tensor | None = None) -> torch.Tensor:
    """L1 between gathered offsets and offset_targets (B, K, 5, 2), averaged over masked coordinates
    (CenterNet ``RegL1Loss``). ``mask`` is (B, K) per lesion or (B, K, 5) per point; ``points``, when given,
    replaces the masked points' count in the average (:func:`loss_counts`)."""
    weight = _point_mask(mask)[..., None].to(torch.float32)
    error = (gather_offsets(pred_offsets.float(), indices) - offset_targets.float()).abs() * weight
    return error.sum() / (2 * (weight.sum() if points is None else points) + 1e-4)


def displacement_loss(pred_displacements: torch.Tensor, displacement_targets: torch.Tensor, indices: torch.Tensor,
                      centre_mask: torch.Tensor, centres: torch.Tensor | None = None) -> torch.Tensor:
    """L1 between the displacements (B, 8, h, w) read at each lesion's centre cell ``indices`` (B, K) and
    displacement_targets (B, K, 4, 2), averaged over lesions whose centre is on the grid (``centre_mask``
    (B, K)), or over ``centres`` lesions when given (:func:`loss_counts`) (CenterNet ``multi_pose``'s keypoint
    regression)."""
    batch, channels, height, width = pred_displacements.shape
    flat = pred_displacements.float().reshape(batch, channels, height * width)
    predicted = flat.gather(2, indices[:, None, :].expand(-1, channels, -1)).permute(0, 2, 1)  # (B, K, 8)
    weight = centre_mask[..., None].to(torch.float32)
    error = (predicted - displacement_targets.float().reshape(batch, -1, channels)).abs() * weight
    return error.sum() / (channels * (weight.sum() if centres is None else centres) + 1e-4)


def loss_counts(targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """What :func:`recistnet_loss` divides by, float32 (7,) on the targets' device: the positive cells of each of
    the five heatmaps, the points with an offset target, the lesions with a displacement target. Data-parallel
    training sums them over the processes and passes the sums (``counts``): each process's loss is then its share
    of the whole step's, normalised as one process would normalise the global batch."""
    mask = _loss_mask(targets)
    positives = (targets["heatmaps"] >= 1.0).sum(dim=(0, 2, 3))
    return torch.cat([positives.float(), _point_mask(mask).sum().float()[None],
                      _centre_mask(mask).sum().float()[None]])


def _loss_mask(targets: dict[str, torch.Tensor]) -> torch.Tensor:
    return targets["point_mask"] if "point_mask" in targets else targets["mask"]


def recistnet_loss(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], offset_weight: float = 1.0,
                   displacement_weight: float = 0.1,
                   counts: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Total = sum over the five heatmaps of their focal losses (as CenterNet ``exdet`` sums its five) +
    ``offset_weight`` x offset L1 (with ``point_mask`` where present) + ``displacement_weight`` x displacement
    L1 when the outputs have ``displacements`` (0.1, CenterNet's weight for its size regression, since these
    too are lengths of several cells). Targets are moved to the outputs' device. Each term is normalised by
    ``targets``' own :func:`loss_counts`, or by ``counts`` when given (data-parallel training: their sums over
    the processes). Returns (total, {"heatmap": float, "offset": float[, "displacement": float]})."""
    device = outputs["heatmaps"].device
    heat_target = targets["heatmaps"].to(device)
    counts = (loss_counts(targets) if counts is None else counts).to(device)
    heat = sum(focal_loss(outputs["heatmaps"][:, k], heat_target[:, k], positives=counts[k])
               for k in range(NUM_POINTS))
    mask = _loss_mask(targets)
    offset = offset_loss(outputs["offsets"], targets["offset_targets"].to(device), targets["indices"].to(device),
                         mask.to(device), points=counts[NUM_POINTS])
    total = heat + offset_weight * offset
    parts = {"heatmap": float(heat.detach()), "offset": float(offset.detach())}
    if "displacements" in outputs:
        displacement = displacement_loss(outputs["displacements"], targets["displacement_targets"].to(device),
                                         targets["indices"][..., -1].to(device), _centre_mask(mask).to(device),
                                         centres=counts[NUM_POINTS + 1])
        total = total + displacement_weight * displacement
        parts["displacement"] = float(displacement.detach())
    return total, parts
