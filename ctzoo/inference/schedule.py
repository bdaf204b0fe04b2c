"""How ``ctzoo infer`` spreads its work over this machine: the pipeline's layout, worker processes and model threads.

Two layouts (:class:`ctzoo.inference.pipeline.PipelineOptions` ``layout``):

``shared``
    one model in the main process, fed by reader processes that read, decode and preprocess volumes. The layout
    for a GPU: the model runs on the GPU while the readers use the CPU cores, so overlapping them costs the model
    nothing. It is also what ``--placement`` needs (one placed network) and what the service and the PACS bridge
    use (one loaded model answering every request).
``copies``
    each worker process holds a copy of the model on ``threads`` CPU threads and runs whole cases in turn: read,
    preprocess, predict. Only the model's outputs (and the volume, for writing) reach the main process, which
    finishes and writes the cases. The layout for the CPU: there readers and the model compete for the same cores.
    On 2 cores, one model on 2 threads fed by a reader process ran at about half its speed alone (the reader's
    work preempts one of the model's threads and the other waits at the next synchronisation point, and the
    2.5D inputs, 9 planes of 512 x 512 float32 per slice, cross processes) and lost to no overlap at all;
    2 copies on 1 thread each keep both cores on whole cases of their own (``benchmarks/infer.py``,
    ``docs/benchmarks.md``).

:func:`choose_schedule` picks the layout from the device (``copies`` on the CPU, ``shared`` on a GPU) and the
counts from the cores this process may run on and the number of cases: as many copies as cases, up to one per core
and at most :data:`MAX_COPIES`, with the cores shared out as threads. One case gets one copy on every core, run
in the main process: that is exactly the serial rate, and nothing is lost starting a process for it.

The shared layout's readers: on a GPU, one per case up to every core but the main process's (at most
:data:`MAX_GPU_READERS`). Reading and preprocessing, not the model, bound a GPU: preprocessing costs about 17 ms
of one core per slice (the 2.5D detector input, ``benchmarks/infer.py``), so each reader feeds about 60 slices/s,
and a JPEG 2000 slice decodes at about 17/s per core, while a 2D network at 512 x 512 takes thousands of slices/s
on one H100 or H200. On the CPU the readers compete with the model for the cores, so there they are the CPUs less
one, at most :data:`MAX_READERS`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: At most this many model copies: each holds its network, one volume and a batch of 2.5D inputs in memory.
MAX_COPIES = 8
#: Reader processes of the shared layout on the CPU by default: the CPUs less one (the model's), at most this many.
MAX_READERS = 4
#: ... and on a GPU, one per case up to the CPUs less one, at most this many (each holds one volume in memory).
MAX_GPU_READERS = 16
LAYOUTS = ("auto", "copies", "shared")


@dataclass(frozen=True)
class Schedule:
    layout: str  # "copies" or "shared"
    workers: int  # copies: model copies in worker processes (0: one, in the main process); shared: readers
    threads: int | None  # model threads: of each copy, or of the shared model (None: the backend's default)

    def describe(self) -> str:
        threads = "the backend's default" if self.threads is None else str(self.threads)
        if self.layout == "copies":
            where = "in this process" if self.workers == 0 else f"in {self.workers} worker processes"
            return f"layout copies: {max(self.workers, 1)} model copy(ies) {where}, {threads} thread(s) each"
        return f"layout shared: one model ({threads} thread(s)) fed by {self.workers} reader process(es)"


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, which taskset and container cpusets narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_readers(cores: int | None = None, device: str = "cpu", cases: int | None = None) -> int:
    """Reader processes of the shared layout on ``device`` for ``cases`` cases (None: as many as there may be);
    see the module docstring."""
    cores = usable_cores() if cores is None else cores
    if device == "cpu":
        return max(1, min(MAX_READERS, cores - 1))
    return max(1, min(MAX_GPU_READERS, cores - 1, cases if cases is not None else MAX_GPU_READERS))


def choose_schedule(device: str, cases: int, cores: int | None = None, layout: str = "auto",
                    workers: int | None = None, threads: int | None = None, can_copy: bool = True) -> Schedule:
    """The layout and counts for ``cases`` cases on ``device`` (already resolved: ``cpu``, ``cuda``, ``cuda:N``).

    ``layout``, ``workers`` and ``threads`` given by the user are kept; the rest follows from them, ``cores``
    (default: :func:`usable_cores`) and ``cases``. ``can_copy`` False (a placed network) rules out ``copies``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    cores = usable_cores() if cores is None else max(1, cores)
    if layout == "auto":
        layout = "copies" if device == "cpu" and can_copy else "shared"
    if layout == "copies" and not can_copy:
        raise ValueError("layout copies needs a model that can be copied into worker processes; a placed network "
                         "runs in this process only (use layout shared)")
    if layout == "copies" and device != "cpu":
        raise ValueError(f"layout copies runs CPU copies of the model; on {device} use layout shared")
    if layout == "shared":
        return Schedule("shared", default_readers(cores, device, cases) if workers is None else workers, threads)
    if workers is None:
        per_copy = 1 if threads is None else threads
        workers = max(1, min(cases, cores // per_copy, MAX_COPIES))
        workers = 0 if workers == 1 else workers  # one copy: run it here, no process to start or feed
    if threads is None:
        threads = max(1, cores // max(workers, 1))
    return Schedule("copies", workers, threads)
