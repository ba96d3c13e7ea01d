"""Neighbours outside excluded documents when a query's whole neighbourhood is one excluded
document (a book's own chunks): the index leaves the document's chunks out while it searches
(FAISS's ID selector), instead of fetching ever more candidates (search_excluding)."""

from __future__ import annotations

import numpy as np
import pytest

import retrostore
from retrostore.store import retrieval

DIM = 384


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _store(tmp_path, embedder, index, *, commits=1, params=None):
    """One big document (259 chunks around one point) and 300 one-chunk documents around another:
    every nearest neighbour of the big document's chunks is one of its own, and an IVF index's
    lists near them hold nothing else."""
    st = retrostore.create(tmp_path / "x.rstore", embedder=embedder, index=index, index_params=params)
    rng = np.random.default_rng(0)
    centre = rng.standard_normal(DIM).astype(np.float32)
    text = " ".join(f"w{i}" for i in range(5000))
    n_big = len(st.chunker.chunk(text))
    big = _unit(centre + 0.3 * rng.standard_normal((n_big, DIM)).astype(np.float32))
    other = rng.standard_normal(DIM).astype(np.float32)  # the small ones around another point
    small = _unit(other + 0.3 * rng.standard_normal((300, DIM)).astype(np.float32))
    st.append([text], embeddings=big)
    for part in np.array_split(np.arange(300), commits):
        st.append([f"small {i}" for i in part], embeddings=small[part])
        st.commit()
    if commits == 1:
        st.commit()
    return st, big, small, n_big


def _calls(reader, monkeypatch):
    calls = []
    orig = reader.candidates

    def counted(q, fetch, params=None, **kw):
        calls.append((len(q), int(fetch), kw.get("outside")))
        return orig(q, fetch, params, **kw)

    monkeypatch.setattr(reader, "candidates", counted)
    return calls


@pytest.mark.parametrize("index", ["Flat", "IVF8,Flat"])
def test_a_documents_own_chunks_excluded_in_few_searches(tmp_path, embedder, monkeypatch, index):
    """The 4,512-chunk Shakespeare document excluded for its own chunks took 10 index calls and 19.9 ms
    per chunk on an exact index (candidates doubled up to 8,192 per row); now 2, and the answer is
    the exact one."""
    st, big, small, n_big = _store(tmp_path, embedder, index, params={"nprobe": 8} if "IVF" in index else None)
    reader = st._reader
    assert reader.can_leave_out()
    calls = _calls(reader, monkeypatch)
    k = 3
    s, ids = retrieval.search_excluding(reader, big[:40], k, [{0}] * 40, reader.doc_ids_of)
    assert (ids >= 0).all() and (reader.doc_ids_of(ids) != 0).all()
    assert len(calls) == 2 and max(f for _, f, _ in calls) <= 2 * k + 8, calls  # no widening past the first fetch
    assert calls[1][2] == [(0, n_big)]  # the document's chunk ids, left out inside the index
    exact = big[:40] @ small.T  # the small documents hold chunk ids n_big .. n_big + 299
    want = np.argsort(-exact, axis=1, kind="stable")[:, :k] + n_big
    assert (np.sort(ids, 1) == np.sort(want, 1)).all()
    assert np.allclose(s, np.take_along_axis(exact, ids - n_big, 1), atol=1e-4)
    st.close()


def test_ivf_probes_more_lists_when_the_excluded_document_fills_them(tmp_path, embedder, monkeypatch):
    """IVF at nprobe 1: the lists probed around the big document's chunks hold little else, so
    widening the candidates left slots empty (-1); the selector search probes more lists."""
    st, big, small, n_big = _store(tmp_path, embedder, "IVF8,Flat", params={"nprobe": 1})
    reader = st._reader
    s, ids = retrieval.search_excluding(reader, big, 3, [{0}] * n_big, reader.doc_ids_of)
    assert (ids >= 0).all() and (reader.doc_ids_of(ids) != 0).all()
    monkeypatch.setattr(reader, "can_leave_out", lambda: False)  # the former path: more candidates
    monkeypatch.setattr(retrieval, "EXACT_OUTSIDE_MAX", 0)  # from the same lists
    _, before = retrieval.search_excluding(reader, big, 3, [{0}] * n_big, reader.doc_ids_of)
    assert (before < 0).any(1).mean() > 0.5
    st.close()


