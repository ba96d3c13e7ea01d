"""The Store: one directory on disk, opened for reading or by the one writer.

The Store composes the parts (manifest, LMDB chunk table, index segments, raw
vectors, chunker, embedder) and owns their lifetimes; no part reaches into
another's files. See docs/format.md for the on-disk layout and the commit
protocol.
"""

from __future__ import annotations

import datetime as _dt
import os
import stat
from pathlib import Path
from typing import Any, Iterable, Sequence

import faiss
import numpy as np

from . import _commit, _fileio, _manifest
from ._chunking import Chunk, Chunker
from ._chunks import LMDB_DIR, ChunkTable, RecordHasher
from ._embed import DEFAULT_MODEL_SHA256, Embedder, default_embedder, embed_chunks
from ._deletes import finish_purge
from ._index import Segment, load_segment
from ._maintenance import store_mmap, version_index
from ._metadata import clean_metadata
from ._reading import ReadMixin
from ._admin import AdminMixin

from .errors import (
    CorruptStoreError,
    EmbedderMismatchError,
    ForkedStoreError,
    FormatVersionError,
    InvalidDocumentError,
    InvalidEmbeddingsError,
    InvalidInputError,
    NotAStoreError,
    ReadOnlyStoreError,
    StoreClosedError,
)

__all__ = ["Store", "DEFAULTS"]

#: Store settings and their defaults (persisted in the manifest's "settings").
DEFAULTS: dict[str, Any] = {
    "retain_versions": 3,      # committed versions kept for open(version=...) and readers in flight
    "keep_vectors": True,      # keep raw vectors for reindex and recall measurement
    "vector_dtype": "float16", # dtype of the raw vectors files (half the bytes of float32)
}
_FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
INDEX_DIR = "index"
VECTORS_DIR = "vectors"
TOKENIZER = "tokenizer.json"
LOCK = "LOCK"
_GENESIS = "retrostore"  # seed of the LMDB content hash chain


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _readonly_media(root: Path) -> bool:
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


#: True in a process forked from one that imported retrostore. GNU OpenMP's
#: thread pool does not survive fork(): a child whose parent had run a parallel
#: FAISS search hangs in its own first one (seen in the fork test), so FAISS
#: runs single-threaded there.
_forked_child = False


def _after_fork_in_child() -> None:
    global _forked_child
    _forked_child = True
    faiss.omp_set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _genesis_chain() -> str:
    import hashlib

    return hashlib.sha256(_GENESIS.encode()).hexdigest()


def _fingerprint_diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    return "; ".join(f"{k}: store {a.get(k)!r} vs given {b.get(k)!r}" for k in keys if a.get(k) != b.get(k))


