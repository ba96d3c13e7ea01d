"""``retrostore.unpack``: extract a store archive from a stranger safely.

It refuses absolute paths, ``..``, links, device files, names outside the
store layout, members larger than the limits or than the manifest declares,
data past a member's declared size, files the manifest does not reference and
a manifest naming a file outside the store; it extracts into a temporary
directory beside DEST, checks every size and checksum, runs ``Store.verify``
and only then renames the directory into place. On any failure nothing is left
behind. The archive layout is described in :mod:`retrostore.ship.pack`; see
docs/artifacts.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tarfile
from pathlib import Path

import lmdb
import zstandard

from ..errors import (CorruptStoreError, InvalidInputError, RetrostoreError, StoreExistsError, StoreIOError,
                      UnsafeArchiveError, check_int)
from ..storage import fileio
from ..storage import manifest as _manifest
from ..storage.chunktable import ChunkTable
from ..storage.fileio import git_lfs_pointer
from ..storage.layout import DATA_MDB, LMDB_DIR, MANIFEST, STORE_DIRS, TMP_PREFIX, version_path
from ..storage.lmdbfile import META_BYTES, meta_end
from ..store.store import Store
from .pack import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MAX_MEMBERS, DEFAULT_MAX_TOTAL_BYTES, ArtifactInfo

__all__ = ["unpack"]

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}\Z")
_HEADER_ALLOWANCE = 1 << 20  # bytes tarfile may read for one member's headers (pax, long names) + read-ahead
_TRAILER_MAX = 1 << 20  # zero padding accepted after the end-of-archive marker
_MANIFEST_MAX_BYTES = 64 << 20
_BLOCK = 1 << 20


class _GuardedReader:
    """A read-only stream that counts bytes, keeps the last ones seen and
    refuses to go past a moving limit (so a forged header cannot make tarfile
    buffer gigabytes)."""

    _RING = 1 << 20

    def __init__(self, raw, archive: str):
        self.raw = raw
        self.archive = archive
        self.count = 0
        self.limit = _HEADER_ALLOWANCE
        self.tail = bytearray()

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = _BLOCK
        n = min(n, self.limit - self.count)
        if n <= 0:
            raise UnsafeArchiveError(
                f"{self.archive}: an archive header or trailer runs past {self.limit:,} bytes "
                "(a forged size or padding); refusing it"
            )
        data = self.raw.read(n)
        self.count += len(data)
        self.tail += data
        if len(self.tail) > 2 * self._RING:
            del self.tail[: -self._RING]
        return data


def _check_member(m: tarfile.TarInfo, archive: str) -> str | None:
    """The member's path inside the store, or None for the root entry ``.``.

    Raises
    ------
    UnsafeArchiveError
        Absolute path, ``..``, odd characters, a name outside the store
        layout, or anything but a regular file or a directory.
    """
    name = m.name
    where = f"{archive}: member {name!r}"
    if "\x00" in name or "\\" in name:
        raise UnsafeArchiveError(f"{where} holds a NUL or backslash; refusing the archive")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"{where} has an absolute path; a store archive only holds relative paths")
    parts = name.split("/")
    while len(parts) > 1 and parts[0] == ".":
        parts = parts[1:]
    if parts == ["."]:
        if not m.isdir():
            raise UnsafeArchiveError(f"{where} is not a directory")
        return None
    if ".." in parts:
        raise UnsafeArchiveError(f"{where} contains '..' (path traversal); refusing the archive")
    kind = _member_kind(m)
    if kind:
        raise UnsafeArchiveError(
            f"{where} is {kind}; a store archive holds only regular files and directories"
        )
    for p in parts:
        if not _NAME_RE.match(p):
            raise UnsafeArchiveError(f"{where}: {p!r} is not a plain file name (letters, digits, '.', '_', '-')")
    top_dir = len(parts) == 1 and parts[0] in STORE_DIRS
    if len(parts) > 2 or (len(parts) == 2 and (parts[0] not in STORE_DIRS or m.isdir())) or (
        len(parts) == 1 and m.isdir() != top_dir
    ):
        raise UnsafeArchiveError(f"{where} is not part of a retrostore store's layout; refusing the archive")
    return "/".join(parts)


def _stdlib_filter(m: tarfile.TarInfo, tmp: Path, where: str) -> None:
    """The standard library's own ``data`` filter, on top of :func:`_check_member`, where it
    exists: Python 3.12, and 3.11.4 / 3.10.12 on (Debian 12's 3.11.2 lacks it; the checks of
    ``_check_member`` alone already refuse everything it refuses in a store's layout)."""
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is None:
        return
    try:
        data_filter(m, os.fspath(tmp))
    except tarfile.FilterError as exc:
        raise UnsafeArchiveError(f"{where}: member {m.name!r} refused: {exc}") from exc


def _member_kind(m: tarfile.TarInfo) -> str | None:
    if m.issym():
        return f"a symbolic link (to {m.linkname!r})"
    if m.islnk():
        return f"a hard link (to {m.linkname!r})"
    if m.ischr() or m.isblk():
        return "a device file"
    if m.isfifo():
        return "a FIFO"
    if m.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and not m.issparse():
        return None
    if m.isdir():
        return None
    return f"an unsupported member type ({m.type!r})"


def unpack(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
    expected_manifest_sha256: str | None = None,
) -> ArtifactInfo:
    """Extract a store archive into ``dest`` safely and verify it.

    Members are checked before any byte is written (see the module
    docstring), extracted into a temporary directory beside ``dest``, checked
    against the manifest's sizes and checksums, opened and verified with
    :meth:`Store.verify`, and only then renamed to ``dest``.

    Parameters
    ----------
    archive : path-like
        A ``.tar`` or ``.tar.zst`` written by :func:`pack` (compression is
        recognised by content, not by name).
    dest : path-like
        The store directory to create; it must not exist (or be empty).
    max_total_bytes, max_member_bytes, max_members : int
        Refuse archives that would extract more bytes in all, a larger member,
        or more members.
    expected_manifest_sha256 : str, optional
        The published sha256 of the store's ``manifest.json``; refuse the
        archive when it differs.

    Returns
    -------
    ArtifactInfo

    Raises
    ------
    UnsafeArchiveError
        Path traversal, absolute paths, links, device files, names outside the
        store layout, size limits, a member bigger than declared, a manifest
        naming a file outside the store, or a manifest sha256 that differs from
        ``expected_manifest_sha256``.
    CorruptStoreError
        Not a (complete) tar archive, a missing file, a size or checksum
        mismatch, a Git LFS pointer file in place of a store file (the message
        says so), a ``data.mdb`` holding more than the committed records (bytes
        past LMDB's last page, another database, records past the manifest's),
        or ``Store.verify`` found problems.
    FormatVersionError
        The store needs a newer retrostore (both version numbers are named).
    StoreExistsError
        ``dest`` exists and is not empty.
    InvalidInputError
        ``expected_manifest_sha256`` is not 64 hex digits; ``archive`` is a directory or missing;
        ``archive`` or ``dest`` is not a path.
    StoreIOError
        Reading the archive or writing the files failed (an OSError: ``errno.ENOSPC`` on a full
        disk, ``errno.EROFS`` on a read-only one); nothing is left behind.
    """
    if expected_manifest_sha256 is not None:  # (helper-41: a shortened digest was "not the published store")
        if not isinstance(expected_manifest_sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}",
                                                                              expected_manifest_sha256.strip()):
            raise InvalidInputError(
                f"expected_manifest_sha256={expected_manifest_sha256!r} is not a sha256: give all 64 hex digits "
                "(`sha256sum STORE/manifest.json`, or the `manifest sha256` line `retrostore pack` printed)")
    archive = fileio.check_path("archive", archive, "the .tar or .tar.zst file to unpack")
    dest = fileio.check_path("dest", dest, "the store directory to create")
    fileio.check_outside_store(dest, "dest")  # (helper-49: one unpacked in another's index/ kept its writers out)
    if archive.is_dir() or not archive.exists():  # helper-37: IsADirectoryError / FileNotFoundError from open()
        what = "is a directory" if archive.is_dir() else "does not exist"
        raise InvalidInputError(f"the archive {archive} {what}; give the .tar or .tar.zst file `retrostore pack` "
                                "wrote")
    for name, val in (("max_total_bytes", max_total_bytes), ("max_member_bytes", max_member_bytes),
                      ("max_members", max_members)):
        check_int(name, val, 1)
    if dest.is_symlink():  # helper-48: "appeared while unpacking" (a link to an empty directory), or ENOTDIR
        raise InvalidInputError(f"{dest} is a symbolic link (to {os.readlink(dest)!r}); unpack into a path that is "
                                "not a link, e.g. the link's target, or remove the link first")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise StoreExistsError(f"{dest} already exists and is not empty; unpack into a new directory")
    blocker = fileio.file_in_the_way(dest)
    if blocker is not None:  # helper-17: "[Errno 17] File exists: 'afile'", naming no fix
        raise InvalidInputError(f"{dest}: {blocker} is a file, not a directory; unpack into a path under a directory")
    try:
        return _unpack(archive, dest, max_total_bytes, max_member_bytes, max_members, expected_manifest_sha256)
    except OSError as exc:
        if isinstance(exc, RetrostoreError):
            raise
        # helper-48: a full or read-only disk raised a bare OSError naming no file and no fix
        where = f" ({exc.filename})" if exc.filename else ""
        raise StoreIOError(exc.errno, f"unpacking {archive} into {dest} failed: {exc.strerror or exc}{where}."
                                      f"{fileio.io_hint(exc.errno, 'unpack again')} Nothing was left at {dest} or "
                                      "beside it.") from exc


