"""A cheap structural check of LMDB's ``data.mdb`` before LMDB maps it, and
its lock file allocated before LMDB maps that.

LMDB trusts its file: a truncated file makes the first access past its end
crash the process with SIGBUS, and a damaged root page makes ``open_db`` read
outside the page. :func:`check_lmdb_file` reads the meta pages and root pages
itself first. Deeper pages are checked by ``verify``, in a child process
(:mod:`.lmdbscan`).

LMDB also creates ``lock.mdb`` (its reader table) at its first open by
extending an empty file and mapping it: on a full disk (tmpfs) the first
write through that mapping kills the process with SIGBUS (helper-37: every
open, ``inspect`` and ``verify`` of a copied store). :func:`reserve_lock_file`
writes the file whole first, so a full disk is a :class:`StoreIOError`.
"""

from __future__ import annotations

import errno
import os
import secrets
import struct
from pathlib import Path

from ..errors import CorruptStoreError, StoreIOError
from .fileio import git_lfs_pointer, regular_file, unreadable
from .layout import DATA_MDB

__all__ = ["check_lmdb_file", "meta_end", "reserve_lock_file", "LOCK_FILE_BYTES", "META_BYTES"]

#: Bytes written into a new ``lock.mdb``: LMDB's reader table for its default 126 readers
#: is 8 KiB on x86-64 (64-byte slots); twice that leaves room for larger cache lines.
#: LMDB takes an existing lock file at its size (254 reader slots here).
LOCK_FILE_BYTES = 16384

#: Bytes that hold both meta pages at LMDB's largest page size.
META_BYTES = 2 * 65536

_MAGIC = 0xBEEFC0DE
_P_BRANCH, _P_LEAF, _P_META = 0x01, 0x02, 0x08
_F_BIGDATA = 0x01
_P_INVALID = (1 << 64) - 1


def check_lmdb_file(path: Path) -> None:
    """Cheap structural check of ``data.mdb`` before LMDB maps it.

    Reads the two meta pages (LMDB 0.9's ``MDB_meta``: magic ``0xBEEFC0DE``,
    page size, the free and main B-tree roots, last page number, transaction
    id), checks that the file is at least as long as the newest meta page
    says (mapping a truncated file crashes the process with SIGBUS on first
    access) and that the root pages LMDB reads on open keep every node inside
    the page (a damaged root page made ``open_db`` crash in the corruption
    tests). Pages deeper in the trees are checked by ``verify``, in a child
    process.

    Raises
    ------
    CorruptStoreError
        Naming the file, when a meta or root page is damaged or the file is
        truncated.
    """
    name = DATA_MDB
    if regular_file(path, name) is None:
        raise CorruptStoreError(f"{name}: the LMDB data file is missing")
    try:
        # Meta pages first, size second: a writer extends the file before it
        # writes the meta page naming the new pages, so in this order a
        # concurrent commit can never look like a truncation.
        with open(path, "rb") as fh:
            head = fh.read(META_BYTES)
            size = os.fstat(fh.fileno()).st_size
            if head.startswith(b"version https://git-lfs.github.com/spec/v1"):
                raise CorruptStoreError(f"{name}: {git_lfs_pointer(path) or 'it is a Git LFS pointer file'}")
            need, psize, free_root, main_root = meta_end(head, size)
            last_pg = need // psize - 1
            if size < need:
                raise CorruptStoreError(
                    f"{name}: truncated to {size} bytes but its meta page references {need} bytes; the file is damaged"
                )
            for what, root in (("free-list", free_root), ("main", main_root)):
                if root == _P_INVALID:
                    continue
                if not 2 <= root <= last_pg:
                    raise CorruptStoreError(f"{name}: the {what} B-tree root is page {root}, outside pages 2..{last_pg}")
                fh.seek(root * psize)
                problem = _page_problem(fh.read(psize), root, psize, last_pg)
                if problem:
                    raise CorruptStoreError(f"{name}: the {what} B-tree root page {root} is damaged ({problem})")
    except FileNotFoundError:
        raise CorruptStoreError(f"{name}: the LMDB data file is missing") from None
    except OSError as exc:
        raise unreadable(name, exc) from exc


