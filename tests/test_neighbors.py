"""RETRO retrieval: neighbours + continuations against brute-force numpy search."""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import retrostore
from retrostore import InvalidInputError

from conftest import SHAKESPEARE


def _brute(store, queries, k, excluded=None):
    """Exact top-k chunk ids by numpy over the store's stored vectors."""
    vecs = store._head.version.stored_vectors(0, len(store))
    docs = store._reader.all_doc_ids()
    scores = queries @ vecs.T
    out = np.full((len(queries), k), -1, np.int64)
    for i, row in enumerate(scores):
        order = np.argsort(-row, kind="stable")
        if excluded is not None:
            order = [j for j in order if docs[j] not in excluded[i]]
        order = list(order)[:k]
        out[i, : len(order)] = order
    return out, scores


def _same_up_to_ties(got, want, scores, tol=1e-5):
    for g, w, s in zip(got, want, scores):
        g, w = [x for x in g if x >= 0], [x for x in w if x >= 0]
        assert len(g) == len(w)
        # ids may differ only where the scores tie
        np.testing.assert_allclose(np.sort(s[g]), np.sort(s[w]), atol=tol)


@pytest.fixture(scope="module")
def store(built_store, embedder):
    with retrostore.open(built_store, embedder=embedder) as st:
        yield st


def _query_tokens(store, docs, n_rows=3, length=128):
    rows = []
    for d in docs:
        ids, _ = store.chunker.encode(d)
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == n_rows:
            break
    return np.stack(rows)


def test_shapes_dtypes_and_brute_force(store, small_docs, embedder):
    toks = _query_tokens(store, [d["text"] for d in reversed(small_docs)])
    nb = store.neighbors(toks, k=4)
    b, c, k, t2 = nb.tokens.shape
    assert (b, c, k, t2) == (len(toks), 2, 4, 128)
    assert nb.tokens.dtype == np.int64 and nb.mask.dtype == bool and nb.mask.shape == nb.tokens.shape
    assert nb.chunk_ids.shape == nb.doc_ids.shape == nb.scores.shape == (b, c, k)
    assert nb.chunk_ids.dtype == np.int64 and nb.doc_ids.dtype == np.int64 and nb.scores.dtype == np.float32
    q = embedder.embed_token_ids([toks[i, j * 64 : (j + 1) * 64] for i in range(b) for j in range(c)])
    want, scores = _brute(store, q, 4)
    _same_up_to_ties(nb.chunk_ids.reshape(-1, 4), want, scores)
    np.testing.assert_allclose(nb.scores.reshape(-1, 4), np.take_along_axis(scores, nb.chunk_ids.reshape(-1, 4), 1),
                               atol=1e-4)


def test_tokens_are_neighbour_then_continuation(store, small_docs):
    toks = _query_tokens(store, [d["text"] for d in small_docs[::-1]])
    nb = store.neighbors(toks, k=3)
    pad = store.manifest["tokenizer"]["pad_id"]
    for idx in np.ndindex(nb.chunk_ids.shape):
        cid = int(nb.chunk_ids[idx])
        chunk = store.get_chunks([cid])[0]
        assert nb.doc_ids[idx] == chunk.doc_id
        row, m = nb.tokens[idx], nb.mask[idx]
        n = len(chunk.tokens)
        assert np.array_equal(row[:n], chunk.tokens) and m[:n].all() and not m[n:64].any()
        assert (row[n:64] == pad).all()
        doc = store.get_document(chunk.doc_id)
        if cid + 1 in doc.chunk_ids:
            nxt = store.get_chunks([cid + 1])[0]
            assert np.array_equal(row[64 : 64 + len(nxt.tokens)], nxt.tokens)
            assert m[64 : 64 + len(nxt.tokens)].all() and not m[64 + len(nxt.tokens) :].any()
        else:  # document end: the continuation is all padding, never the next document
            assert not m[64:].any() and (row[64:] == pad).all()


def test_continuation_never_crosses_documents(store):
    # Query with the exact tokens of each document's last chunk: its own last chunk is the top hit.
    for doc_id in range(5):
        doc = store.get_document(doc_id)
        if not len(doc.chunk_ids):
            continue
        last = store.get_chunks([doc.chunk_ids[-1]])[0]
        toks = np.full((1, 64), last.tokens[0], np.int64)
        toks[0, : len(last.tokens)] = last.tokens
        if len(last.tokens) < 64:
            toks = last.tokens[None, :]
        nb = store.neighbors(toks, k=1)
        assert nb.chunk_ids[0, 0, 0] == last.chunk_id
        assert not nb.mask[0, 0, 0, 64:].any()


