"""The PACS bridge's core decodes a series once, for its check and every model."""

from __future__ import annotations

import shutil

import ctzoo.io
from ctzoo.datasets.samples import sample_ct_dicom
from ctzoo.inference.tasks import model_task
from ctzoo.io.dicom_scan import SeriesRules
from ctzoo.pacs.core import check_series, run_models


def test_a_series_is_read_once_for_the_check_and_all_models(tmp_path, monkeypatch):
    series = tmp_path / "series"
    shutil.copytree(sample_ct_dicom(), series)
    reads = []
    read_volume = ctzoo.io.read_volume

    def counting_read(*args, **kwargs):
        reads.append(args[0])
        return read_volume(*args, **kwargs)

    monkeypatch.setattr(ctzoo.io, "read_volume", counting_read)
    tasks = [model_task(name, "torch", "cpu", threads=1) for name in ("recistnet-mini", "template-seg-abdomen")]
    rules = SeriesRules()
    volume = check_series(series, rules)
    paths = run_models(series, tasks, rules, tmp_path / "out", volume=volume)
    assert len(reads) == 1  # the check's read; both models ran on that volume
    assert sorted(p.name for p in paths) == ["seg.dcm", "sr.dcm"]
    assert (tmp_path / "out" / "series" / "detections.json").is_file()


def test_a_dicom_writer_failure_fails_the_job_with_its_reason(tmp_path, monkeypatch):
    """The bridge exists to deliver DICOM results: a case that is ok without its SR is a failure there, naming why
    (ctzoo infer and the service keep such a case's JSON results)."""
    import pytest

    import ctzoo.io.dicom_sr

    def refuse(*args, **kwargs):
        raise ValueError("no character set")

    monkeypatch.setattr(ctzoo.io.dicom_sr, "write_recist_sr", refuse)
    series = tmp_path / "series"
    shutil.copytree(sample_ct_dicom(), series)
    with pytest.raises(RuntimeError, match="recistnet-mini: sr.dcm not written: no character set"):
        run_models(series, [model_task("recistnet-mini", "torch", "cpu", threads=1)], SeriesRules(), tmp_path / "out")