def _unpack(archive: Path, dest: Path, max_total_bytes: int, max_member_bytes: int, max_members: int,
            expected_manifest_sha256: str | None) -> ArtifactInfo:
    """:func:`unpack` once its arguments are checked."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fileio.remove_stale_tmp(dest.parent, f"unpack-{dest.name}")  # of an unpack killed before its rename
    tmp = dest.parent / f"{TMP_PREFIX}unpack-{dest.name}.{os.getpid()}.{secrets.token_hex(4)}"
    with open(archive, "rb") as fh:
        tmp.mkdir(mode=0o700)
        try:
            manifest_raw, body, files = _extract(fh, archive, tmp, max_total_bytes, max_member_bytes, max_members)
            digest = hashlib.sha256(manifest_raw).hexdigest()
            if expected_manifest_sha256 is not None and digest != expected_manifest_sha256.strip().lower():
                raise UnsafeArchiveError(
                    f"{archive}: manifest sha256 {digest} differs from the expected "
                    f"{expected_manifest_sha256.strip()}; this is not the published store"
                )
            _check_extracted(tmp, archive, body, manifest_raw, files)
            _check_lmdb_holds_only_the_records(tmp, archive, body)
            _verify_unpacked(tmp, archive)
            for sub in STORE_DIRS:
                fileio.fsync_dir(tmp / sub)
            tmp.chmod(0o755)
            fileio.fsync_dir(tmp)
            try:
                os.replace(tmp, dest)
            except OSError as exc:
                if dest.exists():
                    raise StoreExistsError(f"{dest} appeared while unpacking; unpack into a new directory") from exc
                raise
            fileio.fsync_dir(dest.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    vectors = not body["vectors"].get("dropped_at_pack", False)
    return ArtifactInfo(dest, int(body["version"]), digest, len(files), sum(v[0] for v in files.values()), vectors)


def _extract(fh, archive: Path, tmp: Path, max_total: int, max_member: int, max_members: int):
    """Stream the archive's members into ``tmp``; returns (manifest bytes, body, {path: (size, sha256)})."""
    where = str(archive)
    head = fh.read(4)
    fh.seek(0)
    raw = fh
    if head == _ZSTD_MAGIC:
        raw = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True, closefd=False)
    reader = _GuardedReader(raw, where)
    files: dict[str, tuple[int, str]] = {}
    seen: set[str] = set()
    manifest_raw: bytes | None = None
    body: dict | None = None
    declared: dict[str, int] = {}
    total = 0
    count = 0
    last = None
    try:
        tf = tarfile.open(fileobj=reader, mode="r|")
        while True:
            reader.limit = tf.offset + _HEADER_ALLOWANCE
            m = tf.next()
            if m is None:
                break
            count += 1
            if count > max_members:
                raise UnsafeArchiveError(f"{where}: more than {max_members:,} members; refusing the archive")
            rel = _check_member(m, where)
            _stdlib_filter(m, tmp, where)
            if rel is None:
                continue
            if rel in seen:
                raise UnsafeArchiveError(f"{where}: member {rel!r} appears twice; refusing the archive")
            seen.add(rel)
            last = (rel, m.size)
            target = tmp / rel
            if m.isdir():
                target.mkdir(mode=0o755, exist_ok=True)
                continue
            if m.size > max_member:
                raise UnsafeArchiveError(
                    f"{where}: member {rel!r} is {m.size:,} bytes, over the limit of {max_member:,} "
                    "(max_member_bytes / --max-member-bytes)"
                )
            total += m.size
            if total > max_total:
                raise UnsafeArchiveError(
                    f"{where}: the members add up to more than {max_total:,} bytes, the limit "
                    "(max_total_bytes / --max-bytes)"
                )
            if rel in declared and m.size > declared[rel]:
                raise UnsafeArchiveError(
                    f"{where}: member {rel!r} is {m.size:,} bytes, bigger than the {declared[rel]:,} bytes "
                    "the manifest declares; refusing it before writing"
                )
            if rel == MANIFEST and m.size > _MANIFEST_MAX_BYTES:
                raise UnsafeArchiveError(f"{where}: manifest.json is {m.size:,} bytes; a manifest is far smaller")
            if "/" in rel:
                (tmp / rel.split("/")[0]).mkdir(mode=0o755, exist_ok=True)
            reader.limit = m.offset_data + m.size + _HEADER_ALLOWANCE
            keep = rel == MANIFEST
            # every member sparse: a store's vectors keep their holes, and zeros padding any member (helper-53:
            # 1 GiB each before the manifest, or beyond its declared size) cost no disk before the refusal
            size, sha, kept = _copy_member(tf, m, target, keep, sparse=True,
                                           lmdb_data=where if rel == DATA_MDB else None)
            files[rel] = (size, sha)
            if keep:
                manifest_raw = kept
                body = _read_manifest(manifest_raw, where, tmp)
                declared = {e["path"]: int(e["size"]) for e in _manifest.referenced_files(body)}
                for other in seen & set(declared):
                    if files.get(other, (0,))[0] > declared[other]:
                        raise UnsafeArchiveError(
                            f"{where}: member {other!r} is {files[other][0]:,} bytes, bigger than the "
                            f"{declared[other]:,} bytes the manifest declares"
                        )
        _check_trailer(tf, reader, where, last)
    except tarfile.TarError as exc:
        raise CorruptStoreError(f"{where}: not a readable tar archive ({exc}); the file is damaged or truncated") from exc
    except zstandard.ZstdError as exc:
        raise CorruptStoreError(f"{where}: not valid zstd data ({exc}); the file is damaged or truncated") from exc
    if manifest_raw is None or body is None:
        raise CorruptStoreError(f"{where}: holds no manifest.json; it is not a retrostore store archive")
    return manifest_raw, body, files


