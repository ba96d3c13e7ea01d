"""Stores as artifacts: pack one version into a single file.

``pack`` writes the current version of a store as one tar file (zstd-compressed
when the name ends with ``.tar.zst``):

``manifest.json`` first, then in name order ``chunks.lmdb/``,
``chunks.lmdb/data.mdb``, ``index/``, the index files, ``tokenizer.json``,
``vectors/``, the vectors files (unless dropped) and ``versions/`` with a copy
of the one manifest. The LMDB file holds only the committed records (nothing
beyond the high-water marks) rewritten in key order and compacted (no free
pages, no ``lock.mdb``). Every member has the same owner (0/0, no names),
permissions (0644 files, 0755 directories) and mtime (the version's
``committed_at``), so packing the same version twice gives the same bytes.

The way back, with its checks against hostile archives, is
:mod:`retrostore.ship.unpack`. See docs/artifacts.md.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import os
import secrets
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import zstandard

from ..errors import (
    CorruptStoreError,
    InvalidInputError,
    RetrostoreError,
    OutputExistsError,
    StoreIOError,
    check_bool,
    check_int,
)
from ..storage import fileio
from ..storage import manifest as _manifest
from ..storage.chunktable import ChunkTable
from ..storage.fileio import git_lfs_pointer
from ..storage.layout import DATA_MDB, LMDB_DIR, MANIFEST, STORE_DIRS, TMP_PREFIX, version_path
from ..storage.tombstones import Tombstones

__all__ = [
    "pack",
    "ArtifactInfo",
    "DEFAULT_MAX_TOTAL_BYTES",
    "DEFAULT_MAX_MEMBER_BYTES",
    "DEFAULT_MAX_MEMBERS",
]

#: Default limit on the bytes ``unpack`` extracts in all (1 TiB).
DEFAULT_MAX_TOTAL_BYTES = 1 << 40
#: Default limit on the bytes of one archive member (256 GiB).
DEFAULT_MAX_MEMBER_BYTES = 1 << 38
#: Default limit on the number of archive members.
DEFAULT_MAX_MEMBERS = 100_000

_LMDB_TXN_RECORDS = 10_000  # records per write transaction of the packed LMDB (fixed: part of its layout)
_LMDB_MAP_BYTES = 32 << 20  # first map size of the packed LMDB; doubled (deterministically) when full
_BLOCK = 1 << 20


@dataclass(frozen=True)
class ArtifactInfo:
    """What :func:`pack` wrote or :func:`unpack` put in place.

    Attributes
    ----------
    path : Path
        The archive (pack) or the store directory (unpack).
    version : int
        The store version it holds.
    manifest_sha256 : str
        sha256 of its ``manifest.json`` bytes: the value to publish and compare.
    files : int
        Regular files in the artifact.
    size_bytes : int
        Size of the archive (pack) or of the store's files (unpack).
    vectors : bool
        Whether raw vectors are included.
    """

    path: Path
    version: int
    manifest_sha256: str
    files: int
    size_bytes: int
    vectors: bool


# -- pack ------------------------------------------------------------------------
def pack(
    store_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    vectors: bool = True,
    overwrite: bool = False,
    level: int = 3,
) -> ArtifactInfo:
    """Write the current version of a store as one archive file.

    Parameters
    ----------
    store_path : path-like
        The store directory (it may be open by a writer; only committed data
        is packed).
    out : path-like
        Archive to write: ``*.tar``, or ``*.tar.zst`` for zstd compression.
        Written to a temporary file beside it and renamed into place.
    vectors : bool, default True
        Include the raw vectors. ``False`` makes a slim artifact: the manifest
        records ``vectors.files = []``, ``vectors.dropped_at_pack = true`` and
        ``settings.keep_vectors = false`` (with its checksum recomputed), and a
        later reindex explains why it cannot run.
    overwrite : bool, default False
        Replace an existing ``out``.
    level : int, default 3
        zstd compression level (1-22) for ``.tar.zst``.

    Returns
    -------
    ArtifactInfo

    Raises
    ------
    InvalidInputError
        ``store_path`` or ``out`` is not a path, or a file stands where a directory of
        ``out`` should be; ``out`` does not end with ``.tar`` or ``.tar.zst``, or a bad ``level``;
        the version holds deleted documents that ``compact`` has not purged yet
        (their text, tokens and vectors are still in its files and would ship:
        a take-down must not travel in an artifact).
    OutputExistsError
        ``out`` exists and ``overwrite`` is False.
    NotAStoreError, CorruptStoreError, FormatVersionError
        The store cannot be opened, or a file differs from its manifest entry
        (damaged, or removed by a writer while packing: pack again).
    StoreIOError
        Writing the archive failed (an OSError: ``errno.ENOSPC`` on a full
        disk); nothing is left at ``out`` or beside it.
    """
    root = fileio.check_path("store_path", store_path, "the store directory")
    out = fileio.check_path("out", out, "the archive to write (.tar or .tar.zst)")
    compressed = out.name.endswith(".tar.zst")
    if not compressed and not out.name.endswith(".tar"):
        raise InvalidInputError(f"{out}: the archive name must end with .tar or .tar.zst (zstd-compressed)")
    level = check_int("level", level, 1, 22, fix="the zstd compression level")
    vectors = check_bool("vectors", vectors)
    overwrite = check_bool("overwrite", overwrite)
    if out.is_dir():  # helper-37: os.replace's IsADirectoryError, naming a temporary file
        raise InvalidInputError(f"{out} is a directory; give the archive's file name, e.g. {out / 'store.tar.zst'}")
    if (out.exists() or out.is_symlink()) and not overwrite:  # (helper-60: a dangling link was replaced)
        raise OutputExistsError(
            f"the archive {out} already exists; choose another name, or replace it with "
            "`retrostore pack --force` (overwrite=True in Python)"
        )
    fileio.check_outside_store(out, "out")
    blocker = fileio.file_in_the_way(out)
    if blocker is not None:  # helper-48: "[Errno 17] File exists: 'one.jsonl'", naming no fix
        raise InvalidInputError(f"{out}: {blocker} is a file, not a directory; write the archive under a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreIOError(exc.errno, f"cannot create the directory {out.parent} for the archive: "
                                      f"{exc.strerror or exc}.{fileio.io_hint(exc.errno, 'pack again')}") from exc
    for stem in (f"pack-{out.name}", out.name):  # of a pack killed before its rename (helper-37)
        fileio.remove_stale_tmp(out.parent, stem)
    tag = f"{os.getpid()}.{secrets.token_hex(4)}"
    work = out.parent / f"{TMP_PREFIX}pack-{out.name}.{tag}"
    tmp_out = out.parent / f"{TMP_PREFIX}{out.name}.{tag}"
    # Not a Store: that would load every index segment into memory just to copy its file.
    body = _manifest.read_manifest(root)
    tomb = Tombstones.load(root, body)
    unpurged = tomb.rows[tomb.rows[:, 3] == 0, 0]
    if len(unpurged):  # helper-17: their text was in the archive's data.mdb, verbatim
        listed = ", ".join(map(str, unpurged[:10].tolist())) + (", ..." if len(unpurged) > 10 else "")
        raise InvalidInputError(
            f"{root} version {body['version']} has {len(unpurged)} deleted document(s) not purged yet ({listed}): "
            f"their text, tokens and vectors are still in its files and would ship in the archive; run "
            f"`retrostore compact {root}` first (it purges them from every file), then pack")
    table = ChunkTable(root, body["tokenizer"]["token_dtype"], write=False, readonly_media=fileio.readonly_media(root))
    try:
        version = int(body["version"])
        if not vectors:
            body["vectors"]["files"] = []
            body["vectors"]["dropped_at_pack"] = True
            body["settings"]["keep_vectors"] = False
        # unchanged, the manifest ships byte for byte, so its sha256 is the source store's
        raw_manifest = _manifest.encode_manifest(body) if not vectors else _manifest.manifest_bytes(root, body)
        mtime = _epoch(body["committed_at"])
        work.mkdir()
        try:
            _write_committed_lmdb(root, table, body, tomb, work / LMDB_DIR)
            members: list[tuple[str, Any]] = [(d, None) for d in STORE_DIRS]
            members.append((DATA_MDB, work / DATA_MDB))
            for entry in _manifest.referenced_files(body):
                members.append((entry["path"], entry))
            members.append((version_path(Path(), version).as_posix(), raw_manifest))
            members.sort(key=lambda m: m[0])
            members.insert(0, (MANIFEST, raw_manifest))
            n_files = _write_archive(root, tmp_out, members, mtime, compressed, level)
            os.replace(tmp_out, out)
            fileio.fsync_dir(out.parent)
        except BaseException as exc:
            tmp_out.unlink(missing_ok=True)
            if isinstance(exc, OSError) and not isinstance(exc, RetrostoreError):
                hint = fileio.io_hint(exc.errno, "pack again")
                raise StoreIOError(exc.errno, f"writing the archive {out} failed: {exc.strerror or exc}"
                                              f"{f' ({exc.filename})' if exc.filename else ''}.{hint} Nothing was "
                                              f"left at {out} or beside it; the store is unchanged.") from exc
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        table.close()
    return ArtifactInfo(out, version, hashlib.sha256(raw_manifest).hexdigest(), n_files,
                        out.stat().st_size, bool(vectors))


def _epoch(stamp: str) -> int:
    try:
        return max(0, int(_dt.datetime.fromisoformat(stamp).timestamp()))
    except (TypeError, ValueError):
        return 0


def _write_committed_lmdb(root: Path, table: ChunkTable, body: dict, tomb: Tombstones, dest: Path) -> None:
    """Write the committed records of ``table`` as a fresh, compacted LMDB in ``dest``.

    Records are copied byte for byte in key order, in transactions of a fixed
    number of records, into a new environment whose map starts at a fixed size
    and doubles when full; that environment is then copied with compaction.
    The result depends only on the records, not on how the source was written
    (batch sizes, aborted writers, free pages), so equal records give an equal
    file. The content hash chain of the result is checked against the manifest.
    """
    pending = table.pending_purge(tomb.rows, body["version"])  # a compact cut short
    stage = dest.with_name(dest.name + ".stage")
    stage.mkdir()
    with fileio.lmdb_writes("the archive's copy of the LMDB records"):
        _copy_records(table, body, pending, stage, dest)
    check = ChunkTable(dest.parent, body["tokenizer"]["token_dtype"], write=False, readonly_media=True)
    try:
        chain, problems = check.content_hashes(body["version"])
        stats = check.stats()
    finally:
        check.close()
    if problems or chain != body["lmdb"]["chain"]:
        raise CorruptStoreError(
            f"{root}: the committed LMDB records do not match the manifest's content hash chain "
            f"({'; '.join(problems) or 'chain differs'}); run `retrostore verify` on the store"
        )
    for name, want in _manifest.committed_record_counts(body).items():  # (compact removed the purged ones)
        if stats[name]["entries"] != want:
            raise CorruptStoreError(
                f"{root}: {stats[name]['entries']} committed {name} records, the manifest says {want} (its ids "
                "less those purged by deletes); run `retrostore verify` on the store"
            )


def _copy_records(table: ChunkTable, body: dict, pending: list, stage: Path, dest: Path) -> None:
    """Copy the committed records into a new environment in ``stage``, then compacted into ``dest``."""
    env = lmdb.open(os.fspath(stage), subdir=True, map_size=_LMDB_MAP_BYTES, max_dbs=8, lock=False,
                    sync=False, metasync=False, readahead=False)
    try:
        with env.begin(write=True) as txn:
            dbs = {name: env.open_db(name, txn=txn) for name in (b"chunks", b"docs", b"commits")}
        batch: list[tuple[bytes, bytes]] = []
        current = None
        for name, key, value in table.committed_records(body["next_chunk_id"], body["next_doc_id"],
                                                        body["version"], pending):
            if name != current or len(batch) == _LMDB_TXN_RECORDS:
                if batch:
                    _put_batch(env, dbs[current], batch)
                batch, current = [], name
            batch.append((key, value))
        if batch:
            _put_batch(env, dbs[current], batch)
        dest.mkdir()
        env.copy(os.fspath(dest), compact=True)
    finally:
        env.close()
        shutil.rmtree(stage, ignore_errors=True)


def _put_batch(env, db, batch: list[tuple[bytes, bytes]]) -> None:
    while True:
        try:
            with env.begin(write=True) as txn:
                txn.cursor(db).putmulti(batch, append=True)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


class _HashingReader:
    def __init__(self, fh):
        self.fh = fh
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        return data


def _tarinfo(name: str, mtime: int, size: int | None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    if size is None:
        ti.type, ti.mode, ti.size = tarfile.DIRTYPE, 0o755, 0
    else:
        ti.type, ti.mode, ti.size = tarfile.REGTYPE, 0o644, size
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = mtime, 0, 0, "", ""
    return ti


def _write_archive(root: Path, path: Path, members: list, mtime: int, compressed: bool, level: int) -> int:
    """Write ``members`` (name, None | bytes | Path | manifest entry) to ``path``; returns the file count."""
    n_files = 0
    with open(path, "xb") as fh:
        sink = zstandard.ZstdCompressor(level=level).stream_writer(fh, closefd=False) if compressed else fh
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            for name, src in members:
                if src is None:
                    tf.addfile(_tarinfo(name, mtime, None))
                    continue
                n_files += 1
                if isinstance(src, bytes):
                    tf.addfile(_tarinfo(name, mtime, len(src)), io.BytesIO(src))
                    continue
                entry = src if isinstance(src, dict) else None
                file_path = _manifest.safe_path(root, entry["path"], MANIFEST) if entry else src
                try:
                    f = open(file_path, "rb")
                except FileNotFoundError:
                    if entry is None:  # this pack's own staged file
                        raise
                    raise CorruptStoreError(  # the store's fault, not the archive's (helper-16)
                        f"{root}: {entry['path']}, a file the manifest names, is missing; run `retrostore verify` "
                        "on the store (if a writer's compact removed it while packing: pack again)") from None
                with f:
                    size = os.fstat(f.fileno()).st_size
                    if entry is not None and size != entry["size"]:
                        lfs = git_lfs_pointer(file_path)
                        raise CorruptStoreError(
                            f"{entry['path']}: {size} bytes, the manifest says {entry['size']}"
                            + (f"; {lfs}" if lfs else "; run `retrostore verify` on the store")
                        )
                    reader = _HashingReader(f)
                    tf.addfile(_tarinfo(name, mtime, size), reader)
                if entry is not None and reader.sha.hexdigest() != entry["sha256"]:
                    raise CorruptStoreError(
                        f"{entry['path']}: checksum differs from the manifest's; the file is damaged or was "
                        "replaced while packing. Run `retrostore verify` on the store and pack again"
                    )
        if compressed:
            sink.flush(zstandard.FLUSH_FRAME)
            sink.close()
        fh.flush()
        os.fsync(fh.fileno())
    return n_files
