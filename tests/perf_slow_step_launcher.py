"""Run the ctzoo CLI with ONE optimiser step slowed on one rank: the fault the parameter server test must find.

Test-side fault injection (product code has none): ``CTZOO_TEST_SLOW_RANK``, ``CTZOO_TEST_SLOW_STEP`` (0-based,
counted over the run) and ``CTZOO_TEST_SLOW_S`` say which rank sleeps how long inside which optimiser step. The
engine times ``optimizer.step()`` as the ``optimizer_step`` stage, so the sleep lands there, on that rank only: the
other ranks do not wait on it within the same step (they wait at the next step's gradient exchange).

Usage, as torchrun runs a script: ``torchrun --nproc_per_node 2 tests/perf_slow_step_launcher.py train CONFIG ...``.
"""

import os
import sys
import time

import torch


def slow_one_step(rank: int, step: int, seconds: float) -> None:
    """Make the ``step``-th call of any optimiser's ``step`` on ``rank`` sleep ``seconds`` first."""
    if int(os.environ.get("RANK", "0")) != rank:
        return
    calls = 0
    step_method = torch.optim.AdamW.step  # the engine's optimiser

    def step_then_maybe_sleep(self, *args, **kwargs):
        nonlocal calls
        if calls == step:
            time.sleep(seconds)
        calls += 1
        return step_method(self, *args, **kwargs)

    torch.optim.AdamW.step = step_then_maybe_sleep


if __name__ == "__main__":
    slow_one_step(int(os.environ["CTZOO_TEST_SLOW_RANK"]), int(os.environ["CTZOO_TEST_SLOW_STEP"]),
                  float(os.environ["CTZOO_TEST_SLOW_S"]))
    from ctzoo.cli import main

    sys.exit(main(sys.argv[1:], prog_name="ctzoo"))
