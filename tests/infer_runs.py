"""Waiting on a real ``ctzoo infer`` process, for the tests that stop one part-way."""

from __future__ import annotations

import time
from pathlib import Path


def wait_for_a_finished_case(process, out: Path, timeout_s: float = 300) -> None:
    """Until the ``ctzoo infer`` run ``process`` has written its first case's status file into ``out``; fails if
    it ends first or takes over ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not list(out.glob("*/status-recistnet-mini.json")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no case finished in {timeout_s:g} s"
        time.sleep(0.05)


def stop_after_first_case(process, out: Path, stop) -> str:
    """Wait for the run ``process`` (its own session) to finish a case, call ``stop()`` (send the signal under
    test), and return its stderr once it ended; killed with its process group if anything failed on the way."""
    import os
    import signal

    try:
        wait_for_a_finished_case(process, out)
        stop()
        return process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
