"""What a resumed run must share with the run it continues, and what it may change.

``--resume`` continues ``OUT/last.pt``. A config that differs from the one the checkpoint was trained with would
train another run on top of it and log both as one (another learning rate, batch, seed or dataset), or fail deep
inside ``load_state_dict`` (another architecture). So a resumed run compares what the checkpoint records about
itself with what the new run would record, and refuses any difference outside :data:`CHANGEABLE`.

Compared: the task's whole config as the checkpoint records it (``train_config`` for RECIST-Net, ``task_config``
for the template segmenter; ``config``, the optimiser's, for a task without one) and the records that say what
the run is (model kind, class names, the expansion a model grew from, the digest of the data's annotation file);
not other ``extra_state`` (a search's space, which narrows between iterations). A field one side lacks (a
checkpoint of an older version) is not compared.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Fields a resumed run may change, and why each is safe. Everything else must stay as the run started.
CHANGEABLE = {
    "optim.epochs": "train longer (or stop sooner); the cosine decay then follows the new length from here on",
    "optim.num_workers": "loader processes: the same batches, bit for bit (tested)",
    "optim.eval_every": "how often validation runs; the training itself is unchanged",
    "cache": "whether decoded slices stay in memory: the same slices",
    "data.slice_cache": "read slices from the decoded-slice store instead of the PNGs: identical bytes (tested)",
    "eval_batch_size": "slices per validation forward pass",
    "placement": "which devices the layers run on, as --device says where the model runs",
}

#: Checkpoint keys holding a task's whole config; ``config`` (the optimiser's) repeats its ``optim`` part, or a
#: schedule derived from it (LEMON), and is compared only for a task without one.
TASK_CONFIGS = ("train_config", "task_config")

#: The other records that say what a run is (a task's extra_state may hold more, which may change: a search
#: narrows its space between iterations, ctzoo.nas.search).
RUN_RECORDS = ("model_kind", "class_names", "expanded_from")

#: The record of a dataset's identity: ``{file name: digest}`` of its annotation file. With it, ``data.root`` may
#: change (the same data moved or staged elsewhere) as long as the digests agree.
DATA_FILES = "data_files"


def resume_record(optim: Mapping[str, Any], extra_state: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a run of ``fit`` records about itself in its checkpoints (``config`` and ``extra_state``), as a new
    run to compare with a checkpoint's."""
    return {"config": dict(optim), **(extra_state or {})}


def _plain(value: Any) -> Any:
    """JSON's view of ``value``: tuples as lists, paths as strings (a checkpoint holds either)."""
    return json.loads(json.dumps(value, default=str))


def _differences(old: Any, new: Any, path: str) -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in new:
            if key in old:
                found += _differences(old[key], new[key], f"{path}.{key}" if path else str(key))
        return found
    return [] if old == new else [(path, old, new)]


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"field: old → new"`` for every field of ``current`` (a :func:`resume_record`) that differs from the
    checkpoint ``saved``, :data:`CHANGEABLE` aside, ``data.root`` too when the data's digests agree."""
    compared = {"config", *TASK_CONFIGS, *RUN_RECORDS, DATA_FILES}
    keys = [key for key in current if key in saved and key in compared]
    if "config" in keys and any(key in TASK_CONFIGS for key in keys):
        keys.remove("config")
    found = []
    for key in keys:
        prefix = "" if key in TASK_CONFIGS else ("optim" if key == "config" else key)
        found += _differences(_plain(saved[key]), _plain(current[key]), prefix)
    same_data = DATA_FILES in keys and _plain(saved[DATA_FILES]) == _plain(current[DATA_FILES])
    return [f"{path}: {_short(old)} → {_short(new)}" for path, old, new in found
            if path not in CHANGEABLE and not (path == "data.root" and same_data)]


def refusal(last: Path, changes: list[str]) -> str:
    """The one-line error for a resume whose config differs from its checkpoint's in ``changes``."""
    return (f"--resume: {last} was trained with other settings ({'; '.join(changes)}); a resumed run may change "
            f"only {', '.join(CHANGEABLE)} (and data.root, for the same data): restore the run's config "
            "(OUT/config.json) or train into another --out")


def check_resume(last: Path, current: Mapping[str, Any]) -> None:
    """Refuse (``ValueError``, one line) to resume ``last`` with a run that records ``current``
    (:func:`resume_record`); ``FileNotFoundError`` when there is nothing to resume. Reads only what the
    checkpoint records about itself (its tensors are mapped, not read)."""
    import torch

    if not last.exists():
        raise FileNotFoundError(f"{last}: nothing to resume from")
    try:
        saved = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, OSError, ValueError) as exc:
        raise ValueError(f"--resume: {last} cannot be read as a checkpoint: {str(exc).splitlines()[0]}") from None
    if not isinstance(saved, Mapping):
        raise ValueError(f"--resume: {last} is not a ctzoo train checkpoint")
    changes = config_changes(saved, current)
    if changes:
        raise ValueError(refusal(last, changes))
