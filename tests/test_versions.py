"""Versions and formats: retention, pinned versions, garbage collection,
format checks, LMDB map growth, commit cost, and read-only media."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

import retrostore
from retrostore import (
    FormatVersionError,
    InvalidInputError,
    NotAStoreError,
    ReadOnlyStoreError,
)
from retrostore.index.merge import MERGE_FACTOR
from retrostore.storage import chunktable as _chunks
from retrostore.storage import fileio as _fileio
from retrostore.storage import manifest as _manifest

from conftest import SHAKESPEARE


def _unit(rng, n):
    v = rng.standard_normal((n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _append(st, docs, rng):
    n = sum(len(c) for c in st.chunker.chunk_many(docs))
    return st.append(docs, embeddings=_unit(rng, n))


def _versions(path):
    return sorted(int(p.name[9:21]) for p in (path / "versions").glob("manifest-*.json"))


def _tree(path):
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in [path, *path.rglob("*")]}


def test_retention_and_pinned_versions(tmp_path, small_docs, embedder):
    """The last N versions stay openable; a pinned version sees exactly its
    chunks and documents on every read path, even after the writer has
    committed more and collected its files."""
    rng = np.random.default_rng(0)
    path = tmp_path / "s"
    texts = [d["text"] for d in small_docs]
    marks = {}
    with retrostore.create(path, embedder=embedder, retain_versions=2) as w:
        for b in range(5):
            _append(w, texts[2 * b : 2 * b + 2], rng)
            w.commit()
            marks[w.version] = (len(w), w.info()["documents"])
        assert _versions(path) == [4, 5]
        assert w._table.content_hashes(5) == (w.manifest["lmdb"]["chain"], [])  # the in-process chain check
        names = {e["path"] for v in (4, 5) for e in _manifest.referenced_files(_manifest.read_manifest(path, v))}
        assert {f"{d}/{p.name}" for d in ("index", "vectors") for p in (path / d).iterdir()} <= names
        with pytest.raises(NotAStoreError, match="not retained"):
            retrostore.open(path, version=3)
        with pytest.raises(NotAStoreError, match="never committed"):
            retrostore.open(path, version=6)
        with pytest.raises(InvalidInputError, match="mode='r'"):
            retrostore.open(path, "a", version=4)

        old = retrostore.open(path, version=4, embedder=embedder)
        new = retrostore.open(path, embedder=embedder)
        n_chunks, n_docs = marks[4]
        assert old.version == 4 and len(old) == n_chunks and old.info()["documents"] == n_docs
        assert old.verify() == []
        with pytest.raises(InvalidInputError):
            old.get_document(n_docs)
        with pytest.raises(InvalidInputError):
            old.get_chunks([n_chunks])
        with pytest.raises(InvalidInputError):
            old.get_metadata([n_docs])
        last = old.get_chunks([n_chunks - 1])[0]
        hits = old.search(last.text, k=len(w))
        assert len(hits) == n_chunks and max(h.chunk_id for h in hits) == n_chunks - 1
        assert next(h for h in hits if h.chunk_id == n_chunks - 1).continuation_text == ""
        nb = old.neighbors(np.asarray(last.tokens)[None, :], k=len(w))
        assert nb.chunk_ids.max() == n_chunks - 1
        assert old.get_document(last.doc_id).text == texts[last.doc_id]

        for b in range(5, 9):  # the writer moves on, merges segments (at 8) and collects version 4
            _append(w, texts[2 * b : 2 * b + 2], rng)
            w.commit()
        assert _versions(path) == [8, 9]
        assert not any((path / e["path"]).exists() for e in old.manifest["index"]["segments"])
        assert old.refresh() == 4  # pinned
        assert len(old.search(last.text, k=3)) == 3  # segments are in memory, records immutable
        assert old.get_document(last.doc_id).text == texts[last.doc_id]
        assert new.refresh() == 9 and len(new) == len(w)
        old.close()
        new.close()


def test_default_retention_and_readers_never_collect(tmp_path, small_docs, embedder):
    rng = np.random.default_rng(1)
    path = tmp_path / "s"
    with retrostore.create(path, embedder=embedder) as w:
        for t in [d["text"] for d in small_docs[:5]]:
            _append(w, [t], rng)
            w.commit()
    assert _versions(path) == [3, 4, 5]
    (path / "index" / "seg-orphan.faiss").write_bytes(b"left by a crashed writer")
    shutil.copy(path / "versions" / "manifest-000000000005.json", path / "versions" / "manifest-000000000001.json")
    before = _tree(path)
    for _ in range(2):
        with retrostore.open(path, embedder=embedder) as r:
            r.refresh()
            r.search("anything", k=2)
            r.info()
            assert r.verify() == []
    after = _tree(path)
    for t in (before, after):  # LMDB's reader table, which readers on writable media use by design
        t.pop("chunks.lmdb/lock.mdb")
    assert after == before  # readers write and delete nothing else
    with retrostore.open(path, "a"):
        pass
    assert not (path / "index" / "seg-orphan.faiss").exists() and _versions(path) == [3, 4, 5]


def test_identical_batches_keep_their_own_chunk_ids(tmp_path, small_docs, embedder):
    """The same documents with the same vectors committed several times make
    byte-identical segment files; each must still map to its own chunk ids,
    after refresh, reopen and merges (the long SIGKILL run found a merged
    segment counted wrong because loaded segments were shared by checksum)."""
    rng = np.random.default_rng(5)
    path = tmp_path / "s"
    docs = [small_docs[0]["text"], small_docs[1]["text"]]
    with retrostore.create(path, embedder=embedder) as w:
        n = sum(len(c) for c in w.chunker.chunk_many(docs))
        vecs = _unit(rng, n)
        for i in range(12):  # 8 identical segments merge at the 8th commit
            w.append(docs, embeddings=vecs)
            w.commit()
            if i in (2, 9):
                w.close()
                w = retrostore.open(path, "a")
            reader = retrostore.open(path)
            _scores, ids = reader.search_vectors(vecs[:1], k=i + 1)
            assert sorted(ids[0].tolist()) == [n * j for j in range(i + 1)]  # every copy, each at its own id
            assert all(c.text == reader.get_chunks([0])[0].text for c in reader.get_chunks(ids[0]))
            reader.close()
        assert w.verify() == []


def test_a_closed_handle_frees_its_files_without_the_garbage_collector(tmp_path, small_docs, embedder):
    """helper-57: a read-only handle's SegmentSet held bound methods of its Head (Head -> Version ->
    SegmentSet -> Head), so a closed and dropped handle kept its mapped vector files, their
    descriptors and its index until Python's cyclic collector ran; a server opening a handle per
    commit held 1,807 descriptors of the store after 650 commits. Now they go with the handle."""
    import gc

    path = tmp_path / "s.rstore"
    with retrostore.create(path, embedder=embedder) as st:
        for d in small_docs[:4]:  # several segments and vectors files
            st.append([d["text"]])
            st.commit()

    def held() -> int:
        fds = []
        for f in os.listdir("/proc/self/fd"):
            try:
                fds.append(os.readlink(f"/proc/self/fd/{f}"))
            except OSError:  # (the listing's own descriptor, closed by now)
                pass
        maps = open("/proc/self/maps").read()
        return sum(str(path) in f for f in fds) + maps.count(str(path))

    assert held() == 0  # (the writer above is closed, though `st` still names it)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for mode in ("r", "a"):
            st = retrostore.open(path, mode, embedder=embedder)
            st.search("read a file", k=3)
            assert held() > 0
            st.close()
            assert held() == 0, mode  # closed, though still referred to
            assert st.version >= 1 and "closed" in repr(st)
            with pytest.raises(retrostore.StoreClosedError):
                st.search("read a file", k=3)
            del st
    finally:
        if was_enabled:
            gc.enable()


def test_close_discards_staged_records(tmp_path, small_docs, embedder):
    """Staged records (documents without chunks included) leave LMDB at close."""
    rng = np.random.default_rng(4)
    path = tmp_path / "s"
    with retrostore.create(path, embedder=embedder) as w:
        _append(w, [small_docs[0]["text"]], rng)
        w.commit()
        w.append(["", "   "])  # documents without chunks only
    with retrostore.open(path) as r:
        stats = r._table.stats()
        assert stats["docs"]["last"] == 0 and stats["chunks"]["last"] == len(r) - 1 and stats["commits"]["last"] == 1


def test_newer_format_is_refused_naming_both_versions(tmp_path, embedder):
    path = tmp_path / "s"
    retrostore.create(path, embedder=embedder).close()
    original = _manifest.read_manifest(path)

    def _rewrite_manifest(path: Path, **changes) -> None:
        (path / "manifest.json").write_bytes(_manifest.encode_manifest(dict(original, **changes)))

    ours, newer = _manifest.FORMAT_VERSION, _manifest.FORMAT_VERSION + 1
    _rewrite_manifest(path, format_version=newer, min_reader_version=newer)
    with pytest.raises(FormatVersionError) as info:
        retrostore.open(path)
    msg = str(info.value)
    assert f"format_version {newer}" in msg and f"reads format version {ours}" in msg and "Upgrade" in msg
    _rewrite_manifest(path, format_version=newer, min_reader_version=1)  # newer, readable by us
    with retrostore.open(path) as st:
        assert st.manifest["format_version"] == newer
    with pytest.raises(FormatVersionError, match=f"format_version {newer}.*writes format version {ours}"):
        retrostore.open(path, "a")


def test_lmdb_map_grows_and_files_stay_compact(tmp_path, embedder, monkeypatch):
    """Appending far more than the initial map never shows a map-full error;
    the data file holds only used pages (LMDB does not pre-allocate it)."""
    path = tmp_path / "s"
    with retrostore.create(path, embedder=embedder):
        pass
    assert (path / "chunks.lmdb" / "data.mdb").stat().st_size < 64 << 10  # a new store is small
    monkeypatch.setattr(_chunks, "_INITIAL_MAP_BYTES", 256 << 10)  # small, to grow it several times
    text = SHAKESPEARE.read_text()
    docs = [text[i : i + 20_000] for i in range(0, 600_000, 20_000)]
    rng = np.random.default_rng(2)
    with retrostore.open(path, "a") as w:
        _append(w, docs, rng)
        w.commit()
        info = w._table.env.info()
        assert info["map_size"] > 1 << 20
        size = (path / "chunks.lmdb" / "data.mdb").stat().st_size
        assert size == (info["last_pgno"] + 1) * w._table.env.stat()["psize"] and size < info["map_size"]
        assert w.verify() == []
    with retrostore.open(path, "a") as w:  # reopened with a map smaller than the file
        _append(w, docs[:5], rng)
        assert w.commit() == 2 and w.verify() == []
    with retrostore.open(path) as r:
        assert r.get_document(0).text == docs[0]


def test_commit_cost_does_not_grow_with_history(tmp_path, small_docs, embedder, monkeypatch):
    """70 one-document commits: the manifest, the number of files and the
    bytes a commit writes stay bounded (tiered merges keep segments and
    vectors files O(log n)); a writer reopened mid-way merges segments it
    read back from disk."""
    written = []
    real_write = _fileio._write
    monkeypatch.setattr(_fileio, "_write", lambda fd, data: written.append(len(data)) or real_write(fd, data))
    rng = np.random.default_rng(3)
    path = tmp_path / "s"
    texts = [d["text"] for d in small_docs if len(d["text"]) < 200][:4]
    per_commit, manifest_bytes = [], []
    w = retrostore.create(path, embedder=embedder)
    for i in range(70):
        if i == 30:
            w.close()
            w = retrostore.open(path, "a")
        _append(w, [texts[i % len(texts)]], rng)
        written.clear()
        w.commit()
        manifest_bytes.append((path / "manifest.json").stat().st_size)
        per_commit.append(sum(written) - 2 * manifest_bytes[-1])  # the batch's files (the manifest is written twice)
        m = w.manifest
        assert len(m["index"]["segments"]) == len(m["vectors"]["files"]) <= 3 * (MERGE_FACTOR - 1) + 1
        assert len(_versions(path)) <= 3
        retained = {e["path"] for v in _versions(path)
                    for e in _manifest.read_manifest(path, v)["index"]["segments"]}
        on_disk = {f"index/{p.name}" for p in (path / "index").iterdir()}
        assert on_disk == retained and len(on_disk) <= 3 * (3 * (MERGE_FACTOR - 1) + 1)
    early, late = sorted(per_commit[1:8])[3], sorted(per_commit[-8:])[3]  # medians skip merging commits
    assert late < 1.2 * early, (early, late)
    # the manifest lists O(log n) segments and vectors files, never one entry per commit
    assert max(manifest_bytes[-10:]) < 2 * max(manifest_bytes[:10]), (manifest_bytes[:10], manifest_bytes[-10:])
    assert w.verify() == []
    w.close()


def _chmod_tree(path: Path, writable: bool) -> None:
    for p in [path, *path.rglob("*")]:
        mode = p.stat().st_mode
        os.chmod(p, mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_read_only_store_is_used_without_writing(built_store, tmp_path, embedder):
    """chmod -R a-w, like a downloaded artifact: open, search, inspect and
    verify work and nothing in the directory is created or modified (no LOCK,
    no lock.mdb). Tests run as root, so this is checked by listing."""
    path = tmp_path / "artifact.rstore"
    shutil.copytree(built_store, path)
    (path / "LOCK").unlink()
    (path / "chunks.lmdb" / "lock.mdb").unlink()
    _chmod_tree(path, writable=False)
    try:
        before = _tree(path)
        with retrostore.open(path, embedder=embedder) as st:
            assert st.readonly_media
            hits = st.search("decode base64 data", k=3)
            assert len(hits) == 3 and st.get_chunks([hits[0].chunk_id])[0].text == hits[0].text
            assert st.get_document(hits[0].doc_id).text
            assert st.info()["readonly_media"] is True
            assert st.verify() == []
            assert st.refresh() == st.version
        with pytest.raises(ReadOnlyStoreError, match="read-only media"):
            retrostore.open(path, "a")
        assert _tree(path) == before
        assert not (path / "LOCK").exists() and not (path / "chunks.lmdb" / "lock.mdb").exists()
    finally:
        _chmod_tree(path, writable=True)
