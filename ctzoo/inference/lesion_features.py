"""Pooled RECIST-Net features of a volume's findings: each finding of a ``detections.json`` document gets the mean
of the decoder's features over the box of its four end points on its key slice's network input
(:func:`~ctzoo.models.recistnet.pool_box_features`), the slice input being the one ``ctzoo infer`` feeds
(:func:`~ctzoo.inference.recist_volume.slice_inputs`). Used by ``ctzoo cohort`` (the CT series' findings) and
``ctzoo smap features`` (a site's lesion embeddings)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ctzoo.inference.recist_volume import canvas_size, slice_inputs
from ctzoo.io import reorient_lps
from ctzoo.io.volume import Volume
from ctzoo.models.bundle import ModelBundle
from ctzoo.models.recistnet import pool_box_features


def finding_features(bundle: ModelBundle, volume: Volume, document: dict[str, Any],
                     device: str = "cpu") -> dict[str, Any]:
    """Per finding of a ``detections.json`` ``document`` on ``volume``: ``findings`` (score, long axis, slice, points
    in mm, box in the network input's frame, pooled ``features``), the network input of the top finding's slice
    (``top_input`` (C, frame, frame), None without findings), the findings on it (``on_picture``: box, score) and
    the ``frame`` side in pixels."""
    axial = reorient_lps(volume)
    to_axial = np.linalg.inv(axial.affine_lps)
    wanted: dict[int, list[tuple[int, np.ndarray]]] = {}
    for n, lesion in enumerate(document["lesions"]):
        # from the input's voxels through both grids: points_mm sit where the slices really are, which beside a
        # missing slice is not where the grids put them
        grid_mm = volume.index_to_lps(np.asarray(lesion["points_voxel"], dtype=np.float64))
        ijk = grid_mm @ to_axial[:3, :3].T + to_axial[:3, 3]
        wanted.setdefault(int(round(ijk[4, 2])), []).append((n, ijk[:, :2]))
    if not wanted:
        return {"findings": [], "top_input": None, "on_picture": [], "frame": None}
    findings: list[dict[str, Any]] = [{} for _ in document["lesions"]]
    top = max(range(len(findings)), key=lambda n: document["lesions"][n]["score"])
    top_input, on_picture = None, []
    network = bundle.network().to(device).eval()
    prep = bundle.preprocessing
    frame = canvas_size(prep)
    for k, (image, scale) in enumerate(slice_inputs(axial, prep, frame)):
        if k > max(wanted):
            break
        if k not in wanted:
            continue
        with torch.no_grad():
            features = network.feature_map(image[None].to(device))[0].float().cpu()
        here = []
        for n, xy in wanted[k]:
            pixels = (xy + 0.5) * np.asarray(scale) - 0.5  # the slice's own pixels -> the network's input
            box = [*pixels[:4].min(axis=0), *pixels[:4].max(axis=0)]
            pooled = pool_box_features(features, torch.tensor([box], dtype=torch.float32), network.down_ratio)[0]
            lesion = document["lesions"][n]
            findings[n] = {"score": lesion["score"], "long_axis_mm": lesion["long_axis_mm"], "slice": lesion["slice"],
                           "points_mm": lesion["points_mm"],
                           "box": np.round(np.asarray(box, dtype=np.float64), 2).tolist(),
                           "features": np.round(pooled.numpy().astype(np.float64), 5).tolist()}
            here.append({"box": findings[n]["box"], "score": lesion["score"]})
        if any(n == top for n, _ in wanted[k]):
            top_input, on_picture = image, here
    return {"findings": [finding for finding in findings if finding], "top_input": top_input,
            "on_picture": on_picture, "frame": frame}
