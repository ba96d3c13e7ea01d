"""storage.memory: huge pages for an exact index's vectors, heap trimming."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from retrostore.storage.memory import HUGE_PAGE, huge_pages, trim_heap


def _huge_kib_around(start: int, end: int) -> int | None:
    """AnonHugePages (KiB) of the memory mappings that overlap [start, end), from /proc/self/smaps."""
    p = Path("/proc/self/smaps")
    if not p.exists():
        return None
    total, inside = 0, False
    for line in p.read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < end and hi > start
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


def test_huge_pages_back_a_faiss_flat_index_without_changing_it():
    """FAISS's IndexFlat storage gets 4 KiB pages where huge pages are `madvise`-only; huge_pages()
    collapses it into 2 MiB pages (where the kernel can: Linux 6.1+, THP not `never`); the vectors
    and the search answers stay the same either way, and small arrays are left alone."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12_000, 384)).astype(np.float32)  # 18 MiB
    index = faiss.IndexFlatIP(384)
    index.add(x)
    q = x[:5] + 0.01
    before = index.search(q, 10)
    xb = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d)
    ok = huge_pages(xb)
    assert isinstance(ok, bool)
    addr = xb.ctypes.data
    start, end = -(-addr // HUGE_PAGE) * HUGE_PAGE, (addr + xb.nbytes) // HUGE_PAGE * HUGE_PAGE
    huge = _huge_kib_around(start, end)
    if ok and huge is not None:
        assert huge >= (end - start) // 1024  # every whole 2 MiB page inside the vectors is a huge page
    assert np.array_equal(xb.reshape(x.shape), x)
    after = index.search(q, 10)
    assert np.array_equal(before[1], after[1]) and np.array_equal(before[0], after[0])
    assert huge_pages(np.zeros(1000, np.float32)) is False  # under two huge pages: nothing to do
    trim_heap()  # glibc's malloc_trim, or nothing
