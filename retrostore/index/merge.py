"""Merging index segments: building a segment from vectors, the tiered merge
policy, and merging segments into one.

A commit writes its batch as a new segment (a clone of the store's trained
*template* when the factory needs training, so a small batch costs time
proportional to the batch); small segments are merged in tiers (like an LSM
tree), so the number of segments stays logarithmic in the store size.
"""

from __future__ import annotations

from typing import Any, Callable

import faiss
import numpy as np

from ..errors import InvalidInputError
from ..storage.faisstypes import is_ivf, with_idmap
from ..storage.segments import Segment
from ..storage.tombstones import in_sorted
from .factory import new_index

__all__ = ["MERGE_FACTOR", "build_segment", "add_vectors", "merge_segments", "merge_fast_scan", "PQ4Layout", "is_fast_scan",
           "is_flat_fast_scan", "flat_fast_scan_run", "concat_flat_fast_scan", "plan_merge", "owned_copy", "segment_vectors"]

#: Segments per tier before they are merged into one (see module docstring).
MERGE_FACTOR = 8


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
        index = with_idmap(index)
    add_vectors(index, vectors, local_ids)
    return index


def add_vectors(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray | None = None) -> None:
    """Add ``vectors`` (n, dim) to ``index`` 65,536 rows per FAISS call, as float32 (bounded
    temporary copies), with ``ids`` when given."""
    for lo in range(0, len(vectors), 65536):
        part = np.ascontiguousarray(vectors[lo : lo + 65536], dtype=np.float32)
        if ids is None:
            index.add(part)
        else:
            index.add_with_ids(part, np.ascontiguousarray(ids[lo : lo + 65536], dtype=np.int64))


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
    Flat-code indexes without holes concatenate (flat fast-scan ones by
    :func:`concat_flat_fast_scan`); anything else (HNSW, holes, fast-scan codes
    in blocks other than 32 or behind a pre-transform, whose ``merge_from`` FAISS
    gets wrong or leaves unzeroed) is rebuilt from ``vectors_of(segments)`` ->
    (local ids, vectors). Sources
    are copied first (:func:`owned_copy`): FAISS's ``merge_from`` empties the
    index it merges from.
    """
    first = segments[0].first_id
    base = make_empty()
    if is_fast_scan(base):
        merge_fast_scan(base, [(seg.index, seg.first_id - first) for seg in segments if seg.count])
        return base
    if is_ivf(base):
        for seg in segments:
            if seg.count:
                base.merge_from(owned_copy(seg.index), seg.first_id - first)
        return base
    if is_flat_fast_scan(base) and flat_fast_scan_run(segments):
        concat_flat_fast_scan(base, [seg.index for seg in segments])
        return base
    if not any(s.holes for s in segments) and not _holds_fast_scan(base):  # other fast-scan: re-encoded below
        try:
            for seg in segments:
                base.merge_from(owned_copy(seg.index), 0)
            return base
        except RuntimeError:
            base = make_empty()  # no native merge (HNSW): rebuild below
    ids, vecs = vectors_of(segments)
    holes = len(ids) != segments[-1].end_id - first
    if holes:
        base = with_idmap(base)
    for lo in range(0, len(vecs), 65536):
        part = np.ascontiguousarray(vecs[lo : lo + 65536], dtype=np.float32)
        if holes:
            base.add_with_ids(part, np.ascontiguousarray(ids[lo : lo + 65536]))
        else:
            base.add(part)
    return base


def is_fast_scan(index: faiss.Index) -> bool:
    """True for an IVF fast-scan index (``IVF...,PQ...x4fs``), maybe behind pre-transforms."""
    if not is_ivf(index):
        return False
    return isinstance(faiss.downcast_index(faiss.extract_index_ivf(index)), faiss.IndexIVFFastScan)


def is_flat_fast_scan(index: faiss.Index) -> bool:
    """True for a flat 4-bit fast-scan index in blocks of 32 codes (``PQ...x4fs`` without IVF lists,
    pre-transform or ID map): its ids are row positions, so segments of consecutive ids
    concatenate (:func:`concat_flat_fast_scan`)."""
    index = faiss.downcast_index(index)
    return isinstance(index, faiss.IndexFastScan) and int(index.bbs) == 32


def flat_fast_scan_run(segments: list[Segment]) -> bool:
    """Flat fast-scan segments without holes, each starting where the one before ends: their codes
    concatenate (:func:`concat_flat_fast_scan`) into one index answering with the same ids."""
    return all(is_flat_fast_scan(s.index) and not s.holes for s in segments) and all(
        a.end_id == b.first_id for a, b in zip(segments, segments[1:]))


def _holds_fast_scan(index: faiss.Index) -> bool:
    """A flat fast-scan index, maybe behind pre-transforms."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return isinstance(index, faiss.IndexFastScan)


