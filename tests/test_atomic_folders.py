""":func:`ctzoo.io.atomic.atomic_folder`: staging folders that a killed run (``kill -9``, the OOM killer) left beside
the target are removed by the next build, those of live builds and of other hosts are not."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from ctzoo.io.atomic import _host, atomic_folder, atomic_path, replace_folder


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_staging_folders_of_dead_processes_are_swept_live_ones_kept(tmp_path):
    target = tmp_path / "slice_cache"
    dead, host = dead_pid(), _host()
    stale = [tmp_path / f".slice_cache.{host}-{dead}-0123abcd.partial",
             tmp_path / f".slice_cache.{host}-{dead}-4567cdef.old"]
    kept = [tmp_path / f".slice_cache.{host}-{os.getpid()}-89abcdef.partial",  # a live build
            tmp_path / f".slice_cache.other-host-{dead}-0123abcd.partial",  # a build on another node
            tmp_path / f".other.{host}-{dead}-0123abcd.partial"]  # another target's
    for folder in stale + kept:
        folder.mkdir()
        (folder / "slices.int16").write_bytes(b"\0" * 64)
    with atomic_folder(target) as partial:
        (partial / "index.json").write_text("{}")
        assert f".slice_cache.{host}-" in partial.name  # the owner is recorded in its own staging name
    assert (target / "index.json").exists()
    assert not any(folder.exists() for folder in stale)
    assert all(folder.exists() for folder in kept)


def test_a_file_replaced_by_a_folder_leaves_no_hidden_copy(tmp_path):
    """The file a folder replaces is removed like a folder would be, not left behind as a hidden ``.old`` file."""
    target, staging = tmp_path / "model", tmp_path / "staging"
    target.write_text("a file of the target's name")
    staging.mkdir()
    (staging / "ctzoo.json").write_text("{}")
    replace_folder(staging, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "ctzoo.json").is_file()


def test_a_full_disk_names_the_file_asked_for(tmp_path):
    """A writer's stream that finds no room raises an OSError without a name: the target's is given to it, and
    no temporary file is left."""
    with pytest.raises(OSError) as raised, atomic_path(tmp_path / "out.json") as temporary:
        temporary.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.filename == str(tmp_path / "out.json") and list(tmp_path.iterdir()) == []
