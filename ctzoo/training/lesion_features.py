"""Pooled RECIST-Net features of DeepLesion's annotated lesions: a detector bundle run over every key slice of a
``DL_info.csv`` (its own preprocessing, centred pad/crop to its ``max_size``; one forward pass per batch through
:func:`~ctzoo.training.recistnet_task.evaluate_decodings`), each annotated lesion's box pooled
(:func:`~ctzoo.models.recistnet.pool_box_features`). Used by ``ctzoo cohort`` (the lesion level) and ``ctzoo smap
features`` (a site's lesion embeddings)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctzoo.datasets.deeplesion.dataset import (
    DeepLesionConfig,
    deeplesion_dataloader,
    deeplesion_dataset,
    key_slice_items,
    patient_rows,
)
from ctzoo.datasets.keypoint_transforms import recist_eval_transforms
from ctzoo.models.bundle import ModelBundle
from ctzoo.training.recistnet_task import evaluate_decodings

#: Findings kept per key slice for a FROC: all above this score (a bundle's operating point is higher).
MIN_SCORE = 0.01


@dataclass
class KeySliceFeatures:
    """One key slice: its DL_info.csv rows, the detector's findings on it and each row's pooled features."""

    item: dict[str, Any]  # key_slice_items' entry: file_name, split, lesions (the rows, in CSV order)
    findings: dict[str, Any]  # boxes (M, 4), scores (M,), points (M, 5, 2) in the evaluated frame
    features: np.ndarray  # (len(rows), F) float32, zeros where the lesion's box fell outside the frame
    boxes: list[list[float] | None]  # each row's box in the evaluated frame, None outside it


def annotated_lesion_features(csv_path: str | Path, bundle: ModelBundle, device: str = "cpu",
                              progress: Callable[[Iterable], Iterable] | None = None,
                              on_image: Callable[[int, torch.Tensor], None] | None = None,
                              patients: set[int] | None = None) -> list[KeySliceFeatures]:
    """Run the detector ``bundle`` over ``csv_path``'s key slices (all splits, noisy rows dropped as the loader
    does; only ``patients``' when given): one :class:`KeySliceFeatures` per key slice, in :func:`key_slice_items`
    order. ``on_image(index, image (C, H, W))`` sees every network input (for pictures); ``progress`` wraps the
    batches (a bar)."""
    if bundle.task != "detection":
        raise ValueError(f"{bundle.name} is a {bundle.task} model: lesion features need a RECIST-Net detector")
    csv_path = Path(csv_path)
    cfg = DeepLesionConfig(root=csv_path.parent, info_csv=csv_path.name, **bundle.preprocessing.model_dump())
    items = key_slice_items(patient_rows(csv_path, patients), "all", cfg.drop_noisy)  # the dataset's items
    transform = recist_eval_transforms((cfg.max_size, cfg.max_size), lesion_keys=("lesion_index",))
    loader = deeplesion_dataloader(deeplesion_dataset(cfg, "all", transform=transform, patients=patients),
                                   batch_size=4, shuffle=False, num_workers=0)
    seen = 0

    def batches():
        nonlocal seen
        for batch in (loader if progress is None else progress(loader)):
            for image in batch["image"]:
                if on_image is not None:
                    on_image(seen, image)
                seen += 1
            yield batch

    model = bundle.network().to(device).eval()
    _, detections, truth = evaluate_decodings(model, batches(), torch.device(device), ("both",), min_score=MIN_SCORE,
                                              pool_features=True)["both"]
    width = next((t["features"].shape[1] for t in truth if len(t["features"])), 0)
    key_slices = []
    for item, found, true in zip(items, detections, truth, strict=True):
        pooled = np.zeros((len(item["lesions"]), width), dtype=np.float32)
        boxes: list[list[float] | None] = [None] * len(item["lesions"])
        for k, index in enumerate(true["lesion_index"]):
            pooled[index] = true["features"][k]
            boxes[index] = np.round(true["boxes"][k].astype(np.float64), 2).tolist()
        key_slices.append(KeySliceFeatures(item, found, pooled, boxes))
    return key_slices