class Store(ReadMixin, AdminMixin):
    """An open retrostore store. Create with :func:`retrostore.create` or
    :func:`retrostore.open`; use as a context manager; ``close()`` is
    idempotent.

    A reader sees one committed version (``Store.version``) until
    :meth:`refresh`. The writer (``mode="a"``) appends with :meth:`append`
    and publishes with :meth:`commit`; appended data is invisible to every
    reader, including the writer's own searches, until then.
    """

    def __init__(self, path, *, mode="r", embedder=None, version=None, timeout_s=None, threads=None, mmap=None):
        if mode not in ("r", "a"):
            raise InvalidInputError(f"mode={mode!r} must be 'r' (read) or 'a' (append; the one writer)")
        if version is not None and (mode != "r" or not isinstance(version, int) or version < 0):
            raise InvalidInputError(f"version={version!r} must be an int >= 0 and needs mode='r'")
        self.path = Path(path)
        self.mode = mode
        self._pid = os.getpid()
        self._closed = False
        self._lock: _fileio.WriterLock | None = None
        self._table: ChunkTable | None = None
        self._pinned_version = version
        self._mmap_arg = None if mmap is None else bool(mmap)
        self.threads = int(threads) if threads else _cpu_count()
        faiss.omp_set_num_threads(1 if _forked_child else self.threads)
        if not (self.path / _manifest.MANIFEST).is_file():
            raise NotAStoreError(
                f"{self.path} is not a retrostore store (no {_manifest.MANIFEST}); create one with "
                "retrostore.create() or `retrostore build`"
            )
        self.readonly_media = _readonly_media(self.path)
        try:
            if mode == "a":
                if self.readonly_media:
                    raise ReadOnlyStoreError(f"{self.path} is on read-only media; open it with mode='r'")
                self._lock = _fileio.WriterLock(self.path / LOCK, timeout_s)
            if version is not None:
                self._check_committed(version)
            self._manifest = _manifest.read_manifest(self.path, version)
            m = self._manifest
            if mode == "a" and m["format_version"] > _manifest.FORMAT_VERSION:
                raise FormatVersionError(
                    f"{self.path} has format_version {m['format_version']}; this retrostore writes format version "
                    f"{_manifest.FORMAT_VERSION} and may only read it: open it with mode='r' or upgrade retrostore"
                )
            self._table = ChunkTable(self.path, m["tokenizer"]["token_dtype"], write=mode == "a",
                                     readonly_media=self.readonly_media,
                                     sealed=m["lmdb"].get("record_checksum") == "crc32")
            self._embedder = None
            self._bind_embedder(embedder)
            self._chunker: Chunker | None = None
            self._segments_cache: dict[str, Any] = {}  # sha256 -> loaded faiss.Index
            self._verified_vectors: set[str] = set()
            self._load_current()
            if mode == "a":
                self._recover()
                self._reset_pending()
        except BaseException:
            self._release()
            raise

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"mode={self.mode!r}, version={self._manifest['version']}"
        return f"<retrostore.Store {str(self.path)!r} {state}>"

    def close(self) -> None:
        """Close the store; safe to call twice. A writer's uncommitted appends are
        discarded (their LMDB records are removed)."""
        if self._closed:
            return
        if (self.mode == "a" and os.getpid() == self._pid and self._table is not None
                and (self._pending_chunks or self._pending_docs)):
            try:
                self._table.truncate(self._manifest["next_chunk_id"], self._manifest["next_doc_id"],
                                     self._manifest["version"])
            except Exception:
                pass  # the next writer removes them
        self._release()

    def _release(self) -> None:
        self._closed = True
        if self._table is not None:
            self._table.close()
            self._table = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _check(self, write: bool = False) -> None:
        if self._closed:
            raise StoreClosedError(f"{self.path} is closed; open it again with retrostore.open()")
        if os.getpid() != self._pid:
            raise ForkedStoreError(
                f"this handle to {self.path} was opened in process {self._pid} and used in process "
                f"{os.getpid()} after fork(); LMDB and FAISS handles do not survive fork: call "
                "retrostore.open() in the child"
            )
        if write and self.mode != "a":
            raise ReadOnlyStoreError(f"{self.path} is open read-only; open it with mode='a' to write")

    # -- embedder and chunker ----------------------------------------------
    def _bind_embedder(self, embedder) -> None:
        want = self._manifest["embedder"]
        if embedder is not None:
            from ._create import _check_embedder, _json_fingerprint

            _check_embedder(embedder)
            got = _json_fingerprint(embedder)
            # "name" is a label (often the file name); the weights are pinned by model_sha256.
            if {k: v for k, v in got.items() if k != "name"} != {k: v for k, v in want.items() if k != "name"}:
                raise EmbedderMismatchError(
                    f"the embedder given does not match the one {self.path} was built with "
                    f"({_fingerprint_diff(want, got)}); open it with the store's embedder"
                )
            self._embedder = embedder

    @property
    def embedder(self) -> Embedder:
        """The store's embedder (the default one is loaded on first use).

        Raises
        ------
        EmbedderMismatchError
            The store was built with another model and none was given to open().
        """
        if self._embedder is None:
            want = self._manifest["embedder"]
            if want.get("model_sha256") != DEFAULT_MODEL_SHA256:
                model = (f"model sha256 {want['model_sha256']}" if want.get("model_sha256")
                         else f"a {want.get('kind', 'custom')!r} embedder, no model file")
                raise EmbedderMismatchError(
                    f"{self.path} was built with the embedder {want.get('name', want.get('kind'))!r} "
                    f"({model}, dim {want.get('dim')}), not the default one, so this store cannot embed "
                    "text by itself: in Python pass the same embedder to open(embedder=...) (for an ONNX "
                    "model, OnnxEmbedder(model_path, tokenizer_path, ...)), or search with vectors from that "
                    "model (Store.search_vectors); the CLI embeds only with the default model"
                )
            emb = default_embedder(threads=self.threads)
            self._bind_embedder(emb)
        return self._embedder

    @property
    def chunker(self) -> Chunker:
        """The store's chunker (its own ``tokenizer.json`` and ``chunk_tokens``)."""
        if self._chunker is None:
            entry = self._manifest["tokenizer"]
            problem = _index_check_file(self.path, entry)
            if problem:
                raise CorruptStoreError(problem)
            self._chunker = Chunker(self.path / entry["path"], self._manifest["chunk_tokens"])
        return self._chunker

    # -- state -------------------------------------------------------------
    @property
    def version(self) -> int:
        """The committed version this handle sees."""
        return int(self._manifest["version"])

    @property
    def manifest(self) -> dict:
        """A copy of the current manifest body."""
        import copy

        return copy.deepcopy(self._manifest)

    def __len__(self) -> int:
        """Number of committed chunks."""
        return int(self._manifest["next_chunk_id"])

    def _check_committed(self, version: int) -> None:
        """Refuse a pinned version newer than the current one: its manifest copy
        belongs to a commit that failed or was interrupted before its commit point."""
        try:
            current = _manifest.read_manifest(self.path)["version"]
        except CorruptStoreError:
            return  # a damaged manifest.json: retained copies are self-checked and may be opened
        if version > current:
            raise NotAStoreError(
                f"version {version} of {self.path} was never committed (the newest committed version is "
                f"{current}); open without version= for the newest"
            )

    def _load_current(self) -> None:
        """Load the segments of the manifest read at open. A reader that finds a
        file gone (a writer committed and collected garbage meanwhile) reads
        the newer manifest and tries again."""
        for attempt in range(5):
            try:
                self._load_segments()
                return
            except CorruptStoreError:
                if self.mode == "a" or self._pinned_version is not None or attempt == 4:
                    raise
                newer = _manifest.read_manifest(self.path)
                if newer["version"] == self._manifest["version"]:
                    raise
                self._manifest = newer

    def _load_segments(self) -> None:
        """Load the current manifest's index segments (checksummed before FAISS
        reads them) and cheaply check every other referenced file: its path
        stays inside the store and its size is the manifest's."""
        m = self._manifest
        _manifest.safe_path(self.path, LMDB_DIR, _manifest.MANIFEST)
        for entry in _manifest.referenced_files(m):
            path = _manifest.safe_path(self.path, entry["path"], _manifest.MANIFEST)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise CorruptStoreError(f"{entry['path']}: missing (referenced by the manifest)") from None
            if size != entry["size"]:
                from ._artifact import git_lfs_pointer

                raise CorruptStoreError(
                    f"{entry['path']}: {size} bytes, the manifest says {entry['size']}; "
                    f"{git_lfs_pointer(path) or 'the file is damaged'}"
                )
        cache = {}
        segs = []
        for entry in m["index"]["segments"]:
            # Cached by content, but each entry gets its own Segment: two segments
            # can be byte-identical (the same vectors committed twice) while
            # covering different chunk ids.
            index = self._segments_cache.get(entry["sha256"])
            seg = Segment(entry, index) if index is not None else load_segment(
                self.path, entry, mmap=store_mmap(self), flat=m["index"]["factory"] == "Flat")
            cache[entry["sha256"]] = seg.index
            segs.append(seg)
        self._segments_cache = cache
        self._index, self._tombstones = version_index(self, segs)

    def refresh(self) -> int:
        """Move a reader to the newest committed version.

        Returns
        -------
        int
            The version now seen.

        Raises
        ------
        CorruptStoreError
            The new manifest or a file it references is damaged.
        """
        self._check()
        if self.mode == "a" or self._pinned_version is not None:
            return self.version
        for attempt in range(5):
            m = _manifest.read_manifest(self.path)
            if m["version"] == self._manifest["version"]:
                return self.version
            old = self._manifest
            self._manifest = m
            try:
                self._load_segments()
                return self.version
            except CorruptStoreError:
                # A writer may have garbage-collected files of a version that was
                # current when we read the manifest; read it again.
                self._manifest = old
                if attempt == 4:
                    raise
        return self.version

    # -- writing -----------------------------------------------------------
    def _reset_pending(self) -> None:
        self._pending_vectors: list[np.ndarray] = []
        self._pending_chunks = 0
        self._pending_docs = 0
        self._pending_deletes: set[int] = set()
        self._hasher = RecordHasher()
        self._pending_fields: dict[str, Any] = {}  # top-level manifest fields the next commit sets
        # Per appended batch, its vectors already encoded by the store's template (a sharded build's
        # shards), or None: the commit adopts them when every batch has them (_maintenance.commit_index).
        self._pending_codes: list[Any] = []

    def _recover(self) -> None:
        """Writer start-up: remove what a crashed writer left behind."""
        m = self._manifest
        self._table.truncate(m["next_chunk_id"], m["next_doc_id"], m["version"])
        self._table.sync()
        finish_purge(self)
        _commit.collect_garbage(self)

    def append(
        self,
        docs: str | Iterable[str],
        *,
        metadata: Any = None,
        embeddings: np.ndarray | None = None,
        chunks: Sequence[Sequence[Chunk]] | None = None,
    ) -> list[int]:
        """Chunk, embed and stage documents; they become visible at :meth:`commit`.

        Parameters
        ----------
        docs : str or iterable of str
            Documents. Empty or whitespace-only documents get an id and no chunks.
        metadata : JSON-like or sequence of JSON-like, optional
            One value per document (a single value when ``docs`` is one string).
            Accepted: ``None``, ``bool``, ``int`` (int64/uint64 range), finite
            ``float``, ``str``, ``list``/``tuple`` (stored as lists), ``dict`` with
            ``str`` keys, nested at most 64 levels; numpy scalars and arrays are
            converted to their Python equivalents.
        embeddings : ndarray, shape (n_chunks, dim), optional
            Precomputed vectors, one row per chunk in order (for users who embed
            elsewhere). float64 is converted to float32; NaN/inf rejected.
        chunks : list of list of chunks, optional
            The documents' chunks as ``store.chunker.chunk_many(docs)`` made
            them (see :meth:`Chunker.chunk`), for a caller who chunked already
            (to count or embed the chunks): the documents are then not
            tokenized again. Checked by :meth:`Chunker.check_chunks` (tiling
            spans, token counts and range, the shortest document re-chunked),
            not re-tokenized in full: token ids that are not those of their
            text are found later only by ``verify(retokenize=True)``. One list
            when ``docs`` is one string.

        Returns
        -------
        list of int
            The documents' ids, in order.

        Raises
        ------
        InvalidDocumentError
            A document is not a ``str``.
        InvalidMetadataError
            Metadata count differs from documents, or a value cannot round-trip.
        InvalidEmbeddingsError
            Wrong shape, dimension or non-finite values.
        InvalidInputError
            ``chunks`` are not this store's chunker's chunks of ``docs``.
        ReadOnlyStoreError, StoreClosedError, ForkedStoreError
        """
        self._check(write=True)
        single = isinstance(docs, str)
        if single:
            docs = [docs]
            metas = [metadata]
        else:
            if isinstance(docs, (bytes, bytearray)) or not isinstance(docs, Iterable):
                raise InvalidDocumentError(
                    f"docs is a {type(docs).__name__}; pass a str or an iterable of str (decode bytes first)"
                )
            docs = list(docs)
            if metadata is None:
                metas = [None] * len(docs)
            else:
                if isinstance(metadata, (dict, str)) or not isinstance(metadata, Sequence):
                    raise InvalidInputError(
                        "metadata must be a sequence with one value per document when docs is a list "
                        f"(got a {type(metadata).__name__})"
                    )
                metas = list(metadata)
                if len(metas) != len(docs):
                    raise InvalidInputError(f"{len(metas)} metadata values for {len(docs)} documents; give one each")
        for i, d in enumerate(docs):
            if not isinstance(d, str):
                raise InvalidDocumentError(
                    f"document {i} is a {type(d).__name__}, not a str; decode bytes and convert values to text"
                )
        metas = [clean_metadata(v, f"metadata[{i}]") for i, v in enumerate(metas)]
        if chunks is None:
            per_doc = self.chunker.chunk_many(docs)
        else:
            per_doc = self.chunker.check_chunks(docs, [chunks] if single else chunks)
        return self._append_chunked(docs, per_doc, metas, embeddings)

    def _append_chunked(self, docs: list[str], per_doc: list, metas: list, embeddings: np.ndarray | None) -> list[int]:
        """Stage documents already cut by this store's chunker (``append``'s second half).

        ``metas`` must already be cleaned. Sharded builds (``retrostore._distributed``)
        merge their shards through here, so merged records are byte-identical to
        those ``append`` writes, without tokenizing again.
        """
        n_chunks = sum(len(c) for c in per_doc)
        vectors = self._vectors_for(docs, per_doc, n_chunks, embeddings)

        m = self._manifest
        next_chunk = m["next_chunk_id"] + self._pending_chunks
        next_doc = m["next_doc_id"] + self._pending_docs
        chunk_recs: list[tuple[bytes, bytes]] = []
        doc_recs: list[tuple[bytes, bytes]] = []
        ids = list(range(next_doc, next_doc + len(docs)))
        for doc_id, text, chunks, meta in zip(ids, docs, per_doc, metas):
            chunk_recs += self._table.pack_chunks(next_chunk, doc_id, text, chunks)
            doc_recs.append(self._table.pack_doc(doc_id, next_chunk, len(chunks), meta, None if chunks else text))
            next_chunk += len(chunks)
        self._table.put_records(chunk_recs, doc_recs)
        self._hasher.add(chunk_recs, doc_recs)
        if n_chunks:
            self._pending_vectors.append(vectors)
        self._pending_chunks += n_chunks
        self._pending_docs += len(docs)
        return ids

    def _vectors_for(self, docs, per_doc, n_chunks: int, embeddings) -> np.ndarray:
        dim = self._manifest["index"]["dim"]
        if embeddings is not None:
            arr = np.asarray(embeddings)
            if arr.ndim != 2 or arr.shape != (n_chunks, dim):
                raise InvalidEmbeddingsError(
                    f"embeddings have shape {arr.shape}; these documents make {n_chunks} chunks and the store's "
                    f"dimension is {dim}, so shape ({n_chunks}, {dim}) is needed (one row per chunk, in order)"
                )
            if not np.issubdtype(arr.dtype, np.floating):
                raise InvalidEmbeddingsError(f"embeddings have dtype {arr.dtype}; a float dtype is needed")
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        else:
            if n_chunks == 0:
                return np.zeros((0, dim), np.float32)
            arr = embed_chunks(self.embedder, self._manifest["tokenizer"]["sha256"], docs, per_doc)
            if arr.shape != (n_chunks, dim):
                raise InvalidEmbeddingsError(f"the embedder returned shape {arr.shape}, expected ({n_chunks}, {dim})")
        # max/min propagate NaN and reach inf: one pass each, no temporary array
        hi, lo = (float(arr.max()), float(arr.min())) if arr.size else (0.0, 0.0)
        if not (np.isfinite(hi) and np.isfinite(lo)):
            bad = int(np.argwhere(~np.isfinite(arr))[0][0])
            raise InvalidEmbeddingsError(f"embeddings row {bad} holds NaN or inf; every value must be finite")
        peak = max(hi, -lo)
        if self._manifest["vectors"]["dtype"] == "float16" and peak > _FLOAT16_MAX:
            bad = int(np.argmax(np.abs(arr).max(axis=1)))
            raise InvalidEmbeddingsError(
                f"embeddings row {bad} holds {peak:.6g}, beyond float16's largest value {_FLOAT16_MAX:g}; the "
                "store keeps vectors as float16 (raw vectors files, Flat segments): normalise the vectors, or "
                "create the store with vector_dtype='float32'"
            )
        return arr

    def commit(self) -> int:
        """Publish everything appended since the last commit as a new version.

        All or nothing: every new file is written and fsynced, LMDB is synced,
        then the manifest is atomically replaced (docs/format.md, "Commit
        protocol and guarantees"). With nothing appended, returns the current
        version. Its cost is proportional to the batch (plus, amortised, the
        tiered segment merges), not to the number of earlier versions.

        Returns
        -------
        int
            The new version number.

        Raises
        ------
        CommitError
            An I/O error (ENOSPC, EIO, ...); the previous version is intact and
            the appended data stays staged for a later ``commit()``. In the one
            case where the failure left it unknown which version is current,
            the message says so and this handle is closed: open the store again.
        """
        self._check(write=True)
        return _commit.commit(self)

    def _write_segment(self, index, tag: str, first_id: int, count: int, new_files: list, half=None) -> dict:
        """Write one index segment of a commit (see :mod:`retrostore._commit`)."""
        return _commit._write_segment(self, index, tag, first_id, count, new_files, half)

    def _collect_garbage(self) -> None:
        """Drop unretained manifests and unreferenced files (see :mod:`retrostore._commit`)."""
        _commit.collect_garbage(self)


def _index_check_file(root: Path, entry: dict) -> str | None:
    from ._index import check_file

    return check_file(root, entry)
