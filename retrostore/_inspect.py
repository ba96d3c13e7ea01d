"""What ``retrostore inspect`` shows and what ``retrostore verify`` checks."""

from __future__ import annotations

import datetime as _dt
import os
from typing import TYPE_CHECKING

from . import _manifest
from ._artifact import manifest_sha256
from ._chunks import LMDB_DIR, check_lmdb_file
from ._index import check_file
from .errors import CorruptStoreError

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["store_info", "verify_store"]


def _dir_bytes(path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def store_info(store: "Store") -> dict:
    """A JSON-ready description of the store's current version."""
    m = store._manifest
    root = store.path
    idx = m["index"]
    files = _manifest.referenced_files(m)
    index_bytes = sum(e["size"] for e in idx["segments"])
    vectors_bytes = sum(e["size"] for e in m["vectors"]["files"])
    lmdb_bytes = _dir_bytes(root / LMDB_DIR)
    manifest_mtime = (root / _manifest.MANIFEST).stat().st_mtime
    versions = sorted(
        int(p.name[9:21]) for p in (root / _manifest.VERSIONS_DIR).glob("manifest-*.json") if p.name[9:21].isdigit()
    )
    n_vectors = m["counts"]["vectors"]
    return {
        "path": str(root),
        "format_version": m["format_version"],
        "min_reader_version": m["min_reader_version"],
        "version": m["version"],
        "retained_versions": versions,
        "documents": m["counts"]["documents"],
        "chunks": m["counts"]["chunks"],
        "vectors": n_vectors,
        "dim": idx["dim"],
        "metric": m["metric"],
        "chunk_tokens": m["chunk_tokens"],
        "tokenizer": {k: v for k, v in m["tokenizer"].items() if k != "path"},
        "embedder": m["embedder"],
        "index": {
            "factory": idx["factory"],
            "params": idx["params"],
            "segments": len(idx["segments"]),
            "bytes_per_vector": round(index_bytes / n_vectors, 2) if n_vectors else None,
        },
        "files": {
            "index_bytes": index_bytes,
            "vectors_bytes": vectors_bytes,
            "vectors_dtype": m["vectors"]["dtype"],
            "lmdb_bytes": lmdb_bytes,
            "tokenizer_bytes": m["tokenizer"]["size"],
            "referenced_files": len(files),
            "total_bytes": _dir_bytes(root),
        },
        "settings": m["settings"],
        "manifest_sha256": manifest_sha256(root, m),
        "created_at": m["created_at"],
        "committed_at": m["committed_at"],
        "modified_at": _dt.datetime.fromtimestamp(manifest_mtime, _dt.timezone.utc).isoformat(timespec="seconds"),
        "readonly_media": store.readonly_media,
    }


def verify_store(store: "Store", *, isolate: bool = True) -> list[str]:
    """Every integrity problem of the store's current version, one line each.

    Checks: the manifest's schema and self-checksum (already at open); every
    referenced path, and the LMDB directory, stays inside the store; every
    referenced file's size and sha256; the LMDB data file's structure (meta
    pages, size); every committed LMDB record, in a child process (see
    :func:`retrostore._lmdbscan.scan`): ids dense up to the high-water marks,
    record checksums, documents tiling the chunk ids, commit records and the
    content hash chain against the manifest; index segments and raw vectors
    files tiling the chunk ids; the loaded index holding one vector per chunk.

    ``isolate=False`` runs the LMDB scan in this process (for tests that
    sweep many damaged files; a damaged page can then crash this process).
    """
    from ._lmdbscan import scan, scan_in_child

    root = store.path
    m = store._manifest
    problems: list[str] = []
    try:
        _manifest.check_schema(m, _manifest.MANIFEST)
    except CorruptStoreError as exc:
        problems.append(str(exc))
    for entry in _manifest.referenced_files(m):
        try:
            _manifest.safe_path(root, entry["path"], _manifest.MANIFEST)
        except CorruptStoreError as exc:
            problems.append(str(exc))
            continue
        problem = check_file(root, entry)
        if problem:
            problems.append(problem)
    try:
        _manifest.safe_path(root, LMDB_DIR, LMDB_DIR)
        check_lmdb_file(root / LMDB_DIR / "data.mdb")
    except CorruptStoreError as exc:
        problems.append(str(exc))
        return _one_line(problems)
    n_chunks, n_docs = m["next_chunk_id"], m["next_doc_id"]
    if m["counts"]["chunks"] != n_chunks or m["counts"]["documents"] != n_docs:
        problems.append(
            f"{_manifest.MANIFEST}: counts {m['counts']} disagree with the high-water marks "
            f"(chunks {n_chunks}, documents {n_docs})"
        )
    if m["counts"]["vectors"] != n_chunks:
        problems.append(f"{_manifest.MANIFEST}: counts say {m['counts']['vectors']} vectors for {n_chunks} chunks")
    args = (os.fspath(root), n_chunks, n_docs, m["version"], store._table.sealed, store.readonly_media)
    found = scan_in_child(*args) if isolate else None
    if found is None:
        try:
            found = scan(*args, env=store._table.env)
        except Exception as exc:  # as _lmdbscan._main reports it from the child
            found = {"chain": None, "problems": [f"{LMDB_DIR}/data.mdb: LMDB cannot read it "
                                                 f"({type(exc).__name__}: {exc})"]}
    problems += found["problems"]
    if found["chain"] is not None and found["chain"] != m["lmdb"]["chain"]:
        problems.append(
            f"{LMDB_DIR}/data.mdb: content hash chain {found['chain'][:16]}... differs from the manifest's "
            f"{m['lmdb']['chain'][:16]}...; commit records are missing or damaged"
        )
    for kind, entries in (("index segments", m["index"]["segments"]), ("vectors files", m["vectors"]["files"])):
        if kind == "vectors files" and not m["settings"]["keep_vectors"]:
            continue
        expect = 0
        for e in entries:
            if e["first_id"] != expect:
                problems.append(f"{e['path']}: starts at chunk id {e['first_id']}, expected {expect} ({kind} must tile the ids)")
            expect = e["first_id"] + e["count"]
        if expect != n_chunks:
            problems.append(f"{_manifest.MANIFEST}: {kind} cover {expect} chunk ids, the store has {n_chunks}")
    if store._index.ntotal != n_chunks:
        problems.append(f"index: {store._index.ntotal} vectors loaded, the store has {n_chunks} chunks")
    return _one_line(problems)


def _one_line(problems: list[str]) -> list[str]:
    return [" ".join(p.split()) for p in problems]
