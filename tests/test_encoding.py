"""A trained store's batches are encoded on a second thread while they are appended
(retrostore/store/encoding.py): the commit's segment must be the one it would build
itself, whatever happens to the parts, and what the caller does with its array after
``append`` must not reach the store."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest

import retrostore
from retrostore.store import encoding
from retrostore.store.encoding import BatchEncoder

from test_index import FakeEmbedder, _vectors

FACTORY = "IVF16,PQ8x4fs"


def _parts(seed: int = 0) -> list[list[np.ndarray]]:
    """Per commit, the parts appended: a first commit that trains, then batches of several parts."""
    rng = np.random.default_rng(seed)
    return [[_vectors(rng, 1000)], [_vectors(rng, 300), _vectors(rng, 200)], [_vectors(rng, 400)],
            [_vectors(rng, 100), _vectors(rng, 250), _vectors(rng, 50)]]


def _build(path, commits, on_append=None, factory=FACTORY) -> dict:
    """A store of one-chunk documents built from ``commits``; its manifest. ``on_append(st, i)``
    runs after each append (i counts appends)."""
    n = i = 0
    with retrostore.create(path, embedder=FakeEmbedder(), index=factory) as st:
        for parts in commits:
            for vecs in parts:
                st.append([f"d{n + j}" for j in range(len(vecs))], embeddings=vecs)
                n += len(vecs)
                if on_append:
                    on_append(st, i)
                i += 1
            st.commit()
        assert st.manifest["index"]["factory"] == factory and st.verify() == []
        return st.manifest


def _segments(manifest: dict) -> list[tuple]:
    return [(s["sha256"], s["first_id"], s["count"]) for s in manifest["index"]["segments"]]


@pytest.fixture
def reference(tmp_path, monkeypatch):
    """The manifest of the same store built without the encoder (each commit encodes its batch)."""
    with monkeypatch.context() as m:
        m.setattr(BatchEncoder, "for_store", classmethod(lambda cls, *a: None))
        return _build(tmp_path / "reference", _parts())


def test_the_encoded_segment_is_the_one_the_commit_would_build(tmp_path, monkeypatch, reference):
    """Byte for byte (the segments' checksums), with batches of one and of several parts; and the
    commits after training really took the encoder's segment."""
    taken = []
    batches = [sum(len(p) for p in parts) for parts in _parts()[1:]]  # the commits after training
    result = BatchEncoder.result

    def spy(self):
        index = result(self)
        taken.append(index is not None and index.ntotal == batches.pop(0))
        return index

    monkeypatch.setattr(BatchEncoder, "result", spy)
    manifest = _build(tmp_path / "s", _parts())
    assert taken == [True, True, True]  # the first commit trains: nothing to encode with before it
    assert _segments(manifest) == _segments(reference)
    assert manifest["lmdb"]["chain"] == reference["lmdb"]["chain"]


def test_a_flat_fast_scan_store_encodes_while_appending_too(tmp_path, monkeypatch):
    """The 16-byte-per-vector recipe (docs/index.md: ``PQ...x4fs`` without IVF) gets the same
    segments from the encoder as from commits that encode their batch; a graph is never encoded
    part by part (FAISS inserts a whole batch in another order)."""
    with monkeypatch.context() as m:
        m.setattr(BatchEncoder, "for_store", classmethod(lambda cls, *a: None))
        reference = _build(tmp_path / "reference", _parts(), factory="PQ16x4fs")
    taken = []
    result = BatchEncoder.result

    def spy(self):
        index = result(self)
        taken.append(index is not None)
        return index

    monkeypatch.setattr(BatchEncoder, "result", spy)
    manifest = _build(tmp_path / "s", _parts(), factory="PQ16x4fs")
    assert taken == [True, True, True]
    assert _segments(manifest) == _segments(reference)
    graph = faiss.index_factory(64, "HNSW16,SQ8")
    graph.train(_vectors(np.random.default_rng(1), 500))
    assert BatchEncoder.for_store(graph) is None


def test_pieces_run_on_one_thread_while_appending_then_on_the_stores_threads(tmp_path, monkeypatch, reference):
    """A part is encoded in pieces of PIECE_ROWS rows: on one FAISS thread while ``append`` still
    needs its core, on ``Store.threads`` once the commit waits (also when another thread than the
    store's opener appends); the segments stay the reference's
    byte for byte (pieces added in order are what one FAISS call gives)."""
    import threading

    monkeypatch.setattr(encoding, "PIECE_ROWS", 64)
    add, result = encoding.add_vectors, BatchEncoder.result
    waiting, started = threading.Event(), threading.Event()
    used: list[tuple[int, int, bool]] = []  # (rows, FAISS threads, after the commit started waiting)

    def piece(index, vectors):
        used.append((len(vectors), faiss.omp_get_max_threads(), waiting.is_set()))
        if not waiting.is_set():
            started.set()
            waiting.wait(10)  # hold the thread until the commit asks: the later pieces run after it
        add(index, vectors)

    def commit_waits(self):
        waiting.set()
        try:
            return result(self)
        finally:
            waiting.clear()

    monkeypatch.setattr(encoding, "add_vectors", piece)
    monkeypatch.setattr(BatchEncoder, "result", commit_waits)
    def ingest(st):  # on another thread than the store's opener: Store.threads still holds
        n = 0
        for c, parts in enumerate(_parts()):
            for vecs in parts:
                st.append([f"d{n + j}" for j in range(len(vecs))], embeddings=vecs)
                n += len(vecs)
            if c:  # trained: the batch's first piece has started (on one thread) before the commit
                assert started.wait(10)
                started.clear()
            st.commit()

    from concurrent.futures import ThreadPoolExecutor

    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index=FACTORY, threads=3) as st:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(ingest, st).result()
        manifest = st.manifest
    assert _segments(manifest) == _segments(reference)
    batches = [sum(len(p) for p in parts) for parts in _parts()[1:]]
    assert sum(rows for rows, _, _ in used) == sum(batches)
    assert max(rows for rows, _, _ in used) == 64
    assert {(threads, after) for _, threads, after in used} == {(1, False), (3, True)}
    assert [threads for _, threads, after in used if not after] == [1] * len(batches)  # one held per batch


