"""Freed memory reused within a job, and given back to the system between jobs.

A job allocates and frees volume-sized blocks one after another: the network's feature maps,
window after window; the resampled label map; its reorientation. glibc serves every block
above 32 MB with a fresh ``mmap`` and unmaps it when freed, so each new block is faulted in
again page by page, and on a virtual machine those faults cost more than the writing itself.
A worker asks glibc to serve large blocks from its heap instead, where a freed block is reused
by the next, and trims the heap after each job, so that an idle worker holds no more than its
models. Measured on the demo bundle and a 300-slice CT (2 cores): network 2.1 -> 1.6 s,
postprocess 0.58 -> 0.32 s, resident memory between jobs unchanged.

Only glibc has these calls; elsewhere both functions do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the top of the heap kept on free() (mallopt takes an int: 2 GB at most);
# the rest is given back once per job, by give_back_freed_memory.
_KEEP_ON_FREE = 2**31 - 1


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, loaded once per process, or None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def reuse_freed_memory() -> bool:
    """Large blocks from the heap, freed memory kept until :func:`give_back_freed_memory`;
    False where the C library cannot be asked."""
    libc = _libc()
    if libc is None:
        log.info("not glibc: large blocks stay with the C library's defaults")
        return False
    return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_ON_FREE) == 1


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the system (after a job)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