def meta_end(head: bytes, size: int) -> tuple[int, int, int, int]:
    """What the newest of LMDB's two meta pages says, from the file's first bytes.

    Parameters
    ----------
    head : bytes
        The file's first :data:`META_BYTES` bytes (fewer when the file is shorter).
    size : int
        The file's size in bytes (named in messages).

    Returns
    -------
    (end, psize, free_root, main_root)
        ``end``: the bytes the newest meta page references, ``(last page + 1) * psize``: a file
        written by LMDB (or ``retrostore pack``) is exactly that long.

    Raises
    ------
    CorruptStoreError
        A meta page is damaged or missing.
    """
    name = DATA_MDB
    if len(head) < 160:
        raise CorruptStoreError(f"{name}: truncated to {size} bytes; an LMDB data file has at least 2 pages")
    psize = struct.unpack_from("<I", head, 40)[0]
    if psize < 512 or psize > 65536 or psize & (psize - 1):
        raise CorruptStoreError(f"{name}: not an LMDB data file (bad meta page: page size {psize})")
    metas = []
    for off in (0, psize):
        if off + 152 > len(head):
            raise CorruptStoreError(f"{name}: truncated to {size} bytes; the second meta page is missing")
        flags = struct.unpack_from("<H", head, off + 10)[0]
        magic, version = struct.unpack_from("<II", head, off + 16)
        if not flags & _P_META or magic != _MAGIC or version != 1:
            raise CorruptStoreError(
                f"{name}: LMDB meta page {off // psize} is damaged (magic {magic:#x}, version {version})")
        free_root, main_root = struct.unpack_from("<Q", head, off + 80)[0], struct.unpack_from("<Q", head, off + 128)[0]
        last_pg, txnid = struct.unpack_from("<QQ", head, off + 136)
        metas.append((txnid, last_pg, free_root, main_root))
    # LMDB's choice (mdb_env_pick_meta): meta page 1 only when its transaction id is larger
    _txn, last_pg, free_root, main_root = metas[1] if metas[1][0] > metas[0][0] else metas[0]
    return (last_pg + 1) * psize, psize, free_root, main_root


def _page_problem(page: bytes, pgno: int, psize: int, last_pg: int) -> str | None:
    """Why an LMDB branch or leaf page would make LMDB read outside it, or None."""
    if len(page) != psize:
        return "short read"
    got, _pad, flags, lower, upper = struct.unpack_from("<QHHHH", page, 0)
    if got != pgno:
        return f"it says it is page {got}"
    if not flags & (_P_BRANCH | _P_LEAF) or flags & _P_META:
        return f"flags {flags:#x}"
    if not 16 <= lower <= upper <= psize or lower % 2:
        return f"bounds lower={lower} upper={upper}"
    for i in range((lower - 16) // 2):
        ptr = struct.unpack_from("<H", page, 16 + 2 * i)[0]
        if not upper <= ptr <= psize - 8:
            return f"node {i} at offset {ptr}"
        lo, hi, nflags, ksize = struct.unpack_from("<HHHH", page, ptr)
        end = ptr + 8 + ksize
        if flags & _P_BRANCH:
            child = lo | hi << 16 | nflags << 32
            if not 2 <= child <= last_pg:
                return f"node {i} points to page {child}"
        elif nflags & _F_BIGDATA:
            end += 8
        else:
            end += lo | hi << 16
        if end > psize:
            return f"node {i} overruns the page"
    return None


def reserve_lock_file(lmdb_dir: Path) -> None:
    """Create ``lmdb_dir/lock.mdb`` with its blocks allocated, if it does not exist.

    The file is written under a temporary name and hard-linked into place, so
    an LMDB that opened the file meanwhile (and initialised its header) is
    never written over. Where that cannot be done (read-only media, no
    permission, a file system without hard links such as some FUSE mounts)
    nothing is reserved and LMDB creates the file itself, as before.

    Raises
    ------
    StoreIOError
        ``errno.ENOSPC`` / ``EDQUOT``: the disk is full; nothing was changed.
    """
    lock = Path(lmdb_dir) / "lock.mdb"
    if lock.exists():
        return
    # A name of its own (O_EXCL, never O_TRUNC): once linked, the name and lock.mdb are one file.
    tmp = Path(lmdb_dir) / f".lock.mdb.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(bytes(LOCK_FILE_BYTES))
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.link(tmp, lock)
    except FileExistsError:
        pass  # another process created it first
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _full(lock, exc) from exc
        # no permission, read-only media, no hard links: LMDB creates it (and says what fails)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _full(lock: Path, exc: OSError) -> StoreIOError:
    code = exc.errno or errno.EIO
    why = "the disk is full" if code in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
    return StoreIOError(code, f"creating {lock.parent.name}/{lock.name} (LMDB's reader table, {LOCK_FILE_BYTES:,} "
                              f"bytes) failed: {why}; free space on the disk holding {lock.parent.parent} and try "
                              "again (nothing of the store was changed)")
