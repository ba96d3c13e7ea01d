"""``retrostore.create`` and ``retrostore.open``: the entry points that make a Store (create publishes version 0 atomically)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

from ..errors import CommitError, CorruptStoreError, InvalidInputError, StoreExistsError, check_bool, check_int
from ..index.factory import check_index_arg
from ..index.params import check_params
from ..index.policy import default_params
from ..index.training import check_train_size
from ..storage import fileio
from ..storage import manifest as _manifest
from ..storage.chunktable import ChunkTable
from ..storage.layout import GENESIS, INDEX_DIR, LMDB_DIR, MANIFEST, TMP_PREFIX, TOKENIZER, VECTORS_DIR, VERSIONS_DIR
from ..text.chunking import Chunker
from ..text.embed import DEFAULT_MODEL_SHA256, Embedder, check_embedder, json_fingerprint
from ..text.models import DEFAULT_DIM, default_fingerprint, default_tokenizer_path
from .commit import now
from .store import DEFAULTS, Store
from .verify import unopened_problems

__all__ = ["create", "open_store"]


def create(
    path: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    embedder: Embedder | None = None,
    chunk_tokens: int = 64,
    pad_id: int | None = None,
    metric: str = "ip",
    index: str = "auto",
    index_params: dict | None = None,
    train_size: int | None = None,
    mmap: bool = False,
    keep_vectors: bool = DEFAULTS["keep_vectors"],
    vector_dtype: str = DEFAULTS["vector_dtype"],
    retain_versions: int = DEFAULTS["retain_versions"],
    threads: int | None = None,
) -> "Store":
    """Create a new, empty store and open it for writing.

    Creating is committing: the store is assembled in a temporary directory
    beside ``path`` and renamed into place, so a crash leaves either nothing
    or a valid empty store (version 0).

    Parameters
    ----------
    path : path-like
        Directory to create. It must not exist (an existing empty directory
        is accepted and replaced).
    tokenizer : path-like, optional
        HF ``tokenizer.json`` used to cut documents into chunks (the language
        model's tokenizer). Default: the embedder's tokenizer (all-MiniLM-L6-v2
        WordPiece for the default embedder).
    embedder : Embedder, optional
        Default: :func:`retrostore.default_embedder` (all-MiniLM-L6-v2, 384-d,
        mean pooling, L2-normalised), loaded on the store's first embedding:
        a store fed only precomputed vectors never starts onnxruntime.
    chunk_tokens : int, default 64
        Tokens per chunk; 64 is RETRO's value (Borgeaud et al. 2021, §2.3).
    metric : {"ip", "l2"}, default "ip"
        Inner product (cosine for normalised vectors) or squared L2.
    index : str, default "auto"
        ``"auto"``: exact ``Flat`` below 5,000 vectors, an HNSW graph
        (``HNSW32,SQfp16``) to 100,000, then ``IVF{nlist},PQ{dim/8}x4fs``
        fast-scan codes (``PQ48x4fs``, 24 bytes, at 384-d) re-ranked from the raw vectors, trained once at the
        commit that crosses 100,000 (:mod:`retrostore.index.policy`;
        thresholds and their measurements in docs/index.md). Or any FAISS factory string (``"Flat"``,
        ``"HNSW32"``, ``"OPQ16_64,IVF4096,PQ16x4fs"``, ...): one that needs
        training is served by an exact Flat index until the store holds
        enough vectors to train every stage well, then trained at that commit.
    index_params : dict, optional
        The store's search parameters (``nprobe``, ``efSearch``, ``rerank``, ...).
    train_size : int, optional
        Vectors in the seeded training sample (default: 64 per centroid, at least 16,384).
    mmap : bool, default False
        Serve search from memory-mapped index files (recorded in the manifest;
        ``open(mmap=...)`` overrides per handle). Not for fast-scan factories.
    keep_vectors : bool, default True
        Keep raw vectors (``vector_dtype``) beside the index: needed to
        reindex without re-embedding, for ``rerank`` and for ``eval``. With
        ``index="Flat"`` they are kept in the Flat segments themselves (no
        second copy in ``vectors/``) until a ``reindex`` to another index
        writes them out (docs/format.md, "Raw vectors").
    vector_dtype : {"float16", "float32"}, default "float16"
        Precision vectors are kept at on disk: the raw vectors files and the
        Flat (exact) segments, searched as float32 once read (format 3,
        docs/format.md "Index segments"). ``"float32"`` keeps vectors exactly
        as given, at twice the bytes.
    retain_versions : int, default 3
        Committed versions kept readable with ``open(path, version=V)``.
    pad_id : int, optional
        The id that pads neighbour tokens (``Neighbors.tokens``; RETRO
        trainers such as retro-pytorch mask ``tokens != pad_id``), in the
        tokenizer's vocabulary. Default: the tokenizer's padding token (see
        :class:`Chunker`). A tokenizer without one (many LM tokenizers) would
        pad with id 0, a real token: a ``RuntimeWarning`` says so, and
        ``inspect`` shows it; give an id your text never holds.
    threads : int, optional
        FAISS and onnxruntime threads; default the CPUs this process may use.

    Returns
    -------
    Store
        Open with ``mode="a"`` at version 0.

    Raises
    ------
    StoreExistsError
        ``path`` exists and is not an empty directory.
    InvalidInputError
        A setting is out of range (named in the message), e.g. ``pad_id``
        outside the tokenizer's vocabulary.
    CommitError
        An I/O error (ENOSPC, EIO, ...); nothing was created at ``path``.

    Warns
    -----
    RuntimeWarning
        The chunk tokenizer has no padding token and no ``pad_id`` was given.
    """
    root = _store_path(path)
    fileio.check_outside_store(root, "path")  # (helper-49: a store made in another's index/ kept its writers out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if (root / MANIFEST).exists():
            raise StoreExistsError(
                f"{root} already exists; open it with retrostore.open({str(root)!r}, mode='a') to add to it "
                "(retrostore build adds to it by itself), or choose a new path")
        what = "a directory with other files" if root.is_dir() else "a file"
        raise StoreExistsError(f"{root} exists and is not a store ({what}); choose a new path for the store, "
                               "or an empty directory")
    chunk_tokens = check_int("chunk_tokens", chunk_tokens, 1, 4096, fix="RETRO uses 64")
    if metric not in ("ip", "l2"):
        raise InvalidInputError(f"metric={metric!r} must be 'ip' (inner product) or 'l2'")
    if vector_dtype not in ("float16", "float32"):
        raise InvalidInputError(f"vector_dtype={vector_dtype!r} must be 'float16' or 'float32'")
    retain_versions = check_int("retain_versions", retain_versions, 1, 2**31)
    if not isinstance(index, str) or not index.strip():
        raise InvalidInputError(f"index={index!r} must be a FAISS factory string such as 'Flat'")
    if embedder is not None:
        check_embedder(embedder)
        fingerprint, dim = json_fingerprint(embedder), int(embedder.dim)
        emb_tok = _embedder_tokenizer_path(embedder) if tokenizer is None else None
    else:  # the default model is loaded by the store on its first embedding, not here
        fingerprint, dim = json.loads(json.dumps(default_fingerprint(), sort_keys=True)), DEFAULT_DIM
        emb_tok = default_tokenizer_path()
    tok_path = Path(tokenizer) if tokenizer is not None else emb_tok
    chunker = Chunker(tok_path, chunk_tokens, pad_id=pad_id)
    if pad_id is None and not chunker.has_pad_token:
        warnings.warn(
            f"the chunk tokenizer {str(tok_path)!r} has no padding token, so neighbour tokens are padded with id 0, "
            f"the real token {chunker.pad_token!r}: a mask computed as tokens != 0 (retro-pytorch's) hides it. Pass "
            "create(pad_id=...) the id of a token your text never holds", RuntimeWarning, stacklevel=2)
    window = fingerprint.get("max_tokens")
    if isinstance(window, int) and chunk_tokens > window - 2:
        logging.getLogger("retrostore").warning(
            "chunk_tokens=%d exceeds what the embedder reads (max_tokens %d, less [CLS] and [SEP]): each chunk "
            "is embedded from its first %d tokens only; RETRO uses 64", chunk_tokens, window, window - 2)
    # Refuse a factory string FAISS cannot build now, not at the first commit.
    mmap = check_bool("mmap", mmap)
    keep_vectors = check_bool("keep_vectors", keep_vectors)
    target, factory = check_index_arg(index, dim, mmap=mmap)
    index_params = check_params(index_params, "index_params")
    train_size = check_train_size(train_size)

    tmp = root.parent / f"{TMP_PREFIX}{root.name}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        fileio.remove_stale_tmp(root.parent, root.name)
        tmp.mkdir()
    except OSError as exc:
        raise CommitError(exc.errno, f"create failed while making {tmp}: {exc.strerror or exc}; "
                          f"nothing was created at {root}") from exc
    stage = "writing the store's files"
    try:
        tsize, tsha = fileio.write_durable(tmp / TOKENIZER, [Path(tok_path).read_bytes()])
        for sub in (INDEX_DIR, VECTORS_DIR, VERSIONS_DIR):
            (tmp / sub).mkdir()
        ChunkTable.initialise(tmp)
        created = now()
        body = {
            "format_version": _manifest.FORMAT_VERSION,
            "min_reader_version": _manifest.MIN_READER_VERSION,
            "version": 0,
            "created_at": created,
            "committed_at": created,
            "chunk_tokens": chunk_tokens,
            "metric": metric,
            "tokenizer": {
                "path": TOKENIZER, "size": tsize, "sha256": tsha,
                "vocab_size": chunker.vocab_size, "pad_id": chunker.pad_id, "pad_token": chunker.pad_token,
                "pad_source": "argument" if pad_id is not None else ("tokenizer" if chunker.has_pad_token
                                                                     else "none: id 0"),
                "token_dtype": "<u2" if chunker.vocab_size <= 65536 else "<u4",
            },
            "embedder": fingerprint,
            "index": {"factory": factory, "target": target, "param_overrides": index_params,
                      "params": {**default_params(factory, keep_vectors=bool(keep_vectors)), **index_params},
                      "dim": dim,
                      "segments": [], "template": None, "trained": None},
            "vectors": {"dtype": vector_dtype, "files": []},
            "lmdb": {"path": LMDB_DIR, "chain": hashlib.sha256(GENESIS.encode()).hexdigest(),
                     "record_checksum": "crc32"},
            "counts": {"documents": 0, "chunks": 0, "vectors": 0},
            "next_chunk_id": 0,
            "next_doc_id": 0,
            "settings": {"retain_versions": retain_versions, "keep_vectors": bool(keep_vectors),
                         "mmap": bool(mmap), "train_size": train_size, "train_seed": 0},
        }
        _manifest.write_manifest(tmp, body)
        for sub in (INDEX_DIR, VECTORS_DIR, VERSIONS_DIR, LMDB_DIR, "."):
            fileio.fsync_dir(tmp / sub)
        stage = "publishing the store"
        was_empty_dir = root.is_dir()
        fileio._rename(os.fspath(tmp), os.fspath(root))  # the commit point; replaces an empty directory
        try:
            fileio.fsync_dir(root.parent)
        except BaseException:
            # Not durable: undo, so that a failed create() leaves what was there before.
            shutil.rmtree(root, ignore_errors=True)
            if was_empty_dir:
                root.mkdir(exist_ok=True)
            raise
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and stage == "publishing the store" and exc.errno in (
                errno.ENOTEMPTY, errno.EEXIST) and root.is_dir():
            raise StoreExistsError(
                f"{root} was created by another process while this create() ran; open it with "
                f"retrostore.open({str(root)!r}, mode='a') to add to it (re-running a build appends)"
            ) from exc
        if isinstance(exc, OSError):
            detail = str(exc.strerror or exc).rstrip(". ")
            hint = "" if "free space" in detail else fileio.io_hint(exc.errno)
            raise CommitError(exc.errno, f"create failed while {stage}: {detail}; nothing was created at {root}."
                                         f"{hint}") from exc
        raise
    store = Store(root, mode="a", embedder=embedder, threads=threads)
    chunker.path = root / TOKENIZER  # the bytes just written from tok_path: not parsed a second time
    store._chunker = chunker
    return store


def _store_path(path: Any) -> Path:
    """``path`` as a Path, refusing what is not a non-empty str or os.PathLike (create and open)."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str) or not os.fspath(path):
        raise InvalidInputError(f"path must be a non-empty str or os.PathLike naming the store directory, "
                                f"not {path!r}")
    return Path(path)


def _embedder_tokenizer_path(emb: Any) -> Path:
    path = getattr(emb, "tokenizer_path", None)
    if path is None:
        if getattr(emb, "fingerprint", {}).get("model_sha256") == DEFAULT_MODEL_SHA256:
            return default_tokenizer_path()
        raise InvalidInputError(
            f"embedder {type(emb).__name__} has no tokenizer_path; pass tokenizer=PATH to create() "
            "to choose the chunk tokenizer"
        )
    return Path(path)


def open_store(
    path: str | os.PathLike,
    mode: str = "r",
    *,
    embedder: Embedder | None = None,
    version: int | None = None,
    timeout_s: float | None = None,
    threads: int | None = None,
    mmap: bool | None = None,
) -> "Store":
    """Open an existing store (``retrostore.open``).

    Parameters
    ----------
    path : path-like
        The store directory.
    mode : {"r", "a"}, default "r"
        ``"r"`` reads (any number of processes); ``"a"`` is the one writer.
    embedder : Embedder, optional
        Must match the manifest's embedder fingerprint. Default: the default
        embedder, when the store was built with it (loaded on first use).
    version : int, optional
        Open a retained earlier version, read-only.
    timeout_s : float, optional
        With ``mode="a"``, wait up to this many seconds for another writer.
    threads : int, optional
        FAISS and onnxruntime threads; default the CPUs this process may use.
    mmap : bool, optional
        Serve search from index files that stay on disk (memory-mapped);
        default: the store's ``mmap`` setting. See docs/index.md for the
        factories FAISS can map (not fast-scan PQ).

    Raises
    ------
    NotAStoreError
        ``path`` holds no store, or ``version`` is not retained.
    CorruptStoreError, FormatVersionError
        The manifest or a file it references is damaged / too new.
    WriterLockedError
        ``mode="a"`` and another writer holds the store.
    EmbedderMismatchError
        ``embedder`` differs from the one the store was built with.
    InvalidInputError
        Bad ``path``, ``mode`` or ``version``.
    """
    return Store(_store_path(path), mode=mode, embedder=embedder, version=version, timeout_s=timeout_s, threads=threads,
                 mmap=mmap)


def verify_store(path: str | os.PathLike, *, retokenize: bool = False) -> dict:
    """Check a store's integrity without trusting it (``retrostore verify``; ``retrostore.verify``).

    Opens the store read-only and runs :meth:`Store.verify`; a store that does not open is
    reported with every file its manifest names that is missing or damaged, not only the first
    (a partial download, helper-33).

    Parameters
    ----------
    path : path-like
        The store directory.
    retokenize : bool, default False
        Also check every chunk against its document's text (slow).

    Returns
    -------
    dict
        ``{"ok": bool, "version": int or None (None: the store did not open), "problems":
        [one line per problem]}``.

    Raises
    ------
    NotAStoreError
        ``path`` holds no store.
    InvalidInputError
        Bad ``path``.
    """
    try:
        with open_store(path) as st:
            problems, version = st.verify(retokenize=retokenize), st.version
    except CorruptStoreError as exc:
        problems, version = unopened_problems(_store_path(path), exc), None
    return {"ok": not problems, "version": version, "problems": problems}
