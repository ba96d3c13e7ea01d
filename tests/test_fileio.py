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
from retrostore.storage.fileio import DurableWriter, remember_sha256, sha256_cached
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


def test_raw_vectors_checksums_cover_the_rows_and_are_remembered(tmp_path):
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
    entry = {**fields, "count": len(a)}
    assert sha256_cached(tmp_path / "v.npy") == fields["sha256"]  # remembered: not hashed again
    np.testing.assert_array_equal(load_vectors(tmp_path, entry, verify=True), a.astype(np.float16))
    # a file rewritten later is a new version of it (its mtime moves on): hashed again, and refused
    raw = bytearray(data)
    raw[-7] ^= 0x10
    (tmp_path / "v.npy").write_bytes(bytes(raw))
    st = os.stat(tmp_path / "v.npy")
    os.utime(tmp_path / "v.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # not within one clock tick
    with pytest.raises(CorruptStoreError, match="checksum mismatch"):
        load_vectors(tmp_path, entry, verify=True)
    remember_sha256(tmp_path / "v.npy", "0" * 64)
    assert sha256_cached(tmp_path / "v.npy") == "0" * 64  # what the writer says it wrote is believed