def _copy_member(tf: tarfile.TarFile, m: tarfile.TarInfo, target: Path, keep: bool, sparse: bool,
                 lmdb_data: str | None = None):
    """Write member ``m`` to ``target`` (new, fsynced; zero pages left as holes when ``sparse``, as a
    store writes its vectors files). Returns (size, sha256, the bytes when ``keep``).

    ``lmdb_data``: the member is LMDB's ``data.mdb`` of this archive (named in messages): its size
    must be what its meta pages reference (:func:`_lmdb_head`), checked before anything is written."""
    src = tf.extractfile(m)
    kept = bytearray() if keep else None
    size = 0
    head = _lmdb_head(src, m.size, lmdb_data) if lmdb_data else b""
    with fileio.DurableWriter(target, sparse=sparse) as out:
        while size < m.size:
            block = head or src.read(min(_BLOCK, m.size - size))
            head = b""
            if not block:
                raise tarfile.ReadError(f"unexpected end of data in member {m.name!r}")
            if kept is not None:
                kept += block
            out.write(block)
            size += len(block)
    return (size, out.sha256, bytes(kept) if kept is not None else None)


#: A Git LFS pointer file is ~130 bytes (helper-53: a 1 GiB member starting like one was written out).
_LFS_POINTER_MAX = 1024


