"""Raw vector files: the embeddings as computed, kept beside the index.

Each commit writes its batch as one ``.npy`` file (float16 by default) under
``vectors/``, covering chunk ids ``[first_id, first_id + count)``. They let the
index be retrained or rebuilt without re-embedding and recall be measured
against exact search. ``.npy`` is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ._fileio import sha256_file, write_durable
from .errors import CorruptStoreError

__all__ = ["write_vectors", "load_vectors"]


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
        from ._artifact import git_lfs_pointer

        lfs = git_lfs_pointer(path)
        raise CorruptStoreError(f"{rel}: vectors file is {size} bytes, the manifest says {entry['size']}"
                                + (f"; {lfs}" if lfs else ""))
    if verify:
        _size, sha = sha256_file(path)
        if sha != entry["sha256"]:
            raise CorruptStoreError(
                f"{rel}: vectors file checksum mismatch (manifest {entry['sha256'][:16]}..., file {sha[:16]}...); "
                "it is damaged"
            )
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CorruptStoreError(f"{rel}: not a readable .npy vectors file ({exc})") from exc
    if arr.ndim != 2 or arr.shape[0] != entry["count"]:
        raise CorruptStoreError(f"{rel}: holds shape {arr.shape}, the manifest says {entry['count']} rows")
    return arr
