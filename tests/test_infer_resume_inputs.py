"""What ``ctzoo infer --resume`` compares besides the options: the voxel files of a detached ``.mhd``/``.nhdr``
header, and the model's weights."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from bundle_edits import halve_weights
from stub_tasks import stub_task

from ctzoo.inference.inputs import CaseInput
from ctzoo.inference.pipeline import PipelineOptions, run_pipeline
from ctzoo.inference.resume import input_identity
from ctzoo.io import Volume, write_volume
from ctzoo.io.detached_data import detached_data_files


def _resumed(cases, task, out: Path, caplog) -> str:
    """The --resume line of a rerun of ``task`` over ``cases`` into ``out``."""
    caplog.clear()
    rows = run_pipeline(cases, task, PipelineOptions(out=out, workers=0, progress=False, resume=True, overlay=False))
    assert {row["status"] for row in rows} == {"ok"}
    return next(r.getMessage() for r in caplog.records if "--resume" in r.getMessage())


def test_resume_reruns_an_mhd_whose_voxel_file_changed(tmp_path, caplog):
    """The auditor's run: ct.raw replaced by other voxels of the same size behind an unchanged ct.mhd; --resume
    kept the old results (only the header was in the input's identity)."""
    caplog.set_level(logging.INFO, logger="ctzoo.inference.pipeline")
    header = tmp_path / "ct.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 8, 8), np.float32)), str(header))  # and ct.raw
    [raw] = detached_data_files(header)
    assert raw.exists() and raw.parent == tmp_path
    cases, out = [CaseInput("ct", header)], tmp_path / "out"
    run_pipeline(cases, stub_task(), PipelineOptions(out=out, workers=0, progress=False, overlay=False))
    assert input_identity(cases[0])["files"] == 2
    assert _resumed(cases, stub_task(), out, caplog) == "stub-model: --resume: 1 case(s) reused, 0 to run"
    stat = raw.stat()
    raw.write_bytes(np.ones(stat.st_size // 4, np.float32).tobytes())
    os.utime(raw, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # however coarse the filesystem's clock
    assert _resumed(cases, stub_task(), out, caplog) == (
        "stub-model: --resume: 0 case(s) reused, 1 to run: 1 input changed")


@pytest.mark.parametrize("header,named", [
    ("ObjectType = Image\nNDims = 3\nElementDataFile = LOCAL\n", []),
    ("NDims = 3\nElementDataFile = raw/ct.raw\n", ["raw/ct.raw"]),
    ("NDims = 3\nElementDataFile = LIST\na.raw\n\nb.raw\n", ["a.raw", "b.raw"]),
    ("NDims = 3\nElementDataFile = slice%02d.raw 1 5 2\n", ["slice01.raw", "slice03.raw", "slice05.raw"]),
    ("NDims = 3\nElementDataFile = s%d.raw 3 1 -1 2\n", ["s3.raw", "s2.raw", "s1.raw"]),
    ("NDims = 3\nElementDataFile = 100% ct.raw\n", ["100% ct.raw"]),
    ("NRRD0004\ntype: short\ndata file: ct.raw.gz\n", ["ct.raw.gz"]),
    ("NRRD0004\ntype: short\ndatafile: LIST 2\nz0.raw\nz1.raw\n", ["z0.raw", "z1.raw"]),
    ("NRRD0004\ntype: short\ndata file: z%03d.raw 0 1 1 2\n", ["z000.raw", "z001.raw"]),
    ("NRRD0004\ntype: short\nencoding: raw\n\n" + "\0" * 16, []),  # attached: the voxels follow the header
])
def test_detached_data_files_of_each_header_form(tmp_path, header, named):
    path = tmp_path / "ct.mhd"
    path.write_bytes(header.encode("latin-1"))
    assert detached_data_files(path) == [tmp_path / name for name in named]


def test_resume_reruns_a_bundle_whose_weights_changed_under_the_same_version(tmp_path, caplog):
    """The auditor's run: a bundle retrained into the same folder without a new version; --resume kept the results
    of the old weights."""
    from ctzoo.inference.tasks import model_task
    from ctzoo.models.bundle import load_bundle

    caplog.set_level(logging.INFO, logger="ctzoo.inference.pipeline")
    mine = tmp_path / "mine"
    shutil.copytree(load_bundle("recistnet-mini").folder, mine)
    cases, out = [CaseInput("ct", write_volume(Volume(np.zeros((2, 8, 8), np.float32), spacing=(1.0, 1.0, 2.0)),
                                               tmp_path / "ct.nii.gz"))], tmp_path / "out"
    before = model_task(mine, "torch", "cpu")
    assert before.settings["weights"] == load_bundle(mine).weights_digest()
    run_pipeline(cases, before, PipelineOptions(out=out, workers=0, progress=False, overlay=False))
    saved = json.loads((out / "ct" / "status-recistnet-mini.json").read_text())
    assert saved["settings"]["weights"] == before.settings["weights"]
    halve_weights(mine)
    assert _resumed(cases, model_task(mine, "torch", "cpu"), out, caplog) == (
        "recistnet-mini: --resume: 0 case(s) reused, 1 to run: 1 options changed (weights)")
