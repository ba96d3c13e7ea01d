"""A cheap structural check of LMDB's ``data.mdb`` before LMDB maps it.

LMDB trusts its file: a truncated file makes the first access past its end
crash the process with SIGBUS, and a damaged root page makes ``open_db`` read
outside the page. :func:`check_lmdb_file` reads the meta pages and root pages
itself first. Deeper pages are checked by ``verify``, in a child process
(:mod:`.lmdbscan`).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from ..errors import CorruptStoreError
from .fileio import git_lfs_pointer, regular_file, unreadable
from .layout import DATA_MDB

__all__ = ["check_lmdb_file"]

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
            head = fh.read(2 * 65536)
            size = os.fstat(fh.fileno()).st_size
            if head.startswith(b"version https://git-lfs.github.com/spec/v1"):
                raise CorruptStoreError(f"{name}: {git_lfs_pointer(path) or 'it is a Git LFS pointer file'}")
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
            _txn, last_pg, free_root, main_root = max(metas)
            need = (last_pg + 1) * psize
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
