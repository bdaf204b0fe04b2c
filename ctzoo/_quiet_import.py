"""Import a native library whose loader prints to the process's own stdout/stderr, and keep what it printed.

nvImageCodec (``ctzoo infer --decode``; MONAI imports it too, where installed) prints a line for each optional CUDA
library it does not find (nvJPEG, nvTIFF, ...) through C's stdio, on every import: that is noise on every command
of a machine without them, and the reason a GPU decoder cannot start on one with them missing. So it is imported
once, at ``import ctzoo``, with file descriptors 1 and 2 pointed at a temporary file; the text is kept in
:data:`PRINTED` for error messages. No third-party import here: ``ctzoo/__init__.py`` uses it.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import re
import sys
import tempfile
from types import ModuleType

#: What each module imported by :func:`quiet_import` printed while it loaded.
PRINTED: dict[str, str] = {}


def captured_output(build):
    """``(build(), what it printed)``: C-level output of ``build`` (through buffered C stdio too) goes to a temporary
    file, not to the terminal or a service's log. Where ``build`` fails after printing, a RuntimeError carries both;
    otherwise its own exception is raised."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        result, error = None, None
        try:
            result = build()
        except Exception as exc:  # raised below, once the descriptors are back
            error = exc
        finally:
            _flush_c_stdio()  # C's buffers into the sink, before the descriptors go back
            for fd, original in saved.items():
                os.dup2(original, fd)
                os.close(original)
        sink.seek(0)
        printed = sink.read().decode(errors="replace").strip()
    if error is not None:
        if printed:
            raise RuntimeError(f"{error} (it printed: {one_line(printed)})") from error
        raise error
    return result, printed


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to ask (not Linux or macOS): Python's own flush must do
        pass


def one_line(text: str, limit: int = 600) -> str:
    """``text`` on one line, without terminal colours, cut at ``limit`` characters."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def quiet_import(name: str) -> ModuleType:
    """``importlib.import_module(name)``, its printing kept in :data:`PRINTED` (ImportError when not installed)."""
    if name in sys.modules:
        return sys.modules[name]
    module, PRINTED[name] = captured_output(lambda: importlib.import_module(name))
    return module


def installed(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (its parent packages are imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False
