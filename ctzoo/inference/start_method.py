"""How ``ctzoo infer`` starts its worker processes (readers, or copies of the model): fork, spawn or a fork server.

Forking is the cheapest (a reader starts in milliseconds, with every module already imported) and the default
where it is safe. It is not safe when:

* **another thread is running in this process** (a test runner's, a notebook kernel's, a Ray driver's, a leftover
  progress monitor): the child gets a copy of every lock another thread held at that moment and nobody to release
  it (Python 3.12 warns on such a fork). Most likely what was seen twice in CI: a forked reader hung before
  sending its first volume, in a pytest worker that had run the service, PACS and Ray tests. Such a process
  starts its workers from a *fork server*: a clean single-threaded process that imports the workers' modules
  once, then forks each worker (fast after the first);
* a copy of a PyTorch model runs on several threads: GNU libgomp keeps the parent's OpenMP thread pool, which the
  child does not have, so the child hangs in its first parallel region; the copies are spawned;
* nvImageCodec decodes (the parent's check built a decoder, whose threads a child would not have) or the model
  preprocesses on its device (the parent holds the GPU's context, which a forked child cannot use): spawned.

The choice is made as a run starts, before its own threads (the progress ticker, the writer): ``ctzoo infer`` has
no other thread then (it turns tqdm's monitor thread off), so on the command line the workers are forked. The
run's own threads hold only locks that a worker never takes.

However started, a worker never outlives its run (:func:`end_with_parent`).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading

#: What a fork server imports once, before it forks the workers: the pipeline (the workers' stage) and so torch,
#: MONAI and the readers.
FORK_SERVER_PRELOAD = ["ctzoo.inference.pipeline"]


def worker_start_method(workers: int, copies: bool, copy_threads: int, backend: str | None,
                        decoder: str | None, preprocess_device: str | None,
                        other_threads: int | None = None) -> str | None:
    """The start method of a run's worker processes (module docstring): ``"spawn"``, ``"forkserver"``, or None:
    the platform's default (fork on Linux before Python 3.14; nothing starts when ``workers`` is 0).
    ``other_threads``: the Python threads running besides this one (default: counted now)."""
    if workers <= 0:
        return None
    if copies and copy_threads > 1 and backend == "torch":
        return "spawn"
    if decoder or preprocess_device:
        return "spawn"
    if other_threads is None:
        other_threads = threading.active_count() - 1
    if other_threads == 0:
        return None
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.get_context("forkserver").set_forkserver_preload(FORK_SERVER_PRELOAD)
    return "forkserver"


#: prctl(2)'s option that names the signal a process gets when the thread that started it ends (Linux).
_PR_SET_PDEATHSIG = 1


def end_with_parent(run_pid: int, worker_id: int = 0) -> None:
    """A worker's first act (the DataLoader's ``worker_init_fn``; ``run_pid``: the process running the batch):

    * SIGTERM raises KeyboardInterrupt, as SIGINT does: stopping the whole process group (``systemctl stop``,
      ``kill -- -PGID``, Slurm, Kubernetes) stops the workers the way Ctrl-C does, quietly, while the main process
      stops the run in order (ctzoo infer's SIGTERM handler); torch's handler would report each as a crash;
    * on Linux the kernel kills the worker (SIGKILL) when its parent ends however it ends (``kill -9``, the OOM
      killer): a worker left behind would wait for ever to hand its last result to a pipe nobody reads, holding
      its memory (a model copy: about a GB)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # no prctl in this libc: the pipe's end still stops a waiting worker
            pass
    try:
        os.kill(run_pid, 0)
    except ProcessLookupError:  # the run ended before the kernel was told to end this worker with it
        os._exit(1)
    except PermissionError:
        pass
