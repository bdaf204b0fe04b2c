"""The reader stage of the batch pipeline (:mod:`ctzoo.inference.pipeline`): a case read, decoded and
preprocessed into messages, in a reader process, a model copy's process, a Ray task, or (``preprocessed_here``)
the process holding the model when the inputs are computed on its device.

Messages: ``slices`` (chunks ``(n, C, H, W)``), ``end`` (the volume's header, its voxels as a shared tensor, the
context, the stage times), ``volume`` (read only: header and voxels), ``outputs`` (a model copy's batch), or
``error`` (the case fails with the message; the batch goes on).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from ctzoo.inference.inputs import CaseInput
from ctzoo.inference.tasks import ModelTask, error_message
from ctzoo.io import Volume


def require_finite(volume: Volume, source: object) -> None:
    """ValueError naming ``source`` when any voxel of ``volume`` is NaN or infinite: no HU can be guessed for it,
    so neither ``ctzoo infer`` nor ``ctzoo cohort build`` runs a model on it."""
    finite = np.isfinite(volume.array)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise ValueError(f"{source}: {bad} voxels are NaN or infinite; refusing to guess their HU")


def read_case(index: int, case: CaseInput, task: ModelTask, chunk: int, series: str | None = None,
              rules: Any = None, limits: Any = None, reuse: bool = False,
              decoder: str | None = None, preprocess: bool = True) -> Iterator[dict[str, Any]]:
    """Messages for one case: ``slices`` chunks ``(n, C, H, W)``, then ``end`` (volume and context), or
    ``error`` as soon as anything fails. Used by the local readers and by the Ray engine. ``series``: the run's
    choice of series (``--series``) where the case names none of its own (:attr:`CaseInput.series`). ``reuse``:
    every chunk is stacked into the same array, valid until the next message (for a consumer in this process that
    is done with a chunk before it asks for the next: a fresh 75 MB batch of 2.5D slices each time costs page
    faults).
    ``decoder``: how JPEG 2000 DICOM is decoded (:attr:`PipelineOptions.decoder`). ``preprocess=False``: one
    ``volume`` message (the volume read, its voxels as a shared tensor) instead of slices and end, for the
    process holding the model to preprocess on its device (:attr:`PipelineOptions.preprocess_device`)."""
    from ctzoo.io import read_volume
    from ctzoo.io.limits import DEFAULT_LIMITS

    started_at = time.time()  # wall clock, not perf_counter: the writer compares it in another process
    clock = time.perf_counter()
    sent = 0
    try:
        volume = case.volume if case.volume is not None else read_volume(case.path, series=case.series or series,
                                                                         rules=rules, progress=False,
                                                                         limits=limits or DEFAULT_LIMITS,
                                                                         decoder=decoder, recursive=case.recursive)
        require_finite(volume, case.path)
        read_s = time.perf_counter() - clock
        if not preprocess:
            yield {"kind": "volume", **_shared_volume(volume), "case": index, "read_s": read_s,
                   "started_at": started_at}
            return
        # preprocess time is the reader's own work: the time it waits at a yield for the consumer is left out
        preprocess_s, clock = 0.0, time.perf_counter()
        context, images = task.preprocess(volume)
        expected = axial_slices(volume)  # for progress only; the end message has the true count
        stacked = None
        for buffer in _chunks(images, chunk):
            if isinstance(buffer[0], torch.Tensor):  # computed on the model's device: they stay there
                rows = torch.stack(buffer)
            elif not reuse:
                rows = np.stack(buffer)
            else:
                if stacked is None or stacked.shape[1:] != buffer[0].shape:
                    stacked = np.empty((chunk, *buffer[0].shape), dtype=buffer[0].dtype)
                rows = np.stack(buffer, out=stacked[:len(buffer)])
            message = {"kind": "slices", "case": index, "start": sent, "images": torch.as_tensor(rows),
                       "expected": expected}
            preprocess_s += time.perf_counter() - clock
            yield message
            clock = time.perf_counter()
            sent += len(buffer)
        if sent == 0:
            raise ValueError(f"{case.path}: the volume has no slices")
        preprocess_s += time.perf_counter() - clock
        yield {"kind": "end", **_shared_volume(volume), "case": index, "slices": sent, "context": context,
               "read_s": read_s + preprocess_s, "started_at": started_at,
               "stage_s": {"read": read_s, "preprocess": preprocess_s}, "spacing": volume.spacing}
    except Exception as exc:  # one bad case must not stop the batch: it is reported in the summary
        yield {"kind": "error", "case": index, "error": error_message(exc)}


def _shared_volume(volume: Volume) -> dict[str, Any]:
    """The volume's header without its voxels, the voxels as a tensor (moved through shared memory between
    processes, not pickled), and who read it."""
    header = copy.copy(volume)
    header.array = np.empty((0, 0, 0), dtype=volume.array.dtype)
    worker = get_worker_info()
    return {"volume": header, "voxels": torch.from_numpy(np.ascontiguousarray(volume.array)),
            "worker": worker.id if worker else os.getpid()}


def _chunks(images: Iterator[np.ndarray], chunk: int) -> Iterator[list[np.ndarray]]:
    buffer: list[np.ndarray] = []
    for image in images:
        buffer.append(image)
        if len(buffer) == chunk:
            yield buffer
            buffer = []
    if buffer:
        yield buffer


def axial_slices(volume: Volume) -> int:
    """How many axial slices the models see: the volume's size along the index axis nearest patient S."""
    return int(volume.size[int(np.argmax(np.abs(volume.direction[2])))])


def predict_case(index: int, case: CaseInput, task: ModelTask, batch_size: int, series: str | None = None,
                 rules: Any = None, limits: Any = None, decoder: str | None = None) -> Iterator[dict[str, Any]]:
    """Messages for one case run whole by one model copy: ``outputs`` of each batch of ``batch_size`` slices
    (with the batch's wall-clock start and end), then ``end`` as :func:`read_case`'s, or ``error``."""
    for message in read_case(index, case, task, batch_size, series, rules, limits, reuse=True, decoder=decoder):
        if message["kind"] != "slices":
            yield message
            continue
        started = time.time()
        try:
            outputs = task.predict(message["images"].numpy())
        except Exception as exc:  # the case fails with the message; its reading stops here
            yield {"kind": "error", "case": index, "error": f"model failed: {error_message(exc)}"}
            return
        yield {"kind": "outputs", "case": index, "start": message["start"], "outputs": outputs,
               "expected": message["expected"], "batch_s": (started, time.time()), "pid": os.getpid()}


def preprocessed_here(message: dict[str, Any], case: CaseInput, task: ModelTask,
                      chunk: int) -> Iterator[dict[str, Any]]:
    """A reader's ``volume`` message as :func:`read_case`'s messages, its slices computed in this process by
    ``task`` (preprocessing on the model's device); the end message keeps the reader's read time and start."""
    volume = message["volume"]
    volume.array = message["voxels"].numpy()
    for local in read_case(message["case"], dataclasses.replace(case, volume=volume), task, chunk):
        if local["kind"] == "end":
            stages = {"read": message["read_s"], "preprocess": local["stage_s"]["preprocess"]}
            local.update(stage_s=stages, read_s=sum(stages.values()), started_at=message["started_at"],
                         worker=message["worker"])
        yield local
