"""Writes that never leave a half-written file or folder: write beside the target, then rename into place.

Every writer in ctzoo goes through here, so an interrupted run (Ctrl-C, a crash, a full disk) leaves the
old file or nothing, never a truncated one.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # a write that found no room: unnamed when a library's stream wrote


def _name_the_target(exc: OSError, temporary: Path, path: Path) -> None:
    """Let an error of the write name the file the caller asked for, not its hidden temporary name."""
    if exc.filename is not None and str(exc.filename) == str(temporary) or exc.filename is None and exc.errno in _FULL:
        exc.filename = str(path)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is renamed to ``path``.

    The temporary name keeps the suffix (``.nii.gz``, ``.png``...) for writers that pick the format by
    extension. On any exception, KeyboardInterrupt included, the temporary file is removed and ``path``
    is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    temporary = path.with_name(f".{stem}.{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as exc:
        _name_the_target(exc, temporary, path)
        raise
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:  # e.g. a read-only folder, where the write itself failed first: keep that error, not this
            pass


#: The temporary name :func:`atomic_path` writes under: ``.<stem>.<8 hex>.partial<suffix>``.
_PARTIAL_FILE = re.compile(r"\..+\.[0-9a-f]{8}\.partial(\.[^/]*)?")


def remove_partial_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` writes into ``folder`` that never finished: an exception
    removes its own, a killed process (``kill -9``, the OOM killer, a power cut) cannot. Only for a folder no write
    is in flight into (their names carry no owner to tell a live write by). Returns the files removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if _PARTIAL_FILE.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname())[:64] or "host"


def _owner_tag() -> str:
    """``host-pid-random``: which process on which machine a staging or set-aside folder belongs to, so that a later
    run can tell the leftovers of a killed one (``kill -9``, the OOM killer, a preempted node) from a live build."""
    return f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_siblings(target: str | Path) -> list[Path]:
    """Remove ``.<name>.<host>-<pid>-<random>.partial`` and ``.old`` folders beside ``target`` that a process of
    this host, now dead, left behind (an exception cleans its own up; a killed process cannot). Folders of live
    processes (concurrent builds into the same target) and of other hosts (a shared file system) are left alone.
    Returns the folders removed."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{re.escape(_host())}-(\d+)-[0-9a-f]{{8}}\.(partial|old)")
    removed = []
    if not target.parent.is_dir():
        return removed
    for sibling in target.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match and not sibling.is_symlink() and not _process_alive(int(match.group(1))):
            _remove_set_aside(sibling)
            removed.append(sibling)
    return removed


def _remove_set_aside(path: Path) -> None:
    """Remove a folder or file that was renamed aside (rmtree alone leaves a file where it was)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_folder(staging: Path, target: Path) -> None:
    """Rename a fully written ``staging`` folder to ``target``; an existing ``target`` (folder, file or link) is
    moved aside first (and put back if the rename fails), then removed."""
    aside = None
    if target.exists() or target.is_symlink():
        aside = target.with_name(f".{target.name}.{_owner_tag()}.old")
        os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        if aside is not None:
            os.replace(aside, target)
        raise
    if aside is not None:
        _remove_set_aside(aside)


def remove_atomically(path: str | Path) -> bool:
    """Remove a file or folder so that readers see it whole or not at all: a folder is renamed aside first, then
    deleted. False when there was nothing to remove."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        # named like replace_folder's, so a kill between the rename and the delete is swept by the next build
        aside = path.with_name(f".{path.name}.{_owner_tag()}.old")
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
        return True
    if path.exists() or path.is_symlink():
        path.unlink()
        return True
    return False


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target`` to fill; on success it replaces ``target``
    (:func:`replace_folder`), on any exception it is removed and ``target`` is untouched. Staging folders that a
    killed run left beside ``target`` are removed first (:func:`sweep_stale_siblings`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_siblings(target)
    staging = target.with_name(f".{target.name}.{_owner_tag()}.partial")
    try:
        staging.mkdir()
    except OSError as exc:
        _name_the_target(exc, staging, target)
        raise
    try:
        yield staging
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
