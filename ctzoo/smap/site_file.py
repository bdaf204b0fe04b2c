"""A site file of ``ctzoo smap``: one ``.npz`` (:data:`SCHEMA` 1) that identifies nobody, read with
``numpy.load(allow_pickle=False)``:

* ``features`` (N, F) float32: RECIST-Net's decoder features pooled over each lesion's box;
* ``labels`` (N,) int16: DeepLesion's coarse lesion type where known, else -1;
* ``scores`` (N,) float32: the detector's score of a finding; NaN for an annotated lesion;
* ``meta``: a JSON string: schema, kind (``findings`` of studies or ``annotated`` DeepLesion lesions), the model's
  name, version and weights digest (the parties check they embed with the same model), the label names, N, F.

Nothing else: no identifiers (not even salted hashes), no file names, no slice positions; the rows are shuffled with
a fresh random permutation, so their order tells nothing of which study came first.

Writing and reading it needs numpy only (:mod:`ctzoo.smap.features` computes the features): a party's process
(``ctzoo smap party``) never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctzoo.datasets.deeplesion.info_csv import LESION_TYPES
from ctzoo.io.atomic import atomic_path

SCHEMA = 1
ARRAYS = {"features": np.float32, "labels": np.int16, "scores": np.float32}


def write_site(site: dict[str, Any], out: str | Path) -> Path:
    """Write ``site`` (:func:`ctzoo.smap.features.deeplesion_site` or ``volumes_site``) to ``out`` atomically, rows
    shuffled."""
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


def site_digest(path: str | Path) -> str:
    """The SHA-256 of a site file's bytes. A party's map file records it, so that ``ctzoo smap view`` labels the
    points with the site file they came from: every file's rows are shuffled afresh, so another file of the same
    site, even with as many points, would put its labels on the wrong points."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
