"""Checks on the paths a command will write to, made before any work starts."""

from __future__ import annotations

from pathlib import Path

import click


def file_in_the_way(folder: Path) -> Path | None:
    """The first of ``folder``'s parents, or ``folder`` itself, that exists but is not a folder (None if none is).

    Such a file makes creating ``folder`` fail deep inside a writer, with an OS error that names neither the
    file nor the cause (FileExistsError, NotADirectoryError), after the work is done.
    """
    for candidate in (*reversed(folder.parents), folder):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


def require_folder(folder: Path) -> None:
    """Fail the command with one line if ``folder`` cannot be a folder because a file is in its path."""
    blocker = file_in_the_way(folder)
    if blocker is not None:
        raise click.ClickException(f"{blocker} is a file, not a folder")
