"""Freed memory kept for reuse inside a job, rather than handed back to the OS at every free.

glibc's ``malloc`` serves every request above 32 MiB (its largest mmap threshold) with a fresh
``mmap`` and returns it with ``munmap`` on free, so a training step that builds a tensor of
tens of MiB (Lingshu-Cell's per-gene logits of 64 cells x 1,000 genes x 281 tokens are 72 MiB)
makes the kernel zero and map those pages again at every step: page faults counted as system
time. :func:`keep_freed_memory` tells glibc (``mallopt``) to serve large requests from its heap
too and never to trim it, so the pages of one step are reused by the next. Measured on 2 cores,
a fine-tuning step at the ``small`` preset (1,000 genes, 64 cells, one thread): 0.72 -> 0.53 s,
system time 3.1 -> 0.6 s over the run; the default pipeline spent about 17% of its CPU in
system time before. The numbers a job computes do not change (only where its memory comes
from). Elsewhere than glibc it does nothing. A job's peak memory is unchanged; memory it freed
stays with the process until it exits (a job is one process, so nothing else waits for it).
The same settings go to the programs a job starts (STATE's ``state tx train``) through glibc's
environment variables, unless the environment already sets them.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory (glibc ``mallopt``);
    True when glibc took both settings, False elsewhere (nothing changed)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):  # no mallopt there (not glibc)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The trim threshold is an int: 2 GiB - 1 is as high as it goes, and far above a step's need.
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if ok:  # child processes read these at their start
        os.environ.setdefault("MALLOC_MMAP_MAX_", "0")
        os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**31 - 1))
    log.debug("glibc malloc: large allocations from the heap, freed memory kept: %s", ok)
    return ok
