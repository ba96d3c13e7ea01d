"""Tombstone files: the deleted documents of a version (take-down requests).

A commit that deletes documents writes a new tombstone file,
``index/del-<tag>.npy``: int64 rows ``(doc_id, first_chunk, n_chunks,
purged_version)`` sorted by doc id, one per document ever deleted
(``purged_version`` is 0 until ``compact`` removes the document's data). From
that version on, searches skip the chunks and lookups by id raise. Chunk and
document ids stay stable: purged ids are documented holes (the manifest's
``deletes`` counts), never reused.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import CorruptStoreError, InvalidInputError
from .fileio import write_durable
from .layout import tombstone_name

__all__ = ["Tombstones", "write_tombstones", "in_sorted", "EMPTY_DELETES", "DELETES_READER_VERSION"]

EMPTY_DELETES = {"file": None, "documents": 0, "chunks": 0, "purged_documents": 0, "purged_chunks": 0}
#: Readers older than this format cannot honour tombstones: a store with deletes needs it.
DELETES_READER_VERSION = 2


class Tombstones:
    """The deleted documents of one version.

    Attributes
    ----------
    rows : ndarray, shape (n, 4), int64
        ``(doc_id, first_chunk, n_chunks, purged_version)`` sorted by doc id.
    docs : ndarray, shape (n,), int64
    chunks : ndarray, int64
        Every deleted chunk id, sorted.
    """

    def __init__(self, rows: np.ndarray | None = None):
        self.rows = np.zeros((0, 4), np.int64) if rows is None else np.asarray(rows, np.int64).reshape(-1, 4)
        self.docs = self.rows[:, 0].copy()
        parts = [np.arange(c, c + n, dtype=np.int64) for _, c, n, _ in self.rows]
        self.chunks = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    @classmethod
    def load(cls, root: Path, manifest: dict) -> "Tombstones":
        """The tombstones a manifest names (checksum verified).

        Raises
        ------
        CorruptStoreError
            The file is missing, damaged or malformed.
        """
        entry = (manifest.get("deletes") or {}).get("file")
        if not entry:
            return cls()
        rel = entry["path"]
        try:
            raw = (root / rel).read_bytes()
        except FileNotFoundError:
            raise CorruptStoreError(f"{rel}: tombstone file referenced by the manifest is missing") from None
        if len(raw) != entry["size"] or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise CorruptStoreError(f"{rel}: tombstone file size or checksum differs from the manifest; it is damaged")
        try:
            rows = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise CorruptStoreError(f"{rel}: not a readable .npy tombstone file ({exc})") from exc
        if rows.ndim != 2 or rows.shape[1] != 4 or rows.dtype != np.int64:
            raise CorruptStoreError(f"{rel}: tombstone rows have shape {rows.shape} {rows.dtype}, expected (n, 4) int64")
        return cls(rows)

    def __len__(self) -> int:
        return len(self.docs)

    def doc_mask(self, doc_ids: np.ndarray) -> np.ndarray:
        return in_sorted(np.asarray(doc_ids, np.int64), self.docs)

    def chunk_mask(self, chunk_ids: np.ndarray) -> np.ndarray:
        return in_sorted(np.asarray(chunk_ids, np.int64), self.chunks)

    def drop(self, chunk_ids: Iterable[int]) -> list[int]:
        """``chunk_ids`` without deleted ones (order kept)."""
        ids = list(chunk_ids)
        if not len(self.chunks) or not ids:
            return ids
        dead = self.chunk_mask(np.array(ids, np.int64))
        return [i for i, d in zip(ids, dead) if not d]

    def check_docs(self, doc_ids: Iterable[int]) -> None:
        """Raise for a deleted document id.

        Raises
        ------
        InvalidInputError
            Naming the document and the version that deleted or purged it.
        """
        if not len(self.docs):
            return
        ids = np.array([int(d) for d in doc_ids], np.int64)
        dead = self.doc_mask(ids)
        if dead.any():
            d = int(ids[np.argmax(dead)])
            raise InvalidInputError(f"document {d} was deleted (Store.delete); its text and chunks are no longer served")

    def check_chunks(self, chunk_ids: Iterable[int]) -> None:
        """Raise for a chunk id of a deleted document (see :meth:`check_docs`)."""
        if not len(self.chunks):
            return
        ids = np.array([int(c) for c in chunk_ids], np.int64)
        dead = self.chunk_mask(ids)
        if dead.any():
            c = int(ids[np.argmax(dead)])
            raise InvalidInputError(f"chunk {c} belongs to a deleted document (Store.delete); it is no longer served")

    def pending(self) -> np.ndarray:
        """Rows not purged yet."""
        return self.rows[self.rows[:, 3] == 0]


def in_sorted(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Boolean mask of ``ids`` (any shape) found in the sorted int64 array ``sorted_ids``."""
    if not len(sorted_ids):
        return np.zeros(ids.shape, bool)
    pos = np.searchsorted(sorted_ids, ids)
    pos[pos >= len(sorted_ids)] = 0
    return sorted_ids[pos] == ids


def write_tombstones(root: Path, new: dict, tomb: Tombstones, tag: str, new_files: list) -> None:
    """Write ``tomb`` as the version's tombstone file ``index/del-<tag>.npy`` and update ``new["deletes"]``
    (and ``min_reader_version``). The path goes to ``new_files`` first (a failed commit removes it)."""
    rel = tombstone_name(tag)
    path = root / rel
    new_files.append(path)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(tomb.rows, np.int64), allow_pickle=False)
    size, sha = write_durable(path, [buf.getvalue()])
    purged = tomb.rows[tomb.rows[:, 3] > 0]
    new["deletes"] = {
        "file": {"path": rel, "size": size, "sha256": sha},
        "documents": int(len(tomb.rows)), "chunks": int(tomb.rows[:, 2].sum()),
        "purged_documents": int(len(purged)), "purged_chunks": int(purged[:, 2].sum()),
    }
    new["min_reader_version"] = max(int(new["min_reader_version"]), DELETES_READER_VERSION)
