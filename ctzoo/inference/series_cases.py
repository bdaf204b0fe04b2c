"""One case per CT series where a DICOM folder holds several (``ctzoo infer``).

Discovery (:mod:`ctzoo.inference.inputs`) makes one case of every folder that holds DICOM files, and reading a
folder takes the one series the selection rules choose. A folder may hold more than one CT series (a PACS export
with the plain and contrast phases side by side, a thin and a thick reconstruction): each series the rules accept
becomes a case of its own, ``<folder>_s<N>``, ``N`` its number as ``ctzoo info`` lists it, read with that series
chosen by its SeriesInstanceUID (:attr:`CaseInput.series`, the reader's ``--series``). A folder of one series keeps
its one case and its name.

What it costs: each DICOM file's header is opened once more before the run starts, read up to its
SeriesInstanceUID (about a millisecond a file; folders in parallel). Only a folder whose files name more than one
series is scanned in full (every header, as ``ctzoo info`` does) to tell which of them the rules accept.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from ctzoo.inference.inputs import CaseInput, unused_name
from ctzoo.io.dicom_scan import SeriesInfo, SeriesRules, scan_folder

#: Folders whose headers are read at the same time (the reading waits on storage more than on the CPU).
SCAN_THREADS = 8


def split_series(cases: list[CaseInput], rules: SeriesRules | None = None) -> list[CaseInput]:
    """``cases`` in order, each DICOM folder case whose folder holds several series that ``rules`` accept replaced
    by one case per such series (module docstring); names stay unique among all cases."""
    folders = [index for index, case in enumerate(cases) if case.volume is None and case.path.is_dir()]
    with ThreadPoolExecutor(SCAN_THREADS, thread_name_prefix="ctzoo-series") as pool:
        found = dict(zip(folders, pool.map(lambda i: accepted_series(cases[i], rules), folders)))
    issued = {case.name.casefold() for case in cases}
    split: list[CaseInput] = []
    for index, case in enumerate(cases):
        series = found.get(index, [])
        if len(series) < 2:
            split.append(case)
            continue
        issued.discard(case.name.casefold())  # the folder's own name is free again for its series
        split += [dataclasses.replace(case, name=unused_name(f"{case.name}_s{s.index}", issued),
                                      series=s.series_instance_uid or s.key) for s in series]
    return split


def accepted_series(case: CaseInput, rules: SeriesRules | None = None) -> list[SeriesInfo]:
    """The series of ``case``'s DICOM folder that ``rules`` accept, most slices first; ``[]`` where its files name
    one series (nothing to choose between) or the folder cannot be scanned (reading the case says why)."""
    if case.series is not None or _one_series(case.path, case.recursive):
        return []
    try:
        scan = scan_folder(case.path, progress=False, recursive=case.recursive)
    except OSError:
        return []
    rules = rules or SeriesRules()
    return [series for series in scan.series if not series.rejection(rules)]


def _one_series(folder: Path, recursive: bool) -> bool:
    """Whether every DICOM file in ``folder`` (with its subfolders where ``recursive``) names the same
    SeriesInstanceUID, from its header up to that element. False at the first that differs, lacks one or cannot
    be read: the full scan then decides."""
    first = None
    for where, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")) if recursive else []
        for name in sorted(names):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            try:
                header = pydicom.dcmread(os.path.join(where, name), stop_before_pixels=True,
                                         specific_tags=["SeriesInstanceUID"])
            except InvalidDicomError:
                continue  # not DICOM: no series
            except Exception:  # damaged: the full scan says whose series it is
                return False
            uid = str(header.get("SeriesInstanceUID", "") or "")
            first = first or uid
            if not uid or uid != first:
                return False
    return True
