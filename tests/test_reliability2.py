"""Regression tests for the failures listed in issue #16 (reliability, round 2).

Each test showed one failure on the code it was written against (as a strict
xfail, red once fixed) and now guards its fix. Everything is real: real stores,
files, LMDB, FAISS, a full disk made by powerfs's quota, text of the shared
corpus where text matters (random unit vectors where only the vectors matter,
through ``append(..., embeddings=...)``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import retrostore
from retrostore import InvalidInputError, RetrostoreError

import _powercut

DIM = 32


class Embedder32:
    """A fixed 32-d embedder (the tests pass vectors; nothing is embedded)."""

    dim = DIM
    fingerprint = {"kind": "test", "name": "fixed32", "model_sha256": "3" * 64, "dim": DIM}

    def embed(self, texts):
        return np.ones((len(texts), DIM), np.float32) / np.sqrt(DIM)


def unit(seed: int, n: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_store(path: Path, **kw) -> retrostore.Store:
    return retrostore.create(path, embedder=Embedder32(), tokenizer=retrostore.default_tokenizer_path(), **kw)


def add(st, docs: list[str], seed: int) -> list[int]:
    n = sum(len(c) for c in st.chunker.chunk_many(docs))
    return st.append(docs, metadata=[{"seed": seed, "j": j} for j in range(len(docs))], embeddings=unit(seed, n))


def words(n: int, offset: int = 0) -> list[str]:
    """``n`` one-chunk documents."""
    return [f"document number {offset + i} about topic {(offset + i) % 97}" for i in range(n)]


# -- #16.1: every factory create accepts survives small commits, merges, compaction ------------
FACTORIES = [
    "Flat",
    "IVF16,Flat",
    "IVF16,RFlat",  # FAISS rejects it: refused at create
    "IVF16,Flat,RFlat",  # refine wrappers merge by rebuilding from the stored vectors (they wedged the store)
    "IVF16,Flat,Refine(Flat)",
    "NSG8,Flat",  # cannot add small batches: refused at create
    "HNSW16",
    # PQ8 trains 256 centroids per sub-quantizer on 10,000 vectors (30 s on a loaded 2-core machine): -m slow
    pytest.param("IVF16,PQ8", marks=pytest.mark.slow),
    pytest.param("PQ8", marks=pytest.mark.slow),
    "SQ8",
    "LSH",
    "IVF16,SQ8",
]


@pytest.mark.parametrize("factory", FACTORIES)
def test_every_accepted_factory_survives_small_commits_and_compaction(tmp_path, factory):
    """create(index=F), a first batch big enough to train F, 50 small commits (tier merges),
    a delete, compact, search and verify: all work, or create refused F."""
    try:
        st = make_store(tmp_path / "s", index=factory)
    except InvalidInputError:
        return  # refused at create: allowed
    with st:
        add(st, words(10_000 if "PQ" in factory else 700), 0)  # PQ8 trains on 39 x 256 vectors, IVF16 on 39 x 16
        st.commit()
        for i in range(50):
            add(st, words(1 + i % 3, 10_000 + 10 * i), i + 1)
            st.commit()  # the 8th, 16th, ... merge segments
        assert st.version == 51
        st.delete([3])
        st.commit()
        st.compact(progress=False)
        _scores, ids = st.search_vectors(unit(99, 2), k=5)
        assert (ids >= 0).all() and 3 not in ids
        assert st.verify() == []


# -- #16.2: a reader opened before delete + compact keeps working -------------------------------
def _three_doc_store(path: Path, texts: list[str]) -> np.ndarray:
    """A store of three real documents whose chunk vectors are known; returns them."""
    with make_store(path) as st:
        chunks = st.chunker.chunk_many(texts[:3])
        vecs = unit(7, sum(len(c) for c in chunks))
        st.append(texts[:3], embeddings=vecs)
        st.commit()
    return vecs


def test_reader_opened_before_compact_keeps_working(tmp_path, small_docs):
    """#16.2: a reader of a version before a delete + compact keeps working: it learns the purge
    (take-downs win over its older version), so search skips the purged chunks and reading the
    purged document by id says it was deleted; no CorruptStoreError, other documents unchanged."""
    texts = [d["text"] for d in small_docs]
    path = tmp_path / "s"
    vecs = _three_doc_store(path, texts)
    with retrostore.open(path) as reader:
        first = reader.get_document(1).chunk_ids[0]
        with retrostore.open(path, "a") as w:
            w.delete([1])
            w.commit()
            w.compact(progress=False)
        _scores, ids = reader.search_vectors(vecs[first], k=3)
        assert first not in ids and (ids >= 0).all()
        for read in (lambda: reader.get_chunks([first]), lambda: reader.get_document(1),
                     lambda: reader.get_metadata([1])):
            with pytest.raises(retrostore.InvalidInputError, match="deleted"):
                read()
        assert reader.get_document(0).text == texts[0] and reader.get_document(2).text == texts[2]
        assert (reader.neighbor_tokens(np.array([[first, 0]])).chunk_ids == [[-1, 0]]).all()
    with retrostore.open(path) as fresh:
        assert fresh.verify() == []


def test_reader_processes_through_compactions(tmp_path, small_docs, workers):
    """#16.2: a reader process opened before three rounds of delete + commit + compact searches the
    vectors of the deleted documents the whole time and resolves its hits, without an error; after
    the last round it no longer returns any purged chunk."""
    import _rel2_workers

    texts = [d["text"] for d in small_docs]
    path = tmp_path / "s"
    with make_store(path) as st:
        docs = texts[:8]
        vecs = unit(8, sum(len(c) for c in st.chunker.chunk_many(docs)))
        st.append(docs, embeddings=vecs)
        st.commit()
    np.save(tmp_path / "q.npy", vecs)
    ready, stop, out = tmp_path / "ready", tmp_path / "stop", tmp_path / "out.json"
    proc = workers.Process(target=_rel2_workers.old_reader,
                           args=(str(path), str(tmp_path / "q.npy"), str(ready), str(stop), str(out)))
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists(), "the reader did not start"
        with retrostore.open(path, "a") as w:
            for round_, doc in enumerate((1, 4, 6)):
                w.delete([doc])
                w.commit()
                w.compact(progress=False)
                add(w, [texts[10 + round_]], 50 + round_)
                w.commit()
                time.sleep(0.2)  # the reader searches this version's aftermath
    finally:
        stop.touch()
        proc.join(60)
    result = json.loads(out.read_text())
    assert result["searches"] > 0
    assert result["errors"] == [], result.get("trace", result["errors"])
    with retrostore.open(path) as st:
        purged = set(st._head.version.tombstones.chunks.tolist())  # chunks of documents 1, 4 and 6
    assert purged and set(result["learned"]) == purged  # the old reader learned every purge
    assert not set(result["last_ids"]) & purged


# -- #16.3: compact killed right after its manifest rename --------------------------------------
def test_compact_killed_after_manifest_rename_verifies_and_packs(tmp_path, small_docs, workers):
    import _rel2_workers

    texts = [d["text"] for d in small_docs]
    path = tmp_path / "s"
    _three_doc_store(path, texts)
    with retrostore.open(path, "a") as w:
        w.delete([1])
        w.commit()
    proc = workers.Process(target=_rel2_workers.compact_killed_after_manifest_rename, args=(str(path),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    with retrostore.open(path) as st:
        assert st.version == 3  # the compact's version is published
        problems = st.verify()
    cli = subprocess.run([sys.executable, "-m", "retrostore", "verify", str(path)], capture_output=True, text=True)
    packed = None
    try:
        retrostore.pack(path, tmp_path / "s.tar")
        packed = True
    except RetrostoreError as exc:
        packed = f"{type(exc).__name__}: {exc}"
    assert problems == [], problems
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert packed is True, packed


# -- #16.4: compact of an IVF...,RFlat store ------------------------------------------------------
def test_compact_of_a_refine_flat_store(tmp_path):
    path = tmp_path / "s"
    with make_store(path, index="IVF16,Flat,RFlat") as st:
        add(st, words(700), 0)
        st.commit()  # trains IVF16 (39 x 16 vectors needed)
        assert st.manifest["index"]["factory"] == "IVF16,Flat,RFlat"
        add(st, words(3, 700), 1)
        st.commit()  # a second segment: compact has something to merge
        st.delete([2])
        st.commit()
        st.compact(progress=False)
        assert len(st.manifest["index"]["segments"]) == 1
        _scores, ids = st.search_vectors(unit(3, 2), k=5)
        assert (ids >= 0).all() and 2 not in ids
        assert st.verify() == []


# -- #16.5: precompute_neighbors and stale or foreign partial files ------------------------------
def _save(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:  # np.save(name) would append ".npy"
        np.save(fh, arr)


def _neighbors_store(path: Path, n: int, seed: int) -> None:
    with make_store(path) as st:
        add(st, words(n), seed)
        st.commit()


def _interrupted_run(st, out: Path, monkeypatch) -> None:
    """A real precompute of ``st`` into ``out`` stopped after its first batch: it leaves
    ``OUT.partial`` and a progress file with the real parameters."""
    from retrostore.store import precompute

    real = precompute.atomic_write

    def stop(*a, **kw):
        real(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(precompute, "atomic_write", stop)
    with pytest.raises(KeyboardInterrupt):
        st.precompute_neighbors(out, k=2, batch_size=4, progress=False)
    monkeypatch.setattr(precompute, "atomic_write", real)
    assert (out.parent / (out.name + ".partial")).exists() and (out.parent / (out.name + ".progress.json")).exists()


def test_precompute_ignores_a_stale_partial_of_another_shape(tmp_path, monkeypatch):
    """#16.5: a partial file of another shape beside a progress file that matches is not trusted."""
    path = tmp_path / "s"
    _neighbors_store(path, 10, 1)
    out = tmp_path / "nb.npy"
    with retrostore.open(path) as st:
        fresh = np.load(st.precompute_neighbors(tmp_path / "fresh.npy", k=2, progress=False))
        _interrupted_run(st, out, monkeypatch)
        _save(tmp_path / "nb.npy.partial", np.zeros((20, 2), np.int64))  # another run's file in its place
        got = np.load(st.precompute_neighbors(out, k=2, progress=False))
    assert got.shape == (10, 2) and (got == fresh).all()


