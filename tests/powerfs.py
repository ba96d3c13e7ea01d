"""powerfs: a FUSE file system that loses what a power cut loses (a LazyFS-like test tool).

Run by the power-cut tests as a child process::

    python tests/powerfs.py BACKING MOUNTPOINT --images DIR [--cut-at SPEC] [--log FILE]

It serves the directory tree ``BACKING`` (loaded into memory at start) at
``MOUNTPOINT`` and keeps two states of every file and directory:

* the *volatile* state, what programs see: every write, create, rename,
  unlink, truncate applies to it at once (reads, ``mmap`` reads included, see
  it);
* the *durable* state, what survives a power cut. It changes only on

  - ``fsync``/``fdatasync`` of a file: that file's data and size become durable
    (not its name: a new file's directory entry is durable only once its
    directory is fsynced);
  - ``fsync`` of a directory: its entries (created, renamed, removed names)
    become durable, each bound to the inode it names now. A file whose name is
    durable but whose data never was fsynced survives empty (allocated, no
    data), as on a file system with delayed allocation.

That is the strict model (per-directory metadata durability, no journal
ordering between directories, no implied durability of a new file's name
through ``fsync`` of the file): stricter than ext4 (``data=ordered``) or
XFS, where a file fsync also commits its entry. A store's protocol must hold
under it: write, fsync file, rename, fsync directory.

A *crash image* is the tree a power cut would leave: in mode ``strict`` only the
durable state; in mode ``random`` (seeded) the durable state plus a random
subset of the unsynced changes, as a disk that wrote back some of its cache
in any order: each dirty 4 KiB page of a file independently, the file's old
or new size, and each changed directory entry independently (its old or new
binding; a rename's two names are chosen separately, so a renamed file may
survive under both names or the old one only, never as a mix of contents).

Counted operations (the "cut points"): every write, truncate, create, mkdir,
unlink, rmdir, rename, fsync, fdatasync and directory fsync, except on the
files ``LOCK`` and ``lock.mdb`` (a lock and LMDB's shared-memory reader table,
whose content a crash may lose without harm and whose page write-back by the
kernel comes at times no test controls). Operation 1 is the first.

Cut points: ``--cut-at`` is a JSON list of ``[n, mode, seed]``: right after
operation ``n`` the crash image is written to ``DIR/<n>-<mode>-<seed>/`` (on the
real disk, synchronously, while the operation's caller waits). A program that
goes on after a cut point is not disturbed: one run of a workload yields a crash
image at every point asked for. ``--cut-at sync`` asks for a ``strict`` image after
every fsync of a file or directory (in strict mode the durable state changes only
there, so these are all the distinct strict images). A JSON object combines them:
``{"at": [...], "sync": true, "random_every": K, "random_offset": R, "random_seed": S}`` also
asks for a ``random`` image (seed ``n + 1000003 S``) after every operation ``n`` with
``n % K == R``.

Marks: a ``stat`` of ``/.powerfs-mark-LABEL`` (which fails with ENOENT)
records ``LABEL`` with the number of operations done so far in the log: a
workload marks the moment an operation returned (``commit()`` acknowledged).

Control: the server reads commands on its standard input, one a line:

* ``cut``: power cut now: write the ``strict`` crash image to
  ``DIR/cut/``, then fail every later operation with EIO (a dead disk), and
  answer ``cut N`` on standard output;
* ``count``: answer ``count N``.

Disk full: ``--quota-bytes N`` makes a write or truncate that would take the
volatile file data past N bytes fail with ENOSPC.

The log (``--log``) holds one JSON object a line: ``{"mark": LABEL, "ops": N}``,
``{"image": NAME, "ops": N}``, and at unmount ``{"done": ..., "ops": N, "by_kind": {...}}``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import stat
import sys
import threading
import time

PAGE = 4096
MARK_PREFIX = ".powerfs-mark-"
UNCOUNTED = {"LOCK", "lock.mdb"}


class Node:
    __slots__ = ("ino", "is_dir", "mode", "data", "durable", "dirty", "entries", "durable_entries", "mtime_ns",
                 "durable_blob")

    def __init__(self, ino: int, is_dir: bool, mode: int):
        self.ino = ino
        self.is_dir = is_dir
        self.mode = mode
        self.mtime_ns = time.time_ns()
        self.data = bytearray()          # volatile content (files)
        self.durable = b""               # content as of the last fsync (files)
        self.durable_blob = None         # path of an image file already holding ``durable``
        self.dirty: set[int] = set()     # pages written since the last fsync
        self.entries: dict[str, int] = {}          # volatile names (directories)
        self.durable_entries: dict[str, int] = {}  # names as of the last directory fsync


class PowerFS:
    use_ns = True

    def __init__(self, backing: str, images: str, cut_at, log_path: str | None, quota_bytes: int | None):
        self._mutex = threading.RLock()
        self.nodes: dict[int, Node] = {}
        self.next_ino = 1
        self.handles: dict[int, int] = {}
        self.next_fh = 1
        self.ops = 0
        self.by_kind: dict[str, int] = {}
        self.images = images
        self.dead = False
        self.quota = quota_bytes
        self.log = open(log_path, "a", buffering=1) if log_path else None
        if isinstance(cut_at, list):
            cut_at = {"at": cut_at}
        self.cut_sync = bool(cut_at.get("sync"))
        self.random_every = int(cut_at.get("random_every") or 0)
        self.random_offset = int(cut_at.get("random_offset") or 0)
        self.random_seed = int(cut_at.get("random_seed") or 0)
        self.cuts: dict[int, list] = {}
        for n, mode, seed in cut_at.get("at", []):
            self.cuts.setdefault(int(n), []).append((mode, int(seed)))
        self.root = self._load(backing)
        self.bytes_used = sum(len(n.data) for n in self.nodes.values() if not n.is_dir)

    # -- model ---------------------------------------------------------------
    def _new(self, is_dir: bool, mode: int) -> Node:
        node = Node(self.next_ino, is_dir, mode)
        self.nodes[node.ino] = node
        self.next_ino += 1
        return node

    def _load(self, path: str) -> Node:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            node = self._new(True, st.st_mode)
            for name in sorted(os.listdir(path)):
                child = self._load(os.path.join(path, name))
                node.entries[name] = node.durable_entries[name] = child.ino
            return node
        if not stat.S_ISREG(st.st_mode):
            raise SystemExit(f"powerfs: {path}: only regular files and directories are served")
        node = self._new(False, st.st_mode)
        with open(path, "rb") as fh:
            node.durable = fh.read()
        node.data = bytearray(node.durable)
        return node

    def _lookup(self, path: str) -> Node:
        node = self.root
        for part in path.strip("/").split("/"):
            if not part:
                continue
            if not node.is_dir or part not in node.entries:
                raise OSError(errno.ENOENT, path)
            node = self.nodes[node.entries[part]]
        return node

    def _parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._lookup(head or "/")
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, path)
        return parent, name

    def _node(self, path: str | None, fh: int | None) -> Node:
        if fh:
            ino = self.handles.get(fh)
            if ino is not None:
                return self.nodes[ino]
        if path is None:
            raise OSError(errno.EBADF, "no path")
        return self._lookup(path)

    def _count(self, kind: str, path: str | None) -> None:
        """One counted operation done: write the crash images asked for at this point."""
        if self.dead:
            raise OSError(errno.EIO, "power is cut")
        if path is not None and os.path.basename(path) in UNCOUNTED:
            return
        self.ops += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        wanted = list(self.cuts.pop(self.ops, []))
        if self.cut_sync and kind in ("fsync", "fdatasync", "fsyncdir"):
            wanted.append(("strict", 0))
        if self.random_every and self.ops % self.random_every == self.random_offset:
            wanted.append(("random", self.ops + 1_000_003 * self.random_seed))
        for mode, seed in wanted:
            name = f"{self.ops}-{mode}-{seed}"
            self.write_image(os.path.join(self.images, name), mode, seed)
            self._log({"image": name, "ops": self.ops, "kind": kind, "path": path})

    def _log(self, obj: dict) -> None:
        if self.log is not None:
            self.log.write(json.dumps(obj) + "\n")

    def _check_live(self) -> None:
        if self.dead:
            raise OSError(errno.EIO, "power is cut")

    # -- crash images -----------------------------------------------------------
    def write_image(self, dest: str, mode: str, seed: int) -> None:
        """Write the tree a power cut right now would leave (see the module docstring)."""
        rng = random.Random(seed)
        p = 0.0 if mode == "strict" else 0.5
        os.makedirs(dest)
        seen: set[int] = set()

        def content(node: Node) -> bytes | None:
            if p == 0.0 or (not node.dirty and len(node.data) == len(node.durable)):
                return None  # the durable bytes
            size = len(node.data) if rng.random() < p else len(node.durable)
            out = bytearray(node.durable[:size])
            out.extend(b"\0" * (size - len(out)))
            for page in sorted(node.dirty):
                lo = page * PAGE
                if lo < size and rng.random() < p:
                    hi = min(size, lo + PAGE, len(node.data))
                    out[lo:hi] = node.data[lo:hi]
            return bytes(out)

        def walk(node: Node, where: str) -> None:
            seen.add(node.ino)
            names = set(node.durable_entries) | set(node.entries)
            for name in sorted(names):
                old, new = node.durable_entries.get(name), node.entries.get(name)
                ino = old if old == new or rng.random() >= p else new
                if ino is None or ino in seen or ino not in self.nodes:
                    continue
                child = self.nodes[ino]
                target = os.path.join(where, name)
                if child.is_dir:
                    os.mkdir(target)
                    walk(child, target)
                    continue
                data = content(child)
                # Unchanged durable content is shared between images by a hard link, except
                # LMDB's files, which a writer opening the image changes in place, and the lock
                # files, whose locks belong to the inode.
                shareable = data is None and name not in ("data.mdb", "lock.mdb", "LOCK")
                if shareable and child.durable_blob and os.path.exists(child.durable_blob):
                    os.link(child.durable_blob, target)
                    continue
                with open(target, "wb") as fh:
                    fh.write(child.durable if data is None else data)
                if shareable:
                    child.durable_blob = target

        walk(self.root, dest)

    # -- FUSE operations ---------------------------------------------------------
    def getattr(self, path, fh=None):
        with self._mutex:
            if path and os.path.basename(path).startswith(MARK_PREFIX):
                self._log({"mark": os.path.basename(path)[len(MARK_PREFIX):], "ops": self.ops})
                raise OSError(errno.ENOENT, path)
            node = self._node(path, fh)
            size = len(node.data) if not node.is_dir else 4096
            return {
                "st_mode": node.mode, "st_ino": node.ino, "st_nlink": 2 if node.is_dir else 1,
                "st_size": size, "st_blocks": (size + 511) // 512, "st_blksize": PAGE,
                "st_uid": os.getuid(), "st_gid": os.getgid(),
                "st_atime": node.mtime_ns, "st_mtime": node.mtime_ns, "st_ctime": node.mtime_ns,
            }

    def access(self, path, amode):
        with self._mutex:
            self._lookup(path)
            return 0

    def readdir(self, path, fh):
        with self._mutex:
            node = self._lookup(path)
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, path)
            return [".", ".."] + sorted(node.entries)

    def opendir(self, path):
        with self._mutex:
            node = self._lookup(path)
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, path)
            return 0

    def releasedir(self, path, fh):
        return 0

    def _open_handle(self, node: Node) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = node.ino
        return fh

    def open(self, path, flags):
        with self._mutex:
            self._check_live()
            node = self._lookup(path)
            if node.is_dir:
                raise OSError(errno.EISDIR, path)
            if flags & os.O_TRUNC and node.data:
                self._truncate(node, 0, path)
            return self._open_handle(node)

    def create(self, path, mode, fi=None):
        with self._mutex:
            self._check_live()
            parent, name = self._parent(path)
            if name in parent.entries:
                node = self.nodes[parent.entries[name]]
                if node.is_dir:
                    raise OSError(errno.EISDIR, path)
                self._truncate(node, 0, path)
                return self._open_handle(node)
            node = self._new(False, stat.S_IFREG | (mode & 0o7777))
            parent.entries[name] = node.ino
            parent.mtime_ns = time.time_ns()
            self._count("create", path)
            return self._open_handle(node)

    def read(self, path, size, offset, fh):
        with self._mutex:
            self._check_live()
            node = self._node(path, fh)
            return bytes(node.data[offset : offset + size])

    def write(self, path, data, offset, fh):
        with self._mutex:
            self._check_live()
            node = self._node(path, fh)
            end = offset + len(data)
            grow = max(0, end - len(node.data))
            if self.quota is not None and self.bytes_used + grow > self.quota:
                raise OSError(errno.ENOSPC, "quota")
            if offset > len(node.data):
                node.data.extend(b"\0" * (offset - len(node.data)))
            node.data[offset:end] = data
            self.bytes_used += grow
            node.dirty.update(range(offset // PAGE, (end - 1) // PAGE + 1))
            node.mtime_ns = time.time_ns()
            self._count("write", path)
            return len(data)

    def _truncate(self, node: Node, length: int, path) -> None:
        old = len(node.data)
        if self.quota is not None and self.bytes_used + length - old > self.quota:
            raise OSError(errno.ENOSPC, "quota")
        if length < old:
            node.dirty.update(range(length // PAGE, (old - 1) // PAGE + 1))
            del node.data[length:]
        else:
            node.data.extend(b"\0" * (length - old))
            if length > old:
                node.dirty.update(range(old // PAGE, (length - 1) // PAGE + 1))
        self.bytes_used += length - old
        node.mtime_ns = time.time_ns()
        self._count("truncate", path)

    def truncate(self, path, length, fh=None):
        with self._mutex:
            self._check_live()
            self._truncate(self._node(path, fh), length, path)
            return 0

    def fsync(self, path, datasync, fh):
        with self._mutex:
            self._check_live()
            node = self._node(path, fh)
            if not node.is_dir:
                node.durable = bytes(node.data)
                node.durable_blob = None
                node.dirty.clear()
            else:
                node.durable_entries = dict(node.entries)
            self._count("fdatasync" if datasync else "fsync", path)
            return 0

    def fsyncdir(self, path, datasync, fh):
        with self._mutex:
            self._check_live()
            node = self._lookup(path)
            node.durable_entries = dict(node.entries)
            self._count("fsyncdir", path)
            return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        with self._mutex:
            self.handles.pop(fh, None)
            return 0

    def mkdir(self, path, mode):
        with self._mutex:
            self._check_live()
            parent, name = self._parent(path)
            if name in parent.entries:
                raise OSError(errno.EEXIST, path)
            node = self._new(True, stat.S_IFDIR | (mode & 0o7777))
            parent.entries[name] = node.ino
            self._count("mkdir", path)
            return 0

    def unlink(self, path):
        with self._mutex:
            self._check_live()
            parent, name = self._parent(path)
            if name not in parent.entries:
                raise OSError(errno.ENOENT, path)
            node = self.nodes[parent.entries[name]]
            if node.is_dir:
                raise OSError(errno.EISDIR, path)
            del parent.entries[name]
            self._count("unlink", path)
            return 0

    def rmdir(self, path):
        with self._mutex:
            self._check_live()
            parent, name = self._parent(path)
            if name not in parent.entries:
                raise OSError(errno.ENOENT, path)
            node = self.nodes[parent.entries[name]]
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, path)
            if node.entries:
                raise OSError(errno.ENOTEMPTY, path)
            del parent.entries[name]
            self._count("rmdir", path)
            return 0

    def rename(self, old, new):
        with self._mutex:
            self._check_live()
            src_dir, src_name = self._parent(old)
            dst_dir, dst_name = self._parent(new)
            if src_name not in src_dir.entries:
                raise OSError(errno.ENOENT, old)
            node = self.nodes[src_dir.entries[src_name]]
            if dst_name in dst_dir.entries:
                target = self.nodes[dst_dir.entries[dst_name]]
                if target.ino == node.ino:
                    return 0
                if target.is_dir and not node.is_dir:
                    raise OSError(errno.EISDIR, new)
                if node.is_dir and not target.is_dir:
                    raise OSError(errno.ENOTDIR, new)
                if target.is_dir and target.entries:
                    raise OSError(errno.ENOTEMPTY, new)
            del src_dir.entries[src_name]
            dst_dir.entries[dst_name] = node.ino
            self._count("rename", new)
            return 0

    def chmod(self, path, mode):
        with self._mutex:
            node = self._lookup(path)
            node.mode = (node.mode & ~0o7777) | (mode & 0o7777)
            return 0

    def chown(self, path, uid, gid):
        return 0

    def utimens(self, path, times=None):
        with self._mutex:
            node = self._lookup(path)
            node.mtime_ns = times[1] if times else time.time_ns()
            return 0

    def statfs(self, path):
        total = (self.quota or (1 << 34)) // PAGE
        free = max(0, total - self.bytes_used // PAGE)
        return {"f_bsize": PAGE, "f_frsize": PAGE, "f_blocks": total, "f_bfree": free, "f_bavail": free,
                "f_files": 1 << 20, "f_ffree": 1 << 19, "f_favail": 1 << 19, "f_namemax": 255}

    def link(self, target, source):
        raise OSError(errno.EPERM, "powerfs has no hard links")

    def symlink(self, target, source):
        raise OSError(errno.EPERM, "powerfs has no symbolic links")

    def readlink(self, path):
        raise OSError(errno.EINVAL, path)

    def fallocate(self, path, mode, offset, size, fh):
        raise OSError(errno.EOPNOTSUPP, "fallocate")

    def destroy(self, path):
        with self._mutex:
            self._log({"done": True, "ops": self.ops, "by_kind": self.by_kind})

    # -- control --------------------------------------------------------------------
    def control(self) -> None:
        for line in sys.stdin:
            cmd = line.strip()
            with self._mutex:
                if cmd == "cut":
                    if not self.dead:
                        self.write_image(os.path.join(self.images, "cut"), "strict", 0)
                        self._log({"image": "cut", "ops": self.ops})
                        self.dead = True
                    reply = f"cut {self.ops}"
                elif cmd == "count":
                    reply = f"count {self.ops}"
                else:
                    reply = f"error unknown command {cmd!r}"
            sys.stdout.write(reply + "\n")
            sys.stdout.flush()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("backing")
    ap.add_argument("mountpoint")
    ap.add_argument("--images", required=True)
    ap.add_argument("--cut-at", default="[]", help="JSON list of [n, mode, seed], 'sync', or a JSON object "
                    '{"at": [...], "sync": true, "random_every": K, "random_offset": R}')
    ap.add_argument("--log")
    ap.add_argument("--quota-bytes", type=int)
    args = ap.parse_args(argv)
    import mfusepy

    # libfuse changes the working directory to / (even in the foreground): paths must be absolute.
    args.backing, args.images = os.path.abspath(args.backing), os.path.abspath(args.images)
    args.log = args.log and os.path.abspath(args.log)

    cut_at = {"sync": True} if args.cut_at == "sync" else json.loads(args.cut_at)
    fs = PowerFS(args.backing, args.images, cut_at, args.log, args.quota_bytes)
    threading.Thread(target=fs.control, daemon=True).start()
    # Single-threaded: operations arrive in the order the kernel sends them, and the
    # model needs no finer locking. No direct_io, so mmap reads work (LMDB's).
    mfusepy.FUSE(fs, args.mountpoint, foreground=True, nothreads=True, hard_remove=True,
                 fsname="powerfs")


if __name__ == "__main__":
    main()
