"""One query's exact scan (retrostore.index.scan): the same scores whichever thread computes a
piece, and the caller never waits for a pool thread that does not run."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import retrostore
from retrostore.index import scan


def _reference(xb, q):
    out = np.empty(len(xb), np.float32)
    scan._kernel(out, q, xb)
    return out


@pytest.mark.parametrize("n", [1, 100, scan.SPLIT_MIN_ROWS - 1, scan.SPLIT_MIN_ROWS, 3 * scan.PIECE_ROWS * 5 + 17])
def test_scores_equal_the_one_thread_kernel(n):
    rng = np.random.default_rng(n)
    xb = rng.standard_normal((n, 384), dtype=np.float32)
    q = rng.standard_normal(384, dtype=np.float32)
    want = _reference(xb, q)
    for _ in range(20):
        assert np.array_equal(scan.inner_products(xb, q), want)
    np.testing.assert_allclose(want, xb @ q, rtol=1e-4, atol=1e-3)


def test_the_caller_never_waits_for_a_stalled_pool_thread(monkeypatch):
    """A pool thread that does not get a core (here: sleeps 1 s in each piece) is taken over: the
    call returns in about one thread's time with the same scores, and the late piece is dropped."""
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((8 * scan.PIECE_ROWS, 384), dtype=np.float32)
    q = rng.standard_normal(384, dtype=np.float32)
    want = _reference(xb, q)
    caller = threading.get_ident()
    real = scan._kernel

    def stalled(out, q_, x):
        if threading.get_ident() != caller:
            time.sleep(1.0)
            out[:] = -1.0  # what a late piece would write if it were kept
        real(out, q_, x)

    monkeypatch.setattr(scan, "_kernel", stalled)
    t0 = time.perf_counter()
    got = scan.inner_products(xb, q)
    assert time.perf_counter() - t0 < 0.8
    assert np.array_equal(got, want)
    time.sleep(1.3)  # the pool thread has finished its piece by now: it must not have written it
    assert np.array_equal(got, want)


def test_an_exact_store_answers_single_queries_with_the_scan(tmp_path):
    """A Flat store above the split size: single-query searches (the scan) give numpy's exact top-k
    and the scores of a batch search of the same queries (FAISS's own scan)."""
    n = scan.SPLIT_MIN_ROWS + 3000
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, 384), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with retrostore.create(tmp_path / "s", index="Flat", vector_dtype="float32") as st:
        st.append([f"chunk {i}" for i in range(n)], embeddings=x)
        st.commit()
        queries = rng.standard_normal((12, 384), dtype=np.float32)
        batch_d, batch_i = st.search_vectors(queries, k=10)
        for j, q in enumerate(queries):
            d, i = st.search_vectors(q[None, :], k=10)
            exact = np.argsort(-(x @ q), kind="stable")[:10]
            assert list(i[0]) == list(exact) == list(batch_i[j])
            np.testing.assert_allclose(d[0], batch_d[j], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_single_query_rerank_keeps_the_scores_and_order_of_scoring_all(tmp_path, dtype, metric):
    """RawVectors.best (one FAISS search over the candidates' rows, a heap of k) against scoring every
    candidate and sorting, over three vectors files, with -1 and ids beyond the files among them."""
    rng = np.random.default_rng(3)
    with retrostore.create(tmp_path / "s", index="PQ16x4fs", vector_dtype=dtype, metric=metric) as st:
        for c in range(3):
            x = rng.standard_normal((700, 384), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            st.append([f"chunk {c} {i}" for i in range(700)], embeddings=x)
            st.commit()
        raw = st._head.version.index.raw
        assert len(raw.entries) == 3
        for trial in range(30):
            ids = rng.choice(2100, 60, replace=False).astype(np.int64)
            ids[rng.integers(0, 60, 5)] = -1
            ids[0] = 5000  # beyond the files
            q = rng.standard_normal(384, dtype=np.float32)
            k = int(rng.integers(1, 80))
            d, i = raw.best(ids, q, k, metric)
            s = raw.scores(ids[None, :], q[None, :], metric)[0]
            ok = ~np.isnan(s) & (ids >= 0)
            order = np.lexsort((ids[ok], -s[ok] if metric == "ip" else s[ok]))[:k]
            assert list(i) == list(ids[ok][order])
            np.testing.assert_array_equal(d, s[ok][order])
