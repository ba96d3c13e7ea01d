"""Leakage controls: exact-duplicate chunks and RETRO's n-gram overlap filter.

RETRO's training retrieves from a database that holds the training data, so
a query chunk's nearest neighbour can be the chunk itself, or a verbatim copy
of it in another document (the same page crawled twice, a build run twice).
Its continuation then *is* the text the model must predict: the answer leaks
into the retrieval input. Excluding the query's own document (Borgeaud et al.
2021, §2.4) does not catch copies in other documents. Two checks here do:

* **exact duplicates** -- a neighbour whose token ids equal the query
  chunk's is always dropped (this also covers chunks shorter than n tokens);
* **n-gram overlap** -- a neighbour containing at least ``threshold`` of the
  query chunk's token n-grams (n = 13) is dropped. RETRO measures leakage
  between evaluation and training data with 13-gram Jaccard similarity
  (deduplication at >= 0.8) and, per chunk, as the share of the query chunk
  found verbatim in its neighbours (§2.6). The measure here is that
  query-relative share counted in 13-grams: the query's distinct n-grams
  found in the neighbour over its n-gram positions. It is not symmetric on purpose: a neighbour
  that holds the whole query plus other text still leaks it, where Jaccard
  would dilute it.

Both compare a neighbour with its own query chunk only. A training window
also holds the text after that chunk, which the model predicts next; a copy
of *that* text (the same page stored twice, its chunks shifted by a few
tokens) passes both checks, and the neighbour plus its continuation hands
the window its own future (helper-28 found 69 of 568 slots doing so after
``build --append``). A third check covers it:

* **window overlap** -- a candidate whose neighbour + continuation tokens
  hold at least ``threshold`` of the n-grams of the slot's own chunk or of
  any later chunk of the window (the label token included), or that many
  chunks' worth of n-grams from the slot's chunk on in all, is dropped
  (:func:`future_overlap`). Retrieval for chunk u serves the prediction of
  the tokens after it (chunked cross-attention, §2.4), so only text from u
  on is protected; earlier chunks are context the model has already seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError, check_int

__all__ = ["ngram_hashes", "ngram_overlap", "overlap_matrix", "future_overlap", "duplicate_chunks", "FilterStats",
           "filter_neighbors",
           "DEFAULT_NGRAM", "DEFAULT_OVERLAP_THRESHOLD"]

#: RETRO's n-gram length for leakage (Borgeaud et al. 2021: 13-gram Jaccard similarity).
DEFAULT_NGRAM = 13
#: Share of the query chunk's 13-grams a neighbour may hold before it is dropped.
DEFAULT_OVERLAP_THRESHOLD = 0.5

_P = np.uint64(0x100000001B3)  # FNV-64 prime: mixes token ids into a 64-bit polynomial hash


def ngram_hashes(tokens: np.ndarray, lengths: np.ndarray, n: int = DEFAULT_NGRAM) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every token n-gram of padded chunks.

    Parameters
    ----------
    tokens : ndarray, shape (..., T), integer
    lengths : ndarray, shape (...,), integer
        Real tokens per row; positions beyond are ignored.
    n : int, default 13

    Returns
    -------
    hashes : ndarray, shape (..., max(T - n + 1, 1)), uint64
    valid : ndarray, same shape, bool
        The n-gram lies within the row's length. A row shorter than ``n``
        has none.
    """
    t = tokens.shape[-1]
    g = max(t - n + 1, 1)
    if t < n:
        return np.zeros(tokens.shape[:-1] + (g,), np.uint64), np.zeros(tokens.shape[:-1] + (g,), bool)
    tok = tokens.astype(np.uint64)
    # n + sum_j tok[i + j] * P^(n-1-j) (mod 2^64), one shifted slice at a time: 3x faster than
    # multiplying a (..., G, n) sliding window view.
    h = np.full(tokens.shape[:-1] + (g,), n, np.uint64)
    power = np.uint64(1)
    with np.errstate(over="ignore"):
        for j in range(n - 1, -1, -1):
            h += tok[..., j : j + g] * power
            power = power * _P
    valid = np.arange(g) + n <= np.asarray(lengths)[..., None]
    return h, valid


