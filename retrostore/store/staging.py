"""What the writer stages: the :class:`Batch` of appends and deletes since the
last commit, and the checks of ``append``'s arguments (documents, metadata,
precomputed embeddings) made before anything is staged.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import InvalidDocumentError, InvalidEmbeddingsError, InvalidInputError
from ..storage.metadata import clean_metadata
from ..storage.records import RecordHasher

__all__ = ["Batch", "documents", "check_embeddings"]


class Batch:
    """What the writer staged since the last commit.

    Attributes
    ----------
    vectors : list of ndarray
        The appended parts' vectors, (n_i, dim) float32, in order.
    chunks, docs : int
        Chunks and documents staged (their LMDB records are written already,
        beyond the committed high-water marks).
    deletes : set of int
        Committed document ids to delete.
    hasher : RecordHasher
        Content digest of the staged records.
    fields : dict
        Top-level manifest fields the commit sets (a sharded build's ``builds``).
    codes : list
        Per appended part, its vectors encoded by the store's template (a
        sharded build's shards), or None: the commit adopts them when every
        part has them (:func:`retrostore.store.indexer.commit_index`).
    encoder : BatchEncoder or None
        The parts (given without codes) being encoded by the store's trained IVF
        template on a second thread as they are staged (:mod:`.encoding`).
    """

    def __init__(self) -> None:
        self.vectors: list[np.ndarray] = []
        self.chunks = 0
        self.docs = 0
        self.deletes: set[int] = set()
        self.hasher = RecordHasher()
        self.fields: dict[str, Any] = {}
        self.codes: list[Any] = []
        self.encoder: Any = None

    def close(self) -> None:
        """Stop the encoder's thread (the batch is committed or dropped)."""
        encoder, self.encoder = self.encoder, None  # forgotten first: a Ctrl-C in the wait below
        if encoder is not None:                     # must not leave a shut-down pool to the next append
            encoder.close()

    @property
    def empty(self) -> bool:
        """Nothing to commit (no appends, deletes or manifest fields)."""
        return not self.chunks and not self.docs and not self.deletes and not self.fields

    def stacked(self, dim: int, fp16: bool) -> np.ndarray:
        """The batch's vectors, shape (n, dim): float32, or float16 when they become a float16
        Flat segment (each part cast into one array: no float32 copy of the whole batch)."""
        if not self.vectors:
            return np.zeros((0, dim), np.float32)
        if not fp16:
            return np.concatenate(self.vectors)
        out = np.empty((sum(len(p) for p in self.vectors), dim), np.float16)
        at = 0
        for p in self.vectors:
            out[at : at + len(p)] = p
            at += len(p)
        return out


def documents(docs: Any, metadata: Any) -> tuple[list[str], list, bool]:
    """``append``'s documents and metadata as lists, the metadata cleaned, and whether one
    document was given as a ``str``.

    Raises
    ------
    InvalidDocumentError
        ``docs`` or a document is not text.
    InvalidInputError, InvalidMetadataError
        The metadata does not give one storable value per document.
    """
    single = isinstance(docs, str)
    if single:
        docs = [docs]
        metas = [metadata]
    else:
        if isinstance(docs, (bytes, bytearray)) or not isinstance(docs, Iterable):
            raise InvalidDocumentError(
                f"docs is a {type(docs).__name__}; pass a str or an iterable of str (decode bytes first)"
            )
        if isinstance(docs, Mapping):  # helper-38: {"a": 1} stored the key "a" as a document
            raise InvalidDocumentError(
                f"docs is a {type(docs).__name__}; pass a str or a list of str, with the metadata as "
                "metadata=[...] (one value per document)"
            )
        docs = list(docs)
        if metadata is None:
            metas = [None] * len(docs)
        else:
            if isinstance(metadata, (dict, str)) or not isinstance(metadata, Sequence):
                raise InvalidInputError(
                    "metadata must be a sequence (a list) with one value per document when several documents "
                    f"are given (got a {type(metadata).__name__})"
                )
            metas = list(metadata)
            if len(metas) != len(docs):
                raise InvalidInputError(f"{len(metas)} metadata values for {len(docs)} documents; give one each")
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            raise InvalidDocumentError(
                f"document {i} is a {type(d).__name__}, not a str; decode bytes and convert values to text"
            )
    return docs, [clean_metadata(v, f"metadata[{i}]") for i, v in enumerate(metas)], single


def check_embeddings(arr: Any, n_chunks: int, dim: int) -> np.ndarray:
    """Precomputed embeddings given to ``append`` as a C-contiguous float32 (n_chunks, dim) copy
    (the caller may reuse its array once ``append`` returns).

    Raises
    ------
    InvalidEmbeddingsError
        Wrong shape or a non-float dtype.
    """
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape != (n_chunks, dim):
        raise InvalidEmbeddingsError(
            f"embeddings have shape {arr.shape}; these documents make {n_chunks} chunks and the store's "
            f"dimension is {dim}, so shape ({n_chunks}, {dim}) is needed (one row per chunk, in order)"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidEmbeddingsError(f"embeddings have dtype {arr.dtype}; a float dtype is needed")
    # A copy: the batch keeps the rows until commit (and encodes them meanwhile), and a caller
    # may refill its array for the next append.
    return np.array(arr, dtype=np.float32, order="C", copy=True)
