"""Index segment files: writing, checking and loading them, and their codecs.

A store's vectors live in one or more *segments*: immutable FAISS index files,
each covering a range of chunk ids ``[first_id, end_id)``. A segment's FAISS
id plus ``first_id`` is the chunk id. Segments built by a commit hold their
batch in order (FAISS's sequential ids, so every factory string works, even
those that cannot take ids, such as HNSW); segments rewritten by ``compact``
or ``reindex`` after deletes have holes: IVF indexes store the ids natively,
other indexes are wrapped in ``IndexIDMap``.

Checksums are verified before FAISS deserialises any file. A Flat segment of a
float16 store is stored as float16 (codec :data:`FP16`, format 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ..errors import CorruptStoreError
from .faisstypes import FLAT_TYPES, is_exact, split_idmap, with_idmap
from .fileio import DurableWriter, git_lfs_pointer, regular_file, sha256_file, unreadable
from .layout import segment_name
from .memory import huge_pages

__all__ = [
    "FP16", "Segment", "write_index", "write_segment", "load_segment", "check_file", "flat_fp16",
    "fp16_codes", "fp16_flat",
]

#: ``codec`` of a segment entry whose exact (Flat) index is stored as float16: the file is a
#: FAISS ``IndexScalarQuantizer`` of type ``QT_fp16`` (maybe in an ``IndexIDMap``), read back
#: into a float32 ``IndexFlat`` holding exactly the same values (docs/format.md, "Index segments").
FP16 = "fp16"


@dataclass
class Segment:
    """A loaded segment: its manifest entry and the FAISS index."""

    entry: dict
    index: faiss.Index

    @property
    def first_id(self) -> int:
        return int(self.entry["first_id"])

    @property
    def count(self) -> int:
        """Vectors in the segment (``ntotal``)."""
        return int(self.entry["count"])

    @property
    def end_id(self) -> int:
        """One past the last chunk id the segment covers (``first_id + count`` without holes)."""
        return int(self.entry.get("end_id", self.first_id + self.count))

    @property
    def holes(self) -> bool:
        return self.end_id - self.first_id != self.count

    @property
    def exact(self) -> bool:
        """Whether the segment holds the stored vectors losslessly (:func:`is_exact`, or a
        segment of codec :data:`FP16`, served as its ``SQfp16`` index when memory-mapped)."""
        return is_exact(self.index) or self.entry.get("codec") == FP16


def _is_sq_fp16(index: faiss.Index) -> bool:
    return isinstance(index, faiss.IndexScalarQuantizer) and index.sq.qtype == faiss.ScalarQuantizer.QT_fp16


def _codes(index: faiss.Index, dtype: type) -> np.ndarray:
    """Zero-copy (ntotal, d) view of an ``IndexFlatCodes``' codes as ``dtype``."""
    raw = faiss.rev_swig_ptr(index.codes.data(), index.codes.size()) if index.ntotal else np.zeros(0, np.uint8)
    return raw.view(dtype).reshape(index.ntotal, index.d)


def _filled(inner: faiss.Index, values: np.ndarray, like: faiss.Index | None) -> faiss.Index:
    """Empty ``IndexFlatCodes`` ``inner`` holding ``values`` (ntotal, d) as its codes (cast to
    its code type), in a copy of ``like``'s ID map (none when ``like`` is None)."""
    wrapped = with_idmap(inner) if like is not None else inner  # FAISS wraps only an empty index
    n = len(values)
    inner.codes.resize(n * inner.code_size)
    inner.ntotal = n
    _codes(inner, np.float32 if inner.code_size == 4 * inner.d else np.float16)[...] = values
    if like is not None:
        faiss.copy_array_to_vector(faiss.vector_to_array(like.id_map), wrapped.id_map)
        wrapped.ntotal = n
    return wrapped


