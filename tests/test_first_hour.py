"""What a newcomer meets in the first hour: the sample as a file, where state goes, what the cards and error
messages say. Each test is one piece of friction that was reported and fixed (issue 19)."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.datasets.samples import sample_ct_dicom

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, expect: int = 0) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == expect, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.output


def test_data_sample_writes_every_format_a_user_needs(tmp_path, sample_volume):
    from ctzoo.io import read_volume

    assert "int16" in run("data", "sample", str(tmp_path / "ct.nii.gz"))
    volume = read_volume(tmp_path / "ct.nii.gz")
    assert volume.array.shape == sample_volume.array.shape and (volume.array == sample_volume.array).all()
    assert volume.spacing == pytest.approx(sample_volume.spacing)
    run("data", "sample", str(tmp_path / "ct.zip"))
    with zipfile.ZipFile(tmp_path / "ct.zip") as archive:
        assert len(archive.namelist()) == 20
    run("data", "sample", str(tmp_path / "series"))
    names = {p.name for p in (tmp_path / "series").iterdir()}
    assert {"LICENSE", "NOTICE.md"} <= names and len(names) == 22
    assert oct((tmp_path / "series").stat().st_mode)[-3:] != "700"  # not the private mode of a temporary folder
    # an existing output is refused, nothing half-written is left behind, --force replaces
    assert "exists" in run("data", "sample", str(tmp_path / "ct.zip"), expect=1)
    run("data", "sample", str(tmp_path / "series"), "--force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "ct.zip", "series"]


def test_info_does_not_call_an_empty_folder_dicom(tmp_path):
    (tmp_path / "empty").mkdir()
    output = run("info", str(tmp_path / "empty"), expect=1)
    assert output.startswith(f"{tmp_path / 'empty'}: folder\n") and "no DICOM files" in output


def test_a_bad_entry_of_a_list_file_names_the_list_and_the_line(tmp_path):
    from ctzoo.inference.inputs import discover_cases

    listing = tmp_path / "cases.txt"
    listing.write_text(f"# cases\n{sample_ct_dicom()}\n\nmissing/series\n")
    with pytest.raises(FileNotFoundError, match=r"cases.txt, line 4: .*missing/series: no such file"):
        discover_cases([listing])
    output = run("infer", str(listing), "--out", str(tmp_path / "out"), expect=1)
    assert "cases.txt, line 4" in output and not (tmp_path / "out").exists()


def test_pacs_state_goes_under_the_users_tree_unless_the_config_says(tmp_path, monkeypatch):
    from ctzoo.pacs.config import load_pacs_config

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state-home"))
    shipped = load_pacs_config(ROOT / "configs" / "pacs.yaml")
    assert shipped.state_dir == tmp_path / "state-home" / "ctzoo" / "pacs"
    config = yaml.safe_load((ROOT / "configs" / "pacs.yaml").read_text())
    config["state_dir"] = "pacs-state"
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(config))
    assert load_pacs_config(tmp_path / "site.yaml").state_dir == tmp_path / "pacs-state"  # relative to the file
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_pacs_config(ROOT / "configs" / "pacs.yaml").state_dir == (
        tmp_path / "home" / ".local" / "state" / "ctzoo" / "pacs")
    assert not (tmp_path / "home").exists() and not (tmp_path / "state-home").exists()  # reading creates nothing


def test_cards_say_how_many_epochs_ran_and_which_one_was_kept():
    from ctzoo.models import load_card

    detector = load_card("recistnet-mini").training
    assert (detector.epochs, detector.epochs_planned, detector.best_epoch) == (95, 120, 90)
    assert detector.epochs_text() == "95 of 120 planned; weights from epoch 90 (best on validation)"
    segmenter = load_card("template-seg-abdomen").training
    config = yaml.safe_load((ROOT / segmenter.config_file).read_text())
    assert segmenter.epochs == config["optim"]["epochs"] == 30  # what the README and the config say
    assert "weights from epoch 16" in run("zoo", "show", "template-seg-abdomen")
    card = json.loads((ROOT / "ctzoo/models/weights/recistnet-mini/card.json").read_text())
    assert card["training"]["best_epoch"] == 90


def test_the_sample_warns_once_about_its_missing_uids():
    output = run("info")
    warnings = [line for line in output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "StudyInstanceUID, SeriesInstanceUID" in warnings[0], warnings
    assert os.fspath(sample_ct_dicom()) in warnings[0]
