"""SimpleITK from several threads: each kind of reader's first call made alone.

ITK registers its image IO factories, and GDCM builds its dictionaries, on first use, in process-wide containers
without a lock. Two threads doing that at once can corrupt them: a ``ctzoo serve`` process died so (a segfault in
libstdc++, on the first JPEG 2000 study it decoded in two threads). After a kind's first call has returned, calls run
in parallel as before; until then every call of an unwarmed kind waits for the one lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_FIRST_USE = threading.Lock()
_warmed: set[str] = set()


def first_use_alone(kind: str, call: Callable[[], T]) -> T:
    """``call()``; alone (under one process-wide lock) until a call of ``kind`` has returned once."""
    if kind in _warmed:
        return call()
    with _FIRST_USE:
        result = call()
        _warmed.add(kind)
        return result
