"""Reading the version a handle serves: chunks, documents and metadata by id,
vector search, and search hits with their continuations.

:class:`Reader` does the work of ``Store.get_chunks``, ``get_document``,
``get_metadata``, ``search_vectors`` and the lookups of ``search`` and
``neighbors``; the ``Store`` methods check the handle and delegate here.
"""

from __future__ import annotations

import os
import re
import unicodedata
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import CorruptStoreError, InvalidInputError, is_int, shown
from ..index.params import check_params
from ..storage import manifest as _manifest
from ..storage.chunktable import ChunkTable, MissingRecordError
from ..storage.tombstones import Tombstones
from ..storage.layout import DATA_MDB, MANIFEST
from ..storage.records import ChunkRecord
from ..types import Chunk, Document, Hit
from .version import Head, Version

__all__ = ["Reader", "check_k", "check_queries", "int_ids", "query_text_problem"]

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

    def __init__(self, table: ChunkTable, head: Head, *, follow_purges: bool = True):
        self.table = table
        self._head = head
        self._doc_ids: tuple[tuple[int, int], np.ndarray] | None = None
        self._in_order: tuple[tuple[int, int], np.ndarray | None] | None = None
        self._follow = follow_purges
        self._manifest_path = os.fspath(head.root / MANIFEST)  # a str: no pathlib work per search
        self._seen = _manifest.manifest_stamp(self._manifest_path)

    @property
    def version(self) -> Version:
        """The version served now."""
        return self._head.version

    @property
    def limit(self) -> int:
        """Committed chunk ids: ``[0, limit)``."""
        return self.version.n_chunks

    def retrying(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, once more after learning of a purge when a committed record is missing.

        A reader of an older version can ask for records that ``compact`` has
        purged since (a take-down): the newest tombstones then name them, the
        version served adopts them (those chunks and documents are deleted for
        this handle too, :meth:`follow_purges`) and ``fn`` runs again. A record
        missing for any other reason is damage: the ``CorruptStoreError`` stands.
        """
        try:
            return fn()
        except MissingRecordError as exc:
            purged = self.follow_purges(force=True)
            ids = np.asarray(exc.ids, np.int64)
            if purged is None or not (purged.chunk_mask(ids) if exc.table == "chunks" else purged.doc_mask(ids)).all():
                raise
        return fn()

    def follow_purges(self, force: bool = False) -> Tombstones | None:
        """Adopt the documents ``compact`` purged since this version as deleted; the purged ones.

        Take-downs win over time travel: a reader of an older version (opened
        before a compaction, or pinned) keeps working, but never serves purged
        data. A purge changes ``manifest.json``, so one ``stat`` per search tells
        whether to read the newest manifest's tombstones (``force``: read them).
        """
        if not self._follow and not force:
            return None
        seen = _manifest.manifest_stamp(self._manifest_path)
        if seen == self._seen and not force:
            return None
        if self.table.replaced():  # another store's purges are not this one's (helper-33)
            return None
        try:
            newest = Tombstones.load(self.version.root, _manifest.read_manifest(self.version.root))
        except CorruptStoreError:
            return None
        self._seen = seen
        purged = newest.rows[newest.rows[:, 3] > 0]
        tomb = self.version.tombstones
        new = purged[~np.isin(purged[:, 0], tomb.rows[tomb.rows[:, 3] > 0, 0])]
        if len(new):
            rows = np.concatenate([tomb.rows[~np.isin(tomb.docs, new[:, 0])], new])
            merged = Tombstones(rows[np.argsort(rows[:, 0], kind="stable")])
            self.version.tombstones = merged
            self.version.index.deleted = merged.chunks
        return Tombstones(purged)

    # -- by id ---------------------------------------------------------------
    def get_chunks(self, chunk_ids: Iterable[int]) -> list[Chunk]:
        """See :meth:`retrostore.Store.get_chunks`."""
        ids = int_ids(chunk_ids, "chunk")
        limit = self.limit
        for i in ids:
            if not 0 <= i < limit:
                raise InvalidInputError(f"chunk id {shown(i)} is outside the committed range [0, {limit})")
        self.version.tombstones.check_chunks(ids)
        return [Chunk(r.chunk_id, r.doc_id, r.position, r.start, r.text, r.token_ids)
                for r in self.table.get_chunks(ids, limit)]

    def get_document(self, doc_id: int) -> Document:
        """See :meth:`retrostore.Store.get_document`."""
        limit = self.version.n_docs
        if not is_int(doc_id) or not 0 <= int(doc_id) < limit:
            raise InvalidInputError(f"document id {shown(doc_id)} is outside the committed range [0, {limit})")
        self.version.tombstones.check_docs([doc_id])
        rec = self.table.get_doc(int(doc_id))
        if rec is None:
            raise MissingRecordError(f"{DATA_MDB}: committed document {doc_id} is missing", "docs", [int(doc_id)])
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
                raise InvalidInputError(f"document id {shown(d)} is outside the committed range [0, {limit})")
            self.version.tombstones.check_docs([d])
            rec = self.table.get_doc(int(d))
            if rec is None:
                raise MissingRecordError(f"{DATA_MDB}: committed document {d} is missing", "docs", [int(d)])
            out.append(rec.metadata)
        return out

    def records_with_continuations(self, ids: Iterable[int]) -> dict[int, ChunkRecord]:
        """Chunk records of the ids >= 0 in ``ids`` (Python ints) and of the chunk after each
        (its continuation candidate), deleted chunks left out: ``{chunk id: record}``."""
        limit = self.limit
        flat = {i for i in ids if i >= 0}
        wanted = self.version.tombstones.drop(sorted(flat | {i + 1 for i in flat if i + 1 < limit}))
        return dict(zip(wanted, self.table.get_chunks(wanted, limit)))

    def neighbor_tokens(self, chunk_ids: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Tokens of chunks given by id, each followed by its continuation; see ``Store.neighbor_tokens``.

        Returns
        -------
        tokens : ndarray, shape ``chunk_ids.shape + (2 * T,)``, int64
        mask : ndarray, same shape, bool
        chunk_ids : ndarray, ``chunk_ids.shape``, int64 (-1 for none or deleted)
        doc_ids : ndarray, ``chunk_ids.shape``, int64 (-1 with chunk_ids)
        """
        m = self.version.manifest
        t, pad = int(m["chunk_tokens"]), int(m["tokenizer"]["pad_id"])
        ids = neighbor_id_array(chunk_ids, self.limit, t)
        flat = ids.reshape(-1).tolist()
        recs = self.records_with_continuations(flat)
        n = len(flat)
        out = np.full((n, 2 * t), pad, np.int64)
        lens = np.zeros((n, 2), np.int64)
        found, docs = [-1] * n, [-1] * n
        # One Python step per id: a generation-time fetch of k ids costs ~4x less than with
        # the array bookkeeping of a vectorised version, a batch of 2,048 ids about the same.
        for j, i in enumerate(flat):
            r = recs.get(i)
            if r is None:
                continue
            toks = r.token_ids
            out[j, : len(toks)], found[j], docs[j] = toks, i, r.doc_id
            lens[j, 0] = len(toks)
            nxt = recs.get(i + 1)
            if nxt is not None and nxt.doc_id == r.doc_id:
                toks = nxt.token_ids
                out[j, t : t + len(toks)] = toks
                lens[j, 1] = len(toks)
        cols = np.arange(t)
        mask = np.concatenate([cols < lens[:, :1], cols < lens[:, 1:]], axis=1)
        shape = ids.shape
        return (out.reshape(shape + (2 * t,)), mask.reshape(shape + (2 * t,)),
                np.array(found, np.int64).reshape(shape), np.array(docs, np.int64).reshape(shape))

    # -- search --------------------------------------------------------------
    def search_vectors(self, vectors: Any, k: Any, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`retrostore.Store.search_vectors`."""
        k = check_k(k)
        q = query_vectors(vectors, self.version.manifest["index"]["dim"], k)
        return self.candidates(q, k, check_params(params))

    def candidates(self, queries: np.ndarray, fetch: int, params: dict | None = None, *,
                   outside: list[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``fetch`` nearest chunk ids of checked queries ((n, dim) C-contiguous float32) and
        parameters, with no :data:`MAX_K` limit on ``fetch`` (:meth:`search_vectors` checks its
        ``k``; :func:`~retrostore.store.retrieval.search_excluding` widens up to the whole store);
        none in the chunk-id ranges ``outside`` (``[lo, hi)``; only where :meth:`can_leave_out`)."""
        self.follow_purges()
        return self.version.index.search(queries, int(fetch), params, outside=outside)

    def can_leave_out(self) -> bool:
        """Whether :meth:`candidates` can leave chunk-id ranges out inside the index search (an
        exact or IVF index, not a graph), and :meth:`doc_ranges` holds (every document's chunks
        consecutive, documents in id order)."""
        return self.version.index.selectable and self.documents_in_order()

    def documents_in_order(self) -> bool:
        """Whether every document's chunks have consecutive ids, documents in id order (what
        :meth:`doc_ranges` assumes), leaving out the chunks of documents ``compact`` purged."""
        return self._ordered_doc_ids() is not None

    def _ordered_doc_ids(self) -> np.ndarray | None:
        """:meth:`all_doc_ids` with each purged chunk (-1: its document's record is gone) given the
        document id before it, so that they stay sorted (a purged chunk is tombstoned and never
        returned, so leaving it out with that document changes nothing); None when the documents
        are not in order. A purge in the middle of the store made every search take the widening
        path (on IVF: empty slots). Cached per version, as the doc ids."""
        docs = self.all_doc_ids()
        key = self._doc_ids[0]
        if self._in_order is None or self._in_order[0] != key:
            live = docs[docs >= 0]
            ok = len(live) < 2 or bool((live[1:] >= live[:-1]).all())
            self._in_order = (key, (np.maximum.accumulate(docs) if len(docs) else docs) if ok else None)
        return self._in_order[1]

    def doc_ranges(self, doc_ids: np.ndarray) -> list[tuple[int, int]]:
        """The committed chunk ids ``[lo, hi)`` of ``doc_ids`` (int64) that have chunks (a document's
        chunks have consecutive ids: :meth:`can_leave_out`), in id order, the ranges of documents
        next to each other as one (a row excluding every document but one is 2 ranges, not one per
        document: past retrieval.MAX_LEFT_OUT_RANGES an IVF row widened and left its slots empty)."""
        docs = self._ordered_doc_ids()
        docs = self.all_doc_ids() if docs is None else docs  # (callers check documents_in_order first)
        want = np.unique(np.asarray(doc_ids, dtype=np.int64))
        lo = np.searchsorted(docs, want, "left")
        hi = np.searchsorted(docs, want, "right")
        lo, hi = lo[hi > lo], hi[hi > lo]  # (sorted: docs in id order, want sorted)
        if not len(lo):
            return []
        start = np.flatnonzero(np.r_[True, lo[1:] != hi[:-1]])
        end = np.r_[start[1:], len(lo)] - 1
        return [(int(a), int(b)) for a, b in zip(lo[start], hi[end])]

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        """Search results as :class:`Hit` rows: each chunk with its score and continuation
        (the next chunk of the same document), ids < 0 left out."""
        recs = self.records_with_continuations(np.asarray(ids).ravel().tolist())
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


def check_output_size(what: str, nbytes: int, fix: str) -> None:
    """Refuse a call whose result alone would need more than half of this machine's RAM.

    Raises
    ------
    InvalidInputError
        Naming the bytes needed, the RAM and ``fix`` (numpy would otherwise
        fail with a bare ``MemoryError`` after seconds of work, or the OS kill
        the process).
    """
    if nbytes < 1 << 30:  # every ordinary call: no system call on the generation-time path
        return
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no limit known
        return
    if nbytes > ram // 2:
        raise InvalidInputError(f"{what} would need {nbytes / 2**30:.1f} GiB, more than half of this machine's "
                                f"{ram / 2**30:.1f} GiB of RAM; {fix}")


def _id_bounds(ids: np.ndarray) -> tuple[int, int]:
    """(smallest, largest) value of an integer array; (0, -1) when it is empty.

    A few ids (a generation-time fetch: k of them) are compared in Python: two numpy
    reductions cost ~15 us each on caches the model's forward pass left cold.
    """
    if not ids.size:
        return 0, -1
    if ids.size <= 64:
        flat = ids.ravel().tolist()
        return min(flat), max(flat)
    return int(ids.min()), int(ids.max())


def neighbor_id_array(chunk_ids: Any, limit: int, chunk_tokens: int) -> np.ndarray:
    """``chunk_ids`` checked as neighbour ids (:func:`id_array`) whose tokens, ``(..., k, 2 *
    chunk_tokens)`` int64 + mask, fit in memory (:func:`check_output_size`). The one check of
    ``Store.neighbor_tokens`` and of ``retro.neighbor_tokens`` reading from a chunk table."""
    ids = id_array(chunk_ids, limit)
    check_output_size(f"neighbour tokens of {ids.size:,} ids", ids.size * 2 * chunk_tokens * 9,
                      "ask for fewer ids per call (rows in batches)")
    return ids


def id_array(chunk_ids: Any, limit: int) -> np.ndarray:
    """``chunk_ids`` as an int64 array of shape (..., k), k >= 1; -1 allowed.

    Raises
    ------
    InvalidInputError
        Not integers, no trailing k axis, or an id below -1 or not committed.
    """
    try:
        arr = np.asarray(chunk_ids)
    except ValueError as exc:
        raise InvalidInputError(f"chunk_ids cannot form an array ({exc}); give a rectangular (..., k) array") from None
    if arr.ndim < 1 or arr.shape[-1] < 1 or not (arr.dtype.kind in "iu" or arr.size == 0):
        raise InvalidInputError(
            f"chunk_ids has shape {arr.shape} and dtype {arr.dtype}; expected integer chunk ids shaped (..., k), "
            "k >= 1, -1 for no neighbour (what precompute_neighbors writes)")
    lo, hi = _id_bounds(arr)
    if lo < -1 or hi >= limit:
        bad = lo if lo < -1 else hi
        raise InvalidInputError(
            f"chunk id {bad} is outside [-1, {limit}): the store's committed chunks are 0..{limit - 1} (-1 means "
            "none); were the ids computed on another store or a later version?")
    return arr.astype(np.int64, copy=False)


def check_queries(query: Any) -> tuple[list[str], bool]:
    """``search``'s query as a list of strings, and whether one ``str`` was given.

    Raises
    ------
    InvalidInputError
        Not a str or a sequence of str, or an empty (whitespace) query.
    """
    single = isinstance(query, str)
    if not single and (isinstance(query, (bytes, bytearray)) or not isinstance(query, Iterable)
                       or (isinstance(query, np.ndarray) and query.ndim != 1)):  # a 0-d array cannot be iterated
        shape = f" of shape {query.shape}" if isinstance(query, np.ndarray) else ""
        raise InvalidInputError(f"query must be a str or a sequence of str, not {type(query).__name__}{shape}")
    queries = [query] if single else list(query)
    for i, q in enumerate(queries):
        where = "query" if single else f"query {i}"
        if not isinstance(q, str):
            raise InvalidInputError(f"{where} is a {type(q).__name__}, not a str")
        problem = query_text_problem(q)
        if problem:
            raise InvalidInputError(f"{where} {problem}")
    return queries, single


_SURROGATE = re.compile("[\ud800-\udfff]")
#: Unicode categories with nothing to embed: control, format (zero-width), and space characters.
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def query_text_problem(text: str) -> str | None:
    """What makes ``text`` unusable as a query, as the end of a sentence; None when it is fine.

    A query must be valid Unicode (no lone UTF-16 surrogate, which no tokenizer
    can encode) and hold at least one visible character: a query of whitespace,
    control or zero-width characters only embeds to a vector that matches
    arbitrary chunks.

    Parameters
    ----------
    text : str

    Returns
    -------
    str or None
    """
    bad = _SURROGATE.search(text)
    if bad:
        return (f"holds a lone UTF-16 surrogate U+{ord(bad.group()):04X} at character {bad.start()}, which is not "
                "text: send valid Unicode (a surrogate pair encodes one character)")
    if not text.strip() or all(unicodedata.category(c) in _INVISIBLE for c in text):
        return (f"is empty or whitespace ({text[:40]!r}: no visible character); its embedding would match "
                "arbitrary chunks: give the text to look up")
    return None


def query_vectors(vectors: Any, dim: int, k: int) -> np.ndarray:
    """``search_vectors``' query vectors checked, as a C-contiguous (n, dim) float32 array (shared with
    the client, ``retrostore.connect``, which refuses what ``Store`` refuses).

    Raises
    ------
    InvalidInputError
        Ragged rows, a shape other than (n, dim) / (dim,), a dtype other than real
        numbers (bool and complex refused), NaN or inf, values beyond float32's
        range, or an answer of n x k results over the output limit.
    """
    try:
        q = np.asarray(vectors)
    except ValueError as exc:  # ragged nested lists
        raise InvalidInputError(f"query vectors cannot form an array ({exc}); give an (n, {dim}) array of "
                                "floats, every row of the same length") from None
    given = q.shape
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim or q.dtype.kind not in "fiu":  # real numbers (not bool, complex)
        raise InvalidInputError(f"query vectors have shape {given} and dtype {q.dtype}; expected (n, {dim}) "
                                f"(or ({dim},) for one) real numbers (floats)")
    check_output_size(f"{len(q):,} queries x k = {k:,} results", len(q) * k * 12,
                      "search fewer queries per call or ask for a smaller k")
    src = q
    if q.dtype == np.float32:  # an embedder's output: no errstate context on the generation-time path
        q = np.ascontiguousarray(q)
    else:
        with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: said below
            q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        if src.dtype != np.float32 and np.isfinite(src).all():
            raise InvalidInputError("query vectors hold values beyond float32's range (+-3.4e38); the index "
                                    "searches float32: scale them (embeddings are usually unit length)")
        raise InvalidInputError("query vectors hold NaN or inf; every value must be finite")
    return q


def check_k(k: Any) -> int:
    """``k`` as an int in [1, :data:`MAX_K`].

    Raises
    ------
    InvalidInputError
        Not an int (bools refused), below 1 or above the limit.
    """
    if not is_int(k) or k < 1:
        raise InvalidInputError(f"k={shown(k)} must be an int >= 1 (the number of neighbours to return)")
    if k > MAX_K:
        raise InvalidInputError(f"k={shown(k)} exceeds the limit of {MAX_K} results per query; page with a smaller k")
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
        if not is_int(i):
            if isinstance(i, (float, np.floating)) and float(i).is_integer():
                i = int(i)
            else:
                raise InvalidInputError(f"{what} id {shown(i)} is not an integer")
        out.append(int(i))
    return out