def test_append_hands_the_gil_to_the_encoder_while_it_packs(tmp_path, monkeypatch, reference):
    """``append``'s packing loop calls ``let_run`` every YIELD_CHUNKS chunks while the encoder has
    pieces queued or running (FAISS's Ctrl-C check waits for the GIL otherwise); nothing stored changes."""
    from retrostore.store import writer

    monkeypatch.setattr(writer, "YIELD_CHUNKS", 16)
    calls = []
    let_run = BatchEncoder.let_run

    def spy(self):
        calls.append(self)
        let_run(self)

    monkeypatch.setattr(BatchEncoder, "let_run", spy)
    manifest = _build(tmp_path / "s", _parts())
    parts_after_training = sum(len(p) for parts in _parts()[1:] for p in parts)
    assert len(calls) >= parts_after_training // 16 - 6  # every 16 one-chunk documents, per part
    assert _segments(manifest) == _segments(reference)


def test_append_copies_the_callers_embeddings(tmp_path, reference):
    """A caller refilling its array after append (one buffer for every batch) changes nothing stored."""
    commits = _parts()
    originals = np.concatenate([p.copy() for parts in commits for p in parts])
    appended = [p for parts in commits for p in parts]

    def scribble(st, i):  # what a reused buffer does to the rows already given
        appended[i][:] = -appended[i]

    manifest = _build(tmp_path / "s", commits, scribble)
    assert _segments(manifest) == _segments(reference)
    with retrostore.open(tmp_path / "s") as st:
        _, ids = st.search_vectors(originals[::50], 1, params={"nprobe": 16, "rerank": 100})
        assert (ids[:, 0] == np.arange(0, len(originals), 50)).mean() > 0.95


def test_a_part_that_fails_to_encode_is_encoded_by_the_commit(tmp_path, monkeypatch, reference, caplog):
    calls = []
    add = encoding.add_vectors

    def flaky(index, vectors):
        calls.append(len(vectors))
        if len(calls) == 2:
            raise RuntimeError("simulated FAISS failure")
        add(index, vectors)

    monkeypatch.setattr(encoding, "add_vectors", flaky)
    with caplog.at_level(logging.WARNING, logger="retrostore"):
        manifest = _build(tmp_path / "s", _parts())
    assert len(calls) == 6 and "simulated FAISS failure" in caplog.text
    assert _segments(manifest) == _segments(reference)


