"""The commit protocol: a writer publishes its staged batch as a new version.

Order (docs/format.md, "Commit protocol and guarantees"): the batch's index
segment and raw vectors file are written and fsynced, their directories
fsynced; the LMDB records (written by ``append``) and the commit's record are
synced; then the manifest is published: its retained copy in ``versions/`` and
``manifest.json`` itself, each by temporary file, fsync, rename and directory
fsync. The rename of ``manifest.json`` is the commit point. Every write, fsync
and rename goes through :mod:`retrostore._fileio`, where the fault-injection
tests make each one fail in turn.

These functions are the writer half of :class:`retrostore._store.Store` and
use its private state.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import lmdb
import numpy as np

from . import _fileio, _manifest
from ._deletes import commit_deletes
from ._index import FP16, flat_fp16, write_index
from ._maintenance import commit_index, fp16_batches
from ._vectors import keeps_files, load_vectors, write_vectors
from .errors import CommitError, RetrostoreError

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["commit", "collect_garbage"]

INDEX_DIR = "index"  # the same names as retrostore._store's
VECTORS_DIR = "vectors"


def commit(store: "Store") -> int:
    """Publish the writer's staged batch; see :meth:`Store.commit`."""
    if not store._pending_chunks and not store._pending_docs and not store._pending_deletes:
        return store.version
    m = store._manifest
    new = copy.deepcopy(m)
    new.update(copy.deepcopy(store._pending_fields))  # e.g. "builds" (retrostore._distributed)
    version = m["version"] + 1
    first_id = m["next_chunk_id"]
    new_files: list[Path] = []
    store._stage = "preparing the batch"
    try:
        vectors = _staged_vectors(store)
        # Names depend only on the version, so building the same inputs twice gives
        # the same files and manifests (reproducible artifacts). A failed attempt's
        # files are removed by _abort_commit or, after a crash, by the next writer.
        tag = f"{version:08d}"
        store._stage = "writing the deletes"
        tomb = commit_deletes(store, new, tag, new_files)
        if len(vectors) or store._pending_deletes:
            if len(vectors):
                _write_batch_files(store, new, vectors, first_id, tag, new_files, tomb)
            store._stage = "syncing the index and vectors directories"
            _fileio.fsync_dir(store.path / INDEX_DIR)
            _fileio.fsync_dir(store.path / VECTORS_DIR)
        chunk_range = (first_id, first_id + store._pending_chunks)
        doc_range = (m["next_doc_id"], m["next_doc_id"] + store._pending_docs)
        digest = store._hasher.hexdigest()
        store._stage = "committing the LMDB records"
        store._table.put_commit(version, chunk_range, doc_range, digest)
        _fileio.sync_lmdb(store._table.env)
        new["lmdb"]["chain"] = hashlib.sha256((m["lmdb"]["chain"] + digest).encode()).hexdigest()
        new["version"] = version
        new["format_version"] = _manifest.FORMAT_VERSION
        new["committed_at"] = _now()
        new["next_chunk_id"] = chunk_range[1]
        new["next_doc_id"] = doc_range[1]
        new["counts"] = {"documents": doc_range[1], "chunks": chunk_range[1],
                         "vectors": sum(e["count"] for e in new["index"]["segments"])}
        store._stage = "publishing the manifest"
        _manifest.write_manifest(store.path, new)
    except BaseException as exc:
        stage = store._stage
        _abort_commit(store, new, new_files, stage, exc)
        if isinstance(exc, (OSError, lmdb.Error)):
            raise _fileio.commit_error(exc, stage) from exc
        if isinstance(exc, RuntimeError):  # FAISS failures while building or merging
            raise RetrostoreError(f"commit failed while {stage}: {exc}") from exc
        raise
    store._manifest = new
    store._reset_pending()
    store._load_segments()
    try:
        collect_garbage(store)
    except OSError:
        pass  # garbage is collected by a later commit or writer
    return version


def _staged_vectors(store: "Store") -> np.ndarray:
    """The batch's vectors, shape (n, dim): float32, or float16 when they become a float16 Flat
    segment (each appended part cast into one array: no float32 copy of the whole batch)."""
    m = store._manifest
    parts = store._pending_vectors
    if not parts:
        return np.zeros((0, m["index"]["dim"]), np.float32)
    if not fp16_batches(m):
        return np.concatenate(parts)
    out = np.empty((sum(len(p) for p in parts), m["index"]["dim"]), np.float16)
    at = 0
    for p in parts:
        out[at : at + len(p)] = p
        at += len(p)
    return out


def _write_batch_files(store: "Store", new: dict, vectors: np.ndarray, first_id: int, tag: str, new_files: list,
                       tomb) -> None:
    """Write the batch's raw vectors file and its index segment into ``new``.

    The index part (a segment cloned from the trained template, tiered
    merges, training once the store is large enough) is
    :func:`retrostore._maintenance.commit_index`.
    """
    m = store._manifest
    keep = keeps_files(m)
    pool = future = None
    if keep:
        # The raw vectors file is written in a second thread while this one builds and writes
        # the batch's index segment: both are mostly numpy, hashlib, write(2) and FAISS calls
        # that release the GIL. Anything that may read raw vectors files (tier merges,
        # training) waits for it through vectors_ready().
        vpath = store.path / VECTORS_DIR / f"vec-{tag}.npy"
        vpath.unlink(missing_ok=True)  # left by a failed attempt at this same version: never referenced
        new_files.append(vpath)
        pool = ThreadPoolExecutor(1, thread_name_prefix="retrostore-vectors")
        future = pool.submit(write_vectors, vpath, vectors, m["vectors"]["dtype"])

    def vectors_ready() -> None:
        nonlocal future
        if future is None:
            return
        try:
            size, sha = future.result()
        except BaseException:
            store._stage = "writing the vectors file"
            raise
        future = None
        new["vectors"]["files"].append({"path": f"{VECTORS_DIR}/{vpath.name}", "size": size, "sha256": sha,
                                        "first_id": first_id, "count": len(vectors)})

    try:
        store._stage = "building the index segment"
        commit_index(store, new, vectors, tag, first_id, new_files, tomb, vectors_ready)
        vectors_ready()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)  # after an error too: the abort removes the file once it is closed
    if keep:
        _align_vectors_files(store, new, tag, new_files)


