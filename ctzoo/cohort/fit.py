"""``ctzoo cohort fit``: the gated image + context model on a cohort's lesions, against image-only and
context-only models of the same size in the same run (:mod:`ctzoo.cohort.gated`).

The target is DeepLesion's coarse lesion type (HealthPrism reports mean AUC over classes; so does this). Inputs:

* **image**: RECIST-Net's pooled decoder features of each lesion's box (``COHORT/lesion_features.npy``);
* **context**, one of :data:`CONTEXT_SETS`: ``csv`` is all DL_info.csv gives (age, sex, spacing, the DICOM window,
  normalised location, RECIST diameters); ``study`` only what the study's header gives (age, sex, spacing), so the
  image has to carry the type.

Only typed lesions are used (DeepLesion types its val and test lesions only, and the miniature copies that), and
at least two types, with two in the test split (else no test AUC: ValueError). The CSV's split is used when its
train split holds typed lesions and it keeps every patient in one split; otherwise the typed lesions are split
again **by patient**, 60/20/20 over the patients' split buckets (:func:`patient_splits`: the same patients and
``split_seed`` give the same split in every build, whatever the salt); ``split_rule`` says which split was used,
and why the CSV's was not where it had one. Each modality is fitted at several seeds; the epoch is chosen on
validation, the AUC reported on test. The first seed's gated model gives the stored per-lesion gates, probabilities
and Integrated Gradients.

Written to ``COHORT/fit/``: ``fit.json`` (:func:`fit_cohort`'s document; strict JSON, null where a value is NaN),
``predictions.csv`` (one row per typed lesion) and ``gated.pt`` (the state dict and what rebuilds it).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections import Counter
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctzoo.cohort.gated import ModalityData, feature_importance, fit_gated, standardised
from ctzoo.cohort.table import FIT_DIR, LESIONS_FILE, read_lesions
from ctzoo.datasets.deeplesion.info_csv import LESION_TYPES
from ctzoo.io.atomic import atomic_folder

FIT_FILE, PREDICTIONS_FILE, WEIGHTS_FILE = "fit.json", "predictions.csv", "gated.pt"
CONTEXT_SETS = {
    "csv": ("age_years", "sex_male", "spacing_x_mm", "spacing_z_mm", "window_low_hu", "window_high_hu",
            "location_x", "location_y", "location_z", "long_mm", "short_mm"),
    "study": ("age_years", "sex_male", "spacing_x_mm", "spacing_z_mm"),
}
MODALITIES = ("both", "image", "context")
SPLIT_CYCLE = ("train", "val", "test", "train", "train")


def patient_splits(buckets: Iterable[Hashable], seed: int = 0) -> dict[Hashable, str]:
    """train, val or test per split bucket (:func:`~ctzoo.cohort.context.split_bucket`), 60/20/20: the distinct
    buckets, ordered by a hash of ``seed`` and the bucket, take :data:`SPLIT_CYCLE` in turn. Blind to the data and
    to the table's salt, the same for the same patients and seed, and any three buckets cover all three splits;
    patients sharing a bucket share a split."""
    def order(bucket: Hashable) -> str:
        return hashlib.sha256(f"{seed}\x1f{bucket}".encode()).hexdigest()

    return {bucket: SPLIT_CYCLE[k % len(SPLIT_CYCLE)] for k, bucket in enumerate(sorted(set(buckets), key=order))}


def patients_in_several_splits(patients: Iterable[str], splits: Iterable[str]) -> int:
    """How many of the patients have lesions in more than one split (a split must hold each patient whole)."""
    seen: dict[str, set[str]] = {}
    for patient, part in zip(patients, splits):
        seen.setdefault(patient, set()).add(part)
    return sum(len(parts) > 1 for parts in seen.values())


def context_value(lesion: dict[str, Any], name: str) -> float:
    """A context feature of a lesion row as a number; NaN where it is unknown (filled later from train)."""
    if name == "sex_male":
        return {"M": 1.0, "F": 0.0}.get(lesion["sex"], float("nan"))
    value = lesion.get(name)
    return float("nan") if value is None or value == "" else float(value)


def context_matrix(lesions: list[dict[str, Any]], context_set: str = "csv") -> np.ndarray:
    """``(lesions, features)`` of :data:`CONTEXT_SETS` ``[context_set]``, NaN where unknown."""
    return np.array([[context_value(lesion, name) for name in CONTEXT_SETS[context_set]] for lesion in lesions],
                    dtype=np.float64).reshape(len(lesions), len(CONTEXT_SETS[context_set]))


def filled(matrix: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """``matrix`` with each NaN set to its column's mean over the known values of ``rows`` (all rows by
    default; 0 for a column with none)."""
    source = matrix if rows is None else matrix[rows]
    known = ~np.isnan(source)
    means = np.where(known, source, 0.0).sum(axis=0) / np.maximum(known.sum(axis=0), 1)
    return np.where(np.isnan(matrix), means, matrix)


def fitted_lesions(lesions: list[dict[str, Any]]) -> list[int]:
    """The indices of the lesions a fit is made on: typed, with image features (their box in the frame)."""
    return [k for k, lesion in enumerate(lesions) if lesion["type_code"] >= 1 and lesion["features"]]


def lesion_data(lesions: list[dict[str, Any]], features: np.ndarray, context_set: str,
                split_seed: int = 0) -> tuple[ModalityData, dict]:
    """The typed lesions with features as :class:`ModalityData` (standardised on train; unknown context values set
    to the train mean, i.e. 0) and what was chosen: ``{"split_rule", "split_seed", "classes", "lesions", "counts",
    "dropped"}``. ValueError when they cannot give a test AUC (module docstring)."""
    if context_set not in CONTEXT_SETS:
        raise ValueError(f"context must be one of {sorted(CONTEXT_SETS)}, got {context_set!r}")
    typed = fitted_lesions(lesions)
    dropped = {"untyped": sum(lesion["type_code"] < 1 for lesion in lesions),
               "box outside the frame": sum(lesion["type_code"] >= 1 and not lesion["features"] for lesion in lesions)}
    if not typed:
        raise ValueError("the cohort has no typed lesion with image features: build it with --deeplesion and a "
                         "detector model (DeepLesion types its val and test lesions only)")
    split, split_rule = chosen_split([lesions[k] for k in typed], split_seed)
    codes = sorted({lesions[k]["type_code"] for k in typed})
    if len(codes) < 2:
        raise ValueError(f"the typed lesions hold only one type ({LESION_TYPES[codes[0]]}): at least two are needed")
    labels = np.array([codes.index(lesions[k]["type_code"]) for k in typed])
    names = CONTEXT_SETS[context_set]
    context = context_matrix([lesions[k] for k in typed], context_set)
    train = split == "train"
    if not train.any() or not (split == "val").any() or not (split == "test").any():
        raise ValueError(f"the typed lesions' patients do not cover train, val and test ({Counter(split)}): "
                         "the cohort is too small to fit")
    tested = Counter(LESION_TYPES[lesions[k]["type_code"]] for k, part in zip(typed, split) if part == "test")
    if len(tested) < 2:
        other = "" if split_rule == "csv" else "; another --split-seed splits the patients differently"
        raise ValueError(f"the test split's {sum(tested.values())} typed lesions are all of one type "
                         f"({', '.join(tested)}): no test AUC can be measured{other}")
    context = filled(context, train)
    image = features[typed].astype(np.float64)
    image_parts = standardised(image[train], image)
    context_parts = standardised(context[train], context)
    data = ModalityData(image_parts[1], context_parts[1], labels, split,
                        [f"recist_f{k:02d}" for k in range(image.shape[1])], list(names))
    counts = {part: {LESION_TYPES[c]: int(((split == part) & (labels == i)).sum()) for i, c in enumerate(codes)}
              for part in ("train", "val", "test")}
    chosen = {"split_rule": split_rule, "split_seed": split_seed,
              "classes": [LESION_TYPES[c] for c in codes],
              "lesions": [lesions[k]["lesion"] for k in typed], "counts": counts, "dropped": dropped}
    return data, chosen


def chosen_split(typed: list[dict[str, Any]], split_seed: int) -> tuple[np.ndarray, str]:
    """The split of each of the ``typed`` lesions and its rule: the CSV's when its train split holds any of them
    and no patient spans splits, else :func:`patient_splits` of their split buckets."""
    csv_split = [lesion["split"] for lesion in typed]
    spanning = patients_in_several_splits([lesion["patient"] for lesion in typed], csv_split)
    if "train" in csv_split and not spanning:
        return np.array(csv_split), "csv"
    by_bucket = patient_splits((lesion["split_bucket"] for lesion in typed), split_seed)
    rule = "by patient hash, 60/20/20"
    if "train" in csv_split:  # the CSV's split would put a patient's lesions in train and test alike
        patients = len({lesion["patient"] for lesion in typed})
        rule += f" (the CSV's split puts {spanning} of {patients} patients in more than one split)"
    return np.array([by_bucket[lesion["split_bucket"]] for lesion in typed]), rule


def fit_cohort(cohort: str | Path, context_set: str = "csv", seeds: tuple[int, ...] = (0, 1, 2), epochs: int = 300,
               hidden: int = 32, split_seed: int = 0) -> dict[str, Any]:
    """Fit the gated model and both single-modality models at every seed on ``cohort``'s lesions (split by
    ``split_seed`` where they are split by patient); write ``COHORT/fit/`` (module docstring) and return
    ``fit.json``'s document."""
    cohort = Path(cohort)
    lesions, features = read_lesions(cohort)
    data, chosen = lesion_data(lesions, features, context_set, split_seed)
    results: dict[str, Any] = {}
    for modalities in MODALITIES:
        runs = [fit_gated(data, modalities, hidden=hidden, epochs=epochs, seed=seed) for seed in seeds]
        tests = [run.test_auc for run in runs]
        results[modalities] = {"test_auc": tests, "test_auc_mean": float(np.mean(tests)),
                               "test_auc_sd": float(np.std(tests)), "val_auc": [run.val_auc for run in runs],
                               "best_epoch": [run.best_epoch for run in runs],
                               "selected_on": sorted({run.selected_on for run in runs})}
        if modalities == "both":
            model = runs[0].model  # the first seed's gated model: its gates and attributions are stored
    image, context, labels = (torch.as_tensor(a, dtype=torch.float32) for a in (data.image, data.context, data.labels))
    labels = labels.long()
    with torch.no_grad():
        probabilities = torch.softmax(model(image, context), dim=1).numpy()
        weights = model.image_weight(image, context).numpy()
    # each lesion's absolute Integrated Gradients per feature, for its true class
    image_ig, context_ig = (np.abs(a) for a in feature_importance(model, image, context, labels, per_study=True))
    test = data.split == "test"
    document = {
        "schema": 1, "target": "coarse lesion type", "context_set": context_set,
        "context_features": data.context_names, "image_features": data.image_names, "seeds": list(seeds),
        "epochs": epochs, "hidden": hidden, **chosen, "results": results,
        "mean_image_weight": {part: float(weights[data.split == part].mean()) for part in ("train", "val", "test")},
        "importance": {"image": dict(zip(data.image_names, image_ig[test].mean(axis=0).tolist())),
                       "context": dict(zip(data.context_names, context_ig[test].mean(axis=0).tolist()))}}
    rows = [{"lesion": lesion, "split": part, "label": chosen["classes"][label],
             "predicted": chosen["classes"][int(np.argmax(p))], "image_weight": round(float(w), 5),
             **{f"p_{name}": round(float(q), 5) for name, q in zip(chosen["classes"], p)},
             **{f"ig_{name}": round(float(v), 5) for name, v in zip(data.context_names, context_ig[k])},
             "ig_image": round(float(image_ig[k].sum()), 5)}
            for k, (lesion, part, label, p, w) in enumerate(zip(chosen["lesions"], data.split, data.labels,
                                                                probabilities, weights))]
    out = cohort / FIT_DIR
    with atomic_folder(out) as partial:
        (partial / FIT_FILE).write_text(json.dumps(json_nulls(document), indent=1, allow_nan=False) + "\n",
                                        encoding="utf-8")
        (partial / PREDICTIONS_FILE).write_text(rows_csv(rows), encoding="utf-8")
        torch.save({"state_dict": model.state_dict(), "image_dim": data.image.shape[1],
                    "context_dim": data.context.shape[1], "classes": chosen["classes"], "hidden": hidden},
                   partial / WEIGHTS_FILE)
    return document