def overlap_matrix(q_tokens: np.ndarray, q_len: np.ndarray, nb_tokens: np.ndarray, nb_len: np.ndarray,
                   n: int = DEFAULT_NGRAM) -> tuple[np.ndarray, np.ndarray]:
    """Overlap of each query chunk with each of its candidate neighbours.

    Parameters
    ----------
    q_tokens : ndarray, shape (B, T); q_len : ndarray, shape (B,)
    nb_tokens : ndarray, shape (B, m, T); nb_len : ndarray, shape (B, m)
    n : int, default 13

    Returns
    -------
    overlap : ndarray, shape (B, m), float64
        The query's distinct n-grams found in the neighbour, over the
        query's n-gram positions (0 where the query has fewer than ``n``
        tokens): a copy scores ~1, a query that is one repeated run and a
        neighbour holding a piece of it ~0.
    identical : ndarray, shape (B, m), bool
        The neighbour's tokens equal the query's (an exact duplicate).
    """
    qh, qv = ngram_hashes(q_tokens, q_len, n)
    nh, nv = ngram_hashes(nb_tokens, nb_len, n)
    # Each distinct query n-gram once, as future_overlap counts (helper-29: a run of one repeated token
    # counted at every position made a neighbour holding a short piece of it "overlap").
    gq = qh.shape[-1]
    count = qv.sum(axis=-1)  # over positions: a query that is one repeated run is not copied by 13 of it
    earlier = (qh[:, :, None] == qh[:, None, :]) & qv[:, None, :] & np.tri(gq, k=-1, dtype=bool)[None]
    qv = qv & ~earlier.any(-1)
    # (B, m, Gq, Gn): every query n-gram against every neighbour n-gram.
    eq = (qh[:, None, :, None] == nh[:, :, None, :]) & nv[:, :, None, :]
    found = eq.any(axis=-1) & qv[:, None, :]
    overlap = found.sum(axis=-1) / np.maximum(count, 1)[:, None]
    t = q_tokens.shape[-1]
    real = np.arange(t) < q_len[:, None]
    same = ((q_tokens[:, None, :] == nb_tokens) | ~real[:, None, :]).all(axis=-1) & (nb_len == q_len[:, None])
    return overlap, same


def future_overlap(win_tokens: np.ndarray, win_real: np.ndarray, t: int, r_tokens: np.ndarray, r_len: np.ndarray,
                   n: int = DEFAULT_NGRAM) -> np.ndarray:
    """How much of a window's text from each slot on each candidate's neighbour + continuation holds.

    Parameters
    ----------
    win_tokens : ndarray, shape (b, W), integer
        The windows' tokens (a training window's L + 1, label included).
    win_real : ndarray, shape (b, W), bool
        Which positions are text (False: padding); n-grams with padding are ignored.
    t : int
        Chunk length T: slot u is positions ``[u*T, (u+1)*T)``.
    r_tokens : ndarray, shape (b, C, m, R), integer
        Per slot, its m candidates' neighbour then continuation tokens (one
        contiguous span of their document, padded).
    r_len : ndarray, shape (b, C, m)
        Real tokens of each span (0 for a missing candidate).
    n : int, default 13

    Returns
    -------
    ndarray, shape (b, C, m), float64
        For slot u and a candidate: the largest share, over the window's
        chunks f >= u (positions ``[f*T, (f+1)*T)``, a last partial one
        included), of f's distinct n-grams (those starting in f, all of
        their tokens text) found in the candidate's span, over f's n-gram
        positions; or, when larger,
        the distinct n-grams found from u on in all, over ``T - n + 1`` (a
        full chunk's n-grams: a copy across a chunk boundary counts whole;
        above 1 for more than a chunk's worth). 0 where no chunk from u on
        has an n-gram.
    """
    b, c, m, r = r_tokens.shape
    out = np.zeros((b, c, m))
    if win_tokens.shape[1] < n or r < n:
        return out
    rh, rv = ngram_hashes(r_tokens, r_len, n)  # (b, C, m, G)
    wh_all, _ = ngram_hashes(win_tokens, np.full(b, win_tokens.shape[1]), n)  # (b, W - n + 1)
    text_all = np.lib.stride_tricks.sliding_window_view(np.asarray(win_real, bool), n, axis=1).all(-1)
    slot_start = (np.arange(c) * t)[:, None, None]
    rows = np.arange(c * m).reshape(c, m, 1)
    # One window at a time (all windows at once, padded, was 1.6x slower: arrays of every candidate
    # n-gram outgrow the caches).
    for w in range(b):
        wh = wh_all[w]
        pos = np.flatnonzero(text_all[w])
        if len(pos) == 0:
            continue
        # Distinct n-grams, per chunk and in all: a run of one repeated token (an rst table border, a
        # heading underline) is one n-gram, not one per position (else every window with such a run
        # dropped every candidate holding a short piece of it).
        uh, uid = np.unique(wh[pos], return_inverse=True)
        uid = uid.ravel()
        f = pos // t
        pairs = np.unique(f * len(uh) + uid)  # distinct (chunk, n-gram), chunks ascending
        pf, pu = pairs // len(uh), pairs % len(uh)
        idx = np.minimum(np.searchsorted(uh, rh[w]), len(uh) - 1)  # (C, m, G)
        hit = (uh[idx] == rh[w]) & rv[w]
        found = np.zeros((c * m, len(uh)), bool)
        found[np.broadcast_to(rows, hit.shape)[hit], idx[hit]] = True
        at = found[:, pu].reshape(c, m, len(pu))  # per distinct (chunk, n-gram): held by the candidate
        at &= (pf[None, :] * t >= slot_start[:, :, 0])[:, None, :]  # only chunks from the slot's own on
        chunks, first = np.unique(pf, return_index=True)
        # Over the chunk's n-gram positions: a chunk that is mostly one repeated run (14 distinct n-grams
        # of 52) is not "copied" by a neighbour holding 13 tokens of the run (helper-31).
        per_chunk = np.bincount(f, minlength=int(chunks[-1]) + 1)[chunks]
        counts = np.add.reduceat(at.astype(np.int32), first, axis=-1)  # (C, m, chunks with an n-gram)
        last_chunk = np.zeros(len(uh), np.int64)
        np.maximum.at(last_chunk, uid, f)  # the last chunk each n-gram occurs in
        ahead = last_chunk[None, :] * t >= slot_start[:, 0, :]  # (C, U): occurs from the slot's chunk on
        total = (found.reshape(c, m, -1) & ahead[:, None, :]).sum(-1)
        # A chunk's share, or, for a copy straddling chunk boundaries (helper-28's shifted copies), all the
        # distinct n-grams it holds from u on counted in chunks' worth (T - n + 1 per full chunk).
        out[w] = np.maximum((counts / per_chunk).max(-1), total / max(t - n + 1, 1))
    return out


