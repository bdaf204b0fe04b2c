"""``ctzoo cohort build``: the cohort table's context modality from real CT headers, a volume file and DeepLesion's
CSV, with identifiers only as salted hashes and missing fields as explicit 'unknown' groups."""

from __future__ import annotations

import dataclasses
import json
import shutil
import stat

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.cohort.context import UNKNOWN, dicom_age
from ctzoo.cohort.table import build_cohort
from ctzoo.datasets.deeplesion.info_csv import read_dl_info
from ctzoo.io import Volume, write_volume
from ctzoo.io.privacy import patient_hash

PATIENT = {"PatientName": "Roe^Richard", "PatientID": "MRN-77120", "PatientAge": "063Y", "PatientSex": "M"}


@pytest.fixture
def named_series(sent_files, tmp_path):
    """The sample series as a hospital sends it: with a patient name, id, age and sex."""
    folder = tmp_path / "named"
    folder.mkdir()
    for file in sent_files:
        dataset = pydicom.dcmread(file)
        for keyword, value in PATIENT.items():
            setattr(dataset, keyword, value)
        dataset.save_as(folder / file.name, enforce_file_format=True)
    return folder


def test_dicom_ages():
    assert [dicom_age(text) for text in ("045Y", "006M", "052W", "014D", "", "45", "045X", None)] == \
        [45.0, 0.5, 1.0, 0.04, None, None, None, None]


