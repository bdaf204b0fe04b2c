"""Progress of one model's batch run (:func:`ctzoo.inference.pipeline.run_pipeline`), on a terminal and off one.

* **On a terminal** (stderr is a TTY): a tqdm bar over cases whose postfix counts slices, refreshed while a
  large case is still being predicted. Nothing is logged, so no log line breaks the bar.
* **Off a terminal** (logs, CI, systemd, ``nohup``): INFO lines through :mod:`logging` (logger
  ``ctzoo.inference.pipeline``) at a steady rate, one every ``interval_s`` seconds from a background thread,
  even while the main process waits on a reader or a long batch::

      recistnet-mini: 0/2 cases done, 144/303 slices, 4.8 slices/s, elapsed 30s, ETA ~33s

  ``144/303 slices`` counts slices predicted against every slice known so far; while some cases have not started,
  it reads ``144 slices (of 303 known so far)`` and the ETA extrapolates the mean case. Each finished case gets
  one line (``recistnet-mini: case small ok in 3.2 s (1/2 cases done)``; WARNING for a failed case, whose error
  is in ``summary.csv``; the time is the case's ``seconds`` there, from when its reading started), and
  :meth:`Progress.close` one last line. Lines name cases by their folder/file name
  only (as ``summary.csv`` does), never by patient name or ID.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("ctzoo.inference.pipeline")

#: Seconds between two refreshes of the bar's slice count on a terminal.
BAR_REFRESH_S = 1.0


def stderr_is_tty() -> bool:
    """Whether stderr is a terminal (a bar then; log lines otherwise)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def format_duration(seconds: float) -> str:
    """``45s``, ``2m05s``, ``1h02m``."""
    seconds = max(0, round(float(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts cases and slices of one model's run and reports them (see the module docstring).

    The pipeline calls :meth:`case_slices` when slices of a case arrive (with the case's expected slice count
    when the reader knows it), :meth:`slices_done` after each forward pass and :meth:`case_done` when a case's
    row is recorded; :meth:`close` (or leaving the ``with`` block) stops the reporting. ``enabled=False`` reports
    nothing (the service and the PACS bridge); ``tty=None`` asks :func:`stderr_is_tty`.
    """

    def __init__(self, name: str, cases: int, interval_s: float = 10.0, enabled: bool = True,
                 tty: bool | None = None):
        self.name, self.cases = name, cases
        self.interval_s = max(float(interval_s), 0.001)
        self.tty = stderr_is_tty() if tty is None else tty
        self.log_lines = enabled and not self.tty
        self.bar = tqdm(total=cases, unit="case", desc=name, disable=not (enabled and self.tty))
        self.started = time.perf_counter()
        self.done_slices = 0
        self.done_cases = 0
        self.expected: dict[Any, int] = {}  # case -> slices it will send (known once its reader says so)
        self.received: dict[Any, int] = {}  # case -> slices it sent so far
        self.first_seen: dict[Any, float] = {}
        self.failed: set[Any] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refreshed = 0.0
        self._ticker: threading.Thread | None = None
        if self.log_lines and cases:
            self._ticker = threading.Thread(target=self._tick, name="ctzoo-progress", daemon=True)
            self._ticker.start()

    # ------------------------------------------------------------------------------------------- counting

    def case_slices(self, case: Any, count: int = 0, expected: int | None = None) -> None:
        """``count`` more slices of ``case`` reached the model's queue; ``expected``: all it will send."""
        with self._lock:
            self.first_seen.setdefault(case, time.perf_counter())
            self.received[case] = self.received.get(case, 0) + int(count)
            if expected is not None:
                self.expected[case] = int(expected)

    def slices_done(self, count: int) -> None:
        """``count`` more slices went through the model."""
        with self._lock:
            self.done_slices += int(count)
        now = time.perf_counter()
        if not self.bar.disable and now - self._refreshed >= BAR_REFRESH_S:
            self._refreshed = now
            self.bar.set_postfix_str(self._slices_text(), refresh=True)

    def case_done(self, case: Any, name: str, status: str, seconds: float | None = None) -> None:
        """The row of ``case`` (named ``name``, the case's folder or file name) was recorded with ``status``;
        ``seconds``: the case's own wall time, as its row in ``summary.csv`` has it (None, a case failed before it
        was read: from its first slice here)."""
        now = time.perf_counter()
        with self._lock:
            self.first_seen.setdefault(case, now)
            received = self.received.get(case, 0)
            if status != "ok" or case not in self.expected:  # a failed case sends no more slices than it did
                self.expected[case] = received
            if status != "ok":
                self.failed.add(case)
            self.done_cases += 1
            seconds = now - self.first_seen[case] if seconds is None else seconds
            done = self.done_cases
        if self.log_lines:
            log.log(logging.INFO if status == "ok" else logging.WARNING, "%s: case %s %s in %.1f s (%d/%d cases done)",
                    self.name, name, status, seconds, done, self.cases)
        self.bar.update(1)
        self._refreshed = now
        self.bar.set_postfix_str(self._slices_text(), refresh=True)

    # ------------------------------------------------------------------------------------------- reporting

    def rate(self) -> float:
        """Slices per second since the run started."""
        return self.done_slices / max(time.perf_counter() - self.started, 1e-9)

    def _slices_text(self) -> str:
        return f"{self.done_slices} slices, {self.rate():.1f} slices/s"

    def line(self) -> str:
        """The periodic line: model, cases done/total, slices done/known, slices/s, elapsed, rough ETA."""
        with self._lock:
            elapsed = time.perf_counter() - self.started
            done, cases_done = self.done_slices, self.done_cases
            sized_total = sum(self.expected.values())
            known = sized_total + sum(n for c, n in self.received.items() if c not in self.expected)
            unsized = self.cases - len(self.expected)  # cases whose slice count is not known yet
            sizes = [n for c, n in self.expected.items() if c not in self.failed]
        rate = done / max(elapsed, 1e-9)
        slices = f"{done}/{known} slices" if unsized == 0 else f"{done} slices (of {known} known so far)"
        parts = [f"{self.name}: {cases_done}/{self.cases} cases done", slices, f"{rate:.1f} slices/s",
                 f"elapsed {format_duration(elapsed)}"]
        if rate > 0 and (unsized == 0 or sizes):  # the unsized cases are taken as the mean sized one
            estimate = sized_total + (unsized * sum(sizes) / len(sizes) if unsized else 0)
            parts.append(f"ETA ~{format_duration(max(estimate - done, 0) / rate)}")
        return ", ".join(parts)

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            log.info("%s", self.line())

    def close(self) -> None:
        """Stop the periodic lines, log the last one (off a terminal) and close the bar."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self.log_lines and self.cases:
            elapsed = time.perf_counter() - self.started
            state = "finished" if self.done_cases == self.cases else "stopped"
            log.info("%s: %s, %d/%d cases, %d slices in %s (%.1f slices/s)", self.name, state, self.done_cases,
                     self.cases, self.done_slices, format_duration(elapsed), self.rate())
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
