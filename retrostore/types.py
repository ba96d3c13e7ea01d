"""Small result types returned by the public API: Chunk, Document, Hit, Neighbors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Hit", "Chunk", "Document", "Neighbors"]


@dataclass(frozen=True)
class Chunk:
    """A stored chunk.

    Attributes
    ----------
    chunk_id : int
        Dense id from 0; also the FAISS id.
    doc_id : int
    position : int
        Index of the chunk within its document, from 0.
    start : int
        Character offset (Python ``str`` index) of the chunk's span in its document.
    text : str
        The exact span of the source document; a document's spans tile it.
    tokens : ndarray, shape (n,), int64
        Token ids in the store's chunk-tokenizer space, ``n <= chunk_tokens``.
    """

    chunk_id: int
    doc_id: int
    position: int
    start: int
    text: str
    tokens: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Hit:
    """One search result: a chunk, its score and its continuation.

    Attributes
    ----------
    chunk_id, doc_id, position : int
    score : float
        Inner product (metric ``"ip"``; higher is nearer; cosine similarity for
        the default L2-normalised embedder) or squared L2 distance (``"l2"``;
        lower is nearer), as FAISS computes it.
    text : str
        Exact span of the source document.
    tokens : ndarray, shape (n,), int64
    continuation_text : str
        Text of the next chunk of the same document (RETRO's continuation,
        Borgeaud et al. 2021, §2.3); ``""`` at the end of a document.
    continuation_tokens : ndarray, shape (m,), int64
        Its tokens; empty at the end of a document.
    """

    chunk_id: int
    doc_id: int
    position: int
    score: float
    text: str
    tokens: np.ndarray = field(repr=False)
    continuation_text: str = field(repr=False, default="")
    continuation_tokens: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (token arrays as lists)."""
        return {
            "chunk_id": self.chunk_id,
            "doc_id": self.doc_id,
            "position": self.position,
            "score": self.score,
            "text": self.text,
            "tokens": self.tokens.tolist(),
            "continuation_text": self.continuation_text,
            "continuation_tokens": self.continuation_tokens.tolist(),
        }


@dataclass(frozen=True)
class Document:
    """A stored document.

    Attributes
    ----------
    doc_id : int
    text : str
        The document exactly as appended (the concatenation of its chunk spans, when it has chunks).
    metadata : Any
        JSON-like metadata given at append (``None`` if none).
    chunk_ids : range
        Its chunks' ids, consecutive; empty for an empty or whitespace-only document, or one
        that yields no tokens (only control, zero-width or combining characters: its text is
        kept, but no chunk holds it and search never finds it).
    """

    doc_id: int
    text: str
    metadata: Any
    chunk_ids: range


@dataclass(frozen=True)
class Neighbors:
    """Retrieved neighbours of every chunk of a batch of token sequences.

    Shapes use B = batch, C = chunks per row (``ceil(L / chunk_tokens)``),
    k = neighbours per chunk and T = ``chunk_tokens`` (64 in RETRO).

    Attributes
    ----------
    tokens : ndarray, shape (B, C, k, 2 * T), int64
        Neighbour tokens then continuation tokens (the next chunk of the same
        document), each part padded to T with the tokenizer's pad id where it is
        shorter or absent (document end, or no neighbour).
    mask : ndarray, shape (B, C, k, 2 * T), bool
        True where ``tokens`` holds a real token.
    chunk_ids : ndarray, shape (B, C, k), int64
        Neighbour chunk ids; -1 where fewer than k neighbours exist.
    doc_ids : ndarray, shape (B, C, k), int64
        Their documents; -1 with ``chunk_ids``.
    scores : ndarray, shape (B, C, k), float32
        Inner products (higher is nearer) or squared L2 distances (lower is
        nearer); -inf / +inf where there is no neighbour; NaN when the
        neighbours were given by id (``Store.neighbor_tokens``).
    """

    tokens: np.ndarray
    mask: np.ndarray
    chunk_ids: np.ndarray
    doc_ids: np.ndarray
    scores: np.ndarray
