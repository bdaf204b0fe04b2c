"""Bundles changed as a retrain or a re-publish would change them: the files rewritten and their sha256 recorded
again in bundle.json (a file changed without that is refused as tampered, ctzoo.models.bundle)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def rerecord_digests(folder: Path, *names: str) -> None:
    """Record the sha256 of ``folder``'s files ``names`` in its bundle.json, as save_pretrained does."""
    record = json.loads((folder / "bundle.json").read_text())
    for name in names:
        record["sha256"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "bundle.json").write_text(json.dumps(record))


def halve_weights(folder: Path) -> None:
    """Rewrite ``folder``'s weights at half their values (other weights under the same version), re-recorded."""
    from safetensors.torch import save_file

    from ctzoo.models.bundle import read_weights

    save_file({k: v * 0.5 if v.is_floating_point() else v for k, v in read_weights(folder).items()},
              str(folder / "model.safetensors"))
    rerecord_digests(folder, "model.safetensors")
