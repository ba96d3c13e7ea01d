"""The LMDB chunk table: chunks, documents and per-commit content hashes.

Layout (named databases in one LMDB environment ``chunks.lmdb/``):

``chunks``   8-byte big-endian chunk id -> msgpack
             ``{"d": doc id, "p": position in the document, "o": character
             offset of the span, "s": the exact text span, "t": token ids as
             little-endian bytes of the manifest's ``token_dtype``}``
``docs``     8-byte big-endian doc id -> msgpack
             ``{"c": first chunk id, "n": number of chunks, "m": metadata,
             "x": the text, only for documents with no chunks}``
``commits``  8-byte big-endian version -> msgpack ``{"c": [first, end) chunk
             ids, "d": [first, end) doc ids, "h": sha256 of the records}``

With the manifest's ``"record_checksum": "crc32"`` (every store created by
this version), each value is sealed: ``msgpack || crc32(key || msgpack)``
(see :mod:`retrostore.storage.lmdbscan`), and a record whose checksum fails raises
:class:`CorruptStoreError` instead of returning damaged text or tokens.

Records are append-only and immutable once committed: readers filter by the
manifest's high-water marks and never see a record beyond them. The map grows
on demand (starting small, so an idle store's data file stays compact).
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Iterator

import lmdb
import msgpack
import numpy as np

from ..errors import (CorruptStoreError, ForkedStoreError, ReadersFullError, RetrostoreError, StoreClosedError,
                      StoreReplacedError)
from .fileio import lmdb_writes, unreadable
from .layout import DATA_MDB, GENESIS, LMDB_DIR
from .lmdbfile import check_lmdb_file, reserve_lock_file
from .lmdbgate import EnvGate
from .lmdbscan import key as _key
from .lmdbscan import open_tables, parse_commit, records_digest, seal, unseal
from .records import ChunkRecord, DocRecord, encode_chunks, encode_doc

__all__ = ["ChunkTable", "MissingRecordError", "pending_keys"]

_INITIAL_MAP_BYTES = 32 << 20  # 32 MiB; doubled whenever a write needs more
_MAX_DBS = 8
_TXN_RECORDS = 20_000  # records per LMDB write transaction during append

# (realpath, st_dev, st_ino of data.mdb) -> [env, refcount, pid, readonly, gate, tables]: py-lmdb allows one
# env per file per process. The inode is part of the key because a store directory can be
# replaced (rm -rf + unpack, rebuild) while a handle on the old one is open: new handles must
# open the new file, never be served from the old, deleted one.
_registry: dict[tuple, list] = {}
_registry_lock = threading.Lock()
if hasattr(os, "register_at_fork"):  # (helper-53: a child copied it held by an opening thread and hung)
    os.register_at_fork(before=_registry_lock.acquire, after_in_parent=_registry_lock.release,
                        after_in_child=_registry_lock.release)


class MissingRecordError(CorruptStoreError):
    """A committed record is not in LMDB: damage, or (for a reader of an older version) the
    purge of a deleted document by ``compact`` since; ``ids`` names them, ``table`` says which."""

    def __init__(self, message: str, table: str, ids: list[int]):
        super().__init__(message)
        self.table = table
        self.ids = ids


def _retry_map_resized(fn, between=lambda: None):
    """``fn()``, tried again (up to 99 times, ``between()`` before each retry) while it fails with
    MDB_MAP_RESIZED: a writer in another process grew the map after LMDB read the meta page."""
    for _attempt in range(99):
        try:
            return fn()
        except lmdb.MapResizedError:
            between()
    return fn()


def _open_env(path: Path, readonly_media: bool) -> lmdb.Environment:
    """``lmdb.open`` of a store's environment. py-lmdb begins a transaction inside the open, which
    fails with MDB_MAP_RESIZED beside a writer process growing the map (CI: a reader process opening
    the store beside a committing writer): opened again."""
    return _retry_map_resized(lambda: lmdb.open(
        os.fspath(path), subdir=True, map_size=_INITIAL_MAP_BYTES, max_dbs=_MAX_DBS, readonly=readonly_media,
        lock=not readonly_media, metasync=False, sync=True, readahead=False, create=False, map_async=False))


def _open_tables(env: lmdb.Environment) -> tuple:
    """The three tables of a newly opened environment, opened once for every handle of it in this
    process. ``open_db`` runs a write transaction of its own (a read transaction's handles would
    not outlive it), and LMDB waits for the writer lock holding the GIL: opened by a second handle
    while this process's writer thread was inside a commit, it hung the process for good
    (helper-53; a reader thread, ``pack`` or ``verify`` opening the store beside a writer). After
    MDB_MAP_RESIZED the environment (new here: nothing of this process uses it yet) adopts the map
    size the writer set, then tries again."""
    try:
        return _retry_map_resized(lambda: open_tables(env), between=lambda: env.set_mapsize(0))
    except lmdb.Error as exc:
        env.close()
        raise CorruptStoreError(f"{LMDB_DIR}: its tables cannot be opened ({exc}); the file is damaged") from exc


def _reads(fn):
    """Report LMDB's own errors on a damaged file (MDB_CORRUPTED,
    MDB_PAGE_NOTFOUND, ...) as :class:`CorruptStoreError` naming the file."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except lmdb.ReadersFullError as exc:
            raise ReadersFullError(
                f"{DATA_MDB}: LMDB's reader table is full ({self.env.max_readers()} read transactions open at once "
                "in the processes using this store, each thread's read holding one): read from fewer threads at a "
                "time, or retry once others finish") from exc
        except lmdb.Error as exc:
            if self.env is None:  # (helper-53: Store.close() while another thread read through the handle)
                raise StoreClosedError("the store was closed while this call read it; open it again "
                                       "(retrostore.open) to go on reading") from exc
            raise CorruptStoreError(
                f"{DATA_MDB}: LMDB cannot read it ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                "the file is damaged: run `retrostore verify`"
            ) from exc

    return wrapper


