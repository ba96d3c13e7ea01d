"""RETRO retrieval: token-level neighbours with continuations, document
exclusion, and neighbours precomputed for a whole store or token file.

A RETRO model splits its input of L tokens into C = L / 64 chunks and, for each
chunk, attends to k neighbours of 2 x 64 tokens: the neighbour chunk followed
by its continuation, the next chunk of the same document (Borgeaud et al.
2021, §2.2-2.4). Training excludes neighbours from the query's own document.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from ._fileio import atomic_write, fsync_dir
from .errors import InvalidInputError

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["Neighbors", "neighbors", "precompute_neighbors"]


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
        nearer); -inf / +inf where there is no neighbour.
    """

    tokens: np.ndarray
    mask: np.ndarray
    chunk_ids: np.ndarray
    doc_ids: np.ndarray
    scores: np.ndarray


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


def _query_vectors(store: "Store", chunks: list[np.ndarray]) -> np.ndarray:
    emb = store.embedder
    if hasattr(emb, "embed_token_ids") and getattr(emb, "tokenizer_sha256", None) == store._manifest["tokenizer"]["sha256"]:
        return emb.embed_token_ids(chunks)
    # Another chunk tokenizer (e.g. the LM's BPE): decode, then the embedder re-tokenizes.
    texts = [store.chunker.decode(c) for c in chunks]
    return emb.embed(texts)


