"""retrostore: the embedded, on-disk retrieval database for RETRO-style models.

One directory on disk: an LMDB chunk table, immutable FAISS index segments,
the chunking tokenizer and a manifest that is the single commit point.

>>> import retrostore
>>> with retrostore.create("wiki.rstore") as store:          # doctest: +SKIP
...     store.append(["First document ...", "Second ..."])
...     store.commit()
>>> with retrostore.open("wiki.rstore") as store:            # doctest: +SKIP
...     hits = store.search("a question", k=5)
"""

from __future__ import annotations

from .ship.pack import pack
from .ship.unpack import unpack
from .store.create import create
from .store.create import open_store as open
from .store.create import verify_store as verify
from .store.store import Store
from .text.chunking import Chunker
from .text.embed import DEFAULT_MODEL_SHA256, Embedder, OnnxEmbedder
from .text.models import default_embedder, default_tokenizer_path
from .types import Chunk, Document, Hit, Neighbors
from .errors import (
    CommitError,
    CorruptStoreError,
    EmbedderMismatchError,
    ForkedStoreError,
    FormatVersionError,
    IndexTrainingError,
    InputNotFoundError,
    InputReadError,
    InvalidDocumentError,
    InvalidEmbeddingsError,
    InvalidInputError,
    InvalidMetadataError,
    ModelChecksumError,
    ModelNotInstalledError,
    NoRawVectorsError,
    NotAStoreError,
    ReadOnlyStoreError,
    ReadersFullError,
    RetrostoreError,
    StoreClosedError,
    StoreExistsError,
    OutputExistsError,
    StoreIOError,
    StoreReplacedError,
    UnsafeArchiveError,
    WriterLockedError,
)
from .serve.client import connect

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "create",
    "open",
    "verify",
    "connect",
    "pack",
    "unpack",
    "Store",
    "Hit",
    "Neighbors",
    "Chunk",
    "Document",
    "Chunker",
    "Embedder",
    "OnnxEmbedder",
    "default_embedder",
    "default_tokenizer_path",
    "DEFAULT_MODEL_SHA256",
    "RetrostoreError",
    "NotAStoreError",
    "StoreExistsError",
    "OutputExistsError",
    "InvalidInputError",
    "InvalidDocumentError",
    "InvalidEmbeddingsError",
    "InvalidMetadataError",
    "EmbedderMismatchError",
    "ModelChecksumError",
    "CorruptStoreError",
    "FormatVersionError",
    "WriterLockedError",
    "ReadOnlyStoreError",
    "StoreClosedError",
    "ReadersFullError",
    "ForkedStoreError",
    "StoreReplacedError",
    "IndexTrainingError",
    "CommitError",
    "StoreIOError",
    "InputNotFoundError",
    "InputReadError",
    "ModelNotInstalledError",
    "UnsafeArchiveError",
    "NoRawVectorsError",
]
