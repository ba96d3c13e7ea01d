"""Raw vector files: the embeddings as computed, kept beside the index.

Each commit writes its batch as one ``.npy`` file (float16 by default) under
``vectors/``, covering chunk ids ``[first_id, first_id + count)``. They let the
index be retrained or rebuilt without re-embedding and recall be measured
against exact search. ``.npy`` is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import time
from pathlib import Path

import faiss
import numpy as np

from ..errors import CorruptStoreError, NoRawVectorsError
from .blocksums import BlockChecker, CrcStream, rows_per_block, sums_name, write_sums
from .fileio import DurableWriter, git_lfs_pointer, regular_file, sha256_cached

__all__ = ["write_vectors", "write_store_vectors", "load_vectors", "RawVectors", "keeps_files", "require_raw_vectors"]


def keeps_files(manifest: dict) -> bool:
    """Whether the store keeps raw vectors files (commits write them, ``verify`` wants them to tile the ids).

    ``keep_vectors`` stores do, except a store that is exact by choice
    (``index="Flat"``) and has none: its Flat segments hold the vectors at
    ``vector_dtype`` precision already, so files would be a second copy. A
    ``reindex`` of such a store to anything else writes them first
    (:func:`retrostore.store.indexer.rebuild`); once present, files are kept.
    """
    idx = manifest["index"]
    return bool(manifest["settings"]["keep_vectors"]) and (
        idx.get("target", idx["factory"]) != "Flat" or bool(manifest["vectors"]["files"]))


def require_raw_vectors(manifest: dict, action: str = "reindex") -> None:
    """Raise :class:`NoRawVectorsError` when ``action`` needs raw vectors the store lacks.

    Parameters
    ----------
    manifest : dict
        A manifest body (``Store.manifest``).
    action : str
        What needs them, for the message (``"reindex"``).

    Raises
    ------
    NoRawVectorsError
        The raw vectors were dropped by ``pack --no-vectors`` or never kept
        (``keep_vectors=False``).
    """
    vec = manifest.get("vectors", {})
    if vec.get("dropped_at_pack"):
        raise NoRawVectorsError(
            f"{action} needs the raw vectors, but they were dropped when this store was packed with "
            "--no-vectors (manifest vectors.dropped_at_pack); unpack an artifact packed with vectors, "
            "or rebuild the store from its documents"
        )
    n_chunks = int(manifest.get("next_chunk_id", 0))
    have = sum(int(e.get("count", 0)) for e in vec.get("files", []))
    if not manifest.get("settings", {}).get("keep_vectors", True) or have < n_chunks:
        raise NoRawVectorsError(
            f"{action} needs the raw vectors, but this store keeps none for {n_chunks - have} of its "
            f"{n_chunks} chunks (it was created with keep_vectors=False); rebuild it from its documents "
            "with keep_vectors=True"
        )


def write_vectors(path: Path, vectors: np.ndarray | list[np.ndarray], dtype: str) -> tuple[int, str]:
    """Write ``vectors`` (n, dim), or the rows of several such arrays in order,
    as one ``.npy`` file of ``dtype``, fsynced.

    Returns
    -------
    size_bytes : int
    sha256 : str

    Raises
    ------
    OSError
        From the write or fsync.
    """
    return _write(path, vectors, dtype, None)


class _SourceDigests:
    """sha256 of each source file of a merged vectors file, from the file's own ``.npy`` header and
    the rows written from it: a merge checks exactly the bytes it copies, beside its own hashing,
    instead of reading every source again first (0.45 s per 800,000 vectors of 384-d float16)."""

    def __init__(self, root: Path, entries: list[dict], parts: list[np.ndarray]) -> None:
        self.entries = entries
        self.hashers, ends, end = [], [], 0
        for e, p in zip(entries, parts):
            rows = p.nbytes
            with open(root / e["path"], "rb") as fh:
                self.hashers.append(hashlib.sha256(fh.read(int(e["size"]) - rows)))  # its header
            end += rows
            ends.append(end)
        self.ends, self.pos, self.part = ends, 0, 0

    def feed(self, view: memoryview) -> None:
        """The next rows written (any piece sizes, in order)."""
        while len(view):
            while self.pos >= self.ends[self.part]:
                self.part += 1
            take = min(len(view), self.ends[self.part] - self.pos)
            self.hashers[self.part].update(view[:take])
            self.pos += take
            view = view[take:]

    def check(self) -> None:
        """Raise CorruptStoreError naming the first source whose bytes differ from its manifest sha256."""
        for e, h in zip(self.entries, self.hashers):
            if h.hexdigest() != e["sha256"]:
                raise CorruptStoreError(
                    f"{e['path']}: vectors file checksum mismatch (manifest {e['sha256'][:16]}..., file "
                    f"{h.hexdigest()[:16]}...); it is damaged, and nothing was merged from it")


#: The ``.npy`` dtypes a store writes (``vector_dtype``, little-endian).
STORED_DTYPES = ("<f2", "<f4")


def _write(path: Path, vectors: np.ndarray | list[np.ndarray], dtype: str, crc: CrcStream | None,
           sources: _SourceDigests | None = None) -> tuple[int, str]:
    parts = vectors if isinstance(vectors, list) else [vectors]
    dt = np.dtype(dtype).newbyteorder("<")  # one of STORED_DTYPES
    dim = parts[0].shape[1]
    n = sum(len(p) for p in parts)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": (n, dim)})
    head = header.getvalue()
    skip = len(head)

    def feed(view: memoryview) -> None:  # the block checksums and the sources' digests cover the rows
        nonlocal skip
        if skip:
            view, skip = view[skip:], max(0, skip - len(view))
        if len(view):
            if crc is not None:
                crc.feed(view)
            if sources is not None:
                sources.feed(view)

    # Hashing runs beside the writes and the fsync (digest_aside). Rows are converted 65,536 at a time;
    # a merge's parts are already in the stored dtype, so its pieces are views of the mapped files.
    # Zero pages (the rows of chunks compact purged) are left as holes: a take-down gives back the disk.
    with DurableWriter(path, feed=feed if crc is not None or sources is not None else None,
                       digest_aside=True, sparse=True) as out:
        out.write(head)
        for p in parts:
            for i in range(0, len(p), 65536):
                out.write(memoryview(np.ascontiguousarray(p[i : i + 65536], dtype=dt)).cast("B"))
    if sources is not None:
        sources.check()
    return out.size, out.sha256


def write_store_vectors(root: Path, rel: str, vectors: np.ndarray | list[np.ndarray], dtype: str,
                        new_files: list, *, sources: list[dict] | None = None) -> dict:
    """Write a store's raw vectors file ``rel`` and its block checksums (:mod:`.blocksums`).

    Both paths go to ``new_files`` before anything is written (a failed
    commit removes them).

    Parameters
    ----------
    sources : list of dict, optional
        For a merge: the manifest entries of the vectors files whose rows ``vectors``
        are, one per part, in the stored dtype (:func:`load_vectors` without
        ``verify``). Each file's sha256 is checked over its header and the rows as
        they are written, beside the write.

    Returns
    -------
    dict
        The manifest fields of the file: ``path``, ``size``, ``sha256`` and
        ``sums`` (``path``, ``size``, ``sha256``, ``rows_per_block``).

    Raises
    ------
    OSError
        From a write or fsync.
    CorruptStoreError
        A source file's bytes differ from its manifest sha256 (the file written
        is left for the caller's ``new_files`` clean-up).
    """
    parts = vectors if isinstance(vectors, list) else [vectors]
    rpb = rows_per_block(parts[0].shape[1] * np.dtype(dtype).itemsize)
    path, sums_rel = root / rel, sums_name(rel)
    for p in (path, root / sums_rel):
        p.unlink(missing_ok=True)  # left by a failed attempt at this same version: never referenced
        new_files.append(p)
    if sources is not None and (len(sources) != len(parts) or any(p.dtype != np.dtype(dtype) for p in parts)):
        raise ValueError("sources name one file per part, each part in the stored dtype")
    crc = CrcStream(rpb * parts[0].shape[1] * np.dtype(dtype).itemsize)
    size, sha = _write(path, parts, dtype, crc, _SourceDigests(root, sources, parts) if sources else None)
    s_size, s_sha = write_sums(root / sums_rel, crc.finish())
    return {"path": rel, "size": size, "sha256": sha,
            "sums": {"path": sums_rel, "size": s_size, "sha256": s_sha, "rows_per_block": rpb}}


def load_vectors(root: Path, entry: dict, *, mmap: bool = True, verify: bool = False) -> np.ndarray:
    """Load one vectors file (memory-mapped by default), checking its size
    and, with ``verify``, its sha256 (before numpy parses it).

    Returns
    -------
    ndarray, shape (count, dim), float16 or float32

    Raises
    ------
    CorruptStoreError
        Missing file, wrong size or checksum, or not a valid ``.npy`` of the
        expected shape.
    """
    rel = entry["path"]
    path = root / rel
    st = regular_file(path, rel)
    if st is None:
        raise CorruptStoreError(f"{rel}: vectors file referenced by the manifest is missing")
    size = st.st_size
    if size != entry["size"]:
        lfs = git_lfs_pointer(path)
        raise CorruptStoreError(f"{rel}: vectors file is {size} bytes, the manifest says {entry['size']}"
                                + (f"; {lfs}" if lfs else ""))
    if verify:
        sha = sha256_cached(path)  # files are immutable: hashed once per process
        if sha != entry["sha256"]:
            raise CorruptStoreError(
                f"{rel}: vectors file checksum mismatch (manifest {entry['sha256'][:16]}..., file {sha[:16]}...); "
                "it is damaged"
            )
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as exc:  # numpy parses the header with ast/tokenize: any error means damage
        raise CorruptStoreError(f"{rel}: not a readable .npy vectors file ({type(exc).__name__}: {exc})") from exc
    if arr.ndim != 2 or arr.shape[0] != entry["count"]:
        raise CorruptStoreError(f"{rel}: holds shape {arr.shape}, the manifest says {entry['count']} rows")
    offset = getattr(arr, "offset", None)  # a memory map's header length
    if offset is not None and offset + arr.nbytes != size:  # a header that misstates its own length or the rows
        raise CorruptStoreError(f"{rel}: the .npy header is damaged (it describes {offset + arr.nbytes} bytes, the "
                                f"file holds {size}); restore the file from a copy or rebuild the store")
    if arr.dtype.str not in STORED_DTYPES or not arr.flags.c_contiguous:
        # The block checksums cover the rows, not the header: a header that still parses but says
        # big-endian or Fortran order would serve wrong (NaN) scores from intact rows.
        raise CorruptStoreError(
            f"{rel}: the .npy header is damaged (dtype {arr.dtype.str!r}, "
            f"{'C' if arr.flags.c_contiguous else 'Fortran'} order; a store writes "
            f"{' or '.join(repr(d) for d in STORED_DTYPES)} rows in C order); restore the file from a "
            "copy or rebuild the store")
    return arr


class RawVectors:
    """The raw vectors of one version, read on demand from their ``.npy`` files.

    Files are memory-mapped (pages come from the OS page cache, not from this
    process's heap), all of them when the version is loaded (:meth:`open_all`):
    a handle keeps reading them after a writer's garbage collection unlinks
    them (``compact`` retires every older version at once). A file with block
    checksums (format 4, :mod:`.blocksums`) is checked block by block, the
    first time a row of the block is read: a damaged row is never served, and
    the first query costs what it reads, not the whole file. A file without
    them (older stores) is hashed whole on first read (``verify``; a handle
    opened with ``mmap=True`` skips that hash: run ``verify`` on such stores).
    Rows of purged chunks hold zeros (see docs/index.md, "Deletes").

    Parameters
    ----------
    root : Path
    entries : list of dict
        The manifest's ``vectors.files`` (``first_id``/``count``), tiling the ids.
    dim : int
    verify : bool, default True
        Check a file without block checksums by its sha256 when it is first read.
    cache : dict, optional
        Opened files by sha256, shared between the versions a handle loads, so
        that a file's checked blocks stay checked across commits and refreshes.

    Raises
    ------
    CorruptStoreError
        From :meth:`open_all` or a read: a file or its checksums are missing or
        damaged, or a block read differs from its checksum.
    """

    def __init__(self, root: Path, entries: list[dict], dim: int, *, verify: bool = True,
                 cache: dict | None = None):
        self.root = root
        self.verify = verify
        self.entries = sorted(entries, key=lambda e: e["first_id"])
        self.dim = dim
        self._firsts = np.array([e["first_id"] for e in self.entries], dtype=np.int64)
        self._cache = {} if cache is None else cache
        self.end = int(self.entries[-1]["first_id"] + self.entries[-1]["count"]) if self.entries else 0
        self._first = int(self._firsts[0]) if self.entries else 0  # (0 in a store: files tile the ids)
        self._fp16 = None  # float16 decoder (:meth:`_float32`)

    def open_all(self) -> None:
        """Map every file now (and check block checksum files). A file that cannot be mapped
        (damaged) is reported by the first read of it, as before: the store still opens, so
        that ``verify`` can say what is wrong."""
        for entry in self.entries:
            try:
                self._open(entry)
            except CorruptStoreError:
                pass

    def _open(self, entry: dict) -> "_Opened":
        opened = self._cache.get(entry["sha256"])
        if opened is None or opened.count != entry["count"]:
            opened = _Opened(self.root, entry)
            if opened.rows.shape[1] != self.dim:
                raise CorruptStoreError(f"{entry['path']}: holds rows of {opened.rows.shape[1]} dimensions, "
                                        f"the manifest says {self.dim}; the file is damaged or misplaced")
            self._cache[entry["sha256"]] = opened
        return opened

    def _read(self, i: int, local: np.ndarray | slice) -> np.ndarray:
        """Rows ``local`` (sorted row numbers, or a slice) of file ``i``, their blocks checked."""
        opened = self._open(self.entries[i])
        arr = opened.plain
        if opened.checker is not None:
            rows = np.arange(len(arr))[local] if isinstance(local, slice) else local
            if not opened.checker.checked[rows // opened.checker.rpb].all():  # warm: nothing to do
                opened.check(rows)
        elif self.verify and not opened.hashed:
            opened.check_whole()
        return arr[local]

    def rows(self, first: int, end: int) -> np.ndarray:
        """Vectors of chunk ids ``[first, end)``, shape (end - first, dim), float32."""
        out = np.zeros((max(0, end - first), self.dim), np.float32)
        for i, e in enumerate(self.entries):
            lo, hi = max(first, e["first_id"]), min(end, e["first_id"] + e["count"])
            if lo < hi:
                out[lo - first : hi - first] = self._read(i, slice(lo - e["first_id"], hi - e["first_id"]))
        return out

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of arbitrary chunk ids (any shape); zeros where an id is -1.

        Returns
        -------
        ndarray, shape ``ids.shape + (dim,)``, float32
        """
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size > 64:  # many duplicates in a batch of candidate lists: read each row once
            uniq, inverse = np.unique(ids.ravel(), return_inverse=True)
            if len(uniq) < ids.size:
                return self.take(uniq)[inverse].reshape(ids.shape + (self.dim,))
        flat = ids.ravel()
        out = np.zeros((flat.size, self.dim), np.float32)
        ok = (flat >= 0) & (flat < self.end)
        if ok.any():
            which = np.searchsorted(self._firsts, flat, side="right") - 1
            for i in np.unique(which[ok]):
                sel = np.nonzero(ok & (which == i))[0]
                local = flat[sel] - self.entries[i]["first_id"]
                order = np.argsort(local, kind="stable")  # sorted reads are sequential on disk
                out[sel[order]] = self._read(int(i), local[order])
        return out.reshape(ids.shape + (self.dim,))


    def scores(self, ids: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
        """Exact scores of candidate chunk ids against their queries, from the raw vectors.

        What re-ranking needs, without building the ``(n, kk, dim)`` float32
        array of :meth:`take`: candidates are read sorted by id, file by file
        (blocks checked, see :meth:`_read`), converted and scored against
        their query row.

        Parameters
        ----------
        ids : ndarray, shape (n, kk), int64
            Candidates per query; -1 for none.
        queries : ndarray, shape (n, dim), float32
        metric : {"ip", "l2"}
            Inner product, or squared L2 distance.

        Returns
        -------
        ndarray, shape (n, kk), float32
            NaN where an id is -1 or beyond the files.

        Raises
        ------
        CorruptStoreError
            A file is missing or damaged, or a block read differs from its checksum.
        """
        n, kk = ids.shape
        flat = ids.ravel()
        order = np.argsort(flat, kind="stable")  # sorted reads are sequential on disk
        sid = flat[order]
        lo, hi = np.searchsorted(sid, [self._first, self.end])
        out = np.full(flat.size, np.nan, np.float32)
        stored = self._gather(sid[lo:hi])
        if stored is None:  # no id inside the files
            return out.reshape(n, kk)
        rows = self._float32(stored)
        where = order[lo:hi]  # ids outside the files stay NaN
        if n == 1:  # FAISS's one-thread kernel: numpy's product waits on OpenBLAS's threads (index/scan.py)
            rows = np.ascontiguousarray(rows, dtype=np.float32)
            q = np.ascontiguousarray(queries[0], dtype=np.float32)
            part = np.empty(len(rows), np.float32)
            kernel = faiss.fvec_inner_products_ny if metric == "ip" else faiss.fvec_L2sqr_ny
            kernel(faiss.swig_ptr(part), faiss.swig_ptr(q), faiss.swig_ptr(rows), self.dim, len(rows))
            out[where] = part
        else:
            q = queries[where // kk]
            out[where] = np.einsum("md,md->m", rows, q) if metric == "ip" else ((rows - q) ** 2).sum(-1)
        return out.reshape(n, kk)

    def _gather(self, sid: np.ndarray) -> np.ndarray | None:
        """Rows of the sorted chunk ids ``sid`` (all inside the files) as stored, read file by file
        (blocks checked, :meth:`_read`) into one C-contiguous array; None when ``sid`` is empty.
        One array, so that the caller decodes and scores in one call: a 5M store of 100k-chunk
        commits has 50 files, and decoding and scoring ~3 candidates per file cost ~0.8 ms of a
        query's re-ranking."""
        bounds = np.searchsorted(sid, np.append(self._firsts, self.end))
        parts = [self._read(int(i), sid[bounds[i]:bounds[i + 1]] - self.entries[i]["first_id"])
                 for i in np.flatnonzero(bounds[1:] > bounds[:-1])]
        if not parts:
            return None
        return np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts))

    def best(self, ids: np.ndarray, query: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best of one query's candidate chunk ids, scored exactly from the raw vectors.

        One FAISS search over the candidates' rows as stored (``SQfp16`` for float16 files,
        ``IndexFlat`` for float32: decoding and scoring in one SIMD pass on this thread, with a
        heap of ``k``): 0.44 ms for 6,600 candidates of 384-d against 2.8 ms decoding them all,
        scoring all and sorting (the scores are bit for bit the same).

        Parameters
        ----------
        ids : ndarray, shape (kk,), int64
            Candidates; -1 (or an id beyond the files) for none.
        query : ndarray, shape (dim,), float32
        k : int
        metric : {"ip", "l2"}

        Returns
        -------
        (scores, ids) : ndarrays, shape (min(k, valid candidates),), float32 and int64
            Best first; equal scores in chunk-id order.

        Raises
        ------
        CorruptStoreError
            As :meth:`scores`.
        """
        flat = np.asarray(ids, np.int64).ravel()
        sid = np.unique(flat[(flat >= self._first) & (flat < self.end)])  # sorted reads are sequential on disk
        rows = self._gather(sid)
        if rows is None:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        measure = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        if rows.dtype == np.float16:
            index = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, measure)
        else:
            rows = np.ascontiguousarray(rows, dtype=np.float32)
            index = faiss.IndexFlat(self.dim, measure)
        index.add_sa_codes(rows.view(np.uint8))
        D, I = index.search(np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1), min(k, len(rows)))
        return D[0], sid[I[0]]

    def _float32(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` as float32; float16 rows are decoded by FAISS's ``SQfp16`` codec (F16C
        instructions: about 3x numpy's ``astype`` on 384-d rows)."""
        if rows.dtype != np.float16 or not len(rows):
            return rows.astype(np.float32, copy=False)
        if self._fp16 is None:
            self._fp16 = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16)
        return self._fp16.sa_decode(np.ascontiguousarray(rows).view(np.uint8))


