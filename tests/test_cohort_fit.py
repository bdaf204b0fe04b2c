"""``ctzoo cohort fit`` on small hand-written lesion levels (no model run; a few seconds each): the split is the
same whatever the table's salt, holds each patient whole, a fit that cannot measure a test AUC is refused, and
``fit.json`` is strict JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.cohort.context import hashed, split_bucket
from ctzoo.cohort.fit import fit_cohort, patient_splits
from ctzoo.cohort.lesions import LESION_COLUMNS
from ctzoo.cohort.table import table_csv

TYPES = {1: "bone", 5: "lung"}


def lesion_rows(patients: int, salt: str, types=lambda p, j: 1 + 4 * ((p + j) % 2),
                csv_split=lambda p, j: "val") -> list[dict]:
    """Two lesions of each of ``patients`` patients (ids "0", "1", ...), hashed with ``salt`` as the build hashes
    them; ``types(patient, j)`` the type code of the patient's j-th lesion, ``csv_split(patient, j)`` its split in
    the CSV (DeepLesion's own: val, so the fit splits by patient)."""
    rows = []
    for p in range(patients):
        for j in range(2):
            rows.append({column: "" for column in LESION_COLUMNS} | {
                "lesion": hashed(f"{p:06d}_01_01_010.png#{j}", salt), "series": hashed(f"{p:06d}_01_01", salt),
                "patient": hashed(str(p), salt), "key_slice": hashed(f"{p:06d}_01_01_010.png", salt),
                "split": csv_split(p, j), "split_bucket": split_bucket(str(p)), "type_code": types(p, j),
                "lesion_type": TYPES[types(p, j)], "age_years": 40 + p, "sex": "MF"[p % 2], "long_mm": 10 + j,
                "spacing_x_mm": 0.8, "spacing_z_mm": 2.0, "found": True, "features": True})
    return rows


def write_lesion_level(folder, rows: list[dict]) -> None:
    """``lesions.csv`` and features that carry the type (so every fit trains on something)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lesions.csv").write_text(table_csv(rows, columns=LESION_COLUMNS), encoding="utf-8")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(len(rows), 4)) + np.array([[row["type_code"] == 1] for row in rows]) * 2.0
    np.save(folder / "lesion_features.npy", features.astype(np.float32))


def splits_by_patient(folder, rows: list[dict], patients: int, salt: str) -> dict[int, set[str]]:
    """Each patient's splits in ``fit/predictions.csv``, by the patient's id (the hashes differ between salts)."""
    import csv

    with open(folder / "fit" / "predictions.csv", newline="") as handle:
        split_of = {p["lesion"]: p["split"] for p in csv.DictReader(handle)}
    found: dict[int, set[str]] = {}
    for p in range(patients):
        for row in rows:
            if row["patient"] == hashed(str(p), salt):
                found.setdefault(p, set()).add(split_of[row["lesion"]])
    return found


def test_the_split_is_the_same_whatever_the_salt_and_changes_with_the_split_seed(tmp_path):
    """Two builds of the same patients under different salts (a fresh folder's random salt): the same split, and
    fit.json records the split seed. The split is not the salted hash's order."""
    splits, documents = [], []
    for salt in ("first-random-salt", "another-random-salt"):
        rows = lesion_rows(15, salt)
        write_lesion_level(tmp_path / salt, rows)
        documents.append(fit_cohort(tmp_path / salt, seeds=(0,), epochs=3))
        splits.append(splits_by_patient(tmp_path / salt, rows, 15, salt))
    assert splits[0] == splits[1] and all(len(parts) == 1 for parts in splits[0].values())
    assert documents[0]["counts"] == documents[1]["counts"]
    assert documents[0]["split_seed"] == 0 and documents[0]["split_rule"] == "by patient hash, 60/20/20"
    reseeded = fit_cohort(tmp_path / "first-random-salt", seeds=(0,), epochs=3, split_seed=1)
    assert reseeded["split_seed"] == 1
    assert splits_by_patient(tmp_path / "first-random-salt", lesion_rows(15, "first-random-salt"), 15,
                             "first-random-salt") != splits[0]


def test_patient_splits_hold_buckets_together_and_follow_the_seed():
    """(test_cohort_groups checks that any three keys cover all three splits.)"""
    buckets = [split_bucket(str(p)) for p in range(60)]
    splits = patient_splits(buckets * 2)
    assert sorted(splits) == sorted(set(buckets))
    assert patient_splits(reversed(buckets)) == splits  # the order of the lesions does not matter
    shares = [sum(part == s for part in splits.values()) / len(splits) for s in ("train", "val", "test")]
    assert shares == pytest.approx([0.6, 0.2, 0.2], abs=0.05)
    assert patient_splits(buckets, seed=1) != splits


def test_a_csv_split_with_a_patient_in_two_splits_is_not_used(tmp_path):
    """DL_info.csv's own split put one patient's lesions in train and test: the fit splits by patient instead and
    says why; every patient is in one split."""
    salt = "s"

    def csv_split(p, j):
        return "test" if p == 0 and j == 0 else ("train", "train", "train", "val", "test")[p % 5]

    rows = lesion_rows(10, salt, csv_split=csv_split)
    write_lesion_level(tmp_path / "c", rows)
    document = fit_cohort(tmp_path / "c", seeds=(0,), epochs=3)
    assert document["split_rule"] == ("by patient hash, 60/20/20 (the CSV's split puts 1 of 10 patients in more "
                                      "than one split)")
    assert all(len(parts) == 1 for parts in splits_by_patient(tmp_path / "c", rows, 10, salt).values())
    rows = lesion_rows(10, salt, csv_split=lambda p, j: ("train", "train", "train", "val", "test")[p % 5])
    write_lesion_level(tmp_path / "whole", rows)  # each patient in one split: the CSV's is used
    assert fit_cohort(tmp_path / "whole", seeds=(0,), epochs=3)["split_rule"] == "csv"


def test_a_fit_without_two_types_or_a_test_auc_is_refused(tmp_path):
    runner = CliRunner()
    write_lesion_level(tmp_path / "one", lesion_rows(10, "s", types=lambda p, j: 5))
    result = runner.invoke(main, ["cohort", "fit", str(tmp_path / "one"), "--seeds", "0", "--epochs", "3"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "the typed lesions hold only one type (lung): at least two are needed" in result.output
    assert not (tmp_path / "one" / "fit").exists()
    # train and val hold both types; the test split's patients all have lung lesions only
    splits = ("train", "train", "val", "test")
    rows = lesion_rows(8, "s", types=lambda p, j: 5 if p % 4 == 3 else 1 + 4 * j, csv_split=lambda p, j: splits[p % 4])
    write_lesion_level(tmp_path / "test", rows)
    result = runner.invoke(main, ["cohort", "fit", str(tmp_path / "test"), "--seeds", "0", "--epochs", "3"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "the test split's 4 typed lesions are all of one type (lung): no test AUC can be measured" in result.output
    assert not (tmp_path / "test" / "fit").exists()


def test_fit_json_is_strict_json_with_null_for_a_missing_validation_auc(tmp_path):
    """The validation lesions are all of one type: no validation AUC (null, not a bare NaN), epochs chosen by loss,
    and the output says why without calling it 'too few'."""
    splits = ("train", "train", "val", "test")
    rows = lesion_rows(8, "s", types=lambda p, j: 1 if p % 4 == 2 else 1 + 4 * j, csv_split=lambda p, j: splits[p % 4])
    write_lesion_level(tmp_path / "c", rows)
    result = CliRunner().invoke(main, ["cohort", "fit", str(tmp_path / "c"), "--seeds", "0,1", "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert "the validation lesions are all of one type (bone 4): no validation AUC, epochs chosen by validation " \
           "loss" in result.output and "too few" not in result.output

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    document = json.loads((tmp_path / "c" / "fit" / "fit.json").read_text(), parse_constant=refuse)
    assert document["results"]["both"]["val_auc"] == [None, None]
    assert document["results"]["both"]["selected_on"] == ["val_loss"]
    assert all(0 <= value <= 1 for value in document["results"]["both"]["test_auc"])


def test_a_lesions_csv_it_cannot_read_is_named_by_file_row_and_column(tmp_path):
    runner = CliRunner()
    rows = lesion_rows(6, "s")
    write_lesion_level(tmp_path / "c", [row | {"age_years": "abc"} if k == 1 else row for k, row in enumerate(rows)])
    (tmp_path / "c" / "cohort.json").write_text(json.dumps({"schema": 1, "rows": [], "groups": {}, "failed": []}))
    (tmp_path / "c" / "key_slices.json").write_text(json.dumps({"key_slices": []}))
    for command in ("fit", "report"):
        result = runner.invoke(main, ["cohort", command, str(tmp_path / "c")])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert f"{tmp_path / 'c' / 'lesions.csv'}: row 3, column age_years: expected a finite number or empty, " \
               "got 'abc'" in result.output
    columns = [c for c in LESION_COLUMNS if c != "window_low_hu"]
    (tmp_path / "c" / "lesions.csv").write_text(table_csv([{c: row[c] for c in columns} for row in rows],
                                                          columns=columns))
    for command in ("fit", "report"):
        result = runner.invoke(main, ["cohort", command, str(tmp_path / "c")])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "lesions.csv lacks column window_low_hu (rebuild with ctzoo cohort build)" in result.output
