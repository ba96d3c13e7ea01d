"""Raw vectors are checked block by block on the read path (issue 19): a damaged row is never
served, the first query after open checks only the blocks it reads, and verify finds the damage."""

from __future__ import annotations

import numpy as np
import pytest

import retrostore
from retrostore.storage.blocksums import BLOCK_BYTES, rows_per_block


class Given:
    """Vectors are always given (append(embeddings=...))."""

    dim = 384
    fingerprint = {"name": "given-vectors", "dim": 384}

    def embed(self, texts):  # pragma: no cover - never called
        raise AssertionError


def _unit(rng, n):
    v = rng.standard_normal((n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture()
def store(tmp_path):
    rng = np.random.default_rng(7)
    vecs = _unit(rng, 3000)
    path = tmp_path / "s.rstore"
    with retrostore.create(path, embedder=Given(), tokenizer=retrostore.default_tokenizer_path(),
                           index="IVF4,SQ8", index_params={"rerank": 2, "nprobe": 4}) as st:
        st.append([f"chunk {i}" for i in range(len(vecs))], embeddings=vecs)
        st.commit()
        assert st.info()["index"]["factory"] == "IVF4,SQ8"  # trained: candidates are re-ranked from raw vectors
    return path, vecs


def _flip(path, entry, row: int) -> None:
    data = path / entry["path"]
    raw = bytearray(data.read_bytes())
    header = len(raw) - entry["count"] * 384 * 2  # float16 rows after the .npy header
    raw[header + row * 768 + 5] ^= 0x40
    data.write_bytes(bytes(raw))


def test_a_damaged_block_is_refused_where_read_and_found_by_verify(store):
    path, vecs = store
    with retrostore.open(path, embedder=Given()) as st:
        entry = st.manifest["vectors"]["files"][0]
        assert entry["sums"]["rows_per_block"] == rows_per_block(768) and 768 * rows_per_block(768) <= BLOCK_BYTES
        hit = 100  # a query equal to row 100 re-ranks row 100; find another whose candidates avoid its block
        others = [i for i in range(3000) if abs(i - 100) > 64]
        _, ids = st.search_vectors(vecs[others[:200]], 1)
    rpb = entry["sums"]["rows_per_block"]
    safe = next(q for q, row in zip(others[:200], ids) if row[0] // rpb != 100 // rpb)
    _flip(path, entry, 100)
    for mmap in (False, True):
        with retrostore.open(path, embedder=Given(), mmap=mmap) as st:
            _, got = st.search_vectors(vecs[safe], 1)  # reads blocks the damage is not in: answers
            assert got[0, 0] == safe
            raw = st._head.version.index.raw
            assert raw._open(entry).checker.checked.sum() <= 8  # only the blocks this query read were checked
            with pytest.raises(retrostore.CorruptStoreError, match=rf"{entry['path']}: rows \d+\.\.\d+ differ"):
                st.search_vectors(vecs[hit], 1)  # re-ranking reads row 100: never a wrong answer
            problems = st.verify()
        assert any(entry["path"] in p and "checksum mismatch" in p for p in problems), problems


def test_damaged_checksums_are_refused(store):
    path, vecs = store
    with retrostore.open(path, embedder=Given()) as st:
        sums = st.manifest["vectors"]["files"][0]["sums"]
    p = path / sums["path"]
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 1
    p.write_bytes(bytes(raw))
    with retrostore.open(path, embedder=Given()) as st:
        with pytest.raises(retrostore.CorruptStoreError, match="block checksum file differs"):
            st.search_vectors(vecs[0], 1)
        assert any(sums["path"] in line for line in st.verify())


@pytest.mark.parametrize("slow_s, prefetches", [(0.0, 3), (10.0, 1)])
def test_prefetch_only_while_blocks_come_from_the_disk(store, monkeypatch, slow_s, prefetches):
    """The madvise prefetch runs before the first check, then only while checks are slow (disk
    reads): at page-cache speed it costs as much as the check and saves nothing."""
    from retrostore.storage import vectors as V

    path, vecs = store
    calls = []
    real = V._Opened.prefetch
    monkeypatch.setattr(V._Opened, "prefetch", lambda self, rows: (calls.append(len(rows)), real(self, rows)))
    monkeypatch.setattr(V, "SLOW_BLOCK_S", slow_s)  # 0: every block "slow"; 10 s: none
    with retrostore.open(path, embedder=Given()) as st:
        for q in (vecs[:1], vecs[100:101], vecs[2000:2001]):  # each reads unchecked blocks
            st.search_vectors(q, 20)
    assert len(calls) == prefetches
    _flip(path, st.manifest["vectors"]["files"][0], 5)  # with or without prefetch, damage is refused
    with retrostore.open(path, embedder=Given()) as st:
        with pytest.raises(retrostore.errors.CorruptStoreError, match="differ from their checksum"):
            st.search_vectors(vecs[5:6], 20)
