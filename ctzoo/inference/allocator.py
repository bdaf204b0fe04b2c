"""Memory reuse for the batch processes of ``ctzoo infer``: freed memory is kept for the next batch.

Why: each batch of the 2.5D model allocates and frees tens of megabytes (inputs of 9 planes of 512 x 512 float32
per slice, and the activations). GNU libc serves such blocks with ``mmap`` and gives them back to the kernel when
they are freed, so every batch faults its buffers in again, page by page. Measured with ``ctzoo infer`` on 2 cases
of 512 x 512 x 60 on the 2-core VM (PyTorch, 2 copies): 3.6 million minor page faults and 7.9 s of system time
in a 14.0 s run; with freed memory kept (no ``mmap`` for large blocks, no trimming of the heap's top, which also
grows in 256 MB steps) 0.58 million faults, 1.4 s and 10.2 s. The same settings as the environment variables
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... MALLOC_TOP_PAD_=...``, set from inside the process (``mallopt``).

The price: a process holds on to its peak memory until it exits. That suits a batch job and each copy of the
model; the service and the PACS bridge, which run for weeks and bound their memory per request, do not use it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc's mallopt parameters (malloc.h)
TOP_PAD_BYTES = 256 << 20


def keep_freed_memory() -> bool:
    """Make this process's ``malloc`` keep freed memory for reuse (GNU libc; elsewhere nothing is changed). Forked
    children inherit it; a spawned process calls it itself. Returns whether it applies."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl, macOS: other allocators, other parameters
        return False
    applied = all(libc.mallopt(parameter, value) == 1 for parameter, value in
                  ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, TOP_PAD_BYTES)))
    if not applied:
        log.debug("mallopt refused a setting: freed memory is returned to the kernel as usual")
    return applied
