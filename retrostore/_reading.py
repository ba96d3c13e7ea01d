"""Reading a store: chunks, documents and metadata by id, vector and text search,
RETRO neighbours. Mixed into :class:`retrostore.Store` (retrostore/_store.py),
whose lifecycle and state (``_check``, ``_manifest``, ``_table``, ``_index``,
``_tombstones``) these methods use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from ._chunks import LMDB_DIR
from ._maintenance import stored_vectors
from ._params import check_params
from ._types import Chunk, Document, Hit
from .errors import CorruptStoreError, InvalidInputError

if TYPE_CHECKING:
    from ._retro import Neighbors


class ReadMixin:
    """The read API of :class:`retrostore.Store` (documented there)."""

    def _limit(self) -> int:
        return int(self._manifest["next_chunk_id"])

    def get_chunks(self, chunk_ids: Iterable[int]) -> list[Chunk]:
        """Committed chunks by id.

        Parameters
        ----------
        chunk_ids : iterable of int

        Returns
        -------
        list of Chunk

        Raises
        ------
        InvalidInputError
            An id is negative or not committed (``>= len(store)``).
        """
        self._check()
        ids = _int_ids(chunk_ids, "chunk")
        limit = self._limit()
        for i in ids:
            if not 0 <= i < limit:
                raise InvalidInputError(f"chunk id {i} is outside the committed range [0, {limit})")
        self._tombstones.check_chunks(ids)
        return [Chunk(r.chunk_id, r.doc_id, r.position, r.start, r.text, r.token_ids)
                for r in self._table.get_chunks(ids, limit)]

    def get_document(self, doc_id: int) -> Document:
        """A committed document: its exact text (joined chunk spans) and metadata.

        Raises
        ------
        InvalidInputError
            ``doc_id`` is negative or not committed.
        """
        self._check()
        limit = int(self._manifest["next_doc_id"])
        if not isinstance(doc_id, (int, np.integer)) or not 0 <= int(doc_id) < limit:
            raise InvalidInputError(f"document id {doc_id!r} is outside the committed range [0, {limit})")
        self._tombstones.check_docs([doc_id])
        rec = self._table.get_doc(int(doc_id))
        if rec is None:
            raise CorruptStoreError(f"{LMDB_DIR}/data.mdb: committed document {doc_id} is missing")
        ids = range(rec.first_chunk, rec.first_chunk + rec.n_chunks)
        if rec.text is not None:
            text = rec.text
        else:
            text = "".join(r.text for r in self._table.iter_chunks(ids.start, ids.stop))
        return Document(int(doc_id), text, rec.metadata, ids)

    def get_metadata(self, doc_ids: Iterable[int]) -> list[Any]:
        """Metadata of committed documents (without reading their text).

        Raises
        ------
        InvalidInputError
            An id is negative or not committed.
        """
        self._check()
        limit = int(self._manifest["next_doc_id"])
        out = []
        for d in _int_ids(doc_ids, "document"):
            if not 0 <= int(d) < limit:
                raise InvalidInputError(f"document id {d!r} is outside the committed range [0, {limit})")
            self._tombstones.check_docs([d])
            rec = self._table.get_doc(int(d))
            if rec is None:
                raise CorruptStoreError(f"{LMDB_DIR}/data.mdb: committed document {d} is missing")
            out.append(rec.metadata)
        return out

    def search_vectors(self, vectors: np.ndarray, k: int = 5, *,
                       params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest committed chunks of query vectors.

        Parameters
        ----------
        vectors : ndarray, shape (n, dim) or (dim,)
            Query vectors; float64 is converted to float32.
        k : int, default 5
        params : dict, optional
            Search parameters for this call, over the store's (``nprobe``,
            ``efSearch``, ``rerank``, ...; see docs/index.md).

        Returns
        -------
        scores : ndarray, shape (n, k), float32
        chunk_ids : ndarray, shape (n, k), int64
            -1 where fewer than k chunks exist or the probed IVF lists hold
            fewer (never looked up). Deleted chunks are never returned.

        Raises
        ------
        InvalidInputError
            ``k < 1``, wrong dimension, or non-finite values.
        """
        self._check()
        k = _check_k(k)
        dim = self._manifest["index"]["dim"]
        q = np.asarray(vectors)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != dim or not np.issubdtype(q.dtype, np.number):
            raise InvalidInputError(f"query vectors have shape {q.shape} and dtype {q.dtype}; expected (n, {dim}) floats")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if not np.isfinite(q).all():
            raise InvalidInputError("query vectors hold NaN or inf; every value must be finite")
        return self._index.search(q, k, check_params(params))

    def search(self, query: str | Sequence[str], k: int = 5, *,
               params: dict | None = None) -> list[Hit] | list[list[Hit]]:
        """Embed query text and return the k nearest chunks with continuations.

        Parameters
        ----------
        query : str or sequence of str
        k : int, default 5
        params : dict, optional
            Search parameters for this call (see :meth:`search_vectors`).

        Returns
        -------
        list of Hit (for one string) or list of list of Hit (for a sequence),
        nearest first; fewer than k when the store holds fewer chunks.

        Raises
        ------
        InvalidInputError
            ``k < 1``, a query that is not a str, or an empty (whitespace) query.
        EmbedderMismatchError
            The store's embedder is not available (see :attr:`embedder`).
        """
        self._check()
        k = _check_k(k)
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
        if not queries:
            return []
        if self._limit() == 0:
            return [] if single else [[] for _ in queries]
        params = check_params(params)
        vecs = self.embedder.embed(queries)
        scores, ids = self.search_vectors(vecs, k, params=params)
        hits = self._hits(scores, ids)
        return hits[0] if single else hits

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        limit = self._limit()
        flat = [int(i) for i in ids.ravel() if i >= 0]
        wanted = self._tombstones.drop(sorted(set(flat) | {i + 1 for i in flat if i + 1 < limit}))
        recs = dict(zip(wanted, self._table.get_chunks(wanted, limit)))
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

    def neighbors(self, token_ids: Any, k: int = 2, *, exclude_doc_ids: Any = None) -> "Neighbors":
        """RETRO neighbours with continuations for every chunk of token sequences.

        Each row of ``token_ids`` is cut into chunks of ``chunk_tokens``; each
        chunk is embedded (token ids fed directly when the chunk tokenizer is
        the embedder's, else decoded and re-tokenized by the embedder) and its k
        nearest committed chunks are returned with their continuations
        (Borgeaud et al. 2021, §2.2-2.4).

        Parameters
        ----------
        token_ids : array-like of int, shape (B, L) or (L,)
            Ids in the store's chunk-tokenizer space. L should be a multiple of
            ``chunk_tokens``; a ragged tail (L % chunk_tokens tokens) is queried
            as one shorter chunk, so C = ceil(L / chunk_tokens).
        k : int, default 2
            Neighbours per chunk (RETRO trains with k = 2).
        exclude_doc_ids : sequence of length B, optional
            Per row: a doc id, an iterable of doc ids, or None. Neighbours from
            those documents are skipped; extra candidates are fetched so that k
            neighbours are still returned when the store has them.

        Returns
        -------
        Neighbors
            ``tokens`` (B, C, k, 2 * chunk_tokens) int64, ``mask`` of the same
            shape (bool), ``chunk_ids`` / ``doc_ids`` (B, C, k) int64 (-1 where
            fewer than k exist), ``scores`` (B, C, k) float32.

        Raises
        ------
        InvalidInputError
            Bad shape, non-integer or out-of-vocabulary ids, ``k < 1``, or
            ``exclude_doc_ids`` of the wrong length.
        EmbedderMismatchError
            The store's embedder is not available.
        """
        self._check()
        from ._retro import neighbors

        return neighbors(self, token_ids, k, exclude_doc_ids=exclude_doc_ids)

    def precompute_neighbors(
        self,
        out: str | os.PathLike,
        *,
        k: int = 2,
        exclude_same_doc: bool = False,
        batch_size: int = 1024,
        queries: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> Path:
        """Write the k nearest chunk ids of every chunk (or of a token file) to ``.npy``.

        For every committed chunk, its stored vector is searched (no
        re-embedding) and its k nearest chunk ids are written, excluding chunks
        of its own document when ``exclude_same_doc`` (RETRO's training setup,
        Borgeaud et al. 2021, §2.4). Resumable: rows are written to
        ``OUT.partial`` with progress in ``OUT.progress.json``; running again
        with the same arguments continues where it stopped, and the finished
        file is renamed to ``OUT``.

        Parameters
        ----------
        out : path-like
            Destination ``.npy``: int64, shape (N, k) for the store's chunks, or
            (n, L / chunk_tokens, k) for ``queries``; -1 padded. Loads with
            ``np.load(out, mmap_mode="r")``.
        k : int, default 2
        exclude_same_doc : bool, default False
            Store chunks only.
        batch_size : int, default 1024
            Query chunks per search call.
        queries : path-like, optional
            ``.npy`` of int token ids shaped (n, L), L a multiple of ``chunk_tokens``.
        progress : bool, default True
            Show a tqdm progress bar.

        Returns
        -------
        Path
            ``out``.

        Raises
        ------
        InvalidInputError
            Bad ``k``, ``batch_size`` or query file.
        """
        self._check()
        from ._retro import precompute_neighbors

        return precompute_neighbors(self, out, k=k, exclude_same_doc=exclude_same_doc, batch_size=batch_size,
                                    queries=queries, progress=progress)

    def _all_doc_ids(self) -> np.ndarray:
        """Document id of every committed chunk, (N,) int64, cached per version."""
        key = (self.version, len(self))
        if getattr(self, "_doc_ids_cache", (None,))[0] != key:
            self._doc_ids_cache = (key, self._table.chunk_doc_ids(len(self), int(self._manifest["next_doc_id"])))
        return self._doc_ids_cache[1]

    def _doc_ids_of(self, chunk_ids: np.ndarray) -> np.ndarray:
        return self._all_doc_ids()[np.asarray(chunk_ids, dtype=np.int64)]

    def _stored_vectors(self, first: int, end: int) -> np.ndarray:
        """Vectors of chunks [first, end) as indexed, (end - first, dim) float32.

        Reconstructed from exact (Flat) segments, else read from the raw
        vectors files; zeros for purged chunks.

        Raises
        ------
        RetrostoreError
            Neither the index can reconstruct nor raw vectors are kept.
        """
        return stored_vectors(self, first, end)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k={k!r} must be an int >= 1 (the number of neighbours to return)")
    if k > 100_000:
        raise InvalidInputError(f"k={k} exceeds the limit of 100000 results per query; page with a smaller k")
    return int(k)


def _int_ids(ids: Any, what: str) -> list[int]:
    """``ids`` as a list of ints; refuses a str (it would iterate characters), non-iterables,
    and values that are not integers (0.5 is not id 0)."""
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
