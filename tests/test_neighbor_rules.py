"""RETRO trainers' shapes on the store's read path: neighbour tokens from ids (no embedding),
training rows of L + 1 tokens, ragged prompts, and the id that pads neighbour tokens."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import retrostore
from retrostore.storage import manifest as _manifest

from conftest import SHAKESPEARE


@pytest.fixture(scope="module")
def rows(built_store):
    """Token rows of stored documents: 2 rows of 8 chunks + 1 token (a 513-token training row)."""
    with retrostore.open(built_store) as st:
        ids = np.concatenate([c.tokens for c in st.get_chunks(range(len(st)))])
    return np.stack([ids[:513], ids[600:1113]])


def test_neighbor_tokens_from_ids_equal_what_neighbors_returns(built_store, rows):
    with retrostore.open(built_store) as st:
        nb = st.neighbors(rows[:, :512], k=3, exclude_doc_ids=[0, 1])
        again = st.neighbor_tokens(nb.chunk_ids)
        assert np.array_equal(again.tokens, nb.tokens) and np.array_equal(again.mask, nb.mask)
        assert np.array_equal(again.doc_ids, nb.doc_ids) and np.isnan(again.scores).all()
        # a precomputed file read by row range, -1 rows, continuations never cross documents
        ids = np.array([[0, -1], [len(st) - 1, 5]])
        got = st.neighbor_tokens(ids)
        t = st.manifest["chunk_tokens"]
        last = st.get_chunks([len(st) - 1])[0]
        assert got.tokens.shape == (2, 2, 2 * t) and not got.mask[0, 1].any() and got.chunk_ids[0, 1] == -1
        assert np.array_equal(got.tokens[1, 0, : len(last.tokens)], last.tokens) and not got.mask[1, 0, t:].any()
        c5, c6 = st.get_chunks([5, 6])
        tail = got.tokens[1, 1, t : t + len(c6.tokens)]
        assert np.array_equal(tail, c6.tokens) == (c6.doc_id == c5.doc_id)
        assert (got.tokens[~got.mask] == st.manifest["tokenizer"]["pad_id"]).all()
        for bad, match in [(np.array([[len(st)]]), "outside"), (np.array([[-2, 0]]), "outside"),
                           (np.array([[0.5]]), "integer chunk ids"), (np.array(3), "shaped")]:
            with pytest.raises(retrostore.InvalidInputError, match=match):
                st.neighbor_tokens(bad)


def test_training_rows_and_ragged_prompts(built_store, rows):
    with retrostore.open(built_store) as st:
        full = st.neighbors(rows[:, :512], k=2)
        train = st.neighbors(rows, k=2, label_token=True)  # 513 tokens: inputs + label
        assert train.chunk_ids.shape == (2, 8, 2) and np.array_equal(train.chunk_ids, full.chunk_ids)
        assert st.neighbors(rows, k=2).chunk_ids.shape == (2, 9, 2)  # without the flag the label is a chunk
        prompt = rows[:1, :200]  # 3 chunks and 8 tokens
        drop = st.neighbors(prompt, tail="drop")
        assert drop.tokens.shape[1] == 3 and np.array_equal(drop.chunk_ids, full.chunk_ids[:1, :3])
        pad = st.neighbors(prompt, tail="pad")
        assert pad.tokens.shape[1] == 4 and (pad.chunk_ids[0, 3] == -1).all() and not pad.mask[0, 3].any()
        assert st.neighbors(prompt).chunk_ids.shape[1] == 4 and (st.neighbors(prompt).chunk_ids[0, 3] >= 0).all()
        assert st.neighbors(rows[:1, :10], tail="drop").tokens.shape == (1, 0, 2, 128)
        with pytest.raises(retrostore.InvalidInputError, match="tail="):
            st.neighbors(prompt, tail="round")
        with pytest.raises(retrostore.InvalidInputError, match="label"):
            st.neighbors(rows[:, :1], label_token=True)


def test_precomputed_neighbours_of_training_rows(built_store, rows, tmp_path):
    q = tmp_path / "rows.npy"
    np.save(q, rows)
    with retrostore.open(built_store) as st:
        with pytest.raises(retrostore.InvalidInputError, match="label_token=True"):
            st.precompute_neighbors(tmp_path / "x.npy", queries=q, progress=False)
        out = st.precompute_neighbors(tmp_path / "knn.npy", queries=q, label_token=True, progress=False)
        knn = np.load(out)
        assert knn.shape == (2, 8, 2)
        assert np.array_equal(knn, st.neighbors(rows, label_token=True).chunk_ids)
        assert np.array_equal(st.neighbor_tokens(np.load(out, mmap_mode="r")[1:]).tokens,
                              st.neighbors(rows[1:], label_token=True).tokens)


def _bpe_without_pad(path):
    """A byte-level BPE tokenizer with no special tokens at all: id 0 is '!', as in GPT-2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(SHAKESPEARE)], trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


def test_pad_id_is_settable_and_a_tokenizer_without_one_is_named(tmp_path, embedder, small_docs):
    bpe = _bpe_without_pad(tmp_path / "bpe.json")
    with pytest.warns(RuntimeWarning, match="no padding token.*'!'.*pad_id"):
        retrostore.create(tmp_path / "a.rstore", tokenizer=bpe, embedder=embedder).close()
    tok = _manifest.read_manifest(tmp_path / "a.rstore")["tokenizer"]
    assert tok["pad_id"] == 0 and tok["pad_token"] == "!" and tok["pad_source"].startswith("none")
    with pytest.raises(retrostore.InvalidInputError, match=r"pad_id=600 is not a token id.*\[0, 600\)"):
        retrostore.create(tmp_path / "b.rstore", tokenizer=bpe, embedder=embedder, pad_id=600)
    assert not (tmp_path / "b.rstore").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = retrostore.create(tmp_path / "c.rstore", tokenizer=bpe, embedder=embedder, pad_id=599)
    with st:
        st.append([d["text"] for d in small_docs[:5]])
        st.commit()
        assert st.chunker.pad_id == 599 and st.manifest["tokenizer"]["pad_source"] == "argument"
        ids = np.concatenate([c.tokens for c in st.get_chunks(range(3))])[: 2 * 64 + 5]
        nb = st.neighbors(ids, k=2)
        assert (nb.tokens[~nb.mask] == 599).all() and (nb.tokens[nb.mask] != 599).all()