def test_a_graph_scans_the_stored_vectors_instead(tmp_path, embedder, monkeypatch):
    """HNSW: FAISS's filtered graph search keeps to the left-out chunks around the query (recall@2 of
    4% on a real 4,512-chunk document), and widening a graph's candidates costs up to the document's
    size per row (138.6 s for that store's precompute_neighbors): a store of at most
    EXACT_OUTSIDE_MAX chunks answers those rows by an exact scan of its stored vectors, deleted
    chunks left out too."""
    st, big, small, n_big = _store(tmp_path, embedder, "HNSW32,SQfp16")
    st.delete([3])  # a small document near the big one's chunks
    st.commit()
    reader = st._reader
    assert not reader.can_leave_out()
    calls = _calls(reader, monkeypatch)
    k = 3
    s, ids = retrieval.search_excluding(reader, big[:40], k, [{0}] * 40, reader.doc_ids_of)
    assert len(calls) == 1, calls  # the first candidates only
    stored = reader.version.stored_vectors(0, reader.limit)
    exact = big[:40] @ stored.T
    exact[:, :n_big] = -np.inf
    exact[:, reader.doc_ids_of(np.arange(reader.limit)) == 3] = -np.inf
    want = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    assert (ids == want).all()
    assert np.allclose(s, np.take_along_axis(exact, want, 1), atol=1e-4)
    monkeypatch.setattr(retrieval, "EXACT_OUTSIDE_MAX", 10)  # a larger graph: widened as before
    calls.clear()
    _, wide = retrieval.search_excluding(reader, big[:40], k, [{0}] * 40, reader.doc_ids_of)
    assert len(calls) > 2 and (wide >= 0).all() and (reader.doc_ids_of(wide) != 0).all()
    assert not np.isin(reader.doc_ids_of(wide), [0, 3]).any()
    st.close()


def test_exclusion_over_segments_and_deletes_matches_widening(tmp_path, embedder, monkeypatch):
    """Several segments (commits), a deleted small document and a row excluding two documents:
    the selector search answers what widening the candidates answers (exact index)."""
    st, big, small, n_big = _store(tmp_path, embedder, "Flat", commits=3)
    st.delete([5])
    st.commit()
    reader = st._reader
    queries = np.concatenate([big[:10], small[:3]])
    excluded = [{0}] * 10 + [{0, 2}, {0}, set()]
    got_s, got_i = retrieval.search_excluding(reader, queries, 4, excluded, reader.doc_ids_of)
    monkeypatch.setattr(reader, "can_leave_out", lambda: False)  # the former path: candidates doubled
    monkeypatch.setattr(retrieval, "EXACT_OUTSIDE_MAX", 0)
    old_s, old_i = retrieval.search_excluding(reader, queries, 4, excluded, reader.doc_ids_of)
    assert (got_i == old_i).all() and np.allclose(got_s, old_s)
    docs = reader.doc_ids_of(got_i)
    assert not np.isin(docs, [5]).any()  # deleted
    assert all(not (set(d.tolist()) & e) for d, e in zip(docs, excluded))
    st.close()


def test_precompute_neighbors_of_a_big_document(tmp_path, embedder, monkeypatch):
    """precompute_neighbors(exclude_same_doc=True), the path of a RETRO training set (its candidates):
    no chunk of the big document gets one of its own, every slot is filled, in a few index calls."""
    st, big, small, n_big = _store(tmp_path, embedder, "IVF8,Flat", params={"nprobe": 2})
    calls = _calls(st._reader, monkeypatch)
    out = tmp_path / "knn.npy"
    st.precompute_neighbors(out, k=2, exclude_same_doc=True, progress=False)
    knn = np.load(out)
    assert knn.shape == (n_big + 300, 2) and (knn >= 0).all()
    docs = st._reader.doc_ids_of(knn)
    own = st._reader.doc_ids_of(np.arange(n_big + 300))
    assert (docs != own[:, None]).all()
    assert max(f for _, f, _ in calls) <= 2 + 8, calls  # no candidates widening
    st.close()


def test_ivf_probes_until_the_first_searchs_width_is_found(tmp_path, embedder):
    """IVF: the excluded document fills the lists near its chunks, and the first lists probed that
    hold k admissible chunks can be far from the query: stopping there gave recall@1 0.27 here
    (recall@2 0.05 for tinyshakespeare's own chunks in IVF64,PQ48x4fs at nprobe 16). Probing on until
    the first search's width (k + max(8, k)) comes back finds the nearest."""
    st = retrostore.create(tmp_path / "x.rstore", embedder=embedder, index="IVF16,Flat", index_params={"nprobe": 1})
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, DIM)).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((DIM, 32)))[0].T.astype(np.float32) * np.sqrt(DIM)
    text = " ".join(f"w{i}" for i in range(20000))
    n_big = len(st.chunker.chunk(text))
    big = _unit(a + 0.5 * rng.standard_normal((n_big, 32)).astype(np.float32) @ basis)
    near = _unit(a + 0.5 * rng.standard_normal((10, 32)).astype(np.float32) @ basis)  # among the big one's
    far = _unit(b + 0.3 * rng.standard_normal((290, DIM)).astype(np.float32))
    st.append([text], embeddings=big)
    st.append([f"small {i}" for i in range(300)], embeddings=np.concatenate([near, far]))
    st.commit()
    reader = st._reader
    assert reader.can_leave_out() and reader.version.index.effective()["nlist"] == 16
    stored = reader.version.stored_vectors(0, reader.limit)
    exact = big @ stored[n_big:].T
    for k in (1, 2):
        _, ids = retrieval.search_excluding(reader, big, k, [{0}] * n_big, reader.doc_ids_of)
        assert (ids >= n_big).all()
        want = np.argsort(-exact, axis=1, kind="stable")[:, :k] + n_big
        recall = np.mean([len(set(g) & set(w)) / k for g, w in zip(ids.tolist(), want.tolist())])
        assert recall > 0.9, (k, recall)
    st.close()


