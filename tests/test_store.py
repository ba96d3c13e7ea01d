"""The core store: create/open, append, commit, search, read back, bad input."""

from __future__ import annotations

import gc
import json
import os
import weakref

import numpy as np
import pytest

import retrostore
from retrostore import (
    EmbedderMismatchError,
    InvalidDocumentError,
    InvalidEmbeddingsError,
    InvalidInputError,
    InvalidMetadataError,
    NotAStoreError,
    ReadOnlyStoreError,
    RetrostoreError,
    StoreClosedError,
    StoreExistsError,
)


def _unit(rng, n, dim=384):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class ConstantEmbedder:
    """An embedder with another fingerprint (for mismatch tests)."""

    dim = 384
    fingerprint = {"kind": "test", "name": "constant", "model_sha256": "0" * 64, "dim": 384}

    def embed(self, texts):
        return np.ones((len(texts), 384), np.float32) / np.sqrt(384)


def test_create_open_close_roundtrip(tmp_path, small_docs, embedder):
    path = tmp_path / "s.rstore"
    st = retrostore.create(path, embedder=embedder)
    assert st.version == 0 and len(st) == 0 and st  # a handle is truthy, even empty
    docs = [d["text"] for d in small_docs[:5]]
    ids = st.append(docs, metadata=[d["meta"] for d in small_docs[:5]])
    assert ids == [0, 1, 2, 3, 4]
    assert st.commit() == 1
    st.close()
    st.close()  # idempotent
    with pytest.raises(StoreClosedError):
        st.search("anything")
    with pytest.raises(StoreClosedError):
        len(st)  # a closed handle's count could be stale
    assert bool(st) and (st or None) is st  # `if store:` does not call len()
    with pytest.raises(StoreClosedError):
        st.embedder  # a closed handle loads no model
    with retrostore.open(path) as st:
        assert st.version == 1
        for i, d in enumerate(docs):
            doc = st.get_document(i)
            assert doc.text == d  # byte for byte
            assert doc.metadata == small_docs[i]["meta"]
            chunks = st.get_chunks(doc.chunk_ids)
            assert "".join(c.text for c in chunks) == d
            assert [c.position for c in chunks] == list(range(len(chunks)))
            assert all(c.doc_id == i for c in chunks)
            assert all(1 <= len(c.tokens) <= 64 for c in chunks)
            assert all(len(c.tokens) == 64 for c in chunks[:-1])
        info = st.info()
        assert info["documents"] == 5 and info["chunks"] == len(st) == info["vectors"]
        assert info["dim"] == 384 and info["metric"] == "ip"
        assert info["embedder"]["model_sha256"] == retrostore.DEFAULT_MODEL_SHA256
        assert st.verify() == []


def test_manifest_pins_format_and_fingerprints(built_store):
    raw = json.loads((built_store / "manifest.json").read_text())
    body = raw["body"]
    # format 3: its Flat segments are float16 (codec "fp16"), which format-2 readers would not read back as Flat;
    # format 4: raw vectors files have block checksums (sidecars format-3 readers ignore: they still read it)
    assert body["format_version"] == 4 and body["min_reader_version"] == 3
    assert body["vectors"]["files"] and all(e["sums"]["path"].endswith(".sums.npy") for e in body["vectors"]["files"])
    assert all(e["codec"] == "fp16" for e in body["index"]["segments"])
    assert body["chunk_tokens"] == 64
    emb = body["embedder"]
    assert emb["dim"] == 384 and emb["pooling"] == "mean" and emb["normalize"] is True
    assert emb["model_sha256"] == retrostore.DEFAULT_MODEL_SHA256
    assert body["metric"] == "ip"
    assert body["index"]["factory"] == "Flat"
    for entry in (body["index"]["segments"] + body["vectors"]["files"] + [body["tokenizer"]]
                  + [e["sums"] for e in body["vectors"]["files"]]):
        assert (built_store / entry["path"]).stat().st_size == entry["size"]
        assert len(entry["sha256"]) == 64
    assert body["next_chunk_id"] == body["counts"]["chunks"]