def test_a_table_from_dicom_a_volume_file_and_a_broken_file(named_series, sample_volume, tmp_path, monkeypatch):
    monkeypatch.delenv("CTZOO_COHORT_SALT", raising=False)
    nifti = write_volume(dataclasses.replace(sample_volume, dicom=None), tmp_path / "inputs" / "ct.nii.gz")
    (tmp_path / "inputs" / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "cohort"
    result = CliRunner().invoke(main, ["cohort", "build", str(named_series), str(tmp_path / "inputs"), "--out",
                                       str(out)])
    assert result.exit_code == 0, result.output
    assert "2 series, 1 failed" in result.output
    document = json.loads((out / "cohort.json").read_text())
    salt = (out / "salt").read_text().strip()
    assert stat.S_IMODE((out / "salt").stat().st_mode) == 0o600
    dicom_row, volume_row = sorted(document["rows"], key=lambda row: row["source"])
    header = pydicom.dcmread(next(named_series.iterdir()), stop_before_pixels=True)
    assert dicom_row["patient"] == patient_hash(PATIENT["PatientID"], salt)[:16]
    assert dicom_row["series"] == patient_hash(header.SeriesInstanceUID, salt)[:16]
    assert (dicom_row["age_years"], dicom_row["age_band"], dicom_row["sex"]) == (63.0, "60-79", "M")
    assert dicom_row["manufacturer"] == header.Manufacturer and dicom_row["model"] == header.ManufacturerModelName
    assert dicom_row["kvp"] == float(header.KVP) and dicom_row["tube_current_ma"] == float(header.XRayTubeCurrent)
    assert dicom_row["kernel"] == "/".join(header.ConvolutionKernel)
    assert dicom_row["slice_thickness_mm"] == float(header.SliceThickness) and dicom_row["slices"] == 20
    assert dicom_row["contrast"] == "yes" and dicom_row["contrast_agent"] == header.ContrastBolusAgent
    assert dicom_row["spacing_z_mm"] == pytest.approx(sample_volume.spacing[2], abs=1e-5)
    # a volume file has spacing and slices, and says 'unknown' for everything its header cannot hold
    assert volume_row["source"] == "volume" and volume_row["slices"] == sample_volume.array.shape[0]
    assert volume_row["spacing_x_mm"] == pytest.approx(sample_volume.spacing[0], abs=1e-5)
    for column in ("patient", "sex", "manufacturer", "kernel", "contrast", "age_band"):
        assert volume_row[column] == UNKNOWN, column
    assert volume_row["age_years"] is None and volume_row["kvp"] is None
    # groups count every row, unknown included; the broken file is listed, not dropped
    assert document["groups"]["sex"] == {"M": 1, UNKNOWN: 1}
    assert all(sum(counts.values()) == 2 for counts in document["groups"].values())
    assert [entry["input"] for entry in document["failed"]] == [patient_hash("broken", salt)[:16]]
    # identifiers never leave the headers
    written = (out / "cohort.csv").read_text() + (out / "cohort.json").read_text() + result.output
    for value in ("Roe", "Richard", PATIENT["PatientID"]):
        assert value not in written
    assert nifti.exists()
    # the image modality: the zoo models' outputs, as ctzoo infer writes them for the same series
    inferred = CliRunner().invoke(main, ["infer", str(named_series), "--model", "recistnet-mini", "--model",
                                         "template-seg-abdomen", "--out", str(tmp_path / "infer"), "--workers", "0",
                                         "--no-overlay", "--device", "cpu"])
    assert inferred.exit_code == 0, inferred.output
    [detections] = (tmp_path / "infer").glob("*/detections.json")
    [segmentation] = (tmp_path / "infer").glob("*/segmentation.json")
    lesions = json.loads(detections.read_text())["lesions"]
    assert dicom_row["findings"] == len(lesions) > 0
    assert dicom_row["finding_long_mm"] == max(lesion["long_axis_mm"] for lesion in lesions)
    organs = json.loads(segmentation.read_text())["classes"]
    assert {f"{name}_ml": dicom_row[f"{name}_ml"] for name in organs} == \
        {f"{name}_ml": organ["volume_ml"] for name, organ in organs.items()}
    assert dicom_row["liver_ml"] > 0 and document["models"] == ["recistnet-mini", "template-seg-abdomen"]
    assert document["modalities"]["image"] == ["findings", "finding_long_mm", "finding_score",
                                               *(f"{name}_ml" for name in organs)]


def test_deeplesion_rows_and_a_shared_salt(small_deeplesion_mini, tmp_path, monkeypatch):
    monkeypatch.setenv("CTZOO_COHORT_SALT", "site-salt-0123456789")
    csv_path = small_deeplesion_mini / "DL_info.csv"
    result = CliRunner().invoke(main, ["cohort", "build", "--deeplesion", str(csv_path), "--out",
                                       str(tmp_path / "a"), "--context-only"])
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "a" / "cohort.json").read_text())
    lesions = read_dl_info(csv_path)
    assert document["salt"] == "env" and not (tmp_path / "a" / "salt").exists()
    assert document["models"] == [] and document["modalities"]["image"] == []
    assert len(document["rows"]) == len({row.series_folder for row in lesions})
    assert sum(row["lesions"] for row in document["rows"]) == len(lesions)
    by_series = {row["series"]: row for row in document["rows"]}
    first = {}
    for lesion in lesions:
        first.setdefault(lesion.series_folder, lesion)
    for folder, lesion in first.items():  # the series' window: its first row's
        row = by_series[patient_hash(folder, "site-salt-0123456789")[:16]]
        assert (row["window_low_hu"], row["window_high_hu"]) == tuple(lesion.dicom_windows)
    for lesion in lesions:
        row = by_series[patient_hash(lesion.series_folder, "site-salt-0123456789")[:16]]
        assert row["source"] == "deeplesion" and row["age_years"] == lesion.patient_age
        assert row["sex"] == lesion.patient_gender and lesion.lesion_type in row["lesion_types"].split("/")
    again = CliRunner().invoke(main, ["cohort", "build", "--deeplesion", str(csv_path), "--out", str(tmp_path / "b"),
                                      "--context-only"])
    assert again.exit_code == 0
    assert json.loads((tmp_path / "b" / "cohort.json").read_text())["rows"] == document["rows"]  # tables join
    # the miniature's lesions are synthetic, and the table says so (the report shows it on every view)
    assert document["synthetic"] == {"generator": "ctzoo data make-deeplesion-mini", "seed": 3, "cases": 4}
    (tmp_path / "own").mkdir()
    shutil.copyfile(csv_path, tmp_path / "own" / "DL_info.csv")  # the same rows, without the miniature's files
    own = CliRunner().invoke(main, ["cohort", "build", "--deeplesion", str(tmp_path / "own" / "DL_info.csv"),
                                    "--out", str(tmp_path / "c"), "--context-only"])
    assert own.exit_code == 0 and json.loads((tmp_path / "c" / "cohort.json").read_text())["synthetic"] is None


