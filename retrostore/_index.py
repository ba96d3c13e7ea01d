"""FAISS lifecycle: build, save, load, merge and search index segments.

A store's vectors live in one or more *segments*: immutable FAISS index files,
each covering a range of chunk ids ``[first_id, end_id)``. A segment's FAISS
id plus ``first_id`` is the chunk id. Segments built by a commit hold their
batch in order (FAISS's sequential ids, so every factory string works, even
those that cannot take ids, such as HNSW); segments rewritten by ``compact``
or ``reindex`` after deletes have holes: IVF indexes store the ids natively,
other indexes are wrapped in ``IndexIDMap``. A commit writes its batch as a new
segment (a clone of the store's trained *template* when the factory needs
training, so a small batch costs time proportional to the batch); small
segments are merged in tiers (like an LSM tree), so the number of segments
stays logarithmic in the store size.

Checksums are verified before FAISS deserialises any file. Search parameters
(``nprobe``, ``efSearch``, ...) are set with ``faiss.ParameterSpace``, which
reaches the inner IVF/HNSW index through OPQ/PCA pre-transforms, ID maps and
refine wrappers (an attribute set on the wrapper would do nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from . import _fileio
from ._fileio import sha256_file
from ._params import RERANK, RWLock, apply_params, current_params, effective_params
from .errors import CorruptStoreError, InvalidInputError

__all__ = [
    "Segment", "SegmentSet", "build_segment", "write_index", "load_segment", "METRICS", "plan_merge",
    "merge_segments", "new_index", "mmap_problem", "is_ivf", "is_exact", "unwrap",
    "segment_vectors", "FP16", "flat_fp16", "fp16_codes", "fp16_flat",
]

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
#: Segments per tier before they are merged into one (see module docstring).
MERGE_FACTOR = 8
#: ``codec`` of a segment entry whose exact (Flat) index is stored as float16: the file is a
#: FAISS ``IndexScalarQuantizer`` of type ``QT_fp16`` (maybe in an ``IndexIDMap``), read back
#: into a float32 ``IndexFlat`` holding exactly the same values (docs/format.md, "Index segments").
FP16 = "fp16"
_FLAT_TYPES = (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2)


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
        """Vectors in the segment (``ntotal``)."""
        return int(self.entry["count"])

    @property
    def end_id(self) -> int:
        """One past the last chunk id the segment covers (``first_id + count`` without holes)."""
        return int(self.entry.get("end_id", self.first_id + self.count))

    @property
    def holes(self) -> bool:
        return self.end_id - self.first_id != self.count

    @property
    def exact(self) -> bool:
        """Whether the segment holds the stored vectors losslessly (:func:`is_exact`, or a
        segment of codec :data:`FP16`, served as its ``SQfp16`` index when memory-mapped)."""
        return is_exact(self.index) or self.entry.get("codec") == FP16


def new_index(factory: str, dim: int, metric: str) -> faiss.Index:
    """``faiss.index_factory`` with a clear error.

    Raises
    ------
    InvalidInputError
        FAISS rejects the string, or it asks for an ID map (retrostore assigns ids).
    """
    if not isinstance(factory, str) or not factory.strip():
        raise InvalidInputError(f"index={factory!r} must be a FAISS factory string such as 'Flat'")
    if "IDMap" in factory:
        raise InvalidInputError(
            f"factory string {factory!r} asks for an ID map; retrostore assigns chunk ids itself "
            f"(sequential ids per segment), so drop the IDMap prefix: {factory.replace('IDMap2,', '').replace('IDMap,', '')!r}"
        )
    for name, low, high, what in _FACTORY_LIMITS:
        for m in re.finditer(name + r"(\d+)", factory):
            if not low <= int(m.group(1)) <= high:
                raise InvalidInputError(
                    f"factory string {factory!r}: {m.group(0)} has {what} {m.group(1)}, outside [{low}, {high}] "
                    "(FAISS would crash or exhaust memory); choose a value in range")
    try:
        return faiss.index_factory(int(dim), factory, METRICS[metric])
    except (RuntimeError, MemoryError) as exc:
        hint = ("; this index supports only squared L2: create the store with metric='l2'"
                if "METRIC_L2" in str(exc) and metric != "l2" else "")
        raise InvalidInputError(
            f"FAISS cannot build the factory string {factory!r} for dimension {dim}: {exc}{hint}"
        ) from exc


#: Numbers in factory strings that FAISS accepts but then aborts or segfaults on (HNSW0/1 at the
#: first add) or tries to allocate without bound (IVF1000000000): (prefix, low, high, meaning).
_FACTORY_LIMITS = (("HNSW", 2, 1024, "M (neighbours per node)"),
                   ("IVF", 1, 1 << 24, "nlist (inverted lists)"),
                   ("NSG", 2, 1024, "R (neighbours per node)"))


def _idmap(inner: faiss.Index) -> faiss.Index:
    wrapped = faiss.IndexIDMap(inner)
    inner.this.disown()
    wrapped.own_fields = True
    return wrapped


def unwrap(index: faiss.Index) -> faiss.Index:
    """The innermost index behind pre-transforms, ID maps and refine wrappers."""
    index = faiss.downcast_index(index)
    while True:
        if isinstance(index, faiss.IndexPreTransform):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.base_index)
        else:
            return index


def is_ivf(index: faiss.Index) -> bool:
    """True for IVF indexes (they store ids natively and merge with an id offset)."""
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def is_exact(index: faiss.Index) -> bool:
    """True when the index stores the vectors uncompressed (Flat, HNSW-Flat), maybe behind an ID map.

    A user's ``SQfp16`` index is not exact (its float16 codes round the
    vectors given); a segment stored as float16 by retrostore is, see
    :attr:`Segment.exact`.
    """
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexHNSWFlat):
        return True
    return type(index) in _FLAT_TYPES


def _is_sq_fp16(index: faiss.Index) -> bool:
    return isinstance(index, faiss.IndexScalarQuantizer) and index.sq.qtype == faiss.ScalarQuantizer.QT_fp16


def _split_idmap(index: faiss.Index) -> tuple[faiss.Index, faiss.Index | None]:
    """(inner index, its ID map wrapper or None)."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.downcast_index(index.index), index
    return index, None