def test_exclusion_honoured_and_k_still_returned(store, small_docs, embedder):
    toks = _query_tokens(store, [small_docs[-1]["text"]], n_rows=1, length=192)
    plain = store.neighbors(toks, k=5)
    own = int(np.bincount(plain.doc_ids[plain.doc_ids >= 0]).argmax())
    nb = store.neighbors(toks, k=5, exclude_doc_ids=[own])
    assert (nb.doc_ids != own).all() and (nb.chunk_ids >= 0).all()
    q = embedder.embed_token_ids([toks[0, j * 64 : (j + 1) * 64] for j in range(3)])
    want, scores = _brute(store, q, 5, excluded=[{own}] * 3)
    _same_up_to_ties(nb.chunk_ids.reshape(-1, 5), want, scores)
    with pytest.raises(InvalidInputError, match="one entry per row"):
        store.neighbors(toks, k=2, exclude_doc_ids=[own, own])
    # review: a doc id past int64 (no document has one) raised a raw OverflowError; it excludes nothing
    big = store.neighbors(toks, k=5, exclude_doc_ids=[[own, 2**63, 2**70]])
    np.testing.assert_array_equal(big.chunk_ids, nb.chunk_ids)


def test_fewer_than_k_gives_minus_one(tmp_path, small_docs, embedder):
    with retrostore.create(tmp_path / "s", embedder=embedder) as st:
        st.append(small_docs[0]["text"])  # one document, one or two chunks
        st.commit()
        n = len(st)
        toks = st.get_chunks([0])[0].tokens[None, :]
        nb = st.neighbors(toks, k=n + 3)
        assert (nb.chunk_ids[0, 0, :n] >= 0).all() and (nb.chunk_ids[0, 0, n:] == -1).all()
        assert (nb.doc_ids[0, 0, n:] == -1).all() and not nb.mask[0, 0, n:].any()
        assert np.isneginf(nb.scores[0, 0, n:]).all()
        ex = st.neighbors(toks, k=2, exclude_doc_ids=[0])
        assert (ex.chunk_ids == -1).all() and not ex.mask.any()