def _lmdb_head(src, size: int, archive: str) -> bytes:
    """The first bytes of a ``data.mdb`` member, once its size is found to be what its newest meta
    page references: ``pack`` writes it compact, so a member of another size is refused before a
    byte is written (helper-48: 2 GiB of zeros appended, a 328 KB .tar.zst, were written out in
    full before the refusal; with the default limits a few MB could have filled 256 GiB). A Git
    LFS pointer in its place is left to :func:`_check_extracted`, whose message says what it is.
    A meta page can name more pages than the tables use (helper-53: ``last_pg`` raised, zeros
    appended); those pages are written as holes (zeros) and refused by
    :func:`_check_lmdb_holds_only_the_records`."""
    head = src.read(min(META_BYTES, size))
    if head.startswith(b"version https://git-lfs.github.com/spec/v1") and size <= _LFS_POINTER_MAX:
        return head
    where = f"{archive}: {DATA_MDB}"
    try:
        end = meta_end(head, size)[0]
    except CorruptStoreError as exc:
        raise CorruptStoreError(f"{archive}: {exc}; refusing the archive") from None
    if size != end:
        how = ("it holds bytes no record uses, which `retrostore pack` never writes" if size > end
               else "it is truncated")
        raise CorruptStoreError(f"{where} is {size:,} bytes, and LMDB's last page ends at {end:,}: {how}; "
                                "refusing the archive")
    return head