def flat_fp16(index: faiss.Index) -> faiss.Index | None:
    """The float16 form of a plain (or ID-mapped) Flat index, for writing; None for other indexes.

    ``index``'s own float32 values are first rounded to float16 in place, so
    the index in memory holds exactly what its file holds (a handle that
    wrote the segment and one that reads it search the same vectors).

    Returns
    -------
    faiss.IndexScalarQuantizer (``QT_fp16``, the same metric), in the ID map
    ``index`` had; or None when ``index`` is not an ``IndexFlat``.
    """
    inner, idmap = split_idmap(index)
    if type(inner) not in FLAT_TYPES:
        return None
    values = _codes(inner, np.float32)
    half = values.astype(np.float16)
    values[...] = half
    return fp16_codes(half, inner.metric_type, idmap)


def fp16_codes(half: np.ndarray, metric: int, idmap: faiss.Index | None = None) -> faiss.Index:
    """An ``SQfp16`` index whose codes are ``half`` (n, dim) float16 (FAISS ``metric``), in a copy
    of ``idmap``'s ID map when given: what an fp16 segment file holds."""
    sq = faiss.IndexScalarQuantizer(half.shape[1], faiss.ScalarQuantizer.QT_fp16, metric)
    return _filled(sq, half, idmap)


def fp16_flat(half: np.ndarray, metric: int, idmap: faiss.Index | None = None) -> faiss.Index:
    """A float32 ``IndexFlat`` (FAISS ``metric``) holding exactly the values of ``half`` (n, dim)
    float16, in a copy of ``idmap``'s ID map when given: an fp16 segment as it is searched."""
    return _filled(faiss.IndexFlat(half.shape[1], metric), half, idmap)


def write_index(path: Path, index: faiss.Index) -> tuple[int, str]:
    """Write ``index`` as a new durable file; returns its size and sha256.

    FAISS streams the index into :class:`retrostore.storage.fileio.DurableWriter`
    (``PyCallbackIOWriter``): no in-memory copy of the file, which
    ``faiss.serialize_index`` makes twice (its writer's buffer, then the
    numpy array), so a commit of a large segment needs no extra memory the
    size of it. An OSError from a write (ENOSPC, EIO) comes through as itself.
    """
    with DurableWriter(path) as out:
        faiss.write_index(index, faiss.PyCallbackIOWriter(out.write))
    return out.size, out.sha256


