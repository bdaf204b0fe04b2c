"""What ``ctzoo infer --resume`` trusts before it reuses a case instead of running it again.

A case's status file (``OUT/<case>/status-<model>.json``, written last) holds its summary row and two records:

* ``settings``: what, besides the model version, decides the case's files: the model's own settings
  (:attr:`ctzoo.inference.tasks.ModelTask.settings`: its weights' digest, backend, precision, a detector's score
  threshold), the series selection (``--series``, ``--rules``) and whether overlays are drawn. Workers, layout,
  device and compilation change how fast a case runs, not what it gives, and are left out;
* ``input_identity``: the size and modification time (ns) of every file the case reads, digested: a volume file
  (with the voxel files a ``.mhd``/``.nhdr`` header names, :mod:`ctzoo.io.detached_data`), or the files of a
  DICOM folder (its own, or with its subfolders', as the case is read), and the series a case of a folder holding
  several is (:attr:`CaseInput.series`).

A case is reused only where it finished ok for the same model version, input path, settings and input identity;
any other case runs again, and :func:`resume_summary` says how many did and why (counts and option names only:
case names may carry a patient's name).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ctzoo.inference.inputs import CaseInput, is_volume_file
from ctzoo.io.detached_data import detached_data_files

#: The reason of a case that can be reused.
REUSABLE = ""


def output_settings(task: Any, options: Any) -> dict[str, Any]:
    """The settings of ``task`` (a ModelTask) run with ``options`` (PipelineOptions) that change a case's files,
    as they read back from JSON (tuples as lists), so a saved copy compares equal."""
    from ctzoo.io.dicom_scan import SeriesRules

    rules = options.rules if options.rules is not None else SeriesRules()  # no rules file: the defaults
    settings = {**task.settings, "series": options.series, "rules": rules.model_dump(mode="json"),
                "overlay": bool(options.overlay)}
    return json.loads(json.dumps(settings))


def _files_read(case: CaseInput) -> tuple[Path, list[Path]]:
    """The folder or file a case is read from, and the files in it that the reader sees (hidden ones are not): one
    DICOM slice is read as its folder's series, with the subfolders."""
    path = case.path
    if not path.exists():
        raise FileNotFoundError(path)
    if path.is_file() and is_volume_file(path):
        return path.parent, [path, *detached_data_files(path)]  # a .mhd/.nhdr's voxels are in other files
    folder, recursive = (path, case.recursive) if path.is_dir() else (path.parent, True)
    files = []
    for where, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")) if recursive else []
        files += [Path(where) / name for name in sorted(names) if not name.startswith(".")]
    return folder, files


def input_identity(case: CaseInput) -> dict[str, Any] | None:
    """The identity of what ``case`` reads: how many files, their bytes, and a digest of each file's path (within
    the input), size and modification time, so a file rewritten, touched, added or removed changes it; and the
    series read, for one of several in a folder. None where the input cannot be looked at (gone, unreadable): such
    a case is never reused."""
    try:
        root, files = _files_read(case)
        digest, total = hashlib.sha256(), 0
        for file in files:
            stat = file.stat()
            total += stat.st_size
            digest.update(f"{os.path.relpath(file, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    except OSError:
        return None
    identity = {"files": len(files), "bytes": total, "digest": digest.hexdigest()[:32]}
    return identity if case.series is None else {**identity, "series": case.series}


def rerun_reason(saved: dict[str, Any] | None, model_version: str, case: CaseInput, settings: dict[str, Any],
                 identity: dict[str, Any] | None) -> str:
    """Why a case whose status file holds ``saved`` (None: none, or unreadable) must run again with this model
    version, ``settings`` and its input's ``identity`` now; :data:`REUSABLE` (``""``) where it need not."""
    if saved is None or saved.get("status") != "ok":
        return "not finished before"
    if saved.get("dicom_error"):  # the DICOM writer failed: a newer ctzoo may write it
        return "DICOM result missing"
    if saved.get("model_version") != model_version:
        return "model version changed"
    if saved.get("input") != str(case.path):
        return "input changed"
    if "settings" not in saved:
        return "options not recorded (an earlier ctzoo)"
    before = saved["settings"]
    changed = sorted(name for name in {*before, *settings} if before.get(name) != settings.get(name))
    if changed:
        return f"options changed ({', '.join(changed)})"
    if identity is None or saved.get("input_identity") != identity:
        return "input changed"
    return REUSABLE


def resume_summary(model_name: str, reasons: list[str]) -> str:
    """One log line for ``--resume``: how many cases are reused, and how many run again for each reason."""
    counts = Counter(reasons)
    reused = counts.pop(REUSABLE, 0)
    rerun = "; ".join(f"{count} {reason}" for reason, count in sorted(counts.items(), key=lambda item: -item[1]))
    return f"{model_name}: --resume: {reused} case(s) reused, {sum(counts.values())} to run" + (
        f": {rerun}" if rerun else "")


def read_status(path: Path) -> dict[str, Any] | None:
    """A status file's contents; None where there is none or it cannot be read."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None
