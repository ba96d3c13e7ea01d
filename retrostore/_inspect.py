"""What ``retrostore inspect`` shows and what ``retrostore verify`` checks."""

from __future__ import annotations

import datetime as _dt
import os
from typing import TYPE_CHECKING

from . import _manifest
from ._artifact import manifest_sha256
from ._chunks import LMDB_DIR, check_lmdb_file
from ._index import check_file
from ._vectors import keeps_files
from .errors import CorruptStoreError, RetrostoreError

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["store_info", "verify_store", "retokenize_problems"]


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
        "index": index_info(store, index_bytes),
        "deletes": {k: v for k, v in (m.get("deletes") or {}).items() if k != "file"},
        "files": {
            "index_bytes": index_bytes,
            "vectors_bytes": vectors_bytes,
            "vectors_dtype": m["vectors"]["dtype"],
            "vectors_in_index": bool(m["settings"]["keep_vectors"]) and not keeps_files(m),
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


def index_info(store: "Store", index_bytes: int) -> dict:
    """The ``index`` part of :func:`store_info`: factory, policy, effective parameters, memory."""
    from ._training import AUTO_TRAIN_MIN, RETRAIN_GROWTH, default_factory

    m = store._manifest
    idx = m["index"]
    n = store._index.ntotal
    target = idx.get("target", idx["factory"])
    info = {
        "factory": idx["factory"],
        "target": target,
        "params": store._index.effective(),
        "stored_params": idx["params"],
        "param_overrides": idx.get("param_overrides", {}),
        "segments": len(idx["segments"]),
        "trained": idx.get("trained"),
        "mmap": bool(getattr(store, "_mmap_arg", None) if getattr(store, "_mmap_arg", None) is not None
                     else m["settings"].get("mmap", False)),
        "bytes_per_vector": round(index_bytes / n, 2) if n else None,
        "template_bytes": idx["template"]["size"] if idx.get("template") else 0,
    }
    hint = None
    if target == "auto" and not idx.get("template") and n < AUTO_TRAIN_MIN:
        hint = f"exact Flat until {AUTO_TRAIN_MIN:,} vectors; then trained at commit"
    elif target not in ("auto", idx["factory"]):
        hint = f"served by exact Flat until enough vectors exist to train {target!r} (trained at a commit)"
    elif target == "auto" and idx.get("trained") and n >= RETRAIN_GROWTH * idx["trained"]["vectors"] // 2:
        hint = (f"the store has grown since training; `retrostore reindex` would train "
                f"{default_factory(n, idx['dim'], keep_vectors=m['settings']['keep_vectors'])!r} now")
    info["hint"] = hint
    return info


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
    deletes = m.get("deletes") or {}
    holes = {"chunks": int(deletes.get("purged_chunks", 0)), "docs": int(deletes.get("purged_documents", 0))}
    if m["counts"]["chunks"] != n_chunks or m["counts"]["documents"] != n_docs:
        problems.append(
            f"{_manifest.MANIFEST}: counts {m['counts']} disagree with the high-water marks "
            f"(chunks {n_chunks}, documents {n_docs})"
        )
    if holes["chunks"] or holes["docs"]:
        problems += _lmdb_problems_with_holes(store, n_chunks, n_docs, holes)
    else:
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
        if kind == "vectors files" and not keeps_files(m):
            continue
        expect = 0
        for e in entries:
            if e["first_id"] != expect:
                problems.append(f"{e['path']}: starts at chunk id {e['first_id']}, expected {expect} ({kind} must tile the ids)")
            expect = e.get("end_id", e["first_id"] + e["count"])
        if expect != n_chunks:
            problems.append(f"{_manifest.MANIFEST}: {kind} cover {expect} chunk ids, the store has {n_chunks}")
    n_vec = sum(e["count"] for e in m["index"]["segments"])
    if store._index.ntotal != n_vec or m["counts"]["vectors"] != n_vec:
        problems.append(f"index: {store._index.ntotal} vectors loaded, the manifest says {m['counts']['vectors']}")
    if not n_chunks - int(deletes.get("chunks", 0)) <= n_vec <= n_chunks:
        problems.append(f"index: {n_vec} vectors for {n_chunks} chunks of which {deletes.get('chunks', 0)} are "
                        "deleted; every chunk that is not deleted must be indexed")
    return _one_line(problems)


def _lmdb_problems_with_holes(store: "Store", n_chunks: int, n_docs: int, holes: dict) -> list[str]:
    """LMDB checks of a store whose deleted documents were purged by compact (ids stay, records go)."""
    m = store._manifest
    problems: list[str] = []
    try:
        for name, hwm in (("chunks", n_chunks), ("docs", n_docs)):
            committed = store._table.count_below(name, hwm)
            if committed != hwm - holes[name]:
                problems.append(
                    f"{LMDB_DIR}/data.mdb: {committed} {name} records below id {hwm}, the manifest says "
                    f"{hwm - holes[name]} ({hwm} ids, {holes[name]} purged by deletes)"
                )
        chain, chain_problems = store._table.content_hashes(m["version"])
        problems += chain_problems
        if chain != m["lmdb"]["chain"]:
            problems.append(
                f"{LMDB_DIR}/data.mdb: content hash chain {chain[:16]}... differs from the manifest's "
                f"{m['lmdb']['chain'][:16]}...; commit records are missing or damaged"
            )
    except RetrostoreError as exc:
        problems.append(str(exc))
    except Exception as exc:  # LMDB reports damaged pages with several exception types
        problems.append(f"{LMDB_DIR}/data.mdb: LMDB cannot read it ({type(exc).__name__}: {exc})")
    return problems


#: Characters of documents re-chunked per ``chunk_many`` call by :func:`retokenize_problems`.
_RETOKENIZE_CHARS = 4_000_000
_RETOKENIZE_REPORTED = 20


def retokenize_problems(store: "Store") -> list[str]:
    """Chunks whose token ids or spans differ from what the store's chunker makes of their document.

    Every stored document (purged ones excepted) is rebuilt from its chunk
    spans, cut again by the store's own tokenizer and ``chunk_tokens``, and
    compared chunk by chunk: the check that chunks appended with
    ``append(chunks=...)`` (checked only in part then) or written by another
    program hold the tokens of their text. Costs what tokenizing the corpus
    costs. At most ``_RETOKENIZE_REPORTED`` documents are named, then a count.
    """
    import numpy as np

    chunker, table = store.chunker, store._table
    n_docs = int(store._manifest["next_doc_id"])
    problems: list[str] = []
    bad = 0
    batch: list[tuple[int, list, str]] = []

    def flush() -> None:
        nonlocal bad
        made_all = chunker.chunk_many([text for _, _, text in batch])
        for (d, recs, text), made in zip(batch, made_all):
            diff = next((j for j, (a, b) in enumerate(zip(made, recs))
                         if a.start != b.start or not np.array_equal(a.token_ids, b.token_ids)), None)
            if diff is None and len(made) == len(recs):
                continue
            bad += 1
            if bad > _RETOKENIZE_REPORTED:
                continue
            if diff is None:
                why = f"it has {len(recs)} chunks, its text makes {len(made)}"
            else:
                why = (f"chunk {recs[diff].chunk_id} (position {diff}) holds other token ids or another span "
                       "than its text makes")
            problems.append(f"{LMDB_DIR}/data.mdb: document {d}: {why} with the store's tokenizer "
                            f"({store._manifest['chunk_tokens']} tokens per chunk)")
        batch.clear()

    size = 0
    for d in range(n_docs):
        rec = table.get_doc(d)
        if rec is None:
            continue  # purged by compact (the LMDB scan reports a missing record that is not)
        recs = table.iter_chunks(rec.first_chunk, rec.first_chunk + rec.n_chunks)
        text = rec.text if rec.text is not None else "".join(r.text for r in recs)
        batch.append((d, recs, text))
        size += len(text)
        if size >= _RETOKENIZE_CHARS:
            flush()
            size = 0
    if batch:
        flush()
    if bad > _RETOKENIZE_REPORTED:
        problems.append(f"{LMDB_DIR}/data.mdb: {bad - _RETOKENIZE_REPORTED} more documents whose chunks differ "
                        "from what their text makes")
    return problems


def _one_line(problems: list[str]) -> list[str]:
    return [" ".join(p.split()) for p in problems]