def _appendable(cur: "lmdb.Cursor", items: list[tuple[bytes, bytes]]) -> bool:
    """Whether ``items`` may be written with MDB_APPEND: keys strictly increasing and all after
    the table's last key. Appending fills B-tree pages (~10% smaller than ordinary puts on
    pydocs), but a crash can leave uncommitted records at the ids a new append reuses, and
    MDB_APPEND refuses (MDB_KEYEXIST) to overwrite them, so those writes go the ordinary way."""
    keys = [k for k, _ in items]
    if not keys or any(a >= b for a, b in zip(keys, keys[1:])):
        return False
    return not cur.last() or cur.key() < keys[0]


class ChunkTable:
    """Access to the store's LMDB environment.

    Parameters
    ----------
    root : Path
        The store directory.
    token_dtype : str
        numpy dtype of packed token ids (``"<u2"`` or ``"<u4"``).
    write : bool
        Open for the writer.
    readonly_media : bool
        The store is on read-only media: open LMDB with ``readonly=True,
        lock=False`` so that nothing (not even ``lock.mdb``) is written.
    sealed : bool
        Values carry a crc32 (the manifest's ``"record_checksum": "crc32"``).
    """

    def __init__(self, root: Path, token_dtype: str, *, write: bool, readonly_media: bool = False,
                 sealed: bool = False):
        self.path = root / LMDB_DIR
        self.token_dtype = np.dtype(token_dtype)
        self.write = write
        self.sealed = sealed
        self._pid = os.getpid()
        check_lmdb_file(root / DATA_MDB)
        try:
            st = os.stat(root / DATA_MDB)
        except OSError as exc:
            raise unreadable(DATA_MDB, exc) from exc
        real = (os.path.realpath(self.path), st.st_dev, st.st_ino)
        with _registry_lock:
            entry = _registry.get(real)
            if entry is not None and entry[2] != os.getpid() and entry[4].open_at_fork:
                # Closing LMDB's copy aborts the copies of the parent's open read transactions, which
                # clears the parent's reader slots in lock.mdb (shared memory): a writer could then
                # reuse the pages of the parent's read (helper-53: 2,148 of 2,148 records gone).
                raise ForkedStoreError(
                    f"{root}: this process was forked while another thread of the parent was reading the store "
                    f"({entry[4].open_at_fork} read transaction(s) open); closing LMDB's copy of them here would end "
                    "the parent's reads, so the store cannot be opened in this child. Fork when no thread reads "
                    "the store, or start workers with the 'spawn' or 'forkserver' start method")
            if entry is not None and entry[2] != os.getpid():
                # Inherited across fork(): never reuse the parent's handle. py-lmdb
                # refuses a second open of files it has open, so close this
                # process's copy first. That is safe for the parent: it unmaps
                # the child's mapping and closes the child's descriptors; the
                # parent's fcntl locks and reader slots belong to its own pid, and no
                # transaction was open at the fork (above).
                try:
                    entry[0].close()
                except lmdb.Error:
                    pass
                del _registry[real]
                entry = None
            if entry is None:
                if not readonly_media:
                    reserve_lock_file(self.path)
                try:
                    env = _open_env(self.path, readonly_media)
                except lmdb.Error as exc:
                    if "already open in this process" in str(exc):  # py-lmdb: same data or lock file
                        raise StoreReplacedError(
                            f"{root}: this process still holds the store that was in this directory before it was "
                            f"replaced ({LMDB_DIR}/lock.mdb is still the old store's file, which LMDB allows once per "
                            "process): close the old handle first (Store.close), then open the store again"
                        ) from exc
                    if "Permission denied" in str(exc):  # (lock.mdb, or the directory: not damage)
                        raise unreadable(LMDB_DIR, PermissionError(13, "Permission denied")) from exc
                    raise CorruptStoreError(f"{LMDB_DIR}: LMDB cannot open it ({exc})") from exc
                entry = [env, 0, os.getpid(), readonly_media, EnvGate(env), _open_tables(env)]
                _registry[real] = entry
            elif write and entry[3]:
                raise RetrostoreError(f"{self.path} is open read-only in this process; close it before writing")
            entry[1] += 1
            self._real = real
            self.env: lmdb.Environment = entry[0]
            self.gate: EnvGate = entry[4]
            self._chunks, self._docs, self._commits = entry[5]

    # -- creation ---------------------------------------------------------
    @staticmethod
    def initialise(root: Path) -> None:
        """Create an empty LMDB environment with its three tables (for ``create``)."""
        path = root / LMDB_DIR
        path.mkdir()
        reserve_lock_file(path)
        with lmdb_writes(LMDB_DIR):
            env = lmdb.open(os.fspath(path), subdir=True, map_size=_INITIAL_MAP_BYTES, max_dbs=_MAX_DBS, sync=True)
            try:
                with env.begin(write=True) as txn:
                    for name in (b"chunks", b"docs", b"commits"):
                        env.open_db(name, txn=txn)
                env.sync(True)
            finally:
                env.close()

    # -- transactions -----------------------------------------------------
    def _begin(self, write: bool = False):
        """A transaction, as a context manager, counted by this environment's :class:`EnvGate`
        (map resizes wait for it: threads of this process share the environment)."""
        if self.env is None:
            raise StoreClosedError("the store was closed; open it again (retrostore.open) to go on reading")
        return self.gate.txn(write=write)

    @property
    def tables(self) -> tuple:
        """The LMDB handles of the ``chunks``, ``docs`` and ``commits`` tables."""
        return self._chunks, self._docs, self._commits

    def read(self):
        """A read transaction of this table's environment, as a context manager (for callers
        outside this class: verify's in-process scan, unpack's checks)."""
        return self._begin()

    def _write_txn(self, fn) -> None:
        """Run ``fn(txn)`` in a write transaction, growing the map when full.

        Raises
        ------
        StoreIOError
            LMDB could not write (a full disk: ``errno.ENOSPC``); the transaction was aborted.
        """
        while True:
            try:
                with lmdb_writes(DATA_MDB), self._begin(write=True) as txn:
                    fn(txn)
                return
            except lmdb.MapFullError:
                self.gate.resize(self.env.info()["map_size"] * 2)

    def sync(self) -> None:
        """Force LMDB's data to disk (``mdb_env_sync(force=1)``)."""
        self.env.sync(True)

    # -- writing ----------------------------------------------------------
    def put_records(self, chunks: list[tuple[bytes, bytes]], docs: list[tuple[bytes, bytes]]) -> None:
        """Write (key, value) records made by :meth:`pack_chunks` / :meth:`pack_doc`."""
        for i in range(0, max(len(chunks), len(docs)), _TXN_RECORDS):
            part_c = chunks[i : i + _TXN_RECORDS]
            part_d = docs[i : i + _TXN_RECORDS]

            def fn(txn, part_c=part_c, part_d=part_d):
                for db, part in ((self._chunks, part_c), (self._docs, part_d)):
                    cur = txn.cursor(db)
                    cur.putmulti(part, append=_appendable(cur, part))

            self._write_txn(fn)

    def put_commit(self, version: int, chunk_range: tuple[int, int], doc_range: tuple[int, int], digest: str) -> None:
        rec = msgpack.packb({"c": list(chunk_range), "d": list(doc_range), "h": digest})
        self._write_txn(lambda txn: txn.put(_key(version), rec, db=self._commits))

    def truncate(self, next_chunk_id: int, next_doc_id: int, version: int) -> int:
        """Delete every record beyond the committed high-water marks.

        Returns the number of records removed (orphans of a crashed writer).
        """
        removed = 0

        def fn(txn):
            nonlocal removed
            for db, first in ((self._chunks, next_chunk_id), (self._docs, next_doc_id), (self._commits, version + 1)):
                cur = txn.cursor(db)
                if cur.set_range(_key(first)):
                    while cur.delete():
                        removed += 1

        self._write_txn(fn)
        return removed

    def pack_chunks(self, first_id: int, doc_id: int, text: str, chunks: list) -> list[tuple[bytes, bytes]]:
        """(key, stored value) of one document's chunk records, ids from ``first_id``
        (values sealed when the store seals records)."""
        values = encode_chunks(self.token_dtype, doc_id, text, chunks)
        keys = [_key(i) for i in range(first_id, first_id + len(values))]
        if self.sealed:
            values = [seal(k, v) for k, v in zip(keys, values)]
        return list(zip(keys, values))

    def pack_doc(self, doc_id: int, first_chunk: int, n_chunks: int, metadata: Any,
                 text: str | None) -> tuple[bytes, bytes]:
        """(key, stored value) of document ``doc_id`` (sealed when the store seals records)."""
        raw, k = encode_doc(first_chunk, n_chunks, metadata, text), _key(doc_id)
        return k, seal(k, raw) if self.sealed else raw

    # -- reading ----------------------------------------------------------
    def _payload(self, what: str, i: int, raw: bytes) -> bytes:
        if not self.sealed:
            return raw
        payload = unseal(_key(i), raw)
        if payload is None:
            raise CorruptStoreError(f"{DATA_MDB}: {what} {i} record fails its checksum; the file is damaged")
        return payload

    def _unpack_chunk(self, cid: int, raw: bytes) -> ChunkRecord:
        raw = self._payload("chunk", cid, raw)
        try:
            r = msgpack.unpackb(raw, raw=False)
            toks = np.frombuffer(r["t"], dtype=self.token_dtype).astype(np.int64)
            return ChunkRecord(cid, r["d"], r["p"], r["o"], r["s"], toks)
        except Exception as exc:  # msgpack raises several types on damaged bytes
            raise CorruptStoreError(f"{DATA_MDB}: chunk {cid} record is damaged ({exc})") from exc

    @_reads
    def get_chunks(self, ids, limit: int) -> list[ChunkRecord | None]:
        """Chunk records for ``ids`` (None for ids < 0 or >= ``limit``).

        An id right after the one read before is read by stepping the cursor, not by a
        B-tree lookup: a neighbour and its continuation cost one lookup, which counts at
        generation time, where each fetch finds the caches cold (~50 us per lookup).
        """
        out: list[ChunkRecord | None] = []
        with self._begin() as txn:
            cur = txn.cursor(self._chunks)
            at = -2  # the id under the cursor
            for cid in ids:
                cid = int(cid)
                if cid < 0 or cid >= limit:
                    out.append(None)
                    continue
                if not ((cid == at + 1 and cur.next() and cur.key() == _key(cid)) or cur.set_key(_key(cid))):
                    raise MissingRecordError(f"{DATA_MDB}: committed chunk {cid} is missing", "chunks", [cid])
                out.append(self._unpack_chunk(cid, cur.value()))
                at = cid
        return out

    @_reads
    def iter_chunks(self, first: int, end: int) -> list[ChunkRecord]:
        """The chunk records with ids in ``[first, end)``, in order."""
        out = []
        with self._begin() as txn:
            cur = txn.cursor(self._chunks)
            if not cur.set_range(_key(first)):
                return out
            for k, v in cur:
                cid = int.from_bytes(k, "big")
                if cid >= end:
                    break
                out.append(self._unpack_chunk(cid, v))
        return out

    @_reads
    def get_doc(self, doc_id: int) -> DocRecord | None:
        with self._begin() as txn:
            raw = txn.get(_key(doc_id), db=self._docs)
        if raw is None:
            return None
        raw = self._payload("document", doc_id, raw)
        try:
            r = msgpack.unpackb(raw, raw=False)
            return DocRecord(doc_id, r["c"], r["n"], r["m"], r.get("x"))
        except Exception as exc:
            raise CorruptStoreError(f"{DATA_MDB}: document {doc_id} record is damaged ({exc})") from exc

    @_reads
    def stats(self) -> dict:
        """Entry counts and key ranges of the three tables (all records, committed or not)."""
        out = {}
        with self._begin() as txn:
            for name, db in (("chunks", self._chunks), ("docs", self._docs), ("commits", self._commits)):
                cur = txn.cursor(db)
                first = int.from_bytes(cur.key(), "big") if cur.first() else None
                last = int.from_bytes(cur.key(), "big") if cur.last() else None
                out[name] = {"entries": txn.stat(db)["entries"], "first": first, "last": last}
        return out

    @_reads
    def chunk_doc_ids(self, n_chunks: int, n_docs: int) -> np.ndarray:
        """Document id of every committed chunk, shape (n_chunks,), int64 (from the docs table)."""
        out = np.full(n_chunks, -1, np.int64)
        with self._begin() as txn:
            cur = txn.cursor(self._docs)
            for k, v in cur:
                did = int.from_bytes(k, "big")
                if did >= n_docs:
                    break
                try:
                    r = msgpack.unpackb(self._payload("document", did, v), raw=False)
                    out[r["c"] : r["c"] + r["n"]] = did
                except CorruptStoreError:
                    raise
                except Exception as exc:
                    raise CorruptStoreError(f"{DATA_MDB}: document {did} record is damaged ({exc})") from exc
        return out

    @_reads
    def count_below(self, table: str, end: int) -> int:
        """Number of records with id < ``end`` in ``"chunks"`` or ``"docs"`` (verify after purges)."""
        db = {"chunks": self._chunks, "docs": self._docs}[table]
        n = 0
        with self._begin() as txn:
            for k in txn.cursor(db).iternext(keys=True, values=False):
                if int.from_bytes(k, "big") >= end:
                    break
                n += 1
        return n

    def content_hashes(self, version: int, pending: list[tuple[int, int, int]] = ()) -> tuple[str, list[str]]:
        """Recompute the hash chain of every commit up to ``version``.

        Returns the chain head and a list of problems found (empty when the
        records match their commit entries). ``pending``: documents
        ``(doc_id, first_chunk, n_chunks)`` whose purge the manifest records
        but whose records are still here (``compact`` published its manifest,
        then stopped before its LMDB transaction committed): the chain is the
        one the purge makes, the records are checked against their digests as
        stored. In this process: for untrusted files use ``verify``, which
        scans in a child (:mod:`retrostore.storage.lmdbscan`).
        """
        problems: list[str] = []
        chain = hashlib.sha256(GENESIS.encode()).hexdigest()
        skip = pending_keys(pending)
        with self._begin() as txn:
            for k, v in txn.cursor(self._commits):
                ver = int.from_bytes(k, "big")
                if ver > version:
                    break
                try:
                    c0, c1, d0, d1, recorded = parse_commit(v)
                except ValueError as exc:
                    problems.append(f"{DATA_MDB}: commit record of version {ver} is damaged ({exc})")
                    continue
                if records_digest(txn, self._chunks, c0, c1, self._docs, d0, d1) != recorded:
                    problems.append(
                        f"{DATA_MDB}: records of version {ver} (chunks {c0}..{c1 - 1}, documents "
                        f"{d0}..{d1 - 1}) do not match their checksum; the LMDB data file is damaged"
                    )
                if _overlaps(skip, c0, c1, d0, d1):
                    recorded = records_digest(txn, self._chunks, c0, c1, self._docs, d0, d1, skip)
                chain = hashlib.sha256((chain + recorded).encode()).hexdigest()
        return chain, problems

    @_reads
    def committed_records(self, n_chunks: int, n_docs: int, version: int,
                          pending: list[tuple[int, int, int]] = ()) -> Iterator[tuple[bytes, bytes, bytes]]:
        """``(table, key, value)`` of every committed record as stored (tables ``chunks``,
        ``docs``, ``commits``, each in key order), from one read snapshot: what ``pack`` copies.

        ``pending``: documents whose purge the manifest records but whose records are still
        here (see :meth:`content_hashes`): left out, and the commit records that held them
        carry the digests the purge writes.
        """
        skip = pending_keys(pending)
        with self._begin() as txn:
            for name, db, end, left_out in ((b"chunks", self._chunks, n_chunks, skip[0]),
                                            (b"docs", self._docs, n_docs, skip[1]),
                                            (b"commits", self._commits, version + 1, set())):
                cur = txn.cursor(db)
                if not cur.first():
                    continue
                for k, v in cur:
                    i = int.from_bytes(k, "big")
                    if i >= end:
                        break
                    if i in left_out:
                        continue
                    if name == b"commits" and pending:
                        c0, c1, d0, d1, _ = parse_commit(v)
                        if _overlaps(skip, c0, c1, d0, d1):
                            entry = msgpack.unpackb(v, raw=False)
                            entry["h"] = records_digest(txn, self._chunks, c0, c1, self._docs, d0, d1, skip)
                            v = msgpack.packb(entry)  # byte for byte what purge() writes
                    yield name, bytes(k), bytes(v)

    @_reads
    def pending_purge(self, rows: np.ndarray, version: int) -> list[tuple[int, int, int]]:
        """The documents of tombstone ``rows`` purged at ``version`` whose records are still
        here: ``compact`` published that version, then stopped before its LMDB purge committed
        (the next writer finishes it)."""
        out = []
        with self._begin() as txn:
            for d, c, n, purged in np.asarray(rows, np.int64).reshape(-1, 4):
                if purged == version and txn.get(_key(int(d)), db=self._docs) is not None:
                    out.append((int(d), int(c), int(n)))
        return out

    def purge(self, docs: list[tuple[int, int, int]], before_commit, version: int) -> str:
        """Delete documents' records and re-digest the commits that held them, in one transaction.

        Parameters
        ----------
        docs : list of (doc_id, first_chunk, n_chunks)
        before_commit : callable(chain: str)
            Run inside the write transaction once the new content hash chain
            is known (``compact`` publishes its manifest here: if it raises,
            LMDB is left unchanged).
        version : int
            Commits up to this version form the chain.

        Returns
        -------
        str
            The new head of the content hash chain.
        """
        spans = sorted(docs)
        chunk_ranges = [(c, c + n) for _, c, n in spans]
        doc_ids = [d for d, _, _ in spans]
        result = []

        def fn(txn):
            for d in doc_ids:
                txn.delete(_key(d), db=self._docs)
            for c0, c1 in chunk_ranges:
                for c in range(c0, c1):
                    txn.delete(_key(c), db=self._chunks)
            chain = hashlib.sha256(GENESIS.encode()).hexdigest()
            cur = txn.cursor(self._commits)
            updates = []
            for k, v in cur:
                ver = int.from_bytes(k, "big")
                if ver > version:
                    break
                entry = msgpack.unpackb(v, raw=False)
                (e0, e1), (f0, f1) = entry["c"], entry["d"]
                if any(c0 < e1 and e0 < c1 for c0, c1 in chunk_ranges) or any(f0 <= d < f1 for d in doc_ids):
                    entry["h"] = records_digest(txn, self._chunks, e0, e1, self._docs, f0, f1)
                    updates.append((k, msgpack.packb(entry)))
                chain = hashlib.sha256((chain + entry["h"]).encode()).hexdigest()
            for k, v in updates:
                txn.put(k, v, db=self._commits)
            before_commit(chain)
            result[:] = [chain]

        self._write_txn(fn)
        self.sync()
        return result[0]

    def commit_chain(self, version: int) -> str | None:
        """Head of the content hash chain of the commit records up to ``version``, from their
        recorded digests (no record is hashed: milliseconds), as the manifest of that version
        holds it; None when a commit record cannot be read. A chunk table and a manifest of two
        different stores, or of one store's different commits, disagree."""
        chain = hashlib.sha256(GENESIS.encode()).hexdigest()
        with self._begin() as txn:
            for k, v in txn.cursor(self._commits):
                if int.from_bytes(k, "big") > version:
                    break
                try:
                    recorded = parse_commit(v)[4]
                except ValueError:
                    return None
                chain = hashlib.sha256((chain + recorded).encode()).hexdigest()
        return chain

    def replaced(self) -> bool:
        """Whether ``data.mdb`` on disk is no longer the file this table has open (its store
        directory was replaced: another copy unpacked or synced over it, a rebuild); a commit
        writes into the same file."""
        try:
            st = os.stat(os.path.join(self._real[0], "data.mdb"))
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._real[1:]

    def close(self) -> None:
        """Drop this handle; the environment closes when its last user in this process goes."""
        if self.env is None:
            return
        env, self.env = self.env, None
        if os.getpid() != self._pid:
            return  # a forked child must not close the parent's environment
        with _registry_lock:
            entry = _registry.get(self._real)
            if entry is not None and entry[0] is env:
                entry[1] -= 1
                if entry[1] <= 0:
                    del _registry[self._real]
                    entry[4].close()


def pending_keys(docs) -> tuple[set, set]:
    """(chunk ids, doc ids) of documents ``(doc_id, first_chunk, n_chunks)``."""
    return ({c for _, first, n in docs for c in range(first, first + n)}, {d for d, _, _ in docs})


def _overlaps(skip: tuple[set, set], c0: int, c1: int, d0: int, d1: int) -> bool:
    return any(c0 <= c < c1 for c in skip[0]) or any(d0 <= d < d1 for d in skip[1])