def _read_manifest(raw: bytes, where: str, tmp: Path) -> dict:
    body = _manifest.parse_manifest(raw, f"{where}: {MANIFEST}")
    for entry in _manifest.referenced_files(body):
        try:
            _manifest.safe_path(tmp, entry["path"], f"{where}: {MANIFEST}")
        except CorruptStoreError as exc:
            raise UnsafeArchiveError(str(exc)) from exc
    return body


def _check_trailer(tf: tarfile.TarFile, reader: _GuardedReader, where: str, last) -> None:
    """After the last member only zero padding may follow: anything else is data
    past a member's declared size (or a damaged archive)."""
    pending = reader.count - tf.offset
    if pending > len(reader.tail):
        raise UnsafeArchiveError(f"{where}: cannot check the archive's end; refusing it")
    rest = bytes(reader.tail[len(reader.tail) - pending:]) if pending > 0 else b""
    reader.limit = reader.count + _TRAILER_MAX + 1
    while not any(rest):
        try:
            more = reader.read(_BLOCK)
        except UnsafeArchiveError:
            raise UnsafeArchiveError(f"{where}: more than {_TRAILER_MAX:,} bytes follow the end of the archive") from None
        if not more:
            return
        rest = more
    after = f"after member {last[0]!r} (declared {last[1]:,} bytes)" if last else "at its start"
    raise UnsafeArchiveError(
        f"{where}: data continues {after} where the next header or the end of the archive should be: "
        "a member is bigger than its header declares, or the archive is damaged; refusing it"
    )


def _check_extracted(tmp: Path, archive: Path, body: dict, manifest_raw: bytes, files: dict) -> None:
    where = str(archive)
    version_copy = version_path(Path(), body["version"]).as_posix()
    referenced = {e["path"]: e for e in _manifest.referenced_files(body)}
    allowed = set(referenced) | {MANIFEST, DATA_MDB, version_copy}
    extra = sorted(set(files) - allowed)
    if extra:
        raise UnsafeArchiveError(
            f"{where}: holds files the manifest does not reference: {', '.join(extra[:5])}"
            f"{' ...' if len(extra) > 5 else ''}; only store files are accepted (make archives with "
            "`retrostore pack`)"
        )
    problems = []
    for rel, entry in referenced.items():
        if rel not in files:
            problems.append(f"{rel}: missing from the archive (referenced by the manifest)")
            continue
        size, sha = files[rel]
        if size != entry["size"] or sha != entry["sha256"]:
            lfs = git_lfs_pointer(tmp / rel)
            if lfs:
                problems.append(f"{rel}: {lfs}")
            elif size != entry["size"]:
                problems.append(f"{rel}: {size} bytes, the manifest says {entry['size']}")
            else:
                problems.append(f"{rel}: checksum mismatch (manifest {entry['sha256'][:16]}..., file {sha[:16]}...)")
    if DATA_MDB not in files:
        problems.append(f"{DATA_MDB}: missing from the archive")
    if version_copy in files and files[version_copy][1] != hashlib.sha256(manifest_raw).hexdigest():
        problems.append(f"{version_copy}: differs from manifest.json")
    if problems:
        raise CorruptStoreError(f"{where}: " + "; ".join(problems))
    for sub in STORE_DIRS:
        (tmp / sub).mkdir(mode=0o755, exist_ok=True)


