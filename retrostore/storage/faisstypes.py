"""FAISS index types: metrics, and seeing through wrappers (pre-transforms, ID
maps, refine indexes) to the index that holds the codes.
"""

from __future__ import annotations

import faiss

__all__ = ["METRICS", "FLAT_TYPES", "with_idmap", "split_idmap", "unwrap", "is_ivf", "is_exact"]

#: The store's metric names and FAISS's.
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
#: Exact, uncompressed float32 indexes.
FLAT_TYPES = (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2)


def with_idmap(inner: faiss.Index) -> faiss.Index:
    """``inner`` in an ``IndexIDMap`` that owns it (FAISS wraps only an empty index)."""
    wrapped = faiss.IndexIDMap(inner)
    inner.this.disown()
    wrapped.own_fields = True
    return wrapped


def split_idmap(index: faiss.Index) -> tuple[faiss.Index, faiss.Index | None]:
    """(inner index, its ID map wrapper or None)."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.downcast_index(index.index), index
    return index, None


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
    return type(index) in FLAT_TYPES
