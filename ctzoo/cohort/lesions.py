"""The cohort's lesion level: every annotated DeepLesion lesion with its context (from ``DL_info.csv``) and its
image modality (RECIST-Net's pooled decoder features over its box), plus the detector's findings per key slice.

:func:`deeplesion_lesions` runs a detector bundle over every key slice of ``DL_info.csv`` (the bundle's own
preprocessing; centred pad/crop to its ``max_size``), one forward pass per batch, and returns:

* ``lesions``: one row per lesion (:data:`LESION_COLUMNS`): salted hashes (``lesion``, ``series``, ``patient``),
  the split, the coarse type, the context of its row (age, sex, spacing, window, normalised location, RECIST
  diameters), whether the detector found it at its operating point (``found``: IoU >= 0.5 with a finding at or above
  the bundle's score threshold, DeepLesion's criterion), and ``features`` True when its box lies in the frame
  (``frame`` x ``frame`` pixels, the bundle's ``max_size``);
* ``features``: ``(N, F)`` float32, aligned with ``lesions`` (zeros where ``features`` is False);
* ``key_slices``: per key slice its series hash, split, truth boxes (in the order of its ``lesion`` hashes) and
  every finding above 0.01 (boxes, scores): what subgroup FROC needs;
* ``thumbnails``: per key slice holding a typed lesion (every key slice when none is typed) a 256 x 256 8-bit PNG
  of its centre slice in the soft-tissue window (the frame the boxes are in, scaled), for the Individual view.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from ctzoo.cohort.context import AGE_BANDS, THICKNESS_BANDS, band, hashed, sex_code
from ctzoo.datasets.deeplesion.dataset import (
    DeepLesionConfig,
    deeplesion_dataloader,
    deeplesion_dataset,
    key_slice_items,
)
from ctzoo.datasets.deeplesion.info_csv import LESION_TYPES, read_dl_info
from ctzoo.datasets.keypoint_transforms import recist_eval_transforms
from ctzoo.models.bundle import ModelBundle
from ctzoo.training.froc import box_iou_voc
from ctzoo.training.recistnet_task import evaluate_decodings

LESION_COLUMNS = ("lesion", "series", "patient", "key_slice", "split", "type_code", "lesion_type", "age_years",
                  "age_band", "sex", "spacing_x_mm", "spacing_z_mm", "thickness_band", "window_low_hu",
                  "window_high_hu", "location_x", "location_y", "location_z", "long_mm", "short_mm", "found",
                  "features")
THUMBNAIL_SIZE = 256
#: Findings kept per key slice for the FROC: all above this score (the bundle's operating point is higher).
MIN_SCORE = 0.01


def lesion_row(row, salt: str, index: int) -> dict[str, Any]:
    """The context of one DL_info.csv row (``index``: its place among its key slice's rows)."""
    x_mm, _, z_mm = row.spacing_mm_px
    return {"lesion": hashed(f"{row.file_name}#{index}", salt), "series": hashed(row.series_folder, salt),
            "patient": hashed(str(row.patient_index), salt), "key_slice": hashed(row.file_name, salt),
            "split": row.split, "type_code": row.coarse_lesion_type,
            "lesion_type": LESION_TYPES[row.coarse_lesion_type], "age_years": row.patient_age,
            "age_band": band(row.patient_age, AGE_BANDS), "sex": sex_code(row.patient_gender),
            "spacing_x_mm": x_mm, "spacing_z_mm": z_mm, "thickness_band": band(z_mm, THICKNESS_BANDS),
            "window_low_hu": row.dicom_windows[0], "window_high_hu": row.dicom_windows[1],
            "location_x": row.normalized_lesion_location[0], "location_y": row.normalized_lesion_location[1],
            "location_z": row.normalized_lesion_location[2],
            "long_mm": round(row.lesion_diameters_px[0] * x_mm, 3),
            "short_mm": round(row.lesion_diameters_px[1] * x_mm, 3),
            "found": False, "features": False}


def thumbnail_png(image: torch.Tensor, num_slices: int, windows: int) -> bytes:
    """The centre slice of ``image`` (C, H, W) in its soft-tissue window (the first extra window; the only one
    when there is none), 8-bit, resized to :data:`THUMBNAIL_SIZE`."""
    channel = (1 if windows > 1 else 0) * num_slices + num_slices // 2
    plane = np.clip(image[channel].float().numpy(), 0.0, 1.0)
    picture = Image.fromarray((plane * 255).round().astype(np.uint8)).resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE),
                                                                            Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def found_lesions(truth_boxes: np.ndarray, boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Per truth box: does a finding at or above ``threshold`` overlap it with IoU >= 0.5?"""
    kept = boxes[scores >= threshold]
    if len(truth_boxes) == 0 or len(kept) == 0:
        return np.zeros(len(truth_boxes), dtype=bool)
    return (box_iou_voc(truth_boxes, kept) >= 0.5).any(axis=1)


def deeplesion_lesions(csv_path, bundle: ModelBundle, salt: str, device: str = "cpu",
                       progress=None) -> dict[str, Any]:
    """Run the detector ``bundle`` over ``csv_path``'s key slices: ``{"lesions", "features", "key_slices",
    "thumbnails", "feature_names"}`` (module docstring)."""
    if bundle.task != "detection":
        raise ValueError(f"{bundle.name} is a {bundle.task} model: lesion features need a RECIST-Net detector")
    spec = bundle.preprocessing.model_dump()
    cfg = DeepLesionConfig(root=csv_path.parent, info_csv=csv_path.name, **spec)
    size = (cfg.max_size, cfg.max_size)
    items = key_slice_items(read_dl_info(csv_path), "all", cfg.drop_noisy)
    dataset = deeplesion_dataset(cfg, "all", transform=recist_eval_transforms(size, lesion_keys=("lesion_index",)))
    model = bundle.network().to(device).eval()
    loader = deeplesion_dataloader(dataset, batch_size=4, shuffle=False, num_workers=0)
    thumbnails: list[bytes | None] = []
    windows = 1 + len(cfg.extra_windows_hu)
    # pictures of the key slices the Individual view can show with a gate: those holding a typed lesion (all of
    # them when nothing is typed), so a full DeepLesion (32,000 key slices) does not write 32,000 of them
    pictured = [any(row.coarse_lesion_type >= 1 for row in item["lesions"]) for item in items]
    pictured = pictured if any(pictured) else [True] * len(items)

    def batches():  # the thumbnails are cut from the very tensors the network sees
        for batch in (loader if progress is None else progress(loader)):
            thumbnails.extend(thumbnail_png(image, cfg.num_slices, windows) if pictured[len(thumbnails)] else None
                              for image in batch["image"])
            yield batch

    device_ = torch.device(device)
    _, detections, truth = evaluate_decodings(model, batches(), device_, ("both",), min_score=MIN_SCORE,
                                              pool_features=True)["both"]
    lesions, features, key_slices = [], [], []
    width = next((t["features"].shape[1] for t in truth if len(t["features"])), 0)
    for item, found, true, png in zip(items, detections, truth, thumbnails, strict=True):
        rows = [lesion_row(row, salt, index) for index, row in enumerate(item["lesions"])]
        pooled = np.zeros((len(rows), width), dtype=np.float32)
        boxes: list[list[float] | None] = [None] * len(rows)  # None: the lesion's box fell outside the frame
        hits = found_lesions(true["boxes"], found["boxes"], found["scores"], bundle.score_threshold)
        for k, index in enumerate(true["lesion_index"]):
            pooled[index], boxes[index] = true["features"][k], np.round(true["boxes"][k].astype(np.float64), 2).tolist()
            rows[index] |= {"features": True, "found": bool(hits[k])}
        lesions += rows
        features.append(pooled)
        key_slices.append({"key_slice": rows[0]["key_slice"], "series": rows[0]["series"], "split": item["split"],
                           "lesions": [row["lesion"] for row in rows],
                           "truth_boxes": boxes,
                           "boxes": np.round(found["boxes"].astype(np.float64), 2).tolist(),
                           "scores": np.round(found["scores"].astype(np.float64), 5).tolist(),
                           "points": np.round(found["points"].astype(np.float64), 2).tolist()})
    return {"lesions": lesions, "features": np.concatenate(features) if features else np.zeros((0, width)),
            "key_slices": key_slices,
            "thumbnails": {k["key_slice"]: png for k, png in zip(key_slices, thumbnails) if png is not None},
            "feature_names": [f"recist_f{k:02d}" for k in range(width)], "score_threshold": bundle.score_threshold,
            "model": bundle.name, "frame": cfg.max_size}
