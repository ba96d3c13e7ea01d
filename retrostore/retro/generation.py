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

from ..errors import InvalidInputError, check_int
from ._checks import check_pad_id, settings

if TYPE_CHECKING:
    from retrostore import Neighbors, Store

__all__ = ["model_neighbors", "fetch_fn", "RAGGED"]

RAGGED = ("drop", "query")


def model_neighbors(store: "Store", token_ids: Any, k: int = 2, *, ragged: str = "drop",
                    exclude_doc_ids: Any = None, pad_id: int | None = None) -> "Neighbors":
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
        As in ``Store.neighbors``.
    pad_id : int, optional
        Pad the tokens with this id (default: the store's).

    Returns
    -------
    Neighbors
        ``tokens`` shaped ``(B, C, k, 2 * T)``; C may be 0 (a prompt
        shorter than T), then every array has a 0-length axis.

    Raises
    ------
    InvalidInputError
        Bad ``ragged``, ``k``, ``pad_id`` or ``token_ids`` (as ``Store.neighbors``).
    """
    if ragged not in RAGGED:
        raise InvalidInputError(f"ragged={ragged!r}; expected one of {RAGGED}")
    k = check_int("k", k, 1, fix="RETRO uses k = 2")
    pad = check_pad_id(store, pad_id)
    nb = store.neighbors(token_ids, k, exclude_doc_ids=exclude_doc_ids, tail=ragged)
    if pad != settings(store).pad_id:
        nb = dataclasses.replace(nb, tokens=np.where(nb.mask, nb.tokens, pad))
    return nb


def fetch_fn(store: "Store", k: int = 2, *, pad_id: int | None = None,
             exclude_doc_ids: Any = None) -> Callable:
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
        Documents never retrieved (e.g. a held-out prompt's source).

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
    k = check_int("k", k, 1, fix="RETRO uses k = 2")
    pad = check_pad_id(store, pad_id)
    t = settings(store).chunk_tokens
    excl = None if exclude_doc_ids is None else [int(d) for d in exclude_doc_ids]

    def fetch_knn_chunks(seq_chunks):
        device = getattr(seq_chunks, "device", None)
        arr = seq_chunks.detach().cpu().numpy() if hasattr(seq_chunks, "detach") else np.asarray(seq_chunks)
        if arr.ndim != 2 or arr.shape[1] != t:
            raise InvalidInputError(f"seq_chunks has shape {tuple(arr.shape)}; expected (b * n, {t}) complete chunks")
        nb = model_neighbors(store, arr, k, pad_id=pad,
                             exclude_doc_ids=None if excl is None else [excl] * len(arr))
        out = nb.tokens[:, 0]
        try:
            import torch
        except ImportError:  # numpy in, numpy out
            return out
        res = torch.from_numpy(np.ascontiguousarray(out))
        return res.to(device) if device is not None else res

    return fetch_knn_chunks
