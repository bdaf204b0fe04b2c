"""A leave-one-scan-out copy of a built miniature, without building it again.

A miniature's cases are drawn per case index from the seed (:func:`ctzoo.datasets.deeplesion.mini.build_case`):
holding a scan out (``make_deeplesion_mini(..., test_source=NAME)``) changes only which split each patient is
in, never an image. :func:`hold_out_source` therefore re-plans the splits of an existing miniature and writes
the new ``DL_info.csv`` and ``lesions.json`` beside hard links to its images and masks: seconds instead of the
half hour a 240-case build takes on two cores. The result equals a fresh ``--test-source`` build (a test checks
this byte for byte).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from ctzoo.datasets.deeplesion.info_csv import SPLITS, read_dl_info, write_dl_info
from ctzoo.datasets.deeplesion.mini import SOURCE_BODY_Z, notice, plan_cases, prepare_target, source_index
from ctzoo.io.atomic import atomic_folder


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of ``source`` into ``target`` (copies where links are impossible, e.g. across disks)."""
    for folder, _, files in os.walk(source):
        destination = target / Path(folder).relative_to(source)
        destination.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(folder) / name, destination / name)
            except OSError:
                shutil.copy2(Path(folder) / name, destination / name)


def hold_out_source(root: Path, out: Path, test_source: str, force: bool = False) -> Path:
    """Write into ``out`` the miniature at ``root`` with every case of the real scan ``test_source`` (and no other)
    in the test split; see the module docstring. ``root`` must be a miniature built without ``test_source``."""
    root, out = Path(root), Path(out)
    summary = json.loads((root / "lesions.json").read_text())
    if summary.get("test_source"):
        raise ValueError(f"{root} already holds out {summary['test_source']}; start from a miniature without one")
    prepare_target(out, force)
    held = source_index(test_source)
    names = list(SOURCE_BODY_Z)
    plans = {p.folder: p for p in plan_cases(summary["cases"], summary["seed"], len(names), held)}
    for series in summary["series"]:
        plan = plans.get(series["folder"])
        if plan is None or names[plan.source] != series["source"]:
            raise ValueError(f"{root}: series {series['folder']} does not match its seed's plan; was it edited?")
    rows = read_dl_info(root / "DL_info.csv")
    if [r.file_name for r in rows] != [lesion["file_name"] for lesion in summary["lesions"]]:
        raise ValueError(f"{root}: DL_info.csv and lesions.json list different lesions")
    split_rows = []
    for row, lesion in zip(rows, summary["lesions"]):
        split = plans[lesion["folder"]].split
        lesion["split"] = SPLITS[split]
        split_rows.append(dataclasses.replace(row, train_val_test=split,
                                              coarse_lesion_type=lesion["type"] if split in (2, 3) else -1))
    for series in summary["series"]:
        series["split"] = SPLITS[plans[series["folder"]].split]
    summary = {"seed": summary["seed"], "cases": summary["cases"], "test_source": names[held],
               **{k: v for k, v in summary.items() if k not in ("seed", "cases", "test_source")}}
    with atomic_folder(out) as partial:
        for folder in ("Images_png", "masks"):
            _link_tree(root / folder, partial / folder)
        write_dl_info(split_rows, partial / "DL_info.csv")
        (partial / "lesions.json").write_text(json.dumps(summary, indent=1) + "\n")
        (partial / "NOTICE.md").write_text(notice(summary["seed"], summary["cases"], names[held]))
        shutil.copyfile(root / "LICENSE", partial / "LICENSE")
    return out
