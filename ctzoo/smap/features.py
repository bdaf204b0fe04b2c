"""``ctzoo smap features``: a site's lesion embeddings, computed locally with a zoo detector, as one site file
(:mod:`ctzoo.smap.site_file`) that identifies nobody (SMAP's data owners are hospitals whose points never leave the
site in the clear)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctzoo.datasets.deeplesion.info_csv import read_dl_info
from ctzoo.inference.inputs import discover_cases
from ctzoo.inference.lesion_features import finding_features
from ctzoo.inference.tasks import model_task, run_task
from ctzoo.io.image_files import read_volume
from ctzoo.models.bundle import ModelBundle
from ctzoo.training.lesion_features import annotated_lesion_features


def parse_patients(text: str) -> set[int]:
    """``"1-4,7"`` -> {1, 2, 3, 4, 7}; ValueError naming the bad part."""
    chosen: set[int] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"patients: {part!r} is not a number or a range like 3-7") from None
        if last < first:
            raise ValueError(f"patients: {part!r} is an empty range")
        chosen.update(range(first, last + 1))
    return chosen


def deal_patients(csv_path: str | Path, sites: int = 3, lesions_per_site: int = 4) -> list[list[int]]:
    """Split a DeepLesion CSV's patients across ``sites`` (to try a joint map on one machine): patients in index
    order go to the site holding the fewest lesions so far, until each holds at least ``lesions_per_site``."""
    counts: dict[int, int] = {}
    for row in read_dl_info(csv_path):
        counts[row.patient_index] = counts.get(row.patient_index, 0) + 1
    chosen: list[list[int]] = [[] for _ in range(sites)]
    for patient in sorted(counts):
        site = min(range(sites), key=lambda k: sum(counts[p] for p in chosen[k]))
        if sum(counts[p] for p in chosen[site]) < lesions_per_site:
            chosen[site].append(patient)
    return chosen


def model_meta(bundle: ModelBundle) -> dict[str, Any]:
    return {"model": bundle.name, "model_version": bundle.version, "weights": bundle.weights_digest()}


def deeplesion_site(csv_path: str | Path, bundle: ModelBundle, patients: set[int] | None = None,
                    device: str = "cpu", progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, Any]:
    """The annotated lesions of ``csv_path`` (of ``patients`` only, when given) with their pooled features and
    coarse types; lesions whose box fell outside the evaluated frame are left out."""
    rows_features, labels = [], []
    # only these patients' key slices run through the network (a key slice holds one patient's lesions)
    for key_slice in annotated_lesion_features(csv_path, bundle, device, progress, patients=patients):
        for row, features, box in zip(key_slice.item["lesions"], key_slice.features, key_slice.boxes):
            if box is not None:
                rows_features.append(features)
                labels.append(row.coarse_lesion_type if row.coarse_lesion_type >= 1 else -1)
    width = len(rows_features[0]) if rows_features else 0
    return {"features": np.asarray(rows_features, dtype=np.float32).reshape(-1, width),
            "labels": np.asarray(labels, dtype=np.int16), "scores": np.full(len(labels), np.nan, np.float32),
            "meta": {"kind": "annotated", **model_meta(bundle)}}


def volumes_site(inputs: Sequence[str | Path], bundle: ModelBundle, device: str = "cpu",
                 say: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Every finding of the detector ``bundle`` (at its operating point) on every CT input, with its pooled
    features; no labels. An input that cannot be read or run is reported through ``say`` and skipped."""
    task = model_task(bundle, "torch", device)
    features, scores = [], []
    for case in discover_cases(inputs):
        try:
            volume = read_volume(case.path, progress=False)
            level = finding_features(bundle, volume, run_task(task, volume), device)
        except Exception as error:  # any reader's or the model's failure: this input is skipped, with why
            say(f"{case.name}: skipped ({type(error).__name__}: {error})")
            continue
        features += [finding["features"] for finding in level["findings"]]
        scores += [finding["score"] for finding in level["findings"]]
        say(f"{case.name}: {len(level['findings'])} findings")
    width = len(features[0]) if features else 0
    return {"features": np.asarray(features, dtype=np.float32).reshape(-1, width),
            "labels": np.full(len(scores), -1, np.int16), "scores": np.asarray(scores, dtype=np.float32),
            "meta": {"kind": "findings", **model_meta(bundle)}}
