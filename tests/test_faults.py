"""Fault injection on the commit path: every write, fsync and rename fails in turn.

The fault layer replaces ``_fileio._write``, ``_fileio._fsync``,
``_fileio._rename`` and ``_fileio.sync_lmdb`` (the only ways the commit and
create paths write, sync and rename) with wrappers that count calls and raise
OSError(ENOSPC or EIO) at a chosen one. Everything else is real: real files,
real LMDB, real FAISS, real text.
"""

from __future__ import annotations

import errno
import os
import shutil

import numpy as np
import pytest

import retrostore
from retrostore import CommitError, NotAStoreError, StoreClosedError, StoreIOError
from retrostore.storage import fileio as _fileio

ERRNOS = [errno.ENOSPC, errno.EIO]


class Faults:
    """Counts commit-path I/O calls; fails call number ``fail_at`` (and, when
    ``sticky``, every later one) with ``OSError(code)``."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.fail_at: int | None = None
        self.fail_name: str | None = None  # fail the first call of this name instead
        self.code = errno.EIO
        self.sticky = False
        for name in ("_write", "_fsync", "_rename", "sync_lmdb"):
            monkeypatch.setattr(_fileio, name, self._wrap(name, getattr(_fileio, name)))

    def _wrap(self, name, real):
        def call(*args):
            i = len(self.calls)
            self.calls.append(name)
            if name == self.fail_name and self.calls.count(name) == 1:
                raise OSError(self.code, f"{os.strerror(self.code)} (injected into {name})")
            if self.fail_at is not None and (i == self.fail_at or (self.sticky and i > self.fail_at)):
                raise OSError(self.code, f"{os.strerror(self.code)} (injected into {name})")
            return real(*args)

        return call

    def arm(self, at: int, code: int, sticky: bool = False) -> None:
        self.calls, self.fail_at, self.code, self.sticky = [], at, code, sticky

    def arm_name(self, name: str, code: int) -> None:
        self.calls, self.fail_name, self.code = [], name, code

    def disarm(self) -> None:
        self.fail_at = self.fail_name = None


@pytest.fixture
def faults(monkeypatch):
    return Faults(monkeypatch)


def _unit(rng, n):
    v = rng.standard_normal((n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _append(st, docs, rng):
    n = sum(len(c) for c in st.chunker.chunk_many(docs))
    return st.append(docs, metadata=[{"i": i} for i in range(len(docs))], embeddings=_unit(rng, n))


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "lock.mdb"
                  and p.name != "data.mdb")


def _intact(path, version, listing, manifest_bytes, full=True):
    """The previous version is current, verifies (when ``full``) and searches;
    the failed commit left no file behind and no readable manifest of its version."""
    assert (path / "manifest.json").read_bytes() == manifest_bytes
    assert _listing(path) == listing
    with retrostore.open(path) as r:
        assert r.version == version
        if full:
            assert r.verify() == []
        if len(r):
            _scores, ids = r.search_vectors(_unit(np.random.default_rng(0), 2), k=3)
            assert ((ids >= 0) & (ids < len(r))).all()
            assert all(c.text for c in r.get_chunks(ids.ravel()))
    with pytest.raises(NotAStoreError):
        retrostore.open(path, version=version + 1)


def test_each_commit_step_failing(tmp_path, small_docs, embedder, faults):
    """Fail each I/O call of a commit in turn, with ENOSPC and then EIO; each
    time the commit raises a clear CommitError, the previous version stays
    intact, and commit() once the fault is gone publishes exactly the staged
    batch."""
    rng = np.random.default_rng(1)
    path = tmp_path / "s"
    texts = [d["text"] for d in small_docs]
    with retrostore.create(path, embedder=embedder) as st:
        _append(st, texts[:3], rng)
        st.commit()
        kinds = set()
        i = 0
        while True:
            version, listing = st.version, _listing(path)
            manifest_bytes = (path / "manifest.json").read_bytes()
            docs = [texts[(3 + i) % len(texts)], texts[(4 + i) % len(texts)]]
            ids = _append(st, docs, rng)
            published = False
            for code in ERRNOS:
                faults.arm(i, code)
                try:
                    st.commit()
                except CommitError as exc:
                    assert exc.errno == code
                    msg = str(exc)
                    assert "commit failed while " in msg and "previous version is intact" in msg, msg
                    kinds.add(faults.calls[i])
                    faults.disarm()
                    _intact(path, version, listing, manifest_bytes, full=code == errno.ENOSPC)
                else:
                    published = True
                    break
            faults.disarm()
            if published:
                assert st.version == version + 1
                break
            assert st.commit() == version + 1  # the staged batch, now that the fault is gone
            assert [st.get_document(d).text for d in ids] == docs
            if i % 4 == 0:
                assert st.verify() == []
            i += 1
        # Which call comes at position i depends on the commit (tiered merges write more):
        # fail the first call of each kind once more, so that every kind is seen failing.
        for name in ("_write", "_fsync", "_rename", "sync_lmdb"):
            version, listing = st.version, _listing(path)
            manifest_bytes = (path / "manifest.json").read_bytes()
            _append(st, texts[:1], rng)
            faults.arm_name(name, errno.EIO)
            with pytest.raises(CommitError, match="previous version is intact"):
                st.commit()
            kinds.add(name)
            faults.disarm()
            _intact(path, version, listing, manifest_bytes)
            assert st.commit() == version + 1
        assert i >= 12 and kinds == {"_write", "_fsync", "_rename", "sync_lmdb"}, (i, kinds)
    with retrostore.open(path) as r:
        assert r.version == i + 6 and r.verify() == []
        assert r.info()["documents"] == 3 + 2 * (i + 1) + 4


def test_merging_commit_failing_at_each_step(tmp_path, small_docs, embedder, faults):
    """A commit that merges segments (and vectors files) fails at every step
    in turn while its batch stays staged; the store stays at the previous
    version throughout, and the commit succeeds once the faults stop."""
    rng = np.random.default_rng(9)
    path = tmp_path / "s"
    texts = [d["text"] for d in small_docs[:8]]
    with retrostore.create(path, embedder=embedder) as st:
        for t in texts[:7]:
            _append(st, [t], rng)
            st.commit()
        assert len(st.manifest["index"]["segments"]) == 7
        version, listing = st.version, _listing(path)
        manifest_bytes = (path / "manifest.json").read_bytes()
        ids = _append(st, texts[7:], rng)
        i = 0
        while True:
            faults.arm(i, errno.EIO if i % 2 else errno.ENOSPC)
            try:
                st.commit()
                break
            except CommitError:
                faults.disarm()
                _intact(path, version, listing, manifest_bytes, full=i % 3 == 0)
                i += 1
        faults.disarm()
        assert i >= 12 and st.version == version + 1
        m = st.manifest
        assert len(m["index"]["segments"]) == 1 and len(m["vectors"]["files"]) == 1
        assert m["index"]["segments"][0]["count"] == len(st)
        assert st.get_document(ids[0]).text == texts[7]
        assert st.verify() == []


def test_failure_after_rename_whose_rollback_also_fails(tmp_path, small_docs, embedder, faults):
    """The directory fsync after manifest.json's rename fails and so does every
    later call (putting the old manifest back): the writer says the current
    version is unknown and closes; reopening finds a consistent store."""
    rng = np.random.default_rng(2)
    path = tmp_path / "s"
    st = retrostore.create(path, embedder=embedder)
    _append(st, [small_docs[0]["text"]], rng)
    st.commit()
    ids = _append(st, [small_docs[1]["text"]], rng)
    faults.arm(10_000, errno.EIO)
    st.commit()  # count the calls of a plain commit
    n_calls = len(faults.calls)
    assert faults.calls[-2:] == ["_rename", "_fsync"]
    ids = _append(st, [small_docs[2]["text"]], rng)
    faults.arm(n_calls - 1, errno.EIO, sticky=True)
    with pytest.raises(CommitError, match="unknown; this writer was closed"):
        st.commit()
    faults.disarm()
    with pytest.raises(StoreClosedError):
        st.append("more")
    st.close()
    with retrostore.open(path, "a") as w:  # manifest.json names the new version: its files were kept
        assert w.version == 3 and w.verify() == []
        assert w.get_document(ids[0]).text == small_docs[2]["text"]
        _append(w, [small_docs[3]["text"]], rng)
        assert w.commit() == 4


def test_create_failing_at_each_step(tmp_path, embedder, faults):
    """create() fails at each write, fsync and rename in turn (ENOSPC and EIO
    alternately): nothing is left at the path (nor a temporary directory
    beside it), and a later create works."""
    faults.arm(10_000, errno.EIO)
    retrostore.create(tmp_path / "probe", embedder=embedder).close()
    n_calls = len(faults.calls)
    assert n_calls >= 8 and "_rename" in faults.calls
    for i in range(n_calls):
        path = tmp_path / f"s{i}"
        if i % 2:
            path.mkdir()  # an existing empty directory is replaced, or left as it was
        code = ERRNOS[i % 2]
        faults.arm(i, code)
        with pytest.raises(CommitError, match="nothing was created") as info:
            retrostore.create(path, embedder=embedder)
        faults.disarm()
        assert info.value.errno == code
        assert (path.is_dir() and not any(path.iterdir())) if i % 2 else not path.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
        with retrostore.create(path, embedder=embedder) as st:
            assert st.version == 0
            if i == n_calls - 1:
                assert st.verify() == []
        shutil.rmtree(path)


@pytest.mark.parametrize("what", ["compact", "reindex"])
def test_maintenance_failing_at_each_step(tmp_path, small_docs, embedder, faults, what):
    """compact (with a purge) and reindex fail at each write, fsync and rename in turn (ENOSPC
    and EIO alternately): a StoreIOError, a RetrostoreError that names the errno and says
    whether the version was published (helper-37: a bare OSError traceback on a full disk);
    unpublished, the previous version is intact with no file left behind; run again, it works."""
    rng = np.random.default_rng(2)
    path = tmp_path / "s"
    texts = [d["text"] for d in small_docs]
    with retrostore.create(path, embedder=embedder) as st:
        for i in range(3):
            _append(st, texts[3 * i:3 * i + 3], rng)
            st.commit()
        st.delete([1, 4])
        st.commit()
        run = (lambda: st.compact(progress=False)) if what == "compact" else \
            (lambda: st.reindex("HNSW16", progress=False))
        i = 0
        while True:
            version, listing = st.version, _listing(path)
            manifest_bytes = (path / "manifest.json").read_bytes()
            code = ERRNOS[i % 2]
            faults.arm(i, code)
            try:
                run()
            except StoreIOError as exc:
                faults.disarm()
                assert isinstance(exc, retrostore.RetrostoreError) and exc.errno == code
                msg = str(exc)
                assert f"{what} failed: " in msg, msg
                if st.version == version:
                    assert "is unchanged" in msg and f"version {version} is intact" in msg, msg
                    _intact(path, version, listing, manifest_bytes, full=code == errno.ENOSPC)
                else:  # failed after the manifest was published (syncing or cleaning up)
                    assert f"Version {st.version} was published" in msg, msg
                    break
            else:
                faults.disarm()
                break
            i += 1
        assert i >= 4, i
        assert faults.calls and st.version >= version
    with retrostore.open(path, mode="a") as st:  # the next writer finishes what was left
        if what == "compact":
            st.compact(progress=False)
            assert st.info()["deletes"]["purged_documents"] == 2
        else:
            assert st.info()["index"]["factory"].startswith("HNSW16")
        assert st.verify() == []


def test_lmdb_append_mode_only_past_the_last_key(tmp_path):
    """put_records uses MDB_APPEND (full pages) only when every key sorts after the table's
    last one; over leftovers of a failed commit it overwrites them the ordinary way."""
    import lmdb

    from retrostore.storage.chunktable import _appendable
    from retrostore.storage.lmdbscan import key

    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 24)
    items = [(key(i), b"x" * 300) for i in range(100)]
    with env.begin(write=True) as txn:
        cur = txn.cursor()
        assert _appendable(cur, items)
        cur.putmulti(items, append=True)
        assert not _appendable(cur, items[50:])  # leftovers at these ids: overwrite
        assert not _appendable(cur, [(key(200), b""), (key(150), b"")])  # not increasing
        assert _appendable(cur, [(key(100), b""), (key(101), b"")])
        assert not _appendable(cur, [])
        cur.putmulti([(k, b"y") for k, _ in items[50:]], append=_appendable(cur, items[50:]))
        assert txn.get(key(60)) == b"y" and txn.get(key(10)) == b"x" * 300
