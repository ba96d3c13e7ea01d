"""Searching one version: the k nearest live chunks over all its segments,
with per-query parameters, tombstones and exact re-ranking from raw vectors.

Search parameters (``nprobe``, ``efSearch``, ...) are set with
``faiss.ParameterSpace``, which reaches the inner IVF/HNSW index through
OPQ/PCA pre-transforms, ID maps and refine wrappers (:mod:`.params`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import weakref
from typing import Any, Callable

import faiss
import numpy as np

from ..storage.faisstypes import FLAT_TYPES, unwrap
from ..storage.memory import trim_heap
from ..storage.segments import FP16, Segment
from ..storage.tombstones import in_sorted
from ..threads import call_pool, cpu_count, in_call_pool, wait_all
from .merge import flat_fast_scan_run, is_fast_scan, merge_segments
from .params import REFINE_FACTORS, RERANK, RWLock, apply_params, current_params, effective_params
from .scan import inner_products

__all__ = ["SegmentSet", "ONE_THREAD_MAX_QUERIES", "BLAS_THRESHOLD", "share_quantizers"]

log = logging.getLogger("retrostore")

#: Searches of at most this many queries run FAISS on one OpenMP thread (batches use the store's
#: threads). On a shared machine a single query split over threads waits at OpenMP's barriers for
#: the slowest, descheduled one: an exact search of 51k vectors took 153 ms with 2 threads and 33 ms
#: with 1 under load (docs/benchmarks.md, "query"), and a single IVF query has one list scan per
#: probe to share out.
ONE_THREAD_MAX_QUERIES = 1

#: FAISS's exact search (``IndexFlat``, and every IVF coarse quantizer) takes BLAS's matrix product
#: only when queries x dim >= ``faiss.cvar.distance_compute_blas_threshold``; below it each query
#: scans every vector on its own. FAISS 1.15 ships 128,000 (333 queries of 384-d), which on a 2-core
#: machine made batches of 8-256 queries several times slower than the product: 56,400 x 384-d
#: vectors, 32 queries, 2.81 against 0.46 ms per query; a 2,048-centroid quantizer, 256 queries, 37
#: against 13 us (benchmarks/flat_batch.py, docs/benchmarks.md "flat-batch"). While a store searches
#: a batch of an inner-product index, the threshold is :data:`BLAS_THRESHOLD` (batches of >= 6
#: queries of 384-d, >= 3 of 768-d), when it finds FAISS's shipped value (a value the user set, or an
#: older FAISS's 20 that counted queries only, is left alone), and restored after. Inner product
#: only: the product computes L2 as |x|^2 + |y|^2 - 2xy, which loses precision on vectors of large
#: norm (helper-11: norms ~800, a batch's neighbours differed from single queries' in 38 of 64
#: rows), and a served L2 store's answers would depend on the requests batched with it. Cost: a
#: quantizer's batch of 8 queries, 0.04 -> 0.05 ms per query (from 16, 1.5-3x faster).
BLAS_THRESHOLD = 2304
_FAISS_BLAS_THRESHOLD = 128_000
_blas_lock = threading.Lock()
_blas_users = 0
_blas_restore: int | None = None


def _lower_blas_threshold() -> None:
    """Enter a batch search that wants :data:`BLAS_THRESHOLD` (nested and concurrent searches
    count: the first sets it, the last out restores FAISS's value)."""
    global _blas_users, _blas_restore
    with _blas_lock:
        if _blas_users == 0:
            now = faiss.cvar.distance_compute_blas_threshold
            _blas_restore = now if now == _FAISS_BLAS_THRESHOLD else None
            if _blas_restore is not None:
                faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
        _blas_users += 1


def _restore_blas_threshold() -> None:
    global _blas_users, _blas_restore
    with _blas_lock:
        _blas_users -= 1
        if _blas_users == 0 and _blas_restore is not None:
            faiss.cvar.distance_compute_blas_threshold = _blas_restore
            _blas_restore = None


#: Coarse quantizers shared between segments, by content (nlist, dim, digest of the centroids).
_SHARED_QUANTIZERS: dict[tuple, Any] = {}


def _one_thread(n_queries: int) -> int:
    """Put FAISS on one OpenMP thread for a search of few queries (:data:`ONE_THREAD_MAX_QUERIES`);
    the thread count to restore afterwards with ``faiss.omp_set_num_threads``, 0 for none.

    ``omp_set_num_threads`` sets the calling thread's OpenMP setting (GNU
    OpenMP keeps one per thread), so concurrent searches in other threads keep theirs.
    (Plain calls, not a context manager: a generation-time search runs on caches the
    model left cold, where each Python frame costs tens of microseconds.)
    """
    if n_queries > ONE_THREAD_MAX_QUERIES:
        return 0
    before = faiss.omp_get_max_threads()
    if before == 1:
        return 0
    faiss.omp_set_num_threads(1)
    return before


def _no_vectors(segments: list[Segment]) -> tuple[np.ndarray, np.ndarray]:
    raise RuntimeError("an in-memory merge of segments reads no raw vectors")


def share_quantizers(segments: list[Segment]) -> int:
    """Make IVF segments with identical flat coarse quantizers use one copy of it in RAM.

    Every segment cloned from a store's trained template carries its own copy of
    the template's centroids (``nlist * dim * 4`` bytes: 1.5 MiB for IVF1024 at
    384-d, 1.5 bytes per vector at 1M vectors for each segment). The copies are
    replaced by one shared index, kept alive by every segment that uses it
    (``referenced_objects``); the replaced copies are freed. Quantizers are
    compared by content, so segments of different trainings never share.
    Returns the bytes freed.
    """
    freed = 0
    shared_now = {int(r().this) for r in _SHARED_QUANTIZERS.values() if r() is not None}
    for seg in segments:
        try:
            ivf = faiss.extract_index_ivf(seg.index)
        except RuntimeError:
            continue
        q = faiss.downcast_index(ivf.quantizer)
        if type(q) not in FLAT_TYPES or q.ntotal == 0 or int(q.this) in shared_now:
            continue  # a segment of an earlier version already shares: no centroids to read and hash again
        centroids = q.reconstruct_n(0, q.ntotal)
        key = (int(ivf.nlist), int(q.d), int(q.metric_type), hashlib.sha1(centroids.tobytes()).hexdigest())
        ref = _SHARED_QUANTIZERS.get(key)
        shared = ref() if ref is not None else None
        if shared is None:
            shared = faiss.clone_index(q)
            for dead in [k for k, r in _SHARED_QUANTIZERS.items() if r() is None]:
                del _SHARED_QUANTIZERS[dead]
            _SHARED_QUANTIZERS[key] = weakref.ref(shared)
            shared_now.add(int(shared.this))
        if int(q.this) == int(shared.this):
            continue
        refs = list(getattr(seg.index, "referenced_objects", None) or [])
        seg.index.referenced_objects = refs + [shared]
        owned = bool(ivf.own_fields)
        ivf.own_fields = False
        ivf.quantizer = shared
        if owned:  # the old copy is no one's now: free it (its proxy never owned it)
            type(q).__swig_destroy__(q)
            freed += centroids.nbytes
        del q
    return freed

class SegmentSet:
    """The segments of one version, searched together.

    Parameters
    ----------
    segments : list of Segment
    metric : {"ip", "l2"}
        Scores are inner products (higher is nearer) or squared L2 distances
        (lower is nearer), as FAISS returns them.
    dim : int
    params : dict, optional
        The store's search parameters (set on every segment).
    deleted : ndarray of int64, optional
        Sorted chunk ids never to return (tombstones).
    raw : RawVectors, optional
        Raw vectors for the ``rerank`` parameter.
    make_empty : callable, optional
        Returns the store's trained empty index (a clone of its template). Given (a read-only
        handle), IVF fast-scan segments, or a run of flat fast-scan ones, are merged in memory
        into one index by the first search (:meth:`merge_segments`).
    on_merged : callable, optional
        ``on_merged(segment_set, sha256s)`` after the merged index replaced the segments of
        those checksums (the loader drops its references to them).
    lock : RWLock, optional
        The lock of every SegmentSet that shares these segments' FAISS objects: a handle's
        versions share the segments they have in common, so a search of the version before,
        with its own parameters, and the next version setting the store's on them must
        exclude each other (helper-43: a refresh during ``params={"nprobe": 64}`` searches
        made 5,637 of 12,800 rows inexact, and FAISS failed "Invalid key" when nprobe fell
        mid-search). Default: a lock of its own.
    """

    def __init__(self, segments: list[Segment], metric: str, dim: int, *, params: dict | None = None,
                 deleted: np.ndarray | None = None, raw: Any = None,
                 make_empty: Callable[[], faiss.Index] | None = None,
                 on_merged: Callable[["SegmentSet", list[str]], None] | None = None,
                 lock: RWLock | None = None):
        self.segments = segments
        self.metric = metric
        self.dim = dim
        self.params = dict(params or {})
        self.deleted = np.zeros(0, np.int64) if deleted is None else np.asarray(deleted, np.int64)
        self.raw = raw
        self._lock = lock if lock is not None else RWLock()
        with self._lock.exclusive():
            share_quantizers(segments)
            for seg in segments:
                apply_params(seg.index, self.params)
        # What searches ask of the segments, read once (a version's segments never change).
        inner = [unwrap(s.index) for s in segments]
        self._exact = all(type(x) in FLAT_TYPES or s.entry.get("codec") == FP16 for x, s in zip(inner, segments))
        self._graph = next((x for x in inner if isinstance(x, faiss.IndexHNSW)), None)  # the first HNSW
        # FAISS's HNSW search of a few queries runs on the calling thread (measured: CPU/wall 1.0 with
        # 2 OpenMP threads, FAISS 1.15): graphs skip the one-thread switch (three FAISS calls).
        self._all_graphs = bool(inner) and all(isinstance(x, faiss.IndexHNSW) for x in inner)
        mergeable = [s for s in segments if s.count]
        self._make_empty = make_empty
        self._on_merged = on_merged
        self._merge_pending = make_empty is not None and len(mergeable) >= 2 and (
            all(is_fast_scan(s.index) for s in mergeable) or flat_fast_scan_run(mergeable))

    # -- the in-memory merge of a read-only handle's segments ---------------------------------
    def merge_segments(self) -> None:
        """Merge the segments into one in-memory index, once; the first search calls it.

        A streamed store holds one IVF fast-scan segment per recent commit and one per merged
        tier; every probed list costs each segment a scan setup, so a query over 3 segments of
        a 1M-vector store took 2.0 ms in FAISS where one index of the same vectors took 1.1 ms
        (docs/index.md, "Segments"). The segments are clones of one trained template, so their
        lists concatenate in segment order (:func:`~retrostore.index.merge.merge_fast_scan`:
        0.3 s per 1M vectors); flat fast-scan segments (``PQ...x4fs`` without IVF) of
        consecutive ids concatenate their codes (FAISS's ``merge_from``, from copies: it empties
        its source, and a failed merge must leave the segments serving), so that each query
        keeps one candidate heap of ``k * rerank`` instead of one per segment. The segments are
        freed (while the merge runs the index is in memory about three times: segments, merged
        lists, their serialised copy). The
        merge runs inside the first search, under the exclusive lock, so that every answer of
        a handle comes from the same index: fast-scan codes tie often, and FAISS breaks ties at
        the candidate cut-off by scan order, which merging changes (answers otherwise differed
        in 137 of 1,406 queries depending on whether a background merge had finished). Any
        read-only handle of a version therefore searches the same lists in the same order (a
        follower's reused merged index plus its new segments concatenate to the same lists).
        Only read-only handles merge (a writer's commits and compactions need the segments as
        written); the files on disk never change.
        """
        if not self._merge_pending:
            return
        with self._lock.exclusive():
            if not self._merge_pending:
                return
            self._merge_pending = False
            try:
                shas = self._merge()
            except Exception as exc:  # the segments keep serving; the merge is an optimisation
                log.warning("merging the index segments in memory failed (%s: %s); searching them one by one",
                            type(exc).__name__, exc)
                return
        if self._on_merged is not None:
            self._on_merged(self, [sha for sha in shas if sha])
        trim_heap()

    def _merge(self) -> list:
        """Build the merged index and put it in place of the segments (caller holds the lock)."""
        segs = [s for s in self.segments if s.count]
        first = segs[0].first_id
        base = merge_segments(segs, self._make_empty, _no_vectors)  # lists or codes concatenate
        # A serialise / deserialise round trip sizes every list exactly: lists filled in memory
        # round their code buffers up to a power of two (FAISS's AlignedTable), 44 MiB
        # against 36 MiB read back, for 1M vectors of 24-byte codes.
        buf = faiss.serialize_index(base)
        del base
        trim_heap()
        base = faiss.deserialize_index(buf)
        del buf
        shas: list = []  # every segment replaced, in order (a merged one stands for its own)
        for s in self.segments:
            shas += s.entry.get("merged_from") or [s.entry.get("sha256")]
        entry = {"first_id": first, "count": int(base.ntotal), "end_id": max(s.end_id for s in self.segments),
                 "merged_from": shas}
        merged = Segment(entry, base)
        share_quantizers([merged])
        apply_params(base, self.params)
        self.segments = [merged]
        return shas

    @property
    def ntotal(self) -> int:
        return sum(s.index.ntotal for s in self.segments)

    @property
    def exact(self) -> bool:
        return self._exact

    def effective(self, params: dict | None = None) -> dict:
        """Parameter values a search with ``params`` would use (what ``inspect`` shows)."""
        eff = {**self.params, **(params or {})}
        out = effective_params(self.segments[0].index) if self.segments else {}
        if self.segments and params:
            with self._lock.exclusive():
                before = current_params(self.segments[0].index, params)
                apply_params(self.segments[0].index, eff)
                out = effective_params(self.segments[0].index)
                apply_params(self.segments[0].index, before)
        rerank = int(eff.get(RERANK, 0) or 0)
        out[RERANK] = rerank if rerank > 1 and self.raw is not None and not self.exact else 0
        return out

    @property
    def selectable(self) -> bool:
        """Whether :meth:`search` can leave chunk-id ranges out inside FAISS (``outside``): every
        segment an exact or IVF index (maybe behind an ID map). Not a graph: FAISS's filtered HNSW
        search keeps walking the left-out chunks around the query (retrieval._search_outside)."""
        return all(_selectable(seg.index) for seg in self.segments)

    def search(self, queries: np.ndarray, k: int, params: dict | None = None, *,
               outside: list[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k nearest live chunk ids of each query row.

        Parameters
        ----------
        queries : ndarray, shape (n, dim), float32, C-contiguous
        k : int, >= 1
        params : dict, optional
            Per-query search parameters, over the store's.
        outside : list of (int, int), optional
            Chunk-id ranges ``[lo, hi)`` no row may return (excluded documents' chunks), left
            out by FAISS while it searches (an ``IDSelectorNot`` in its per-call parameters), so
            that k admissible chunks come back from one search however many of the nearest are
            left out. Only when :attr:`selectable`.

        Returns
        -------
        scores : ndarray, shape (n, k), float32
        chunk_ids : ndarray, shape (n, k), int64
            -1 (with score -inf for "ip", +inf for "l2") where fewer than k
            results exist (or the probed IVF lists hold fewer than k).
        """
        if self._merge_pending:
            self.merge_segments()
        params = params or {}
        eff = {**self.params, **params}
        rerank = int(eff.get(RERANK, 0) or 0)
        rerank = rerank if rerank > 1 and self.raw is not None and not self.exact else 1
        kk = min(k * rerank, max(self.ntotal, 1)) if rerank > 1 else k
        ef = eff.get("efSearch") if self._graph is not None else None
        if self._graph is not None and int(self._graph.hnsw.efSearch if ef is None else ef) < kk:
            params = {**params, "efSearch": kk}  # a graph returns <= efSearch results (helper-43: efSearch=1, k=16)
            eff["efSearch"] = kk
        changes = {n: v for n, v in params.items() if n != RERANK and self.params.get(n) != v}
        # A stored refine factor was bounded for k = 1 at open: bound it for this search's k (helper-35:
        # k_factor_rf = 2**31 - 1 in index_params made the base search ask for k x ntotal results).
        changes.update({n: eff[n] for n in REFINE_FACTORS if n in eff and kk > 1})
        restore = 0 if self._all_graphs else _one_thread(len(queries))
        blas = self.metric == "ip" and BLAS_THRESHOLD <= len(queries) * self.dim < _FAISS_BLAS_THRESHOLD
        if blas:
            _lower_blas_threshold()
        try:
            if not changes:
                self._lock.acquire_shared()
                try:
                    D, I = self._search_live(queries, kk, outside)
                finally:
                    self._lock.release_shared()
            else:
                with self._lock.exclusive():
                    saved = [current_params(seg.index, changes) for seg in self.segments]
                    try:
                        for seg in self.segments:
                            apply_params(seg.index, eff, kk)
                        D, I = self._search_live(queries, kk, outside)
                    finally:
                        for seg, before in zip(self.segments, saved):
                            apply_params(seg.index, before)
            if rerank > 1:
                D, I = self._rerank(queries, I, k)
        finally:
            if restore:
                faiss.omp_set_num_threads(restore)
            if blas:
                _restore_blas_threshold()
        if D.shape[1] < k:
            D, I = _pad(D, I, k, self.metric == "ip")
        return D[:, :k], I[:, :k]

    def _search_all(self, queries: np.ndarray, k: int,
                    outside: list[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        n = queries.shape[0]
        keep_max = self.metric == "ip"
        # one segment: searched even when empty (FAISS answers -1 ids, cleaned below)
        segs = self.segments if len(self.segments) == 1 else [s for s in self.segments if s.index.ntotal]
        if not segs or n == 0:
            fill = -np.inf if keep_max else np.inf
            return np.full((n, k), fill, np.float32), np.full((n, k), -1, np.int64)
        if len(segs) == 1:
            D, I = _segment_search(segs[0].index, queries, k, keep_max, self._graph is not None,
                                   _local(outside, segs[0]))
            _offset(I, segs[0].first_id)
            return _clean(D, I, keep_max)
        heap = faiss.ResultHeap(n, k, keep_max=keep_max)
        for seg in segs:
            D, I = _segment_search(seg.index, queries, min(k, seg.index.ntotal), keep_max, self._graph is not None,
                                   _local(outside, seg))
            _offset(I, seg.first_id)
            heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64))
        heap.finalize()
        return _clean(heap.D, heap.I, keep_max)

    def _search_live(self, queries: np.ndarray, k: int,
                     outside: list[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_search_all` without tombstoned ids: fetch more candidates for rows that lose some."""
        if not len(self.deleted):
            return self._search_all(queries, k, outside)
        n, total = len(queries), max(self.ntotal, 1)
        keep_max = self.metric == "ip"
        out_d = np.full((n, k), -np.inf if keep_max else np.inf, np.float32)
        out_i = np.full((n, k), -1, np.int64)
        todo = np.arange(n)
        fetch = min(total, k + max(8, k))
        while len(todo):
            D, I = self._search_all(queries[todo], fetch, outside)
            missing = I < 0  # FAISS had no more (probed lists exhausted)
            dead = in_sorted(I, self.deleted) & ~missing
            I[dead] = -1
            valid = I >= 0
            done = (valid.sum(1) >= k) | missing.any(1) | (fetch >= total)
            order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
            Dk, Ik = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
            Dk[Ik < 0] = -np.inf if keep_max else np.inf
            out_d[todo[done], : Dk.shape[1]] = Dk[done]
            out_i[todo[done], : Ik.shape[1]] = Ik[done]
            todo = todo[~done]
            fetch = min(total, fetch * 2)
        return out_d, out_i

    def _rerank(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-score candidates exactly with the raw vectors; keep the best k (blocks of rows bound the memory)."""
        n, kk = ids.shape
        if n == 1:  # one FAISS search over the candidates' rows, a heap of k (the caller pads to k)
            d, i = self.raw.best(ids[0], queries[0], k, self.metric)
            return d[None, :], i[None, :]
        ip = self.metric == "ip"
        out_d = np.empty((n, min(k, kk)), np.float32)
        out_i = np.empty((n, min(k, kk)), np.int64)
        step = max(1, (1 << 22) // max(1, kk * self.dim))  # <= 16 MiB of float32 candidates per block
        for lo in range(0, n, step):
            I = ids[lo : lo + step]
            scores = self.raw.scores(I, queries[lo : lo + step], self.metric)
            scores[I < 0] = -np.inf if ip else np.inf
            order = np.argsort(-scores if ip else scores, axis=1, kind="stable")[:, :k]
            out_d[lo : lo + step] = np.take_along_axis(scores, order, 1)
            out_i[lo : lo + step] = np.take_along_axis(I, order, 1)
        return out_d, out_i


#: Exact inner-product batch searches of a Flat segment run on one OpenMP thread, never FAISS's
#: several (:func:`_split_flat_search`); from this much work (queries x vectors x dimensions,
#: multiply-adds: ~5 ms on one core) a search is split by database range over the caller's threads,
#: one part per 200,000,000. Measured (benchmarks/batch_threads.py, quiet): 56,400 vectors of 384-d,
#: 6-16 queries (<= 0.35 G) one thread 7.7-10.9 ms, split 8.3-11.2 (FAISS's 2 threads 15.2-16.7); 32
#: queries (0.69 G) split 1.14x faster than one thread, 64: 1.79x; 204,450 vectors, 6 queries (0.47
#: G): 1.84x.
SPLIT_FLAT_MIN_WORK = 200_000_000


def _side_by_side(tasks: list[Callable[[], Any]], merge: Callable[[list], Any]) -> Any:
    """``merge([task() for task in tasks])``, the tasks run side by side, each with FAISS on one
    OpenMP thread: the first on this thread, the others on the process's call pool (all on this
    thread when it is a pool thread: a pool task waiting for other tasks could wait for ever,
    helper-49; or when the pool is shut down at interpreter exit). Waits for every task before it
    returns or raises, even through a KeyboardInterrupt: they read the index, which the caller may
    free (helper-49: a segfault). This thread stays on one OpenMP thread until the merge is done,
    then gets its setting back: a region of its several threads leaves GNU OpenMP's worker
    spinning beside the next search's parts (56,400 vectors, 32 queries: 16.5 against 9.1 ms back
    to back)."""
    def on_one_thread(task: Callable[[], Any]) -> Any:
        faiss.omp_set_num_threads(1)  # a pool thread's own OpenMP setting
        return task()

    futures = []
    if len(tasks) > 1 and not in_call_pool():
        try:
            futures = [call_pool().submit(on_one_thread, t) for t in tasks[1:]]
        except RuntimeError:  # the pool is shut down
            futures = []
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        try:
            mine = [t() for t in (tasks[:1] if futures else tasks)]
        finally:
            wait_all(futures)
        return merge(mine + [f.result() for f in futures])
    finally:
        faiss.omp_set_num_threads(before)


def _split_flat_search(index: faiss.Index, queries: np.ndarray, k: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """An exact inner-product search of a batch on an ``IndexFlat``, its vectors cut into ``parts``
    ranges searched side by side, each by FAISS on one OpenMP thread (the call pool's threads and
    this one), the ranges' k best merged (``parts`` = 1: FAISS on this thread alone). FAISS's own
    threads share every database block of 1,024 vectors (a BLAS product, then an OpenMP loop over
    the queries): ~400 OpenMP barriers for 200,000 vectors, where on a shared machine a thread
    spins waiting for a descheduled one. With
    one CPU-bound process beside it on 2 cores, a batch of 8 over 204,450 vectors took 301 ms p50
    on FAISS's 2 threads against 28 ms split (28 ms on one thread), 128 queries 497 against 176
    ms; on the quiet machine split was 1.0-1.06x FAISS's threads from 16 queries on and 1.6-1.8x
    faster for 6-8, 0.77x at 56,400 x 32 (benchmarks/batch_threads.py, docs/benchmarks.md
    "batch-threads").
    Same results as ``index.search`` (ties aside)."""
    if parts == 1:  # too little work to share
        return _side_by_side([lambda: index.search(queries, k)], lambda r: r[0])
    n, d = int(index.ntotal), int(index.d)
    xb = faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)

    def search_range(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        D, I = faiss.knn(queries, xb[lo:hi], min(k, hi - lo), faiss.METRIC_INNER_PRODUCT)
        I[I >= 0] += lo
        return D, I

    def merge(results: list) -> tuple[np.ndarray, np.ndarray]:
        heap = faiss.ResultHeap(len(queries), k, keep_max=True)
        for D, I in results:
            heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64))
        heap.finalize()
        return heap.D, heap.I

    return _side_by_side([functools.partial(search_range, int(lo), int(hi)) for lo, hi in zip(bounds, bounds[1:])],
                         merge)


#: Fewest queries per part when a batch on a graph, an IVF index or an L2 Flat segment is split by
#: queries (:func:`_split_by_queries`): smaller batches run on one OpenMP thread.
SPLIT_MIN_QUERIES = 8


def _split_by_queries(search: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                      queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``search(queries)`` for a batch, without FAISS's OpenMP threads: on one thread, or, from
    ``2 * SPLIT_MIN_QUERIES`` queries, cut into one part per thread (at most the caller's OpenMP
    threads, at least :data:`SPLIT_MIN_QUERIES` queries each) searched side by side, each by FAISS on
    one thread (the call pool's threads and this one). FAISS's threads wait for each other at the
    end of every OpenMP region, spinning while a partner is descheduled: on an ``HNSW32,SQfp16``
    graph of 20,000 vectors beside a CPU-bound process, 8 queries took 13.0 ms p50 on 2 threads
    against 4.3 split (3.9 on one), 128 queries 44.2 against 37.5; quiet, split was 2.84x / 1.45x /
    1.06x faster at 8 / 16 / 32 queries and 0.85x at 128 (benchmarks/batch_threads.py). A single
    query keeps the caller's setting (:data:`ONE_THREAD_MAX_QUERIES` decides it)."""
    n = len(queries)
    if n < 2:
        return search(queries)
    parts = max(1, min(faiss.omp_get_max_threads(), cpu_count(), n // SPLIT_MIN_QUERIES))
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    return _side_by_side([functools.partial(search, queries[lo:hi]) for lo, hi in zip(bounds, bounds[1:])],
                         lambda r: r[0] if len(r) == 1 else (np.vstack([D for D, _ in r]),
                                                             np.vstack([I for _, I in r])))


def _segment_search(index: faiss.Index, queries: np.ndarray, k: int, keep_max: bool,
                    graph: bool = False, outside: list[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``index.search``, a batch without FAISS's OpenMP threads (:func:`_split_by_queries`, on an
    exact inner-product ``IndexFlat`` :func:`_split_flat_search`), except a single query on an exact
    inner-product ``IndexFlat``: one BLAS matrix-vector product over its float32 vectors (numpy's;
    threaded by BLAS), the exact search's floor. FAISS's own scan of one query runs on one thread (:data:`ONE_THREAD_MAX_QUERIES`):
    1.6x the BLAS product's time on a quiet 2-core machine (10.4 against 6.5 ms at 100k vectors of
    384-d, benchmarks/scale.py). A graph asked for more than its ``efSearch`` results (the
    tombstone filter's wider fetches) gets ``efSearch = k`` for this call only (FAISS's per-call
    ``SearchParametersHNSW``; the index is not changed): it returns at most ``efSearch``, and
    the missing ones read as "no more" (helper-43: k=100 of 300 live chunks, 2,700 deleted, came
    back with 63). ``outside``: the segment's own ids ``[lo, hi)`` to leave out (FAISS's ID
    selector, :func:`_selector_params`)."""
    def call_params():
        if outside:
            return _selector_params(index, outside)
        if isinstance(index, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(efSearch=int(k)) if k > index.hnsw.efSearch else None
        if graph and isinstance(index, (faiss.IndexPreTransform, faiss.IndexRefine)):  # (graph: the set holds one)
            # A graph behind a pre-transform or a refine wrapper too (review: PCA64,HNSW32,Flat gave 31 of
            # k=100 live chunks, HNSW32,Flat,RFlat 63, with 2,700 of 3,000 chunks deleted).
            return _graph_params(index, k)
        return None

    if call_params() is not None:
        # Each part of a split builds parameters of its own (microseconds): FAISS's IndexIDMap puts a
        # selector of its own into the parameters it is given for the length of a search (helper-50:
        # two parts of a compacted segment's search sharing one object crashed `retrostore neighbors`,
        # 4 runs in 10).
        return _split_by_queries(lambda x: index.search(x, k, params=call_params()), queries)
    if not keep_max or type(index) not in FLAT_TYPES or not index.ntotal:
        # (segments are read and built downcast: no downcast_index per search)
        return _split_by_queries(lambda x: index.search(x, k), queries)
    if len(queries) != 1:
        work = len(queries) * int(index.ntotal) * int(index.d)
        parts = min(faiss.omp_get_max_threads(), cpu_count(), work // SPLIT_FLAT_MIN_WORK)
        return _split_flat_search(index, queries, k, max(parts, 1))
    flat = index
    n = int(flat.ntotal)
    xb = faiss.rev_swig_ptr(flat.get_xb(), n * flat.d).reshape(n, flat.d)
    scores = inner_products(xb, queries[0])  # (numpy's OpenBLAS product waits on busy cores)
    kk = min(k, n)
    top = np.argpartition(-scores, kk - 1)[:kk] if kk < n else np.arange(n)
    top = top[np.lexsort((top, -scores[top]))]  # best first; equal scores by id
    D = np.full((1, k), -np.inf, np.float32)
    I = np.full((1, k), -1, np.int64)
    D[0, :kk], I[0, :kk] = scores[top], top
    return D, I


def _graph_params(index: faiss.Index, k: int):
    """Per-call search parameters giving the graph inside ``index`` (behind pre-transforms and refine
    wrappers) ``efSearch`` >= the results it is asked for; None when it has that already, or no graph."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=int(k)) if k > index.hnsw.efSearch else None
    if isinstance(index, faiss.IndexPreTransform):
        inner = _graph_params(index.index, k)
        if inner is None:
            return None
        params = faiss.SearchParametersPreTransform()
        params.index_params = inner
    elif isinstance(index, faiss.IndexRefine):
        inner = _graph_params(index.base_index, int(k * index.k_factor))  # the base is asked for k x k_factor
        if inner is None:
            return None
        params = faiss.IndexRefineSearchParameters()
        params.k_factor = index.k_factor
        params.base_index_params = inner
    else:
        return None
    params.referenced_objects = [inner]  # SWIG holds a bare pointer: keep the inner parameters alive
    return params


#: IVF index types (exact types, not their subclasses) whose search FAISS restricts with an ID selector.
#: Not every IndexIVF: FAISS 1.15 refuses one for additive quantizers ("IVF,RQ..", "LSQ", "PRQ", "PLSQ":
#: "id selector not supported"; their fast-scan forms refuse per-call parameters), spectral hashing
#: ("IVF,ITQ,SH..") and IndexIVFPQR ("IVF,PQ..+.."), and Store.neighbors raised FAISS's RuntimeError.
_SELECTOR_IVF_TYPES = tuple(getattr(faiss, name) for name in (
    "IndexIVFFlat", "IndexIVFFlatDedup", "IndexIVFScalarQuantizer", "IndexIVFPQ", "IndexIVFPQFastScan",
    "IndexIVFRaBitQ", "IndexIVFRaBitQFastScan") if hasattr(faiss, name))


def _selectable(index: faiss.Index) -> bool:
    """Whether FAISS can search ``index`` with an ID selector built by :func:`_selector_params`."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.downcast_index(index.index)
    return type(index) in FLAT_TYPES or type(index) in _SELECTOR_IVF_TYPES


def _selector_params(index: faiss.Index, outside: list[tuple[int, int]]) -> faiss.SearchParameters:
    """FAISS per-call search parameters that leave out the ids in the ranges ``outside`` and
    otherwise search as ``index`` is set now (per-call parameters replace the index's own:
    ``nprobe`` and ``max_codes`` of an IVF index). Only for :func:`_selectable` indexes; an ID
    map translates the selector to its own ids (FAISS)."""
    keep: list = [faiss.IDSelectorRange(int(lo), int(hi)) for lo, hi in outside]
    sel = keep[0]
    for other in keep[1:]:
        sel = faiss.IDSelectorOr(sel, other)
        keep.append(sel)
    sel = faiss.IDSelectorNot(sel)
    keep.append(sel)
    inner = faiss.downcast_index(index)
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=sel, nprobe=int(inner.nprobe), max_codes=int(inner.max_codes))
    else:
        params = faiss.SearchParameters(sel=sel)
    params.referenced_objects = keep  # SWIG holds bare pointers: keep the selectors alive
    return params


def _local(outside: list[tuple[int, int]] | None, seg: Segment) -> list[tuple[int, int]] | None:
    """The ranges of ``outside`` (chunk ids) that meet ``seg``, in its own ids (chunk id - first_id)."""
    if not outside:
        return None
    first, end = seg.first_id, seg.end_id
    out = [(max(lo, first) - first, min(hi, end) - first) for lo, hi in outside if lo < end and hi > first]
    return out or None


def _pad(D: np.ndarray, I: np.ndarray, k: int, keep_max: bool) -> tuple[np.ndarray, np.ndarray]:
    n = D.shape[0]
    d2 = np.full((n, k), -np.inf if keep_max else np.inf, np.float32)
    i2 = np.full((n, k), -1, np.int64)
    d2[:, : D.shape[1]], i2[:, : I.shape[1]] = D, I
    return d2, i2


def _offset(ids: np.ndarray, first_id: int) -> None:
    if first_id:
        np.add(ids, first_id, out=ids, where=ids >= 0)


def _clean(D: np.ndarray, I: np.ndarray, keep_max: bool) -> tuple[np.ndarray, np.ndarray]:
    D = np.ascontiguousarray(D, dtype=np.float32)
    I = np.ascontiguousarray(I, dtype=np.int64)
    missing = I < 0
    if missing.any():
        I[missing] = -1
        D[missing] = -np.inf if keep_max else np.inf
    return D, I
