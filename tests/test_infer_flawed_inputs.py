"""``ctzoo infer`` on flawed inputs: a series with a missing slice (each lesion on its own slice, the gap reported in
the outputs and the log) and damaged files (the reader's one-line error as the case's error)."""

from __future__ import annotations

import json
import logging
import re
import zipfile

import numpy as np
import pytest
from series_variants import lowest_slices, move_lowest_slice
from stub_tasks import stub_task

from ctzoo.datasets.samples import sample_ct_dicom
from ctzoo.inference.inputs import CaseInput
from ctzoo.inference.pipeline import PipelineOptions, run_pipeline
from ctzoo.io import Volume, read_volume, write_volume


def test_lesions_beside_a_missing_slice_sit_on_their_own_slice_and_the_gap_is_reported(tmp_path, caplog):
    """The sample's 6 lowest slices with the lowest moved 4 mm down: the grid (median step, from the lowest slice) is
    4 mm off every slice above the gap. Each lesion's points_mm lie on its key slice's own z, in detections.json and
    in the SR; the reader's warning is in detections.json, segmentation.json's input section and the log."""
    from ctzoo.inference.segment_volume import seg_summary
    from ctzoo.inference.tasks import model_task
    from ctzoo.io.dicom_sr import read_recist_sr

    series = lowest_slices(sample_ct_dicom(), 6, tmp_path / "gapped")
    move_lowest_slice(series, 4.0)
    caplog.set_level(logging.WARNING, logger="ctzoo.inference.tasks")
    task = model_task("recistnet-mini", "torch", "cpu", score_threshold=0.05)
    rows = run_pipeline([CaseInput("gapped", series)], task, PipelineOptions(out=tmp_path / "out", workers=0,
                                                                             overlay=False))
    assert rows[0]["status"] == "ok", rows
    document = json.loads((tmp_path / "out" / "gapped" / "detections.json").read_text())
    volume = read_volume(series, progress=False)
    true_z = [float(ds.ImagePositionPatient[2]) for ds in volume.dicom.headers]
    assert any(lesion["slice"] > 0 for lesion in document["lesions"])  # above the gap, where the grid is off
    for lesion in document["lesions"]:
        assert np.asarray(lesion["points_mm"])[:, 2] == pytest.approx([true_z[lesion["slice"]]] * 5, abs=1e-3)
        assert lesion["slice_z_mm"] == pytest.approx(true_z[lesion["slice"]], abs=0.005)
    by_instance = dict(zip(volume.dicom.sop_instance_uids, true_z))
    for measured in read_recist_sr(tmp_path / "out" / "gapped" / "sr.dcm"):
        assert np.asarray(measured["points_mm"])[:, 2] == pytest.approx(
            [by_instance[measured["referenced_sop_instance_uid"]]] * 4, abs=1e-3)
    gap = [w for w in document["input"]["warnings"] if "missing slice" in w]
    assert len(gap) == 1 and gap[0] in volume.warnings
    assert any(r.getMessage() == f"gapped: {gap[0]}" for r in caplog.records)
    labels = np.zeros(volume.array.shape, np.uint8)
    assert gap[0] in seg_summary(labels, volume, ["liver"])["input"]["warnings"]


def test_damaged_files_fail_with_the_readers_one_line_message(tmp_path):
    """A NIfTI cut short and a zip with a flipped byte: each case's summary error is the reader's message naming the
    file (gzip's EOFError and zipfile's BadZipFile used to be recorded by their type and bare text)."""
    rng = np.random.default_rng(0)
    good = write_volume(Volume(rng.integers(-1024, 2000, (4, 16, 16)).astype(np.float32), (1.0, 1.0, 2.0)),
                        tmp_path / "good.nii.gz")
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    series = lowest_slices(sample_ct_dicom(), 3, tmp_path / "series")
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(damaged, "w") as archive:
        for file in sorted(series.iterdir()):
            archive.write(file, file.name)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the middle one of 3 members: its CRC no longer matches
    damaged.write_bytes(bytes(data))
    rows = run_pipeline([CaseInput("cut", cut), CaseInput("damaged", damaged)], stub_task(),
                        PipelineOptions(out=tmp_path / "out", workers=0, progress=False))
    assert rows[0]["error"] == (f"{cut}: not a readable NIfTI file (damaged or truncated?): Compressed file ended "
                                "before the end-of-stream marker was reached")
    assert re.fullmatch(rf"{re.escape(str(damaged))}: cannot extract 'CT\.[\d.]+': Bad CRC-32 for file .*",
                        rows[1]["error"])
