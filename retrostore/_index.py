"""FAISS lifecycle: build, save, load and search index segments.

A store's vectors live in one or more *segments*: immutable FAISS index files,
each holding the vectors of a contiguous range of chunk ids
``[first_id, first_id + count)`` in order, so a segment's local FAISS id plus
``first_id`` is the chunk id (no ID map needed, and every factory string can
be used). A commit writes the batch as a new segment; small segments are
merged in tiers (like an LSM tree) so that the number of segments stays
logarithmic in the store size and commit cost stays proportional to the batch.
Checksums are verified before FAISS deserialises any file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ._fileio import sha256_file
from .errors import CorruptStoreError, InvalidInputError

__all__ = ["Segment", "SegmentSet", "build_segment", "serialize", "load_segment", "METRICS", "plan_merge"]

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
#: Segments per tier before they are merged into one (see module docstring).
MERGE_FACTOR = 8


@dataclass
class Segment:
    """A loaded segment: its manifest entry and the FAISS index."""

    entry: dict
    index: faiss.Index

    @property
    def first_id(self) -> int:
        return int(self.entry["first_id"])

    @property
    def count(self) -> int:
        return int(self.entry["count"])


def build_segment(vectors: np.ndarray, factory: str, metric: str) -> faiss.Index:
    """Build an index over ``vectors`` (rows are consecutive chunk ids).

    Parameters
    ----------
    vectors : ndarray, shape (n, dim), float32
    factory : str
        FAISS factory string, e.g. ``"Flat"`` (exact search).
    metric : {"ip", "l2"}

    Raises
    ------
    InvalidInputError
        When FAISS rejects the factory string.
    """
    dim = vectors.shape[1]
    try:
        index = faiss.index_factory(dim, factory, METRICS[metric])
    except RuntimeError as exc:
        raise InvalidInputError(
            f"FAISS cannot build the factory string {factory!r} for dimension {dim}: {exc}"
        ) from exc
    if not index.is_trained:
        raise InvalidInputError(
            f"factory string {factory!r} needs training; the store trains it at commit "
            "once enough vectors exist (see docs/format.md)"
        )
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def serialize(index: faiss.Index) -> np.ndarray:
    """The index as bytes (uint8 array) for :func:`retrostore._fileio.write_durable`."""
    return faiss.serialize_index(index)


def load_segment(root: Path, entry: dict, *, verify: bool = True) -> Segment:
    """Load a segment file after checking its size and sha256.

    Raises
    ------
    CorruptStoreError
        Missing file, wrong size or checksum, or FAISS cannot read it.
    """
    rel = entry["path"]
    path = root / rel
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CorruptStoreError(f"{rel}: index file referenced by the manifest is missing") from None
    if size != entry["size"]:
        raise CorruptStoreError(f"{rel}: index file is {size} bytes, the manifest says {entry['size']}; "
                                f"{_lfs_pointer(path) or 'it is damaged'}")
    raw = np.fromfile(path, dtype=np.uint8)
    if verify:
        import hashlib

        actual = hashlib.sha256(raw).hexdigest()
        if actual != entry["sha256"]:
            raise CorruptStoreError(
                f"{rel}: index file checksum mismatch (manifest {entry['sha256'][:16]}..., "
                f"file {actual[:16]}...); it is damaged"
            )
    try:
        index = faiss.deserialize_index(raw)
    except RuntimeError as exc:
        raise CorruptStoreError(f"{rel}: FAISS cannot read the index file ({exc})") from exc
    if index.ntotal != entry["count"]:
        raise CorruptStoreError(f"{rel}: index holds {index.ntotal} vectors, the manifest says {entry['count']}")
    return Segment(entry, index)


def merge_segments(segments: list[Segment]) -> faiss.Index:
    """One index holding the segments' vectors in id order (FAISS ``merge_from``).

    An index built by ``index_factory`` and the same index read back from a
    file can differ in C++ type (``IndexFlat`` with the inner-product metric
    vs ``IndexFlatIP``), which ``merge_from`` refuses; such segments are
    normalised through a serialisation round trip first.
    """
    base = faiss.clone_index(segments[0].index)
    for seg in segments[1:]:
        # merge_from *moves* the other index's vectors out of it: merge a copy,
        # so the loaded segments of the current version stay whole (a commit
        # that fails after merging must leave them usable for its retry).
        if type(seg.index) is type(base):
            other = faiss.clone_index(seg.index)
        else:
            other = faiss.deserialize_index(faiss.serialize_index(seg.index))
            if type(base) is not type(other):
                base = faiss.deserialize_index(faiss.serialize_index(base))
        base.merge_from(other, 0)
    return base


def plan_merge(counts: list[int]) -> int:
    """How many trailing segments to merge after a commit (0 for none).

    Tiered policy: segment sizes are bucketed by ``floor(log_MERGE_FACTOR(count))``;
    when the newest ``MERGE_FACTOR`` segments share a tier they merge into one of
    the next tier. Each vector is therefore rewritten O(log n) times in all.
    """
    if len(counts) < MERGE_FACTOR:
        return 0
    tail = counts[-MERGE_FACTOR:]
    tiers = {_tier(c) for c in tail}
    if len(tiers) == 1:
        return MERGE_FACTOR
    return 0


def _tier(count: int) -> int:
    t = 0
    while count >= MERGE_FACTOR:
        count //= MERGE_FACTOR
        t += 1
    return t


class SegmentSet:
    """The segments of one version, searched together.

    Parameters
    ----------
    segments : list of Segment
    metric : {"ip", "l2"}
        Scores are inner products (higher is nearer) or squared L2 distances
        (lower is nearer), as FAISS returns them.
    dim : int
    """

    def __init__(self, segments: list[Segment], metric: str, dim: int):
        self.segments = segments
        self.metric = metric
        self.dim = dim

    @property
    def ntotal(self) -> int:
        return sum(s.index.ntotal for s in self.segments)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest chunk ids of each query row.

        Parameters
        ----------
        queries : ndarray, shape (n, dim), float32, C-contiguous
        k : int, >= 1

        Returns
        -------
        scores : ndarray, shape (n, k), float32
        chunk_ids : ndarray, shape (n, k), int64
            -1 (with score -inf for "ip", +inf for "l2") where fewer than k
            results exist.
        """
        n = queries.shape[0]
        keep_max = self.metric == "ip"
        if not self.segments or n == 0:
            fill = -np.inf if keep_max else np.inf
            return np.full((n, k), fill, np.float32), np.full((n, k), -1, np.int64)
        if len(self.segments) == 1:
            D, I = self.segments[0].index.search(queries, k)
            _offset(I, self.segments[0].first_id)
            return _clean(D, I, keep_max)
        heap = faiss.ResultHeap(n, k, keep_max=keep_max)
        for seg in self.segments:
            kk = min(k, seg.index.ntotal)
            if kk == 0:
                continue
            D, I = seg.index.search(queries, kk)
            _offset(I, seg.first_id)
            heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64))
        heap.finalize()
        return _clean(heap.D, heap.I, keep_max)


