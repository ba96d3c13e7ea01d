"""Reading the version a handle serves: chunks, documents and metadata by id,
vector search, and search hits with their continuations.

:class:`Reader` does the work of ``Store.get_chunks``, ``get_document``,
``get_metadata``, ``search_vectors`` and the lookups of ``search`` and
``neighbors``; the ``Store`` methods check the handle and delegate here.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from ..errors import CorruptStoreError, InvalidInputError
from ..index.params import check_params
from ..storage.chunktable import ChunkTable
from ..storage.layout import DATA_MDB
from ..storage.records import ChunkRecord
from ..types import Chunk, Document, Hit
from .version import Head, Version

__all__ = ["Reader", "check_k", "check_queries", "int_ids"]

#: Most results one query may ask for.
MAX_K = 100_000


class Reader:
    """Reads of the version ``head`` serves, from ``table`` and the version's index.

    Parameters
    ----------
    table : ChunkTable
        The store's LMDB chunk table.
    head : Head
        The handle's served version (it moves on refresh and commit).
    """

    def __init__(self, table: ChunkTable, head: Head):
        self.table = table
        self._head = head
        self._doc_ids: tuple[tuple[int, int], np.ndarray] | None = None

    @property
    def version(self) -> Version:
        """The version served now."""
        return self._head.version

    @property
    def limit(self) -> int:
        """Committed chunk ids: ``[0, limit)``."""
        return self.version.n_chunks

    # -- by id ---------------------------------------------------------------
    def get_chunks(self, chunk_ids: Iterable[int]) -> list[Chunk]:
        """See :meth:`retrostore.Store.get_chunks`."""
        ids = int_ids(chunk_ids, "chunk")
        limit = self.limit
        for i in ids:
            if not 0 <= i < limit:
                raise InvalidInputError(f"chunk id {i} is outside the committed range [0, {limit})")
        self.version.tombstones.check_chunks(ids)
        return [Chunk(r.chunk_id, r.doc_id, r.position, r.start, r.text, r.token_ids)
                for r in self.table.get_chunks(ids, limit)]

    def get_document(self, doc_id: int) -> Document:
        """See :meth:`retrostore.Store.get_document`."""
        limit = self.version.n_docs
        if not isinstance(doc_id, (int, np.integer)) or not 0 <= int(doc_id) < limit:
            raise InvalidInputError(f"document id {doc_id!r} is outside the committed range [0, {limit})")
        self.version.tombstones.check_docs([doc_id])
        rec = self.table.get_doc(int(doc_id))
        if rec is None:
            raise CorruptStoreError(f"{DATA_MDB}: committed document {doc_id} is missing")
        ids = range(rec.first_chunk, rec.first_chunk + rec.n_chunks)
        if rec.text is not None:
            text = rec.text
        else:
            text = "".join(r.text for r in self.table.iter_chunks(ids.start, ids.stop))
        return Document(int(doc_id), text, rec.metadata, ids)

    def get_metadata(self, doc_ids: Iterable[int]) -> list[Any]:
        """See :meth:`retrostore.Store.get_metadata`."""
        limit = self.version.n_docs
        out = []
        for d in int_ids(doc_ids, "document"):
            if not 0 <= int(d) < limit:
                raise InvalidInputError(f"document id {d!r} is outside the committed range [0, {limit})")
            self.version.tombstones.check_docs([d])
            rec = self.table.get_doc(int(d))
            if rec is None:
                raise CorruptStoreError(f"{DATA_MDB}: committed document {d} is missing")
            out.append(rec.metadata)
        return out

    def records_with_continuations(self, ids: np.ndarray) -> dict[int, ChunkRecord]:
        """Chunk records of the ids >= 0 in ``ids`` (any shape) and of the chunk after each
        (its continuation candidate), deleted chunks left out: ``{chunk id: record}``."""
        limit = self.limit
        flat = [int(i) for i in np.asarray(ids).ravel() if i >= 0]
        wanted = self.version.tombstones.drop(sorted(set(flat) | {i + 1 for i in flat if i + 1 < limit}))
        return dict(zip(wanted, self.table.get_chunks(wanted, limit)))

    # -- search --------------------------------------------------------------
    def search_vectors(self, vectors: Any, k: Any, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`retrostore.Store.search_vectors`."""
        k = check_k(k)
        dim = self.version.manifest["index"]["dim"]
        q = np.asarray(vectors)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != dim or not np.issubdtype(q.dtype, np.number):
            raise InvalidInputError(f"query vectors have shape {q.shape} and dtype {q.dtype}; expected (n, {dim}) floats")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if not np.isfinite(q).all():
            raise InvalidInputError("query vectors hold NaN or inf; every value must be finite")
        return self.version.index.search(q, k, check_params(params))

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        """Search results as :class:`Hit` rows: each chunk with its score and continuation
        (the next chunk of the same document), ids < 0 left out."""
        recs = self.records_with_continuations(ids)
        out = []
        for row_s, row_i in zip(scores, ids):
            row = []
            for s, i in zip(row_s, row_i):
                if i < 0:
                    continue
                r = recs[int(i)]
                nxt = recs.get(int(i) + 1)
                if nxt is not None and nxt.doc_id != r.doc_id:
                    nxt = None
                row.append(Hit(r.chunk_id, r.doc_id, r.position, float(s), r.text, r.token_ids,
                               nxt.text if nxt else "", nxt.token_ids if nxt else np.zeros(0, np.int64)))
            out.append(row)
        return out

    # -- document ids of chunks ------------------------------------------------
    def all_doc_ids(self) -> np.ndarray:
        """Document id of every committed chunk, (N,) int64, cached per version."""
        v = self.version
        key = (v.number, v.n_chunks)
        if self._doc_ids is None or self._doc_ids[0] != key:
            self._doc_ids = (key, self.table.chunk_doc_ids(v.n_chunks, v.n_docs))
        return self._doc_ids[1]

    def doc_ids_of(self, chunk_ids: np.ndarray) -> np.ndarray:
        """Document ids of committed chunk ids (an int64 array of any shape, all >= 0)."""
        return self.all_doc_ids()[np.asarray(chunk_ids, dtype=np.int64)]