def test_create_refuses_existing(tmp_path, embedder):
    path = tmp_path / "s"
    retrostore.create(path, embedder=embedder).close()
    with pytest.raises(StoreExistsError, match="already exists"):
        retrostore.create(path, embedder=embedder)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreExistsError):
        retrostore.create(tmp_path / "file", embedder=embedder)
    assert isinstance(StoreExistsError("x"), FileExistsError)


def test_create_accepts_empty_directory(tmp_path, embedder):
    (tmp_path / "empty").mkdir()
    with retrostore.create(tmp_path / "empty", embedder=embedder) as st:
        assert st.version == 0


def test_open_not_a_store(tmp_path):
    with pytest.raises(NotAStoreError, match="not a retrostore store"):
        retrostore.open(tmp_path)
    with pytest.raises(NotAStoreError):
        retrostore.open(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):  # also the built-in
        retrostore.open(tmp_path / "missing")


def test_bad_create_settings(tmp_path, embedder):
    with pytest.raises(InvalidInputError, match="chunk_tokens"):
        retrostore.create(tmp_path / "a", embedder=embedder, chunk_tokens=0)
    with pytest.raises(InvalidInputError, match="metric"):
        retrostore.create(tmp_path / "b", embedder=embedder, metric="cosine")
    with pytest.raises(InvalidInputError, match="factory"):
        retrostore.create(tmp_path / "c", embedder=embedder, index="NotAFactory")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_flags_factories_and_delete_ids_are_checked(tmp_path, built_store, embedder):
    """helper-37: reindex(mmap="no") set mmap, a factory string with a NUL was stored (FAISS read
    'Flat'), delete(b"3") deleted document 51: each is now an InvalidInputError naming the value."""
    with pytest.raises(InvalidInputError, match=r"mmap='no' must be True, False or None"):
        retrostore.open(built_store, mmap="no")
    with pytest.raises(InvalidInputError, match=r"keep_vectors='yes' must be True or False"):
        retrostore.create(tmp_path / "k", embedder=embedder, keep_vectors="yes")
    with pytest.raises(InvalidInputError, match=r"not printable ASCII"):
        retrostore.create(tmp_path / "n", embedder=embedder, index="Flat\x00junk")
    assert not (tmp_path / "k").exists() and not (tmp_path / "n").exists()
    path = tmp_path / "s"
    with retrostore.create(path, embedder=embedder) as st:
        st.append(["one document", "another document"])
        st.commit()
        before = st.manifest
        for bad, match in [((b"1",), r"doc_ids=b'1' must be an int or an iterable of ints, not bytes"),
                           (("1",), r"doc_ids='1' must be an int or an iterable of ints, not str")]:
            with pytest.raises(InvalidInputError, match=match):
                st.delete(*bad)
        with pytest.raises(InvalidInputError, match=r"mmap='no' must be True, False or None"):
            st.reindex("Flat", mmap="no", progress=False)
        with pytest.raises(InvalidInputError, match=r"not printable ASCII"):
            st.reindex("Flat\x00junk", progress=False)
        assert st.manifest == before and st.commit() == before["version"]


def test_append_invisible_until_commit(tmp_path, small_docs, embedder):
    path = tmp_path / "s"
    with retrostore.create(path, embedder=embedder) as w:
        w.append(small_docs[0]["text"])
        w.commit()
        reader = retrostore.open(path, embedder=embedder)
        n = len(reader)
        w.append([small_docs[1]["text"]])
        # neither the reader nor the writer's own search sees uncommitted chunks
        assert len(w) == n
        _, ids = w.search_vectors(_unit(np.random.default_rng(0), 3), k=50)
        assert ids.max() < n
        assert reader.refresh() == 1
        w.commit()
        assert reader.refresh() == 2 and len(reader) > n
        reader.close()


def test_uncommitted_appends_are_discarded_on_close(tmp_path, small_docs, embedder):
    path = tmp_path / "s"
    with retrostore.create(path, embedder=embedder) as w:
        w.append(small_docs[0]["text"])
        w.commit()
        n = len(w)
        w.append(small_docs[1]["text"])
    with retrostore.open(path, "a", embedder=embedder) as w:
        assert len(w) == n and w.verify() == []
        w.append(small_docs[2]["text"])
        w.commit()
        assert w.get_document(1).text == small_docs[2]["text"]