def _codes(index: faiss.Index, dtype: type) -> np.ndarray:
    """Zero-copy (ntotal, d) view of an ``IndexFlatCodes``' codes as ``dtype``."""
    raw = faiss.rev_swig_ptr(index.codes.data(), index.codes.size()) if index.ntotal else np.zeros(0, np.uint8)
    return raw.view(dtype).reshape(index.ntotal, index.d)


def _filled(inner: faiss.Index, values: np.ndarray, like: faiss.Index | None) -> faiss.Index:
    """Empty ``IndexFlatCodes`` ``inner`` holding ``values`` (ntotal, d) as its codes (cast to
    its code type), in a copy of ``like``'s ID map (none when ``like`` is None)."""
    wrapped = _idmap(inner) if like is not None else inner  # FAISS wraps only an empty index
    n = len(values)
    inner.codes.resize(n * inner.code_size)
    inner.ntotal = n
    _codes(inner, np.float32 if inner.code_size == 4 * inner.d else np.float16)[...] = values
    if like is not None:
        faiss.copy_array_to_vector(faiss.vector_to_array(like.id_map), wrapped.id_map)
        wrapped.ntotal = n
    return wrapped


def flat_fp16(index: faiss.Index) -> faiss.Index | None:
    """The float16 form of a plain (or ID-mapped) Flat index, for writing; None for other indexes.

    ``index``'s own float32 values are first rounded to float16 in place, so
    the index in memory holds exactly what its file holds (a handle that
    wrote the segment and one that reads it search the same vectors).

    Returns
    -------
    faiss.IndexScalarQuantizer (``QT_fp16``, the same metric), in the ID map
    ``index`` had; or None when ``index`` is not an ``IndexFlat``.
    """
    inner, idmap = _split_idmap(index)
    if type(inner) not in _FLAT_TYPES:
        return None
    values = _codes(inner, np.float32)
    half = values.astype(np.float16)
    values[...] = half
    return fp16_codes(half, inner.metric_type, idmap)


