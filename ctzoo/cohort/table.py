"""``ctzoo cohort build``: the cohort table of a set of CT inputs (and DeepLesion's CSV), written as
``COHORT/cohort.csv`` (one row per series, :data:`~ctzoo.cohort.context.COLUMNS`) and ``COHORT/cohort.json``::

    {"schema": 1, "columns": [...], "modalities": {"context": [...], "image": [...]}, "models": [...],
     "rows": [{column: value}], "groups": {column: {value: count}}, "failed": [{"input", "error", "reason"}],
     "salt": "env" | "file", "synthetic": null | {"generator", "seed", "cases"}}

An input that cannot be read is listed in ``failed`` (never silently dropped), by the salted hash of its name (a
file may be named after its patient), with its error type and message, that name and its path cut out of the
message (:func:`failed_input`). A field its headers lack is :data:`~ctzoo.cohort.context.UNKNOWN` and counts as
that group. The salt of the hashes comes from ``$CTZOO_COHORT_SALT`` (share it between sites or runs whose tables
must join) or ``COHORT/salt``, created once. ``synthetic`` says that the DL_info.csv is a
``make-deeplesion-mini`` miniature (:func:`miniature_origin`): the report then says so on every view.
The context modality comes from the headers (:mod:`ctzoo.cohort.context`), the image modality from running the zoo
``models`` on each volume (:mod:`ctzoo.cohort.image`; DeepLesion rows have none: their PNG slabs are not studies to
run). A model that fails on a study leaves that row's image columns empty and its reason in ``image_error``.

With a detector among the models, also: ``findings.json`` (each CT series' findings with their pooled features,
:func:`~ctzoo.cohort.image.finding_level`) and, with DeepLesion, the lesion level (``lesions.csv``,
``lesion_features.npy``, ``key_slices.json``: :func:`~ctzoo.cohort.lesions.deeplesion_lesions`); ``thumbnails/``
holds the pictures of both. A build replaces what an earlier build into the same folder left: the files this one does
not write are removed, and so is ``fit/`` (a fit of the earlier lesions), before anything new is written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ctzoo.cohort.context import COLUMNS, deeplesion_context, group_counts, hashed, volume_context
from ctzoo.cohort.image import finding_level, image_columns
from ctzoo.cohort.lesions import LESION_COLUMNS, deeplesion_lesions
from ctzoo.datasets.deeplesion.info_csv import read_dl_info
from ctzoo.inference.inputs import CaseInput, discover_cases
from ctzoo.inference.reader import require_finite
from ctzoo.inference.tasks import model_task
from ctzoo.io.atomic import atomic_folder, atomic_path, remove_atomically
from ctzoo.io.image_files import read_volume
from ctzoo.io.privacy import salt_from
from ctzoo.models.bundle import ModelBundle, load_bundle

SCHEMA = 1
SALT_ENV = "CTZOO_COHORT_SALT"
TABLE_FILE, DOCUMENT_FILE = "cohort.csv", "cohort.json"
LESIONS_FILE, FEATURES_FILE, KEY_SLICES_FILE, THUMBNAILS_DIR = ("lesions.csv", "lesion_features.npy",
                                                                "key_slices.json", "thumbnails")
FINDINGS_FILE = "findings.json"
#: The fit of the cohort's lesions (:data:`ctzoo.cohort.fit.FIT_DIR`): stale once the cohort is built again.
FIT_DIR = "fit"
#: What stands for an unreadable input's name and path in its error message.
INPUT_MARK = "<input>"


def build_cohort(inputs: Sequence[str | Path], out: str | Path, deeplesion_csv: str | Path | None = None,
                 models: Sequence[str | ModelBundle] = (), device: str = "cpu",
                 say: Callable[[str], None] = lambda message: None, progress: bool = False) -> dict[str, Any]:
    """Read every CT input (what ``ctzoo infer`` accepts; headers and voxels within the default resource limits),
    run ``models`` (zoo names, bundle folders or loaded bundles, PyTorch on ``device``) on each, read DeepLesion's
    ``DL_info.csv``, write ``out/cohort.csv`` and ``out/cohort.json``; return the document. The salt (``out/salt``
    where ``$CTZOO_COHORT_SALT`` is unset) is created only once the models, the inputs and the CSV are read; a
    build that fails after that removes ``out`` when it made it (no folder holding only a salt is left)."""
    out = Path(out)
    new_folder = not out.exists()
    try:
        return _build(inputs, out, deeplesion_csv, models, device, say, progress)
    except BaseException:
        if new_folder and out.is_dir():
            remove_atomically(out)
        raise


def _build(inputs: Sequence[str | Path], out: Path, deeplesion_csv: str | Path | None,
           models: Sequence[str | ModelBundle], device: str, say: Callable[[str], None],
           progress: bool) -> dict[str, Any]:
    bundles = [model if isinstance(model, ModelBundle) else load_bundle(model) for model in models]
    tasks = [model_task(bundle, "torch", device) for bundle in bundles]
    class_names = {bundle.name: bundle.class_names for bundle in bundles}
    detector = next((bundle for bundle in bundles if bundle.task == "detection"), None)
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    findings: dict[str, Any] = {}  # per series hash: the detector's findings with their pooled features
    thumbnails: dict[str, bytes] = {}
    cases = discover_cases(inputs) if inputs else []
    info_rows = read_dl_info(deeplesion_csv) if deeplesion_csv is not None else None
    salt = salt_from(SALT_ENV, out)
    for index, case in enumerate(cases, 1):
        try:
            volume = read_volume(case.path, progress=False)
            require_finite(volume, case.path)  # as ctzoo infer: a model run on NaN would record made-up findings
        except Exception as error:  # any reader's failure (nibabel's, SimpleITK's): recorded, the table goes on
            failed.append(failed_input(case, error, salt))
            say(f"[{index}/{len(cases)}] {case.name}: not read ({type(error).__name__})")
            continue
        row = volume_context(volume, salt, case.name)
        outputs: dict[str, Any] = {}
        try:
            row |= image_columns(volume, tasks, class_names, outputs)
            if detector is not None:
                level = finding_level(detector, volume, outputs[detector.name], device)
                if level["picture"] is not None:
                    thumbnails[row["series"]] = level.pop("picture")
                findings[row["series"]] = level | {"picture": row["series"] in thumbnails}
        except Exception as error:  # the context stands; the image modality of this study is missing, with why
            row["image_error"] = f"{type(error).__name__}: {error}"
        rows.append(row)
        say(f"[{index}/{len(cases)}] {case.name}: {rows[-1]['source']}, {rows[-1]['slices']} slices")
    lesion_level = None
    if info_rows is not None:
        series = deeplesion_context(info_rows, salt)
        rows += series
        say(f"{deeplesion_csv}: {len(series)} DeepLesion series")
        if detector is not None:
            bar = {"desc": "key slices", "unit": "batch", "disable": None if progress else True}  # None: a TTY's
            lesion_level = deeplesion_lesions(Path(deeplesion_csv), detector, salt, device,
                                              progress=lambda batches: tqdm(batches, **bar))
            say(f"{deeplesion_csv}: {len(lesion_level['lesions'])} lesions on {len(lesion_level['key_slices'])} "
                f"key slices through {detector.name}")
    image = list(dict.fromkeys(k for row in rows for k in row if k not in COLUMNS and k != "thickness_band"))
    rows = [{column: row.get(column) for column in [*COLUMNS, "thickness_band", *image]} for row in rows]
    document = {"schema": SCHEMA, "columns": [*COLUMNS, *image], "models": [b.name for b in bundles],
                "modalities": {"context": list(COLUMNS[3:]), "image": image}, "rows": rows,
                "groups": group_counts(rows),
                "failed": failed, "salt": "env" if os.environ.get(SALT_ENV) else "file",
                "synthetic": None if deeplesion_csv is None else miniature_origin(Path(deeplesion_csv))}
    out.mkdir(parents=True, exist_ok=True)
    stale = remove_stale(out, lesions=lesion_level is not None, findings=detector is not None)
    if stale:
        say(f"{out}: removed an earlier build's {', '.join(stale)}"
            + (" (fitted on the earlier lesions: run ctzoo cohort fit again)" if FIT_DIR in stale else ""))
    if lesion_level is not None:
        document["lesion_model"] = lesion_level["model"]
        write_lesions(out, lesion_level)
        thumbnails |= lesion_level["thumbnails"]
    if detector is not None:
        with atomic_path(out / FINDINGS_FILE) as partial:
            partial.write_text(json.dumps({"schema": SCHEMA, "model": detector.name, "series": findings}) + "\n",
                               encoding="utf-8")
    with atomic_folder(out / THUMBNAILS_DIR) as partial:
        for name, png in thumbnails.items():
            (partial / f"{name}.png").write_bytes(png)
    with atomic_path(out / TABLE_FILE) as partial:
        partial.write_text(table_csv(rows, image), encoding="utf-8")
    with atomic_path(out / DOCUMENT_FILE) as partial:
        partial.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return document


def miniature_origin(csv_path: Path) -> dict[str, Any] | None:
    """``{"generator", "seed", "cases"}`` when ``csv_path`` is a ``ctzoo data make-deeplesion-mini`` miniature (its
    ``lesions.json`` beside it, with the seed and cases it was made with, as ``zoo publish`` reads it), else None:
    the report must not show synthetic lesions as if they were patients'."""
    try:
        made = json.loads((csv_path.parent / "lesions.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(made, dict) or not {"seed", "cases", "lesions"} <= set(made):
        return None
    return {"generator": "ctzoo data make-deeplesion-mini", "seed": made["seed"], "cases": made["cases"]}


def failed_input(case: CaseInput, error: Exception, salt: str) -> dict[str, str]:
    """``failed``'s entry for an input that could not be read: its name as a salted hash, the error's type, and
    its message with the input's path and name replaced by :data:`INPUT_MARK` (they may name the patient)."""
    names = {str(case.path), os.path.abspath(case.path), str(case.path.resolve()), case.path.name, case.name}
    message = str(error)
    for name in sorted((n for n in names if n), key=len, reverse=True):  # the full path before the bare name
        message = re.sub(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", INPUT_MARK, message)
    return {"input": hashed(case.name, salt), "error": type(error).__name__,
            "reason": f"{type(error).__name__}: {message}"}


def remove_stale(out: Path, lesions: bool, findings: bool) -> list[str]:
    """Remove from ``out`` what an earlier build wrote and this one will not replace: the lesion level without
    ``lesions``, ``findings.json`` without ``findings``, and always ``fit/`` (fitted on the earlier lesions: a
    report would otherwise pair it with the new ones). Each goes at once (:func:`remove_atomically`); returns the
    names removed."""
    names = [FIT_DIR] + ([] if lesions else [LESIONS_FILE, FEATURES_FILE, KEY_SLICES_FILE])
    names += [] if findings else [FINDINGS_FILE]
    return [name for name in names if remove_atomically(out / name)]


def write_lesions(out: Path, level: dict[str, Any]) -> None:
    """The lesion level (:func:`~ctzoo.cohort.lesions.deeplesion_lesions`): ``lesions.csv``,
    ``lesion_features.npy`` (aligned rows) and ``key_slices.json`` (its thumbnails are written with the series')."""
    with atomic_path(out / LESIONS_FILE) as partial:
        partial.write_text(table_csv(level["lesions"], columns=LESION_COLUMNS), encoding="utf-8")
    with atomic_path(out / FEATURES_FILE) as partial:
        with open(partial, "wb") as handle:
            np.save(handle, level["features"].astype(np.float32))
    key_slices = {"schema": SCHEMA, "model": level["model"], "score_threshold": level["score_threshold"],
                  "frame": level["frame"],
                  "feature_names": level["feature_names"], "key_slices": level["key_slices"]}
    with atomic_path(out / KEY_SLICES_FILE) as partial:
        partial.write_text(json.dumps(key_slices) + "\n", encoding="utf-8")


#: ``lesions.csv``'s number columns (empty: unknown) and its whole-number ones (never empty).
LESION_NUMBERS = ("age_years", "spacing_x_mm", "spacing_z_mm", "window_low_hu", "window_high_hu", "location_x",
                  "location_y", "location_z", "long_mm", "short_mm")
LESION_INTEGERS = ("type_code", "split_bucket")


def read_lesions(cohort: str | Path) -> tuple[list[dict[str, Any]], np.ndarray]:
    """``COHORT/lesions.csv`` as typed rows and ``lesion_features.npy``; ValueError when the cohort has none, or
    naming the file, row and column of what cannot be read."""
    cohort = Path(cohort)
    path = cohort / LESIONS_FILE
    if not path.is_file():
        raise ValueError(f"{cohort} has no {LESIONS_FILE}: build it with --deeplesion DL_info.csv and a detector "
                         "model (not --context-only)")
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in LESION_COLUMNS if column not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} lacks column {', '.join(missing)} (rebuild with ctzoo cohort build)")
        lesions = [typed_lesion(row, f"{path}: row {reader.line_num}") for row in reader]
    if not (cohort / FEATURES_FILE).is_file():
        raise ValueError(f"{cohort} has no {FEATURES_FILE} beside its {LESIONS_FILE} (rebuild with ctzoo cohort build)")
    features = np.load(cohort / FEATURES_FILE)
    if len(features) != len(lesions):
        raise ValueError(f"{cohort}: {FEATURES_FILE} holds {len(features)} rows for {len(lesions)} lesions")
    return lesions, features


def typed_lesion(row: dict[str, str], where: str = LESIONS_FILE) -> dict[str, Any]:
    """A ``lesions.csv`` row with its numbers and flags parsed back (empty number cells None); ValueError naming
    ``where`` (the file and row) and the column of a value that is not a finite number."""
    typed: dict[str, Any] = dict(row)
    for column in (*LESION_NUMBERS, *LESION_INTEGERS):
        text = row[column]
        if text == "" and column in LESION_NUMBERS:
            typed[column] = None
            continue
        try:
            value = float(text)
            if not np.isfinite(value) or (column in LESION_INTEGERS and value != int(value)):
                raise ValueError
        except ValueError:
            kind = "a whole number" if column in LESION_INTEGERS else "a finite number or empty"
            raise ValueError(f"{where}, column {column}: expected {kind}, got {text!r}") from None
        typed[column] = int(value) if column in LESION_INTEGERS else value
    typed["found"], typed["features"] = row["found"] == "True", row["features"] == "True"
    return typed


def table_csv(rows: Sequence[dict[str, Any]], image: Sequence[str] = (), columns: Sequence[str] | None = None) -> str:
    """The rows as CSV: :data:`COLUMNS`, the derived ``thickness_band``, then the ``image`` columns (or exactly
    ``columns``); None as an empty cell."""
    buffer = io.StringIO()
    fields = list(columns) if columns is not None else [*COLUMNS, "thickness_band", *image]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()
