"""Reading a version's stored vectors back: from exact segments (lossless),
else from the raw vectors files. Used by retraining, merges of segments FAISS
cannot merge natively, ``eval`` and the precompute of store neighbours.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from ..errors import NoRawVectorsError, RetrostoreError
from ..storage.segments import Segment
from ..storage.tombstones import Tombstones
from ..storage.vectors import RawVectors, require_raw_vectors
from .merge import segment_vectors

__all__ = ["VectorSource", "live_ids", "stored_vectors"]


class VectorSource:
    """Vectors of a manifest's chunks: read back from the segments when they are
    exact (Flat, HNSW-Flat, segments stored as float16: the stored vectors,
    lossless; :attr:`retrostore.storage.segments.Segment.exact`), else from the raw
    vectors files.

    Raises
    ------
    RetrostoreError
        Neither is available (explaining why, for reindex and eval).
    """

    def __init__(self, root: Path, manifest: dict, segments: list[Segment], what: str,
                 raw: RawVectors | None = None):
        self.dim = manifest["index"]["dim"]
        files = manifest["vectors"]["files"]
        self.segments = [s for s in segments if s.count]
        self.exact = all(s.exact for s in self.segments)
        self.raw = None
        if not self.exact:
            if not (manifest["settings"]["keep_vectors"] and files):
                if manifest["vectors"].get("dropped_at_pack"):
                    require_raw_vectors(manifest, what)  # says they were dropped by pack --no-vectors
                raise NoRawVectorsError(
                    f"{what} needs the stored vectors, but this store keeps no raw vectors (keep_vectors=False) "
                    f"and its index ({manifest['index']['factory']!r}) is compressed, so they cannot be read "
                    "back; rebuild the store from its documents with keep_vectors=True"
                )
            # A reader's own mapped files (``raw``) outlive a writer's GC; files opened afresh may be gone.
            self.raw = raw if raw is not None else RawVectors(root, files, self.dim)
        self._firsts = np.array([s.first_id for s in self.segments], np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of chunk ids (any shape), float32; zeros for ids not indexed."""
        ids = np.asarray(ids, np.int64)
        if self.raw is not None:
            return self.raw.take(ids)
        if ids.ndim != 1:
            return self.take(ids.ravel()).reshape(ids.shape + (self.dim,))
        out = np.zeros((len(ids), self.dim), np.float32)
        which = np.searchsorted(self._firsts, ids, side="right") - 1
        for w in np.unique(which[which >= 0]):
            seg = self.segments[int(w)]
            sel = np.nonzero(which == w)[0]
            local = ids[sel] - seg.first_id
            index = faiss.downcast_index(seg.index)
            if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
                idmap = self._maps.get(int(w))
                if idmap is None:
                    idmap = self._maps[int(w)] = faiss.vector_to_array(index.id_map).astype(np.int64)
                pos = np.searchsorted(idmap, local)
                ok = (pos < len(idmap)) & (idmap[np.minimum(pos, len(idmap) - 1)] == local)
                sel, local = sel[ok], pos[ok]
                index = faiss.downcast_index(index.index)
            else:
                ok = local < seg.count
                sel, local = sel[ok], local[ok]
            if len(local):
                out[sel] = index.reconstruct_batch(np.ascontiguousarray(local))
        return out


def live_ids(end: int, tomb: Tombstones) -> np.ndarray:
    """Chunk ids ``[0, end)`` not deleted."""
    ids = np.arange(end, dtype=np.int64)
    return ids[~tomb.chunk_mask(ids)] if len(tomb) else ids


def stored_vectors(manifest: dict, segments: list[Segment], raw: RawVectors | None, first: int,
                   end: int) -> np.ndarray:
    """Vectors of chunks ``[first, end)`` as indexed, shape (end - first, dim), float32.

    Read back from exact segments (Flat, HNSW-Flat, float16 segments), else
    from the raw vectors files (``raw``); zeros for purged chunks.

    Raises
    ------
    NoRawVectorsError
        The raw vectors were dropped at pack time or never kept.
    RetrostoreError
        Neither the index can reconstruct nor raw vectors are kept.
    """
    out = np.zeros((max(0, end - first), manifest["index"]["dim"]), np.float32)
    for seg in segments:
        lo, hi = max(first, seg.first_id), min(end, seg.end_id)
        if lo >= hi:
            continue
        plain = type(faiss.downcast_index(seg.index)) not in (faiss.IndexIDMap, faiss.IndexIDMap2)
        if seg.exact and not seg.holes and plain:
            out[lo - first : hi - first] = seg.index.reconstruct_n(lo - seg.first_id, hi - lo)
        elif seg.exact:
            ids, vecs = segment_vectors(seg)
            sel = (ids + seg.first_id >= lo) & (ids + seg.first_id < hi)
            out[ids[sel] + seg.first_id - first] = vecs[sel]
        elif raw is not None:
            out[lo - first : hi - first] = raw.rows(lo, hi)
        else:
            require_raw_vectors(manifest, "precomputing store neighbours over this index")
            raise RetrostoreError(
                f"chunks {lo}..{hi - 1}: the index cannot reconstruct vectors and no raw vectors are kept; "
                "precomputing store neighbours needs keep_vectors=True or a reconstructible index"
            )
    return out