def fp16_codes(half: np.ndarray, metric: int, idmap: faiss.Index | None = None) -> faiss.Index:
    """An ``SQfp16`` index whose codes are ``half`` (n, dim) float16 (FAISS ``metric``), in a copy
    of ``idmap``'s ID map when given: what an fp16 segment file holds."""
    sq = faiss.IndexScalarQuantizer(half.shape[1], faiss.ScalarQuantizer.QT_fp16, metric)
    return _filled(sq, half, idmap)


def fp16_flat(half: np.ndarray, metric: int, idmap: faiss.Index | None = None) -> faiss.Index:
    """A float32 ``IndexFlat`` (FAISS ``metric``) holding exactly the values of ``half`` (n, dim)
    float16, in a copy of ``idmap``'s ID map when given: an fp16 segment as it is searched."""
    return _filled(faiss.IndexFlat(half.shape[1], metric), half, idmap)


def mmap_problem(index: faiss.Index, factory: str) -> str | None:
    """Why FAISS cannot serve ``index`` memory-mapped (None when it can).

    ``faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC)`` maps flat codes, HNSW
    storage and IVF inverted lists from the file; fast-scan indexes keep their
    codes in SIMD blocks (``BlockInvertedLists``) that are always read into RAM.
    """
    if "FastScan" in type(unwrap(index)).__name__:
        return (f"FAISS cannot memory-map the fast-scan index {factory!r} (its PQ codes live in SIMD "
                "blocks that are always read into RAM); use mmap=False, or a factory without the 'fs' "
                "suffix such as 'IVF4096,PQ8' or 'IVF4096,SQ8'")
    return None


def build_segment(vectors: np.ndarray, factory: str, metric: str, *, template: faiss.Index | None = None,
                  local_ids: np.ndarray | None = None) -> faiss.Index:
    """Build an index over ``vectors``.

    Parameters
    ----------
    vectors : ndarray, shape (n, dim), float32
    factory : str
        FAISS factory string, e.g. ``"Flat"`` (exact search).
    metric : {"ip", "l2"}
    template : faiss.Index, optional
        A trained empty index to clone (the store's template); required when
        the factory needs training.
    local_ids : ndarray of int64, optional
        Ids relative to the segment's ``first_id`` when the rows are not
        consecutive (after deletes); non-IVF indexes are then wrapped in an ID map.

    Raises
    ------
    InvalidInputError
        When FAISS rejects the factory string, or it needs training and no template is given.
    """
    dim = vectors.shape[1]
    index = faiss.clone_index(template) if template is not None else new_index(factory, dim, metric)
    if not index.is_trained:
        raise InvalidInputError(
            f"factory string {factory!r} needs training; the store trains it at commit once enough "
            "vectors exist, or with Store.reindex() (see docs/index.md)"
        )
    if local_ids is not None and not is_ivf(index):
        index = _idmap(index)
    for lo in range(0, len(vectors), 65536):
        part = np.ascontiguousarray(vectors[lo : lo + 65536], dtype=np.float32)
        if local_ids is None:
            index.add(part)
        else:
            index.add_with_ids(part, np.ascontiguousarray(local_ids[lo : lo + 65536], dtype=np.int64))
    return index


def write_index(path: Path, index: faiss.Index) -> tuple[int, str]:
    """Write ``index`` as a new durable file; returns its size and sha256.

    FAISS streams the index into :class:`retrostore._fileio.DurableWriter`
    (``PyCallbackIOWriter``): no in-memory copy of the file, which
    ``faiss.serialize_index`` makes twice (its writer's buffer, then the
    numpy array), so a commit of a large segment needs no extra memory the
    size of it. An OSError from a write (ENOSPC, EIO) comes through as itself.
    """
    with _fileio.DurableWriter(path) as out:
        faiss.write_index(index, faiss.PyCallbackIOWriter(out.write))
    return out.size, out.sha256


