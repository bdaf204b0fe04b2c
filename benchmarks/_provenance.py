"""Where a benchmark's figures came from, recorded the same way by every benchmark under its JSON's ``provenance``:

* ``commit``: ``git rev-parse HEAD`` of this checkout when the run started, ``dirty``: whether tracked files
  differed from it then, ``changed``: which (a result JSON of an earlier run counts; code does not hide in it);
* ``started_utc`` and ``finished_utc``;
* ``load_average``: the 1/5/15-minute load when the run started and when it ended: a figure timed on a busy
  machine says so, whatever the doc around it says;
* ``configs``: each config the run read, path and text as they were at the start;
* ``machine``: platform, CPU model and count, torch threads, Python, torch, numpy, GPU, OpenMP settings, and what
  the benchmark adds (its own libraries' versions).

    from _provenance import Provenance   # with benchmarks/ on sys.path

    run = Provenance(args.config)         # first, before anything is timed
    ...
    result["provenance"] = run.record(**versions("onnxruntime"))   # last
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(**extra: Any) -> dict[str, Any]:
    """The machine and the libraries every benchmark runs on, with ``extra`` (a benchmark's own) added."""
    import numpy as np
    import torch

    return {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "omp": {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}, **extra}


def versions(*modules: str) -> dict[str, str | None]:
    """``{module: version}`` of the libraries a benchmark times besides torch and numpy (None: not installed), from
    the installed distributions' metadata: importing a module to ask could have effects (MPyC parses the command
    line on import)."""
    distributions = importlib.metadata.packages_distributions()
    found = {}
    for name in modules:
        installed = distributions.get(name, [])  # onnxruntime may come as onnxruntime-gpu
        found[name.lower()] = importlib.metadata.version(installed[0]) if installed else None
    return found


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """``commit``, ``dirty`` and the ``changed`` tracked paths of the checkout at ``root``; None and [] outside a
    git checkout (an unpacked release), so that a missing commit reads as unknown, never as clean."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                              timeout=60).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "changed": []}
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(changed), "changed": changed}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies in it (a JSON names the same config on every machine)."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


class Provenance:
    """Started when a benchmark starts (the commit, the start time and load, the configs' text); :meth:`record`
    when it ends. ``configs``: the config files the run reads (None entries are skipped)."""

    def __init__(self, *configs: Path | None) -> None:
        self.git = git_state()
        self.started_utc = _utc_now()
        self.load_start = load_average()
        self.configs = {_shown(path): path.read_text(encoding="utf-8") for path in configs if path is not None}

    def record(self, **machine_extra: Any) -> dict[str, Any]:
        """The JSON's ``provenance``; ``machine_extra``: what this benchmark adds to :func:`machine`."""
        return {**self.git, "started_utc": self.started_utc, "finished_utc": _utc_now(),
                "load_average": {"start": self.load_start, "end": load_average()}, "configs": self.configs,
                "machine": machine(**machine_extra)}