def test_bad_documents_and_metadata(tmp_path, embedder):
    with retrostore.create(tmp_path / "s", embedder=embedder) as st:
        with pytest.raises(InvalidDocumentError, match="document 1 is a bytes"):
            st.append(["ok", b"bytes"])
        with pytest.raises(InvalidDocumentError, match="document 0 is a int"):
            st.append([3])
        with pytest.raises(InvalidDocumentError):
            st.append(b"raw bytes")
        with pytest.raises(InvalidMetadataError, match=r"metadata\[0\]\['a'\]"):
            st.append(["x"], metadata=[{"a": {1: "int key"}}])
        with pytest.raises(InvalidMetadataError, match="not finite"):
            st.append(["x"], metadata=[{"score": float("nan")}])
        with pytest.raises(InvalidMetadataError, match="set"):
            st.append(["x"], metadata=[{"tags": {"a"}}])
        with pytest.raises(InvalidInputError, match="2 metadata values for 1 documents"):
            st.append(["x"], metadata=[{}, {}])
        assert st.commit() == 0  # nothing was staged by the failed appends
        ids = st.append(["numpy metadata"], metadata=[{"n": np.int64(3), "f": np.float32(0.5), "a": np.arange(2)}])
        st.commit()
        assert st.get_document(ids[0]).metadata == {"n": 3, "f": 0.5, "a": [0, 1]}
        assert isinstance(InvalidMetadataError("x"), ValueError)


def test_empty_and_whitespace_documents(tmp_path, embedder):
    with retrostore.create(tmp_path / "s", embedder=embedder) as st:
        ids = st.append(["", "   \n\t ", "real text here"])
        st.commit()
        assert ids == [0, 1, 2]
        assert st.get_document(0).text == "" and len(st.get_document(0).chunk_ids) == 0
        assert st.get_document(1).text == "   \n\t "
        assert len(st) == 1 and st.verify() == []


def test_precomputed_embeddings(tmp_path, small_docs, embedder):
    rng = np.random.default_rng(1)
    with retrostore.create(tmp_path / "s", embedder=embedder) as st:
        n = len(st.chunker.chunk(small_docs[-1]["text"]))
        with pytest.raises(InvalidEmbeddingsError, match=rf"\({n}, 384\)"):
            st.append(small_docs[-1]["text"], embeddings=np.zeros((n + 1, 384), np.float32))
        with pytest.raises(InvalidEmbeddingsError, match="shape"):
            st.append(small_docs[-1]["text"], embeddings=np.zeros((n, 128), np.float32))
        bad = _unit(rng, n)
        bad[0, 5] = np.nan
        with pytest.raises(InvalidEmbeddingsError, match="NaN or inf"):
            st.append(small_docs[-1]["text"], embeddings=bad)
        vecs = _unit(rng, n).astype(np.float64)  # float64 is converted
        st.append(small_docs[-1]["text"], embeddings=vecs)
        st.commit()
        scores, ids = st.search_vectors(vecs[:2], k=1)
        assert ids[:, 0].tolist() == [0, 1]
        assert scores.dtype == np.float32 and ids.dtype == np.int64
        np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-3)  # kept as float16


