"""DICOM conformance checks for tests: David Clunie's ``dciodvfy`` (Debian/Ubuntu package ``dicom3tools``).

``dciodvfy FILE`` writes the IOD it recognised (e.g. ``Comprehensive3DSR``) and one line per finding to stderr,
each starting with ``Error -`` or ``Warning -``; it exits 0 when there is no error and non-zero otherwise. It
writes ``Abort - ...`` and exits non-zero when it cannot read the file at all. Errors (and aborts, and a non-zero
exit without any error line, so that nothing that failed can pass silently) fail a test; warnings are shown for
context. A missing ``dciodvfy`` fails rather than skips: CI installs it, and a silently skipped conformance check
is the one that lets a broken object ship.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

#: Line prefixes that mean the object does not conform (or could not be checked).
_FAILURE_PREFIXES = ("Error", "Abort")


def dciodvfy_output(path: str | Path) -> tuple[int, list[str]]:
    """``dciodvfy``'s exit status and output lines (stdout then stderr, blank lines dropped) for ``path``."""
    executable = shutil.which("dciodvfy")
    if executable is None:
        pytest.fail("dciodvfy not found: apt-get install dicom3tools")
    done = subprocess.run([executable, str(path)], capture_output=True, text=True, errors="replace", timeout=300)
    lines = [line.strip() for line in (done.stdout + "\n" + done.stderr).splitlines() if line.strip()]
    return done.returncode, lines


def _errors(returncode: int, lines: list[str]) -> list[str]:
    errors = [line for line in lines if line.startswith(_FAILURE_PREFIXES)]
    if returncode != 0 and not errors:
        errors.append(f"Error - dciodvfy exited with status {returncode} without an error line: {lines}")
    return errors


def dciodvfy_errors(path: str | Path) -> list[str]:
    """The lines of ``dciodvfy``'s report on ``path`` that start with "Error" (or "Abort"); empty when it conforms.

    A non-zero exit with no such line is reported as an error too.
    """
    return _errors(*dciodvfy_output(path))


def assert_dciodvfy_clean(path: str | Path) -> None:
    """Fail with dciodvfy's errors, and its whole report (warnings included) for context, unless ``path`` conforms."""
    returncode, lines = dciodvfy_output(path)
    errors = _errors(returncode, lines)
    if errors:
        report = "\n".join(lines)
        pytest.fail(f"dciodvfy found {len(errors)} error(s) in {Path(path).name}:\n" + "\n".join(errors)
                    + f"\n--- full report ---\n{report}", pytrace=False)