def _exclusion_sets(exclude_doc_ids: Any, batch: int) -> list[set[int]] | None:
    if exclude_doc_ids is None:
        return None
    rows = list(exclude_doc_ids)
    if len(rows) != batch:
        raise InvalidInputError(
            f"exclude_doc_ids has {len(rows)} rows for a batch of {batch}; give one entry per row "
            "(an int, an iterable of ints, or None)"
        )
    out = []
    for i, r in enumerate(rows):
        if r is None:
            out.append(set())
        elif _is_int(r):
            out.append({int(r)})
        elif isinstance(r, (str, bytes)) or not hasattr(r, "__iter__"):
            raise InvalidInputError(
                f"exclude_doc_ids[{i}] is {r!r}; give a doc id (int), an iterable of doc ids, or None per row"
            )
        else:
            ids = list(r)
            bad = [x for x in ids if not _is_int(x)]
            if bad:
                raise InvalidInputError(f"exclude_doc_ids[{i}] holds {bad[0]!r}; doc ids are ints")
            out.append({int(x) for x in ids})
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def search_excluding(store: "Store", vectors: np.ndarray, k: int, excluded: list[set[int]] | None,
                     doc_of: Any) -> tuple[np.ndarray, np.ndarray]:
    """k nearest chunks per row whose document is not in that row's excluded set.

    Fetches ``k + extra`` candidates and doubles ``extra`` for rows that still
    lack k admissible neighbours, up to every chunk of the store.

    Parameters
    ----------
    vectors : ndarray, shape (n, dim), float32
    excluded : list of set of int, length n, or None
    doc_of : callable
        Maps an int64 array of chunk ids (all >= 0) to their doc ids.

    Returns
    -------
    scores : ndarray, shape (n, k), float32
    chunk_ids : ndarray, shape (n, k), int64 (-1 padded)
    """
    n = len(vectors)
    total = len(store)
    if excluded is None or not any(excluded):
        return store.search_vectors(vectors, k) if n else (np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
    fill = -np.inf if store._manifest["metric"] == "ip" else np.inf
    out_s = np.full((n, k), fill, np.float32)
    out_i = np.full((n, k), -1, np.int64)
    todo = np.arange(n)
    fetch = min(total, k + max(8, k))
    while len(todo):
        s, ids = store.search_vectors(vectors[todo], fetch)
        valid = ids >= 0
        docs = np.full(ids.shape, -1, np.int64)
        docs[valid] = doc_of(ids[valid])
        still = []
        for row, q in enumerate(todo):
            keep = [j for j in range(fetch) if valid[row, j] and int(docs[row, j]) not in excluded[q]][:k]
            if len(keep) < k and fetch < total:
                still.append(q)
                continue
            out_s[q, : len(keep)] = s[row, keep]
            out_i[q, : len(keep)] = ids[row, keep]
        todo = np.array(still, dtype=np.int64)
        fetch = min(total, fetch * 2)
    return out_s, out_i


def neighbors(store: "Store", token_ids: Any, k: int = 2, *, exclude_doc_ids: Any = None) -> Neighbors:
    """See :meth:`retrostore.Store.neighbors`."""
    from ._reading import _check_k

    k = _check_k(k)
    m = store._manifest
    t = m["chunk_tokens"]
    pad = int(m["tokenizer"]["pad_id"])
    arr = _as_token_array(token_ids, int(m["tokenizer"]["vocab_size"]))
    b = arr.shape[0]
    excluded = _exclusion_sets(exclude_doc_ids, b)
    chunks, c = _split_chunks(arr, t)
    if len(store) == 0:
        vec_s = np.full((b * c, k), -np.inf if m["metric"] == "ip" else np.inf, np.float32)
        vec_i = np.full((b * c, k), -1, np.int64)
    else:
        vecs = _query_vectors(store, chunks)
        per_chunk_excl = None if excluded is None else [excluded[i] for i in range(b) for _ in range(c)]
        vec_s, vec_i = search_excluding(store, vecs, k, per_chunk_excl, lambda ids: store._doc_ids_of(ids))
    ids = vec_i.reshape(b, c, k)
    tokens = np.full((b, c, k, 2 * t), pad, np.int64)
    mask = np.zeros((b, c, k, 2 * t), bool)
    doc_ids = np.full((b, c, k), -1, np.int64)
    flat = ids.ravel()
    limit = len(store)
    wanted = store._tombstones.drop(
        sorted({int(i) for i in flat if i >= 0} | {int(i) + 1 for i in flat if 0 <= i and i + 1 < limit}))
    recs = dict(zip(wanted, store._table.get_chunks(wanted, limit)))
    for pos, cid in enumerate(flat):
        if cid < 0:
            continue
        bi, ci, ki = np.unravel_index(pos, ids.shape)
        r = recs[int(cid)]
        doc_ids[bi, ci, ki] = r.doc_id
        n = len(r.token_ids)
        tokens[bi, ci, ki, :n] = r.token_ids
        mask[bi, ci, ki, :n] = True
        nxt = recs.get(int(cid) + 1)
        if nxt is not None and nxt.doc_id == r.doc_id:  # never cross into another document
            n2 = len(nxt.token_ids)
            tokens[bi, ci, ki, t : t + n2] = nxt.token_ids
            mask[bi, ci, ki, t : t + n2] = True
    return Neighbors(tokens, mask, ids, doc_ids, vec_s.reshape(b, c, k))


def precompute_neighbors(
    store: "Store",
    out: str | os.PathLike,
    *,
    k: int = 2,
    exclude_same_doc: bool = False,
    batch_size: int = 1024,
    queries: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """See :meth:`retrostore.Store.precompute_neighbors`."""
    from ._reading import _check_k

    k = _check_k(k)
    if not _is_int(batch_size) or batch_size < 1:
        raise InvalidInputError(f"batch_size={batch_size!r} must be an int >= 1")
    if not isinstance(exclude_same_doc, bool):
        raise InvalidInputError(f"exclude_same_doc={exclude_same_doc!r} must be True or False")
    if exclude_same_doc and queries is not None:
        raise InvalidInputError("exclude_same_doc applies to the store's own chunks, not to queries=; drop one")
    if not isinstance(out, (str, os.PathLike)):
        raise InvalidInputError(f"out={out!r} must be a path to a .npy file")
    out = Path(out)
    if out.suffix != ".npy":
        raise InvalidInputError(f"out={str(out)!r} must end in .npy (the file is a NumPy array)")
    if not out.parent.is_dir():
        raise InvalidInputError(f"out={str(out)!r}: the directory {str(out.parent)!r} does not exist; create it first")
    if out.is_dir():
        raise InvalidInputError(f"out={str(out)!r} is a directory; give a file name ending in .npy")
    m = store._manifest
    t = m["chunk_tokens"]
    if queries is not None:
        try:
            qarr = np.load(queries, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"queries {queries}: not a readable .npy array ({exc})") from exc
        if qarr.ndim != 2 or qarr.shape[1] % t or not np.issubdtype(qarr.dtype, np.integer):
            raise InvalidInputError(
                f"queries {queries} has shape {qarr.shape} dtype {qarr.dtype}; expected integer token ids "
                f"shaped (n, L) with L a multiple of {t}"
            )
        n_rows, shape = qarr.shape[0], (qarr.shape[0], qarr.shape[1] // t, k)
        rows_per_batch = max(1, batch_size // (qarr.shape[1] // t))
    else:
        qarr = None
        n_rows, shape = len(store), (len(store), k)
        rows_per_batch = batch_size
    params = {"store_version": store.version, "k": k, "exclude_same_doc": bool(exclude_same_doc),
              "queries": None if queries is None else os.path.abspath(queries), "shape": list(shape)}
    partial = out.with_name(out.name + ".partial")
    state_path = out.with_name(out.name + ".progress.json")
    done = 0
    if partial.exists() and state_path.exists():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            state = {}
        if state.get("params") == params:
            done = int(state.get("done", 0))
    if done == 0:
        arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np.int64, shape=tuple(shape))
    else:
        arr = np.load(partial, mmap_mode="r+", allow_pickle=False)
    doc_of_all = store._all_doc_ids() if (exclude_same_doc and qarr is None) else None
    bar = tqdm(total=n_rows, initial=done, unit="row" if qarr is not None else "chunk",
               disable=not progress, desc="neighbors", dynamic_ncols=True)
    try:
        while done < n_rows:
            end = min(n_rows, done + rows_per_batch)
            if qarr is None:
                vecs = store._stored_vectors(done, end)
                excl = [{int(doc_of_all[i])} for i in range(done, end)] if exclude_same_doc else None
                _, ids = search_excluding(store, vecs, k, excl, lambda x: doc_of_all[x] if doc_of_all is not None
                                          else store._doc_ids_of(x))
                ids[store._tombstones.chunk_mask(np.arange(done, end))] = -1  # deleted chunks query nothing
                arr[done:end] = ids
            else:
                nb = neighbors(store, np.asarray(qarr[done:end]), k)
                arr[done:end] = nb.chunk_ids
            arr.flush()
            done = end
            atomic_write(state_path, [json.dumps({"params": params, "done": done}).encode()])
            bar.update(end - bar.n)
    finally:
        bar.close()
    del arr
    os.replace(partial, out)
    fsync_dir(out.parent if str(out.parent) else ".")
    state_path.unlink(missing_ok=True)
    return out
