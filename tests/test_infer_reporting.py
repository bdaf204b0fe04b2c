"""The numbers ``ctzoo infer`` reports beside its files agree with them: a case's time in the progress log is its
``seconds`` in summary.csv, and the organ volumes of the summary are segmentation.json's."""

from __future__ import annotations

import json
import logging
import re
import time
from types import SimpleNamespace

import numpy as np
from stub_tasks import stub_task

from ctzoo.inference.inputs import CaseInput
from ctzoo.inference.pipeline import PipelineOptions, run_pipeline
from ctzoo.inference.tasks import segmenter_task
from ctzoo.io import Volume, write_volume


def test_the_progress_line_of_a_case_gives_its_summary_seconds(tmp_path, monkeypatch, caplog):
    """The clock of a case starts when its reading starts, as summary.csv's does, not when its first slices reach
    the model: the auditor saw 0.9 s logged for a case of 2.3 s."""
    from ctzoo.inference import progress

    monkeypatch.setattr(progress, "stderr_is_tty", lambda: False)
    caplog.set_level(logging.INFO, logger="ctzoo.inference.pipeline")
    task = stub_task()
    preprocess = task.preprocess

    def slow_preprocess(volume):  # reading takes a while before the first slices go to the model
        time.sleep(0.5)
        return preprocess(volume)

    task.preprocess = slow_preprocess
    volume = Volume(np.zeros((4, 8, 8), np.float32), spacing=(1.0, 1.0, 2.0))
    case = CaseInput("ct", write_volume(volume, tmp_path / "ct.nii.gz"))
    [row] = run_pipeline([case], task, PipelineOptions(out=tmp_path / "out", workers=0, progress_interval_s=3600))
    [logged] = [float(m[1]) for r in caplog.records if (m := re.match(r"stub-model: case ct ok in ([\d.]+) s",
                                                                      r.getMessage()))]
    assert row["seconds"] >= 0.5 and logged == round(row["seconds"], 1)


def test_organ_volumes_in_the_summary_are_segmentation_json_s_on_a_sheared_grid(tmp_path):
    """A gantry tilt of 45 degrees kept in the grid: one voxel is |det| = 2 mm^3, not the product of the spacings
    (2.83 mm^3), as segmentation.json has it; the summary said 116 mL where the file said 82."""
    affine = np.diag([1.0, 1.0, 2.0])
    affine[1, 2] = 2.0 * np.tan(np.deg2rad(45))
    spacing = np.linalg.norm(affine, axis=0)
    volume = Volume(np.zeros((10, 64, 64), np.float32), spacing=tuple(spacing), direction=affine / spacing)
    task = segmenter_task(SimpleNamespace(class_names=["liver"]), prep=None, model_name="seg", version="1")
    _, info = task.write(volume, np.ones(volume.array.shape, np.uint8), tmp_path / "ct", False, {})
    document = json.loads((tmp_path / "ct" / "segmentation.json").read_text())
    assert document["classes"]["liver"]["volume_ml"] == 81.92
    assert info["detail"] == "liver 82 mL" and info["findings"] == 1
