"""The Store: one directory on disk, opened for reading or by the one writer.

The Store composes the parts and owns their lifetimes: the LMDB chunk table
(:class:`~retrostore.storage.chunktable.ChunkTable`), the version it serves
(:class:`~retrostore.store.version.Head`), the reads of that version
(:class:`~retrostore.store.reading.Reader`), the writer's staging and commits
(:class:`~retrostore.store.writer.Writer`), the chunker and the embedder. Its
methods check the handle and delegate; docs/architecture.md names the module
that implements each. Its maintenance and diagnostics methods (delete,
reindex, compact, evaluate, info, verify) come from its base class
:class:`~retrostore.store.upkeep.Upkeep`. See docs/format.md for the on-disk
layout and the commit protocol.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import faiss
import numpy as np

from ..errors import (
    CorruptStoreError,
    EmbedderMismatchError,
    ForkedStoreError,
    FormatVersionError,
    InvalidEmbeddingsError,
    InvalidInputError,
    NotAStoreError,
    ReadOnlyStoreError,
    StoreClosedError,
    StoreReplacedError,
    check_bool,
    shown,
)
from ..index.params import check_params
from ..storage import fileio
from ..storage import manifest as _manifest
from ..storage.chunktable import ChunkTable
from ..storage.layout import LMDB_DIR, LOCK, MANIFEST
from ..storage.segments import check_file
from ..text.chunking import Chunker
from ..threads import check_threads, cpu_count
from ..text.embed import Embedder, check_embedder, json_fingerprint
from ..text.models import DEFAULT_MODEL_SHA256, default_embedder, embed_chunks
from ..types import Chunk, Document, Hit, Neighbors
from .precompute import precompute_neighbors
from .reading import Reader, check_k, check_queries, id_array, int_ids
from .retrieval import neighbors
from .version import Head
from .staging import check_embeddings, documents
from .upkeep import Upkeep
from .writer import Writer

__all__ = ["Store", "DEFAULTS"]

#: Store settings and their defaults (persisted in the manifest's "settings").
DEFAULTS: dict[str, Any] = {
    "retain_versions": 3,      # committed versions kept for open(version=...) and readers in flight
    "keep_vectors": True,      # keep raw vectors for reindex and recall measurement
    "vector_dtype": "float16", # dtype of the raw vectors files (half the bytes of float32)
}


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


def _fingerprint_diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    return "; ".join(f"{k}: store {a.get(k)!r} vs given {b.get(k)!r}" for k in keys if a.get(k) != b.get(k))


class Store(Upkeep):
    """An open retrostore store. Create with :func:`retrostore.create` or
    :func:`retrostore.open`; use as a context manager; ``close()`` is
    idempotent.

    A reader sees one committed version (``Store.version``) until
    :meth:`refresh`. The writer (``mode="a"``) appends with :meth:`append`
    and publishes with :meth:`commit`; appended data is invisible to every
    reader, including the writer's own searches, until then. Threads may
    share a handle: its writes (``append``'s staging, ``commit``, ``delete``,
    ``reindex``, ``compact``, ``close``) take turns; chunking and embedding
    in ``append`` run side by side.
    """

    def __init__(self, path, *, mode="r", embedder=None, version=None, timeout_s=None, threads=None, mmap=None):
        if mode not in ("r", "a"):
            raise InvalidInputError(f"mode={mode!r} must be 'r' (read) or 'a' (append; the one writer)")
        mmap = check_bool("mmap", mmap, optional=True)
        if version is not None and (mode != "r" or isinstance(version, bool) or not isinstance(version, int)
                                    or version < 0):
            raise InvalidInputError(f"version={shown(version)} must be an int >= 0 and needs mode='r'")
        self.path = Path(path)
        self.mode = mode
        self._pid = os.getpid()
        # One write at a time through this handle (append's staging, commit, delete, reindex,
        # compact, close): two threads staging at once gave both the same ids (helper-55: a
        # committed version missing 500 document records).
        self._write_lock = threading.RLock()
        self._closed = False
        self._embedder: Embedder | None = None
        self._own_embedder = False  # True once the store loaded the default model itself
        self._lock: fileio.WriterLock | None = None
        self._table: ChunkTable | None = None
        self._writer: Writer | None = None
        self._pinned_version = version
        self.threads = check_threads(threads) or cpu_count()
        faiss.omp_set_num_threads(1 if _forked_child else self.threads)
        try:
            is_store = (self.path / MANIFEST).is_file()
        except OSError as exc:  # (a directory this user may not enter)
            raise fileio.unreadable(os.fspath(self.path / MANIFEST), exc) from exc
        if not is_store:
            raise _manifest.missing_manifest(self.path)
        self.readonly_media = fileio.readonly_media(self.path)
        try:
            if mode == "a":
                if self.readonly_media:
                    raise ReadOnlyStoreError(f"{self.path} cannot be written (read-only media, or no write permission "
                                             "for this user); open it with mode='r' to read it, or write to a "
                                             "writable copy")
                self._lock = fileio.WriterLock(self.path / LOCK, timeout_s)
            if version is not None:
                self._check_committed(version)
            m = _manifest.read_manifest(self.path, version)
            if mode == "a" and m["format_version"] > _manifest.FORMAT_VERSION:
                raise FormatVersionError(
                    f"{self.path} has format_version {m['format_version']}; this retrostore writes format version "
                    f"{_manifest.FORMAT_VERSION} and may only read it: open it with mode='r' or upgrade retrostore"
                )
            self._table = ChunkTable(self.path, m["tokenizer"]["token_dtype"], write=mode == "a",
                                     readonly_media=self.readonly_media,
                                     sealed=m["lmdb"].get("record_checksum") == "crc32")
            self._bind_embedder(embedder, m)
            self._chunker: Chunker | None = None
            self._head = Head(self.path, mmap_arg=None if mmap is None else bool(mmap), merge=mode == "r")
            self._head.load_newest(m, follow=mode == "r" and version is None)
            self._reader = Reader(self._table, self._head, follow_purges=mode == "r")
            if mode == "a":
                self._writer = Writer(self.path, self._table, self._head, on_lost=self._release,
                                      threads=1 if _forked_child else self.threads)
                self._writer.recover()
        except BaseException:
            self._release()
            raise

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"mode={self.mode!r}, version={self.version}"
        return f"<retrostore.Store {str(self.path)!r} {state}>"

    def close(self) -> None:
        """Close the store; safe to call twice. A writer's uncommitted appends are
        discarded (their LMDB records are removed)."""
        if self._closed:
            return
        if os.getpid() != self._pid:  # a forked child: another thread may have held the lock at fork
            self._release()
            return
        with self._write_lock:  # after a write running in another thread
            if self._closed:
                return
            if self._writer is not None and self._table is not None:
                self._writer.discard()
            self._release()

    def _release(self) -> None:
        self._closed = True
        if self._own_embedder:  # the default model this store loaded (~150 MB): not kept by a closed handle
            self._embedder, self._own_embedder = None, False
        if self._writer is not None:  # also when a failed commit lost the version: stop its encoder
            self._writer.batch.close()
        if self._table is not None:
            self._table.close()
            self._table = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        head = getattr(self, "_head", None)  # (absent when opening failed before it)
        if head is not None:
            head.release()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A write through this handle (``_write_lock``: writes of other threads take turns), after
        :meth:`_check` (the handle may have closed while this thread waited)."""
        with self._write_lock:
            self._check(write=True)
            yield

    def _check(self, write: bool = False, *, fork_ok: bool = False) -> None:
        """Refuse a closed handle, one used after fork (unless ``fork_ok``: the call touches no LMDB
        or FAISS handle) and, with ``write``, a read-only one."""
        if self._closed:
            raise StoreClosedError(f"{self.path} is closed; open it again with retrostore.open()")
        if not fork_ok and os.getpid() != self._pid:
            raise ForkedStoreError(
                f"this handle to {self.path} was opened in process {self._pid} and used in process "
                f"{os.getpid()} after fork(); LMDB and FAISS handles do not survive fork: call "
                "retrostore.open() in the child"
            )
        if write and self.mode != "a":
            raise ReadOnlyStoreError(f"{self.path} is open read-only; open it with mode='a' to write")

    @property
    def _manifest(self) -> dict:
        """The served version's manifest body (not a copy: never modify it)."""
        return self._head.version.manifest

    # -- embedder and chunker ----------------------------------------------
    def _bind_embedder(self, embedder, manifest: dict) -> None:
        want = manifest["embedder"]
        if embedder is not None:
            check_embedder(embedder)
            got = json_fingerprint(embedder)
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
        StoreClosedError
            The store is closed (it lets go of a default model it loaded).
        """
        self._check(fork_ok=True)  # a closed handle loads no model and hands none out
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
            self._bind_embedder(default_embedder(threads=self.threads), self._manifest)
            self._own_embedder = True
        return self._embedder

    @property
    def chunker(self) -> Chunker:
        """The store's chunker (its own ``tokenizer.json`` and ``chunk_tokens``)."""
        if self._chunker is None:
            entry = self._manifest["tokenizer"]
            problem = check_file(self.path, entry)
            if problem:
                raise CorruptStoreError(problem)
            self._chunker = Chunker(self.path / entry["path"], self._manifest["chunk_tokens"], pad_id=entry["pad_id"])
        return self._chunker

    def _query_vectors(self, chunks: list[np.ndarray]) -> np.ndarray:
        """Vectors of token-id chunks (``neighbors``): the ids fed directly when the chunk
        tokenizer is the embedder's own, else decoded and re-tokenized by the embedder."""
        emb = self.embedder
        if hasattr(emb, "embed_token_ids") and getattr(emb, "tokenizer_sha256", None) == \
                self._manifest["tokenizer"]["sha256"]:
            return emb.embed_token_ids(chunks)
        # Another chunk tokenizer (e.g. the LM's BPE): decode, then the embedder re-tokenizes.
        return emb.embed([self.chunker.decode(c) for c in chunks])

    # -- state -------------------------------------------------------------
    @property
    def version(self) -> int:
        """The committed version this handle sees."""
        return self._head.version.number

    @property
    def manifest(self) -> dict:
        """A copy of the current manifest body."""
        return copy.deepcopy(self._manifest)

    def __bool__(self) -> bool:
        """Always True, as a file object is: ``if store:`` asks whether there is a handle, not
        whether it holds chunks (an empty store was falsy) nor whether it is open (a closed one
        raised, through ``__len__``; helper-20)."""
        return True

    def __len__(self) -> int:
        """Number of committed chunks.

        Raises
        ------
        StoreClosedError
            The store is closed (its count could be stale: another process may have committed since).
        """
        self._check(fork_ok=True)
        return self._head.version.n_chunks

    def _check_committed(self, version: int) -> None:
        """Refuse a pinned version newer than the current one: its manifest copy
        belongs to a commit that failed or was interrupted before its commit point."""
        try:
            current = _manifest.read_manifest(self.path)["version"]
        except CorruptStoreError:
            return  # a damaged manifest.json: retained copies are self-checked and may be opened
        if version > current:
            raise NotAStoreError(
                f"version {shown(version)} of {self.path} was never committed (the newest committed version is "
                f"{current}); open without version= for the newest"
            )

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
        StoreReplacedError
            The store directory was replaced since this handle opened it (helper-33: after
            ``rsync`` of a newer store over it, a refresh served the new index with the old
            chunk table: wrong texts, no error); the handle stays at its version. A new
            manifest whose commits are not in the chunk table (such a copy under way) is not
            taken: the version stays.
        """
        self._check()
        if self.mode == "a" or self._pinned_version is not None:
            return self.version
        # A manifest whose commits are not in the chunk table this handle reads is not taken: a store
        # copied over this one, manifest first (helper-34: rsync writes manifest.json before chunks.lmdb/;
        # the handle then read the new ids in the old table), or a compaction between its two steps.
        self._check_not_replaced()
        number = self._head.refresh(self._holds).number
        self._check_not_replaced()  # (say so once the table itself is another file)
        return number

    def _holds(self, m: dict) -> bool:
        """Whether this handle's chunk table holds manifest ``m``'s commits (its commit records chain
        to ``m``'s content hash chain; recorded digests only, no record hashed) and is still the file
        in the store directory."""
        return not self._table.replaced() and self._table.commit_chain(m["version"]) == m["lmdb"]["chain"]

    def _table_matches_manifest(self) -> bool:
        """Whether the chunk table's commit records chain to the served manifest's (helper-33: a
        store copied over another, a copy taken mid-way, pairs one store's manifest with another's
        chunk table; ``verify`` finds it by hashing every record, this by the commit records alone)."""
        self._check()
        return self._holds(self._head.version.manifest)

    def _check_not_replaced(self) -> None:
        if self._table.replaced():
            raise StoreReplacedError(
                f"{self.path}: the store directory was replaced since this handle opened it ({LMDB_DIR}/data.mdb is "
                f"another file now: a copy unpacked or synced over it, or a rebuild); this handle stays at version "
                f"{self.version} of the store it opened; close it and open the store again (retrostore.open) to read "
                "the new one")

    # -- writing -----------------------------------------------------------
    def append(
        self,
        docs: str | Iterable[str],
        *,
        metadata: Any = None,
        embeddings: np.ndarray | None = None,
        chunks: Sequence[Sequence[Chunk]] | None = None,  # the chunker's chunks (text.chunking.Chunk)
    ) -> list[int]:
        """Chunk, embed and stage documents; they become visible at :meth:`commit`.

        Parameters
        ----------
        docs : str or iterable of str
            Documents. Empty or whitespace-only documents, and those that yield no
            tokens (only control, zero-width or combining characters), get an id and no
            chunks (their text is kept: ``get_document``).
        metadata : JSON-like or sequence of JSON-like, optional
            One value per document (a single value when ``docs`` is one string).
            Accepted: ``None``, ``bool``, ``int`` (int64/uint64 range), finite
            ``float``, ``str``, ``list``/``tuple`` (stored as lists), ``dict`` with
            ``str`` keys, nested at most 64 levels; numpy scalars and arrays are
            converted to their Python equivalents.
        embeddings : ndarray, shape (n_chunks, dim), optional
            Precomputed vectors, one row per chunk in order (for users who embed
            elsewhere). float64 is converted to float32; NaN/inf rejected. Copied:
            the array may be reused once ``append`` returns.
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
        StoreIOError
            The records could not be written (a full disk: ``errno.ENOSPC``);
            nothing of this call is staged, what was staged before stays.
        ReadOnlyStoreError, StoreClosedError, ForkedStoreError
        """
        self._check(write=True)
        docs, metas, single = documents(docs, metadata)
        if chunks is None:
            per_doc = self.chunker.chunk_many(docs)
        else:
            per_doc = self.chunker.check_chunks(docs, [chunks] if single else chunks)
        vectors = self._vectors_for(docs, per_doc, embeddings)
        with self._writing():  # chunking and embedding above run side by side; staging takes turns
            return self._writer.stage(docs, per_doc, metas, vectors)

    def _vectors_for(self, docs: list[str], per_doc: list, embeddings: Any) -> np.ndarray:
        """The chunks' vectors: ``embeddings`` checked, or computed by the store's embedder."""
        n_chunks = sum(len(c) for c in per_doc)
        dim = self._manifest["index"]["dim"]
        if embeddings is not None:
            return check_embeddings(embeddings, n_chunks, dim)
        if n_chunks == 0:
            return np.zeros((0, dim), np.float32)
        arr = embed_chunks(self.embedder, self._manifest["tokenizer"]["sha256"], docs, per_doc)
        if arr.shape != (n_chunks, dim):
            raise InvalidEmbeddingsError(f"the embedder returned shape {arr.shape}, expected ({n_chunks}, {dim})")
        # A copy, as of precomputed embeddings: the batch keeps (and encodes) the rows until commit,
        # and an embedder may return a buffer it reuses for its next call.
        return np.array(arr, dtype=np.float32, order="C", copy=True)

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
        with self._writing():
            return self._writer.commit()

    # -- reading -----------------------------------------------------------
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
        ids = int_ids(chunk_ids, "chunk")
        return self._reader.retrying(lambda: self._reader.get_chunks(ids))

    def get_document(self, doc_id: int) -> Document:
        """A committed document: its exact text (joined chunk spans) and metadata.

        Raises
        ------
        InvalidInputError
            ``doc_id`` is negative or not committed.
        """
        self._check()
        return self._reader.retrying(lambda: self._reader.get_document(doc_id))

    def get_metadata(self, doc_ids: Iterable[int]) -> list[Any]:
        """Metadata of committed documents (without reading their text).

        Raises
        ------
        InvalidInputError
            An id is negative or not committed.
        """
        self._check()
        ids = int_ids(doc_ids, "document")
        return self._reader.retrying(lambda: self._reader.get_metadata(ids))

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
        return self._reader.search_vectors(vectors, k, params)

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
            ``k < 1``, a query that is not a str, or an empty (whitespace) query.
        EmbedderMismatchError
            The store's embedder is not available (see :attr:`embedder`).
        """
        self._check()
        k = check_k(k)
        queries, single = check_queries(query)
        if not queries:
            return []
        if len(self) == 0:
            return [] if single else [[] for _ in queries]
        params = check_params(params)  # before the embedding, which costs more
        vecs = self.embedder.embed(queries)
        hits = self._reader.retrying(lambda: self._reader.hits(*self._reader.search_vectors(vecs, k, params)))
        return hits[0] if single else hits

    def neighbors(self, token_ids: Any, k: int = 2, *, exclude_doc_ids: Any = None, label_token: bool = False,
                  tail: str = "query") -> "Neighbors":
        """RETRO neighbours with continuations for every chunk of token sequences.

        Each row of ``token_ids`` is cut into chunks of ``chunk_tokens``; each
        chunk is embedded (token ids fed directly when the chunk tokenizer is
        the embedder's, else decoded and re-tokenized by the embedder) and its k
        nearest committed chunks are returned with their continuations
        (Borgeaud et al. 2021, §2.2-2.4).

        Rows as a RETRO trainer has them: a training row is L + 1 tokens (the
        inputs and, last, the label of the last input): pass
        ``label_token=True`` and that last token is dropped before chunking,
        so C = L / chunk_tokens. A prompt in generation grows one token at a
        time; RETRO retrieves for each complete chunk (a chunk's neighbours are
        attended to by the following chunk, §2.4): ``tail="drop"`` gives
        C = floor(L / chunk_tokens), the shape retro-pytorch's generation
        expects, so the loop can call this at every token or every 64.

        Parameters
        ----------
        token_ids : array-like of int, shape (B, L) or (L,)
            Ids in the store's chunk-tokenizer space.
        k : int, default 2
            Neighbours per chunk (RETRO trains with k = 2).
        exclude_doc_ids : sequence of length B, optional
            Per row: a doc id, an iterable of doc ids, or None. Neighbours from
            those documents are skipped; extra candidates are fetched so that k
            neighbours are still returned when the store has them.
        label_token : bool, default False
            Drop each row's last token first (it is the label of a training row).
        tail : {"query", "drop", "pad"}, default "query"
            The last L % chunk_tokens tokens (after the label is dropped):
            ``"query"`` queries them as one shorter chunk (C = ceil(L / T));
            ``"drop"`` retrieves nothing for them (C = floor(L / T)); ``"pad"``
            gives them a slot with no neighbours (C = ceil(L / T), ids -1,
            mask False): fixed shapes without a partial query.

        Returns
        -------
        Neighbors
            ``tokens`` (B, C, k, 2 * chunk_tokens) int64 (T tokens of the
            neighbour, then T of its continuation, each padded with the
            store's pad id), ``mask`` of the same shape (bool), ``chunk_ids`` /
            ``doc_ids`` (B, C, k) int64 (-1 where fewer than k exist),
            ``scores`` (B, C, k) float32.

        Raises
        ------
        InvalidInputError
            Bad shape, non-integer or out-of-vocabulary ids, ``k < 1``,
            ``exclude_doc_ids`` of the wrong length, a bad ``tail``, or
            ``label_token`` with rows of one token.
        EmbedderMismatchError
            The store's embedder is not available.
        """
        self._check()
        return self._reader.retrying(lambda: neighbors(
            self._reader, self._query_vectors, token_ids, k, exclude_doc_ids=exclude_doc_ids,
            label_token=label_token, tail=tail))

    def neighbor_tokens(self, chunk_ids: Any) -> "Neighbors":
        """RETRO neighbour tokens of chunks given by id (precomputed neighbours), without embedding anything.

        Each id's chunk tokens are followed by its continuation (the next
        chunk of the same document, never another's), as :meth:`neighbors`
        returns them (Borgeaud et al. 2021, §2.3). For the ``.npy`` of
        :meth:`precompute_neighbors` read by row range (``np.load(path,
        mmap_mode="r")[rows]``): a data loader's tokens cost LMDB reads, not
        the embedder.

        Parameters
        ----------
        chunk_ids : array-like of int, shape (..., k)
            Committed chunk ids; -1 for none.

        Returns
        -------
        Neighbors
            ``tokens`` and ``mask`` shaped ``chunk_ids.shape + (2 * chunk_tokens,)``
            (int64 and bool), ``chunk_ids`` (-1 also where a chunk was deleted
            since the ids were computed: it is not served) and ``doc_ids``
            shaped like ``chunk_ids`` (int64), ``scores`` NaN (float32; not known).

        Raises
        ------
        InvalidInputError
            Not integers, no k axis, or an id below -1 or not committed.
        """
        self._check()
        tokens, mask, ids, doc_ids = self._reader.retrying(lambda: self._reader.neighbor_tokens(chunk_ids))
        return Neighbors(tokens, mask, ids, doc_ids, np.full(ids.shape, np.nan, np.float32))

    def deleted_chunks(self, chunk_ids: Any) -> np.ndarray:
        """Which of ``chunk_ids`` this handle does not serve: their document was deleted.

        Deleted in this handle's version, or purged by ``compact`` since (take-downs
        win over an older or pinned version, as in :meth:`neighbor_tokens`). For
        callers that read tokens from their own snapshot, such as
        :func:`retrostore.retro.chunk_table`, and must still hide a take-down.
        It reads only the manifest and tombstone files, so it also works in a
        process forked after ``open`` (a data loader's workers), where the
        LMDB-backed methods raise ``ForkedStoreError``.

        Parameters
        ----------
        chunk_ids : array-like of int, shape (..., k)
            Committed chunk ids; -1 for none (never deleted).

        Returns
        -------
        ndarray of bool, shaped like ``chunk_ids``
            True where the chunk's document is deleted.

        Raises
        ------
        InvalidInputError
            Not integers, no k axis, or an id below -1 or not committed.
        StoreClosedError
            The handle was closed.
        """
        self._check(fork_ok=True)  # manifest and tombstone files only (helper-18: forked DataLoader workers)
        ids = id_array(chunk_ids, len(self))
        self._reader.follow_purges()
        return self._reader.version.tombstones.chunk_mask(ids)

    def precompute_neighbors(
        self,
        out: str | os.PathLike,
        *,
        k: int = 2,
        exclude_same_doc: bool = False,
        batch_size: int = 1024,
        queries: str | os.PathLike | None = None,
        label_token: bool = False,
        progress: bool = True,
    ) -> Path:
        """Write the k nearest chunk ids of every chunk (or of a token file) to ``.npy``.

        For every committed chunk, its stored vector is searched (no
        re-embedding) and its k nearest chunk ids are written, excluding chunks
        of its own document when ``exclude_same_doc`` (RETRO's training setup,
        Borgeaud et al. 2021, §2.4). A chunk whose nearest chunks are all of its
        own document (a book's) is searched again with that document's chunks
        left out inside the index on an exact or IVF index (FAISS's ID selector;
        an IVF index probes more lists until k + max(8, k) are found: stopping
        at k gave recall@2 0.05 there, now 0.97), so its cost does not
        grow with the document: a 4,512-chunk document in a 7,570-chunk
        ``IVF64,PQ48x4fs`` store, 13.5 s for every chunk against 290.5 s
        widening the candidates (which left 4,452 slots empty). A graph (HNSW,
        the default below 100,000 chunks) cannot leave chunks out well, so
        such chunks of a store of up to 262,144 are answered by an exact scan
        of the stored vectors: 1.8 s for the same store as ``HNSW32,SQfp16``
        against 138.6 s widening (``retrostore.store.retrieval``). Resumable: rows are written to
        ``OUT.partial`` with progress in ``OUT.progress.json``; running again
        with the same arguments continues where it stopped, and the finished
        file is renamed to ``OUT``.

        Parameters
        ----------
        out : path-like
            Destination ``.npy``: int64, shape (N, k) for the store's chunks, or
            (n, L / chunk_tokens, k) for ``queries``; -1 padded. Loads with
            ``np.load(out, mmap_mode="r")``; :meth:`neighbor_tokens` turns rows
            of it into RETRO's tokens.
        k : int, default 2
        exclude_same_doc : bool, default False
            Store chunks only. With the default each chunk's nearest neighbour is
            itself, and its continuation is the chunk's next one, the very text a
            model trained on these rows would have to predict. For training rows
            use :func:`retrostore.retro.chunk_neighbors` (own documents, copies and
            near copies left out; what ``retrostore neighbors`` writes) or
            :func:`retrostore.retro.sequence_neighbors`.
        batch_size : int, default 1024
            Query chunks per search call.
        queries : path-like, optional
            ``.npy`` of int token ids shaped (n, L), L a multiple of ``chunk_tokens``.
        label_token : bool, default False
            ``queries`` rows are L + 1 tokens, the last a label (training rows):
            it is dropped (see :meth:`neighbors`).
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
        return precompute_neighbors(
            self._reader, lambda rows, kk, label: self.neighbors(rows, kk, label_token=label), out, k=k,
            exclude_same_doc=exclude_same_doc, batch_size=batch_size, queries=queries, label_token=label_token,
            progress=progress)

    def _stored_vectors(self, chunk_ids: np.ndarray) -> np.ndarray:
        """The vectors chunks ``chunk_ids`` were indexed with, float32 ``(n, dim)``, read back as
        :meth:`precompute_neighbors` reads them (never embedded again): for ``retro``'s
        searches of chunks whose precomputed candidates ran out. Private: not a stable API."""
        self._check()
        return self._reader.version.vector_source("searching chunks again").take(np.asarray(chunk_ids, np.int64))
