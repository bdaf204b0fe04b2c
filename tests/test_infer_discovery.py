"""What ``ctzoo infer`` takes as its cases: an OUT inside the input tree is never read back as input, and a DICOM
folder holding several CT series gives a case per series."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from dicom_factory import SeriesSpec, make_slices, write_series
from stub_tasks import stub_task

from ctzoo.cli import main
from ctzoo.inference import pipeline
from ctzoo.inference.inputs import discover_cases
from ctzoo.inference.pipeline import PipelineOptions, run_pipeline
from ctzoo.inference.reader import read_case
from ctzoo.inference.series_cases import split_series
from ctzoo.io import Volume, write_volume


def _volume_file(path: Path) -> Path:
    return write_volume(Volume(np.zeros((3, 8, 8), np.float32), spacing=(1.0, 1.0, 2.0)), path)


@pytest.fixture
def run_cases(monkeypatch) -> list:
    """The cases each model run of ``ctzoo infer`` is given, the run itself replaced by ok rows and a label map per
    case (no model runs)."""
    given = []

    def fake_run(cases, task, options, other_rows=()):
        given.append([(c.name, getattr(c, "series", None)) for c in cases])
        book = pipeline.RunBook(cases, task, options, other_rows)
        for case in book.todo:
            _volume_file(options.out / case.name / "labels.nii.gz")
            book.record(pipeline.summary_row(case, task, "ok", slices=1), case)
        return book.rows()

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    return given


# --------------------------------------------------------------------------------------------- OUT inside inputs


def test_results_inside_the_input_tree_are_not_cases(tmp_path):
    """OUT (named or not), a case folder of another run's OUT and its summary.csv are skipped; a folder whose
    summary.csv is another program's is searched as before."""
    root = tmp_path / "data"
    _volume_file(root / "ct.nii.gz")
    _volume_file(root / "ctzoo-out" / "ct" / "labels.nii.gz")  # a run killed before it wrote a status or summary
    _volume_file(root / "old-run" / "ct" / "labels.nii.gz")
    (root / "old-run" / "ct" / "status-template-seg-abdomen.json").write_text("{}")
    (root / "old-run" / "summary.csv").write_text("case,input,model,model_version,status\n")
    _volume_file(root / "old-run" / "copied.nii.gz")  # beside another run's summary: that folder is results
    _volume_file(root / "notes" / "a.nii.gz")
    (root / "notes" / "summary.csv").write_text("patient,age\n")
    cases = discover_cases([root], exclude=[root / "ctzoo-out"])
    assert [c.name for c in cases] == ["ct", "notes_a"]
    for results in (root / "old-run", root / "old-run" / "ct"):  # given as inputs: no CT there either
        with pytest.raises(ValueError, match="folders of ctzoo infer results are skipped"):
            discover_cases([results])


def test_infer_dot_twice_runs_the_same_cases(tmp_path, monkeypatch, run_cases):
    """The auditor's run: ``ctzoo infer .`` writes ./ctzoo-out; the next run (--resume) took its labels.nii.gz as
    CT cases."""
    _volume_file(tmp_path / "ct.nii.gz")
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--resume"]):
        result = CliRunner().invoke(main, ["infer", ".", "--model", "template-seg-abdomen", *extra])
        assert result.exit_code == 0, result.output
    assert run_cases == [[("ct", None)], [("ct", None)]]


# ----------------------------------------------------------------------------------- several series in one folder


@pytest.fixture
def two_series(tmp_path) -> tuple[Path, dict[str, SeriesSpec]]:
    """study/: CT series A (4 slices) and B (7 slices), a localizer (1 slice) and a folder of one series."""
    root = tmp_path / "in"
    specs = {"A": SeriesSpec(make_slices(4), description="A"), "B": SeriesSpec(make_slices(7, seed=1), description="B"),
             "scout": SeriesSpec(make_slices(1, seed=2), description="scout",
                                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))}
    for name, spec in specs.items():
        write_series(root / "study", spec, prefix=name)
    specs["single"] = SeriesSpec(make_slices(3, seed=3), description="single")
    write_series(root / "single", specs["single"])
    return root, specs


def test_a_folder_of_two_ct_series_is_two_cases_each_reading_its_own(two_series, tmp_path):
    """Series numbered as ``ctzoo info`` lists them (B, the larger, is #1); the localizer is no case (the rules
    refuse it); a folder of one series keeps its name. Before, study/ ran B and dropped A without a word."""
    root, specs = two_series
    cases = split_series(discover_cases([root]))
    assert [(c.name, c.series) for c in cases] == [("single", None), ("study_s1", specs["B"].series_uid),
                                                   ("study_s2", specs["A"].series_uid)]
    rows = run_pipeline(cases, stub_task(), PipelineOptions(out=tmp_path / "out", workers=1, progress=False))
    assert [(r["case"], r["status"], r["slices"]) for r in rows] == [("single", "ok", 3), ("study_s1", "ok", 7),
                                                                     ("study_s2", "ok", 4)]
    read = {c.name: next(m for m in read_case(0, c, stub_task(), 8) if m["kind"] == "end")["volume"] for c in cases}
    assert [v.dicom.series_description for v in read.values()] == ["single", "B", "A"]


def test_infer_runs_every_ct_series_unless_series_picks_one(two_series, tmp_path, run_cases):
    root, specs = two_series
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["infer", str(root), "--out", str(out)]).exit_code == 0
    assert CliRunner().invoke(main, ["infer", str(root), "--out", str(out), "--series", "2"]).exit_code == 0
    assert run_cases == [[("single", None), ("study_s1", specs["B"].series_uid), ("study_s2", specs["A"].series_uid)],
                         [("single", None), ("study", None)]]
    with open(out / "summary.csv", newline="") as handle:
        assert [row["case"] for row in csv.DictReader(handle)] == ["single", "study"]
