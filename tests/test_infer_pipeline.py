"""``ctzoo infer`` as a batch job: mixed inputs with a corrupt one, summary, DICOM SR out, resume, Ctrl-C,
NaN volumes, and slices of different volumes sharing batches."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from infer_runs import stop_after_first_case
from series_variants import lowest_slices
from stub_tasks import stub_task

from ctzoo.cli import main
from ctzoo.datasets.samples import sample_ct_dicom
from ctzoo.inference.inputs import CaseInput, discover_cases
from ctzoo.inference.pipeline import PipelineOptions, run_pipeline
from ctzoo.inference.reader import read_case
from ctzoo.io import read_volume, write_volume


def _small_nifti(path: Path, slices: int = 6, nan: bool = False) -> Path:
    volume = read_volume(sample_ct_dicom(), progress=False)
    array = volume.array[:slices].copy()
    if nan:
        array[2, 100:110, 100:110] = np.nan
    return write_volume(dataclasses.replace(volume, array=array, dicom=None), path)


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory) -> Path:
    """A folder as users have them: a nested DICOM series, a NIfTI, a zipped series, a corrupt file, a sidecar.
    The series are the sample's 6 lowest slices (the detector finds lesions there, the segmenter organs)."""
    root = tmp_path_factory.mktemp("inputs")
    series = lowest_slices(sample_ct_dicom(), 6, root / "patientA" / "study1" / "ct")
    for sidecar in Path(sample_ct_dicom()).glob("[!C]*"):  # its LICENSE and NOTICE.md: files that are not DICOM
        shutil.copy(sidecar, series / sidecar.name)
    _small_nifti(root / "small.nii.gz")
    (root / "broken.nii.gz").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "notes.txt").write_text("not an input list: a sidecar inside a folder is ignored\n")
    with zipfile.ZipFile(root / "series.zip", "w") as archive:
        for file in sorted(series.iterdir()):
            archive.write(file, f"IMG/{file.name}")
    return root


