"""Durable writes that hash beside the write and the fsync (DurableWriter(digest_aside=True)): the same
digest and block checksums as hashing inline, and on a failed write or fsync no partial file and no
thread left behind."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import zlib

import numpy as np
import pytest

from retrostore.errors import CorruptStoreError
from retrostore.storage import fileio
from retrostore.storage.blocksums import CrcStream
from retrostore.storage.fileio import DurableWriter, sha256_cached
from retrostore.storage.vectors import load_vectors, write_store_vectors


def _digest_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "retrostore-digest"]


def _pieces(rng) -> list[bytes]:
    # small pieces gathered into blocks, pieces larger than a block, and one of 0 bytes
    sizes = [10, 0, 3 << 20, 5, 700_000, (1 << 20) + 1, 1, 4 << 20]
    return [rng.bytes(n) for n in sizes]


@pytest.mark.parametrize("aside", [False, True])
def test_digest_and_feed_equal_the_bytes_written(tmp_path, aside):
    pieces = _pieces(np.random.default_rng(0))
    fed = []
    with DurableWriter(tmp_path / "f", feed=lambda v: fed.append(bytes(v)), digest_aside=aside) as out:
        for p in pieces:
            out.write(p)
    data = (tmp_path / "f").read_bytes()
    assert data == b"".join(pieces) and out.size == len(data)
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    assert b"".join(fed) == data  # the feed sees every byte, in order
    assert not _digest_threads()


@pytest.mark.parametrize("fail", ["_write", "_fsync"])
def test_a_failed_write_or_fsync_leaves_no_file_and_no_thread(tmp_path, monkeypatch, fail):
    calls = {"n": 0}
    real = getattr(fileio, fail)

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 3 or fail == "_fsync":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(fileio, fail, failing)
    with pytest.raises(OSError) as info:
        with DurableWriter(tmp_path / "f", digest_aside=True) as out:
            for p in _pieces(np.random.default_rng(1)):
                out.write(p)
    assert info.value.errno == errno.ENOSPC
    assert not (tmp_path / "f").exists() and not _digest_threads()


def test_an_error_in_the_feed_is_raised_and_removes_the_file(tmp_path):
    def feed(view):
        raise ValueError("feed broke")

    with pytest.raises(ValueError, match="feed broke"):
        with DurableWriter(tmp_path / "f", feed=feed, digest_aside=True) as out:
            out.write(b"x" * (3 << 20))
    assert not (tmp_path / "f").exists() and not _digest_threads()


def test_an_interrupted_start_of_the_digest_thread_leaves_nothing(tmp_path, monkeypatch):
    """The thread starts inside the with block (helper-11: a Ctrl-C in Thread.start() within
    __init__ left the file, its descriptor and a thread waiting for ever)."""
    real = threading.Thread.start

    def start(self):
        real(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(KeyboardInterrupt):
        with DurableWriter(tmp_path / "f", digest_aside=True) as out:
            out.write(b"x" * (3 << 20))
    monkeypatch.undo()
    assert not (tmp_path / "f").exists() and not _digest_threads()


def test_raw_vectors_checksums_cover_the_rows(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((70_001, 48)).astype(np.float32)  # two conversion chunks of 65,536 rows
    fields = write_store_vectors(tmp_path, "v.npy", a, "float16", [])
    data = (tmp_path / "v.npy").read_bytes()
    assert fields["sha256"] == hashlib.sha256(data).hexdigest()
    rows = a.astype(np.float16).tobytes()
    assert data.endswith(rows)
    rpb = fields["sums"]["rows_per_block"]
    crc = CrcStream(rpb * 48 * 2)
    crc.feed(memoryview(rows))
    sums = np.load(tmp_path / fields["sums"]["path"])
    np.testing.assert_array_equal(sums, crc.finish())  # blocks of rows only, not the .npy header
    assert int(sums[0]) == zlib.crc32(rows[: rpb * 48 * 2])


def test_a_merge_checks_its_sources_as_it_copies_them(tmp_path):
    """A merge of vectors files checks each source's sha256 over the bytes it copies (beside its own
    hashing), so a source damaged where its size and mtime stayed (bit rot, an in-place rewrite with
    the mtime put back: helper-11) is refused instead of copied under a fresh checksum."""
    rng = np.random.default_rng(3)
    entries, parts = [], []
    for i, n in enumerate((1000, 1, 70_000, 0, 333)):
        a = rng.standard_normal((n, 32)).astype(np.float32)
        entries.append({**write_store_vectors(tmp_path, f"v{i}.npy", a, "float16", []), "count": n})
        parts.append(a.astype(np.float16))
    loaded = [load_vectors(tmp_path, e) for e in entries]
    fields = write_store_vectors(tmp_path, "m.npy", loaded, "float16", [], sources=entries)
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), np.concatenate(parts))
    assert fields["sha256"] == sha256_cached(tmp_path / "m.npy")
    victim = tmp_path / entries[2]["path"]
    st = os.stat(victim)
    with open(victim, "r+b") as fh:  # one byte of a row, in place; then the mtime put back
        fh.seek(st.st_size - 1000)
        byte = fh.read(1)
        fh.seek(st.st_size - 1000)
        fh.write(bytes([byte[0] ^ 0x20]))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    loaded = [load_vectors(tmp_path, e) for e in entries]
    with pytest.raises(CorruptStoreError, match=r"v2\.npy: vectors file checksum mismatch.*nothing was merged"):
        write_store_vectors(tmp_path, "m2.npy", loaded, "float16", [], sources=entries)


def test_a_tier_merge_refuses_a_damaged_vectors_file_with_its_mtime_kept(tmp_path):
    """The store-level case: the 8th commit merges the raw vectors files of 8 segments; one of them
    was damaged in place with its mtime put back after this very process wrote it. The commit fails
    naming the file, the committed version stays as it was, and verify reports the damage."""
    import retrostore
    from test_index import FakeEmbedder, _fill

    rng = np.random.default_rng(4)
    st = retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index="HNSW32")
    for i in range(7):
        _fill(st, rng, 300, start=300 * i)
        st.commit()
    files = st.manifest["vectors"]["files"]
    assert len(files) == 7
    victim = tmp_path / "s" / files[3]["path"]
    stat = os.stat(victim)
    with open(victim, "r+b") as fh:
        fh.seek(stat.st_size - 5)
        byte = fh.read(1)
        fh.seek(stat.st_size - 5)
        fh.write(bytes([byte[0] ^ 0x01]))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    version = st.version
    _fill(st, rng, 300, start=2100)
    with pytest.raises(retrostore.RetrostoreError, match="checksum mismatch"):
        st.commit()
    st.close()
    with retrostore.open(tmp_path / "s") as again:
        assert again.version == version
        assert any("checksum" in p for p in again.verify())


def test_a_small_file_is_hashed_without_a_thread(tmp_path, monkeypatch):
    """Less than one block (a small commit's vectors): hashed inline, no thread started."""
    def no_thread(self):
        raise AssertionError("a digest thread was started for a small file")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with DurableWriter(tmp_path / "f", digest_aside=True) as out:
        out.write(b"a" * 1000)
        out.write(b"b" * 5000)
    assert out.sha256 == hashlib.sha256(b"a" * 1000 + b"b" * 5000).hexdigest()


@pytest.mark.parametrize("aside", [False, True])
def test_a_sparse_writer_leaves_zero_pages_as_holes(tmp_path, aside):
    rng = np.random.default_rng(1)
    # zero runs of every alignment: inside a block, across blocks, shorter than a page, at the end
    pieces = [rng.bytes(10_000), bytes(50_000), rng.bytes(3), bytes(3 << 20), rng.bytes(5_000), bytes(2_000),
              rng.bytes(1), bytes((1 << 20) + 123)]
    fed = []
    with DurableWriter(tmp_path / "f", feed=lambda v: fed.append(bytes(v)), digest_aside=aside,
                       sparse=True) as out:
        for p in pieces:
            out.write(p)
    data = (tmp_path / "f").read_bytes()
    assert data == b"".join(pieces) and out.size == len(data)  # the size holds the trailing hole too
    assert out.sha256 == hashlib.sha256(data).hexdigest() and b"".join(fed) == data
    disk = os.stat(tmp_path / "f").st_blocks * 512
    assert disk <= len(data) - (4 << 20) + (64 << 10), (disk, len(data))  # ~4 MiB of zeros not on disk
    with DurableWriter(tmp_path / "dense", sparse=False) as dense:
        for p in pieces:
            dense.write(p)
    assert dense.sha256 == out.sha256 and os.stat(tmp_path / "dense").st_blocks * 512 >= len(data)


def test_a_failed_truncate_of_a_sparse_file_leaves_no_file(tmp_path, monkeypatch):
    def failing(fd, size):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fileio, "_truncate", failing)
    with pytest.raises(OSError):
        with DurableWriter(tmp_path / "f", sparse=True) as out:
            out.write(b"x" * 4096 + bytes(1 << 20))  # ends in a hole: the size is set by a truncate
    assert not (tmp_path / "f").exists()