def load_segment(root: Path, entry: dict, *, verify: bool = True, mmap: bool = False, flat: bool = False) -> Segment:
    """Load a segment (or template) file after checking its size and sha256.

    The file is hashed block by block, then FAISS reads it (one copy in
    memory) or, with ``mmap=True``, maps it (``IO_FLAG_MMAP_IFC``): the codes
    stay on disk and pages come in on demand. Store files are never modified
    in place (a commit writes new ones), so the hash holds for what is read.
    A segment of codec :data:`FP16` is read into a float32 ``IndexFlat``
    (searched like any Flat index); mapped, it is served as the file's
    ``SQfp16`` index, an exact scan of the same float16 values. ``flat``:
    the store's factory is ``"Flat"``, so a segment without a codec must be
    a Flat index.

    Raises
    ------
    CorruptStoreError
        Missing file, wrong size or checksum, FAISS cannot read it, or it is
        not what the manifest says (its codec, a Flat store's index type).
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
    # Hash block by block, then let FAISS read (or map) the file itself: one copy of the
    # index in memory, where reading it into numpy and deserializing held three.
    actual = sha256_file(path)[1] if verify else entry["sha256"]
    if actual != entry["sha256"]:
        raise CorruptStoreError(
            f"{rel}: index file checksum mismatch (manifest {entry['sha256'][:16]}..., "
            f"file {actual[:16]}...); it is damaged"
        )
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC) if mmap else faiss.read_index(str(path))
    except RuntimeError as exc:
        raise CorruptStoreError(f"{rel}: FAISS cannot read the index file ({exc})") from exc
    codec = entry.get("codec")
    inner, idmap = _split_idmap(index)
    if codec is not None:
        if codec != FP16:
            raise CorruptStoreError(f"{rel}: the manifest gives it codec {codec!r}; the only codec is {FP16!r} "
                                    "(format 3): the manifest is damaged")
        if not _is_sq_fp16(inner):
            raise CorruptStoreError(f"{rel}: the manifest says codec {FP16!r}, but the file holds a "
                                    f"{type(inner).__name__}, not a float16 scalar quantizer")
        if not mmap:
            index = fp16_flat(_codes(inner, np.float16), inner.metric_type, idmap)
    elif flat and type(inner) not in _FLAT_TYPES:
        raise CorruptStoreError(f"{rel}: the store's index is Flat, but the file holds a "
                                f"{type(inner).__name__} and the manifest gives it no codec")
    if "count" in entry and index.ntotal != entry["count"]:
        raise CorruptStoreError(f"{rel}: index holds {index.ntotal} vectors, the manifest says {entry['count']}")
    return Segment(entry, index)


def segment_vectors(seg: Segment) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact (local ids, vectors) of an uncompressed segment, or None when lossy."""
    if not seg.exact:
        return None
    index = faiss.downcast_index(seg.index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        index = faiss.downcast_index(index.index)
    else:
        ids = np.arange(index.ntotal, dtype=np.int64)
    vecs = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)
    return ids, vecs


def owned_copy(index: faiss.Index) -> faiss.Index:
    """A copy that owns its data. ``clone_index`` of a memory-mapped index still
    views the file, and emptying a viewed vector (as ``merge_from`` does to its
    source) aborts the process; a serialise/deserialise round trip owns it all."""
    return faiss.deserialize_index(faiss.serialize_index(index))


