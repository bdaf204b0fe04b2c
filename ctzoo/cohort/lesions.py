"""The cohort's lesion level: every annotated DeepLesion lesion with its context (from ``DL_info.csv``) and its
image modality (RECIST-Net's pooled decoder features over its box), plus the detector's findings per key slice.

:func:`deeplesion_lesions` runs a detector bundle over every key slice of ``DL_info.csv``
(:func:`~ctzoo.training.lesion_features.annotated_lesion_features`) and returns:

* ``lesions``: one row per lesion (:data:`LESION_COLUMNS`): salted hashes (``lesion``, ``series``, ``patient``),
  the CSV's split and the patient's ``split_bucket`` (:func:`~ctzoo.cohort.context.split_bucket`), the coarse
  type, the context of its row (age, sex, spacing, window, normalised location, RECIST diameters), whether the
  detector found it at its operating point (``found``: IoU >= 0.5 with a finding at or above the bundle's score
  threshold, DeepLesion's criterion), and ``features`` True when its box lies in the frame (``frame`` x ``frame``
  pixels, the bundle's ``max_size``);
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

from ctzoo.cohort.context import AGE_BANDS, THICKNESS_BANDS, band, hashed, sex_code, split_bucket
from ctzoo.cohort.groups import lesion_found
from ctzoo.datasets.deeplesion.dataset import key_slice_items
from ctzoo.datasets.deeplesion.info_csv import LESION_TYPES, read_dl_info
from ctzoo.models.bundle import ModelBundle
from ctzoo.training.lesion_features import annotated_lesion_features

LESION_COLUMNS = ("lesion", "series", "patient", "key_slice", "split", "split_bucket", "type_code", "lesion_type",
                  "age_years", "age_band", "sex", "spacing_x_mm", "spacing_z_mm", "thickness_band", "window_low_hu",
                  "window_high_hu", "location_x", "location_y", "location_z", "long_mm", "short_mm", "found",
                  "features")
THUMBNAIL_SIZE = 256


def lesion_row(row, salt: str, index: int) -> dict[str, Any]:
    """The context of one DL_info.csv row (``index``: its place among its key slice's rows)."""
    x_mm, _, z_mm = row.spacing_mm_px
    return {"lesion": hashed(f"{row.file_name}#{index}", salt), "series": hashed(row.series_folder, salt),
            "patient": hashed(str(row.patient_index), salt), "key_slice": hashed(row.file_name, salt),
            "split": row.split, "split_bucket": split_bucket(str(row.patient_index)),
            "type_code": row.coarse_lesion_type,
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


def deeplesion_lesions(csv_path, bundle: ModelBundle, salt: str, device: str = "cpu",
                       progress=None) -> dict[str, Any]:
    """Run the detector ``bundle`` over ``csv_path``'s key slices
    (:func:`~ctzoo.training.lesion_features.annotated_lesion_features`): ``{"lesions", "features", "key_slices",
    "thumbnails", "feature_names", ...}`` (module docstring)."""
    items = key_slice_items(read_dl_info(csv_path), "all")  # the order and rows annotated_lesion_features uses
    prep = bundle.preprocessing
    windows = 1 + len(prep.extra_windows_hu)
    # pictures of the key slices the Individual view can show with a gate: those holding a typed lesion (all of
    # them when nothing is typed), so a full DeepLesion (32,000 key slices) does not write 32,000 of them
    pictured = [any(row.coarse_lesion_type >= 1 for row in item["lesions"]) for item in items]
    pictured = pictured if any(pictured) else [True] * len(items)
    pictures: dict[int, bytes] = {}

    def picture(index: int, image) -> None:  # cut from the very tensors the network sees
        if pictured[index]:
            pictures[index] = thumbnail_png(image, prep.num_slices, windows)

    computed = annotated_lesion_features(csv_path, bundle, device, progress, picture)
    lesions, features, key_slices, thumbnails = [], [], [], {}
    for index, key_slice in enumerate(computed):
        found = key_slice.findings
        rows = [lesion_row(row, salt, k) for k, row in enumerate(key_slice.item["lesions"])]
        entry = {"key_slice": rows[0]["key_slice"], "series": rows[0]["series"], "split": key_slice.item["split"],
                 "lesions": [row["lesion"] for row in rows], "truth_boxes": key_slice.boxes,
                 "boxes": np.round(found["boxes"].astype(np.float64), 2).tolist(),
                 "scores": np.round(found["scores"].astype(np.float64), 5).tolist(),
                 "points": np.round(found["points"].astype(np.float64), 2).tolist()}
        hits = lesion_found([entry], bundle.score_threshold)  # the Group view's own matching (IoU >= 0.5)
        for row, box in zip(rows, key_slice.boxes):
            if box is not None:
                row |= {"features": True, "found": hits[row["lesion"]]}
        lesions += rows
        features.append(key_slice.features)
        key_slices.append(entry)
        if index in pictures:
            thumbnails[rows[0]["key_slice"]] = pictures[index]
    width = features[0].shape[1] if features else 0
    return {"lesions": lesions, "features": np.concatenate(features) if features else np.zeros((0, width)),
            "key_slices": key_slices, "thumbnails": thumbnails,
            "feature_names": [f"recist_f{k:02d}" for k in range(width)], "score_threshold": bundle.score_threshold,
            "model": bundle.name, "frame": prep.max_size}
