"""Encoding a batch's vectors on a second thread while ``append`` stages its records.

Once a store's IVF index is trained, a commit's index work for its batch is
encoding: assigning each vector to its list and computing its codes (FAISS,
which releases the GIL). ``append`` meanwhile works in Python on one core
(checking and packing records, writing them to LMDB). :class:`BatchEncoder`
adds each appended part to a clone of the trained template on its own thread
as soon as the part is staged, so the two overlap and the commit finds the
batch's segment built (issue 17: streaming 100,000-chunk commits into a 1M
store, the store's ingest over raw FAISS's). The segment is what the commit
would build itself: IVF assignment and codes are computed per vector, and
the lists keep the order the vectors were added in, which is the batch's.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import faiss
import numpy as np

from ..storage.faisstypes import is_ivf

__all__ = ["BatchEncoder"]

log = logging.getLogger("retrostore")

_BLOCK = 65536  # vectors per FAISS add call, as build_segment


def _add(index: faiss.Index, vectors: np.ndarray) -> None:
    for lo in range(0, len(vectors), _BLOCK):
        index.add(np.ascontiguousarray(vectors[lo:lo + _BLOCK], dtype=np.float32))


class BatchEncoder:
    """The batch's segment of a trained IVF store, encoded part by part on a thread.

    Parameters
    ----------
    template : faiss.Index
        The store's trained empty IVF index (``Head.template``).
    key : str
        The template's checksum (its manifest entry's ``sha256``): the commit
        adopts the segment only under the same template.
    """

    def __init__(self, template: faiss.Index, key: str) -> None:
        self.key = key
        self.count = 0
        self._index = faiss.clone_index(template)
        self._jobs: list[Future] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="retrostore-encode")

    @classmethod
    def for_store(cls, template: faiss.Index | None, index_entry: dict) -> "BatchEncoder | None":
        """An encoder when the store's batches are encoded by a trained IVF template, else None."""
        entry = index_entry.get("template")
        if template is None or not entry or not is_ivf(template):
            return None
        return cls(template, entry["sha256"])

    def add(self, vectors: np.ndarray) -> None:
        """Queue one appended part, ``(n, dim)`` float32 (not modified afterwards: ``append`` copies)."""
        self._jobs.append(self._pool.submit(_add, self._index, vectors))
        self.count += len(vectors)

    def result(self, key: str | None, count: int) -> faiss.Index | None:
        """The segment holding the ``count`` vectors added, waiting for the thread; None when the
        template is no longer ``key``, a part failed to encode (logged; the commit then encodes
        the batch itself) or the index does not hold exactly them (a safeguard: tier merges copy
        their sources, so a failed commit leaves the index whole for its retry)."""
        ok = True
        for job in self._jobs:
            try:
                job.result()
            except Exception as exc:
                log.warning("encoding an appended part failed (%s: %s); the commit encodes the batch",
                            type(exc).__name__, exc)
                ok = False
        if not ok or key != self.key or count != self.count or self._index.ntotal != count:
            return None
        return self._index

    def close(self) -> None:
        """Stop the thread (parts not started are dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