def _offset(ids: np.ndarray, first_id: int) -> None:
    if first_id:
        np.add(ids, first_id, out=ids, where=ids >= 0)


def _clean(D: np.ndarray, I: np.ndarray, keep_max: bool) -> tuple[np.ndarray, np.ndarray]:
    D = np.ascontiguousarray(D, dtype=np.float32)
    I = np.ascontiguousarray(I, dtype=np.int64)
    missing = I < 0
    if missing.any():
        I[missing] = -1
        D[missing] = -np.inf if keep_max else np.inf
    return D, I


def file_entry(root: Path, path: Path, size: int, sha256: str, **extra) -> dict:
    """A manifest file entry ``{"path", "size", "sha256", ...}``."""
    return {"path": path.relative_to(root).as_posix(), "size": size, "sha256": sha256, **extra}


def check_file(root: Path, entry: dict) -> str | None:
    """Size and sha256 check of one referenced file; a problem line or None."""
    rel = entry["path"]
    path = root / rel
    try:
        size, sha = sha256_file(path)
    except FileNotFoundError:
        return f"{rel}: missing (referenced by the manifest)"
    except OSError as exc:
        return f"{rel}: cannot be read ({exc})"
    if size != entry["size"]:
        lfs = _lfs_pointer(path)
        return f"{rel}: {size} bytes, the manifest says {entry['size']}" + (f"; {lfs}" if lfs else "")
    if sha != entry["sha256"]:
        return f"{rel}: checksum mismatch (manifest {entry['sha256'][:16]}..., file {sha[:16]}...)"
    return None


def _lfs_pointer(path: Path) -> str | None:
    """Why a file of the wrong size is a Git LFS pointer, if it is one."""
    from ._artifact import git_lfs_pointer

    return git_lfs_pointer(path)
