"""A bundle folder's files are what its bundle.json says: damaged ones are refused in one line naming the file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.models import BundleError, load_bundle, model_entry


def copy_of(name: str, folder: Path) -> Path:
    """A writable copy of zoo model ``name``'s shipped bundle in ``folder``."""
    target = folder / name
    shutil.copytree(model_entry(name).weights_dir, target)
    for path in [target, *target.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def damaged_bundles(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """``{what: (bundle folder, what the error must say)}``: one damaged file each."""
    no_bank = copy_of("template-seg-abdomen", tmp_path / "no-bank")
    (no_bank / "templates.safetensors").unlink()
    new_bank = copy_of("template-seg-abdomen", tmp_path / "new-bank")
    index = json.loads((new_bank / "templates.json").read_text())
    (new_bank / "templates.json").write_text(json.dumps({**index, "format_version": 2}))
    record = json.loads((new_bank / "bundle.json").read_text())  # as a later ctzoo would have saved it
    record["sha256"]["templates.json"] = hashlib.sha256((new_bank / "templates.json").read_bytes()).hexdigest()
    (new_bank / "bundle.json").write_text(json.dumps(record))
    truncated = copy_of("recistnet-mini", tmp_path / "truncated")
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:100_000])
    return {"bank tensors missing": (no_bank, "templates.safetensors is missing"),
            "bank of another format": (new_bank, "format_version 2 is not 1"),
            "weights truncated": (truncated, "model.safetensors cannot be read")}


def test_a_damaged_bundle_is_one_line_naming_the_file(tmp_path: Path) -> None:
    for what, (folder, message) in damaged_bundles(tmp_path).items():
        with pytest.raises(BundleError, match=message):
            load_bundle(folder)
        result = CliRunner().invoke(main, ["infer", "--model", str(folder), "--out", str(tmp_path / "out")])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (what, result.output)
        assert result.output.startswith("Error: ") and message in result.output, (what, result.output)


def altered_weights(folder: Path) -> None:
    """The weights of ``folder`` changed as a bad copy or a swap would: a valid file of the same shapes."""
    import safetensors.torch

    path = folder / "model.safetensors"
    state = safetensors.torch.load_file(path)
    name = next(iter(state))
    state[name] = state[name] + 3.0
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})


def test_the_shipped_bundles_record_the_digests_of_their_files() -> None:
    for name in ("recistnet-mini", "template-seg-abdomen"):
        folder = model_entry(name).weights_dir
        recorded = json.loads((folder / "bundle.json").read_text())["sha256"]
        expected = {"model.safetensors"} | ({"templates.safetensors", "templates.json"}
                                            if name.startswith("template") else set())
        assert set(recorded) == expected
        for file, digest in recorded.items():
            assert hashlib.sha256((folder / file).read_bytes()).hexdigest() == digest, (name, file)
        assert load_bundle(name).file_digests() == recorded and load_bundle(name).digests_recorded


def test_weights_changed_after_saving_are_refused_wherever_they_load(tmp_path: Path, monkeypatch) -> None:
    from ctzoo.models import create_model

    folder = copy_of("recistnet-mini", tmp_path)
    altered_weights(folder)
    bundle = load_bundle(folder)  # the card is still readable (ctzoo zoo show)
    for load in (bundle.network, bundle.file_digests, lambda: create_model("recistnet-mini", pretrained=True)):
        monkeypatch.setattr(model_entry("recistnet-mini"), "weights_dir", folder)
        with pytest.raises(BundleError, match=r"model.safetensors has sha256 \w+, but .*bundle.json records \w+: "
                                              "the file was changed after the bundle was saved"):
            load()
    result = CliRunner().invoke(main, ["infer", "--model", str(folder), "--out", str(tmp_path / "out")])
    last = result.output.strip().split("\n")[-1]
    assert result.exit_code == 1 and last.startswith("Error: ") and "bundle.json records" in last, result.output


def test_a_changed_template_bank_is_refused(tmp_path: Path) -> None:
    folder = copy_of("template-seg-abdomen", tmp_path)
    index = json.loads((folder / "templates.json").read_text())
    (folder / "templates.json").write_text(json.dumps({**index, "sources": index["sources"][::-1]}))
    with pytest.raises(BundleError, match="templates.json has sha256 .*bundle.json records"):
        load_bundle(folder)


def test_results_name_the_weights_that_ran(sample_volume, tmp_path: Path) -> None:
    """detections.json and segmentation.json record the digests of the weights (and template bank) that ran, checked
    against bundle.json; a bundle saved before digests were recorded still runs, its digests computed, unchecked."""
    from ctzoo.inference.tasks import model_task, run_task

    task = model_task("template-seg-abdomen", "torch", "cpu")
    written, _ = task.write(sample_volume, run_task(task, sample_volume), tmp_path / "seg", False, task.runtime)
    document = json.loads((tmp_path / "seg" / "segmentation.json").read_text())
    shipped = json.loads((model_entry("template-seg-abdomen").weights_dir / "bundle.json").read_text())["sha256"]
    assert document["weights"] == {"sha256": shipped, "checked": True}
    # --resume reruns other weights: model_task records the digest of the weights and network it compares
    assert task.settings["weights"] == load_bundle("template-seg-abdomen").weights_digest()

    older = copy_of("recistnet-mini", tmp_path)
    record = json.loads((older / "bundle.json").read_text())
    (older / "bundle.json").write_text(json.dumps({k: v for k, v in record.items() if k != "sha256"}))
    document = run_task(model_task(older, "torch", "cpu"), sample_volume)
    assert document["model"] == "recistnet-mini"
    assert document["weights"] == {"sha256": record["sha256"], "checked": False}
