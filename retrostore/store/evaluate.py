"""``retrostore eval``: recall@k of the current index against exact search over
the stored vectors, and single-query latency.

Queries are a seeded sample of the store's own live vectors (the RETRO
workload: neighbours of stored chunks). Each query's own chunk is left out of
both result lists (leave-one-out), and recall is tie-aware: an approximate
result counts when its exact score is at least the k-th exact score (minus
1e-5), so duplicate chunks in the corpus do not count as misses.
"""

from __future__ import annotations

import time

import faiss
import numpy as np

from ..errors import InvalidInputError, check_int
from ..index.params import check_params
from ..index.source import live_ids
from ..index.training import sample_ids
from ..storage.faisstypes import METRICS
from .reading import Reader, check_k, check_output_size

__all__ = ["evaluate"]

_TIE_EPS = 1e-5


def evaluate(reader: Reader, *, queries: int = 1000, k: int = 10, params: dict | None = None,
             seed: int = 0, latency_queries: int | None = None) -> dict:
    """Measure the index against exact search: :meth:`retrostore.Store.evaluate` (its
    parameters, result and errors), with ``latency_queries``, the single-vector searches timed
    for p50/p99 (default: all ``queries``, at most 1000)."""
    k = check_k(k)
    queries = check_int("queries", queries, 1)
    params = check_params(params)
    version = reader.version
    m = version.manifest
    source = version.vector_source("eval")
    live = live_ids(version.n_chunks, version.tombstones)
    if len(live) < 2:
        raise InvalidInputError(f"the store holds {len(live)} live vectors; eval needs at least 2")
    if k > len(live) - 1:  # each query's own chunk is left out: len(live) - 1 neighbours exist
        raise InvalidInputError(
            f"k={k} is more than the {len(live) - 1:,} neighbours a query has in this store ({len(live):,} live "
            f"vectors, less the query's own); ask for k <= {len(live) - 1:,}")
    n_q = min(queries, len(live))
    check_output_size(f"eval's {n_q:,} x {k + 1:,} exact and approximate results", n_q * (k + 1) * 24,
                      "ask for fewer queries or a smaller k")
    q_ids = sample_ids(live, n_q, seed)
    Q = np.ascontiguousarray(source.take(q_ids), dtype=np.float32)
    kk = min(k + 1, len(live))
    ip = m["metric"] == "ip"

    # exact: blockwise brute force over every live stored vector
    heap = faiss.ResultHeap(len(Q), kk, keep_max=ip)
    for lo in range(0, len(live), 65536):
        ids = live[lo : lo + 65536]
        X = np.ascontiguousarray(source.take(ids), dtype=np.float32)
        D, I = faiss.knn(Q, X, min(kk, len(ids)), metric=METRICS[m["metric"]])
        heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(ids[I], dtype=np.int64))
    heap.finalize()
    exact_s, exact_i = _leave_one_out(heap.D, heap.I, q_ids, k)

    t0 = time.perf_counter()
    approx_s, approx_i = reader.search_vectors(Q, kk, params=params)
    batch_s = time.perf_counter() - t0
    _, approx_i = _leave_one_out(approx_s, approx_i, q_ids, k)

    # tie-aware recall: exact scores of the returned ids against the k-th exact score
    scores = _scores(source, Q, approx_i, ip)
    kth = exact_s[:, k - 1 : k]
    good = (scores >= kth - _TIE_EPS) if ip else (scores <= kth + _TIE_EPS)
    good &= approx_i >= 0
    n_true = np.minimum((exact_i >= 0).sum(1), k)
    recall = float(np.minimum(good.sum(1), n_true).sum() / max(n_true.sum(), 1))
    nn = exact_i[:, 0]
    nn_found = float(np.mean([(nn[r] < 0) or (nn[r] in approx_i[r]) for r in range(len(nn))]))

    n_lat = min(len(Q), latency_queries or 1000)
    times = []
    for r in range(n_lat):
        t = time.perf_counter()
        reader.search_vectors(Q[r : r + 1], k, params=params)
        times.append((time.perf_counter() - t) * 1e3)
    times_a = np.array(times)
    return {
        "queries": int(len(Q)), "k": k, "vectors": int(len(live)),
        "factory": m["index"]["factory"], "params": version.index.effective(params),
        "recall_at_k": round(recall, 4), "nn_in_top_k": round(nn_found, 4),
        "latency_ms": {"p50": round(float(np.percentile(times_a, 50)), 3),
                       "p99": round(float(np.percentile(times_a, 99)), 3),
                       "mean": round(float(times_a.mean()), 3)},
        "batch_qps": round(len(Q) / max(batch_s, 1e-9), 1),
    }


def _scores(source, Q: np.ndarray, ids: np.ndarray, ip: bool) -> np.ndarray:
    """Exact scores ``(n, k)`` of stored vectors ``ids`` (-1: any) against their row's query, read in
    blocks of ~16M floats (a large k over many queries would need ``n x k x dim`` at once)."""
    out = np.empty(ids.shape, np.float32)
    rows = max(1, (1 << 24) // max(1, ids.shape[1] * Q.shape[1]))
    for lo in range(0, len(ids), rows):
        block = ids[lo:lo + rows]
        vec = source.take(np.where(block >= 0, block, 0)).astype(np.float32, copy=False)  # (rows, k, dim)
        q = Q[lo:lo + rows]
        out[lo:lo + rows] = np.einsum("nkd,nd->nk", vec, q) if ip else ((vec - q[:, None, :]) ** 2).sum(-1)
    return out


def _leave_one_out(D: np.ndarray, I: np.ndarray, self_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop each row's own id, keep the first k (padded with -1)."""
    keep = I != self_ids[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")
    D2 = np.take_along_axis(D, order, 1)[:, :k]
    I2 = np.take_along_axis(I, order, 1)[:, :k].copy()
    I2[~np.take_along_axis(keep, order, 1)[:, :k]] = -1
    if I2.shape[1] < k:
        pad = k - I2.shape[1]
        I2 = np.pad(I2, ((0, 0), (0, pad)), constant_values=-1)
        D2 = np.pad(D2, ((0, 0), (0, pad)), constant_values=np.nan)
    return D2, I2