def _align_vectors_files(store: "Store", new: dict, tag: str, new_files: list) -> None:
    """Merge the vectors files under the newest segment into one, as its segments were.

    Keeps vectors files one per segment, so their number (and the manifest's
    size) stays O(log n) instead of growing by one per commit.
    """
    segs = new["index"]["segments"]
    if not segs:
        return
    start = segs[-1]["first_id"]
    files = new["vectors"]["files"]
    tail = [e for e in files if e["first_id"] >= start]
    if len(tail) < 2:
        return
    store._stage = "merging vectors files"
    parts = [load_vectors(store.path, e, verify=True) for e in tail]
    vpath = store.path / VECTORS_DIR / f"vec-{tag}m.npy"
    vpath.unlink(missing_ok=True)  # left by a failed attempt at this same version: never referenced
    new_files.append(vpath)
    size, sha = write_vectors(vpath, parts, new["vectors"]["dtype"])
    count = sum(e["count"] for e in tail)
    new["vectors"]["files"] = [e for e in files if e["first_id"] < start] + [
        {"path": f"{VECTORS_DIR}/{vpath.name}", "size": size, "sha256": sha, "first_id": start, "count": count}]


def _abort_commit(store: "Store", new: dict, new_files: list[Path], stage: str, exc: BaseException) -> None:
    """Undo a failed commit so that the previous version stays current.

    If the failure came after ``manifest.json`` was renamed into place (its
    directory fsync failed), the previous manifest is put back first. When
    that is impossible the new files are kept (the manifest on disk may
    name them), this handle is closed and CommitError says so.
    """
    published: bool | None = False
    if stage == "publishing the manifest":
        try:
            published = (store.path / _manifest.MANIFEST).read_bytes() == _manifest.encode_manifest(new)
            if published:
                _manifest.write_current(store.path, store._manifest)
                published = False
        except OSError:
            published = None
    if published is None:
        store._release()
        code = getattr(exc, "errno", None)
        raise CommitError(
            *([code] if code is not None else []),
            f"commit of version {new['version']} failed while {stage} ({exc}) and the previous manifest could "
            "not be put back, so which version is current is unknown; this writer was closed. Open the store "
            "again: it opens at whichever version manifest.json names, and the next writer removes the rest.",
        ) from exc
    if stage == "publishing the manifest":
        new_files = new_files + [_manifest.version_path(store.path, new["version"])]
    for f in new_files:
        try:
            f.unlink()
        except OSError:
            pass


def _write_segment(store: "Store", index, tag: str, first_id: int, count: int, new_files: list,
                   half=None) -> dict:
    """Write ``index`` as a new segment file; its manifest entry.

    A Flat index of a store whose ``vector_dtype`` is float16 is written as
    float16 (codec ``fp16``, :func:`retrostore._index.flat_fp16`, which rounds
    ``index`` in place to what the file holds): half the bytes, the precision
    the store keeps its raw vectors at. ``half``: that float16 form, when the
    caller built it already (``index`` may then be None: the caller caches it).
    """
    path = store.path / INDEX_DIR / f"seg-{tag}.faiss"
    path.unlink(missing_ok=True)  # left by a failed attempt at this same version: never referenced
    new_files.append(path)
    if half is None and store._manifest["vectors"]["dtype"] == "float16":
        half = flat_fp16(index)
    size, sha = write_index(path, index if half is None else half)
    entry = {"path": f"{INDEX_DIR}/{path.name}", "size": size, "sha256": sha, "first_id": first_id, "count": count}
    if half is not None:
        entry["codec"] = FP16
    if index is not None:
        store._segments_cache[sha] = index
    return entry


def collect_garbage(store: "Store") -> None:
    """Drop manifests beyond ``retain_versions`` and files no retained version references."""
    keep = int(store._manifest["settings"]["retain_versions"])
    vdir = store.path / _manifest.VERSIONS_DIR
    versions = sorted(int(p.name[9:21]) for p in vdir.glob("manifest-*.json") if p.name[9:21].isdigit())
    current = store._manifest["version"]
    retained = [v for v in versions if v <= current][-keep:]
    referenced = set()
    for v in versions:
        p = _manifest.version_path(store.path, v)
        if v not in retained or v > current:
            p.unlink(missing_ok=True)
            continue
        try:
            body = _manifest.read_manifest(store.path, v)
        except RetrostoreError:
            continue
        referenced.update(e["path"] for e in _manifest.referenced_files(body))
    referenced.update(e["path"] for e in _manifest.referenced_files(store._manifest))
    for sub in (INDEX_DIR, VECTORS_DIR):
        for p in (store.path / sub).iterdir():
            if f"{sub}/{p.name}" not in referenced:
                p.unlink(missing_ok=True)
    for p in list(store.path.glob(f"{_fileio.TMP_PREFIX}*")) + list(vdir.glob(f"{_fileio.TMP_PREFIX}*")):
        p.unlink(missing_ok=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