def test_precompute_ignores_a_foreign_partial(tmp_path, monkeypatch):
    """#16.5: the leftovers of a run on another store (same version number, same arguments) are not
    trusted: the progress file names the store by its manifest's sha256."""
    out = tmp_path / "nb.npy"
    _neighbors_store(tmp_path / "other", 10, 3)
    with retrostore.open(tmp_path / "other") as other:
        _interrupted_run(other, out, monkeypatch)
    _save(tmp_path / "nb.npy.partial", np.full((10, 2), 7, np.int64))
    path = tmp_path / "s"
    _neighbors_store(path, 10, 2)
    with retrostore.open(path) as st:
        fresh = np.load(st.precompute_neighbors(tmp_path / "fresh.npy", k=2, progress=False))
        got = np.load(st.precompute_neighbors(out, k=2, progress=False))
    assert (got == fresh).all()


# -- #16.6: a full disk ---------------------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path, small_docs, request):
    """A store on a powerfs mount whose byte quota leaves ``request.param`` bytes free (a real
    ENOSPC from write(2), no root mount needed); yields (mount, store path)."""
    reason = _powercut.fuse_unavailable()
    if reason:
        pytest.skip(f"a full disk is made with powerfs's byte quota, which needs FUSE: {reason}")
    backing = tmp_path / "backing"
    backing.mkdir()
    _three_doc_store(backing / "s", [d["text"] for d in small_docs])
    used = sum(p.stat().st_size for p in backing.rglob("*") if p.is_file())
    with _powercut.Mount(backing, tmp_path / "mnt", tmp_path / "images", quota_bytes=used + request.param) as m:
        yield m, tmp_path / "mnt" / "s"


