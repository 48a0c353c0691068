"""The process heap: huge pages for large tensors, and the C heap's free pages back to the OS after a load.

Huge pages: torch's CPU allocator, where THP_MEM_ALLOC_ENABLE is set when it first allocates, aligns
every block of 2 MB or more to 2 MB and asks the kernel for transparent huge pages for it (which
Linux's usual `madvise` setting grants only to those who ask). Weights are such blocks: a load takes
512x fewer page faults (an expert worker loaded 2.2 -> 3.3 GB/s here, where new memory is costly),
the single-row kernel streams 6-12% faster (fewer TLB misses), and a dead worker's memory goes in
2 MB pieces. The CLI asks for it before torch allocates; expert workers get it in their environment.

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
import os

HUGE_PAGES = {"THP_MEM_ALLOC_ENABLE": "1"}  # torch reads it once per process, at its first allocation


def use_huge_pages() -> None:
    """Huge pages for this process's large tensors: call before torch allocates (a value already set
    is kept: THP_MEM_ALLOC_ENABLE=0 turns it off)."""
    os.environ.update(huge_pages_env())


def huge_pages_env() -> dict[str, str]:
    """The environment that gives a process huge pages, or what this one was given instead (an
    operator's THP_MEM_ALLOC_ENABLE=0 reaches the workers too)."""
    return {name: os.environ.get(name, value) for name, value in HUGE_PAGES.items()}


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
