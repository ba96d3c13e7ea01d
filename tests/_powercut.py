"""Test utilities for power-cut tests: the powerfs mount, the writer workload run
on it, and the check of each crash image (see tests/powerfs.py for the file
system and tests/test_powercut.py for the tests).

Also :func:`internal`, the one way tests reach a private module of the library
(which is being moved into subpackages): the new path first, the old one second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import importlib

import numpy as np

HERE = Path(__file__).resolve().parent
MARK_PREFIX = ".powerfs-mark-"

#: private modules by their role
_INTERNALS = {
    "fileio": "retrostore.storage.fileio",
    "manifest": "retrostore.storage.manifest",
    "chunks": "retrostore.storage.chunktable",
    "retro": "retrostore.store.precompute",
}


def internal(role: str):
    """The library's private module for ``role`` (``"fileio"``, ``"manifest"``, ...)."""
    return importlib.import_module(_INTERNALS[role])


def fuse_unavailable() -> str | None:
    """Why a FUSE file system cannot be mounted here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine (FUSE needs the fuse kernel module, or --device /dev/fuse in a container)"
    if not shutil.which("fusermount3"):
        return "fusermount3 is missing (apt-get install fuse3 libfuse3-3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:  # mfusepy raises OSError/EnvironmentError without libfuse
        return f"the FUSE binding cannot be loaded ({exc}); pip install mfusepy, apt-get install libfuse3-3"
    return None


class Mount:
    """A powerfs server serving ``backing`` at ``mountpoint`` (a child process).

    ``cut_at``: a list of ``(n, mode, seed)`` or ``"sync"``; crash images go to ``images``.
    Use as a context manager: leaving it unmounts (``fusermount3 -u``, lazily if busy),
    even after a failure.
    """

    def __init__(self, backing: Path, mountpoint: Path, images: Path, cut_at=(), quota_bytes: int | None = None):
        self.backing, self.mountpoint, self.images = Path(backing), Path(mountpoint), Path(images)
        self.log = self.images.parent / f"{self.images.name}.log.jsonl"
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.images.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(HERE / "powerfs.py"), str(self.backing), str(self.mountpoint),
               "--images", str(self.images), "--log", str(self.log),
               "--cut-at", cut_at if isinstance(cut_at, str) else json.dumps(
                   cut_at if isinstance(cut_at, dict) else [list(c) for c in cut_at])]
        if quota_bytes is not None:
            cmd += ["--quota-bytes", str(quota_bytes)]
        self.stderr = self.images.parent / f"{self.images.name}.stderr.txt"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.stderr, "wb"), text=True)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.unmount()
                raise RuntimeError(f"powerfs did not mount: {self.stderr.read_text()[-2000:]}")
            time.sleep(0.02)

    def __enter__(self) -> "Mount":
        return self

    def __exit__(self, *exc) -> None:
        self.unmount()

    def command(self, cmd: str) -> str:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def cut(self) -> int:
        """Cut the power now: the strict crash image goes to ``images/cut``; later operations fail (EIO)."""
        return int(self.command("cut").split()[1])

    def count(self) -> int:
        return int(self.command("count").split()[1])

    def unmount(self) -> None:
        if os.path.ismount(self.mountpoint):
            r = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            if r.returncode:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        if self.proc.stdin:
            self.proc.stdin.close()
        if self.proc.stdout:
            self.proc.stdout.close()

    def records(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def server_errors(self) -> str:
        """Exceptions the server's operations raised (mfusepy logs them), other than expected errnos."""
        text = self.stderr.read_text() if self.stderr.exists() else ""
        return "\n".join(line for line in text.splitlines() if "Uncaught" in line or "Traceback" in line)


# -- the workload (runs in a child process, on the mount) ------------------------------------
def mark(mount: str, label: str) -> None:
    """Record in the powerfs log that ``label`` happened after the operations so far."""
    try:
        os.stat(os.path.join(mount, MARK_PREFIX + label))
    except FileNotFoundError:
        pass


def _vectors(seed: int, n: int, dim: int = 384) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


QUERIES = _vectors(12345, 3)


