"""Raw vector files: the embeddings as computed, kept beside the index.

Each commit writes its batch as one ``.npy`` file (float16 by default) under
``vectors/``, covering chunk ids ``[first_id, first_id + count)``. They let the
index be retrained or rebuilt without re-embedding and recall be measured
against exact search. ``.npy`` is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import mmap
from pathlib import Path

import numpy as np

from ..errors import CorruptStoreError, NoRawVectorsError
from .fileio import git_lfs_pointer, sha256_cached, write_durable

__all__ = ["write_vectors", "load_vectors", "RawVectors", "keeps_files", "require_raw_vectors"]


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
    parts = vectors if isinstance(vectors, list) else [vectors]
    dt = np.dtype(dtype)
    dim = parts[0].shape[1]
    n = sum(len(p) for p in parts)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": (n, dim)})

    def chunks():
        yield header.getvalue()
        for p in parts:
            for i in range(0, len(p), 65536):  # bounded memory for large merged files
                yield memoryview(np.ascontiguousarray(p[i : i + 65536], dtype=dt)).cast("B")

    return write_durable(path, chunks())


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
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CorruptStoreError(f"{rel}: vectors file referenced by the manifest is missing") from None
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
    return arr


class RawVectors:
    """The raw vectors of one version, read on demand from their ``.npy`` files.

    Files are memory-mapped (pages come from the OS page cache, not from this
    process's heap) and opened on first use, after their sha256 is checked
    against the manifest (``verify``; a handle opened with ``mmap=True`` skips
    the hash, which would read the whole file: run ``verify`` on such stores).
    Rows of purged chunks hold zeros (see docs/index.md, "Deletes").

    Parameters
    ----------
    root : Path
    entries : list of dict
        The manifest's ``vectors.files`` (``first_id``/``count``), tiling the ids.
    dim : int
    verify : bool, default True
        Check each file's sha256 when it is first used.
    """

    def __init__(self, root: Path, entries: list[dict], dim: int, *, verify: bool = True):
        self.root = root
        self.verify = verify
        self.entries = sorted(entries, key=lambda e: e["first_id"])
        self.dim = dim
        self._firsts = np.array([e["first_id"] for e in self.entries], dtype=np.int64)
        self._arrays: list[np.ndarray | None] = [None] * len(self.entries)
        self.end = int(self.entries[-1]["first_id"] + self.entries[-1]["count"]) if self.entries else 0

    def _array(self, i: int) -> np.ndarray:
        arr = self._arrays[i]
        if arr is None:
            arr = self._arrays[i] = load_vectors(self.root, self.entries[i], verify=self.verify)
            mm = getattr(arr, "_mmap", None)  # rows are read at random (re-ranking): no read-ahead
            if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
                try:
                    mm.madvise(mmap.MADV_RANDOM)
                except OSError:
                    pass
        return arr

    def rows(self, first: int, end: int) -> np.ndarray:
        """Vectors of chunk ids ``[first, end)``, shape (end - first, dim), float32."""
        out = np.zeros((max(0, end - first), self.dim), np.float32)
        for i, e in enumerate(self.entries):
            lo, hi = max(first, e["first_id"]), min(end, e["first_id"] + e["count"])
            if lo < hi:
                out[lo - first : hi - first] = self._array(i)[lo - e["first_id"] : hi - e["first_id"]]
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
                out[sel[order]] = self._array(int(i))[local[order]]
        return out.reshape(ids.shape + (self.dim,))
