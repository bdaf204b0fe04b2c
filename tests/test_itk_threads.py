"""SimpleITK's first calls of each kind run alone (``ctzoo/io/itk_threads.py``): a server segfaulted when two
threads made GDCM's first calls at once. After the first call of a kind, calls of it run in parallel again."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from ctzoo.io.itk_threads import first_use_alone


def test_first_calls_of_a_kind_run_alone_then_in_parallel():
    guard, inside, peak = threading.Lock(), [0], [0]

    def call() -> int:
        with guard:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        time.sleep(0.05)
        with guard:
            inside[0] -= 1
        return 7

    kind = f"test-{uuid.uuid4()}"
    with ThreadPoolExecutor(4) as pool:  # all four arrive before the kind is warm: one at a time
        assert list(pool.map(lambda _: first_use_alone(kind, call), range(4))) == [7] * 4
    assert peak[0] == 1
    peak[0] = 0
    with ThreadPoolExecutor(4) as pool:  # warm now: together
        list(pool.map(lambda _: first_use_alone(kind, call), range(4)))
    assert peak[0] >= 2


def test_a_failing_first_call_leaves_the_kind_cold():
    kind = f"test-{uuid.uuid4()}"

    def fail() -> None:
        raise RuntimeError("unreadable")

    for _ in range(2):
        try:
            first_use_alone(kind, fail)
        except RuntimeError:
            pass
    from ctzoo.io import itk_threads

    assert kind not in itk_threads._warmed
    assert first_use_alone(kind, lambda: 3) == 3 and kind in itk_threads._warmed