def digest(st) -> str:
    """sha256 of everything a reader gets from a store version: every document (text,
    metadata, chunk ids; deleted ones as such), every live chunk, an exact search."""
    import retrostore

    h = hashlib.sha256()
    info = st.info()
    live_chunks = []
    for d in range(int(st.manifest["next_doc_id"])):
        try:
            doc = st.get_document(d)
        except retrostore.InvalidInputError as exc:
            h.update(f"{d} deleted {'deleted' in str(exc)}\n".encode())
            continue
        h.update(json.dumps([d, doc.text, doc.metadata, list(doc.chunk_ids)]).encode())
        live_chunks += list(doc.chunk_ids)
    for c in st.get_chunks(live_chunks):
        h.update(json.dumps([c.chunk_id, c.doc_id, c.position, c.start, c.text, c.tokens.tolist()]).encode())
    if live_chunks:
        scores, ids = st.search_vectors(QUERIES, k=4)
        h.update(json.dumps([ids.tolist(), np.round(scores, 3).tolist()]).encode())
    h.update(json.dumps([info["documents"], len(st)]).encode())
    return h.hexdigest()


def break_fsync(which: str = "files") -> None:
    """The deliberately broken writer: the library's fsync of regular files (``"files"``:
    directories are still fsynced, as if ``write_durable`` forgot its fsync) or of
    everything (``"all"``) does nothing. LMDB's own syncs are untouched."""
    import stat as _stat

    fileio = internal("fileio")
    real = fileio._fsync

    def _fsync(fd: int) -> None:
        if which == "all" or _stat.S_ISREG(os.fstat(fd).st_mode):
            return
        real(fd)

    fileio._fsync = _fsync


def workload(mount: str, texts: list[str], digests_path: str, broken: str | None = None, steps: str = "all") -> None:
    """The writer: create, commits (a tier merge at the 8th), delete + commit, compact,
    reindex, commits after them, pack, unpack of the archive. After each acknowledged step it
    marks the powerfs log (``vN`` for a version, ``pack``, ``unpack``) and appends
    ``{"version", "digest"}`` to ``digests_path`` (on the real disk)."""
    import retrostore

    if broken:
        break_fsync(broken)
    path = os.path.join(mount, "s.rstore")
    out = open(digests_path, "a", buffering=1)

    def acked(st) -> None:  # the content first: a marked version always has its digest
        out.write(json.dumps({"version": st.version, "digest": digest(st)}) + "\n")
        mark(mount, f"v{st.version}")

    st = retrostore.create(path, embedder=retrostore.default_embedder(threads=1), threads=1)
    acked(st)
    b = 0

    def commit_batch(n_docs: int) -> None:
        nonlocal b
        docs = [texts[(3 * b + j) % len(texts)] for j in range(n_docs)]
        n = sum(len(c) for c in st.chunker.chunk_many(docs))
        st.append(docs, metadata=[{"batch": b, "j": j} for j in range(n_docs)], embeddings=_vectors(b, n))
        b += 1
        st.commit()
        acked(st)

    for i in range(9):  # the 8th commit merges the eight tier-0 segments
        commit_batch(1 + i % 2)
    if steps in ("all", "maintenance"):
        st.delete([1])
        st.commit()
        acked(st)
        st.compact(progress=False)
        acked(st)
        commit_batch(2)
        st.reindex(progress=False)
        acked(st)
        commit_batch(1)
    version = st.version
    st.close()
    if steps == "all":
        out.write(json.dumps({"pack": version}) + "\n")
        retrostore.pack(path, os.path.join(mount, "s.tar"))
        mark(mount, "pack")
        retrostore.unpack(os.path.join(mount, "s.tar"), os.path.join(mount, "u.rstore"))
        mark(mount, "unpack")
    out.close()


# -- checking a crash image ----------------------------------------------------------------
def read_digests(path: Path) -> tuple[dict[int, str], int | None]:
    digests, packed = {}, None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "pack" in rec:
            packed = rec["pack"]
        else:
            digests[rec["version"]] = rec["digest"]
    return digests, packed


def acked_before(records: list[dict], ops: int) -> tuple[int | None, set[str]]:
    """The newest version acknowledged (commit returned) and which of pack and unpack
    had returned, by the time operation ``ops`` was done."""
    version, done = None, set()
    for r in records:
        if "mark" in r and r["ops"] <= ops:
            if r["mark"] in ("pack", "unpack"):
                done.add(r["mark"])
            else:
                version = max(version if version is not None else -1, int(r["mark"][1:]))
    return version, done