def test_append_with_chunks_already_made(tmp_path, small_docs, embedder):
    """append(docs, chunks=chunk_many(docs)) stores exactly what append(docs) stores
    (same records, same content hash), without tokenizing again; chunks that are not
    the store's chunker's chunks of these documents are refused before anything is staged."""
    import dataclasses

    texts = [d["text"] for d in small_docs[:4]] + ["   "]
    with retrostore.create(tmp_path / "a", embedder=embedder) as a, \
            retrostore.create(tmp_path / "b", embedder=embedder) as b:
        per_doc = b.chunker.chunk_many(texts)
        vecs = _unit(np.random.default_rng(2), sum(len(c) for c in per_doc))
        a.append(texts, embeddings=vecs, metadata=list(range(5)))
        calls = []
        real = b.chunker.chunk_many
        b.chunker.chunk_many = lambda t: calls.append(len(t)) or real(t)
        b.append(texts, embeddings=vecs, metadata=list(range(5)), chunks=per_doc)
        assert calls == [1]  # only the shortest document with chunks, as a check
        last = small_docs[5]["text"]
        b.append(last, chunks=b.chunker.chunk(last))  # one document: its list of chunks; embedded here
        a.append(last)
        a.commit(), b.commit()
        assert a.manifest["lmdb"]["chain"] == b.manifest["lmdb"]["chain"]
        assert b.verify() == [] and b.get_document(5).text == last
        other = retrostore.Chunker(retrostore.default_tokenizer_path(), 32)
        two = [d["text"] for d in small_docs if len(b.chunker.chunk(d["text"])) >= 2][:2]
        short = b.chunker.chunk_many(two)
        cases = [
            ([], "0 lists of chunks for 2 documents"),
            ("abc", "chunks is a str"),
            ([short[0], "x"], r"chunks\[1\] is a str"),
            ([short[0], [1, 2]], r"chunks\[1\]\[0\] is a builtins.int, not a chunk made by Chunker.chunk_many"),
            ([short[0], b.get_chunks([0, 1])], r"is a retrostore.Chunk, not a chunk made by"),  # stored chunks
            ([short[1], short[0]], r"chunks\[0\] do not tile document 0"),
            ([short[0], short[1][1:]], r"chunks\[1\] do not tile"),
            ([short[0], []], r"chunks\[1\] are not what this store's chunker"),
            (other.chunk_many(two), "another chunk_tokens"),
            ([short[0], [dataclasses.replace(c, token_ids=c.token_ids.tolist()) for c in short[1]]], "1-D numpy array"),
            ([short[0], [dataclasses.replace(c, token_ids=c.token_ids[None]) for c in short[1]]], "1-D numpy array"),
            ([short[0], [dataclasses.replace(c, token_ids=c.token_ids + 40_000) for c in short[1]]],
             r"must be in \[0, 30522\)"),
            ([[dataclasses.replace(c, token_ids=c.token_ids[::-1].copy()) for c in cs] for cs in short],
             "another tokenizer"),  # what another tokenizer's ids look like: wrong in every document
            ([short[0], [dataclasses.replace(c, position=float(c.position)) for c in short[1]]], "Python ints"),
            ([[dataclasses.replace(short[0][0], start=False)] + short[0][1:], short[1]], "Python ints"),
            ([short[0], [dataclasses.replace(c, start=np.int64(c.start)) for c in short[1]]], "Python ints"),
            ([short[0], [dataclasses.replace(short[1][0], token_ids=short[1][0].token_ids.astype(bool))]
              + short[1][1:]], "1-D numpy array of integers"),
            ([short[0], [dataclasses.replace(c, token_ids=np.ma.masked_array(c.token_ids)) for c in short[1]]],
             "1-D numpy array of integers"),
        ]
        with pytest.raises(retrostore.InvalidInputError, match="empty or whitespace, so it has no chunks"):
            b.append(["   ", two[0]], chunks=[short[0], short[0]], embeddings=np.zeros((0, 384), np.float32))
        with pytest.raises(retrostore.InvalidDocumentError, match="document 1 holds a lone surrogate"):
            b.append(["Short.", "abc\ud800def"], chunks=[b.chunker.chunk("Short."), []])
        with pytest.raises(retrostore.InvalidInputError, match=r"store.chunker.chunk\(doc\)"):
            b.append(two[0], chunks=b.chunker.chunk_many([two[0]]))
        before = b._writer.batch.docs
        for chunks, message in cases:
            with pytest.raises(retrostore.InvalidInputError, match=message) as err:
                b.append(two, chunks=chunks, embeddings=np.zeros((0, 384), np.float32))
            assert "store.chunker.chunk_many(docs)" in str(err.value)
        assert b._writer.batch.docs == before
        assert b.verify(retokenize=True) == []
        # Only the shortest document is re-chunked at append: wrong ids in another pass there
        # (documented), and verify(retokenize=True) is what finds them.
        three = [d["text"] for d in small_docs if len(b.chunker.chunk(d["text"])) >= 2][:3]
        other = max(range(3), key=lambda i: len(three[i]))
        wrong = b.chunker.chunk_many(three)
        wrong[other][1] = dataclasses.replace(wrong[other][1], token_ids=wrong[other][1].token_ids[::-1].copy())
        ids = b.append(three, chunks=wrong, embeddings=_unit(np.random.default_rng(3), sum(map(len, wrong))))
        b.commit()
        assert b.verify() == []  # the files are what was committed
        found = b.verify(retokenize=True)
        assert len(found) == 1 and f"document {ids[other]}: chunk" in found[0], found


