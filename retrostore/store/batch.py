"""The files of a commit's batch: its raw vectors file, written in a second
thread while its index segment is built and written (:mod:`.indexer`), and the
merge of the small vectors files under the newest segment.
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

__all__ = ["write_batch_files", "FINAL_VECTORS_BYTES"]

#: A raw vectors file this large is never merged again. Merging files only saves
#: file handles and manifest entries (a reader finds a row by its id in any number
#: of files), and rewrites every byte: streaming 100,000-vector commits of 384-d
#: float16 (77 MB files) into a 5M store, the merges of eight such files took
#: ~1.6 s of each eighth commit, most of the store's ingest time over raw FAISS
#: (issue 17). Smaller files (small commits) still merge with their segments, in
#: tiers, until they reach this size. (RocksDB's default target file size,
#: ``target_file_size_base``, is the same 64 MiB.)
FINAL_VECTORS_BYTES = 64 * 2**20


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
        _align_vectors_files(c, "n" if merges else "m")


def _small_runs(files: list[dict]) -> list[list[dict]]:
    """Runs of two or more consecutive files each under :data:`FINAL_VECTORS_BYTES`."""
    runs: list[list[dict]] = [[]]
    for e in files:
        if e["size"] < FINAL_VECTORS_BYTES:
            runs[-1].append(e)
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if len(r) >= 2]


def _merge_vectors_tail(c: Commit, start: int, suffix: str) -> list[tuple[list[dict], dict]]:
    """Merge each run of small vectors files from id ``start`` on into one file: per run, (the
    files merged, the new file's entry). Reads ``c.new`` and writes new files only, so it may
    run in a thread beside a merge of IVF segments (which reads no vectors)."""
    out = []
    for i, run in enumerate(_small_runs([e for e in c.new["vectors"]["files"] if e["first_id"] >= start])):
        parts = [load_vectors(c.root, e) for e in run]  # each file's sha256 is checked as its rows are copied
        fields = write_store_vectors(c.root, vectors_name(c.tag + suffix + (str(i) if i else "")), parts,
                                     c.new["vectors"]["dtype"], c.new_files, sources=run)
        out.append((run, {**fields, "first_id": run[0]["first_id"], "count": sum(e["count"] for e in run)}))
    return out


def _replace_vectors_files(c: Commit, merged: list[tuple[list[dict], dict]]) -> None:
    files = c.new["vectors"]["files"]
    for run, entry in merged:
        at = files.index(run[0])
        assert files[at:at + len(run)] == run, "the vectors files changed under their merge"
        files = files[:at] + [entry] + files[at + len(run):]
    c.new["vectors"]["files"] = files


def _align_vectors_files(c: Commit, suffix: str = "m") -> None:
    """Merge the small vectors files under the newest segment, as its segments were.

    Keeps the files of small commits few: one per segment while they are
    under :data:`FINAL_VECTORS_BYTES`, so their number (and the manifest's
    size) stays O(log n) instead of growing by one per commit.
    """
    segs = c.new["index"]["segments"]
    if not segs:
        return
    c.stage = "merging vectors files"
    _replace_vectors_files(c, _merge_vectors_tail(c, segs[-1]["first_id"], suffix))
