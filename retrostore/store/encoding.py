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
the lists keep the order the vectors were added in, which is the batch's. The
same holds for a flat fast-scan template (``PQ...x4fs`` without IVF, the
16-byte-per-vector recipe of docs/index.md): codes per vector, stored in order.
Graphs are not encoded this way (FAISS inserts a batch into an HNSW graph in
another order than part by part).

The thread encodes a part in pieces of :data:`PIECE_ROWS` rows, on one FAISS
(OpenMP) thread while ``append`` still works, and on ``Store.threads`` (whichever
thread appends) once the commit waits for the segment. Two
OpenMP threads beside ``append``'s busy core shared that core with it: each
parallel loop waited for its slower half, and the ingest of 100,000-chunk
batches took 0.95 s a batch against raw FAISS's 0.70 (2026-12-07, 2 cores).
Pieces added in order give the segment one call would (the same bytes:
FAISS adds vector by vector to the end of each list, whatever its thread count).

FAISS's Python build takes the GIL every 4,096 rows of a search to check for
Ctrl-C (``PythonInterruptCallback``), so the encoder's coarse assignment waits
for ``append``'s Python loop to hand the GIL over, up to
``sys.getswitchinterval()`` (5 ms) each time: a quarter of the two cores sat
idle while a 100,000-chunk batch was staged. ``append`` therefore lets the
encoder run (:meth:`BatchEncoder.let_run`) every :data:`YIELD_CHUNKS` chunks
it packs: idle ticks during ``append`` 21 -> 12 of 80, the commit's CPU
ticks 95 -> 78, store ingest of 1M chunks in 100,000-chunk batches 12.5 -> 11.6 s
(means of 3 runs, each beside a raw FAISS run; 2026-12-07, 2-core AMD EPYC).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import faiss
import numpy as np

from ..index.merge import add_vectors, is_flat_fast_scan
from ..storage.faisstypes import is_ivf

__all__ = ["BatchEncoder", "PIECE_ROWS", "YIELD_CHUNKS"]

#: Rows the encoding thread adds per FAISS call: at most one piece (~0.15 s on one
#: thread for a 384-dim ``IVF1024,PQ48x4fs``) runs single-threaded after the commit
#: starts waiting.
PIECE_ROWS = 16384

#: Chunks ``append`` packs between two :meth:`BatchEncoder.let_run` calls (~0.4 ms of its Python work).
YIELD_CHUNKS = 256

log = logging.getLogger("retrostore")


class BatchEncoder:
    """The batch's segment of a trained IVF (or flat fast-scan) store, encoded part by part on a thread.

    Parameters
    ----------
    template : faiss.Index
        The store's trained empty IVF index (``Head.template``). It cannot change
        while a batch is staged: training happens in commits, and ``reindex`` and
        ``compact`` refuse a writer with staged appends.
    threads : int
        FAISS threads once the commit waits (``Store.threads``; 1 in a forked child).
    """

    def __init__(self, template: faiss.Index, threads: int = 1) -> None:
        self._index = faiss.clone_index(template)
        self._jobs: list[Future] = []
        self._threads = max(1, int(threads))
        self._waiting = False  # set by result(): the caller no longer needs its core
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="retrostore-encode")

    @classmethod
    def for_store(cls, template: faiss.Index | None, threads: int = 1) -> "BatchEncoder | None":
        """An encoder when the store's batches are encoded by a trained IVF or flat fast-scan
        template, else None."""
        if template is None or not (is_ivf(template) or is_flat_fast_scan(template)):
            return None
        return cls(template, threads)

    def add(self, vectors: np.ndarray) -> None:
        """Queue one appended part, ``(n, dim)`` float32 (not modified afterwards: ``append`` copies)."""
        for lo in range(0, len(vectors), PIECE_ROWS):
            self._jobs.append(self._pool.submit(self._add_piece, vectors[lo : lo + PIECE_ROWS]))

    def let_run(self) -> None:
        """Hand the GIL to the encoder's thread if it waits for it (a caller's Python loop holds it
        up to ``sys.getswitchinterval()`` otherwise): a zero sleep, when pieces are still queued or running."""
        if self._jobs and not self._jobs[-1].done():
            time.sleep(0)

    def _add_piece(self, piece: np.ndarray) -> None:
        # omp_set_num_threads sets this thread's own OpenMP setting (GNU OpenMP keeps one per thread)
        faiss.omp_set_num_threads(self._threads if self._waiting else 1)
        add_vectors(self._index, piece)

    def result(self) -> faiss.Index | None:
        """The segment holding the parts added, waiting for the thread; None when a part failed
        to encode (logged; the commit then encodes the batch itself, as it does when the segment
        does not hold exactly the batch: a part that was not staged). Pieces that start
        meanwhile run on the store's ``threads``; after it (a failed commit keeps the batch
        staged, and ``append`` may go on) on one again."""
        self._waiting = True
        try:
            return self._wait_all()
        finally:
            self._waiting = False

    def _wait_all(self) -> faiss.Index | None:
        ok = True
        for job in self._jobs:
            try:
                job.result()
            except Exception as exc:
                log.warning("encoding an appended part failed (%s: %s); the commit encodes the batch",
                            type(exc).__name__, exc)
                ok = False
        return self._index if ok else None

    def close(self) -> None:
        """Stop the thread (parts not started are dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