def test_ragged_tail_and_bad_input(store):
    toks = store.get_chunks([0])[0].tokens
    row = np.concatenate([toks, toks[:10]])[None, :]
    if row.shape[1] > 64:
        nb = store.neighbors(row, k=1)
        assert nb.chunk_ids.shape == (1, 2, 1)
    with pytest.raises(InvalidInputError, match="vocabulary"):
        store.neighbors(np.array([[10**7]]), k=1)
    with pytest.raises(InvalidInputError, match="shape"):
        store.neighbors(np.zeros((1, 2, 3), np.int64), k=1)
    with pytest.raises(InvalidInputError):
        store.neighbors(np.ones((1, 64), np.float32), k=1)
    with pytest.raises(InvalidInputError, match="k=0"):
        store.neighbors(np.ones((1, 64), np.int64), k=0)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """A GPT-2-style byte-level BPE trained here on real text (distinct from the embedder's WordPiece)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SHAKESPEARE.read_text()[:300_000]], trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_bpe_chunk_tokenizer(tmp_path, bpe_tokenizer, small_docs, embedder):
    docs = [d["text"] for d in small_docs[-4:]]
    with retrostore.create(tmp_path / "bpe", embedder=embedder, tokenizer=bpe_tokenizer) as st:
        st.append(docs)
        st.commit()
        assert st.manifest["tokenizer"]["sha256"] != embedder.tokenizer_sha256
        assert st.manifest["tokenizer"]["pad_id"] == 0  # <|endoftext|>
        for i, d in enumerate(docs):
            assert st.get_document(i).text == d
        # chunk vectors were embedded from the exact text spans, re-tokenized by the embedder
        c = st.get_chunks([1])[0]
        np.testing.assert_allclose(st._head.version.stored_vectors(1, 2)[0], embedder.embed([c.text])[0], rtol=1e-3, atol=1e-5)
        ids, _ = st.chunker.encode(docs[-1])
        toks = ids[None, :128]
        nb = st.neighbors(toks, k=2)
        assert nb.tokens.shape == (1, 2, 2, 128)
        q = embedder.embed([st.chunker.decode(toks[0, :64]), st.chunker.decode(toks[0, 64:128])])
        want, scores = _brute(st, q, 2)
        _same_up_to_ties(nb.chunk_ids.reshape(-1, 2), want, scores)
        first = st.get_chunks([int(nb.chunk_ids[0, 0, 0])])[0]
        assert np.array_equal(nb.tokens[0, 0, 0, : len(first.tokens)], first.tokens)
        assert nb.tokens.max() < 2000


def test_precompute_store_neighbours_matches_brute_force(store, tmp_path):
    out = tmp_path / "knn.npy"
    path = store.precompute_neighbors(out, k=2, exclude_same_doc=True, batch_size=37, progress=False)
    arr = np.load(path, mmap_mode="r")
    assert arr.shape == (len(store), 2) and arr.dtype == np.int64
    vecs = store._head.version.stored_vectors(0, len(store))
    docs = store._reader.all_doc_ids()
    want, scores = _brute(store, vecs, 2, excluded=[{int(d)} for d in docs])
    _same_up_to_ties(np.asarray(arr), want, scores)
    assert all(docs[j] != docs[i] for i, row in enumerate(arr) for j in row if j >= 0)
    assert not (tmp_path / "knn.npy.partial").exists() and not (tmp_path / "knn.npy.progress.json").exists()
    with pytest.raises(InvalidInputError, match=rf"k={len(store) + 1} is more than the {len(store):,} chunks"):
        store.precompute_neighbors(tmp_path / "big.npy", k=len(store) + 1, progress=False)  # helper-16: 1.7 GB of -1
    assert not list(tmp_path.glob("big.npy*"))


def test_precompute_resumes_after_kill(built_store, tmp_path):
    """Kill a real precompute run part-way (SIGKILL), re-run: same file as an uninterrupted run."""
    full = tmp_path / "full.npy"
    with retrostore.open(built_store) as st:
        st.precompute_neighbors(full, k=2, exclude_same_doc=True, batch_size=16, progress=False)
    out = tmp_path / "resumed.npy"
    script = textwrap.dedent(f"""
        import os, signal, retrostore, retrostore.store.precompute as r
        calls = 0
        real = r.atomic_write
        def kill_after_three(*a, **kw):
            global calls
            real(*a, **kw)
            calls += 1
            if calls == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        r.atomic_write = kill_after_three
        with retrostore.open({str(built_store)!r}) as st:
            st.precompute_neighbors({str(out)!r}, k=2, exclude_same_doc=True, batch_size=16, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    state = (tmp_path / "resumed.npy.progress.json").read_text()
    assert '"done": 48' in state
    # (the CLI's store-chunks mode is now retro.chunk_neighbors, leakage-filtered; this resumes the store's own)
    with retrostore.open(built_store) as st:
        st.precompute_neighbors(out, k=2, exclude_same_doc=True, batch_size=16, progress=False)
    assert np.array_equal(np.load(out), np.load(full))


def test_precompute_external_queries(store, tmp_path, small_docs):
    toks = _query_tokens(store, [d["text"] for d in small_docs[::-1]], n_rows=2)
    qpath = tmp_path / "tokens.npy"
    np.save(qpath, toks)
    out = store.precompute_neighbors(tmp_path / "q.npy", k=3, queries=qpath, progress=False)
    arr = np.load(out, mmap_mode="r")
    assert arr.shape == (2, 2, 3)
    assert np.array_equal(arr, store.neighbors(toks, k=3).chunk_ids)
    bad = tmp_path / "bad.npy"
    np.save(bad, toks[:, :100])
    with pytest.raises(InvalidInputError, match="multiple of 64"):
        store.precompute_neighbors(tmp_path / "b.npy", queries=bad, progress=False)


def test_example_retro_model_input_runs(built_store):
    example = Path(__file__).resolve().parents[1] / "examples" / "retro_model_input.py"
    res = subprocess.run([sys.executable, str(example), str(built_store)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "(2, 4, 2, 128) (B, C, k, 2*64)" in res.stdout


def test_bad_exclusions_and_ragged_rows(store):
    toks = np.ones((1, 64), np.int64)
    # (review: a 0-d array, iterable by type only, raised a raw TypeError, as a row or as the whole)
    for bad in (["a"], [1.5], [[1.5]], [[None]], [b"x"], [np.array(5.0)], np.array(5)):
        with pytest.raises(InvalidInputError, match="exclude_doc_ids"):
            store.neighbors(toks, k=1, exclude_doc_ids=bad)
    # A 0-d integer array (or tensor: what iterating a 1-D torch tensor of a batch's doc ids gives) is one id.
    for one in ([np.array(0)], [[np.array(0)]], np.array([0]), [np.int64(0)]):
        nb = store.neighbors(toks, k=1, exclude_doc_ids=one)
        assert (nb.doc_ids != 0).all()
    with pytest.raises(InvalidInputError, match="same length"):
        store.neighbors([[1] * 64, [1] * 3], k=1)
    with pytest.raises(InvalidInputError, match="exclude_same_doc"):
        store.precompute_neighbors("x.npy", exclude_same_doc="no", progress=False)
