"""Searching one version: the k nearest live chunks over all its segments,
with per-query parameters, tombstones and exact re-ranking from raw vectors.

Search parameters (``nprobe``, ``efSearch``, ...) are set with
``faiss.ParameterSpace``, which reaches the inner IVF/HNSW index through
OPQ/PCA pre-transforms, ID maps and refine wrappers (:mod:`.params`).
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from ..storage.faisstypes import FLAT_TYPES, unwrap
from ..storage.segments import FP16, Segment
from ..storage.tombstones import in_sorted
from .params import RERANK, RWLock, apply_params, current_params, effective_params

__all__ = ["SegmentSet"]

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
    """

    def __init__(self, segments: list[Segment], metric: str, dim: int, *, params: dict | None = None,
                 deleted: np.ndarray | None = None, raw: Any = None):
        self.segments = segments
        self.metric = metric
        self.dim = dim
        self.params = dict(params or {})
        self.deleted = np.zeros(0, np.int64) if deleted is None else np.asarray(deleted, np.int64)
        self.raw = raw
        self._lock = RWLock()
        for seg in segments:
            apply_params(seg.index, self.params)

    @property
    def ntotal(self) -> int:
        return sum(s.index.ntotal for s in self.segments)

    @property
    def exact(self) -> bool:
        return all(type(unwrap(s.index)) in FLAT_TYPES or s.entry.get("codec") == FP16 for s in self.segments)

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

    def search(self, queries: np.ndarray, k: int, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k nearest live chunk ids of each query row.

        Parameters
        ----------
        queries : ndarray, shape (n, dim), float32, C-contiguous
        k : int, >= 1
        params : dict, optional
            Per-query search parameters, over the store's.

        Returns
        -------
        scores : ndarray, shape (n, k), float32
        chunk_ids : ndarray, shape (n, k), int64
            -1 (with score -inf for "ip", +inf for "l2") where fewer than k
            results exist (or the probed IVF lists hold fewer than k).
        """
        params = params or {}
        eff = {**self.params, **params}
        rerank = int(eff.get(RERANK, 0) or 0)
        rerank = rerank if rerank > 1 and self.raw is not None and not self.exact else 1
        kk = min(k * rerank, max(self.ntotal, 1)) if rerank > 1 else k
        changes = {n: v for n, v in params.items() if n != RERANK and self.params.get(n) != v}
        if not changes:
            with self._lock.shared():
                D, I = self._search_live(queries, kk)
        else:
            with self._lock.exclusive():
                saved = [current_params(seg.index, changes) for seg in self.segments]
                try:
                    for seg in self.segments:
                        apply_params(seg.index, eff)
                    D, I = self._search_live(queries, kk)
                finally:
                    for seg, before in zip(self.segments, saved):
                        apply_params(seg.index, before)
        if rerank > 1:
            D, I = self._rerank(queries, I, k)
        if D.shape[1] < k:
            D, I = _pad(D, I, k, self.metric == "ip")
        return D[:, :k], I[:, :k]

    def _search_all(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = queries.shape[0]
        keep_max = self.metric == "ip"
        segs = [s for s in self.segments if s.index.ntotal]
        if not segs or n == 0:
            fill = -np.inf if keep_max else np.inf
            return np.full((n, k), fill, np.float32), np.full((n, k), -1, np.int64)
        if len(segs) == 1:
            D, I = segs[0].index.search(queries, k)
            _offset(I, segs[0].first_id)
            return _clean(D, I, keep_max)
        heap = faiss.ResultHeap(n, k, keep_max=keep_max)
        for seg in segs:
            D, I = seg.index.search(queries, min(k, seg.index.ntotal))
            _offset(I, seg.first_id)
            heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64))
        heap.finalize()
        return _clean(heap.D, heap.I, keep_max)

    def _search_live(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_search_all` without tombstoned ids: fetch more candidates for rows that lose some."""
        if not len(self.deleted):
            return self._search_all(queries, k)
        n, total = len(queries), max(self.ntotal, 1)
        keep_max = self.metric == "ip"
        out_d = np.full((n, k), -np.inf if keep_max else np.inf, np.float32)
        out_i = np.full((n, k), -1, np.int64)
        todo = np.arange(n)
        fetch = min(total, k + max(8, k))
        while len(todo):
            D, I = self._search_all(queries[todo], fetch)
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
        out_d = np.empty((n, min(k, kk)), np.float32)
        out_i = np.empty((n, min(k, kk)), np.int64)
        step = max(1, (1 << 22) // max(1, kk * self.dim))  # <= 16 MiB of float32 candidates per block
        for lo in range(0, n, step):
            I = ids[lo : lo + step]
            q = queries[lo : lo + step]
            vecs = self.raw.take(I)  # (rows, kk, dim)
            if self.metric == "ip":
                scores = np.einsum("nkd,nd->nk", vecs, q)
                scores[I < 0] = -np.inf
                order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            else:
                scores = ((vecs - q[:, None, :]) ** 2).sum(-1)
                scores[I < 0] = np.inf
                order = np.argsort(scores, axis=1, kind="stable")[:, :k]
            out_d[lo : lo + step] = np.take_along_axis(scores, order, 1)
            out_i[lo : lo + step] = np.take_along_axis(I, order, 1)
        return out_d, out_i


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