def test_search_empty_store_and_k(tmp_path, embedder):
    with retrostore.create(tmp_path / "s", embedder=embedder) as st:
        assert st.search("anything") == []
        assert st.search(["a", "b"]) == [[], []]
        with pytest.raises(InvalidInputError, match="k=0"):
            st.search("x", k=0)
        for empty, where in (("", "query is"), ("  \n", "query is"), (["fine", "\t"], "query 1 is")):
            with pytest.raises(InvalidInputError, match=f"^{where} empty or whitespace"):
                st.search(empty)
        with pytest.raises(InvalidInputError):
            st.search_vectors(np.zeros((1, 384), np.float32), k=-1)
        with pytest.raises(InvalidInputError, match="384"):
            st.search_vectors(np.zeros((1, 10), np.float32), k=1)
        with pytest.raises(InvalidInputError, match="NaN"):
            st.search_vectors(np.full((1, 384), np.nan, np.float32), k=1)
        with pytest.raises(InvalidInputError, match=r"shape \(383,\)"):  # as given, not as reshaped
            st.search_vectors(np.zeros(383), k=1)
        with pytest.raises(InvalidInputError, match="beyond float32's range"):  # finite float64, not "NaN"
            st.search_vectors(np.full((1, 384), 1e39), k=1)
        scores, ids = st.search_vectors(np.zeros((2, 384), np.float32), k=3)
        assert ids.shape == (2, 3) and (ids == -1).all()


def test_k_larger_than_store(built_store, embedder):
    with retrostore.open(built_store, embedder=embedder) as st:
        n = len(st)
        hits = st.search("base64", k=n + 10)
        assert len(hits) == n
        assert len({h.chunk_id for h in hits}) == n
        scores, ids = st.search_vectors(embedder.embed(["base64"]), k=n + 10)
        assert (ids[0, n:] == -1).all() and (ids[0, :n] >= 0).all()


def test_search_hits_and_continuations(built_store, embedder):
    with retrostore.open(built_store, embedder=embedder) as st:
        hits = st.search("decode base64 encoded data back into bytes", k=5)
        assert len(hits) == 5
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        metas = st.get_metadata([h.doc_id for h in hits])
        assert any(m["source"].endswith("library/base64.rst") for m in metas)
        for h in hits:
            doc = st.get_document(h.doc_id)
            chunk = st.get_chunks([h.chunk_id])[0]
            assert h.text == chunk.text and np.array_equal(h.tokens, chunk.tokens)
            if h.chunk_id + 1 in doc.chunk_ids:
                nxt = st.get_chunks([h.chunk_id + 1])[0]
                assert h.continuation_text == nxt.text
                assert np.array_equal(h.continuation_tokens, nxt.tokens)
            else:
                assert h.continuation_text == "" and len(h.continuation_tokens) == 0
        batch = st.search(["base64 decoding", "unrelated question about gardens"], k=3)
        assert len(batch) == 2 and all(len(b) == 3 for b in batch)
        assert batch[0][0].chunk_id == st.search("base64 decoding", k=1)[0].chunk_id


def test_last_chunk_of_document_has_empty_continuation(built_store, embedder):
    with retrostore.open(built_store, embedder=embedder) as st:
        doc = st.get_document(0)
        last = st.get_chunks([doc.chunk_ids[-1]])[0]
        vec = embedder.embed_token_ids([last.tokens])
        hit = st.search_vectors(vec, k=1)[1][0, 0]
        assert hit == last.chunk_id
        hits = st._reader.hits(*st.search_vectors(vec, k=1))
        assert hits[0][0].continuation_text == ""