def _is_disk_full_error(exc: BaseException) -> bool:
    import errno as _errno

    return isinstance(exc, RetrostoreError) and isinstance(exc, OSError) and exc.errno == _errno.ENOSPC


@pytest.mark.parametrize("full_disk", [256 << 10], indirect=True)
def test_append_on_a_full_disk_raises_a_documented_error(full_disk, small_docs):
    _mount, path = full_disk
    texts = [d["text"] for d in small_docs]
    with retrostore.open(path, "a") as st:
        docs = texts * 20  # far more than 256 KiB of LMDB records
        with pytest.raises(BaseException) as info:
            add(st, docs, 5)
        assert _is_disk_full_error(info.value), repr(info.value)
    with retrostore.open(path) as r:
        assert r.version == 1 and r.verify() == []


@pytest.mark.parametrize("full_disk", [8 << 10], indirect=True)  # too little for pack's LMDB copy
def test_pack_on_a_full_disk_raises_oserror(full_disk):
    mount, path = full_disk
    out = mount.mountpoint / "s.tar"
    with pytest.raises(BaseException) as info:
        retrostore.pack(path, out)
    assert isinstance(info.value, OSError), repr(info.value)  # docs: "OSError: writing the archive failed"
    assert not out.exists()
    assert not [p.name for p in mount.mountpoint.iterdir() if p.name.startswith(".tmp-")]