def load_segment(root: Path, entry: dict, *, verify: bool = True, mmap: bool = False, flat: bool = False) -> Segment:
    """Load a segment (or template) file after checking its size and sha256.

    The file is hashed block by block, then FAISS reads it (one copy in
    memory) or, with ``mmap=True``, maps it (``IO_FLAG_MMAP_IFC``): the codes
    stay on disk and pages come in on demand. Store files are never modified
    in place (a commit writes new ones), so the hash holds for what is read.
    A segment of codec :data:`FP16` is read into a float32 ``IndexFlat``
    (searched like any Flat index); mapped, it is served as the file's
    ``SQfp16`` index, an exact scan of the same float16 values. ``flat``:
    the store's factory is ``"Flat"``, so a segment without a codec must be
    a Flat index.

    Raises
    ------
    CorruptStoreError
        Missing file, wrong size or checksum, FAISS cannot read it, or it is
        not what the manifest says (its codec, a Flat store's index type).
    """
    rel = entry["path"]
    path = root / rel
    st = regular_file(path, rel)
    if st is None:
        raise CorruptStoreError(f"{rel}: index file referenced by the manifest is missing")
    size = st.st_size
    if size != entry["size"]:
        raise CorruptStoreError(f"{rel}: index file is {size} bytes, the manifest says {entry['size']}; "
                                f"{git_lfs_pointer(path) or 'it is damaged'}")
    # Hash block by block, then let FAISS read (or map) the file itself: one copy of the
    # index in memory, where reading it into numpy and deserializing held three.
    try:
        actual = sha256_file(path)[1] if verify else entry["sha256"]
    except OSError as exc:
        raise unreadable(rel, exc) from exc
    if actual != entry["sha256"]:
        raise CorruptStoreError(
            f"{rel}: index file checksum mismatch (manifest {entry['sha256'][:16]}..., "
            f"file {actual[:16]}...); it is damaged"
        )
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC) if mmap else faiss.read_index(str(path))
    except RuntimeError as exc:
        wrote = entry.get("faiss")
        newer = (f"; it was written by FAISS {wrote} and this is FAISS {faiss.__version__}: upgrade faiss-cpu"
                 if wrote and wrote != faiss.__version__ else "")
        raise CorruptStoreError(f"{rel}: FAISS cannot read the index file ({' '.join(str(exc).split())}){newer}") \
            from exc
    codec = entry.get("codec")
    inner, idmap = split_idmap(index)
    if codec is not None:
        if codec != FP16:
            raise CorruptStoreError(f"{rel}: the manifest gives it codec {codec!r}; the only codec is {FP16!r} "
                                    "(format 3): the manifest is damaged")
        if not _is_sq_fp16(inner):
            raise CorruptStoreError(f"{rel}: the manifest says codec {FP16!r}, but the file holds a "
                                    f"{type(inner).__name__}, not a float16 scalar quantizer")
        if not mmap:
            index = fp16_flat(_codes(inner, np.float16), inner.metric_type, idmap)
    elif flat and type(inner) not in FLAT_TYPES:
        raise CorruptStoreError(f"{rel}: the store's index is Flat, but the file holds a "
                                f"{type(inner).__name__} and the manifest gives it no codec")
    if "count" in entry and index.ntotal != entry["count"]:
        raise CorruptStoreError(f"{rel}: index holds {index.ntotal} vectors, the manifest says {entry['count']}")
    flat_index = split_idmap(index)[0]
    if not mmap and type(flat_index) in FLAT_TYPES and flat_index.ntotal:  # exact search reads it all per query
        huge_pages(faiss.rev_swig_ptr(flat_index.get_xb(), flat_index.ntotal * flat_index.d))
    return Segment(entry, index)


def check_file(root: Path, entry: dict) -> str | None:
    """Size and sha256 check of one referenced file; a problem line or None."""
    rel = entry["path"]
    path = root / rel
    try:
        if regular_file(path, rel) is None:
            return f"{rel}: missing (referenced by the manifest)"
        size, sha = sha256_file(path)
    except CorruptStoreError as exc:
        return str(exc)
    except OSError as exc:
        return str(unreadable(rel, exc))
    if size != entry["size"]:
        lfs = git_lfs_pointer(path)
        return f"{rel}: {size} bytes, the manifest says {entry['size']}" + (f"; {lfs}" if lfs else "")
    if sha != entry["sha256"]:
        return f"{rel}: checksum mismatch (manifest {entry['sha256'][:16]}..., file {sha[:16]}...)"
    return None


def write_segment(root: Path, index: faiss.Index | None, tag: str, first_id: int, count: int,
                  new_files: list, *, vector_dtype: str, half: faiss.Index | None = None) -> dict:
    """Write ``index`` as the new segment file ``index/seg-<tag>.faiss``; its manifest entry.

    A Flat index of a store whose ``vector_dtype`` is float16 is written as
    float16 (codec :data:`FP16`, :func:`flat_fp16`, which rounds ``index`` in
    place to what the file holds): half the bytes, the precision the store
    keeps its raw vectors at. ``half``: that float16 form, when the caller
    built it already (``index`` may then be None). The path is appended to
    ``new_files`` before anything is written, so that a failed commit removes it.

    Returns
    -------
    dict
        ``{"path", "size", "sha256", "first_id", "count"}`` (and ``"codec"``).
    """
    rel = segment_name(tag)
    path = root / rel
    path.unlink(missing_ok=True)  # left by a failed attempt at this same version: never referenced
    new_files.append(path)
    if half is None and vector_dtype == "float16":
        half = flat_fp16(index)
    size, sha = write_index(path, index if half is None else half)
    entry = {"path": rel, "size": size, "sha256": sha, "first_id": first_id, "count": count,
             "faiss": faiss.__version__}
    if half is not None:
        entry["codec"] = FP16
    return entry