def test_embedder_mismatch(built_store):
    with pytest.raises(EmbedderMismatchError, match="model_sha256"):
        retrostore.open(built_store, embedder=ConstantEmbedder())


def test_store_with_other_embedder_needs_it(tmp_path, small_docs):
    path = tmp_path / "other"
    with retrostore.create(path, embedder=ConstantEmbedder(), tokenizer=retrostore.default_tokenizer_path()) as st:
        st.append(small_docs[0]["text"])
        st.commit()
    with retrostore.open(path) as st:
        with pytest.raises(EmbedderMismatchError, match="0000000000.*open\\(embedder=.*search_vectors"):
            st.search("x")
        assert st.search_vectors(np.ones((1, 384), np.float32), k=1)[1][0, 0] == 0
    with retrostore.open(path, embedder=ConstantEmbedder()) as st:
        assert len(st.search("x", k=2)) == 1  # the store holds one chunk


def test_reader_cannot_write(built_store):
    with retrostore.open(built_store) as st:
        with pytest.raises(ReadOnlyStoreError):
            st.append("x")
        with pytest.raises(ReadOnlyStoreError):
            st.commit()


def test_bad_mode_and_errors_share_a_base(built_store):
    with pytest.raises(InvalidInputError, match="mode"):
        retrostore.open(built_store, "w")
    for name in retrostore.__all__:
        obj = getattr(retrostore, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, RetrostoreError)


def test_a_closed_store_lets_go_of_the_model_it_loaded(built_store, embedder):
    """The default model a store loaded itself (~150 MB) goes with close(); one given to open() stays
    the caller's and keeps working."""
    st = retrostore.open(built_store)
    loaded = weakref.ref(st.embedder)
    st.search("lists", k=1)
    st.close()
    gc.collect()
    assert loaded() is None
    with retrostore.open(built_store, embedder=embedder) as st:
        st.search("lists", k=1)
    assert embedder.embed(["still usable"]).shape == (1, 384)


def test_get_out_of_range(built_store):
    with retrostore.open(built_store) as st:
        with pytest.raises(InvalidInputError, match="outside the committed range"):
            st.get_chunks([len(st)])
        with pytest.raises(InvalidInputError):
            st.get_document(-1)


def test_integers_beyond_pythons_text_limit_get_clear_errors(tmp_path, built_store, embedder):
    """Python turns no int of more than 4,300 digits into text (a bare ValueError): every message
    naming such a value names its size instead, so each call raises the retrostore error it meant."""
    huge = 10 ** 5000
    with retrostore.open(built_store) as st:
        calls = [lambda: st.search("lists", k=huge), lambda: st.search("lists", k=-huge),
                 lambda: st.search_vectors(np.zeros((1, 384), np.float32), k=huge),
                 lambda: st.search_vectors(np.zeros((1, 384), np.float32), k=2, params={"efSearch": huge}),
                 lambda: st.get_chunks([huge]), lambda: st.get_chunks([-huge]), lambda: st.get_document(huge),
                 lambda: st.get_metadata([huge]), lambda: st.neighbors(np.zeros((1, 64), np.int64), k=huge),
                 lambda: retrostore.open(built_store, threads=huge), lambda: retrostore.open(built_store, version=huge)]
        for call in calls:
            with pytest.raises(RetrostoreError, match="an integer of about 5,001 digits"):
                call()
    with pytest.raises(InvalidInputError, match="chunk_tokens=<an integer of about 5,001 digits>"):
        retrostore.create(tmp_path / "a", embedder=embedder, chunk_tokens=huge)
    with pytest.raises(InvalidInputError, match="pad_id=<an integer"):
        retrostore.create(tmp_path / "b", embedder=embedder, pad_id=huge)
    with retrostore.create(tmp_path / "c", embedder=embedder) as st:
        with pytest.raises(RetrostoreError, match=r"\['n'\] = <an integer of about 5,001 digits>"):
            st.append(["a document"], metadata=[{"n": huge}])
        st.append(["a document"])
        st.commit()
        with pytest.raises(InvalidInputError, match="document id <an integer"):
            st.delete([huge])
        with pytest.raises(InvalidInputError, match="holding an integer of more than 4,300 digits"):
            st.delete([[huge]])  # shown() of a list (helper-20)
        for bad in (dict(train_size=huge), dict(seed=huge)):  # accepted, then the manifest could not be written
            with pytest.raises(InvalidInputError, match="<an integer of about 5,001 digits>"):
                st.reindex(**bad)
    for bad in (dict(retain_versions=huge), dict(retain_versions=-huge), dict(train_size=huge)):
        with pytest.raises(InvalidInputError, match="integer of about 5,001 digits"):
            retrostore.create(tmp_path / "d", embedder=embedder, **bad)
    with pytest.raises(InvalidInputError, match="version=True"):
        retrostore.open(built_store, version=True)  # not version 1