def test_compact_gives_back_the_disk_of_purged_vectors(tmp_path, pydocs, embedder):
    import retrostore

    docs = sorted((d for d in pydocs if 12_000 < len(d["text"]) < 20_000), key=lambda d: d["meta"]["source"])[:3]
    path = tmp_path / "s.rstore"
    with retrostore.create(path, embedder=embedder) as st:
        st.append([d["text"] for d in docs], metadata=[d["meta"] for d in docs])
        st.commit()
        (entry,) = st.manifest["vectors"]["files"]
        before = np.array(load_vectors(path, entry))
        doc_ids = np.asarray(st._reader.all_doc_ids())
        gone = np.flatnonzero(doc_ids == 1)
        assert len(gone) * before.shape[1] * before.itemsize > 4 * 4096  # whole pages of the document's rows
        st.delete([1])
        st.commit()
        st.compact()
        (entry,) = st.manifest["vectors"]["files"]
        after = np.array(load_vectors(path, entry, verify=True))
        keep = np.setdiff1d(np.arange(len(before)), gone)
        assert not after[gone].any() and np.array_equal(after[keep], before[keep])
        files = st.info()["files"]
        row_bytes = before.shape[1] * before.itemsize
        assert files["vectors_disk_bytes"] <= files["vectors_bytes"] - len(gone) * row_bytes + 2 * 4096 + 4096
        # the whole directory as du counts it: the holes are missing there too
        on_disk = [q.stat() for q in path.rglob("*") if q.is_file()]
        assert files["total_disk_bytes"] == sum(s.st_blocks * 512 for s in on_disk)
        assert files["total_bytes"] == sum(s.st_size for s in on_disk)
        holes = files["vectors_bytes"] - files["vectors_disk_bytes"]
        assert files["total_bytes"] - files["total_disk_bytes"] >= holes - 4096 * len(on_disk)
        assert st.verify() == []
    archive = tmp_path / "s.tar.zst"
    retrostore.pack(path, archive)
    retrostore.unpack(archive, tmp_path / "copy.rstore")  # the holes read back as the zeros they stand for
    with retrostore.open(tmp_path / "copy.rstore") as copy:
        assert copy.verify() == []
        (entry,) = copy.manifest["vectors"]["files"]
        assert np.array_equal(np.array(load_vectors(tmp_path / "copy.rstore", entry)), after)
        assert copy.info()["files"]["vectors_disk_bytes"] == files["vectors_disk_bytes"]  # unpacked with holes too