def test_a_volume_of_nan_is_listed_as_failed_not_run(tmp_path, monkeypatch):
    """As ctzoo infer refuses it: no row with made-up findings or organ volumes, its name hashed in failed."""
    monkeypatch.setenv("CTZOO_COHORT_SALT", "site-salt-0123456789")
    named = tmp_path / "in" / "DOE_JANE.nii.gz"
    write_volume(Volume(np.full((4, 4, 4), np.nan, dtype=np.float32), (1.0, 1.0, 1.0)), named)
    result = CliRunner().invoke(main, ["cohort", "build", str(named), "--out", str(tmp_path / "c"), "--context-only"])
    assert result.exit_code == 0 and "0 series, 1 failed" in result.output, result.output
    document = json.loads((tmp_path / "c" / "cohort.json").read_text())
    assert document["rows"] == [] and document["failed"] == [{
        "input": patient_hash("DOE_JANE", "site-salt-0123456789")[:16], "error": "ValueError",
        "reason": "ValueError: <input>: 64 voxels are NaN or infinite; refusing to guess their HU"}]


def test_a_failed_build_leaves_no_new_folder(small_deeplesion_mini, tmp_path, monkeypatch):
    """Neither a CSV it cannot read (read before the salt is made) nor a failure after the salt leaves a new
    cohort folder holding only its salt; a folder that was there stays."""
    monkeypatch.delenv("CTZOO_COHORT_SALT", raising=False)
    (tmp_path / "bad").mkdir()
    lines = (small_deeplesion_mini / "DL_info.csv").read_text().splitlines()
    (tmp_path / "bad" / "DL_info.csv").write_text(f"{lines[0]}\n{lines[1][:-1]}7\n")  # Train_Val_Test 7
    result = CliRunner().invoke(main, ["cohort", "build", "--deeplesion", str(tmp_path / "bad" / "DL_info.csv"),
                                       "--out", str(tmp_path / "c"), "--context-only"])
    assert result.exit_code == 1 and "column Train_Val_Test" in result.output, result.output
    assert not (tmp_path / "c").exists()
    (tmp_path / "no-images").mkdir()  # the CSV without its Images_png: the detector fails after the salt is made
    shutil.copyfile(small_deeplesion_mini / "DL_info.csv", tmp_path / "no-images" / "DL_info.csv")
    for out in (tmp_path / "c", tmp_path / "there"):
        if out.name == "there":
            out.mkdir()
        with pytest.raises(Exception, match="Images_png|LoadDeepLesion"):
            build_cohort([], out, tmp_path / "no-images" / "DL_info.csv", models=["recistnet-mini"])
        assert out.exists() == (out.name == "there")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad", "no-images", "there"]


def test_nothing_to_build_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["cohort", "build", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "give CT inputs" in result.output


def test_a_build_removes_what_an_earlier_build_left(small_deeplesion_mini, tmp_path, monkeypatch):
    """Built again into a fitted folder: the old fit/ (of the old lesions) and the lesion level and findings this
    build does not write go, at once, and the output says so; the salt stays."""
    monkeypatch.setenv("CTZOO_COHORT_SALT", "site-salt-0123456789")
    out = tmp_path / "cohort"
    (out / "fit").mkdir(parents=True)
    for name in ("fit/fit.json", "fit/predictions.csv", "lesions.csv", "lesion_features.npy", "key_slices.json",
                 "findings.json"):
        (out / name).write_text("from an earlier build")
    result = CliRunner().invoke(main, ["cohort", "build", "--deeplesion", str(small_deeplesion_mini / "DL_info.csv"),
                                       "--out", str(out), "--context-only"])
    assert result.exit_code == 0, result.output
    assert "removed an earlier build's fit, lesions.csv, lesion_features.npy, key_slices.json, findings.json" \
        in result.output and "run ctzoo cohort fit again" in result.output
    assert sorted(path.name for path in out.iterdir()) == ["cohort.csv", "cohort.json", "thumbnails"]