def test_every_int_argument_has_the_one_check(tmp_path, embedder):
    """Sites that checked ints by hand let huge ints through (OnnxEmbedder(max_tokens=10**30) raised
    OverflowError, ServeSettings(port=10**5000) a bare ValueError, build shards had no upper bound)
    or refused numpy ints; they now share errors.check_int."""
    from retrostore.build.stream import build_store
    from retrostore.serve.settings import ServeSettings
    from retrostore.text.embed import OnnxEmbedder

    huge = 10 ** 5000
    files = (embedder.model_path, embedder.tokenizer_path)
    for bad in (dict(max_tokens=10 ** 30), dict(max_tokens=huge), dict(max_tokens=2.0), dict(batch_size=huge)):
        with pytest.raises(InvalidInputError, match=rf"{next(iter(bad))}=.* must be an int in \["):
            OnnxEmbedder(*files, **bad)
    for bad in (dict(port=huge), dict(workers=True), dict(max_k=10 ** 30)):
        with pytest.raises(InvalidInputError, match=rf"{next(iter(bad))}=.* must be an int in \["):
            ServeSettings(store=tmp_path, **bad)
    assert type(ServeSettings(store=tmp_path, port=np.int64(8808)).port) is int
    corpus = tmp_path / "one.jsonl"
    corpus.write_text('{"text": "a document"}\n')
    for shards in (huge, 1 << 17, 0, 2.0):
        with pytest.raises(InvalidInputError, match=r"shards=.* must be an int in \[1, 65536\]"):
            build_store(tmp_path / "sharded", [corpus], shards=shards, progress=False)
    assert not (tmp_path / "sharded").exists()
    with retrostore.create(tmp_path / "np", embedder=embedder, chunk_tokens=np.int32(64),
                           retain_versions=np.int64(2)) as st:  # numpy ints are ints (they were refused)
        st.append(["a document"])
        st.commit()
        assert st.info()["chunk_tokens"] == 64 and st.commit() == 1


def test_metadata_depth_and_surrogates(tmp_path, embedder):
    deep: dict = {}
    cur = deep
    for _ in range(1000):
        cur["a"] = {}
        cur = cur["a"]
    with retrostore.create(tmp_path / "s", embedder=embedder) as st:
        with pytest.raises(InvalidMetadataError, match="nested deeper than 64"):
            st.append(["x"], metadata=[deep])
        with pytest.raises(InvalidMetadataError, match="surrogate"):
            st.append(["x"], metadata=[{"k": "a\ud800"}])
        assert st.commit() == 0


def test_factories_the_store_cannot_use_are_refused_at_create(tmp_path, embedder):
    with pytest.raises(InvalidInputError, match="NotAFactory"):
        retrostore.create(tmp_path / "bad", embedder=embedder, index="NotAFactory")
    assert not (tmp_path / "bad").exists()
    with retrostore.create(tmp_path / "sq", embedder=embedder, index="SQfp16", metric="l2") as st:
        assert st.manifest["index"]["factory"] == "SQfp16"


