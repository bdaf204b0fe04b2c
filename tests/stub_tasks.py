"""A ModelTask without a network, for tests of the pipeline's scheduling: every slice predicts None, nothing is
written but the status file. Its stages are module-level functions and a picklable callable, so a worker process
gets it however it was started (fork, spawn, a fork server: ctzoo.inference.start_method)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

STAND_IN_ERROR = "out of memory (a test's stand-in)"


def preprocess(volume):
    return None, (plane[None].astype(np.float32) for plane in volume.array)


@dataclass(frozen=True)
class Predict:
    """Sleeps ``seconds_per_batch`` per batch; a batch of more than ``fails_over`` slices raises."""

    seconds_per_batch: float = 0.0
    fails_over: int | None = None

    def __call__(self, batch):
        if self.fails_over is not None and len(batch) > self.fails_over:
            raise RuntimeError(STAND_IN_ERROR)
        time.sleep(self.seconds_per_batch)
        return [None] * len(batch)


def finish(volume, context, outputs):
    return None


def write(volume, result, folder, overlay, runtime):
    return [], {"findings": 0, "detail": ""}


def stub_task(seconds_per_batch: float = 0.0, fails_over: int | None = None):
    """The stub; its ``replicate`` (a model copy in a worker) builds the same stub there."""
    from ctzoo.inference.tasks import ModelTask

    task = ModelTask("stub-model", "0.0.1", "detection", preprocess, Predict(seconds_per_batch, fails_over),
                     finish=finish, write=write)
    task.replicate = functools.partial(_copy, seconds_per_batch, fails_over)
    return task


def _copy(seconds_per_batch: float, fails_over: int | None, threads: int):
    return stub_task(seconds_per_batch, fails_over)