# -- #16.7: a FIFO or a directory where a store file should be ---------------------------------
_OPEN_IN_CHILD = textwrap.dedent("""
    import signal, sys, retrostore
    signal.alarm(8)  # a hang dies with SIGALRM; an open of this small store takes well under a second
    try:
        retrostore.open(sys.argv[1], sys.argv[2]).close()
        print("opened")
    except retrostore.RetrostoreError as exc:
        print("RetrostoreError", type(exc).__name__, exc)
    except BaseException as exc:
        print("OTHER", type(exc).__name__, exc)
""")


def _replace(path: Path, kind: str) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()


@pytest.mark.parametrize("target,kind,mode", [
    ("segment", "fifo", "r"),
    ("tokenizer.json", "fifo", "r"),
    ("chunks.lmdb/data.mdb", "dir", "r"),
    ("LOCK", "dir", "a"),
])
def test_special_files_in_a_store_are_refused_promptly(tmp_path, small_docs, target, kind, mode):
    path = tmp_path / "s"
    _three_doc_store(path, [d["text"] for d in small_docs])
    if target == "segment":
        target = retrostore.open(path).manifest["index"]["segments"][0]["path"]
    _replace(path / target, kind)
    r = subprocess.run([sys.executable, "-c", _OPEN_IN_CHILD, str(path), mode], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != -signal.SIGALRM, f"open(mode={mode!r}) hung with a {kind} at {target}"
    assert r.stdout.startswith("RetrostoreError CorruptStoreError") and target.split("/")[-1] in r.stdout, \
        r.stdout + r.stderr[-2000:]


# -- #16.8: unpack where tarfile.data_filter is missing ------------------------------------------
def test_unpack_without_tarfile_data_filter(tmp_path, built_store, monkeypatch):
    """Python 3.12 added tarfile.data_filter; 3.11.4, 3.10.12, 3.9.17 and 3.8.17 back-ported it.
    Debian 12's python3 (3.11.2) lacks it, and requires-python is >=3.10."""
    import tarfile

    retrostore.pack(built_store, tmp_path / "a.tar")
    monkeypatch.delattr(tarfile, "data_filter")
    monkeypatch.delattr(tarfile, "FilterError")
    retrostore.unpack(tmp_path / "a.tar", tmp_path / "u")
    with retrostore.open(tmp_path / "u") as st:
        assert st.verify() == []


# -- also noted in #16 ------------------------------------------------------------------------------
def test_reindex_without_raw_vectors_raises_no_raw_vectors_error(tmp_path):
    path = tmp_path / "s"
    with make_store(path, keep_vectors=False) as st:
        add(st, words(700), 0)
        st.commit()
        st.reindex("IVF16,SQ8", progress=False)  # a compressed index: the vectors are gone
        with pytest.raises(retrostore.NoRawVectorsError):
            st.reindex("IVF16,Flat", progress=False)


def test_get_document_refuses_a_bool(built_store):
    with retrostore.open(built_store) as st:
        with pytest.raises(InvalidInputError):
            st.get_document(True)


@pytest.mark.filterwarnings("ignore:Casting complex values")  # numpy's ComplexWarning: the very cast
def test_complex_query_vectors_are_refused(built_store):
    with retrostore.open(built_store) as st:
        q = np.ones((1, st.manifest["index"]["dim"]), np.complex64) * (1 + 1j)
        with pytest.raises(InvalidInputError):
            st.search_vectors(q, k=1)


def test_manifest_records_the_faiss_version(built_store):
    import faiss

    m = retrostore.open(built_store).manifest
    assert faiss.__version__ in json.dumps(m["index"])


OPEN_TOGETHER = """
import faulthandler, sys, threading
import retrostore
faulthandler.dump_traceback_later(90, exit=True)  # a hang prints every thread's stack and fails
store = sys.argv[1]
for _ in range(150):
    start = threading.Barrier(4)
    def work():
        start.wait()
        retrostore.open(store).close()  # one handle per thread, none shared
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
print("done")
"""


def test_threads_opening_one_store_together_do_not_hang(built_store):
    """helper-52: handles of one store share one LMDB environment per process, and LMDB's table open
    (mdb_dbi_open) must not run in two transactions at once: 2-4 threads each opening a handle hung
    the process within a few rounds (no CPU used)."""
    out = subprocess.run([sys.executable, "-c", OPEN_TOGETHER, str(built_store)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["done"], (out.returncode, out.stderr[-3000:])


OPEN_BESIDE_WRITER = """
import sys, threading
import numpy as np
import retrostore
path = sys.argv[1]
w = retrostore.open(path, "a")
rng = np.random.default_rng(0)
stop, opens, errors = threading.Event(), [0], []
def opener():
    while not stop.is_set():
        try:
            with retrostore.open(path) as r:  # a reader thread (or pack, verify) opening a handle
                r.get_chunks([0])
                opens[0] += 1
        except Exception as exc:
            errors.append(repr(exc))
t = threading.Thread(target=opener, daemon=True)
t.start()
try:
    for i in range(12):
        texts = [f"commit {i} document {j} word " * 1500 for j in range(6)]
        n = sum(len(c) for c in w.chunker.chunk_many(texts))
        x = rng.standard_normal((n, 384)).astype(np.float32)
        w.append(texts, embeddings=x / np.linalg.norm(x, axis=1, keepdims=True))
        w.commit()
finally:
    stop.set()
t.join(30)
w.close()
print("done", opens[0] > 0, errors)
"""


def test_opening_a_handle_beside_this_process_writer_does_not_hang(built_store, tmp_path):
    """helper-53: a second handle's table open ran LMDB's write transaction, which waits for the
    writer lock holding the GIL: opened while this process's writer thread was inside a commit, it
    hung the process for good (at the first commit). Tables are opened once per environment now."""
    import shutil

    path = tmp_path / "s"
    shutil.copytree(built_store, path)
    out = subprocess.run([sys.executable, "-c", OPEN_BESIDE_WRITER, str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["done", "True", "[]"], (out.returncode, out.stdout,
                                                                                 out.stderr[-3000:])


def test_a_reader_that_did_not_refresh_verifies_the_store_not_its_retired_version(tmp_path, built_store):
    """helper-53: verify() on a reader handle while another process compacted reported files
    "missing" from an intact store (the handle's version was retired). It now checks the newest
    version; a handle pinned to a version still checks that version."""
    import shutil

    path = tmp_path / "s"
    shutil.copytree(built_store, path)
    reader = retrostore.open(path)
    with retrostore.open(path, "a") as w:
        w.delete([1])
        w.commit()
        w.compact(progress=False)
        newest = w.version
    assert reader.version < newest
    assert reader.verify() == []
    assert reader.version < newest  # verify does not move the handle
    with retrostore.open(path, version=newest) as pinned:
        assert pinned.verify() == []
    (path / "vectors").joinpath(sorted(p.name for p in (path / "vectors").iterdir())[0]).write_bytes(b"x")
    assert reader.verify()  # real damage in the newest version is still reported
    reader.close()
