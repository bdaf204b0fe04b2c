"""Each bridge process's private work folder under ``state_dir/work``, and the removal of those whose process died.

While a job runs, its series (links into the listener's spool, or a download from Orthanc) and its results sit in
the work folder: patient data. A process killed with SIGKILL (or out of memory, or a power loss) never cleans up,
so each process takes ``work/worker-XXXXXXXX/`` and holds an flock on ``work/worker-XXXXXXXX.lock`` while it lives
(the kernel drops the lock however the process ends). At start, a process removes every entry of ``work/`` that no
living process holds: the folders whose lock it can take, and those without a lock file (left by a ctzoo from
before these locks, ``job-*``). Several processes may share one ``state_dir`` (``watch`` and ``listen`` with one
config): none removes another's living folder. The folders are made 0700 (this user's only): they hold patient
data.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

from ctzoo.io.atomic import atomic_path

__all__ = ["WorkFolder", "open_private", "remove_abandoned", "write_private"]

log = logging.getLogger(__name__)
PREFIX, LOCK_SUFFIX = "worker-", ".lock"


def open_private(path: Path) -> BinaryIO:
    """``path`` opened for writing, created with mode 0600 whatever the umask (patient data: this user's only)."""
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`~ctzoo.io.atomic.atomic_path`), mode 0600."""
    with atomic_path(path) as temporary, open_private(temporary) as out:
        out.write(data)


def _held(lock: Path) -> bool:
    """True while a living process holds ``lock``."""
    try:
        handle = os.open(lock, os.O_RDWR)  # writable: flock over NFS needs it
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(handle)  # nobody takes a dead process's folder up again: no need to keep the lock while removing
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_abandoned(root: Path) -> list[str]:
    """Remove what dead processes left in ``root`` (see the module docstring); the names removed."""
    removed = []
    for entry in sorted(root.iterdir()):
        if entry.name.endswith(LOCK_SUFFIX):
            if not _held(entry):
                _remove(root / entry.name[:-len(LOCK_SUFFIX)])
                entry.unlink(missing_ok=True)
                removed.append(entry.name[:-len(LOCK_SUFFIX)])
        elif not (root / f"{entry.name}{LOCK_SUFFIX}").exists():  # a process makes its lock before its folder
            _remove(entry)
            removed.append(entry.name)
    return sorted(set(removed))


class WorkFolder:
    """This process's folder under ``root`` (``path``), made after removing the abandoned ones; :meth:`close`
    removes it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # series and results hold patient data
        removed = remove_abandoned(self.root)
        if removed:
            log.warning("removed %d work folder(s) that stopped bridge processes left in %s", len(removed), self.root)
        name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
        self._lock_path = self.root / f"{name}{LOCK_SUFFIX}"
        self._lock = open(self._lock_path, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new name: nobody else can hold it
        self.path = self.root / name
        self.path.mkdir(mode=0o700)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock_path.unlink(missing_ok=True)
        self._lock.close()