def json_nulls(value: Any) -> Any:
    """``value`` with every NaN or infinity as None: strict JSON has no NaN (``val_auc`` is NaN where the
    validation lesions hold one type)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_nulls(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_nulls(item) for item in value]
    return value


def rows_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def read_fit(cohort: str | Path) -> tuple[dict[str, Any], list[dict[str, str]]] | None:
    """``COHORT/fit/fit.json`` and its predictions, or None when the cohort was not fitted."""
    folder = Path(cohort) / FIT_DIR
    if not (folder / FIT_FILE).is_file():
        return None
    try:
        document = json.loads((folder / FIT_FILE).read_text(encoding="utf-8"))
        with open(folder / PREDICTIONS_FILE, encoding="utf-8", newline="") as handle:
            return document, list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder} cannot be read ({type(error).__name__}): run ctzoo cohort fit again") from None


def unmeasured_fit(document: dict[str, Any]) -> str | None:
    """Why ``fit.json``'s ``document`` has nothing to draw, or None: every model needs a finite test mean AUC (a fit
    from before the test split was checked may hold NaN or null)."""
    results = document.get("results")
    means = [(results.get(name) or {}).get("test_auc_mean") if isinstance(results, dict) else None
             for name in MODALITIES]
    if all(isinstance(mean, (int, float)) and math.isfinite(mean) for mean in means):
        return None
    return f"{FIT_DIR}/{FIT_FILE} holds no test AUC (NaN): run ctzoo cohort fit again"


def fit_mismatch(lesions: list[dict[str, Any]], fit: tuple[dict[str, Any], list[dict[str, str]]]) -> str | None:
    """Why ``fit`` (:func:`read_fit`'s) is not a fit of the cohort's ``lesions`` (``lesions.csv``), or None when it
    is: its lesion hashes and its predictions' must be exactly the lesions :func:`fitted_lesions` picks. A cohort
    built again (other lesions, or a subset) would otherwise be drawn with the old fit's numbers."""
    document, predictions = fit
    cohort = {lesions[k]["lesion"] for k in fitted_lesions(lesions)}
    fitted = document.get("lesions")
    if not isinstance(fitted, list):
        return f"{FIT_DIR}/{FIT_FILE} does not list its lesions: run ctzoo cohort fit again"
    predicted = [p.get("lesion") for p in predictions]
    if set(fitted) == cohort and sorted(predicted) == sorted(fitted):
        return None
    return (f"{FIT_DIR}/ was fitted on other lesions than {LESIONS_FILE} holds ({len(set(fitted) - cohort)} of its "
            f"{len(fitted)} are not among the cohort's {len(cohort)} typed lesions, {len(cohort - set(fitted))} of "
            "those are not in it): run ctzoo cohort fit again")

