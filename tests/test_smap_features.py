"""``ctzoo smap features``: a site's lesion embeddings from the DeepLesion miniature (split by patient, as sites
would hold it) and from the real sample series; the file identifies nobody; bad site files are clear errors."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.cohort.lesions import deeplesion_lesions
from ctzoo.datasets.deeplesion.dataset import key_slice_items
from ctzoo.datasets.deeplesion.info_csv import read_dl_info
from ctzoo.models.bundle import load_bundle
from ctzoo.smap.features import parse_patients
from ctzoo.smap.site_file import check_compatible, read_site, write_site


def test_patient_ranges():
    assert parse_patients("1-3, 7,9-9") == {1, 2, 3, 7, 9}
    for bad in ("x", "5-2", "1-a"):
        with pytest.raises(ValueError, match="patients"):
            parse_patients(bad)


def test_two_sites_from_the_miniature_split_by_patient(small_deeplesion_mini, tmp_path):
    csv_path = small_deeplesion_mini / "DL_info.csv"
    rows = read_dl_info(csv_path)
    patients = sorted({row.patient_index for row in rows})
    first, second = patients[: len(patients) // 2], patients[len(patients) // 2:]
    runner = CliRunner()
    for name, chosen in (("a", first), ("b", second)):
        result = runner.invoke(main, ["smap", "features", "--deeplesion", str(csv_path), "--patients",
                                      ",".join(map(str, chosen)), "--out", str(tmp_path / f"{name}.npz")])
        assert result.exit_code == 0, result.output
    a, b = read_site(tmp_path / "a.npz"), read_site(tmp_path / "b.npz")
    check_compatible([a, b])
    assert a["meta"]["kind"] == "annotated" and a["meta"]["model"] == "recistnet-mini"
    # every lesion of the site's patients, once, with the features and type the cohort computes for it
    bundle = load_bundle("recistnet-mini")
    level = deeplesion_lesions(csv_path, bundle, salt="s")
    ordered = [row for item in key_slice_items(rows, "all") for row in item["lesions"]]  # the cohort's order
    assert len(ordered) == len(level["lesions"])
    for site, chosen in ((a, first), (b, second)):
        expected = sorted((tuple(np.round(features, 4)), row.coarse_lesion_type if row.coarse_lesion_type >= 1 else -1)
                          for row, features, lesion in zip(ordered, level["features"], level["lesions"])
                          if row.patient_index in chosen and lesion["features"])
        got = sorted((tuple(np.round(f, 4)), int(t)) for f, t in zip(site["features"], site["labels"]))
        assert got == expected
        assert np.isnan(site["scores"]).all()
    assert len(a["labels"]) + len(b["labels"]) == len(rows)
    absent = runner.invoke(main, ["smap", "features", "--deeplesion", str(csv_path), "--patients", "99999",
                                  "--out", str(tmp_path / "none.npz")])
    assert absent.exit_code == 1 and "no key slices in split 'all' of patients [99999]" in absent.output
    assert not (tmp_path / "none.npz").exists()
    # nothing identifying: no file name, folder or patient index in the file's bytes
    with zipfile.ZipFile(tmp_path / "a.npz") as archive:
        raw = b"".join(archive.read(name) for name in archive.namelist())
    for row in rows:
        assert row.file_name.encode() not in raw and row.series_folder.encode() not in raw


def test_a_site_of_findings_on_real_ct(sample_dir, tmp_path):
    result = CliRunner().invoke(main, ["smap", "features", str(sample_dir), "--out", str(tmp_path / "s.npz")])
    assert result.exit_code == 0, result.output
    site = read_site(tmp_path / "s.npz")
    infer = CliRunner().invoke(main, ["infer", str(sample_dir), "--out", str(tmp_path / "infer")])
    assert infer.exit_code == 0, infer.output
    (document,) = [json.loads(p.read_text()) for p in (tmp_path / "infer").glob("*/detections.json")]
    assert sorted(site["scores"].round(4)) == sorted(np.float32([lesion["score"] for lesion in document["lesions"]])
                                                     .round(4))
    assert site["meta"]["kind"] == "findings" and (site["labels"] == -1).all() and site["features"].shape[1] == 64


def broken_site(path, **change):
    base = {"features": np.ones((3, 4), np.float32), "labels": np.array([1, -1, 2], np.int16),
            "scores": np.full(3, np.nan, np.float32)}
    site = {**base, "meta": {"kind": "annotated", "model": "m", "model_version": "1", "weights": "w"}}
    write_site(site, path)
    if change:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        arrays.update(change)
        with open(path, "wb") as handle:
            np.savez(handle, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.mark.parametrize("change, message", [
    ({"features": np.full((3, 4), np.nan, np.float32)}, "NaN"),
    ({"features": np.ones((3, 4), np.float64)}, "float32"),
    ({"labels": np.ones(2, np.int16)}, "labels must be"),
    ({"extra": np.ones(1)}, "holds"),
    ({"scores": None}, "holds"),
    ({"meta": np.array("{not json")}, "not JSON"),
    ({"meta": np.array(json.dumps({"schema": 9}))}, "schema"),
    ({"features": np.ones((5, 4), np.float32), "labels": np.ones(5, np.int16), "scores": np.ones(5, np.float32)},
     "meta says"),
])
def test_bad_site_files_are_clear_errors(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        read_site(broken_site(tmp_path / "s.npz", **change))


def test_not_a_site_file_and_incompatible_sites(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match="is not a site file"):
        read_site(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="no such site file"):
        read_site(tmp_path / "missing.npz")
    good = read_site(broken_site(tmp_path / "g.npz"))
    wide = dict(good, features=np.ones((3, 5), np.float32), path="wide.npz")
    with pytest.raises(ValueError, match="same model"):
        check_compatible([good, wide])
    other = dict(good, meta={**good["meta"], "weights": "v"}, path="other.npz")
    with pytest.raises(ValueError, match="other weights"):
        check_compatible([good, other])