def _check_lmdb_holds_only_the_records(tmp: Path, archive: Path, body: dict) -> None:
    """The archive's ``data.mdb`` is what :func:`pack` writes: its committed records and nothing else.

    The manifest names no size or checksum for ``data.mdb`` (its records are checked one by one by
    ``verify``, and chained into ``lmdb.chain``); helper-48 appended 2 GiB to it (a 328 KB
    ``.tar.zst``), added a named database, and a record past the high-water mark, and each unpacked
    "verified intact". Refused: bytes past LMDB's last page (before writing: :func:`_lmdb_head`),
    databases other than the store's three,
    records past the manifest's ids or versions, and entry counts other than the manifest's.
    """
    where = f"{archive}: {DATA_MDB}"
    try:
        table = ChunkTable(tmp, body["tokenizer"]["token_dtype"], write=False, readonly_media=True)
    except CorruptStoreError as exc:  # (helper-53: "chunks.lmdb: its tables cannot be opened", no archive named)
        raise CorruptStoreError(f"{archive}: {exc}; refusing the archive") from None
    try:
        with table.read() as txn:
            names = sorted(k.decode("utf-8", "replace") for k, _ in txn.cursor())
            pages = [table.env.stat()] + [txn.stat(db) for db in table.tables]
        used = 2 + sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"] for s in pages)  # + 2 meta
        last = table.env.info()["last_pgno"] + 1
        stats = table.stats()
    except lmdb.Error as exc:
        raise CorruptStoreError(f"{where}: LMDB cannot read it ({exc})") from None
    finally:
        table.close()
    if names != ["chunks", "commits", "docs"]:
        raise CorruptStoreError(f"{where} holds the databases {names}, not the store's chunks, commits and docs; "
                                "refusing the archive")
    if used != last:
        raise CorruptStoreError(f"{where} has {last:,} pages and its tables use {used:,}: pages no table reaches, "
                                "which `retrostore pack` (a compacted copy) never writes; refusing the archive")
    want = _manifest.committed_record_counts(body)
    for name, ids_end in (("chunks", body["next_chunk_id"]), ("docs", body["next_doc_id"]),
                          ("commits", body["version"] + 1)):
        count, last = stats[name]["entries"], stats[name]["last"]
        if (last is not None and last >= ids_end) or (name in want and count != want[name]):
            raise CorruptStoreError(
                f"{where}: its {name} table holds {count:,} records up to id {last}; the manifest has "
                f"{f'{want[name]:,} records, ' if name in want else ''}ids below {ids_end:,}: records past the "
                "committed ones, which `retrostore pack` never writes; refusing the archive")


def _verify_unpacked(tmp: Path, archive: Path) -> None:
    """Open the extracted store, run verify, and leave no lock file behind."""
    lock = tmp / LMDB_DIR / "lock.mdb"  # not in the archive (refused there), created by this open
    try:
        with Store(tmp, mode="r") as st:
            problems = st.verify()
    except CorruptStoreError as exc:  # (a file the open stopped at: name the archive too)
        raise CorruptStoreError(f"{archive}: the unpacked store does not open: {exc}") from None
    finally:
        lock.unlink(missing_ok=True)
    if problems:
        raise CorruptStoreError(f"{archive}: the unpacked store does not verify: " + "; ".join(problems))
