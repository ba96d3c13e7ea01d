"""Low-level LMDB record helpers and the full LMDB scan run by ``verify``.

This module imports nothing from retrostore (only the standard library,
``lmdb`` and ``msgpack``), so that :func:`scan_in_child` can run it as a
script in a short-lived child process. A damaged B-tree page can make LMDB
read outside the file and crash the process with SIGBUS or SIGSEGV (the
corruption tests found such byte positions); in a child, that crash becomes
one line of ``verify`` output instead of killing the caller.

Record sealing: when a store's manifest says ``"record_checksum": "crc32"``,
every LMDB value is ``msgpack payload || crc32(key || payload)`` (4 bytes,
little-endian), so a flipped byte in a record is reported as damage instead
of being returned as wrong text or tokens.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import signal
import subprocess
import sys
import zlib

import lmdb
import msgpack

LMDB_DIR = "chunks.lmdb"
DATA = f"{LMDB_DIR}/data.mdb"
GENESIS = "retrostore"  # seed of the per-commit content hash chain
MAX_DBS = 8


def open_tables(env: lmdb.Environment) -> tuple:
    """The ``chunks``, ``docs`` and ``commits`` tables of ``env`` (not created). Raises what
    ``env.open_db`` raises.

    LMDB: ``mdb_dbi_open`` must not run in two transactions of one process at once (helper-52:
    threads opening handles together hung). Callers open an environment's tables once, before
    anyone else uses it: ``ChunkTable`` under its registry lock, :func:`scan` on its own
    environment."""
    return (env.open_db(b"chunks", create=False), env.open_db(b"docs", create=False),
            env.open_db(b"commits", create=False))


def key(i: int) -> bytes:
    """The 8-byte big-endian LMDB key of id ``i``."""
    return int(i).to_bytes(8, "big")


def seal(k: bytes, payload: bytes) -> bytes:
    """``payload`` followed by the crc32 of ``k || payload``."""
    return payload + zlib.crc32(payload, zlib.crc32(k)).to_bytes(4, "little")


def unseal(k: bytes, raw: bytes) -> bytes | None:
    """The payload of a sealed value, or None when its checksum is wrong."""
    if len(raw) < 4:
        return None
    payload = raw[:-4]
    if zlib.crc32(payload, zlib.crc32(k)).to_bytes(4, "little") != raw[-4:]:
        return None
    return payload


def records_digest(txn, chunks_db, c0: int, c1: int, docs_db, d0: int, d1: int,
                   skip: tuple[set, set] = (set(), set())) -> str:
    """Digest of chunks ``[c0, c1)`` and documents ``[d0, d1)`` as stored.

    ``sha256(sha256(chunk records) || sha256(document records))``, each inner
    hash over ``key || len(value) || value`` in key order; the same value
    ``retrostore.storage.records.RecordHasher`` computes while appending.
    ``skip``: (chunk ids, doc ids) left out, as if purged already.
    """
    hashes = []
    for db, first, end, left_out in ((chunks_db, c0, c1, skip[0]), (docs_db, d0, d1, skip[1])):
        h = hashlib.sha256()
        cur = txn.cursor(db)
        if first < end and cur.set_range(key(first)):
            for k, v in cur:
                i = int.from_bytes(k, "big")
                if i >= end:
                    break
                if i in left_out:
                    continue
                h.update(k + len(v).to_bytes(8, "big"))
                h.update(v)
        hashes.append(h.digest())
    return hashlib.sha256(hashes[0] + hashes[1]).hexdigest()


def _decode(k: bytes, raw: bytes, sealed: bool) -> tuple[dict | None, str]:
    """The record and "" , or None and why it is damaged."""
    payload = unseal(k, raw) if sealed else raw
    if payload is None:
        return None, "fails its checksum"
    try:
        rec = msgpack.unpackb(payload, raw=False)
    except Exception:
        return None, "cannot be decoded"
    return (rec, "") if isinstance(rec, dict) else (None, "is not a record")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def scan(root: str, n_chunks: int, n_docs: int, version: int, sealed: bool, readonly: bool, env=None,
         begin=None, tables=None) -> dict:
    """Check every committed LMDB record of a store.

    Returns ``{"chain": head of the content hash chain of commits <= version,
    "problems": [one line per problem]}``. Checks: records ``0..n-1`` exist
    in both tables; each decodes (and, when ``sealed``, matches its crc32);
    documents' chunk ranges tile ``[0, n_chunks)`` in order and each chunk
    names its document and position; commit records are contiguous, end at
    the high-water marks and match their content digests.

    ``env``: an environment already open on the store in this process (LMDB
    and py-lmdb forbid opening one twice in a process); default: open one. ``begin``: with
    ``env``, what starts its read transaction (``ChunkTable.read``: counted by the environment's
    gate, which the map resizes of other threads wait for); default ``env.begin``. ``tables``:
    with ``env``, its (chunks, docs, commits) tables already open (``ChunkTable.tables``: opening
    them again runs a write transaction, which waits for this process's writer).
    """
    problems: list[str] = []
    chain = hashlib.sha256(GENESIS.encode()).hexdigest()
    own = env is None
    if own:
        env = lmdb.open(os.path.join(root, LMDB_DIR), subdir=True, readonly=True, lock=not readonly,
                        max_dbs=MAX_DBS, create=False, readahead=False)
    try:
        chunks_db, docs_db, commits_db = tables or open_tables(env)
        with (begin or env.begin)() as txn:
            # Iteration walks the leaves in order; reads look ids up through the
            # branch pages. A damaged separator key in a branch page breaks the
            # lookups only, so every record is also looked up by its key.
            unfindable: dict[str, list[int]] = {"documents": [], "chunks": []}
            # documents: dense ids, chunk ranges tiling [0, n_chunks)
            owner: list[tuple[int, int]] = []  # (first_chunk, n) per doc
            expect_chunk = 0
            for i, k, v in _dense(txn, docs_db, n_docs, "document", problems, unfindable["documents"]):
                rec, why = _decode(k, v, sealed)
                if rec is None or not _is_int(rec.get("c")) or not _is_int(rec.get("n")):
                    problems.append(f"{DATA}: document {i} record {why or 'lacks its fields'}")
                    owner.append((-1, 0))
                else:
                    if rec["c"] != expect_chunk:
                        problems.append(f"{DATA}: document {i} starts at chunk {rec['c']}, expected {expect_chunk}")
                    owner.append((rec["c"], rec["n"]))
                    expect_chunk = rec["c"] + rec["n"]
            if expect_chunk != n_chunks and not problems:
                problems.append(f"{DATA}: documents cover {expect_chunk} chunks, the manifest says {n_chunks}")
            # chunks: dense ids, each naming its document and position
            doc_of = array.array("q", [-1]) * n_chunks
            for d, (c, n) in enumerate(owner):
                for j in range(max(c, 0), min(c + n, n_chunks)):
                    doc_of[j] = d
            for i, k, v in _dense(txn, chunks_db, n_chunks, "chunk", problems, unfindable["chunks"]):
                rec, why = _decode(k, v, sealed)
                if (rec is None or not _is_int(rec.get("d")) or not _is_int(rec.get("p"))
                        or not isinstance(rec.get("s"), str) or not isinstance(rec.get("t"), bytes)):
                    problems.append(f"{DATA}: chunk {i} record {why or 'lacks its fields'}")
                elif rec["d"] != doc_of[i] and doc_of[i] >= 0:
                    problems.append(f"{DATA}: chunk {i} names document {rec['d']}, its document record says {doc_of[i]}")
                elif doc_of[i] >= 0 and rec["p"] != i - owner[doc_of[i]][0]:
                    problems.append(f"{DATA}: chunk {i} has position {rec['p']}, expected {i - owner[doc_of[i]][0]}")
            for table, ids in unfindable.items():
                if ids:
                    problems.append(f"{DATA}: {len(ids)} {table} records cannot be found by their id (first: "
                                    f"{ids[0]}); a B-tree branch page is damaged")
            # commits: contiguous ranges whose digests match the records
            ends = (0, 0)
            cur = txn.cursor(commits_db)
            for k, v in cur:
                ver = int.from_bytes(k, "big")
                if ver > version:
                    break
                try:
                    c0, c1, d0, d1, recorded = parse_commit(v)
                except ValueError as exc:
                    problems.append(f"{DATA}: commit record of version {ver} is damaged ({exc})")
                    continue
                if (c0, d0) != ends:
                    problems.append(f"{DATA}: commit record of version {ver} starts at chunk {c0} / document {d0}, "
                                    f"expected {ends[0]} / {ends[1]}")
                ends = (c1, d1)
                actual = records_digest(txn, chunks_db, c0, c1, docs_db, d0, d1)
                if actual != recorded:
                    problems.append(
                        f"{DATA}: records of version {ver} (chunks {c0}..{c1 - 1}, documents {d0}..{d1 - 1}) "
                        "do not match their checksum; the LMDB data file is damaged"
                    )
                chain = hashlib.sha256((chain + recorded).encode()).hexdigest()
            if ends != (n_chunks, n_docs):
                problems.append(f"{DATA}: commit records end at chunk {ends[0]} / document {ends[1]}, "
                                f"the manifest says {n_chunks} / {n_docs}")
    finally:
        if own:
            env.close()
    return {"chain": chain, "problems": problems}


def _dense(txn, db, end: int, what: str, problems: list[str], unfindable: list[int]):
    """Yield ``(id, key, value)`` of ``db``'s records with ids below ``end``, in key order.

    Ids must be dense from 0: a problem line names each run of missing ids and a
    missing tail; ids whose record a keyed lookup cannot find again (a damaged
    branch page) go to ``unfindable``.
    """
    seen = 0
    cur = txn.cursor(db)
    if cur.first():
        for k, v in cur:
            i = int.from_bytes(k, "big")
            if i >= end:
                break
            if i != seen:
                problems.append(f"{DATA}: {what} records {seen}..{i - 1} are missing")
            yield i, k, v
            if txn.get(k, db=db) != v:
                unfindable.append(i)
            seen = i + 1
    if seen < end:
        problems.append(f"{DATA}: {end - seen} {what} records below id {end} are missing "
                        f"(found {seen}, the manifest says {end})")


def parse_commit(raw: bytes) -> tuple[int, int, int, int, str]:
    """``(first_chunk, end_chunk, first_doc, end_doc, digest)`` of a commit record.

    Raises
    ------
    ValueError
        The record is not msgpack, lacks a field, or holds bad id ranges or digest.
    """
    try:
        entry = msgpack.unpackb(raw, raw=False)
        (c0, c1), (d0, d1), recorded = entry["c"], entry["d"], entry["h"]
    except Exception as exc:
        raise ValueError(type(exc).__name__) from exc
    if (not all(_is_int(x) and x >= 0 for x in (c0, c1, d0, d1)) or c0 > c1 or d0 > d1
            or not isinstance(recorded, str)):
        raise ValueError(f"bad id ranges {[c0, c1]} {[d0, d1]} or digest")
    return c0, c1, d0, d1, recorded


def scan_in_child(root: str, n_chunks: int, n_docs: int, version: int, sealed: bool, readonly: bool,
                  timeout_s: float | None = None) -> dict | None:
    """Run :func:`scan` in a child process; a crash there becomes a problem line.

    Returns the same dict as :func:`scan` (``chain`` is None when the child
    did not finish), or None when no child process can be started.
    """
    args = json.dumps({"root": os.fspath(root), "n_chunks": n_chunks, "n_docs": n_docs, "version": version,
                       "sealed": sealed, "readonly": readonly})
    if not sys.executable:
        return None  # an embedded interpreter: the caller scans in its own process
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__)], input=args, capture_output=True,
                              text=True, timeout=timeout_s)
    except OSError:
        return None
    except subprocess.TimeoutExpired:
        return {"chain": None, "problems": [f"{DATA}: the LMDB check did not finish within {timeout_s:g} s"]}
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return {"chain": None, "problems": [
            f"{DATA}: reading the LMDB file crashed the checker process ({name}); the file is damaged"]}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return {"chain": None, "problems": [f"{DATA}: LMDB cannot read it ({last})"]}
    return json.loads(proc.stdout)


def _main() -> None:
    a = json.loads(sys.stdin.read())
    try:
        out = scan(a["root"], a["n_chunks"], a["n_docs"], a["version"], a["sealed"], a["readonly"])
    except Exception as exc:  # LMDB errors, or damage the checks above did not foresee
        out = {"chain": None, "problems": [f"{DATA}: LMDB cannot read it ({type(exc).__name__}: "
                                           f"{' '.join(str(exc).split())})"]}
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    _main()
