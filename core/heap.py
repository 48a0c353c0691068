"""Give the C heap's free pages back to the OS after a load.

Loading weights makes transients (a dtype conversion, the fused w1/w3, the blocked layout, int8's
fp32 working copy) of a few to a few hundred MB each. glibc serves those under its mmap threshold
(which rises up to 32 MB as large blocks are freed) from its heaps, one per thread, and keeps freed
heap pages resident: an expert worker that loaded 768 MB of weights sat at 1.33x that in resident
memory (bench/memory.py), 4.97x with int8's transients. malloc_trim(0) returns every free page,
after which it sits at 1.01x. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_free_heap() -> None:
    """Return the heap's free pages to the OS (glibc's malloc_trim; a no-op without it)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