def check_image(image: Path, ops: int, records: list[dict], digests: dict[int, str], packed_version: int | None,
                recover: bool = True, commit_after: bool = True) -> dict:
    """The checks after one power cut; returns what was found (``problems`` empty when all hold).

    The store must open (unless not even ``create`` was acknowledged), at a version at
    least the last acknowledged one, that version's content must be exactly what the
    writer saw when it committed it, and ``verify()`` must be clean; when ``recover``,
    then also after a writer has opened it (recovery), and (``commit_after``) after it
    committed once more. A pack
    that returned must have left a whole archive; any archive at its name must unpack
    to the packed version.
    """
    import retrostore

    acked, returned = acked_before(records, ops)
    packed = "pack" in returned
    store = image / "s.rstore"
    found: dict = {"image": image.name, "ops": ops, "acked": acked, "problems": []}
    problems = found["problems"]
    if not (store / "manifest.json").exists():
        found["version"] = None
        if acked is not None:
            problems.append(f"the store is gone (no manifest.json) though version {acked} was acknowledged")
        return found
    try:
        with retrostore.open(store) as st:
            v = found["version"] = st.version
            if acked is not None and v < acked:
                problems.append(f"opened at version {v}, but version {acked} was acknowledged: committed data lost")
            if acked is not None and v > acked + 1:
                problems.append(f"opened at version {v}, beyond the one in flight ({acked + 1})")
            in_flight = v == (acked + 1 if acked is not None else 0)
            if v not in digests:
                # a live cut may kill the writer after its commit point but before it recorded
                # the version's content: then only the checks below apply to it
                if not in_flight:
                    problems.append(f"opened at version {v}, which the writer never committed")
            elif digest(st) != digests[v]:
                problems.append(f"version {v}: the content differs from what the writer committed")
            bad = st.verify()
            if bad:
                found["verify_before_recovery"] = bad
                problems.append(f"verify (before recovery): {bad}")
    except Exception as exc:  # any failure to open or read is a finding, named
        problems.append(f"reader: {type(exc).__name__}: {exc}")
        return found
    if recover:
        try:
            with retrostore.open(store, "a") as w:
                if w.version != v:
                    problems.append(f"the writer opened at version {w.version}, the reader at {v}")
                bad = w.verify()
                if bad:
                    problems.append(f"verify (after recovery): {bad}")
                if digests.get(v) and digest(w) != digests[v]:
                    problems.append(f"version {v}: the content differs after recovery")
                if commit_after:
                    n = sum(len(c) for c in w.chunker.chunk_many(["after the power cut"]))
                    w.append(["after the power cut"], embeddings=_vectors(99, n))
                    w.commit()
                    bad = w.verify()
                    if bad:
                        problems.append(f"verify (after a commit following recovery): {bad}")
        except Exception as exc:
            problems.append(f"writer after the cut: {type(exc).__name__}: {exc}")
    tar = image / "s.tar"
    if packed and not tar.exists():
        problems.append("pack() returned, but its archive is gone")
    if tar.exists():
        dest = image / "unpacked.rstore"
        try:
            retrostore.unpack(tar, dest)
            with retrostore.open(dest) as u:
                if u.version != packed_version or digest(u) != digests.get(packed_version):
                    problems.append(f"the archive holds version {u.version}, not the packed {packed_version}")
                bad = u.verify()
                if bad:
                    problems.append(f"verify of the unpacked archive: {bad}")
        except Exception as exc:  # any failure is a finding, named (not a crash of the checking pool)
            problems.append(f"the archive at the final name does not unpack: {type(exc).__name__}: {exc}")
    unpacked = image / "u.rstore"
    if "unpack" in returned and not unpacked.exists():
        problems.append("unpack() returned, but the store it made is gone")
    if unpacked.exists():  # an unpack renames a whole, verified store into place: all or nothing
        try:
            with retrostore.open(unpacked) as u:
                if u.version != packed_version or digest(u) != digests.get(packed_version):
                    problems.append(f"the unpacked store holds version {u.version}, not the packed {packed_version}")
                bad = u.verify()
                if bad:
                    problems.append(f"verify of the store unpack() made: {bad}")
        except Exception as exc:
            problems.append(f"the store unpack() made does not open: {type(exc).__name__}: {exc}")
    return found
