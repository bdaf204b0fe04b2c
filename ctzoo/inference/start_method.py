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
"""

from __future__ import annotations

import multiprocessing
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
