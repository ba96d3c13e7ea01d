"""Retrieval at generation time: RETRO's rule for L + 1 rows and ragged prompts, and
a fetch function with retro-pytorch ``TrainingWrapper``'s signature.

The rule (what retro-pytorch's ``RETRO.forward`` asserts): a row of ``n``
tokens has ``n // T`` complete chunks, and only complete chunks retrieve.
A training row of ``L + 1`` tokens therefore retrieves for its C = L / T
chunks (the label token is a ragged tail of one token and is dropped); a
200-token prompt retrieves for its 3 complete chunks, and its 8-token tail
retrieves once it is complete, 56 tokens later. Chunked cross-attention
lets chunk u's tokens attend to the neighbours of chunk u - 1 only
(Borgeaud et al. 2021, §2.4), so a tail never needs neighbours of its own.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import InvalidInputError
from ..store.retrieval import doc_id_set
from ..types import Neighbors
from ._checks import check_k_of, check_pad_id, check_threshold, settings
from .leakage import DEFAULT_OVERLAP_THRESHOLD, filter_neighbors, future_overlap

if TYPE_CHECKING:
    from retrostore import Store

__all__ = ["model_neighbors", "fetch_fn", "RAGGED"]

RAGGED = ("drop", "query")


def model_neighbors(store: "Store", token_ids: Any, k: int = 2, *, ragged: str = "drop",
                    exclude_doc_ids: Any = None, pad_id: int | None = None,
                    overlap_threshold: float | None = DEFAULT_OVERLAP_THRESHOLD) -> "Neighbors":
    """``Store.neighbors(tail=ragged)`` with the model's pad id: RETRO's chunk count for L + 1 rows and prompts.

    Parameters
    ----------
    store : Store
    token_ids : array-like of int, shape (B, n) or (n,)
        Ids in the store's chunk-tokenizer space.
    k : int, default 2
    ragged : {"drop", "query"}, default "drop"
        ``"drop"``: C = n // T, a ragged tail (the label token of an L + 1
        row, the unfinished chunk of a prompt) retrieves nothing, as
        retro-pytorch's ``RETRO`` requires. ``"query"``: C = ceil(n / T),
        the tail is queried as a shorter chunk (``Store.neighbors``' rule).
    exclude_doc_ids : sequence of length B, optional
        One entry per row, as in ``Store.neighbors``: a doc id, an iterable of
        doc ids, or None. ``[[155, 488]] * B`` leaves both documents out of
        every row; a flat ``[155, 488]`` for B = 2 leaves 155 out of row 0 and
        488 out of row 1 only (:func:`fetch_fn` takes one set for every chunk).
    pad_id : int, optional
        Pad the tokens with this id (default: the store's).
    overlap_threshold : float or None, default 0.5
        The leakage rules of :func:`~retrostore.retro.sequence_neighbors`, on
        each row: a neighbour that is an exact copy of its query chunk, holds
        this share of its 13-grams, or, with its continuation, this share of
        a chunk of the row from the query's on, is passed over for the next
        nearest (of ``2k + 8`` searched; a slot left short is masked). A
        held-out row then never retrieves a copy of itself stored in another
        document (helper-28: a page stored twice handed every prompt chunk
        its own next chunk). None retrieves copies too (generation that
        should quote the store).

    Returns
    -------
    Neighbors
        ``tokens`` shaped ``(B, C, k, 2 * T)``; C may be 0 (a prompt
        shorter than T), then every array has a 0-length axis.

    Raises
    ------
    InvalidInputError
        Bad ``ragged``, ``k``, ``pad_id``, ``overlap_threshold`` or
        ``token_ids`` (as ``Store.neighbors``).
    """
    if ragged not in RAGGED:
        raise InvalidInputError(f"ragged={ragged!r}; expected one of {RAGGED}")
    k = check_k_of(store, k)  # (helper-28: k beyond the store's chunks was -1 padding, as export refuses)
    pad = check_pad_id(store, pad_id)
    threshold = check_threshold(overlap_threshold)
    if threshold is None:
        nb = store.neighbors(token_ids, k, exclude_doc_ids=exclude_doc_ids, tail=ragged)
    else:
        wide = store.neighbors(token_ids, max(k, min(2 * k + 8, len(store))), exclude_doc_ids=exclude_doc_ids,
                               tail=ragged)
        nb = _without_copies(store, np.asarray(token_ids), wide, k, threshold)
    if pad != settings(store).pad_id:
        nb = dataclasses.replace(nb, tokens=np.where(nb.mask, nb.tokens, pad))
    return nb


def _without_copies(store: "Store", rows: np.ndarray, wide: "Neighbors", k: int, threshold: float) -> "Neighbors":
    """The first k neighbours of each slot of ``wide`` that pass the leakage rules for their row."""
    b, c, m, two_t = wide.tokens.shape
    t = two_t // 2
    rows = rows.reshape(b, -1).astype(np.int64) if rows.size else np.zeros((b, 0), np.int64)
    if c == 0 or b == 0:
        return Neighbors(wide.tokens[:, :, :k], wide.mask[:, :, :k], wide.chunk_ids[:, :, :k],
                         wide.doc_ids[:, :, :k], wide.scores[:, :, :k])
    q = np.full((b, c, t), settings(store).pad_id, np.int64)  # each slot's query chunk (a ragged one shorter)
    q_len = np.zeros((b, c), np.int64)
    for u in range(c):
        part = rows[:, u * t:(u + 1) * t]
        q[:, u, :part.shape[1]] = part
        q_len[:, u] = part.shape[1]
    real = rows != settings(store).pad_id
    span_len = wide.mask.sum(-1)
    share = future_overlap(rows, real, t, wide.tokens, span_len)
    cand = wide.chunk_ids.reshape(b * c, m)
    kept, _ = filter_neighbors(cand, k, q_tokens=q.reshape(b * c, t), q_len=q_len.ravel(),
                               c_tokens=wide.tokens[..., :t].reshape(b * c, m, t),
                               c_len=wide.mask[..., :t].sum(-1).reshape(b * c, m),
                               c_docs=wide.doc_ids.reshape(b * c, m), threshold=threshold,
                               window_share=share.reshape(b * c, m))
    # Where each kept id sits among the candidates (ids are distinct within a slot), to gather every array.
    at = np.argmax(cand[:, None, :] == kept[:, :, None], axis=-1)
    found = kept >= 0

    def take(a, fill):
        flat = a.reshape(b * c, m, *a.shape[3:])
        got = np.take_along_axis(flat, at.reshape(b * c, k, *([1] * (a.ndim - 3))), axis=1)
        mask = found.reshape(b * c, k, *([1] * (a.ndim - 3)))
        return np.where(mask, got, fill).reshape(b, c, k, *a.shape[3:])

    missing = -np.inf if settings(store).metric == "ip" else np.inf
    return Neighbors(take(wide.tokens, settings(store).pad_id), take(wide.mask, False), take(wide.chunk_ids, -1),
                     take(wide.doc_ids, -1), take(wide.scores, missing).astype(np.float32))


def fetch_fn(store: "Store", k: int = 2, *, pad_id: int | None = None,
             exclude_doc_ids: Any = None,
             overlap_threshold: float | None = DEFAULT_OVERLAP_THRESHOLD) -> Callable:
    """A retrieval function for retro-pytorch's ``TrainingWrapper.fetch_knn_chunks_fn``.

    ``TrainingWrapper.generate`` calls it with the chunks to retrieve for:
    once with every complete chunk of the prompt, then each time the output
    reaches a multiple of T tokens, with the chunk just completed.

    Parameters
    ----------
    store : Store
    k : int, default 2
        Neighbours per chunk (the model's ``num_neighbors``).
    pad_id : int, optional
        The model's ``pad_id`` (``RETRO(pad_id=...)``, default 0 there);
        default: the store's pad id. RETRO masks ``retrieved != pad_id``.
    exclude_doc_ids : iterable of int, optional
        Documents never retrieved, for every chunk it is called with (e.g. a
        held-out prompt's source): one set, not one entry per row as in
        :func:`model_neighbors` (the rows are ``b * n`` chunks).
    overlap_threshold : float or None, default 0.5
        As in :func:`model_neighbors`: copies of a chunk (in another
        document) are passed over; None retrieves them.

    Returns
    -------
    callable
        ``fn(seq_chunks) -> retrieved``: ``seq_chunks`` a ``torch.Tensor``
        (or array) of ints shaped ``(b * n, T)``; ``retrieved`` a
        ``torch.LongTensor`` ``(b * n, k, 2 * T)`` on ``seq_chunks``'
        device (neighbour then continuation tokens, padded with ``pad_id``).

    Raises
    ------
    InvalidInputError
        When called with chunks not shaped ``(m, T)``.
    """
    k = check_k_of(store, k)
    pad = check_pad_id(store, pad_id)
    threshold = check_threshold(overlap_threshold)
    t = settings(store).chunk_tokens
    excl = None if exclude_doc_ids is None else sorted(doc_id_set("exclude_doc_ids", exclude_doc_ids))

    def fetch_knn_chunks(seq_chunks):
        device = getattr(seq_chunks, "device", None)
        arr = seq_chunks.detach().cpu().numpy() if hasattr(seq_chunks, "detach") else np.asarray(seq_chunks)
        if arr.ndim != 2 or arr.shape[1] != t:
            raise InvalidInputError(f"seq_chunks has shape {tuple(arr.shape)}; expected (b * n, {t}) complete chunks")
        nb = model_neighbors(store, arr, k, pad_id=pad, overlap_threshold=threshold,
                             exclude_doc_ids=None if excl is None else [excl] * len(arr))
        out = nb.tokens[:, 0]
        try:
            import torch
        except ImportError:  # numpy in, numpy out
            return out
        res = torch.from_numpy(np.ascontiguousarray(out))
        return res.to(device) if device is not None else res

    return fetch_knn_chunks