def _summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def test_discover_cases_finds_every_kind_and_names_them_uniquely(mixed_inputs, tmp_path):
    cases = discover_cases([mixed_inputs])
    assert {c.name for c in cases} == {"patientA_study1_ct", "small", "broken", "series"}
    listing = tmp_path / "cases.txt"
    listing.write_text(f"# my cases\n{mixed_inputs / 'small.nii.gz'}\n\n{mixed_inputs / 'patientA'}\n")
    listed = discover_cases([listing, mixed_inputs / "small.nii.gz"])  # the same file twice runs once
    assert [c.name for c in listed] == ["small", "study1_ct"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        discover_cases([tmp_path / "typo"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no CT volumes"):
        discover_cases([tmp_path / "empty"])


def test_case_names_stay_unique_when_a_suffixed_name_is_also_a_file_name(tmp_path):
    """``a.nii.gz`` and ``a.nrrd`` both name a case ``a``; the second must not take ``a-2`` when ``a-2.nii.gz`` has
    it (two cases in one folder: one's results would overwrite the other's and one summary row would vanish). Names
    differing only in letter case count as taken too (OUT may be on a case-insensitive filesystem)."""
    inputs = tmp_path / "coll"
    inputs.mkdir()
    for name in ("a.nii.gz", "a.nrrd", "a-2.nii.gz", "A.mha"):  # discovery goes by suffix: no voxels needed
        (inputs / name).write_bytes(b"")
    cases = discover_cases([inputs])
    assert {c.path.name: c.name for c in cases} == {"A.mha": "A", "a-2.nii.gz": "a-2", "a.nii.gz": "a-3",
                                                    "a.nrrd": "a-4"}
    assert [c.name for c in discover_cases([inputs])] == [c.name for c in cases]  # the same names every run


def test_a_dicom_folder_case_reads_its_own_series_not_its_subfolders(tmp_path):
    """Series A (4 slices) directly in study/, series B (7 slices) in study/sub/: discovery makes two cases, and
    each reads its own series. Read with its subfolders, study/ would choose B (more slices): B ran twice and A
    never."""
    from dicom_factory import SeriesSpec, make_slices, write_series

    study = tmp_path / "nest" / "study"
    series_a = SeriesSpec(make_slices(4), description="A")
    series_b = SeriesSpec(make_slices(7, seed=1), description="B")
    write_series(study, series_a)
    write_series(study / "sub", series_b)
    cases = discover_cases([tmp_path / "nest"])
    assert [(c.name, c.recursive) for c in cases] == [("study", False), ("study_sub", False)]
    rows = run_pipeline(cases, stub_task(), PipelineOptions(out=tmp_path / "out", workers=0, progress=False))
    assert [(r["case"], r["status"], r["slices"]) for r in rows] == [("study", "ok", 4), ("study_sub", "ok", 7)]
    read = {c.name: next(m for m in read_case(0, c, stub_task(), 8) if m["kind"] == "end")["volume"] for c in cases}
    assert {name: v.dicom.series_instance_uid for name, v in read.items()} == {"study": series_a.series_uid,
                                                                            "study_sub": series_b.series_uid}


def test_batch_over_mixed_inputs_records_the_corrupt_case_and_writes_seg_and_sr(mixed_inputs, tmp_path):
    """The issue's acceptance run: both zoo models over mixed inputs with one corrupt file."""
    from dicom_validation import assert_dciodvfy_clean

    from ctzoo.io.dicom_seg import read_dicom_seg_labels
    from ctzoo.io.dicom_sr import read_recist_sr

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["infer", str(mixed_inputs), "--out", str(out), "--workers", "1",
                                       "--model", "recistnet-mini", "--model", "template-seg-abdomen",
                                       "--score-threshold", "0.05"])
    assert result.exit_code == 1, result.output  # one case failed: the batch finished, the exit status says so
    with open(out / "summary.csv", newline="") as handle:
        rows = {(row["case"], row["model"]): row for row in csv.DictReader(handle)}
    assert {key: row["status"] for key, row in rows.items()} == {
        (case, model): "error" if case == "broken" else "ok"
        for case in ("patientA_study1_ct", "small", "broken", "series")
        for model in ("recistnet-mini", "template-seg-abdomen")}
    assert "gzip" in rows["broken", "recistnet-mini"]["error"] and "FAILED" in result.output
    dicom_case = out / "patientA_study1_ct"
    document = json.loads((dicom_case / "detections.json").read_text())
    detector_row = rows["patientA_study1_ct", "recistnet-mini"]
    assert detector_row["slices"] == "6" and int(detector_row["findings"]) == len(document["lesions"]) > 0
    # the zip holds the same series: the same lesions
    assert json.loads((out / "series" / "detections.json").read_text())["lesions"] == document["lesions"]
    # DICOM input gets an SR (TID 1500) and a SEG; both read back and pass dciodvfy
    measured = read_recist_sr(dicom_case / "sr.dcm")
    assert sorted(round(m["long_axis_mm"], 1) for m in measured) == sorted(
        round(d["long_axis_mm"], 1) for d in document["lesions"])
    volume = read_volume(mixed_inputs / "patientA" / "study1" / "ct", progress=False)
    labels = read_dicom_seg_labels(dicom_case / "seg.dcm", volume)
    from ctzoo.io import read_nifti

    np.testing.assert_array_equal(labels, read_nifti(dicom_case / "labels.nii.gz").array.astype(np.uint8))
    assert labels.any()
    for dicom_file in (dicom_case / "sr.dcm", dicom_case / "seg.dcm"):
        assert_dciodvfy_clean(dicom_file)
    assert (out / "small" / "labels.nii.gz").exists() and not (out / "small" / "sr.dcm").exists()
    assert not list(out.rglob("*.png"))  # overlays only on request for batches
    assert not [p for p in out.rglob("*") if ".partial" in p.name]


def test_pipeline_matches_the_single_volume_function(tmp_path):
    """Batching across volumes, reader processes and files change nothing: same lesions as the stages run in
    memory on the one volume, slice batch after slice batch."""
    from ctzoo.inference.tasks import model_task, run_task

    task = model_task("recistnet-mini", "torch", "cpu", score_threshold=0.05)
    rows = run_pipeline([CaseInput("a", sample_ct_dicom())], task, PipelineOptions(out=tmp_path, workers=0))
    assert rows[0]["status"] == "ok", rows
    reference = run_task(task, read_volume(sample_ct_dicom()), batch_size=3)
    found = json.loads((tmp_path / "a" / "detections.json").read_text())["lesions"]
    assert len(found) == len(reference["lesions"]) > 0
    for ours, theirs in zip(found, reference["lesions"]):
        assert ours["slice"] == theirs["slice"] and abs(ours["score"] - theirs["score"]) < 1e-4
        np.testing.assert_allclose(ours["points_mm"], theirs["points_mm"], atol=1e-2)


def test_resume_skips_finished_cases_and_retries_failed_ones(mixed_inputs, tmp_path):
    out = tmp_path / "out"
    args = ["infer", str(mixed_inputs / "small.nii.gz"), str(mixed_inputs / "broken.nii.gz"), "--out", str(out),
            "--workers", "0"]
    CliRunner().invoke(main, args)
    status = out / "small" / "status-recistnet-mini.json"
    before = status.stat().st_mtime_ns
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 1, result.output
    assert status.stat().st_mtime_ns == before  # not redone
    rows = _summary(out)
    assert rows["small"]["status"] == "ok" and rows["broken"]["status"] == "error"


def test_resume_reruns_cases_whose_options_or_input_changed_and_says_how_many(tmp_path, caplog):
    import logging
    import os

    cases = [CaseInput(f"c{k}", _tiny_volume(tmp_path / f"c{k}.nii.gz", 4)) for k in range(2)]
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="ctzoo.inference.pipeline")

    def resume(**options) -> dict[str, str]:
        """Resume with ``options``: which cases ran again (their status file rewritten), and the log's line."""
        caplog.clear()
        for case in cases:  # a status file rewritten shows, however coarse the filesystem's clock
            os.utime(out / case.name / "status-stub-model.json", ns=(1, 1))
        rows = run_pipeline(cases, stub_task(), PipelineOptions(out=out, workers=0, progress=False, resume=True,
                                                                **options))
        assert [r["status"] for r in rows] == ["ok", "ok"]
        [line] = [r.getMessage() for r in caplog.records if "--resume" in r.getMessage()]
        rerun = sorted(c.name for c in cases if (out / c.name / "status-stub-model.json").stat().st_mtime_ns != 1)
        return {"rerun": rerun, "line": line}

    run_pipeline(cases, stub_task(), PipelineOptions(out=out, workers=0, progress=False))
    saved = json.loads((out / "c0" / "status-stub-model.json").read_text())
    assert saved["settings"]["overlay"] is True and saved["settings"]["series"] is None
    assert saved["input_identity"]["files"] == 1 and saved["input_identity"]["bytes"] > 0
    assert resume() == {"rerun": [], "line": "stub-model: --resume: 2 case(s) reused, 0 to run"}
    assert resume(overlay=False) == {
        "rerun": ["c0", "c1"], "line": "stub-model: --resume: 0 case(s) reused, 2 to run: 2 options changed (overlay)"}
    os.utime(cases[1].path, ns=(5 * 10**18, 5 * 10**18))  # touched: the same bytes, a new modification time
    assert resume(overlay=False) == {
        "rerun": ["c1"], "line": "stub-model: --resume: 1 case(s) reused, 1 to run: 1 input changed"}
    assert resume(overlay=False, series="2") == {  # the series selection counts too (for DICOM inputs)
        "rerun": ["c0", "c1"], "line": "stub-model: --resume: 0 case(s) reused, 2 to run: 2 options changed (series)"}


def test_resume_with_another_score_threshold_reruns_the_detector(mixed_inputs, tmp_path):
    """The auditor's run: lesions kept from 0.05, then --resume --score-threshold 0.95 must not keep them; the
    threshold a case was run with is in its detections.json and its status file."""
    shutil.copy(mixed_inputs / "small.nii.gz", tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    args = ["infer", str(tmp_path / "ct.nii.gz"), "--out", str(out), "--workers", "0", "--no-overlay"]
    assert CliRunner().invoke(main, [*args, "--score-threshold", "0.05"]).exit_code == 0
    first = json.loads((out / "ct" / "detections.json").read_text())
    assert first["score_threshold"] == 0.05 and any(d["score"] < 0.95 for d in first["lesions"])
    result = CliRunner().invoke(main, [*args, "--resume", "--score-threshold", "0.95"])
    assert result.exit_code == 0, result.output
    document = json.loads((out / "ct" / "detections.json").read_text())
    assert document["score_threshold"] == 0.95 and all(d["score"] >= 0.95 for d in document["lesions"])
    assert _summary(out)["ct"]["findings"] == str(len(document["lesions"]))
    status = json.loads((out / "ct" / "status-recistnet-mini.json").read_text())
    assert status["settings"]["score_threshold"] == 0.95 and status["settings"]["backend"] == "torch"


def test_a_case_that_fails_on_a_rerun_keeps_its_status_alone_and_the_other_models_files(mixed_inputs, tmp_path):
    """Both models write into OUT/ct; the input is then cut short and the detector run again: its case fails and
    holds only its error status, not the detections and overlay of the earlier run; the segmenter's files stay."""
    from ctzoo.inference.tasks import model_task

    source = tmp_path / "ct.nii.gz"
    shutil.copy(mixed_inputs / "small.nii.gz", source)
    out = tmp_path / "out"
    args = ["infer", str(source), "--out", str(out), "--workers", "0", "--overlay"]
    result = CliRunner().invoke(main, [*args, "--model", "recistnet-mini", "--model", "template-seg-abdomen"])
    assert result.exit_code == 0, result.output
    detector_files = {"detections.json", "overlay.png", "status-recistnet-mini.json"}
    segmenter_files = {"labels.nii.gz", "segmentation.json", "labels_overlay.png", "status-template-seg-abdomen.json"}
    assert {p.name for p in (out / "ct").iterdir()} == detector_files | segmenter_files

    source.write_bytes(source.read_bytes()[:source.stat().st_size // 3])
    result = CliRunner().invoke(main, [*args, "--model", "recistnet-mini"])
    assert result.exit_code == 1, result.output
    status = json.loads((out / "ct" / "status-recistnet-mini.json").read_text())
    assert status["status"] == "error" and status["outputs"] == ""
    assert {p.name for p in (out / "ct").iterdir()} == {"status-recistnet-mini.json"} | segmenter_files
    # what each model declares it may write (what a rerun removes) covers what it wrote
    declared = {name for model in ("recistnet-mini", "template-seg-abdomen")
                for name in model_task(model, "torch", "cpu").output_files}
    assert {name for name in detector_files | segmenter_files if not name.startswith("status-")} <= declared


def test_a_failing_dicom_writer_keeps_the_json_and_nifti_results_and_resume_retries_it(mixed_inputs, tmp_path,
                                                                                        monkeypatch):
    """The SR and SEG writers refuse the series (as highdicom refused a Japanese character set): each case is ok
    with its JSON and NIfTI results, the summary and status say why its DICOM result is missing, the run exits 0
    with a warning; --resume runs those cases again, and with a writer that works they get their DICOM results."""
    import ctzoo.io.dicom_seg
    import ctzoo.io.dicom_sr

    def refuse(*args, **kwargs):
        raise ValueError("'' is not a valid SpecificCharacterSetValues")

    monkeypatch.setattr(ctzoo.io.dicom_sr, "write_recist_sr", refuse)
    monkeypatch.setattr(ctzoo.io.dicom_seg, "write_dicom_seg", refuse)
    out = tmp_path / "out"
    args = ["infer", str(mixed_inputs / "patientA" / "study1" / "ct"), "--out", str(out), "--workers", "0",
            "--model", "recistnet-mini", "--model", "template-seg-abdomen"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    case = out / "ct"
    assert {p.name for p in case.iterdir()} == {"detections.json", "labels.nii.gz", "segmentation.json",
                                                "status-recistnet-mini.json", "status-template-seg-abdomen.json"}
    rows = {row["model"]: row for row in _summary_rows(out)}
    for model, name in (("recistnet-mini", "sr.dcm"), ("template-seg-abdomen", "seg.dcm")):
        expected = f"{name} not written: '' is not a valid SpecificCharacterSetValues"
        assert rows[model]["status"] == "ok" and rows[model]["dicom_error"] == expected
        assert json.loads((case / f"status-{model}.json").read_text())["dicom_error"] == expected
        assert f"warning: ct [{model}]: {expected}" in result.output
    assert "2 ok, 0 failed; 2 ok without their DICOM result" in result.output

    monkeypatch.undo()
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    assert (case / "sr.dcm").is_file() and (case / "seg.dcm").is_file()
    assert {row["dicom_error"] for row in _summary_rows(out)} == {""}


def _summary_rows(out: Path) -> list[dict]:
    with open(out / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_ctrl_c_leaves_no_partial_file_and_resume_finishes(mixed_inputs, tmp_path, monkeypatch):
    from ctzoo.inference import tasks

    out = tmp_path / "out"
    cases = discover_cases([mixed_inputs / "small.nii.gz", mixed_inputs / "patientA"])
    task = tasks.model_task("recistnet-mini", "torch", "cpu")
    calls = {"n": 0}
    predict = task.predict

    def interrupted(batch):
        calls["n"] += 1
        if calls["n"] == 3:  # the first case (6 slices) is done and being written; the second is half way
            raise KeyboardInterrupt
        return predict(batch)

    task.predict = interrupted
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cases, task, PipelineOptions(out=out, workers=0, batch_size=4, chunk=4, overlay=False))
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    assert not (out / "study1_ct" / "status-recistnet-mini.json").exists()
    task.predict = predict
    rows = run_pipeline(cases, task, PipelineOptions(out=out, workers=0, resume=True, overlay=False))
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_nan_voxels_fail_that_case_only(tmp_path):
    from ctzoo.inference.tasks import model_task

    bad = _small_nifti(tmp_path / "nan.nii.gz", nan=True)
    good = _small_nifti(tmp_path / "good.nii.gz")
    rows = run_pipeline([CaseInput("nan", bad), CaseInput("good", good)], model_task("recistnet-mini", "torch", "cpu"),
                        PipelineOptions(out=tmp_path / "out", workers=0, overlay=False))
    assert rows[0]["status"] == "error" and "100 voxels are NaN" in rows[0]["error"]
    assert rows[1]["status"] == "ok"


def test_slices_of_consecutive_volumes_share_batches(tmp_path):
    from ctzoo.inference.tasks import model_task

    task = model_task("recistnet-mini", "torch", "cpu")
    sizes = []
    predict = task.predict
    task.predict = lambda batch: sizes.append(len(batch)) or predict(batch)
    paths = [_small_nifti(tmp_path / f"v{i}.nii.gz", slices=6) for i in range(3)]
    rows = run_pipeline([CaseInput(f"v{i}", p) for i, p in enumerate(paths)], task,
                        PipelineOptions(out=tmp_path / "out", workers=0, batch_size=8, chunk=3, overlay=False))
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert sizes == [8, 8, 2]  # 18 slices of three volumes: full batches, not 6 + 6 + 6


@pytest.mark.parametrize("spacing", [None, (0.6, 0.6, 1.3)])
def test_volume_inputs_equal_training_preprocessing(spacing):
    """slice_inputs resamples each plane once and mixes resampled neighbours; training resamples each slice's
    context planes. Resampling is linear, so both give the same input, with anti-aliasing (0.6 mm pixels
    shrunk to 0.8 mm) and interpolated neighbours (1.3 mm slices) too."""
    from ctzoo.datasets.deeplesion.context import context_planes, neighbour_offsets
    from ctzoo.datasets.deeplesion.dataset import SlicePreprocessing, resample_and_window
    from ctzoo.inference.recist_volume import pad_to, slice_inputs
    from ctzoo.io import reorient_lps
    from ctzoo.models import model_input_spec

    spec = model_input_spec("recistnet-mini")
    prep = SlicePreprocessing(**{k: v for k, v in spec.items() if k in SlicePreprocessing.model_fields})
    volume = reorient_lps(read_volume(sample_ct_dicom(), progress=False))
    if spacing is not None:
        volume = dataclasses.replace(volume, spacing=spacing)
    offsets = neighbour_offsets(prep.num_slices, prep.slice_interval_mm, volume.spacing[2], "head")  # LPS
    last = volume.array.shape[0] - 1
    for k, (image, scale) in enumerate(slice_inputs(volume, prep)):
        planes = context_planes(lambda z: volume.array[z], k, offsets, 0, last)
        reference, reference_scale = resample_and_window(planes, volume.spacing[:2], prep)
        np.testing.assert_allclose(image.numpy(), pad_to(reference, *image.shape[-2:]).numpy(), atol=1e-5)
        np.testing.assert_allclose(scale, reference_scale)


# ------------------------------------------------------------------------------------ progress off a terminal


def _tiny_volume(path: Path, slices: int) -> Path:
    from ctzoo.io import Volume

    return write_volume(Volume(np.zeros((slices, 8, 8), np.float32), spacing=(1.0, 1.0, 2.0)), path)


def test_progress_off_a_terminal_logs_slices_while_a_case_runs_and_a_line_per_case(tmp_path, monkeypatch, caplog):
    import logging

    from ctzoo.inference import progress

    monkeypatch.setattr(progress, "stderr_is_tty", lambda: False)
    cases = [CaseInput("tiny", _tiny_volume(tmp_path / "tiny.nii.gz", 12)), CaseInput("broken", tmp_path / "nope.nrrd")]
    (tmp_path / "nope.nrrd").write_bytes(b"not a volume")
    caplog.set_level(logging.INFO, logger="ctzoo.inference.pipeline")
    rows = run_pipeline(cases, stub_task(0.05), PipelineOptions(out=tmp_path / "out", workers=0, batch_size=2,
                                                                 chunk=2, progress_interval_s=0.02))
    assert [r["status"] for r in rows] == ["ok", "error"]
    lines = [r.getMessage() for r in caplog.records if r.name == "ctzoo.inference.pipeline"]
    periodic = [line for line in lines if "slices/s" in line and "elapsed" in line]
    assert periodic and all(line.startswith("stub-model: ") for line in periodic)
    # the slice count moves while the first case is still running: "0/2 cases done, 6 slices (of 12 known so far)"
    running = [re.match(r"stub-model: 0/2 cases done, (\d+) slices \(of 12 known so far\), [\d.]+ slices/s, "
                        r"elapsed \S+, ETA ~\S+$", line) for line in periodic]
    assert any(match and 0 < int(match[1]) < 12 for match in running), periodic
    assert any(line.startswith("stub-model: case tiny ok in ") and line.endswith(" s (1/2 cases done)")
               for line in lines)
    failed = [r for r in caplog.records if r.getMessage().startswith("stub-model: case broken error in ")]
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING
    assert lines[-1].startswith("stub-model: finished, 2/2 cases, 12 slices in ")


def test_progress_on_a_terminal_is_a_bar_only_and_progress_false_is_silent(tmp_path, monkeypatch, caplog):
    import logging

    from ctzoo.inference import progress

    case = [CaseInput("tiny", _tiny_volume(tmp_path / "tiny.nii.gz", 4))]
    caplog.set_level(logging.INFO, logger="ctzoo.inference.pipeline")
    monkeypatch.setattr(progress, "stderr_is_tty", lambda: True)
    run_pipeline(case, stub_task(), PipelineOptions(out=tmp_path / "a", workers=0, progress_interval_s=0.001))
    monkeypatch.setattr(progress, "stderr_is_tty", lambda: False)
    run_pipeline(case, stub_task(), PipelineOptions(out=tmp_path / "b", workers=0, progress_interval_s=0.001,
                                                     progress=False))
    assert not [r for r in caplog.records if r.name == "ctzoo.inference.pipeline"]


def test_progress_line_and_eta_before_every_case_size_is_known():
    from ctzoo.inference.progress import Progress, format_duration

    assert [format_duration(s) for s in (4.4, 125, 3720)] == ["4s", "2m05s", "1h02m"]
    with Progress("m", 3, enabled=True, tty=False, interval_s=3600) as counter:
        counter.case_slices(0, 10, expected=100)
        counter.slices_done(10)
        counter.started -= 10.0  # 1 slice/s
        line = counter.line()
        # 100 slices known of 3 cases: the two unseen ones are taken as 100 each -> 290 to go at ~1 slice/s
        assert line.startswith("m: 0/3 cases done, 10 slices (of 100 known so far), 1.0 slices/s, elapsed 10s, ETA ~4m")
        counter.case_slices(1, 0, expected=50)
        counter.case_slices(2, 0, expected=50)
        assert ", 10/200 slices, " in counter.line()


def test_summary_seconds_are_each_cases_own_wall_time(tmp_path):
    """``seconds`` runs from the start of a case's reading to its outputs written, not from the start of the run:
    each of four cases waits for its own 12 batches of >= 0.1 s, and their seconds add up to about the run's wall
    time, not to a running total (which would be about 2.5 times it)."""
    import time

    cases = [CaseInput(f"c{k}", _tiny_volume(tmp_path / f"c{k}.nii.gz", 24)) for k in range(4)]
    out = tmp_path / "out"
    start = time.time()
    rows = run_pipeline(cases, stub_task(0.1), PipelineOptions(out=out, workers=1, batch_size=2, chunk=2,
                                                                progress=False))
    wall = time.time() - start
    seconds = [row["seconds"] for row in rows]
    assert [row["status"] for row in rows] == ["ok"] * 4
    assert all(1.2 - 0.01 <= s <= wall + 0.01 for s in seconds), (seconds, wall)
    # one reader: cases overlap only by its read-ahead (the next case is read while the model runs the last batches
    # of the one before), a few tenths of a second each, not whole cases
    assert sum(seconds) <= 1.5 * wall, (seconds, wall)
    summary = _summary(out)
    for case, row in zip(cases, rows):
        status = json.loads((out / case.name / "status-stub-model.json").read_text())
        assert status["seconds"] == row["seconds"] and summary[case.name]["seconds"] == str(row["seconds"])
        assert 0 <= status["read_s"] <= status["seconds"]


@pytest.mark.parametrize("layout,workers", [("shared", 0), ("shared", 1), ("copies", 2)])
def test_every_stage_is_a_perf_event_and_reading_excludes_the_wait_for_the_model(tmp_path, layout, workers):
    """With ``perf`` on, each case gives read/preprocess/finish/write events keyed by its slice bucket and each batch
    a predict event keyed by its rows (in the copies layout, batches run in the workers and are recorded here) that
    names its cases (their positions and the series hashes of their case events); the reader's times are its own
    work, so where the reader runs between the model's batches in one process (workers=0, and each copy)
    ``read_s`` does not take in the model's 0.05 s batches."""
    from ctzoo.perf import DetectorConfig, PerfMonitor

    cases = [CaseInput(f"c{k}", _tiny_volume(tmp_path / f"c{k}.nii.gz", 6 + 6 * k)) for k in range(3)]
    events = []
    monitor = PerfMonitor(tmp_path / "perf.sqlite", DetectorConfig(skip_first=False, min_samples=100), role="infer",
                          on_event=lambda event, label: events.append(event))
    task = stub_task(0.05)
    rows = run_pipeline(cases, task, PipelineOptions(out=tmp_path / "out", layout=layout, workers=workers,
                                                     batch_size=2, chunk=2, progress=False, perf=monitor))
    monitor.close()
    stats = {(s["stage"], s["bucket"]): s["count"] for s in monitor.stats()}
    assert {stage for stage, _ in stats} == {"read", "preprocess", "predict", "finish", "write"}
    for stage in ("read", "preprocess", "finish", "write"):  # slices 6, 12, 18: buckets 5-8, 9-16, 17-32
        assert {b: stats[(stage, b)] for b in ("5-8", "9-16", "17-32")} == {"5-8": 1, "9-16": 1, "17-32": 1}
    assert stats[("predict", "2")] == 18  # 36 slices in batches of 2
    hashes = {e.context["case"]: e.context["series_hash"] for e in events if e.stage == "read"}
    assert sorted(hashes) == [0, 1, 2] and len(set(hashes.values())) == 3
    named = [(e.context["cases"], e.context["series_hashes"]) for e in events if e.stage == "predict"]
    for members, series in named:
        assert series == ",".join(hashes[int(case)] for case in members.split(",")), (members, series)
    assert {case for members, _ in named for case in members.split(",")} == {"0", "1", "2"}
    assert all(row["read_s"] < 0.3 for row in rows), [row["read_s"] for row in rows]  # 3-9 batches of 0.05 s each


def test_an_armed_deep_profile_reruns_the_anomalous_batch_under_torch_profiler(tmp_path):
    """``--perf-profile`` in ``ctzoo infer --backend torch``: the first predict batch judged anomalous (one is delayed,
    injected around the real model) is rerun under torch.profiler, and the profile is kept with it. The delay is at
    least 1 s and 5 times the slowest batch before it: on a loaded CI host a batch of this model can take several
    tenths of a second, and a fixed 1 s would then fall under the detector's 3-times-the-median floor."""
    import time

    from ctzoo.inference.tasks import model_task
    from ctzoo.perf import DetectorConfig, PerfMonitor

    task = model_task("recistnet-mini", "torch", "cpu")
    predict, earlier, delays = task.predict, [], []

    def predict_with_a_delay(batch):
        if len(earlier) == 26:
            delays.append(max(1.0, 5 * max(earlier)))
            time.sleep(delays[0])
        start = time.perf_counter()
        outputs = predict(batch)
        earlier.append(time.perf_counter() - start)
        return outputs

    task.predict = predict_with_a_delay  # the profile reruns the real predict, without the injected delay
    monitor = PerfMonitor(tmp_path / "perf.sqlite", DetectorConfig(), role="infer", profile_budget=1)
    rows = run_pipeline([CaseInput("c", _tiny_volume(tmp_path / "c.nii.gz", 32))], task,
                        PipelineOptions(out=tmp_path / "out", workers=0, batch_size=1, progress=False, perf=monitor))
    monitor.close()
    assert [row["status"] for row in rows] == ["ok"]
    found = sorted((a for a in PerfMonitor(tmp_path / "perf.sqlite", role="reader").store.anomalies()
                    if a["stage"] == "predict"), key=lambda a: a["id"])
    assert any(a["seconds"] >= delays[0] for a in found)  # the delayed batch
    # one profile (the budget), of the first anomaly (on a quiet host, the delayed batch): the model's operators
    assert [a["id"] for a in found if a["profile"]] == [found[0]["id"]]
    profile = found[0]["profile"]
    assert profile["tool"] == "torch" and profile["anomaly_s"] == found[0]["seconds"] and profile["rerun_s"] < delays[0]
    assert any("conv" in op["op"] for op in profile["ops"]) and profile["trace_bytes"] > 0
    assert monitor.profiler.status() == {"budget": 0, "done": 1, "failed": 0, "skipped_busy": 0}


def test_ctrl_c_on_a_real_process_exits_130_and_resume_finishes_with_0(mixed_inputs, tmp_path):
    """``ctzoo infer`` in its own process, interrupted as a terminal does it (SIGINT to the process group, reader
    process included) once its first case is written: exit 130, no partial file, summary.csv and the status files
    agree on the cases that finished, and --resume runs only the rest and exits 0. (Exit 1 when a case fails:
    test_batch_over_mixed_inputs_records_the_corrupt_case_and_writes_seg_and_sr,
    test_resume_skips_finished_cases_...)"""
    import os
    import signal
    import subprocess
    import sys

    inputs = tmp_path / "in"
    inputs.mkdir()
    names = [f"case{k}" for k in range(5)]
    for name in names:  # batches of 2 slices: cases finish one by one, and Ctrl-C lands with cases left to run
        shutil.copyfile(mixed_inputs / "small.nii.gz", inputs / f"{name}.nii.gz")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ctzoo", "infer", str(inputs), "--out", str(out), "--workers", "1",
               "--no-overlay", "--batch-size", "2"]
    # its own process group, as a shell gives a job; SIGINT at its default, as in a terminal: pytest-xdist workers
    # ignore SIGINT, and an ignored signal stays ignored across exec (Python then installs no KeyboardInterrupt)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stderr = stop_after_first_case(process, out, lambda: os.killpg(process.pid, signal.SIGINT))
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "--resume runs the rest" in stderr and "Traceback" not in stderr, stderr
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    finished = {p.parent.name for p in out.glob("*/status-recistnet-mini.json")}
    summary = _summary(out)
    assert set(summary) == finished and 1 <= len(finished) < len(names), (finished, stderr)
    assert {row["status"] for row in summary.values()} == {"ok"}
    before = {name: (out / name / "status-recistnet-mini.json").stat().st_mtime_ns for name in finished}

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert {name: (out / name / "status-recistnet-mini.json").stat().st_mtime_ns for name in finished} == before
    assert sorted(_summary(out)) == names and {row["status"] for row in _summary(out).values()} == {"ok"}


def test_infer_refuses_an_unknown_model_before_anything_else(mixed_inputs):
    result = CliRunner().invoke(main, ["infer", str(mixed_inputs), "--model", "recistnet-mini", "--model", "nosuch"])
    assert result.exit_code != 0
    assert "no model named 'nosuch'" in result.output and "Known models: " in result.output
    assert "recistnet-mini" in result.output and "template-seg-abdomen" in result.output
    assert "case(s)" not in result.output


def test_infer_lets_progress_lines_through_without_verbose():
    import logging

    from ctzoo.cli.infer import _progress_logging

    logger = logging.getLogger("ctzoo.inference.pipeline")
    parent = logging.getLogger("ctzoo.inference")
    before = parent.level
    root = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)  # what 'ctzoo' without -v configures
    try:
        assert not logger.isEnabledFor(logging.INFO)
        with _progress_logging():
            assert logger.isEnabledFor(logging.INFO)
        assert parent.level == before and not logger.isEnabledFor(logging.INFO)
        parent.setLevel(logging.DEBUG)  # -vv stays -vv
        with _progress_logging():
            assert logger.isEnabledFor(logging.DEBUG)
    finally:
        parent.setLevel(before)
        logging.getLogger().setLevel(root)


# ------------------------------------------------------------------------------------ slices named as in a viewer


def test_detections_name_the_key_slice_by_instance_number_and_z(sample_volume):
    """slice_z_mm is the slice's ImagePositionPatient z, instance_number its InstanceNumber; the one-line detail and
    the label say the same; without DICOM only z and the index remain."""
    from ctzoo.inference.recist_volume import detections_document, slice_detections
    from ctzoo.inference.tasks import _where
    from ctzoo.io import reorient_lps

    def document(volume):
        axial = reorient_lps(volume)
        points = np.array([[[100, 100], [140, 100], [120, 90], [120, 110], [120, 100]]], dtype=float)
        found = slice_detections(axial, 7, np.array([0.9]), points, np.array([1.0, 1.0]))
        return detections_document(volume, axial, found, "m", "1")["lesions"][0]

    lesion = document(sample_volume)
    header = sample_volume.dicom.headers[7]
    assert lesion["slice"] == 7
    assert lesion["slice_z_mm"] == pytest.approx(float(header.ImagePositionPatient[2]), abs=0.005) == -790.5
    assert lesion["instance_number"] == int(header.InstanceNumber) == 279
    assert _where(lesion) == "InstanceNumber 279 (z -790.5 mm)"
    assert sample_volume.slice_label(7) == "InstanceNumber 279, z -790.5 mm (index 7)"
    plain = dataclasses.replace(sample_volume, dicom=None)
    lesion = document(plain)
    assert lesion["slice_z_mm"] == -790.5 and "instance_number" not in lesion
    assert _where(lesion) == "z -790.5 mm" and plain.slice_label(7) == "z -790.5 mm (index 7)"
