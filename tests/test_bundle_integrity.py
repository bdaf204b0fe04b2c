"""A bundle folder's files are what its bundle.json says: damaged ones are refused in one line naming the file."""

from __future__ import annotations

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
