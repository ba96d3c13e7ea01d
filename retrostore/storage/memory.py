"""Two requests to the C library about memory the index holds: huge pages for an exact index's
vectors, and giving freed heap pages back. Linux with glibc; elsewhere both do nothing.
"""

from __future__ import annotations

import ctypes

import numpy as np

__all__ = ["huge_pages", "trim_heap"]

#: ``madvise`` advice values (Linux ``<asm-generic/mman-common.h>``; Python's ``mmap`` module
#: offers them only for its own mappings, and MADV_COLLAPSE only from Python 3.13).
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
#: x86-64's transparent huge page.
HUGE_PAGE = 2 << 20

_libc = None


def _c() -> ctypes.CDLL | None:
    """The C library, loaded once (None where it cannot be), with ``madvise``'s argument types set."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
        else:
            if hasattr(_libc, "madvise"):
                _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc or None


def huge_pages(array: np.ndarray) -> bool:
    """Back a large array already in RAM with transparent huge pages, now.

    An exact search of one query reads every vector once: a matrix-vector product bound by
    memory, where 4 KiB pages cost TLB misses that 2 MiB pages do not. numpy asks for huge
    pages on its own large arrays (``madvise(MADV_HUGEPAGE)``); FAISS's ``IndexFlat`` storage
    is a plain ``std::vector`` and gets 4 KiB pages where transparent huge pages are
    ``madvise`` only (this machine's setting): the same product over 100k x 384 float32 took
    6.67 ms from FAISS's memory and 6.06 ms from numpy's (docs/benchmarks.md, "scale", exact
    mode). ``MADV_HUGEPAGE`` marks the whole 2 MiB pages inside the array and ``MADV_COLLAPSE``
    (Linux 6.1) moves them into huge pages at once rather than when ``khugepaged`` gets to it.

    Returns whether the kernel collapsed them (False on other systems, older kernels, or where
    huge pages are off); the array is unchanged either way.
    """
    libc = _c()
    if libc is None or array.nbytes < 2 * HUGE_PAGE or not hasattr(libc, "madvise"):
        return False
    addr = array.ctypes.data
    start = -(-addr // HUGE_PAGE) * HUGE_PAGE
    end = (addr + array.nbytes) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return False
    if libc.madvise(ctypes.c_void_p(start), end - start, MADV_HUGEPAGE) != 0:
        return False
    return libc.madvise(ctypes.c_void_p(start), end - start, MADV_COLLAPSE) == 0


def trim_heap() -> None:
    """Give the heap pages that freed allocations left back to the system (glibc's
    ``malloc_trim``). FAISS's inverted lists are many small allocations: after a read-only
    handle's in-memory merge freed a 1M-vector store's segments, anonymous memory stayed at
    89 MiB without it and fell to 46 MiB with it (39 MiB for the segments as opened)."""
    libc = _c()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
