"""What ``retrostore verify`` checks (``Store.verify``): every file against the
manifest, every committed LMDB record (scanned in a child process), the index
against the chunk ids, and, with ``retokenize``, every chunk against its text.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import CorruptStoreError, RetrostoreError
from ..storage import manifest as _manifest
from ..storage.chunktable import ChunkTable
from ..storage.fileio import unreadable
from ..storage.layout import DATA_MDB, LMDB_DIR, MANIFEST, VERSIONS_DIR, retained_versions
from ..storage.lmdbfile import check_lmdb_file
from ..storage.lmdbscan import scan, scan_in_child
from ..storage.segments import check_file
from ..storage.tombstones import Tombstones
from ..storage.vectors import keeps_files
from ..text.chunking import Chunker
from .version import Version

__all__ = ["verify_version", "retokenize_problems", "file_problems"]


def verify_version(version: Version, table: ChunkTable, *, readonly_media: bool, isolate: bool = True) -> list[str]:
    """Every integrity problem of the store's current version, one line each.

    Checks: the manifest's schema and self-checksum (already at open); every
    referenced path, and the LMDB directory, stays inside the store; every
    referenced file's size and sha256; the LMDB data file's structure (meta
    pages, size); every committed LMDB record, in a child process (see
    :func:`retrostore.storage.lmdbscan.scan`): ids dense up to the high-water marks,
    record checksums, documents tiling the chunk ids, commit records and the
    content hash chain against the manifest; index segments and raw vectors
    files tiling the chunk ids; the loaded index holding one vector per chunk.

    ``isolate=False`` runs the LMDB scan in this process (for tests that
    sweep many damaged files; a damaged page can then crash this process).
    """
    root = version.root
    m = version.manifest
    problems: list[str] = []
    try:
        _manifest.check_schema(m, MANIFEST)
    except CorruptStoreError as exc:
        problems.append(str(exc))
    problems += _referenced_problems(root, m)
    lmdb_problem = _lmdb_file_problem(root)
    if lmdb_problem:
        return _one_line(problems + [lmdb_problem] + _retained_problems(root))
    n_chunks, n_docs = m["next_chunk_id"], m["next_doc_id"]
    deletes = m.get("deletes") or {}
    holes = {"chunks": int(deletes.get("purged_chunks", 0)), "docs": int(deletes.get("purged_documents", 0))}
    if m["counts"]["chunks"] != n_chunks or m["counts"]["documents"] != n_docs:
        problems.append(
            f"{MANIFEST}: counts {m['counts']} disagree with the high-water marks "
            f"(chunks {n_chunks}, documents {n_docs})"
        )
    if holes["chunks"] or holes["docs"]:
        problems += _lmdb_problems_with_holes(m, table, n_chunks, n_docs, holes, version.tombstones)
    else:
        args = (os.fspath(root), n_chunks, n_docs, m["version"], table.sealed, readonly_media)
        found = scan_in_child(*args) if isolate else None
        if found is None:
            try:
                found = scan(*args, env=table.env, begin=table.read, tables=table.tables)
            except Exception as exc:  # as _lmdbscan._main reports it from the child
                found = {"chain": None, "problems": [f"{DATA_MDB}: LMDB cannot read it "
                                                     f"({type(exc).__name__}: {exc})"]}
        problems += found["problems"]
        if found["chain"] is not None and found["chain"] != m["lmdb"]["chain"]:
            problems.append(
                f"{DATA_MDB}: content hash chain {found['chain'][:16]}... differs from the manifest's "
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
            problems.append(f"{MANIFEST}: {kind} cover {expect} chunk ids, the store has {n_chunks}")
    n_vec = sum(e["count"] for e in m["index"]["segments"])
    if version.index.ntotal != n_vec or m["counts"]["vectors"] != n_vec:
        problems.append(f"index: {version.index.ntotal} vectors loaded, the manifest says {m['counts']['vectors']}")
    if not n_chunks - int(deletes.get("chunks", 0)) <= n_vec <= n_chunks:
        problems.append(f"index: {n_vec} vectors for {n_chunks} chunks of which {deletes.get('chunks', 0)} are "
                        "deleted; every chunk that is not deleted must be indexed")
    problems += _retained_problems(root)
    return _one_line(problems)


def _retained_problems(root: Path) -> list[str]:
    """The retained manifest copies (``versions/``) that ``open(version=V)`` could not read
    (helper-33, helper-34: a damaged or unreadable copy passed as intact)."""
    try:
        os.listdir(root / VERSIONS_DIR)
    except FileNotFoundError:
        return []
    except OSError as exc:
        return [str(unreadable(VERSIONS_DIR, exc))]
    problems = []
    for number in retained_versions(root):
        try:
            _manifest.read_manifest(root, number)
        except RetrostoreError as exc:
            problems.append(f"{exc} (retained version {number}: open(version={number}) fails; the current version "
                            "is not affected)")
    return problems


def _lmdb_problems_with_holes(m: dict, table: ChunkTable, n_chunks: int, n_docs: int, holes: dict,
                              tombstones: Tombstones) -> list[str]:
    """LMDB checks of a store whose deleted documents were purged by compact (ids stay, records go).

    A compaction that published its manifest and stopped before its LMDB purge
    committed (the next writer finishes it, ``Writer.recover``) is consistent:
    those records are counted as purged and the chain is the one the purge makes.
    """
    problems: list[str] = []
    try:
        pending = table.pending_purge(tombstones.rows, m["version"])
        still = {"chunks": sum(n for _, _, n in pending), "docs": len(pending)}
        for name, hwm in (("chunks", n_chunks), ("docs", n_docs)):
            committed = table.count_below(name, hwm) - still[name]
            if committed != hwm - holes[name]:
                problems.append(
                    f"{DATA_MDB}: {committed} {name} records below id {hwm}, the manifest says "
                    f"{hwm - holes[name]} ({hwm} ids, {holes[name]} purged by deletes)"
                )
        chain, chain_problems = table.content_hashes(m["version"], pending)
        problems += chain_problems
        if chain != m["lmdb"]["chain"]:
            problems.append(
                f"{DATA_MDB}: content hash chain {chain[:16]}... differs from the manifest's "
                f"{m['lmdb']['chain'][:16]}...; commit records are missing or damaged"
            )
    except RetrostoreError as exc:
        problems.append(str(exc))
    except Exception as exc:  # LMDB reports damaged pages with several exception types
        problems.append(f"{DATA_MDB}: LMDB cannot read it ({type(exc).__name__}: {exc})")
    return problems


#: Characters of documents re-chunked per ``chunk_many`` call by :func:`retokenize_problems`.
_RETOKENIZE_CHARS = 4_000_000
_RETOKENIZE_REPORTED = 20


def retokenize_problems(version: Version, table: ChunkTable, chunker: Chunker) -> list[str]:
    """Chunks whose token ids or spans differ from what the store's chunker makes of their document.

    Every stored document (purged ones excepted) is rebuilt from its chunk
    spans, cut again by the store's own tokenizer and ``chunk_tokens``, and
    compared chunk by chunk: the check that chunks appended with
    ``append(chunks=...)`` (checked only in part then) or written by another
    program hold the tokens of their text. Costs what tokenizing the corpus
    costs. At most ``_RETOKENIZE_REPORTED`` documents are named, then a count.
    """
    n_docs = version.n_docs
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
            problems.append(f"{DATA_MDB}: document {d}: {why} with the store's tokenizer "
                            f"({version.manifest['chunk_tokens']} tokens per chunk)")
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
        problems.append(f"{DATA_MDB}: {bad - _RETOKENIZE_REPORTED} more documents whose chunks differ "
                        "from what their text makes")
    return problems


def unopened_problems(root: os.PathLike, exc: Exception) -> list[str]:
    """The problems of a store that did not open with ``exc``: its message first (the file the
    open stopped at, worded its own way), then :func:`file_problems` of the other files."""
    first = " ".join(str(exc).split())
    named = first.split(":")[0]
    return [first] + [p for p in file_problems(root) if p.split(":")[0] != named]


def file_problems(root: os.PathLike) -> list[str]:
    """The problems of a store's files against its manifest, found without opening it: for a
    store that fails to open (``retrostore verify`` then reports every missing or damaged file at
    once, not the first open stopped at; helper-33: a partial download revealed one file per run).

    Checks the manifest (readable, schema), every referenced file's presence, size and sha256,
    and the LMDB data file's structure; one line each.
    """
    root = Path(root)
    try:
        m = _manifest.read_manifest(root)
    except RetrostoreError as exc:
        return _one_line([str(exc)])
    lmdb_problem = _lmdb_file_problem(root)
    return _one_line(_referenced_problems(root, m) + ([lmdb_problem] if lmdb_problem else []) + _retained_problems(root))


def _referenced_problems(root: Path, m: dict) -> list[str]:
    """Each file the manifest names that escapes the store, is missing, or differs from its size
    and sha256."""
    problems = []
    for entry in _manifest.referenced_files(m):
        try:
            _manifest.safe_path(root, entry["path"], MANIFEST)
        except CorruptStoreError as exc:
            problems.append(str(exc))
            continue
        problem = check_file(root, entry)
        if problem:
            problems.append(problem)
    return problems


def _lmdb_file_problem(root: Path) -> str | None:
    """Why the LMDB data file cannot be opened (its place, meta and root pages, size), or None."""
    try:
        _manifest.safe_path(root, LMDB_DIR, LMDB_DIR)
        check_lmdb_file(root / LMDB_DIR / "data.mdb")
    except CorruptStoreError as exc:
        return str(exc)
    return None


def _one_line(problems: list[str]) -> list[str]:
    return [" ".join(p.split()) for p in problems]
