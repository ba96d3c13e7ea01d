"""Neighbours precomputed for a whole store, or for a file of token rows,
into a ``.npy`` array (``Store.precompute_neighbors``, ``retrostore neighbors``).

Resumable: rows are written to ``OUT.partial`` with progress in
``OUT.progress.json``; running again with the same arguments continues where
it stopped, and the finished file is renamed to ``OUT``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ..errors import InvalidInputError
from ..storage.fileio import atomic_write, fsync_dir
from ..types import Neighbors
from .reading import Reader, check_k
from .retrieval import _is_int, search_excluding

__all__ = ["precompute_neighbors"]


def precompute_neighbors(
    reader: Reader,
    query_neighbors: Callable[[np.ndarray, int], Neighbors],
    out: str | os.PathLike,
    *,
    k: int = 2,
    exclude_same_doc: bool = False,
    batch_size: int = 1024,
    queries: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """See :meth:`retrostore.Store.precompute_neighbors`; ``query_neighbors(rows, k)`` retrieves
    for token rows (``Store.neighbors``)."""
    k = check_k(k)
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
    version = reader.version
    t = version.manifest["chunk_tokens"]
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
        n_rows, shape = reader.limit, (reader.limit, k)
        rows_per_batch = batch_size
    params = {"store_version": version.number, "k": k, "exclude_same_doc": bool(exclude_same_doc),
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
    doc_of_all = reader.all_doc_ids() if (exclude_same_doc and qarr is None) else None
    bar = tqdm(total=n_rows, initial=done, unit="row" if qarr is not None else "chunk",
               disable=not progress, desc="neighbors", dynamic_ncols=True)
    try:
        while done < n_rows:
            end = min(n_rows, done + rows_per_batch)
            if qarr is None:
                vecs = version.stored_vectors(done, end)
                excl = [{int(doc_of_all[i])} for i in range(done, end)] if exclude_same_doc else None
                _, ids = search_excluding(reader, vecs, k, excl, lambda x: doc_of_all[x] if doc_of_all is not None
                                          else reader.doc_ids_of(x))
                ids[version.tombstones.chunk_mask(np.arange(done, end))] = -1  # deleted chunks query nothing
                arr[done:end] = ids
            else:
                nb = query_neighbors(np.asarray(qarr[done:end]), k)
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
