"""The cohort table's image modality, summarised from the zoo models' outputs on each series (the same stages
``ctzoo infer`` runs, :func:`~ctzoo.inference.tasks.run_task`):

* a detector (RECIST-Net): ``findings`` at its operating point, the largest finding's ``finding_long_mm`` and the
  highest ``finding_score`` (None without findings);
* a segmenter: ``<organ>_ml`` per class, as ``segmentation.json`` reports it
  (:func:`~ctzoo.inference.segment_volume.seg_summary`; 0 for an organ not found).

Column names carry no model name when one detector and one segmenter run (the usual pair); with several of a kind,
later ones are prefixed ``<model>:``.

:func:`finding_level` gives each finding of the (first) detector its pooled decoder features, pooled as the lesion
level pools DeepLesion's lesions (:mod:`ctzoo.cohort.lesions`), and a picture of the slice of the highest-scoring
finding with every finding of that slice drawn: ``build`` writes them to ``findings.json`` and ``thumbnails/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ctzoo.cohort.lesions import thumbnail_png
from ctzoo.inference.recist_volume import canvas_size, slice_inputs
from ctzoo.inference.segment_volume import seg_summary
from ctzoo.inference.tasks import ModelTask, run_task
from ctzoo.io import reorient_lps
from ctzoo.io.volume import Volume
from ctzoo.models.bundle import ModelBundle
from ctzoo.models.recistnet import pool_box_features


def detector_columns(document: dict[str, Any]) -> dict[str, Any]:
    """``findings``, ``finding_long_mm``, ``finding_score`` of a ``detections.json`` document."""
    lesions = document["lesions"]
    return {"findings": len(lesions),
            "finding_long_mm": max((lesion["long_axis_mm"] for lesion in lesions), default=None),
            "finding_score": max((lesion["score"] for lesion in lesions), default=None)}


def segmenter_columns(labels: Any, volume: Volume, class_names: Sequence[str]) -> dict[str, Any]:
    """``<organ>_ml`` of a label map on ``volume``."""
    classes = seg_summary(labels, volume, class_names)["classes"]
    return {f"{name}_ml": classes[name]["volume_ml"] for name in class_names}


def finding_level(bundle: ModelBundle, volume: Volume, document: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Per finding of a ``detections.json`` ``document`` on ``volume``: its score, long axis, slice and pooled
    features (the box of its four end points on its slice's network input, :func:`pool_box_features`); and the
    network input of the top finding's slice as a picture (``frame`` x ``frame`` pixels) and the findings on it
    (``on_picture``: box in that frame, score)."""
    axial = reorient_lps(volume)
    to_axial = np.linalg.inv(axial.affine_lps)
    wanted: dict[int, list[tuple[int, np.ndarray]]] = {}
    for n, lesion in enumerate(document["lesions"]):
        ijk = np.asarray(lesion["points_mm"], dtype=np.float64) @ to_axial[:3, :3].T + to_axial[:3, 3]
        wanted.setdefault(int(round(ijk[4, 2])), []).append((n, ijk[:, :2]))
    if not wanted:
        return {"findings": [], "picture": None, "on_picture": [], "frame": None}
    findings: list[dict[str, Any]] = [{} for _ in document["lesions"]]
    top = max(range(len(findings)), key=lambda n: document["lesions"][n]["score"])
    picture, on_picture = None, []
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
            picture = thumbnail_png(image, prep.num_slices, 1 + len(prep.extra_windows_hu))
            on_picture = here
    return {"findings": [finding for finding in findings if finding], "picture": picture, "on_picture": on_picture,
            "frame": frame}


def image_columns(volume: Volume, tasks: Sequence[ModelTask], class_names: dict[str, Sequence[str]],
                  outputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The image modality of one series: every task run on ``volume``, its outputs summarised
    (``class_names``: each segmentation task's classes, by model name); each task's raw output goes into
    ``outputs`` (by model name) when given."""
    row: dict[str, Any] = {}
    seen: set[str] = set()
    for task in tasks:
        output = run_task(task, volume)
        if outputs is not None:
            outputs[task.model_name] = output
        columns = (segmenter_columns(output, volume, class_names[task.model_name]) if task.task == "segmentation"
                   else detector_columns(output))
        prefix = f"{task.model_name}:" if task.task in seen else ""
        seen.add(task.task)
        row |= {f"{prefix}{name}": value for name, value in columns.items()}
    return row