def check_queries(query: Any) -> tuple[list[str], bool]:
    """``search``'s query as a list of strings, and whether one ``str`` was given.

    Raises
    ------
    InvalidInputError
        Not a str or a sequence of str, or an empty (whitespace) query.
    """
    single = isinstance(query, str)
    if not single and (isinstance(query, (bytes, bytearray)) or not isinstance(query, Iterable)):
        raise InvalidInputError(f"query must be a str or a sequence of str, not {type(query).__name__}")
    queries = [query] if single else list(query)
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise InvalidInputError(f"query {i} is a {type(q).__name__}, not a str")
        if not q.strip():
            raise InvalidInputError(f"query {i} is empty or whitespace ({q!r}); its embedding would match "
                                    "arbitrary chunks: give the text to look up")
    return queries, single


def check_k(k: Any) -> int:
    """``k`` as an int in [1, :data:`MAX_K`].

    Raises
    ------
    InvalidInputError
        Not an int (bools refused), below 1 or above the limit.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k={k!r} must be an int >= 1 (the number of neighbours to return)")
    if k > MAX_K:
        raise InvalidInputError(f"k={k} exceeds the limit of {MAX_K} results per query; page with a smaller k")
    return int(k)


def int_ids(ids: Any, what: str) -> list[int]:
    """``ids`` as a list of ints; refuses a str (it would iterate characters), non-iterables,
    and values that are not integers (0.5 is not id 0).

    Raises
    ------
    InvalidInputError
        Naming the first offending value.
    """
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Iterable):
        raise InvalidInputError(f"{what} ids must be an iterable of int, not {type(ids).__name__}")
    if isinstance(ids, np.ndarray) and np.issubdtype(ids.dtype, np.integer):
        return ids.ravel().tolist()
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            if isinstance(i, (float, np.floating)) and float(i).is_integer():
                i = int(i)
            else:
                raise InvalidInputError(f"{what} id {i!r} is not an integer")
        out.append(int(i))
    return out