@pytest.mark.parametrize("index", ["IVF8,RQ2x4", "IVF8,RQ2x4fs"])
def test_ivf_indexes_faiss_cannot_filter_widen_instead(tmp_path, embedder, index):
    """IVF indexes whose search FAISS cannot restrict with an ID selector (additive quantizers and
    their fast-scan forms; also spectral hashing and IVFPQR) are not searched with one: Store.neighbors raised FAISS's
    RuntimeError ("id selector not supported for this index") for a row excluding its own document."""
    st, big, small, n_big = _store(tmp_path, embedder, index, params={"nprobe": 8})
    reader = st._reader
    assert not reader.can_leave_out()
    _, ids = retrieval.search_excluding(reader, big[:20], 3, [{0}] * 20, reader.doc_ids_of)
    assert (ids >= 0).all() and (reader.doc_ids_of(ids) != 0).all()
    st.close()


def test_excluding_every_document_but_one_is_two_ranges(tmp_path, embedder):
    """Documents next to each other are left out as one chunk-id range: a row excluding all 301
    documents but one was 300 ranges, past MAX_LEFT_OUT_RANGES, so it widened its candidates, and on
    IVF (nprobe 1) found nothing outside the probed lists: its slot stayed empty."""
    st, big, small, n_big = _store(tmp_path, embedder, "IVF8,Flat", params={"nprobe": 1})
    reader = st._reader
    keep = 150  # a small document: chunk n_big + 149
    excluded = set(range(301)) - {keep}
    assert reader.doc_ranges(np.array(sorted(excluded))) == [(0, n_big + 149), (n_big + 150, n_big + 300)]
    _, ids = retrieval.search_excluding(reader, big[:10], 2, [excluded] * 10, reader.doc_ids_of)
    assert (ids[:, 0] == n_big + 149).all() and (ids[:, 1] == -1).all()
    st.close()


@pytest.mark.parametrize("index", ["IVF8,Flat", "HNSW32"])
def test_a_purge_in_the_middle_keeps_the_documents_left_out(tmp_path, embedder, index):
    """compact purges a deleted document's records, so its chunks read as document -1 between the
    others: the store no longer looked "in document order" and every row widened as before (IVF at
    nprobe 1: empty slots). The purged chunks count with the document before them (they are
    tombstoned, never returned)."""
    st, big, small, n_big = _store(tmp_path, embedder, index, params={"nprobe": 1} if "IVF" in index else None,
                                   commits=3)
    st.delete([5, 200])
    st.commit()
    st.compact(progress=False)
    reader = st._reader
    docs = reader.all_doc_ids()
    assert (docs == -1).sum() == 2 and reader.documents_in_order()
    assert reader.can_leave_out() == ("IVF" in index)
    assert reader.doc_ranges(np.array([4, 6])) == [(n_big + 3, n_big + 6)]  # 4, purged 5, 6: one range
    k = 3
    s, ids = retrieval.search_excluding(reader, big, k, [{0}] * n_big, reader.doc_ids_of)
    assert (ids >= 0).all() and not np.isin(reader.doc_ids_of(ids), [0, -1]).any()
    stored = reader.version.stored_vectors(0, reader.limit)
    exact = big @ stored.T
    exact[:, :n_big] = -np.inf
    exact[:, docs < 0] = -np.inf
    want = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    recall = np.mean([len(set(g) & set(w)) / k for g, w in zip(ids.tolist(), want.tolist())])
    assert recall > 0.95, recall
    st.close()


def test_the_server_excludes_as_the_store_does(tmp_path, embedder):
    """/v1/search with exclude_doc_ids went through the server's own widening (100,000 candidates at
    most, from the request's probed lists only): on IVF at nprobe 1 the big document's chunks got no
    neighbour. The engine now calls search_excluding with the request's parameters."""
    pytest.importorskip("starlette")
    from retrostore.serve.engine import Engine
    from retrostore.serve.schema import parse_search
    from retrostore.serve.settings import ServeSettings

    st, big, small, n_big = _store(tmp_path, embedder, "IVF8,Flat", params={"nprobe": 8})
    st.close()
    engine = Engine(ServeSettings(store=str(tmp_path / "x.rstore"), verify=False))
    engine.open()
    try:
        body = {"vectors": big[:20].tolist(), "k": 3, "exclude_doc_ids": [0], "output": "ids", "params": {"nprobe": 1}}
        req = parse_search(body, engine.facts, max_queries=64, max_k=100, max_ids=100)
        got = engine.search([req])[0]
        ids = np.asarray(got["chunk_ids"])
        assert ids.shape == (20, 3) and (ids >= n_big).all()  # all filled, none from the big document
    finally:
        engine.close()
