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
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import faiss
import numpy as np

from . import _commit, _fileio, _manifest
from ._chunking import Chunker
from ._chunks import LMDB_DIR, ChunkTable, RecordHasher
from ._embed import DEFAULT_MODEL_SHA256, Embedder, default_embedder, embed_chunks
from ._deletes import finish_purge
from ._index import Segment, load_segment
from ._maintenance import store_mmap, stored_vectors, version_index
from ._metadata import clean_metadata
from ._params import check_params
from ._types import Chunk, Document, Hit

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

if TYPE_CHECKING:
    from ._retro import Neighbors

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


class Store:
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
                raise EmbedderMismatchError(
                    f"{self.path} was built with the embedder {want.get('name', want.get('kind'))!r} "
                    f"(model sha256 {want.get('model_sha256')}, dim {want.get('dim')}); pass "
                    "embedder=OnnxEmbedder(model_path, tokenizer_path, ...) with that model file to open()"
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
            seg = Segment(entry, index) if index is not None else load_segment(self.path, entry, mmap=store_mmap(self))
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
    ) -> list[int]:
        """Chunk, embed and stage documents; they become visible at :meth:`commit`.

        Parameters
        ----------
        docs : str or iterable of str
            Documents. Empty or whitespace-only documents get an id and no chunks.
        metadata : JSON-like or sequence of JSON-like, optional
            One value per document (a single value when ``docs`` is one string).
            Numpy scalars are converted; see :func:`retrostore._metadata.clean_metadata`.
        embeddings : ndarray, shape (n_chunks, dim), optional
            Precomputed vectors, one row per chunk in order (for users who embed
            elsewhere). float64 is converted to float32; NaN/inf rejected.

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
        return self._append_chunked(docs, self.chunker.chunk_many(docs), metas, embeddings)

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
        chunk_recs: list[tuple[int, bytes]] = []
        doc_recs: list[tuple[int, bytes]] = []
        ids = []
        for text, chunks, meta in zip(docs, per_doc, metas):
            first = next_chunk
            for c in chunks:
                rec = self._table.pack_chunk(next_chunk, next_doc, c.position, c.start, text[c.start : c.end],
                                             c.token_ids)
                chunk_recs.append((next_chunk, rec))
                next_chunk += 1
            drec = self._table.pack_doc(next_doc, first, len(chunks), meta, None if chunks else text)
            doc_recs.append((next_doc, drec))
            ids.append(next_doc)
            next_doc += 1
        self._table.put_records(chunk_recs, doc_recs)
        for cid, rec in chunk_recs:
            self._hasher.add_chunk(cid, rec)
        for did, rec in doc_recs:
            self._hasher.add_doc(did, rec)
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
        if not np.isfinite(arr).all():
            bad = int(np.argwhere(~np.isfinite(arr))[0][0])
            raise InvalidEmbeddingsError(f"embeddings row {bad} holds NaN or inf; every value must be finite")
        if self._manifest["settings"]["keep_vectors"] and self._manifest["vectors"]["dtype"] == "float16" and len(arr):
            peak = float(np.abs(arr).max())
            if peak > _FLOAT16_MAX:
                bad = int(np.argmax(np.abs(arr).max(axis=1)))
                raise InvalidEmbeddingsError(
                    f"embeddings row {bad} holds {peak:.6g}, beyond float16's largest value {_FLOAT16_MAX:g}; the "
                    "store keeps raw vectors as float16: normalise the vectors, or create the store with "
                    "vector_dtype='float32'"
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

    def _write_segment(self, index, tag: str, first_id: int, count: int, new_files: list) -> dict:
        """Write one index segment of a commit (see :mod:`retrostore._commit`)."""
        return _commit._write_segment(self, index, tag, first_id, count, new_files)

    def _collect_garbage(self) -> None:
        """Drop unretained manifests and unreferenced files (see :mod:`retrostore._commit`)."""
        _commit.collect_garbage(self)


    # -- reading -----------------------------------------------------------
    def _limit(self) -> int:
        return int(self._manifest["next_chunk_id"])

    def get_chunks(self, chunk_ids: Iterable[int]) -> list[Chunk]:
        """Committed chunks by id.

        Parameters
        ----------
        chunk_ids : iterable of int

        Returns
        -------
        list of Chunk

        Raises
        ------
        InvalidInputError
            An id is negative or not committed (``>= len(store)``).
        """
        self._check()
        ids = [int(i) for i in chunk_ids]
        limit = self._limit()
        for i in ids:
            if not 0 <= i < limit:
                raise InvalidInputError(f"chunk id {i} is outside the committed range [0, {limit})")
        self._tombstones.check_chunks(ids)
        return [Chunk(r.chunk_id, r.doc_id, r.position, r.start, r.text, r.token_ids)
                for r in self._table.get_chunks(ids, limit)]

    def get_document(self, doc_id: int) -> Document:
        """A committed document: its exact text (joined chunk spans) and metadata.

        Raises
        ------
        InvalidInputError
            ``doc_id`` is negative or not committed.
        """
        self._check()
        limit = int(self._manifest["next_doc_id"])
        if not isinstance(doc_id, (int, np.integer)) or not 0 <= int(doc_id) < limit:
            raise InvalidInputError(f"document id {doc_id!r} is outside the committed range [0, {limit})")
        self._tombstones.check_docs([doc_id])
        rec = self._table.get_doc(int(doc_id))
        if rec is None:
            raise CorruptStoreError(f"{LMDB_DIR}/data.mdb: committed document {doc_id} is missing")
        ids = range(rec.first_chunk, rec.first_chunk + rec.n_chunks)
        if rec.text is not None:
            text = rec.text
        else:
            text = "".join(r.text for r in self._table.iter_chunks(ids.start, ids.stop))
        return Document(int(doc_id), text, rec.metadata, ids)

    def get_metadata(self, doc_ids: Iterable[int]) -> list[Any]:
        """Metadata of committed documents (without reading their text).

        Raises
        ------
        InvalidInputError
            An id is negative or not committed.
        """
        self._check()
        limit = int(self._manifest["next_doc_id"])
        out = []
        for d in doc_ids:
            if not 0 <= int(d) < limit:
                raise InvalidInputError(f"document id {d!r} is outside the committed range [0, {limit})")
            self._tombstones.check_docs([d])
            rec = self._table.get_doc(int(d))
            if rec is None:
                raise CorruptStoreError(f"{LMDB_DIR}/data.mdb: committed document {d} is missing")
            out.append(rec.metadata)
        return out

    def search_vectors(self, vectors: np.ndarray, k: int = 5, *,
                       params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest committed chunks of query vectors.

        Parameters
        ----------
        vectors : ndarray, shape (n, dim) or (dim,)
            Query vectors; float64 is converted to float32.
        k : int, default 5
        params : dict, optional
            Search parameters for this call, over the store's (``nprobe``,
            ``efSearch``, ``rerank``, ...; see docs/index.md).

        Returns
        -------
        scores : ndarray, shape (n, k), float32
        chunk_ids : ndarray, shape (n, k), int64
            -1 where fewer than k chunks exist or the probed IVF lists hold
            fewer (never looked up). Deleted chunks are never returned.

        Raises
        ------
        InvalidInputError
            ``k < 1``, wrong dimension, or non-finite values.
        """
        self._check()
        k = _check_k(k)
        dim = self._manifest["index"]["dim"]
        q = np.asarray(vectors)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != dim or not np.issubdtype(q.dtype, np.number):
            raise InvalidInputError(f"query vectors have shape {q.shape} and dtype {q.dtype}; expected (n, {dim}) floats")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if not np.isfinite(q).all():
            raise InvalidInputError("query vectors hold NaN or inf; every value must be finite")
        return self._index.search(q, k, check_params(params))

    def search(self, query: str | Sequence[str], k: int = 5, *,
               params: dict | None = None) -> list[Hit] | list[list[Hit]]:
        """Embed query text and return the k nearest chunks with continuations.

        Parameters
        ----------
        query : str or sequence of str
        k : int, default 5
        params : dict, optional
            Search parameters for this call (see :meth:`search_vectors`).

        Returns
        -------
        list of Hit (for one string) or list of list of Hit (for a sequence),
        nearest first; fewer than k when the store holds fewer chunks.

        Raises
        ------
        InvalidInputError
            ``k < 1`` or a query that is not a str.
        EmbedderMismatchError
            The store's embedder is not available (see :attr:`embedder`).
        """
        self._check()
        k = _check_k(k)
        single = isinstance(query, str)
        queries = [query] if single else list(query)
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                raise InvalidInputError(f"query {i} is a {type(q).__name__}, not a str")
        if not queries:
            return []
        if self._limit() == 0:
            return [] if single else [[] for _ in queries]
        params = check_params(params)
        vecs = self.embedder.embed(queries)
        scores, ids = self.search_vectors(vecs, k, params=params)
        hits = self._hits(scores, ids)
        return hits[0] if single else hits

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        limit = self._limit()
        flat = [int(i) for i in ids.ravel() if i >= 0]
        wanted = self._tombstones.drop(sorted(set(flat) | {i + 1 for i in flat if i + 1 < limit}))
        recs = dict(zip(wanted, self._table.get_chunks(wanted, limit)))
        out = []
        for row_s, row_i in zip(scores, ids):
            row = []
            for s, i in zip(row_s, row_i):
                if i < 0:
                    continue
                r = recs[int(i)]
                nxt = recs.get(int(i) + 1)
                if nxt is not None and nxt.doc_id != r.doc_id:
                    nxt = None
                row.append(Hit(r.chunk_id, r.doc_id, r.position, float(s), r.text, r.token_ids,
                               nxt.text if nxt else "", nxt.token_ids if nxt else np.zeros(0, np.int64)))
            out.append(row)
        return out

    def neighbors(self, token_ids: Any, k: int = 2, *, exclude_doc_ids: Any = None) -> "Neighbors":
        """RETRO neighbours with continuations for every chunk of token sequences.

        Each row of ``token_ids`` is cut into chunks of ``chunk_tokens``; each
        chunk is embedded (token ids fed directly when the chunk tokenizer is
        the embedder's, else decoded and re-tokenized by the embedder) and its k
        nearest committed chunks are returned with their continuations
        (Borgeaud et al. 2021, §2.2-2.4).

        Parameters
        ----------
        token_ids : array-like of int, shape (B, L) or (L,)
            Ids in the store's chunk-tokenizer space. L should be a multiple of
            ``chunk_tokens``; a ragged tail (L % chunk_tokens tokens) is queried
            as one shorter chunk, so C = ceil(L / chunk_tokens).
        k : int, default 2
            Neighbours per chunk (RETRO trains with k = 2).
        exclude_doc_ids : sequence of length B, optional
            Per row: a doc id, an iterable of doc ids, or None. Neighbours from
            those documents are skipped; extra candidates are fetched so that k
            neighbours are still returned when the store has them.

        Returns
        -------
        Neighbors
            ``tokens`` (B, C, k, 2 * chunk_tokens) int64, ``mask`` of the same
            shape (bool), ``chunk_ids`` / ``doc_ids`` (B, C, k) int64 (-1 where
            fewer than k exist), ``scores`` (B, C, k) float32.

        Raises
        ------
        InvalidInputError
            Bad shape, non-integer or out-of-vocabulary ids, ``k < 1``, or
            ``exclude_doc_ids`` of the wrong length.
        EmbedderMismatchError
            The store's embedder is not available.
        """
        self._check()
        from ._retro import neighbors

        return neighbors(self, token_ids, k, exclude_doc_ids=exclude_doc_ids)

    def precompute_neighbors(
        self,
        out: str | os.PathLike,
        *,
        k: int = 2,
        exclude_same_doc: bool = False,
        batch_size: int = 1024,
        queries: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> Path:
        """Write the k nearest chunk ids of every chunk (or of a token file) to ``.npy``.

        For every committed chunk, its stored vector is searched (no
        re-embedding) and its k nearest chunk ids are written, excluding chunks
        of its own document when ``exclude_same_doc`` (RETRO's training setup,
        Borgeaud et al. 2021, §2.4). Resumable: rows are written to
        ``OUT.partial`` with progress in ``OUT.progress.json``; running again
        with the same arguments continues where it stopped, and the finished
        file is renamed to ``OUT``.

        Parameters
        ----------
        out : path-like
            Destination ``.npy``: int64, shape (N, k) for the store's chunks, or
            (n, L / chunk_tokens, k) for ``queries``; -1 padded. Loads with
            ``np.load(out, mmap_mode="r")``.
        k : int, default 2
        exclude_same_doc : bool, default False
            Store chunks only.
        batch_size : int, default 1024
            Query chunks per search call.
        queries : path-like, optional
            ``.npy`` of int token ids shaped (n, L), L a multiple of ``chunk_tokens``.
        progress : bool, default True
            Show a tqdm progress bar.

        Returns
        -------
        Path
            ``out``.

        Raises
        ------
        InvalidInputError
            Bad ``k``, ``batch_size`` or query file.
        """
        self._check()
        from ._retro import precompute_neighbors

        return precompute_neighbors(self, out, k=k, exclude_same_doc=exclude_same_doc, batch_size=batch_size,
                                    queries=queries, progress=progress)

    def _all_doc_ids(self) -> np.ndarray:
        """Document id of every committed chunk, (N,) int64, cached per version."""
        key = (self.version, len(self))
        if getattr(self, "_doc_ids_cache", (None,))[0] != key:
            self._doc_ids_cache = (key, self._table.chunk_doc_ids(len(self), int(self._manifest["next_doc_id"])))
        return self._doc_ids_cache[1]

    def _doc_ids_of(self, chunk_ids: np.ndarray) -> np.ndarray:
        return self._all_doc_ids()[np.asarray(chunk_ids, dtype=np.int64)]

    def _stored_vectors(self, first: int, end: int) -> np.ndarray:
        """Vectors of chunks [first, end) as indexed, (end - first, dim) float32.

        Reconstructed from exact (Flat) segments, else read from the raw
        vectors files; zeros for purged chunks.

        Raises
        ------
        RetrostoreError
            Neither the index can reconstruct nor raw vectors are kept.
        """
        return stored_vectors(self, first, end)

    # -- maintenance (retrostore/_maintenance.py, docs/index.md) ------------
    def delete(self, doc_ids: int | Iterable[int]) -> int:
        """Stage a take-down of committed documents; it takes effect at :meth:`commit`.

        From that version on their chunks are never returned by search,
        neighbours or precomputed neighbours, and reading them by id raises;
        :meth:`compact` then purges them from every file. Returns the number
        of documents newly staged (already deleted ones are skipped).

        Raises
        ------
        InvalidInputError
            An id is not an int or not committed.
        ReadOnlyStoreError, StoreClosedError
        """
        self._check(write=True)
        from ._deletes import stage_delete

        return stage_delete(self, doc_ids)

    def reindex(self, index: str | None = None, *, train_size: int | None = None, seed: int | None = None,
                params: dict | None = None, mmap: bool | None = None, progress: bool = True) -> int:
        """Retrain and rebuild the index from the stored vectors (no re-embedding); commits a new version.

        ``index`` is a FAISS factory string or ``"auto"`` (default: the
        store's current target). Training uses a seeded random sample of
        ``train_size`` live vectors. ``params`` become the store's search
        parameters; ``mmap`` changes the store's setting. Returns the version.

        Raises
        ------
        IndexTrainingError
            Too few vectors to train a stage (the message names a factory that fits).
        RetrostoreError
            No raw vectors are kept and the index cannot give its vectors back.
        InvalidInputError
            Bad factory string or parameters, or uncommitted appends/deletes.
        """
        from ._maintenance import reindex

        return reindex(self, index, train_size=train_size, seed=seed, params=params, mmap=mmap, progress=progress)

    def compact(self, *, progress: bool = True) -> int:
        """Merge the index segments into one and purge deleted documents from every file.

        Chunk ids stay stable (purged ids become documented holes). After a
        purge, earlier versions are retired: they name files holding the
        purged data. Returns the new version (the current one when there is
        nothing to do).

        Raises
        ------
        InvalidInputError
            Uncommitted appends or deletes.
        """
        from ._maintenance import compact

        return compact(self, progress=progress)

    def evaluate(self, queries: int = 1000, k: int = 10, *, params: dict | None = None, seed: int = 0) -> dict:
        """Recall@k of the index against exact search over the stored vectors, and latency.

        See :func:`retrostore._evaluate.evaluate` (``retrostore eval``).
        """
        self._check()
        from ._evaluate import evaluate

        return evaluate(self, queries=queries, k=k, params=params, seed=seed)

    def info(self) -> dict:
        """Everything ``retrostore inspect`` shows, as a JSON-ready dict."""
        self._check()
        from ._inspect import store_info

        return store_info(self)

    def verify(self) -> list[str]:
        """Check the store's integrity (what ``retrostore verify`` runs).

        Checks the manifest schema and paths, every referenced file's size and
        sha256, the LMDB file's structure and every committed record (ids,
        crc32 seals, documents tiling the chunks, commit records and the
        content hash chain against the manifest), and that the index holds one
        vector per chunk. The LMDB records are scanned in a short-lived child
        process, so a damaged page that makes LMDB crash is reported as a
        problem instead of ending this process. Writes nothing.

        Returns
        -------
        list of str
            One precise line per problem, starting with the file it concerns;
            empty when the store is intact.
        """
        self._check()
        from ._inspect import verify_store

        return verify_store(self)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k={k!r} must be an int >= 1 (the number of neighbours to return)")
    if k > 100_000:
        raise InvalidInputError(f"k={k} exceeds the limit of 100000 results per query; page with a smaller k")
    return int(k)


def _index_check_file(root: Path, entry: dict) -> str | None:
    from ._index import check_file

    return check_file(root, entry)
