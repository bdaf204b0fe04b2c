"""Turn what a user passes to ``ctzoo infer`` into a list of cases, one CT volume each.

Accepted inputs (mixed freely):

* NIfTI, NRRD, MHA/MHD files: one case each;
* a ``.zip`` of a DICOM series: one case (the CT series chosen by the selection rules);
* a folder: searched recursively. Image files and zips in it are cases; every folder that directly holds DICOM
  files is one case (its CT series chosen by the rules, as ``ctzoo info`` shows), read from those files alone:
  a subfolder holding DICOM is a case of its own. A PACS export ``patient/study/series/*.dcm`` thus gives one
  case per series folder (``ctzoo infer`` then makes one case per CT series of a folder holding several:
  :mod:`ctzoo.inference.series_cases`). Folders of ``ctzoo infer`` results below it (OUT, a case's folder) are
  skipped;
* a text file (``.txt``/``.lst``/``.list``): one input per line (blank lines and ``#`` comments skipped);
  relative paths are relative to the list file.

Discovery reads no pixel data and opens only the first bytes of files it cannot name by suffix, so it stays
cheap on a folder of thousands of studies; anything broken is found when the case is read, where it is
recorded as that case's error instead of stopping the batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctzoo.io.image_files import ITK_READ_SUFFIXES, NIFTI_SUFFIXES, file_suffix

LIST_SUFFIXES = (".txt", ".lst", ".list")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: Files never taken for DICOM when they have no DICOM preamble (sidecars next to a series).
_NEVER_DICOM = {".json", ".csv", ".md", ".txt", ".xml", ".png", ".jpg", ".jpeg", ".pdf", ".html", ".log", ".py"}
#: What marks a folder of ``ctzoo infer`` results: a case's status files, OUT's summary.csv (its first columns).
_STATUS_FILE = re.compile(r"status-.+\.json")
_SUMMARY_HEADER = "case,input,model,"


@dataclass(frozen=True)
class CaseInput:
    """One CT volume to run: ``name`` is the output folder's name, unique within a run. ``volume``: the volume
    already read from ``path`` by the caller (the PACS bridge reads a series once for its check and all its
    models); the pipeline then does not read ``path`` again. ``recursive``: a DICOM folder is read with its
    subfolders; False where discovery made each subfolder holding DICOM a case of its own. ``series``: the
    series of a DICOM folder to read (its SeriesInstanceUID, as ``--series`` takes it), for one of several CT
    series in one folder (:mod:`ctzoo.inference.series_cases`); None: the one the run's options choose."""

    name: str
    path: Path
    volume: Any = field(default=None, compare=False, repr=False)
    recursive: bool = True
    series: str | None = None


def _is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the "DICM" magic after the 128-byte preamble (files named by UID only)."""
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in _NEVER_DICOM:
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_volume_file(path: Path) -> bool:
    return file_suffix(path) in (*NIFTI_SUFFIXES, *ITK_READ_SUFFIXES, ".zip")


def holds_results(files: Iterable[Path]) -> bool:
    """Whether a folder holding ``files`` is ``ctzoo infer``'s: a case's folder (its status files) or an OUT folder
    (its ``summary.csv``, told from another program's by its header)."""
    for path in files:
        if _STATUS_FILE.fullmatch(path.name):
            return True
        if path.name == "summary.csv":
            try:
                with open(path, encoding="utf-8", errors="replace") as handle:
                    if handle.readline().startswith(_SUMMARY_HEADER):
                        return True
            except OSError:
                pass
    return False


def _walk(folder: Path, skip: frozenset[Path] = frozenset(), top: bool = True) -> Iterator[Path]:
    """Case paths under ``folder``: volume files, and folders that directly hold DICOM files (sorted, hidden
    entries skipped). Folders holding ``ctzoo infer``'s results (:func:`holds_results`) and, below ``folder``, those
    in ``skip`` (resolved) are skipped with what they hold: a run's OUT inside its input tree is not read back as
    input by the next run."""
    if not top and skip and folder.resolve() in skip:
        return
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file()]
    if holds_results(files):
        return
    volume_files = [p for p in files if is_volume_file(p)]
    if any(_is_dicom(p) for p in files if p not in volume_files):
        yield folder
    yield from volume_files
    for sub in entries:
        if sub.is_dir():
            yield from _walk(sub, skip, top=False)


