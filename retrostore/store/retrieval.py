"""RETRO retrieval on the store's read path: the neighbours, with
continuations, of every chunk of token sequences, with per-row document
exclusion (``Store.neighbors``).

A RETRO model splits its input of L tokens into C = L / 64 chunks and, for each
chunk, attends to k neighbours of 2 x 64 tokens: the neighbour chunk followed
by its continuation, the next chunk of the same document (Borgeaud et al.
2021, §2.2-2.4). Training excludes neighbours from the query's own document.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..errors import InvalidInputError, RetrostoreError, check_bool, is_int, shown
from ..types import Neighbors
from ..index.params import check_params
from .reading import Reader, check_k, query_vectors

__all__ = ["neighbors", "search_excluding", "doc_id_set", "TAILS"]


def _as_token_array(token_ids: Any, vocab_size: int) -> np.ndarray:
    try:
        arr = np.asarray(token_ids)
    except ValueError as exc:  # ragged nested lists
        raise InvalidInputError(
            f"token_ids cannot form a (B, L) array ({exc}); every row must have the same length L"
        ) from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise InvalidInputError(
            f"token_ids has shape {arr.shape} and dtype {arr.dtype}; expected integer ids shaped (B, L) with L >= 1"
        )
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise InvalidInputError(
            f"token_ids hold ids in [{arr.min()}, {arr.max()}], outside the store's vocabulary [0, {vocab_size}); "
            "tokenize with the store's own tokenizer (Store.chunker)"
        )
    return arr.astype(np.int64, copy=False)


def _split_chunks(arr: np.ndarray, t: int) -> tuple[list[np.ndarray], int]:
    """Row-major list of the chunks of each row; the ragged tail is its own shorter chunk."""
    b, length = arr.shape
    c = -(-length // t)
    return [arr[i, j * t : (j + 1) * t] for i in range(b) for j in range(c)], c


def _doc_id(x: Any) -> int | None:
    """``x`` as a doc id when it is one integer: a Python or numpy int, or a 0-d integer array or
    tensor (what iterating a 1-D ``torch`` tensor of a batch's doc ids gives); else None."""
    if is_int(x):
        return int(x)
    if hasattr(x, "__array__") and not isinstance(x, (str, bytes)):
        try:
            a = np.asarray(x)
        except Exception:  # noqa: BLE001 (e.g. a tensor on a GPU: refused by the caller's message)
            return None
        if a.ndim == 0 and a.dtype.kind in "iu":
            return int(a)
    return None


def doc_id_set(name: str, ids: Any) -> set[int]:
    """An iterable of doc ids (ints >= 0: Python, numpy or 0-d integer tensors) checked, as a set;
    ``name`` names it in errors.

    Raises
    ------
    InvalidInputError
        ``ids`` is a string, not iterable, or holds a non-int or a negative int.
    """
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise InvalidInputError(f"{name} is {shown(ids)}; give an iterable of doc ids (ints >= 0)")
    try:
        ids = list(ids)
    except TypeError as exc:  # a 0-d array or tensor: iterable by type only (review: a raw TypeError)
        raise InvalidInputError(f"{name} is {shown(ids)}, which cannot be iterated ({exc}); give an iterable of "
                                "doc ids (ints >= 0), e.g. [int(x)] for one") from None
    as_ids = [_doc_id(x) for x in ids]
    bad = [x for x, d in zip(ids, as_ids) if d is None]
    if bad:
        raise InvalidInputError(f"{name} holds {shown(bad[0])}; doc ids are ints")
    out = set(as_ids)
    if any(x < 0 for x in out):  # no document has one (the server refuses them too)
        raise InvalidInputError(f"{name} holds {min(out)}; doc ids are ints >= 0")
    return out


def exclusion_sets(exclude_doc_ids: Any, batch: int) -> list[set[int]] | None:
    """``neighbors``' ``exclude_doc_ids`` checked, as one set of doc ids per row (None: no exclusions).
    Shared with the client (``retrostore.connect``), which refuses what ``Store`` refuses."""
    if exclude_doc_ids is None:
        return None
    rows = None
    if not isinstance(exclude_doc_ids, (str, bytes)) and hasattr(exclude_doc_ids, "__iter__"):
        try:
            rows = list(exclude_doc_ids)
        except TypeError:  # a 0-d array or tensor: iterable by type only
            pass
    if rows is None:
        raise InvalidInputError(
            f"exclude_doc_ids is {shown(exclude_doc_ids)}; give a sequence with one entry per row of token_ids "
            f"({batch} rows), e.g. [{shown(exclude_doc_ids)}] for one row")
    if len(rows) != batch:
        raise InvalidInputError(
            f"exclude_doc_ids has {len(rows)} rows for a batch of {batch}; give one entry per row "
            "(an int, an iterable of ints, or None)"
        )
    out = []
    for i, r in enumerate(rows):
        one = None if r is None else _doc_id(r)
        if r is None:
            out.append(set())
        elif one is None and (isinstance(r, (str, bytes)) or not hasattr(r, "__iter__")):
            raise InvalidInputError(
                f"exclude_doc_ids[{i}] is {r!r}; give a doc id (int), an iterable of doc ids, or None per row"
            )
        else:
            out.append(doc_id_set(f"exclude_doc_ids[{i}]", [one] if one is not None else r))
    return out


def _int64_ids(ids: set[int]) -> np.ndarray:
    """A set of doc ids as int64, leaving out those past int64 (no document has one; review: 2**63
    in exclude_doc_ids raised a raw OverflowError from np.fromiter)."""
    top = np.iinfo(np.int64).max
    return np.fromiter((x for x in ids if x <= top), np.int64)


#: Candidates (rows x fetched) per index call while :func:`search_excluding` widens its search: ~80 MB
#: of scores, ids and doc ids (a row whose nearest region is one excluded document fetches up to
#: every chunk of the store).
EXCLUDE_FETCH_ENTRIES = 1 << 22


def search_excluding(reader: Reader, vectors: np.ndarray, k: int, excluded: list[set[int]] | None,
                     doc_of: Callable[[np.ndarray], np.ndarray], *,
                     params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k nearest chunks per row whose document is not in that row's excluded set.

    Fetches ``k + extra`` candidates; rows that lack k admissible neighbours
    among them (their nearest region is an excluded document: a book's own
    chunks) are searched once more with the excluded documents' chunks left
    out inside the index (FAISS's ID selector, :func:`_search_outside`; an
    exact or IVF index), or, on a graph or flat fast-scan index of at most
    :data:`EXACT_OUTSIDE_MAX` chunks, rows excluding large documents by an
    exact scan of the stored vectors (:func:`_exact_outside`), so that their
    cost does not grow with the excluded documents' size. Elsewhere (a
    larger graph, an L2 store, rows excluding many or small documents)
    ``extra`` doubles for those rows up to every chunk of the store (past
    ``MAX_K``, the limit of one caller's ``k``: helper-42 excluded a document
    of 144,360 chunks), :data:`EXCLUDE_FETCH_ENTRIES` candidates per index call.

    Parameters
    ----------
    vectors : ndarray, shape (n, dim), float32
    excluded : list of set of int, length n, or None
    doc_of : callable
        Maps an int64 array of chunk ids (all >= 0) to their doc ids.
    params : dict, optional
        Search parameters over the store's, as ``Store.search_vectors`` (the server's per-request
        ``nprobe``...); an exact scan (:func:`_exact_outside`) has none to take.

    Returns
    -------
    scores : ndarray, shape (n, k), float32
    chunk_ids : ndarray, shape (n, k), int64 (-1 padded)
    """
    n = len(vectors)
    total = reader.limit
    if excluded is None or not any(excluded):
        return reader.search_vectors(vectors, k, params) if n else (np.zeros((0, k), np.float32),
                                                                    np.zeros((0, k), np.int64))
    params = check_params(params)
    queries = query_vectors(vectors, reader.version.manifest["index"]["dim"], check_k(k))
    fill = -np.inf if reader.version.manifest["metric"] == "ip" else np.inf
    out_s = np.full((n, k), fill, np.float32)
    out_i = np.full((n, k), -1, np.int64)
    todo = np.arange(n)
    fetch = min(total, k + max(8, k))
    first = True
    while len(todo):
        still = []
        step = max(1, EXCLUDE_FETCH_ENTRIES // fetch)
        for lo in range(0, len(todo), step):
            rows = todo[lo : lo + step]
            s, ids = reader.candidates(queries[rows], fetch, params)
            valid = ids >= 0
            docs = np.full(ids.shape, -1, np.int64)
            docs[valid] = doc_of(ids[valid])
            for row, q in enumerate(rows):
                ok = valid[row]
                if excluded[q]:
                    ok = ok & ~np.isin(docs[row], _int64_ids(excluded[q]))
                keep = np.flatnonzero(ok)[:k]
                if len(keep) < k and fetch < total:
                    still.append(q)
                    continue
                out_s[q, : len(keep)] = s[row, keep]
                out_i[q, : len(keep)] = ids[row, keep]
        todo = np.array(still, dtype=np.int64)
        if first and len(todo):
            if reader.can_leave_out():
                todo = _search_outside(reader, queries, k, excluded, todo, out_s, out_i, params)
            else:
                todo = _exact_outside(reader, queries, k, excluded, todo, out_s, out_i)
        first = False
        fetch = min(total, fetch * 2)
    return out_s, out_i


#: Largest store whose rows :func:`search_excluding` could not settle from their first candidates may
#: be answered by an exact scan of the stored vectors where the index cannot leave documents out (a
#: graph, the default below 100,000 chunks; a flat fast-scan index). Widening a graph's candidates costs
#: a row about its excluded documents' size: 1.4-3.4 ms per row for documents of 150-1,063 chunks in
#: the 51,429-chunk pydocs store (HNSW32,SQfp16), 30 ms for a 4,512-chunk one in a 7,570-chunk store;
#: a scan reads every stored vector once (~1.7 us each: 86 ms for pydocs) and multiplies them with
#: each row. So rows whose excluded documents hold at least 1/:data:`EXACT_OUTSIDE_SHARE` of the store
#: are scanned, when together they exclude at least the store's size (the widening a scan saves pays
#: for its read); the others widen.
EXACT_OUTSIDE_MAX = 1 << 18
EXACT_OUTSIDE_SHARE = 64
#: Stored vectors (chunks) and query rows per block of :func:`_exact_outside` (a 64 MiB score block).
_EXACT_CHUNKS, _EXACT_ROWS = 16_384, 1_024


def _exact_outside(reader: Reader, queries: np.ndarray, k: int, excluded: list[set[int]], todo: np.ndarray,
                   out_s: np.ndarray, out_i: np.ndarray) -> np.ndarray:
    """Rows of ``todo`` whose excluded documents are large (:data:`EXACT_OUTSIDE_SHARE`) answered by
    an exact inner-product scan of the stored vectors, those documents' chunks and deleted chunks
    left out, written to ``out_s``/``out_i``. Returns the rows left to widen: all of them where a
    scan does not apply or would cost more (an L2 store: the matrix product's L2 loses precision on
    vectors of large norm; more than :data:`EXACT_OUTSIDE_MAX` chunks; chunks not in document order;
    no stored vectors to read)."""
    version = reader.version
    n = reader.limit
    if version.manifest["metric"] != "ip" or n > EXACT_OUTSIDE_MAX or not reader.documents_in_order():
        return todo
    ranges: dict[frozenset, list[tuple[int, int]]] = {}
    rows_ranges = []
    for q in todo.tolist():
        key = frozenset(excluded[q])
        if key not in ranges:
            ranges[key] = reader.doc_ranges(_int64_ids(key))
        rows_ranges.append(ranges[key])
    size = np.array([sum(b - a for a, b in rr) for rr in rows_ranges], dtype=np.int64)
    big = size * EXACT_OUTSIDE_SHARE >= n
    if size[big].sum() < n:
        return todo
    left, todo = todo[~big], todo[big]
    rows_ranges = [rr for rr, b in zip(rows_ranges, big) if b]
    reader.follow_purges()
    best_s = np.full((len(todo), k), -np.inf, np.float32)
    best_i = np.full((len(todo), k), -1, np.int64)
    for lo in range(0, n, _EXACT_CHUNKS):
        hi = min(n, lo + _EXACT_CHUNKS)
        try:
            x = version.stored_vectors(lo, hi)
        except RetrostoreError:  # no raw vectors kept: widened instead
            return np.sort(np.concatenate([left, todo]))
        dead = version.tombstones.chunk_mask(np.arange(lo, hi))
        kk = min(k, hi - lo)
        for r0 in range(0, len(todo), _EXACT_ROWS):
            r1 = min(len(todo), r0 + _EXACT_ROWS)
            scores = queries[todo[r0:r1]] @ x.T
            scores[:, dead] = -np.inf
            for j in range(r0, r1):
                for a, b in rows_ranges[j]:
                    if a < hi and b > lo:
                        scores[j - r0, max(a, lo) - lo : min(b, hi) - lo] = -np.inf
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < hi - lo else \
                np.broadcast_to(np.arange(hi - lo), (r1 - r0, hi - lo))
            cand_s = np.concatenate([best_s[r0:r1], np.take_along_axis(scores, top, 1)], axis=1)
            cand_i = np.concatenate([best_i[r0:r1], top + lo], axis=1)
            order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
            best_s[r0:r1] = np.take_along_axis(cand_s, order, 1)
            best_i[r0:r1] = np.take_along_axis(cand_i, order, 1)
    best_i[~np.isfinite(best_s)] = -1
    out_s[todo], out_i[todo] = best_s, best_i
    return left


#: Most chunk-id ranges (excluded documents) one selector search leaves out: FAISS checks a chain
#: of ranges per candidate; rows excluding more documents widen their search instead.
MAX_LEFT_OUT_RANGES = 64


def _search_outside(reader: Reader, queries: np.ndarray, k: int, excluded: list[set[int]], todo: np.ndarray,
                    out_s: np.ndarray, out_i: np.ndarray, params: dict | None = None) -> np.ndarray:
    """Rows ``todo`` searched with their excluded documents' chunks left out inside the index (rows
    excluding the same documents together); their k results are written to ``out_s``/``out_i``.

    An IVF index finds only what its probed lists hold: where the excluded document fills them (a
    book's own chunks around each of its chunks), rows come back short (-1) and are searched
    again with ``nprobe`` doubled, up to every list, until ``k + max(8, k)`` come back (the first
    search's width: the first lists to hold k can be far from the query); widening the candidates
    (what rows excluding more than :data:`MAX_LEFT_OUT_RANGES` documents do) never looks past the
    probed lists (a
    4,512-chunk document in a 7,570-chunk ``IVF64`` store at ``nprobe`` 16: 4,452 of its slots
    empty). An exact index's -1 means there are no more. Not for graphs (HNSW): FAISS's filtered
    graph search keeps walking the left-out chunks near the query, and on that document found the
    true nearest admissible chunks for 4% of them at ``efSearch`` 128, 32% at 4,096 (recall@2).

    Returns the rows left to widen: those excluding more than :data:`MAX_LEFT_OUT_RANGES` documents.
    """
    groups: dict[frozenset, list[int]] = {}
    for q in todo.tolist():
        groups.setdefault(frozenset(excluded[q]), []).append(q)
    eff = reader.version.index.effective(params)
    probes0, nlist = int(eff.get("nprobe", 0)), int(eff.get("nlist", 0))
    left: list[int] = []
    # IVF: probe until the first search's width of admissible chunks is found, not just k. The first
    # lists holding k of them can be far from the query (the excluded document fills the near ones):
    # stopping at k gave recall@2 of 0.05 for the 4,512-chunk document's own chunks (IVF64,PQ48x4fs,
    # nprobe 16; 0.96 with the width), recall@1 0.27 against 1.00 on test_exclusion's store.
    want = max(k, min(reader.limit, k + max(8, k))) if nlist else k
    step = max(1, EXCLUDE_FETCH_ENTRIES // want)
    for docs, members in groups.items():
        ranges = reader.doc_ranges(_int64_ids(docs))
        if len(ranges) > MAX_LEFT_OUT_RANGES:
            left += members
            continue
        rows = np.array(members, dtype=np.int64)
        for lo in range(0, len(rows), step):
            part, probes = rows[lo : lo + step], probes0
            while len(part):
                wider = {**(params or {}), "nprobe": probes, "max_codes": 0} if probes != probes0 else params
                s, ids = reader.candidates(queries[part], want, wider, outside=ranges or None)
                done = ~(ids < 0).any(1) if probes < nlist else np.ones(len(part), bool)
                out_s[part[done]], out_i[part[done]] = s[done, :k], ids[done, :k]
                part = part[~done]
                probes = min(2 * probes, nlist)
    return np.array(sorted(left), dtype=np.int64)


#: What ``neighbors`` does with the last L % chunk_tokens tokens of a row (see ``Store.neighbors``).
TAILS = ("query", "drop", "pad")


def check_label_tail(label_token: Any, tail: Any) -> bool:
    """``neighbors``' ``label_token`` (a bool) and ``tail`` (one of :data:`TAILS`) checked (shared with the client)."""
    label_token = check_bool("label_token", label_token)  # (numpy's bools as numpy's ints elsewhere)
    if not isinstance(tail, str) or tail not in TAILS:
        raise InvalidInputError(f"tail={shown(tail)} must be one of {', '.join(map(repr, TAILS))}: query the last "
                                "ragged chunk, drop it, or give it an empty (padded) slot")
    return label_token


def neighbors(reader: Reader, query_vectors: Callable[[list[np.ndarray]], np.ndarray], token_ids: Any,
              k: Any = 2, *, exclude_doc_ids: Any = None, label_token: bool = False, tail: str = "query") -> Neighbors:
    """See :meth:`retrostore.Store.neighbors`; ``query_vectors`` embeds a list of token-id chunks."""
    k = check_k(k)
    label_token = check_label_tail(label_token, tail)
    m = reader.version.manifest
    t = m["chunk_tokens"]
    arr = _as_token_array(token_ids, int(m["tokenizer"]["vocab_size"]))
    if label_token:
        if arr.shape[1] < 2:
            raise InvalidInputError(f"rows of {arr.shape[1]} token with label_token=True hold no input token; "
                                    "a training row is L + 1 tokens (inputs, then the last label)")
        arr = arr[:, :-1]
    b, length = arr.shape
    full = length // t
    padded_tail = tail == "pad" and length % t
    if tail != "query":
        arr = arr[:, : full * t]
    excluded = exclusion_sets(exclude_doc_ids, b)
    chunks, c = _split_chunks(arr, t)
    if reader.limit == 0 or not chunks:
        vec_s = np.full((b * c, k), -np.inf if m["metric"] == "ip" else np.inf, np.float32)
        vec_i = np.full((b * c, k), -1, np.int64)
    else:
        vecs = query_vectors(chunks)
        per_chunk_excl = None if excluded is None else [excluded[i] for i in range(b) for _ in range(c)]
        vec_s, vec_i = search_excluding(reader, vecs, k, per_chunk_excl, reader.doc_ids_of)
    ids, scores = vec_i.reshape(b, c, k), vec_s.reshape(b, c, k)
    if padded_tail:  # an empty slot for the ragged tail: no neighbours
        ids = np.concatenate([ids, np.full((b, 1, k), -1, np.int64)], axis=1)
        scores = np.concatenate([scores, np.full((b, 1, k), -np.inf if m["metric"] == "ip" else np.inf,
                                                 np.float32)], axis=1)
    tokens, mask, ids, doc_ids = reader.neighbor_tokens(ids)
    return Neighbors(tokens, mask, ids, doc_ids, scores)