def test_float16_overflow_is_refused(tmp_path, embedder):
    rng = np.random.default_rng(3)
    with retrostore.create(tmp_path / "s", embedder=embedder) as st:
        vecs = _unit(rng, 1) * 1e6
        with pytest.raises(InvalidEmbeddingsError, match="float16"):
            st.append("one chunk", embeddings=vecs)
    with retrostore.create(tmp_path / "nokeep", embedder=embedder, keep_vectors=False) as st:
        with pytest.raises(InvalidEmbeddingsError, match="Flat segments"):  # Flat segments are float16 too
            st.append("one chunk", embeddings=vecs)
    with retrostore.create(tmp_path / "s32", embedder=embedder, vector_dtype="float32") as st:
        st.append("one chunk", embeddings=_unit(rng, 1) * 1e6)
        st.commit()
        assert st.verify() == []


def test_bad_paths_ids_and_embedders_are_clear_errors(tmp_path, built_store):
    """Found by adversarial testing: these raised bare TypeError/ValueError/FileNotFoundError,
    or silently read chunk 0 for id 0.5 and iterated the characters of '12'."""
    for path in (None, 3, b"/tmp/x", ""):
        with pytest.raises(InvalidInputError, match="path must be"):
            retrostore.create(path)
        with pytest.raises(InvalidInputError, match="path must be"):
            retrostore.open(path)
    with pytest.raises(retrostore.CommitError, match="nothing was created"):
        retrostore.create("/proc/retrostore-test.rstore")

    class Emb:
        tokenizer_path = retrostore.default_tokenizer_path()

        def __init__(self, dim, fingerprint):
            self.dim, self.fingerprint = dim, fingerprint

        def embed(self, texts):
            raise AssertionError

    for dim, fp, what in ((0, {}, "dim"), (1.5, {}, "dim"), (True, {}, "dim"), ("384", {}, "dim"),
                          (384, "abc", "fingerprint"), (384, {"x": object()}, "fingerprint"),
                          (384, {"x": float("nan")}, "fingerprint")):
        with pytest.raises(InvalidInputError, match=f"Emb.{what}"):
            retrostore.create(tmp_path / "e.rstore", embedder=Emb(dim, fp))
    assert not (tmp_path / "e.rstore").exists()
    with retrostore.open(built_store) as st:
        for call, match in ((lambda: st.get_chunks(None), "iterable of int"),
                            (lambda: st.get_chunks("12"), "iterable of int"),
                            (lambda: st.get_chunks([0.5]), "not an integer"),
                            (lambda: st.get_metadata([None]), "not an integer"),
                            (lambda: st.search(None), "str or a sequence of str"),
                            (lambda: st.search(b"abc"), "str or a sequence of str")):
            with pytest.raises(InvalidInputError, match=match):
                call()
        assert [c.chunk_id for c in st.get_chunks(np.array([1, 0]))] == [1, 0]


def test_create_racing_another_create_says_the_store_exists(tmp_path, monkeypatch):
    """Two builds of a new store at once: the one that loses the rename gets StoreExistsError
    (it said 'CommitError: Directory not empty')."""
    from retrostore.storage import fileio as _fileio

    path = tmp_path / "s.rstore"
    real = _fileio._rename

    def other_process_wins(src, dst):
        if os.fspath(dst) == os.fspath(path):  # the publishing rename: another create got there first
            os.makedirs(dst, exist_ok=True)
            open(os.path.join(dst, "manifest.json"), "w").close()
        real(src, dst)

    monkeypatch.setattr(_fileio, "_rename", other_process_wins)
    with pytest.raises(retrostore.StoreExistsError, match="created by another process"):
        retrostore.create(path)
    assert [p.name for p in tmp_path.iterdir()] == ["s.rstore"]


def test_chunks_longer_than_the_embedder_reads_are_warned(tmp_path, caplog):
    retrostore.create(tmp_path / "s.rstore", chunk_tokens=4096).close()
    assert any("embedded from its first 254 tokens" in r.getMessage() for r in caplog.records)
    caplog.clear()
    retrostore.create(tmp_path / "t.rstore", chunk_tokens=64).close()
    assert not any("embedded from its first" in r.getMessage() for r in caplog.records)