def _read_list(path: Path) -> list[tuple[int, Path]]:
    """(line number, input) for each entry of a list file; relative entries are relative to the list."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append((number, Path(line) if Path(line).is_absolute() else path.parent / line))
    return entries


def _expand(path: Path, seen_lists: set[Path], skip: frozenset[Path] = frozenset()) -> Iterator[tuple[Path, Path]]:
    """(case path, the input it came from) for one user input; folders in ``skip`` are not searched (_walk)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        found = list(_walk(path, skip))
        if not found:
            raise ValueError(f"{path}: no CT volumes in this folder (looked for DICOM files, NIfTI, NRRD, MHA, zip; "
                             "folders of ctzoo infer results are skipped)")
        yield from ((case, path) for case in found)
    elif path.suffix.lower() in LIST_SUFFIXES:
        if path.resolve() in seen_lists:
            raise ValueError(f"{path}: input lists include each other")
        seen_lists.add(path.resolve())
        for number, listed in _read_list(path):
            try:
                found = list(_expand(listed, seen_lists, skip))
            except (FileNotFoundError, ValueError) as exc:  # say which line of which list, not only the path
                raise type(exc)(f"{path}, line {number}: {exc}") from None
            yield from found
    else:
        yield path, path.parent  # a single file (volume, zip, or one DICOM slice: read_volume reads its series)


def case_name(path: Path, root: Path) -> str:
    """A readable folder name for a case: its path under the input it came from, separators as ``_``."""
    try:
        relative = path.relative_to(root)
    except ValueError:
        relative = Path(path.name)
    name = str(relative) if str(relative) != "." else path.name
    for suffix in (*NIFTI_SUFFIXES, *ITK_READ_SUFFIXES, ".zip"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"


def discover_cases(inputs: Iterable[str | Path], exclude: Iterable[str | Path] = ()) -> list[CaseInput]:
    """All cases of ``inputs`` in a stable order, duplicates (the same file twice) dropped, names made unique.
    Folders found below an input are not searched where they are in ``exclude`` (``ctzoo infer``'s OUT) or hold
    ``ctzoo infer`` results (:func:`holds_results`).

    Raises FileNotFoundError / ValueError for an input that does not exist or holds nothing to read: a typo in
    a command line should stop the run before hours of work, unlike a damaged file inside a folder.
    """
    cases: list[CaseInput] = []
    seen_paths: set[Path] = set()
    issued: set[str] = set()
    seen_lists: set[Path] = set()
    skip = frozenset(Path(folder).resolve() for folder in exclude)
    for given in inputs:
        given = Path(given)
        for path, root in _expand(given, seen_lists, skip):
            key = path.resolve()
            if key in seen_paths:
                continue
            seen_paths.add(key)
            # a folder case is the DICOM directly in it: its subfolders holding DICOM are cases of their own (_walk)
            cases.append(CaseInput(unused_name(case_name(path, root), issued), path, recursive=not path.is_dir()))
    return cases


def unused_name(name: str, issued: set[str]) -> str:
    """``name``, or the first of ``name-2``, ``name-3``... that no earlier case took; added to ``issued``. Checked
    against every name issued, suffixed ones included (``a.nii.gz``, ``a.nrrd`` and ``a-2.nii.gz`` must not share
    a folder), and without regard to case: OUT may be on a filesystem that does not tell ``A`` from ``a``."""
    candidate, number = name, 1
    while candidate.casefold() in issued:
        number += 1
        candidate = f"{name}-{number}"
    issued.add(candidate.casefold())
    return candidate