def merge_segments(segments: list[Segment], make_empty: Callable[[], faiss.Index],
                   vectors_of: Callable[[list[Segment]], tuple[np.ndarray, np.ndarray]]) -> faiss.Index:
    """One index holding the segments' vectors, ids relative to ``segments[0].first_id``.

    IVF indexes (same trained quantizer) merge natively with an id offset;
    Flat-code indexes without holes concatenate; anything else (HNSW, holes)
    is rebuilt from ``vectors_of(segments)`` -> (local ids, vectors). Sources
    are copied first (:func:`owned_copy`): FAISS's ``merge_from`` empties the
    index it merges from.
    """
    first = segments[0].first_id
    base = make_empty()
    if is_ivf(base):
        for seg in segments:
            if seg.count:
                base.merge_from(owned_copy(seg.index), seg.first_id - first)
        return base
    if not any(s.holes for s in segments):
        try:
            for seg in segments:
                base.merge_from(owned_copy(seg.index), 0)
            return base
        except RuntimeError:
            base = make_empty()  # no native merge (HNSW): rebuild below
    ids, vecs = vectors_of(segments)
    holes = len(ids) != segments[-1].end_id - first
    if holes:
        base = _idmap(base)
    for lo in range(0, len(vecs), 65536):
        part = np.ascontiguousarray(vecs[lo : lo + 65536], dtype=np.float32)
        if holes:
            base.add_with_ids(part, np.ascontiguousarray(ids[lo : lo + 65536]))
        else:
            base.add(part)
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
    params : dict, optional
        The store's search parameters (set on every segment).
    deleted : ndarray of int64, optional
        Sorted chunk ids never to return (tombstones).
    raw : RawVectors, optional
        Raw vectors for the ``rerank`` parameter.
    """

    def __init__(self, segments: list[Segment], metric: str, dim: int, *, params: dict | None = None,
                 deleted: np.ndarray | None = None, raw: Any = None):
        self.segments = segments
        self.metric = metric
        self.dim = dim
        self.params = dict(params or {})
        self.deleted = np.zeros(0, np.int64) if deleted is None else np.asarray(deleted, np.int64)
        self.raw = raw
        self._lock = RWLock()
        for seg in segments:
            apply_params(seg.index, self.params)

    @property
    def ntotal(self) -> int:
        return sum(s.index.ntotal for s in self.segments)

    @property
    def exact(self) -> bool:
        return all(type(unwrap(s.index)) in _FLAT_TYPES or s.entry.get("codec") == FP16 for s in self.segments)

    def effective(self, params: dict | None = None) -> dict:
        """Parameter values a search with ``params`` would use (what ``inspect`` shows)."""
        eff = {**self.params, **(params or {})}
        out = effective_params(self.segments[0].index) if self.segments else {}
        if self.segments and params:
            with self._lock.exclusive():
                before = current_params(self.segments[0].index, params)
                apply_params(self.segments[0].index, eff)
                out = effective_params(self.segments[0].index)
                apply_params(self.segments[0].index, before)
        rerank = int(eff.get(RERANK, 0) or 0)
        out[RERANK] = rerank if rerank > 1 and self.raw is not None and not self.exact else 0
        return out

    def search(self, queries: np.ndarray, k: int, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k nearest live chunk ids of each query row.

        Parameters
        ----------
        queries : ndarray, shape (n, dim), float32, C-contiguous
        k : int, >= 1
        params : dict, optional
            Per-query search parameters, over the store's.

        Returns
        -------
        scores : ndarray, shape (n, k), float32
        chunk_ids : ndarray, shape (n, k), int64
            -1 (with score -inf for "ip", +inf for "l2") where fewer than k
            results exist (or the probed IVF lists hold fewer than k).
        """
        params = params or {}
        eff = {**self.params, **params}
        rerank = int(eff.get(RERANK, 0) or 0)
        rerank = rerank if rerank > 1 and self.raw is not None and not self.exact else 1
        kk = min(k * rerank, max(self.ntotal, 1)) if rerank > 1 else k
        changes = {n: v for n, v in params.items() if n != RERANK and self.params.get(n) != v}
        if not changes:
            with self._lock.shared():
                D, I = self._search_live(queries, kk)
        else:
            with self._lock.exclusive():
                saved = [current_params(seg.index, changes) for seg in self.segments]
                try:
                    for seg in self.segments:
                        apply_params(seg.index, eff)
                    D, I = self._search_live(queries, kk)
                finally:
                    for seg, before in zip(self.segments, saved):
                        apply_params(seg.index, before)
        if rerank > 1:
            D, I = self._rerank(queries, I, k)
        if D.shape[1] < k:
            D, I = _pad(D, I, k, self.metric == "ip")
        return D[:, :k], I[:, :k]

    def _search_all(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = queries.shape[0]
        keep_max = self.metric == "ip"
        segs = [s for s in self.segments if s.index.ntotal]
        if not segs or n == 0:
            fill = -np.inf if keep_max else np.inf
            return np.full((n, k), fill, np.float32), np.full((n, k), -1, np.int64)
        if len(segs) == 1:
            D, I = segs[0].index.search(queries, k)
            _offset(I, segs[0].first_id)
            return _clean(D, I, keep_max)
        heap = faiss.ResultHeap(n, k, keep_max=keep_max)
        for seg in segs:
            D, I = seg.index.search(queries, min(k, seg.index.ntotal))
            _offset(I, seg.first_id)
            heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64))
        heap.finalize()
        return _clean(heap.D, heap.I, keep_max)

    def _search_live(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_search_all` without tombstoned ids: fetch more candidates for rows that lose some."""
        if not len(self.deleted):
            return self._search_all(queries, k)
        n, total = len(queries), max(self.ntotal, 1)
        keep_max = self.metric == "ip"
        out_d = np.full((n, k), -np.inf if keep_max else np.inf, np.float32)
        out_i = np.full((n, k), -1, np.int64)
        todo = np.arange(n)
        fetch = min(total, k + max(8, k))
        while len(todo):
            D, I = self._search_all(queries[todo], fetch)
            missing = I < 0  # FAISS had no more (probed lists exhausted)
            dead = _in_sorted(I, self.deleted) & ~missing
            I[dead] = -1
            valid = I >= 0
            done = (valid.sum(1) >= k) | missing.any(1) | (fetch >= total)
            order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
            Dk, Ik = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
            Dk[Ik < 0] = -np.inf if keep_max else np.inf
            out_d[todo[done], : Dk.shape[1]] = Dk[done]
            out_i[todo[done], : Ik.shape[1]] = Ik[done]
            todo = todo[~done]
            fetch = min(total, fetch * 2)
        return out_d, out_i

    def _rerank(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-score candidates exactly with the raw vectors; keep the best k (blocks of rows bound the memory)."""
        n, kk = ids.shape
        out_d = np.empty((n, min(k, kk)), np.float32)
        out_i = np.empty((n, min(k, kk)), np.int64)
        step = max(1, (1 << 22) // max(1, kk * self.dim))  # <= 16 MiB of float32 candidates per block
        for lo in range(0, n, step):
            I = ids[lo : lo + step]
            q = queries[lo : lo + step]
            vecs = self.raw.take(I)  # (rows, kk, dim)
            if self.metric == "ip":
                scores = np.einsum("nkd,nd->nk", vecs, q)
                scores[I < 0] = -np.inf
                order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            else:
                scores = ((vecs - q[:, None, :]) ** 2).sum(-1)
                scores[I < 0] = np.inf
                order = np.argsort(scores, axis=1, kind="stable")[:, :k]
            out_d[lo : lo + step] = np.take_along_axis(scores, order, 1)
            out_i[lo : lo + step] = np.take_along_axis(I, order, 1)
        return out_d, out_i


def _in_sorted(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_ids, ids)
    pos[pos >= len(sorted_ids)] = 0
    return sorted_ids[pos] == ids


def _pad(D: np.ndarray, I: np.ndarray, k: int, keep_max: bool) -> tuple[np.ndarray, np.ndarray]:
    n = D.shape[0]
    d2 = np.full((n, k), -np.inf if keep_max else np.inf, np.float32)
    i2 = np.full((n, k), -1, np.int64)
    d2[:, : D.shape[1]], i2[:, : I.shape[1]] = D, I
    return d2, i2


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
