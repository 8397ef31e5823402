"""Keeping freed memory in the process, so that training steps do not page-fault.

A training step allocates and frees the same large activation buffers every time (an episode
of conv4 at 64 px: tens of MB each). glibc's ``malloc`` serves blocks above its mmap threshold
with fresh ``mmap`` calls and returns them to the kernel on ``free``, so every step faults
hundreds of MB of zeroed pages back in: on this project's 2-core machine that was a third of
the step's time, spent in the kernel (about 95,000 page faults per episode). Raising the mmap
and trim thresholds keeps those blocks in the heap for reuse, at the cost of up to
:data:`KEEP_BYTES` of freed memory held by the process. Values are unchanged; only where memory
comes from changes. Linux with glibc only; elsewhere nothing is done.
"""

from __future__ import annotations

import ctypes
import sys

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap, and this much free heap top is kept.
KEEP_BYTES = 1 << 30

_kept = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to :data:`KEEP_BYTES` (once per process);
    ``True`` when both were set, ``False`` where there is no glibc ``mallopt``."""
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) == 1
    return _kept
