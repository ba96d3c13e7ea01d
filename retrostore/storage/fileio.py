"""Durable file I/O for the commit path: atomic writes, fsync of files and
directories, checksums and the writer lock.

Every write, fsync and rename on the commit path goes through the small
functions here (``_write``, ``_fsync``, ``_rename``), so that the fault-injection
tests can make each one fail in turn (ENOSPC, EIO) without touching the rest
of the interpreter.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import queue
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import lmdb
import numpy as np

from ..errors import CommitError, CorruptStoreError, InvalidInputError, StoreIOError, WriterLockedError
from .layout import LMDB_DIR, MANIFEST, TMP_PREFIX

__all__ = [
    "write_durable",
    "DurableWriter",
    "atomic_write",
    "fsync_dir",
    "sha256_file",
    "WriterLock",
    "remove_stale_tmp",
    "io_hint",
    "sha256_cached",
    "readonly_media",
    "git_lfs_pointer",
    "lmdb_writes",
    "regular_file",
    "writable_dir",
    "check_output_file",
]

_BLOCK = 1 << 20  # 1 MiB per write(2) / read(2) call
#: Blocks written but not yet hashed, at most, when a DurableWriter hashes aside (256 MiB; a
#: block's buffer can be larger, as a block is a view of what was written).
_ASIDE_BLOCKS = 256


def _write(fd: int, data: memoryview) -> int:
    return os.write(fd, data)


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _skip(fd: int, n: int) -> None:
    os.lseek(fd, n, os.SEEK_CUR)


def _truncate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)


#: The unit of a sparse DurableWriter's holes: a file system block of the usual size.
_PAGE = 4096


def _rename(src: str, dst: str) -> None:
    os.replace(src, dst)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def unreadable(rel: str, exc: OSError) -> CorruptStoreError:
    """The error for a store file the OS refuses to read: names the file and why, and for a
    permission the fix (helper-33: verify, open and serve ended in a bare PermissionError traceback)."""
    fix = ("; give the user running this read access to the store's files (e.g. chmod -R a+rX STORE)"
           if isinstance(exc, PermissionError) else "")
    return CorruptStoreError(f"{rel}: cannot be read ({exc.strerror or exc}){fix}")


def regular_file(path: str | os.PathLike, rel: str) -> os.stat_result | None:
    """``stat`` of a store file, None when it does not exist; checked before anything opens it
    (opening a FIFO blocks, a directory fails with a bare IsADirectoryError).

    Raises
    ------
    CorruptStoreError
        ``path`` exists and is not a regular file (a directory, a FIFO, a device...).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise unreadable(rel, exc) from exc
    if not stat.S_ISREG(st.st_mode):
        raise CorruptStoreError(f"{rel}: is {_kind(st.st_mode)}, not a regular file; the store is damaged "
                                "(restore the file from a copy of the store)")
    return st


