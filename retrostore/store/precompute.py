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

from ..errors import InvalidInputError, check_bool, check_int
from ..storage.fileio import atomic_write, check_output_file, fsync_dir, sha256_file
from ..storage.manifest import manifest_sha256
from ..types import Neighbors
from .reading import Reader, check_k
from .retrieval import search_excluding

__all__ = ["precompute_neighbors"]


def precompute_neighbors(
    reader: Reader,
    query_neighbors: Callable[[np.ndarray, int, bool], Neighbors],
    out: str | os.PathLike,
    *,
    k: int = 2,
    exclude_same_doc: bool = False,
    batch_size: int = 1024,
    queries: str | os.PathLike | None = None,
    label_token: bool = False,
    progress: bool = True,
) -> Path:
    """See :meth:`retrostore.Store.precompute_neighbors`; ``query_neighbors(rows, k, label_token)``
    retrieves for token rows (``Store.neighbors``)."""
    k = check_k(k)
    batch_size = check_int("batch_size", batch_size, 1)  # an int (a numpy integer reached FAISS, which refused it)
    exclude_same_doc = check_bool("exclude_same_doc", exclude_same_doc)
    label_token = check_bool("label_token", label_token)
    if label_token and queries is None:
        raise InvalidInputError("label_token applies to token rows given as queries=, not to the store's chunks")
    if exclude_same_doc and queries is not None:
        raise InvalidInputError("exclude_same_doc applies to the store's own chunks, not to queries=; drop one")
    out = check_output_file(out)
    version = reader.version
    t = version.manifest["chunk_tokens"]
    if 0 < version.n_chunks < k:  # a row holds at most every chunk: the rest would be -1 padding on disk
        raise InvalidInputError(f"k={k} is more than the {version.n_chunks:,} chunks of this store; "
                                f"ask for k <= {version.n_chunks:,}")
    if queries is not None:
        try:
            qarr = np.load(queries, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"queries {queries}: not a readable .npy array ({exc})") from exc
        width = qarr.shape[1] - int(label_token) if qarr.ndim == 2 else 0
        if qarr.ndim != 2 or width < t or width % t or not np.issubdtype(qarr.dtype, np.integer):
            what = f"L + 1 (label_token) with L a multiple of {t}" if label_token else f"L a multiple of {t}"
            raise InvalidInputError(
                f"queries {queries} has shape {qarr.shape} dtype {qarr.dtype}; expected integer token ids "
                f"shaped (n, {'L + 1' if label_token else 'L'}) with {what}"
                + ("" if label_token or qarr.ndim != 2 or (qarr.shape[1] - 1) % t else
                   f"; rows of {qarr.shape[1]} = {qarr.shape[1] - 1} + 1 tokens are training rows: pass "
                   "label_token=True (--label-token)")
            )
        n_rows, shape = qarr.shape[0], (qarr.shape[0], width // t, k)
        rows_per_batch = max(1, batch_size // (width // t))
    else:
        qarr = None
        n_rows, shape = reader.limit, (reader.limit, k)
        rows_per_batch = batch_size
    # What the rows depend on: this very store version (the manifest's sha256 tells two stores apart
    # at the same version number), the arguments, the queries file's content and the output shape.
    params = {"store": manifest_sha256(version.root, version.manifest), "store_version": version.number, "k": k,
              "exclude_same_doc": bool(exclude_same_doc), "label_token": label_token,
              "queries": None if queries is None else {"path": os.path.abspath(queries),
                                                       "sha256": sha256_file(queries)[1]},
              "shape": list(shape)}
    partial = out.with_name(out.name + ".partial")
    state_path = out.with_name(out.name + ".progress.json")
    done = _resume_point(partial, state_path, params, tuple(shape), n_rows)
    if done == 0:
        partial.unlink(missing_ok=True)
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
                nb = query_neighbors(np.asarray(qarr[done:end]), k, label_token)
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


def _resume_point(partial: Path, state_path: Path, params: dict, shape: tuple, n_rows: int) -> int:
    """Rows an earlier run of these very parameters finished, or 0 to start afresh: a progress
    file of other parameters (another store, version, k, queries file...) or a partial file that
    is not an int64 array of the expected shape (a leftover of another run) is not trusted."""
    if not (partial.exists() and state_path.exists()):
        return 0
    try:
        state = json.loads(state_path.read_text())
        done = int(state.get("done", 0)) if isinstance(state, dict) and state.get("params") == params else 0
    except (OSError, ValueError, TypeError):
        return 0
    if not 0 < done <= n_rows:
        return 0
    try:
        arr = np.load(partial, mmap_mode="r", allow_pickle=False)
    except Exception:  # numpy parses the header with ast: anything else is not our file
        return 0
    ok = arr.shape == shape and arr.dtype == np.int64
    del arr
    return done if ok else 0
