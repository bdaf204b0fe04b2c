"""``ctzoo smap features``: a site's lesion embeddings, computed locally with a zoo detector, as one ``.npz`` file
that identifies nobody (SMAP's data owners are hospitals whose points never leave the site in the clear).

A site file (:data:`SCHEMA` 1) holds, with ``numpy.load(allow_pickle=False)``:

* ``features`` (N, F) float32: RECIST-Net's decoder features pooled over each lesion's box;
* ``labels`` (N,) int16: DeepLesion's coarse lesion type where known, else -1;
* ``scores`` (N,) float32: the detector's score of a finding; NaN for an annotated lesion;
* ``meta``: a JSON string: schema, kind (``findings`` of studies or ``annotated`` DeepLesion lesions), the model's
  name, version and weights digest (the parties check they embed with the same model), the label names, N, F.

Nothing else: no identifiers (not even salted hashes), no file names, no slice positions; the rows are shuffled with
a fresh random permutation, so their order tells nothing of which study came first.
"""

from __future__ import annotations

import json
import secrets
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctzoo.datasets.deeplesion.info_csv import LESION_TYPES, read_dl_info
from ctzoo.inference.inputs import discover_cases
from ctzoo.inference.lesion_features import finding_features
from ctzoo.inference.tasks import model_task, run_task
from ctzoo.io.atomic import atomic_path
from ctzoo.io.image_files import read_volume
from ctzoo.models.bundle import ModelBundle
from ctzoo.training.lesion_features import annotated_lesion_features

SCHEMA = 1
ARRAYS = {"features": np.float32, "labels": np.int16, "scores": np.float32}


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
    for key_slice in annotated_lesion_features(csv_path, bundle, device, progress):
        for row, features, box in zip(key_slice.item["lesions"], key_slice.features, key_slice.boxes):
            if box is not None and (patients is None or row.patient_index in patients):
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


def write_site(site: dict[str, Any], out: str | Path) -> Path:
    """Write ``site`` (:func:`deeplesion_site` or :func:`volumes_site`) to ``out`` atomically, rows shuffled."""
    count = len(site["labels"])
    if count == 0:
        raise ValueError("no lesion to write: the inputs gave no finding (or no annotated lesion) at all")
    order = np.random.default_rng(secrets.randbits(128)).permutation(count)
    meta = {"schema": SCHEMA, **site["meta"], "count": count, "feature_dim": int(site["features"].shape[1]),
            "label_names": {str(code): name for code, name in LESION_TYPES.items() if code >= 1}}
    out = Path(out)
    with atomic_path(out) as partial:
        with open(partial, "wb") as handle:
            np.savez(handle, **{name: np.asarray(site[name], dtype=kind)[order] for name, kind in ARRAYS.items()},
                     meta=np.array(json.dumps(meta)))
    return out


def load_arrays(path: Path, kind: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, never unpickling; ValueError naming the file and ``kind`` (what it
    should be) when it is missing or not such a file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise ValueError(f"{path}: no such {kind}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # not a zip, a truncated one, objects
        raise ValueError(f"{path} is not a {kind} (numpy .npz without objects): {error}") from None


def read_site(path: str | Path) -> dict[str, Any]:
    """A site file, checked: ValueError naming the file and what is wrong (not an npz, a missing or extra array,
    wrong types or shapes, non-finite features, another schema)."""
    path = Path(path)
    arrays = load_arrays(path, "site file")
    expected = {*ARRAYS, "meta"}
    if set(arrays) != expected:
        raise ValueError(f"{path}: holds {sorted(arrays)}, a site file holds exactly {sorted(expected)}")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: meta is not JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a site file of schema {SCHEMA}")
    features = arrays["features"]
    if features.dtype != np.float32 or features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"{path}: features must be a non-empty (N, F) float32 array, got {features.dtype} "
                         f"{features.shape}")
    for name in ("labels", "scores"):
        if arrays[name].dtype != ARRAYS[name] or arrays[name].shape != (features.shape[0],):
            raise ValueError(f"{path}: {name} must be ({features.shape[0]},) {np.dtype(ARRAYS[name])}, got "
                             f"{arrays[name].dtype} {arrays[name].shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{path}: features hold NaN or infinite values")
    if meta.get("feature_dim") != features.shape[1] or meta.get("count") != features.shape[0]:
        raise ValueError(f"{path}: meta says {meta.get('count')} x {meta.get('feature_dim')}, the arrays are "
                         f"{features.shape[0]} x {features.shape[1]}")
    return {**arrays, "meta": meta, "path": str(path)}


def check_compatible(sites: Sequence[dict[str, Any]]) -> None:
    """ValueError unless every site embedded with the same model weights into the same dimension."""
    first = sites[0]
    for site in sites[1:]:
        if site["features"].shape[1] != first["features"].shape[1]:
            raise ValueError(f"{site['path']} has {site['features'].shape[1]} features per lesion, {first['path']} "
                             f"{first['features'].shape[1]}: the sites must embed with the same model")
        if site["meta"].get("weights") != first["meta"].get("weights"):
            raise ValueError(f"{site['path']} was embedded with {site['meta'].get('model')} "
                             f"{site['meta'].get('model_version')}, {first['path']} with {first['meta'].get('model')} "
                             f"{first['meta'].get('model_version')} (other weights): embed both with the same model")