def sync_lmdb(env) -> None:
    """Force an LMDB environment's data to disk (``mdb_env_sync(force=1)``).

    Raises
    ------
    OSError
        With the errno LMDB reported (ENOSPC, EIO, ...).
    """
    try:
        env.sync(True)
    except lmdb.Error as exc:
        raise OSError(getattr(exc, "errno", None) or 5, f"LMDB sync failed: {exc}") from exc


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames and new entries in it are durable.

    Raises
    ------
    OSError
        From ``open(2)`` or ``fsync(2)``.
    """
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


class DurableWriter:
    """A new file written in order, hashed while written and fsynced at the end.

    Small writes are gathered into blocks of ``_BLOCK`` bytes, so a producer
    that pushes many small pieces (``faiss.write_index`` through a
    ``PyCallbackIOWriter``) makes few ``write(2)`` calls. As a context manager:
    a clean exit flushes and fsyncs (its OSError also removes the file); an
    exception removes the partial file.

    Parameters
    ----------
    path : path-like
        File to create; it must not exist.
    feed : callable, optional
        Also given each piece of the content, in order, where the sha256 is
        updated (e.g. a block checksum stream).
    digest_aside : bool, default False
        Hash (and ``feed``) on a second thread, while this one writes and
        fsyncs: for large files, where hashing (~1.5 GB/s) and fsync (~0.9 GB/s
        here) would otherwise add up (614 MB of raw vectors: 1.47 -> ~0.9 s).
    sparse : bool, default False
        Leave the content's zero-filled pages (4 KiB, aligned in the file) as
        holes, which take no disk blocks on file systems that support them
        (ext4, XFS, btrfs, tmpfs; elsewhere the file system writes the zeros).
        The bytes read back, the size and the sha256 are the same: for raw
        vectors files, whose rows of purged chunks ``compact`` zeroes.

    Attributes
    ----------
    size : int
        Bytes written so far.
    sha256 : str
        Hex digest of the content, set at the clean exit.

    Raises
    ------
    OSError
        From ``open``, ``write`` or ``fsync`` (ENOSPC, EIO, ...).
    """

    def __init__(self, path: str | os.PathLike, *, feed: Callable[[memoryview], None] | None = None,
                 digest_aside: bool = False, sparse: bool = False) -> None:
        self.path = os.fspath(path)
        self.size = 0
        self._sparse = sparse
        self._hole_at_end = False  # the content so far ends in a hole: the size is set at the end
        self.sha256 = ""
        self._digest = hashlib.sha256()
        self._feed = feed
        self._pending = bytearray()
        # The digest thread starts with the first full block, inside the ``with`` block, so that
        # __exit__ always stops it. No pure-Python lock between the threads (a Ctrl-C inside
        # queue.Queue's lock left it held, and the cleanup's put() waited for ever): a C
        # SimpleQueue, and byte counters each written by one thread for the bound.
        self._aside = digest_aside
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self._queued = 0  # bytes handed to the digest thread (written by this thread)
        self._hashed = 0  # bytes it is done with (written by the digest thread)
        self._drop = False  # the write failed: the digest thread skips what is left
        self._aside_error: BaseException | None = None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def _digest_piece(self, view: memoryview) -> None:
        self._digest.update(view)
        if self._feed is not None:
            self._feed(view)

    def _digest_loop(self) -> None:
        assert self._queue is not None
        while (view := self._queue.get()) is not None:
            if self._aside_error is None and not self._drop:
                try:
                    self._digest_piece(view)
                except BaseException as exc:  # reported by __exit__
                    self._aside_error = exc
            self._hashed += len(view)

    def _hand_aside(self, view: memoryview) -> None:
        """Queue ``view`` for the digest thread, in blocks; wait while it is more than
        :data:`_ASIDE_BLOCKS` blocks behind (views, not copies: they hold their buffers)."""
        if self._thread is None:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._digest_loop, name="retrostore-digest", daemon=True)
            self._thread.start()
        assert self._queue is not None
        for at in range(0, len(view), _BLOCK):
            piece = view[at : at + _BLOCK]
            while self._queued - self._hashed > _ASIDE_BLOCKS * _BLOCK and self._thread.is_alive():
                time.sleep(0.0005)
            self._queue.put(piece)
            self._queued += len(piece)

    def _stop_digest(self, drop: bool) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._drop = self._drop or drop
            assert self._queue is not None
            self._queue.put(None)
            self._thread.join()

    def write(self, part: bytes | memoryview) -> None:
        """Append ``part`` (any bytes-like object)."""
        view = memoryview(part).cast("B")
        if len(view) < _BLOCK:
            self._pending += view
            if len(self._pending) >= _BLOCK:
                self._flush()
            return
        self._flush()
        self._put(view)

    def _flush(self) -> None:
        if self._pending:
            self._put(memoryview(self._pending))
            self._pending = bytearray()

    def _put(self, view: memoryview) -> None:
        # A file of less than one block is hashed here: a thread would cost more than it saves.
        if self._aside and (self._thread is not None or len(view) >= _BLOCK):
            self._hand_aside(view)
        else:
            self._digest_piece(view)
        if self._sparse:
            self._put_sparse(view)
            return
        self._put_dense(view)

    def _put_dense(self, view: memoryview) -> None:
        if len(view):
            self._hole_at_end = False
        while len(view):
            n = _write(self._fd, view[:_BLOCK])
            view = view[n:]
            self.size += n

    def _put_sparse(self, view: memoryview) -> None:
        """Write ``view``, skipping its whole zero pages (aligned to the file's offsets)."""
        for at in range(0, len(view), _BLOCK):
            piece = view[at : at + _BLOCK]
            head = min(len(piece), -self.size % _PAGE)  # bytes before the next page boundary
            pages = (len(piece) - head) // _PAGE
            if not pages:
                self._put_dense(piece)
                continue
            body = np.frombuffer(piece[head : head + pages * _PAGE], np.uint8).reshape(pages, _PAGE)
            zero = ~body.any(axis=1)
            if not zero.any():
                self._put_dense(piece)
                continue
            self._put_dense(piece[:head])
            # runs of pages alike: (start, end) page numbers where zero/non-zero changes
            edges = np.flatnonzero(np.diff(zero.astype(np.int8))) + 1
            for lo, hi in zip(np.r_[0, edges], np.r_[edges, pages]):
                run = piece[head + int(lo) * _PAGE : head + int(hi) * _PAGE]
                if zero[lo]:
                    _skip(self._fd, len(run))
                    self.size += len(run)
                    self._hole_at_end = True
                else:
                    self._put_dense(run)
            self._put_dense(piece[head + pages * _PAGE :])

    def __enter__(self) -> "DurableWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._flush()
                if self._queue is not None:
                    self._queue.put(None)  # the digest thread finishes while the file is fsynced
                if self._hole_at_end:  # a hole past the last byte written: the file's size says it
                    _truncate(self._fd, self.size)
                _fsync(self._fd)
                if self._thread is not None:
                    self._thread.join()
                    if self._aside_error is not None:
                        raise self._aside_error
                self.sha256 = self._digest.hexdigest()
        except BaseException:
            exc_type = OSError
            raise
        finally:
            self._stop_digest(drop=exc_type is not None)
            os.close(self._fd)
            if exc_type is not None:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass


def write_durable(path: str | os.PathLike, parts: Iterable[bytes | memoryview]) -> tuple[int, str]:
    """Write ``parts`` to a new file ``path`` and fsync it (not its directory).

    Parameters
    ----------
    path : path-like
        File to create; it must not exist.
    parts : iterable of bytes-like
        The content, in order.

    Returns
    -------
    size_bytes : int
    sha256 : str
        Hex digest of the content, computed while writing.

    Raises
    ------
    OSError
        From ``open``, ``write`` or ``fsync`` (ENOSPC, EIO, ...); the partial
        file is removed.
    """
    with DurableWriter(path) as out:
        for part in parts:
            out.write(part)
    return out.size, out.sha256


def atomic_write(path: str | os.PathLike, parts: Iterable[bytes | memoryview]) -> tuple[int, str]:
    """Atomically put a file in place: temporary file, fsync, rename, fsync dir.

    After a crash at any instant ``path`` holds either its old content or the
    new content, never a mix.

    Returns
    -------
    size_bytes : int
    sha256 : str

    Raises
    ------
    OSError
        From any step; the temporary file is removed and ``path`` is unchanged.
    """
    tmp = temporary_name(path)
    size, sha = write_durable(tmp, parts)
    put_in_place(tmp, path)
    return size, sha


def temporary_name(path: str | os.PathLike) -> Path:
    """A temporary file name beside ``path`` (``TMP_PREFIX``, pid, clock), for :func:`put_in_place`."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{time.monotonic_ns()}")


def put_in_place(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the durable file ``tmp`` to ``path`` and fsync the directory (the second half
    of :func:`atomic_write`, for a file written some other way, e.g. an index streamed by
    :func:`retrostore.storage.segments.write_index`). On failure ``tmp`` is removed."""
    path = Path(path)
    try:
        _rename(os.fspath(tmp), os.fspath(path))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def sha256_file(path: str | os.PathLike) -> tuple[int, str]:
    """Size in bytes and sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while True:
            block = fh.read(_BLOCK)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


_sha_cache: dict[tuple, str] = {}
_sha_lock = threading.Lock()


def sha256_cached(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, hashed once per process per file identity and
    version (resolved path, device, inode, size, mtime_ns): for immutable files
    (the pinned model, a store's raw vectors) checked again on every use."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _sha_lock:
        if key not in _sha_cache:
            _sha_cache[key] = sha256_file(path)[1]
        return _sha_cache[key]


_IO_ERRNOS = (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG)


def _errno_of(exc: Exception) -> int | None:
    """An OSError's errno; for an ``lmdb.Error``, which names it only in its message
    ("mdb_txn_commit: Input/output error"), the I/O errno that message ends with."""
    code = getattr(exc, "errno", None)
    if code is None:
        code = next((c for c in _IO_ERRNOS if str(exc).endswith(os.strerror(c))), None)
    return code


def io_hint(code: int | None, again: str = "try again") -> str:
    """What to do about a failed write with errno ``code``, as a sentence (empty for other errnos):
    the one wording of the store's I/O errors (``again``: "commit again", "pack again", ...)."""
    return {errno.ENOSPC: f" The disk is full: free space and {again}.",
            errno.EDQUOT: f" The disk quota is used up: free space and {again}.",
            errno.EIO: " The device reported an I/O error (LMDB also reports a short write on a nearly full disk "
                       f"so): check the free space and the device, then {again}."}.get(code, "")


@contextlib.contextmanager
def lmdb_writes(what: str):
    """Turn LMDB's write errors of the I/O kind (``lmdb.DiskError`` on a full disk, a panic after
    a failed write, an ``lmdb.Error`` with an I/O errno) into :class:`StoreIOError` carrying the
    errno and naming ``what`` was being written; other LMDB errors pass through."""
    try:
        yield
    except lmdb.Error as exc:
        code = _errno_of(exc)
        if not isinstance(exc, (lmdb.DiskError, lmdb.PanicError)) and code not in _IO_ERRNOS:
            raise
        code = code if code in _IO_ERRNOS else (errno.ENOSPC if isinstance(exc, lmdb.DiskError) else errno.EIO)
        hint = io_hint(code)
        raise StoreIOError(code, f"writing {what} failed: {' '.join(str(exc).split())}.{hint} What was "
                                 "committed is intact.") from exc


def commit_error(exc: Exception, what: str) -> CommitError:
    """Wrap an OSError from the commit path in a :class:`CommitError`."""
    code = getattr(exc, "errno", None)
    hint = io_hint(code, "commit again")
    msg = (f"commit failed while {what}: {getattr(exc, 'strerror', None) or exc}.{hint} "
           "The previous version is intact; the appended data is kept and a later "
           "commit() retries it.")
    return CommitError(code, msg) if code is not None else CommitError(msg)


def maintenance_error(exc: Exception, what: str, before: int, after: int) -> StoreIOError:
    """A :class:`StoreIOError` for an OSError or ``lmdb.Error`` that stopped a maintenance
    version (``what``: reindex, compact), from version ``before``; ``after`` is the version
    the handle serves now (another when the new manifest was published before the failure)."""
    code = _errno_of(exc) or errno.EIO
    detail = " ".join(str(getattr(exc, "strerror", None) or exc).split()).rstrip(". ")
    name = getattr(exc, "filename", None)
    where = f" ({name})" if name else ""
    hint = io_hint(code, "run it again")
    if after == before:
        state = f" The store is unchanged: version {before} is intact and the files written were removed."
    else:
        state = (f" Version {after} was published before the failure and is served; the next writer finishes "
                 "its clean-up.")
    return StoreIOError(code, f"{what} failed: {detail}{where}.{hint}{state}")


class WriterLock:
    """The one-writer lock: ``flock(LOCK_EX)`` on the store's ``LOCK`` file.

    A second writer, in another process or in this one (``flock`` locks belong
    to the open file description), fails at once with
    :class:`~retrostore.errors.WriterLockedError`, or waits up to ``timeout_s``.
    """

    def __init__(self, path: str | os.PathLike, timeout_s: float | None = None):
        self.path = os.fspath(path)
        self._fd: int | None = None
        self._pid = os.getpid()
        regular_file(self.path, os.path.basename(self.path))
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise CorruptStoreError(f"{os.path.basename(self.path)}: the writer lock file cannot be opened "
                                    f"({exc.strerror or exc}); remove it if no writer runs") from exc
        deadline = None if not timeout_s else time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is None or time.monotonic() >= deadline:
                    os.close(fd)
                    waited = f" after waiting {timeout_s:g} s" if timeout_s else ""
                    raise WriterLockedError(
                        errno.EWOULDBLOCK,
                        f"another writer holds {self.path}{waited}; only one writer may "
                        "open a store with mode='a' at a time. Close the other writer, "
                        "open with mode='r' to read, or pass timeout_s=... to wait.",
                    ) from None
                time.sleep(0.05)
        self._fd = fd

    def release(self) -> None:
        """Release the lock (idempotent). In a forked child it does nothing:
        the lock belongs to the parent's open file description."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.getpid() != self._pid:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def remove_stale_tmp(parent: Path, stem: str) -> int:
    """Remove ``parent/.tmp-{stem}.{pid}.{hex}`` directories and files whose process is gone (a
    create, unpack or pack killed before its rename); returns how many. Another live process's
    are kept, and so are those of another stem that starts with this one and a dot (helper-48: an
    unpack into ``wiki`` read ``.tmp-unpack-wiki.20241201.<pid>.<hex>``, a running unpack's into
    ``wiki.20241201``, as process 20241201's, and deleted it)."""
    removed = 0
    for p in parent.glob(f"{TMP_PREFIX}{stem}.*.*"):
        rest = p.name[len(TMP_PREFIX) + len(stem) + 1 :].split(".")
        if len(rest) != 2 or not rest[0].isdigit() or not rest[1].isalnum() or int(rest[0]) == os.getpid():
            continue
        pid = rest[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
        except OSError:
            pass
    return removed


def writable_dir(parent: str | os.PathLike, what: str) -> None:
    """Check that files can be created in ``parent`` (a probe file, removed at once) before any work
    is done for ``what`` (helper-42: an output in a read-only directory failed after the work, as a
    "writer lock file" CorruptStoreError or a raw PermissionError).

    Raises
    ------
    InvalidInputError
        No file can be created there (permissions, a read-only or full file system).
    """
    try:
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "probe-", dir=parent)
    except OSError as exc:
        raise InvalidInputError(f"{what}: no file can be created in {os.fspath(parent)!r} ({exc.strerror or exc}); "
                                "choose a writable directory") from None
    os.close(fd)
    os.unlink(probe)


def check_path(name: str, value: object, what: str) -> Path:
    """``value`` as a Path, refusing what is not a non-empty str or os.PathLike of str (helper-48: None,
    5 or bytes made pack and unpack raise a bare TypeError); ``what`` says what the path names.

    Raises
    ------
    InvalidInputError
        Not a non-empty str or os.PathLike naming a str path.
    """
    if (not isinstance(value, (str, os.PathLike)) or not isinstance(os.fspath(value), str) or not os.fspath(value)
            or "\0" in os.fspath(value)):
        raise InvalidInputError(f"{name}={value!r} must be a non-empty str or os.PathLike naming {what} "
                                "(without NUL characters)")
    return Path(value)


def file_in_the_way(path: Path) -> Path | None:
    """The first existing parent of ``path`` that is not a directory (so ``path`` cannot be made), or None."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def check_outside_store(path: Path, name: str) -> None:
    """Refuse an output path inside a store's directory (a directory holding ``manifest.json`` and
    ``chunks.lmdb/``), symbolic links followed: a commit or compact deletes the files of ``index/``
    and ``vectors/`` that its manifest does not name, and every ``.tmp-*`` file (helper-48: a
    ``pack`` archive and ``neighbors`` files written into ``index/`` and ``vectors/`` were deleted
    by the next commit, without a word; helper-49: through a symbolic link too, a pack into the
    store's root lost its temporary file to a commit, a store unpacked or created inside ``index/``
    kept every writer out).

    Raises
    ------
    InvalidInputError
        ``path`` is inside a store's directory.
    """
    full = Path(os.path.realpath(path))
    for top in full.parents:
        if (top / MANIFEST).is_file() and (top / LMDB_DIR).is_dir():
            raise InvalidInputError(f"{name}={str(path)!r} is inside the store {str(top)!r}, whose directory the store "
                                    "manages: a commit or compact deletes files there that its manifest does not "
                                    f"name; write it outside the store, e.g. in {str(top.parent)!r}")


def check_output_file(out: object, name: str = "out", suffix: str = ".npy") -> Path:
    """``out`` checked as a file to write: a path ending in ``suffix``, not a directory, in an existing
    directory where files can be created (:func:`writable_dir`). Returns it as a Path.

    Raises
    ------
    InvalidInputError
        Any of these does not hold (the message names the path and the fix).
    """
    ending = f" ending in {suffix}" if suffix else ""
    path = check_path(name, out, f"a file to write{ending}")
    text = os.fspath(out)
    if not text.endswith(suffix):
        raise InvalidInputError(f"{name}={out!r} must be a path{ending}")
    if text.endswith(("/", os.sep)) or path.is_dir():  # (Path() drops a trailing slash: 'newdir/' wrote 'newdir')
        raise InvalidInputError(f"{name}={text!r} is a directory; give a file name{ending}")
    if not path.parent.is_dir():
        raise InvalidInputError(f"{name}={str(path)!r}: the directory {str(path.parent)!r} does not exist; "
                                "create it first")
    check_outside_store(path, name)
    writable_dir(path.parent, f"{name}={str(path)!r}")
    return path


def readonly_media(root: Path) -> bool:
    """True when the store directory cannot or must not be written.

    Read-only file systems (``ST_RDONLY``), directories this user cannot
    write, and directories with no write bit at all (``chmod -R a-w``, which
    root could otherwise ignore) are all treated as read-only media.
    """
    try:
        if os.statvfs(root).f_flag & os.ST_RDONLY:
            return True
        mode = os.stat(root).st_mode
    except OSError:
        return False
    return not os.access(root, os.W_OK) or not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


_LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"
_LFS_MAX_BYTES = 1024  # a Git LFS pointer file is ~130 bytes; the spec caps it at 1024


def git_lfs_pointer(path: str | os.PathLike) -> str | None:
    """Describe ``path`` if it is a Git LFS pointer file, else None.

    A pointer is the small text file Git leaves in place of a large file when
    the repository was cloned without Git LFS (``version
    https://git-lfs.github.com/spec/v1`` / ``oid sha256:...`` / ``size N``).
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a FIFO (it would block)
            return None
        with open(path, "rb") as fh:
            head = fh.read(_LFS_MAX_BYTES + 1)
    except OSError:
        return None
    if len(head) > _LFS_MAX_BYTES or not head.startswith(_LFS_MAGIC):
        return None
    fields = dict(
        line.split(" ", 1) for line in head.decode("utf-8", "replace").splitlines() if " " in line
    )
    what = ""
    if fields.get("size", "").strip().isdigit():
        what = f" to a {int(fields['size']):,}-byte object"
    oid = fields.get("oid", "").strip()
    if oid:
        what += f" ({oid[:23]}...)"
    return (
        f"it is a Git LFS pointer file{what}, not the file itself: the store was cloned or downloaded "
        "without Git LFS. Run `git lfs pull` in the repository (or `git lfs install` first), or "
        "download the real file"
    )
