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

from ctzoo.cohort.lesions import thumbnail_png
from ctzoo.inference.lesion_features import finding_features
from ctzoo.inference.segment_volume import seg_summary
from ctzoo.inference.tasks import ModelTask, run_task
from ctzoo.io.volume import Volume
from ctzoo.models.bundle import ModelBundle


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
    """:func:`~ctzoo.inference.lesion_features.finding_features` with the top finding's slice as a ``picture``
    (PNG, :func:`~ctzoo.cohort.lesions.thumbnail_png`) in place of its network input."""
    level = finding_features(bundle, volume, document, device)
    image = level.pop("top_input")
    prep = bundle.preprocessing
    level["picture"] = None if image is None else thumbnail_png(image, prep.num_slices, 1 + len(prep.extra_windows_hu))
    return level


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