#: Seconds per checked block above which the file's pages are taken to come from the disk (a
#: page-cache block, 12 KiB: ~3 us of CRC + ~1 us of page faults; a disk read: 50 us and more).
SLOW_BLOCK_S = 30e-6


class _Opened:
    """One raw vectors file, mapped: its rows, its block checker (format 4) or the header bytes
    to hash it whole from the mapping (older files: the path may be unlinked by then)."""

    def __init__(self, root: Path, entry: dict):
        self.entry = entry
        self.count = entry["count"]
        self.rows = load_vectors(root, entry)
        mm = getattr(self.rows, "_mmap", None)  # rows are read at random (re-ranking): no read-ahead
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            try:
                mm.madvise(mmap.MADV_RANDOM)
            except OSError:
                pass
        self._mm = mm
        #: The rows as a plain ndarray view of the mapping: indexing np.memmap (a subclass) costs
        #: ~5 us more per read, paid per file touched by each query's re-ranking.
        self.plain = np.asarray(self.rows)
        self.checker = BlockChecker(root, entry, self.rows) if "sums" in entry else None
        self.from_disk = True  # until a check shows the pages come from the page cache
        self.hashed = False
        self._header = b""
        if self.checker is None:
            with open(root / entry["path"], "rb") as fh:
                self._header = fh.read(int(getattr(self.rows, "offset", 0)))

    def check(self, rows: np.ndarray) -> None:
        """Check the blocks of ``rows`` (sorted row numbers), with :meth:`prefetch` first while the
        file's pages come from the disk.

        The prefetch's ``madvise`` calls (one per range of unchecked blocks: ~1,500 for a
        query re-ranking 1,530 candidates of a 5M-chunk store) cost about as much as the
        check itself (3.5 ms) when the pages are in the page cache already, where they save
        nothing. So each check is timed: a block that took longer than
        :data:`SLOW_BLOCK_S` means disk reads, and the next check prefetches; a check at
        page-cache speed turns prefetching off until a slow one is seen again.
        """
        todo = self.checker.unchecked(rows)  # once, for the prefetch and the check
        if not len(todo):
            return
        if self.from_disk:
            self.prefetch(todo)
        t0 = time.perf_counter()
        self.checker.check(todo)
        self.from_disk = (time.perf_counter() - t0) / len(todo) > SLOW_BLOCK_S

    def prefetch(self, blocks: np.ndarray) -> None:
        """Ask the OS to read, all at once, ``blocks`` (sorted unchecked block numbers).

        Re-ranking reads rows at random (the mapping says ``MADV_RANDOM``: no
        read-ahead), and the first read of a row checks its whole block: after
        ``open`` on a cold page cache, one query's candidates would be read one
        page fault at a time, each waiting for the disk. ``MADV_WILLNEED`` on
        the unchecked blocks (coalesced, page-aligned) queues their reads
        together, so the disk serves them in parallel; blocks read before are
        skipped (no system call once a store is warm).
        """
        ch = self.checker
        if ch is None or self._mm is None or not hasattr(mmap, "MADV_WILLNEED") or len(blocks) < 2:
            return
        row_bytes = self.rows.shape[1] * self.rows.dtype.itemsize
        offset = int(getattr(self.rows, "offset", 0))
        start = offset + blocks * (ch.rpb * row_bytes)
        end = np.minimum(start + ch.rpb * row_bytes, offset + len(self.rows) * row_bytes)
        start -= start % mmap.PAGESIZE
        cut = np.nonzero(start[1:] > end[:-1])[0] + 1  # coalesce touching ranges
        for a, b in zip(np.split(start, cut), np.split(end, cut)):
            try:
                self._mm.madvise(mmap.MADV_WILLNEED, int(a[0]), int(b[-1] - a[0]))
            except (OSError, ValueError):
                return

    def check_whole(self) -> None:
        """Hash the whole file (header, then the mapped rows) against the manifest's sha256."""
        digest = hashlib.sha256(self._header)
        view = memoryview(np.ascontiguousarray(self.rows)).cast("B") if self.rows.size else memoryview(b"")
        for at in range(0, len(view), 1 << 20):
            digest.update(view[at : at + (1 << 20)])
        sha = digest.hexdigest()
        if sha != self.entry["sha256"]:
            rel = self.entry["path"]
            raise CorruptStoreError(f"{rel}: vectors file checksum mismatch (manifest {self.entry['sha256'][:16]}..., "
                                    f"file {sha[:16]}...); it is damaged")
        self.hashed = True