def ngram_overlap(query, neighbor, n: int = DEFAULT_NGRAM) -> float:
    """Share of ``query``'s token n-grams that occur in ``neighbor``.

    Parameters
    ----------
    query, neighbor : array-like of int, shape (len,)
    n : int, default 13 (RETRO's n-gram length)

    Returns
    -------
    float
        In [0, 1]; 1.0 for identical sequences of any length (also shorter
        than n); 0.0 when the query has fewer than n tokens and differs.

    Raises
    ------
    InvalidInputError
        Not 1-D integer sequences, or ``n < 1``.
    """
    n = check_int("n", n, 1)
    q, b = np.asarray(query), np.asarray(neighbor)
    for name, a in (("query", q), ("neighbor", b)):
        if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0) or a.dtype == bool:
            raise InvalidInputError(f"{name} has shape {a.shape} dtype {a.dtype}; expected 1-D integer token ids")
    if len(q) == len(b) and np.array_equal(q, b):
        return 1.0
    t = max(len(q), len(b), 1)
    qt = np.zeros((1, t), np.int64)
    bt = np.zeros((1, 1, t), np.int64)
    qt[0, :len(q)] = q
    bt[0, 0, :len(b)] = b
    ov, _ = overlap_matrix(qt, np.array([len(q)]), bt, np.array([[len(b)]]), n)
    return float(ov[0, 0])


def duplicate_chunks(tokens: np.ndarray, lengths: np.ndarray, live: np.ndarray | None = None) -> np.ndarray:
    """Exact-duplicate chunk detection: each chunk's first identical chunk.

    Parameters
    ----------
    tokens : ndarray, shape (N, T), integer
        Padded token ids (e.g. ``ChunkTable.tokens``).
    lengths : ndarray, shape (N,)
    live : ndarray, shape (N,), bool, optional
        Chunks to consider (deleted ones map to -1).

    Returns
    -------
    ndarray, shape (N,), int64
        ``first[i]`` is the smallest chunk id whose tokens equal chunk
        ``i``'s (``i`` itself when it is unique or the first copy; -1 for
        chunks not ``live``). ``np.sum(first != np.arange(N))`` (live ones)
        counts the redundant copies.
    """
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1] or (live is not None and np.shape(live) != lengths.shape):
        raise InvalidInputError(
            f"tokens {tokens.shape}, lengths {lengths.shape} and live {None if live is None else np.shape(live)} must "
            "be shaped (N, T), (N,) and (N,): one row, length and flag per chunk (ChunkTable's fields)")
    n, t = tokens.shape
    live = np.ones(n, bool) if live is None else np.asarray(live, bool)
    real = np.arange(t) < lengths[:, None]
    key = np.concatenate([np.where(real, tokens, -1).astype(np.int64), lengths.astype(np.int64)[:, None]], 1)
    first = np.full(n, -1, np.int64)
    idx = np.flatnonzero(live)
    if len(idx) == 0:
        return first
    rows = np.ascontiguousarray(key[idx]).view(np.dtype((np.void, key.dtype.itemsize * key.shape[1]))).ravel()
    _, first_pos, inverse = np.unique(rows, return_index=True, return_inverse=True)
    first[idx] = idx[first_pos[inverse.ravel()]]
    return first


