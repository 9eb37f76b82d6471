"""Host memory of a long-running rank: make glibc return freed multi-megabyte blocks to the kernel.

Why: glibc's malloc serves a request smaller than its mmap threshold from the heap, and raises that
threshold (up to 32 MiB on 64-bit) each time a block it had mapped is freed. A ZeRO-3 rank allocates and
frees gathered weights, reduce buckets and optimizer temporaries of 4-16 MiB each (at L) thousands of
times per step; once the threshold has risen they come from the heap, and a heap gives memory back only
from its top, so resident memory grows with fragmentation instead of with what is live. Measured with
tb-train, L, ZeRO-3, full activation checkpointing, fp32, 2 CPU ranks (tools/rehearse_L.py's job):
resident 9.70 GiB per rank after 2 steps and still growing (8.83 after step 1), against 6.67 GiB, flat
from step 1 to 3, with a fixed 4 MiB threshold — same losses, same step time (25.4 s).

`mallopt(M_MMAP_THRESHOLD, n)` fixes the threshold (and switches off its dynamic adjustment), so every
block of at least n bytes is its own mapping, unmapped on free. Small blocks still use the heap.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3   # glibc's <malloc.h>


def fix_mmap_threshold(nbytes: int) -> bool:
    """Serve every allocation of at least `nbytes` with its own mapping in this process (glibc only).

    Returns False, changing nothing, where the C library is not glibc or refuses the value (glibc
    accepts at most 32 MiB on 64-bit); nbytes <= 0 leaves glibc's default."""
    if nbytes <= 0:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.gnu_get_libc_version and libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError, TypeError):
        return False


__all__ = ["fix_mmap_threshold"]
