"""pydicom's log, one line per distinct message while a series is read.

pydicom logs a problem of a header (an unknown character set, ``ISO_IR 999``) on every value it decodes: 120
identical lines for a 20-slice series. :func:`pydicom_messages_once` lets the first through.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class _FirstOfEach(logging.Filter):
    """Lets each distinct message through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@contextmanager
def pydicom_messages_once() -> Iterator[None]:
    """Log each of pydicom's messages once inside the block (a filter on the ``pydicom`` logger, removed after)."""
    pydicom_log, once = logging.getLogger("pydicom"), _FirstOfEach()
    pydicom_log.addFilter(once)
    try:
        yield
    finally:
        pydicom_log.removeFilter(once)