def test_a_part_refused_by_lmdb_leaves_the_batch_whole(tmp_path, monkeypatch, reference):
    """A full disk refusing a part's records: the part is not staged, the encoder (which had
    started on it) is dropped, and the batch committed after the retry is the reference's."""
    from retrostore.storage.chunktable import ChunkTable

    put = ChunkTable.put_records
    state = {"fail": False}

    def full(self, chunks, docs):
        if state["fail"]:  # half the records written, then the disk is full
            state["fail"] = False
            put(self, chunks[:len(chunks) // 2], docs[:len(docs) // 2])
            raise retrostore.StoreIOError("simulated: no space left on device")
        return put(self, chunks, docs)

    monkeypatch.setattr(ChunkTable, "put_records", full)
    commits = _parts()
    n = 0
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index=FACTORY) as st:
        for c, parts in enumerate(commits):
            for p, vecs in enumerate(parts):
                docs = [f"d{n + j}" for j in range(len(vecs))]
                if c == 3 and p == 1:
                    state["fail"] = True
                    with pytest.raises(retrostore.StoreIOError):
                        st.append(docs, embeddings=vecs)
                    assert st._writer.batch.encoder is None
                st.append(docs, embeddings=vecs)
                n += len(vecs)
            st.commit()
        assert _segments(st.manifest) == _segments(reference)
        assert st.verify() == []


def test_no_encoder_thread_outlives_its_batch(tmp_path):
    import threading

    def encoders():
        return [t for t in threading.enumerate() if t.name.startswith("retrostore-encode")]

    rng = np.random.default_rng(1)
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index=FACTORY) as st:
        st.append([f"a{i}" for i in range(1000)], embeddings=_vectors(rng, 1000))
        st.commit()
        st.append([f"b{i}" for i in range(100)], embeddings=_vectors(rng, 100))
        assert st._writer.batch.encoder is not None
        st.commit()
        assert not encoders()
        st.append([f"c{i}" for i in range(100)], embeddings=_vectors(rng, 100))
        assert encoders()
    assert not encoders()  # closed without commit: the batch is discarded, its thread stopped


def test_an_embedder_reusing_its_output_buffer_changes_nothing_stored(tmp_path):
    """An embedder returning a view of one buffer it refills each call: the segment encoded while
    the parts were appended and the raw vectors file written at commit hold the same rows."""
    import faiss

    from retrostore.storage.vectors import RawVectors

    class BufferEmbedder(FakeEmbedder):
        def __init__(self):
            super().__init__()
            self.buf = np.zeros((5000, 64), np.float32)
            self.rng = np.random.default_rng(1)

        def embed(self, texts):
            self.buf[:len(texts)] = _vectors(self.rng, len(texts))
            return self.buf[:len(texts)]

    with retrostore.create(tmp_path / "s", embedder=BufferEmbedder(), index="IVF16,Flat") as st:
        st.append([f"hello world {i}" for i in range(1000)])
        st.commit()
        st.append([f"second batch {i}" for i in range(300)])
        st.append([f"third part {i}" for i in range(300)])  # refills the rows the first part came in
        st.commit()
        raw = RawVectors(st.path, st.manifest["vectors"]["files"], 64).take(np.arange(1000, 1600))
        inner = faiss.extract_index_ivf(st._head.version.segments[-1].index)
        inner.make_direct_map()
        rows = np.stack([inner.reconstruct(i) for i in range(600)])
        assert np.abs(rows - raw).max() < 1e-2  # float16 raw vectors against float32 Flat codes


def test_a_commit_that_loses_the_version_stops_the_encoder(tmp_path, monkeypatch):
    """A failed commit that cannot tell which version is current closes the handle (on_lost): the
    staged batch's encoder thread stops with it."""
    import threading

    from retrostore.storage import manifest as _manifest

    rng = np.random.default_rng(0)
    st = retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index=FACTORY)
    st.append([f"a{i}" for i in range(1000)], embeddings=_vectors(rng, 1000))
    st.commit()
    st.append([f"b{i}" for i in range(100)], embeddings=_vectors(rng, 100))
    write = _manifest.write_manifest

    def renamed_then_failed(root, new, *a, **k):
        write(root, new, *a, **k)
        raise OSError(5, "simulated: fsync failed after the rename")

    def cannot_restore(*a, **k):
        raise OSError(5, "simulated: the old manifest cannot be put back")

    monkeypatch.setattr(_manifest, "write_manifest", renamed_then_failed)
    monkeypatch.setattr(_manifest, "write_current", cannot_restore)
    with pytest.raises(retrostore.RetrostoreError):
        st.commit()
    st.close()
    assert st._closed
    assert not [t for t in threading.enumerate() if t.name.startswith("retrostore-encode")]


def test_after_the_commit_waited_pieces_run_on_one_thread_again(monkeypatch):
    """A failed commit keeps the batch staged with its encoder: later appended pieces run on one
    FAISS thread again, beside ``append`` (helper-55: they ran on every thread after it)."""
    rng = np.random.default_rng(5)
    template = faiss.index_factory(64, FACTORY, faiss.METRIC_INNER_PRODUCT)
    template.train(_vectors(rng, 1000))
    used = []
    add = encoding.add_vectors

    def piece(index, vectors):
        used.append(faiss.omp_get_max_threads())
        add(index, vectors)

    monkeypatch.setattr(encoding, "add_vectors", piece)
    enc = BatchEncoder(template, threads=2)
    try:
        enc.add(_vectors(rng, 100))
        assert enc.result().ntotal == 100  # what a commit that then fails took
        enc.add(_vectors(rng, 100))  # the retried batch's next part, appended
        enc._jobs[-1].result()
        assert used[-1] == 1
        assert enc.result().ntotal == 200
    finally:
        enc.close()