@dataclass
class FilterStats:
    """What :func:`filter_neighbors` dropped (counts of candidate neighbours).

    Attributes
    ----------
    excluded_docs : int
        From an excluded document (the query's own, or its sequence's).
    duplicates : int
        Exact copies of the query chunk.
    overlap : int
        Holding at least ``threshold`` of the query's n-grams (not identical).
    window : int
        With its continuation, holding at least ``threshold`` of a chunk of
        the window from the query's on (:func:`future_overlap`; not counted above).
    purged : int
        Deleted or purged since the candidates were searched (no document).
    short_rows : int
        Query chunks left with fewer than k neighbours after filtering.
    """

    excluded_docs: int = 0
    duplicates: int = 0
    overlap: int = 0
    window: int = 0
    purged: int = 0
    short_rows: int = 0


def filter_neighbors(cand: np.ndarray, k: int, *, q_tokens: np.ndarray, q_len: np.ndarray,
                     c_tokens: np.ndarray, c_len: np.ndarray, c_docs: np.ndarray,
                     excluded: np.ndarray | None = None, threshold: float | None = DEFAULT_OVERLAP_THRESHOLD,
                     n: int = DEFAULT_NGRAM, drop_duplicates: bool = True,
                     window_share: np.ndarray | None = None) -> tuple[np.ndarray, FilterStats]:
    """Keep the first k admissible candidates of each query chunk.

    Parameters
    ----------
    cand : ndarray, shape (B, m), int64
        Candidate chunk ids, nearest first, -1 padded.
    k : int
    q_tokens, q_len : ndarray, shapes (B, T), (B,)
        The query chunks' padded tokens and lengths.
    c_tokens, c_len, c_docs : ndarray, shapes (B, m, T), (B, m), (B, m)
        The candidates' padded tokens, lengths and documents (-1: a chunk
        deleted or purged since the candidates were searched, never kept).
    excluded : ndarray, shape (B, e), int64, optional
        Per query, documents whose chunks are dropped (-1 padded).
    threshold : float or None, default 0.5
        Drop candidates holding at least this share of the query's n-grams
        (:func:`ngram_overlap`); None turns the overlap filter off.
    n : int, default 13
    drop_duplicates : bool, default True
        Drop candidates whose tokens equal the query's.
    window_share : ndarray, shape (B, m), optional
        :func:`future_overlap` of each candidate: dropped from ``threshold`` on.

    Returns
    -------
    kept : ndarray, shape (B, k), int64
        -1 padded where fewer than k candidates are admissible.
    stats : FilterStats
    """
    stats = FilterStats()
    ok = (cand >= 0) & (c_docs >= 0)  # (c_docs -1: no document any more, a chunk purged since the search)
    stats.purged = int(((cand >= 0) & (c_docs < 0)).sum())
    if excluded is not None and excluded.size:
        ex = (c_docs[:, :, None] == excluded[:, None, :]).any(-1) & ok
        stats.excluded_docs = int(ex.sum())
        ok &= ~ex
    if drop_duplicates or threshold is not None:
        overlap, same = overlap_matrix(q_tokens, q_len, c_tokens, c_len, n)
        if drop_duplicates:
            dup = same & ok
            stats.duplicates = int(dup.sum())
            ok &= ~dup
        if threshold is not None:
            high = (overlap >= threshold) & ok
            stats.overlap = int(high.sum())
            ok &= ~high
    if window_share is not None and threshold is not None:
        ahead = (window_share >= threshold) & ok
        stats.window = int(ahead.sum())
        ok &= ~ahead
    # Stable: admissible candidates first, in their original (nearest-first) order.
    order = np.argsort(~ok, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(np.where(ok, cand, -1), order, axis=1)
    if kept.shape[1] < k:
        kept = np.pad(kept, ((0, 0), (0, k - kept.shape[1])), constant_values=-1)
    stats.short_rows = int((kept < 0).any(axis=1).sum())
    return kept, stats