def concat_flat_fast_scan(base: faiss.Index, sources: list[faiss.Index]) -> None:
    """Append the codes of flat fast-scan indexes (same trained quantizer, :func:`is_flat_fast_scan`)
    to ``base`` in order. FAISS's ``merge_from``, from copies (it empties its source); then the
    unused slots of the last block are zeroed, as ``add`` leaves them: ``merge_from`` leaves
    whatever the memory held, and the same merge wrote files of different checksums. Only
    32-code blocks: FAISS 1.15's ``merge_from`` scrambles codes in blocks of 64 or 96
    (``PQ16x4fs_64``: recall@10 0.54 against 0.998 before the merge), and those merge by
    re-encoding (:func:`merge_segments`)."""
    if not is_flat_fast_scan(base):
        raise InvalidInputError("concat_flat_fast_scan merges flat fast-scan indexes in blocks of 32 codes")
    for src in sources:
        base.merge_from(owned_copy(src), 0)
    index = faiss.downcast_index(base)
    packer = index.get_CodePacker()
    n, nvec = int(index.ntotal), int(packer.nvec)
    if n % nvec:
        nblocks = -(-n // nvec)
        blocks = faiss.rev_swig_ptr(index.codes.get(), nblocks * packer.block_size).reshape(nblocks, -1)
        zero = np.zeros(packer.code_size, np.uint8)
        for slot in range(n, nblocks * nvec):
            packer.pack_1(zero, slot, blocks)


def merge_fast_scan(base: faiss.Index, sources: list[tuple[faiss.Index, int]],
                    drop: np.ndarray | None = None) -> None:
    """Merge IVF fast-scan indexes (same trained quantizer and PQ) into the empty ``base``, list by
    list: each source list's packed blocks are unpacked, the lists concatenated (ids + offset) and
    packed again into ``base``'s blocks. Ids in ``drop`` (sorted int64, after the offsets) are
    left out: what ``remove_ids`` would do (``compact``'s purge), without FAISS's list code.
    Sources are only read.

    Not ``merge_from``: FAISS 1.15's ``BlockInvertedLists::add_entries``, which it calls, copies
    whole blocks past the end of a list whose length is a multiple of the block's byte size, and the
    process aborts ("corrupted double-linked list"; 8 IVF64,PQ12x4fs segments of 3,000 vectors
    suffice). Blocks are unpacked and packed by :class:`PQ4Layout`: the permutation of 4-bit codes
    that FAISS's own code packer applies, read from the packer once and applied to a whole list at
    a time (one packer call per block took 0.9 s for 1M vectors of 24-byte codes).
    """
    ivf = faiss.extract_index_ivf(base)
    dst = faiss.downcast_InvertedLists(ivf.invlists)
    if ivf.ntotal or not isinstance(dst, faiss.BlockInvertedLists):
        raise InvalidInputError("merge_fast_scan merges into an empty fast-scan index")
    layout = PQ4Layout.of(dst.packer)
    srcs = [(faiss.downcast_InvertedLists(faiss.extract_index_ivf(s).invlists), off) for s, off in sources]
    total = 0
    for lst in range(ivf.nlist):
        ids_parts, code_parts = [], []
        for src, offset in srcs:
            n = int(src.list_size(lst))
            if not n:
                continue
            ids_parts.append(faiss.rev_swig_ptr(src.get_ids(lst), n).astype(np.int64) + offset)
            packed = faiss.rev_swig_ptr(src.get_codes(lst), layout.blocks(n) * layout.block_size)
            code_parts.append(layout.unpack_nibbles(packed, n))
        if not ids_parts:
            continue
        ids = np.concatenate(ids_parts)
        codes = np.concatenate(code_parts)
        if drop is not None and len(drop):
            keep = ~in_sorted(ids, drop)
            ids, codes = ids[keep], codes[keep]
        n = len(ids)
        if not n:
            continue
        dst.resize(lst, n)
        out = faiss.rev_swig_ptr(dst.get_codes(lst), layout.blocks(n) * layout.block_size)
        out[:] = layout.pack_nibbles(codes)
        faiss.rev_swig_ptr(dst.get_ids(lst), n)[:] = ids
        total += n
    ivf.ntotal = total
    if base is not ivf and hasattr(base, "ntotal"):
        base.ntotal = total


class PQ4Layout:
    """How FAISS packs blocks of 4-bit PQ codes (``...x4fs``), as one permutation of 4-bit values.

    A block holds ``nvec`` codes of ``code_size`` bytes (two 4-bit sub-quantizer codes per byte,
    the even one in the low half) rearranged for SIMD lookups (FAISS, ``pq4_fast_scan.h``). The
    rearrangement is read from FAISS's own ``CodePacker`` once, by packing blocks whose 4-bit
    values spell each position's index in base 16, so the packing stays FAISS's. Use
    :meth:`of` (cached per block shape); InvalidInputError when the packer is not a permutation
    of 4-bit values.
    """

    _cache: dict[tuple[int, int, int], "PQ4Layout"] = {}

    def __init__(self, packer: Any) -> None:
        self.nvec, self.code_size, self.block_size = int(packer.nvec), int(packer.code_size), int(packer.block_size)
        nib = self.nvec * self.code_size * 2
        if self.block_size * 2 != nib:
            raise InvalidInputError(f"fast-scan block of {self.block_size} bytes for {self.nvec} codes of "
                                    f"{self.code_size} bytes: not a permutation of 4-bit codes")
        pos = np.arange(nib, dtype=np.int64)
        src = np.zeros(nib, np.int64)
        digit = 0
        while 16 ** digit < nib:
            values = ((pos >> (4 * digit)) & 15).astype(np.uint8)
            flat = np.ascontiguousarray(values[0::2] | (values[1::2] << 4))
            out = np.zeros(self.block_size, np.uint8)
            packer.pack_all(faiss.swig_ptr(flat), faiss.swig_ptr(out))
            src |= _nibbles(out[None]).reshape(-1).astype(np.int64) << (4 * digit)
            digit += 1
        if not np.array_equal(np.sort(src), pos):
            raise InvalidInputError("FAISS's fast-scan packer is not a permutation of 4-bit codes")
        #: packed 4-bit value ``j`` of a block is unpacked value ``src[j]``
        self.src = src

    @classmethod
    def of(cls, packer: Any) -> "PQ4Layout":
        key = (int(packer.nvec), int(packer.code_size), int(packer.block_size))
        if key not in cls._cache:
            cls._cache[key] = cls(packer)
        return cls._cache[key]

    def blocks(self, n: int) -> int:
        """Blocks holding ``n`` codes."""
        return -(-n // self.nvec)

    def unpack(self, packed: np.ndarray, n: int) -> np.ndarray:
        """The first ``n`` codes of packed blocks (uint8, ``blocks(n) * block_size`` bytes), shape (n, code_size)."""
        return _bytes(self.unpack_nibbles(packed, n))

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """Codes of shape (n, code_size), uint8, packed into ``blocks(n)`` blocks (unused slots zero), flat uint8."""
        return self.pack_nibbles(_nibbles(codes))

    def unpack_nibbles(self, packed: np.ndarray, n: int) -> np.ndarray:
        """:meth:`unpack` as 4-bit values, shape (n, 2 * code_size) (what :meth:`pack_nibbles` takes)."""
        p = _nibbles(packed.reshape(-1, self.block_size))
        u = np.empty_like(p)
        u[:, self.src] = p
        return u.reshape(-1, 2 * self.code_size)[:n]

    def pack_nibbles(self, nib: np.ndarray) -> np.ndarray:
        """:meth:`pack` of codes given as 4-bit values, shape (n, 2 * code_size)."""
        n = len(nib)
        u = np.zeros((self.blocks(n) * self.nvec, 2 * self.code_size), np.uint8)
        u[:n] = nib
        return _bytes(u.reshape(-1, 2 * self.block_size)[:, self.src]).reshape(-1)


def _nibbles(b: np.ndarray) -> np.ndarray:
    """uint8 rows -> their 4-bit values, low half first: shape (rows, 2 * bytes)."""
    out = np.empty((b.shape[0], b.shape[1] * 2), np.uint8)
    out[:, 0::2] = b & 15
    out[:, 1::2] = b >> 4
    return out


def _bytes(v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_nibbles`."""
    return v[:, 0::2] | (v[:, 1::2] << 4)


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
