"""Reading a checkpoint file that ctzoo wrote (``ctzoo train``'s last.pt/best.pt, ``ctzoo expand``'s expanded.pt):
every reader goes through :func:`load_checkpoint`, so a damaged or foreign file is one error line, not torch's
pickle or zip traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A file is not a checkpoint ctzoo can use; the message says what to give instead."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The state ``path`` holds (a dict with a ``model`` state dict); CheckpointError for a file that is not one
    (truncated by an interrupted copy, another program's pickle, not a PyTorch file at all)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # pickle, zip or torch errors: all mean "not a checkpoint"
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path} is not a ctzoo train checkpoint (no 'model' state dict)")
    return state
