"""Every committed chunk's tokens and document, read once through the public API.

:class:`ChunkTable` is the in-memory view the training-side code works on:
the token ids of all chunks as one ``(N, T)`` array, their lengths, documents
and whether the next chunk id continues the same document. It costs
``4 * T + 12`` bytes per chunk (int32 tokens, int16 length, int64 doc id, two
bools; 268 B at T = 64: 14 MB for the 51,429 chunks of the pydocs corpus,
268 MB for a million).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidInputError, check_int, shown
from ._checks import settings

if TYPE_CHECKING:
    from retrostore import Store

__all__ = ["ChunkTable", "chunk_table", "check_table", "mark_document_ends", "store_identity"]

def store_identity(store: "Store") -> str:
    """Which store and version ``store`` serves: the sha256 of that version's manifest.

    Two stores at the same version number differ (their commit times, files and
    checksums are in the manifest), so a table, training windows or a candidates
    file made from one are never taken for the other's (helper-17: a store
    built from the same documents in another order reused another's candidates
    and got other neighbours).
    """
    return settings(store).identity  # cached with the other manifest values, per handle and version


def check_table(store: "Store", table: "ChunkTable", what: str = "table") -> None:
    """Raise unless ``table`` was read from this very store and version.

    Raises
    ------
    InvalidInputError
        Naming both versions (or that the stores differ) and the fix; ``table`` not a
        :class:`ChunkTable`.
    """
    if not isinstance(table, ChunkTable):
        raise InvalidInputError(f"{what} is {shown(table)} ({type(table).__name__}); pass the ChunkTable of "
                                "chunk_table(store), or None to read it")
    if table.version != store.version:  # (same version, other store: the next check; helper-60)
        raise InvalidInputError(f"{what} is of store version {table.version} ({len(table):,} chunks), the store is "
                                f"at version {store.version} ({len(store):,} chunks); read a new one with "
                                "chunk_table(store)")
    if table.store != store_identity(store):
        raise InvalidInputError(f"{what} was read from another store (manifest sha256 {table.store[:12]}..., this "
                                f"store's is {store_identity(store)[:12]}...); read a new one with chunk_table(store)")


@dataclass(frozen=True)
class ChunkTable:
    """Token ids of every chunk of one committed store version.

    Attributes
    ----------
    tokens : ndarray, shape (N, T), int32
        Chunk ``i``'s token ids in ``tokens[i, :lengths[i]]``; 0 beyond.
    lengths : ndarray, shape (N,), int16
        Tokens per chunk (``T`` but for a document's last chunk); 0 for a
        deleted chunk.
    doc_ids : ndarray, shape (N,), int64
        Document of each chunk; -1 for a deleted chunk.
    next_in_doc : ndarray, shape (N,), bool
        Chunk ``i + 1`` exists and belongs to the same document (``i`` has a
        continuation, Borgeaud et al. 2021, §2.3).
    live : ndarray, shape (N,), bool
        Not deleted (``Store.delete``).
    chunk_tokens : int
        T.
    version : int
        The store version read.
    store : str
        :func:`store_identity` of the store and version read.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    doc_ids: np.ndarray
    next_in_doc: np.ndarray
    live: np.ndarray
    chunk_tokens: int
    version: int
    store: str

    def __len__(self) -> int:
        return len(self.lengths)

    def padded(self, ids: np.ndarray, pad_id: int) -> np.ndarray:
        """Tokens of chunk ids (any shape, -1 allowed) padded with ``pad_id``: shape ``ids.shape + (T,)``, int64."""
        ids = np.asarray(ids, np.int64)
        out = self.tokens[np.maximum(ids, 0)].astype(np.int64)
        out[~self.text_mask(ids)] = pad_id
        return out

    def text_mask(self, ids: np.ndarray) -> np.ndarray:
        """Which of the ``T`` token slots of chunk ids (any shape, -1 allowed: none) hold text: shape
        ``ids.shape + (T,)``, bool."""
        ids = np.asarray(ids, np.int64)
        lengths = np.where(ids >= 0, self.lengths[np.maximum(ids, 0)], 0)
        return np.arange(self.chunk_tokens) < lengths[..., None]


def chunk_table(store: "Store", *, batch_size: int = 8192) -> ChunkTable:
    """Read the tokens of every committed chunk (``Store.neighbor_tokens`` in batches: no text decoded).

    Parameters
    ----------
    store : Store
    batch_size : int, default 8192
        Chunks per read.

    Returns
    -------
    ChunkTable
        Of ``store.version``; ``len(table) == len(store)``; deleted chunks
        have length 0 and document -1.

    Raises
    ------
    InvalidInputError
        ``batch_size`` is not an int >= 1.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    n = len(store)
    t = settings(store).chunk_tokens
    tokens = np.zeros((n, t), np.int32)
    lengths = np.zeros(n, np.int16)
    doc_ids = np.full(n, -1, np.int64)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        nb = store.neighbor_tokens(np.arange(start, stop)[:, None])
        tokens[start:stop] = np.where(nb.mask[:, 0, :t], nb.tokens[:, 0, :t], 0)
        lengths[start:stop] = nb.mask[:, 0, :t].sum(axis=1)
        doc_ids[start:stop] = nb.doc_ids[:, 0]
    live = doc_ids >= 0
    next_in_doc = np.zeros(n, bool)
    if n > 1:
        next_in_doc[:-1] = live[:-1] & (doc_ids[:-1] == doc_ids[1:])
    return ChunkTable(tokens, lengths, doc_ids, next_in_doc, live, t, store.version, store_identity(store))


def mark_document_ends(tokens: np.ndarray, ids: np.ndarray, table: ChunkTable, eos_id: int) -> tuple:
    """Put ``eos_id`` right after the last token of every document that ends in ``ids`` (in place);
    returns the index of the tokens set (for a mask of real tokens).

    ``tokens`` holds the chunks of ``ids`` (shape ``(..., S)``, -1 allowed) laid end to end on its
    last axis, ``T`` tokens each, padded: a chunk that ends its document with ``n < T`` tokens gets
    ``eos_id`` at its own slot ``n``; a full one at the first slot of the chunk after it, when
    ``tokens`` has room (a document-mode window's next slot is empty). Document-mode windows
    (:class:`Sequences`), their export rows, and neighbours in ``TrainingSet`` (``S = T``).
    """
    t = table.chunk_tokens
    ids = np.asarray(ids, np.int64)
    safe = np.maximum(ids, 0)
    ends = (ids >= 0) & ~table.next_in_doc[safe]
    where = np.nonzero(ends)
    pos = where[-1] * t + table.lengths[safe[where]].astype(np.int64)
    room = pos < tokens.shape[-1]
    at = (*[w[room] for w in where[:-1]], pos[room])
    tokens[at] = eos_id
    return at
