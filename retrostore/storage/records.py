"""The values of the LMDB chunk table: chunk and document records, and the
content digest of a commit's records (see :mod:`.chunktable` for the layout).

Sharded builds write their records with :func:`encode_chunks` too, so merged
records are byte-identical to appended ones.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import numpy as np

__all__ = ["ChunkRecord", "DocRecord", "encode_chunks", "encode_doc", "RecordHasher"]


class ChunkRecord:
    """One stored chunk (see module docstring for the on-disk fields)."""

    __slots__ = ("chunk_id", "doc_id", "position", "start", "text", "token_ids")

    def __init__(self, chunk_id: int, doc_id: int, position: int, start: int, text: str, token_ids: np.ndarray):
        self.chunk_id = chunk_id
        self.doc_id = doc_id
        self.position = position
        self.start = start
        self.text = text
        self.token_ids = token_ids


class DocRecord:
    """One stored document: its first chunk id, chunk count and metadata."""

    __slots__ = ("doc_id", "first_chunk", "n_chunks", "metadata", "text")

    def __init__(self, doc_id: int, first_chunk: int, n_chunks: int, metadata: Any, text: str | None):
        self.doc_id = doc_id
        self.first_chunk = first_chunk
        self.n_chunks = n_chunks
        self.metadata = metadata
        self.text = text


def encode_chunks(token_dtype: Any, doc_id: int, text: str, chunks: list) -> list[bytes]:
    """The msgpack values (unsealed) of one document's chunk records, as laid out above.

    Sharded builds write their records with it too, so merged records are
    byte-identical to appended ones. Token ids are converted to ``token_dtype``
    once per document.
    """
    if not chunks:
        return []
    dtype = np.dtype(token_dtype)
    tokens = np.concatenate([c.token_ids for c in chunks]).astype(dtype, copy=False).tobytes()
    pack = msgpack.Packer(use_bin_type=True).pack
    out, at = [], 0
    for c in chunks:
        end = at + len(c.token_ids) * dtype.itemsize
        out.append(pack({"d": doc_id, "p": c.position, "o": c.start, "s": text[c.start : c.end], "t": tokens[at:end]}))
        at = end
    return out


class RecordHasher:
    """Incremental version of :func:`retrostore.storage.lmdbscan.records_digest` fed while appending."""

    def __init__(self) -> None:
        self.chunks = hashlib.sha256()
        self.docs = hashlib.sha256()

    def add(self, chunks: list[tuple[bytes, bytes]], docs: list[tuple[bytes, bytes]]) -> None:
        """Feed (key, value) records, in id order; one hash update per table."""
        for h, items in ((self.chunks, chunks), (self.docs, docs)):
            h.update(b"".join([b for k, v in items for b in (k, len(v).to_bytes(8, "big"), v)]))

    def hexdigest(self) -> str:
        return hashlib.sha256(self.chunks.digest() + self.docs.digest()).hexdigest()


def encode_doc(first_chunk: int, n_chunks: int, metadata: Any, text: str | None) -> bytes:
    """The msgpack value (unsealed) of a document record: ``{"c": first chunk id, "n": number of
    chunks, "m": metadata}``, and ``"x": text`` for a document with no chunks."""
    rec = {"c": first_chunk, "n": n_chunks, "m": metadata}
    if text is not None:
        rec["x"] = text
    return msgpack.packb(rec, use_bin_type=True)
