"""The files of a commit's batch: its raw vectors file, written in a second
thread while its index segment is built and written (:mod:`.indexer`), and the
merge of the vectors files under the newest segment into one.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import faiss
import numpy as np

from ..storage.layout import vectors_name
from ..storage.tombstones import Tombstones
from ..storage.vectors import keeps_files, load_vectors, write_store_vectors
from .commit import Commit
from .indexer import commit_index

__all__ = ["write_batch_files"]


def write_batch_files(c: Commit, vectors: np.ndarray, first_id: int, tomb: Tombstones, codes: list,
                      encoded: Callable[[], faiss.Index | None] | None = None) -> None:
    """Write the batch's raw vectors file and its index segment into ``c.new``.

    The raw vectors file is written in a second thread while this one
    builds and writes the batch's index segment: both are mostly numpy,
    hashlib, write(2) and FAISS calls that release the GIL. Anything that
    may read raw vectors files (tier merges, training) waits for it through
    ``vectors_ready()``. ``codes``: the batch's parts encoded by a sharded build, or None each;
    ``encoded()``: the batch's segment encoded while it was appended (:mod:`.encoding`), once
    the encoder's thread is done, or None.
    """
    m = c.base.manifest
    keep = keeps_files(m)
    pool = future = None
    if keep:
        pool = ThreadPoolExecutor(2, thread_name_prefix="retrostore-vectors")
        future = pool.submit(write_store_vectors, c.root, vectors_name(c.tag), vectors, m["vectors"]["dtype"],
                             c.new_files)

    merges: list = []

    def on_merge(start: int) -> None:
        """The newest segments from id ``start`` on are merging natively (IVF lists, no vectors
        read): their vectors files merge meanwhile, in a thread of their own."""
        if keep and not merges:
            merges.append(pool.submit(_merge_vectors_tail, c, start, "m"))

    def vectors_ready() -> None:
        nonlocal future
        if future is None:
            return
        try:
            fields = future.result()
        except BaseException:
            c.stage = "writing the vectors file"
            raise
        future = None
        c.new["vectors"]["files"].append({**fields, "first_id": first_id, "count": len(vectors)})

    try:
        c.stage = "building the index segment"
        commit_index(c, vectors, first_id, tomb, codes, vectors_ready, encoded, on_merge)
        vectors_ready()
        for merge in merges:
            c.stage = "merging vectors files"
            _replace_vectors_files(c, merge.result())
    finally:
        if pool is not None:
            pool.shutdown(wait=True)  # after an error too: the abort removes the files once they are closed
    if keep:  # the newest segment's files, when no merge above made them one (training rebuilt the segments)
        _align_vectors_files(c, "m2" if merges else "m")

def _merge_vectors_tail(c: Commit, start: int, suffix: str) -> tuple[list[dict], dict] | None:
    """Write one vectors file holding the files from id ``start`` on: (the files merged, the new
    file's entry), or None when fewer than two files start there. Reads ``c.new`` and writes a new
    file only, so it may run in a thread beside a merge of IVF segments (which reads no vectors)."""
    tail = [e for e in c.new["vectors"]["files"] if e["first_id"] >= start]
    if len(tail) < 2:
        return None
    parts = [load_vectors(c.root, e) for e in tail]  # each file's sha256 is checked as its rows are copied
    fields = write_store_vectors(c.root, vectors_name(c.tag + suffix), parts, c.new["vectors"]["dtype"],
                                 c.new_files, sources=tail)
    return tail, {**fields, "first_id": start, "count": sum(e["count"] for e in tail)}


def _replace_vectors_files(c: Commit, merged: tuple[list[dict], dict] | None) -> None:
    if merged is None:
        return
    tail, entry = merged
    files = c.new["vectors"]["files"]
    assert files[len(files) - len(tail):] == tail, "the vectors files changed under their merge"
    c.new["vectors"]["files"] = files[:len(files) - len(tail)] + [entry]


def _align_vectors_files(c: Commit, suffix: str = "m") -> None:
    """Merge the vectors files under the newest segment into one, as its segments were.

    Keeps vectors files one per segment, so their number (and the manifest's
    size) stays O(log n) instead of growing by one per commit.
    """
    segs = c.new["index"]["segments"]
    if not segs:
        return
    c.stage = "merging vectors files"
    _replace_vectors_files(c, _merge_vectors_tail(c, segs[-1]["first_id"], suffix))
