"""retro-pytorch 0.3.9 on a retrostore store: its own RETRODataset over the export equals
retrostore's windows + neighbour tokens for every row; a tiny RETRO trains (forward +
backward) on them; generation retrieves through retrostore. Skipped without retro-pytorch
(pip install ".[retro]")."""

from __future__ import annotations

import json

import numpy as np
import pytest

retro_pytorch = pytest.importorskip("retro_pytorch")
torch = pytest.importorskip("torch")

import retrostore  # noqa: E402
from retrostore import retro  # noqa: E402
from retrostore.errors import InvalidInputError, StoreExistsError  # noqa: E402

from _retro_stores import retro_store  # noqa: E402

T, SEQ_LEN, K = 64, 256, 2


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny model is memory-bound; torch's threads would only contend with onnxruntime's."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory, pydocs, embedder):
    with retrostore.open(retro_store(tmp_path_factory, pydocs, embedder), embedder=embedder) as st:
        yield st


@pytest.fixture(scope="module")
def exports(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {mode: (root / mode, retro.export_retro_pytorch(store, root / mode, seq_len=SEQ_LEN, k=K, mode=mode))
            for mode in ("packed", "document")}


def tiny_retro(store, **kw):
    torch.manual_seed(0)
    return retro_pytorch.RETRO(num_tokens=store.manifest["tokenizer"]["vocab_size"], max_seq_len=SEQ_LEN,
                               chunk_size=T, enc_dim=32, enc_depth=1, dec_dim=32, dec_depth=2,
                               dec_cross_attn_layers=(2,), heads=1, dim_head=32, pad_id=0, **kw)


@pytest.mark.parametrize("mode", ["packed", "document"])
def test_retro_dataset_equals_retrostore_for_every_row(store, exports, mode, monkeypatch):
    out, info = exports[mode]
    kwargs = json.loads((out / "retro_pytorch.json").read_text())
    assert set(kwargs) == {"num_chunks", "chunk_size", "seq_len", "num_sequences", "num_neighbors",
                           "chunk_memmap_path", "chunk_nn_memmap_path", "seq_memmap_path", "pad_id", "eos_id"}
    assert kwargs["chunk_memmap_path"] == "train.chunks.dat" and kwargs["eos_id"] == 102
    monkeypatch.chdir(out)  # paths are relative to retro_pytorch.json: RETRODataset(**kwargs) opens it there
    ds = retro_pytorch.RETRODataset(**kwargs)
    seqs = retro.training_sequences(store, SEQ_LEN, mode=mode, pad_id=0)
    ours = retro.TrainingSet(store, seqs, out / "seq_knn.npy")
    assert len(ds) == len(ours) == kwargs["num_sequences"] == info["retro_dataset"]["num_sequences"]
    for i in range(len(ds)):
        seq, retrieved = ds[i]
        want_seq, want_ret = ours[i]
        assert seq.shape == (SEQ_LEN + 1,) and retrieved.shape == (SEQ_LEN // T, K, 2 * T)
        np.testing.assert_array_equal(seq.numpy(), want_seq, err_msg=f"row {i} seq")
        np.testing.assert_array_equal(retrieved.numpy(), want_ret, err_msg=f"row {i} retrieved")
    # the memmaps' sizes are exactly what RETRODataset maps (int32, C padding rows past num_chunks)
    c = SEQ_LEN // T
    assert (out / "train.chunks.dat").stat().st_size == (kwargs["num_chunks"] + c) * (T + 1) * 4
    assert (out / "train.chunks.knn.dat").stat().st_size == (kwargs["num_chunks"] + c) * K * 4
    assert (out / "train.seq.dat").stat().st_size == kwargs["num_sequences"] * 4
    assert info["retro_model"] == {"num_tokens": 30522, "chunk_size": T, "max_seq_len": SEQ_LEN, "pad_id": 0}


def test_tiny_retro_forward_backward_on_the_export(store, exports):
    out, _ = exports["packed"]
    ds = retro_pytorch.RETRODataset(**retro.retro_dataset_kwargs(out))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False)
    model = tiny_retro(store)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seq, retrieved = next(iter(loader))
    losses = []
    for _ in range(2):
        loss = model(seq, retrieved, return_loss=True)
        loss.backward()
        grad = model.token_emb.weight.grad
        assert torch.isfinite(loss) and grad is not None and grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    # retrostore's own training set feeds the same model through a DataLoader too
    seqs = retro.training_sequences(store, SEQ_LEN, pad_id=0)
    ts = retro.TrainingSet(store, seqs, out / "seq_knn.npy")
    s2, r2 = next(iter(torch.utils.data.DataLoader(ts, batch_size=2)))
    assert torch.equal(s2, seq) and torch.equal(r2, retrieved)


def test_generation_retrieves_through_retrostore(store):
    model = tiny_retro(store)
    fetch = retro.fetch_fn(store, K, pad_id=0)
    calls = []

    def counted(chunks):
        calls.append(tuple(chunks.shape))
        got = fetch(chunks)
        assert got.shape == (chunks.shape[0], K, 2 * T) and got.dtype == torch.int64
        return got

    # TrainingWrapper builds its own BERT index on construction (torch.hub downloads); its
    # generate() only needs the model, the sizes and the retrieval function.
    wrapper = retro_pytorch.TrainingWrapper.__new__(retro_pytorch.TrainingWrapper)
    torch.nn.Module.__init__(wrapper)
    # Sample from a 120-token prompt to 141 tokens: retrieval for the prompt's complete chunk,
    # then again when the output reaches 128 tokens.
    wrapper.retro, wrapper.chunk_size, wrapper.max_seq_len = model, T, 140
    wrapper.fetch_knn_chunks_fn = counted
    ids, _ = store.chunker.encode(store.get_document(4).text)
    prompt = torch.from_numpy(ids[:120].astype(np.int64))[None, :]
    torch.manual_seed(0)
    out = wrapper.generate(prompt, filter_thres=0.9)
    assert torch.equal(out[:, :120], prompt)
    assert out.shape == (1, 141) or (out == 102).any()   # generate stops early only at [SEP]
    assert calls[0] == (1, T) and all(c == (1, T) for c in calls)
    if out.shape[1] == 141:
        assert len(calls) == 2


def test_model_neighbors_rule_for_training_rows_and_ragged_prompts(store):
    ids, _ = store.chunker.encode(store.get_document(4).text)
    row = ids[None, : SEQ_LEN + 1]                        # L + 1 tokens: the label is a ragged tail
    nb = retro.model_neighbors(store, row, K, overlap_threshold=None)  # (the leakage rules off: Store's answer)
    assert nb.tokens.shape == (1, SEQ_LEN // T, K, 2 * T)
    np.testing.assert_array_equal(nb.tokens, store.neighbors(row[:, :SEQ_LEN], K).tokens)
    assert retro.model_neighbors(store, row, K).tokens.shape == nb.tokens.shape
    model = tiny_retro(store).eval()
    prompt = ids[None, :200]                              # 3 complete chunks + 8 tokens
    nb = retro.model_neighbors(store, prompt, K)
    assert nb.tokens.shape[1] == 3
    logits = model(torch.from_numpy(prompt.astype(np.int64)), torch.from_numpy(nb.tokens))
    assert logits.shape == (1, 200, 30522)
    with pytest.raises(AssertionError, match="requires 3 retrieved chunks, but only 4"):
        model(torch.from_numpy(prompt.astype(np.int64)),
              torch.from_numpy(retro.model_neighbors(store, prompt, K, ragged="query").tokens))
    assert retro.model_neighbors(store, ids[None, :10], K).tokens.shape == (1, 0, K, 2 * T)
    with pytest.raises(InvalidInputError, match="ragged='pad'"):
        retro.model_neighbors(store, prompt, K, ragged="pad")
    with pytest.raises(InvalidInputError, match=r"expected \(b \* n, 64\)"):
        retro.fetch_fn(store, K)(torch.zeros((2, 10), dtype=torch.long))
    # A batch's doc ids as a tensor: its rows are 0-d tensors, each one document to exclude.
    own = torch.tensor([4])
    nb = retro.model_neighbors(store, row, K, exclude_doc_ids=own, overlap_threshold=None)
    assert (nb.doc_ids >= 0).any() and (nb.doc_ids != 4).all()
    got = retro.fetch_fn(store, K, pad_id=0, exclude_doc_ids=own)(torch.from_numpy(ids[None, :T].astype(np.int64)))
    assert got.shape == (1, K, 2 * T)


def test_export_refuses_existing_target_and_bad_ids(store, exports, tmp_path):
    out, _ = exports["packed"]
    with pytest.raises(StoreExistsError, match="force=True"):
        retro.export_retro_pytorch(store, out, seq_len=SEQ_LEN)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(StoreExistsError, match="not an export"):
        retro.export_retro_pytorch(store, tmp_path / "mine", seq_len=SEQ_LEN, force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(InvalidInputError, match="multiple of the store's chunk size 64"):
        retro.export_retro_pytorch(store, tmp_path / "x", seq_len=200)
    the = store.chunker.tokenizer.token_to_id("the")
    with pytest.raises(InvalidInputError, match=f"eos_id={the} occurs .* times inside chunks"):
        retro.export_retro_pytorch(store, tmp_path / "x", seq_len=SEQ_LEN, eos_id=the)
    assert not (tmp_path / "x").exists()


def test_export_force_replaces(store, tmp_path):
    first = retro.export_retro_pytorch(store, tmp_path / "e", seq_len=2 * T, k=1)
    again = retro.export_retro_pytorch(store, tmp_path / "e", seq_len=4 * T, k=1, force=True)
    assert first["retro_dataset"]["seq_len"] == 128 and again["retro_dataset"]["seq_len"] == 256
    assert json.loads((tmp_path / "e" / "retro_pytorch.json").read_text())["seq_len"] == 256
    assert not (tmp_path / "e.partial").exists()


def test_export_refuses_a_tokenizer_whose_id_0_is_text(tmp_path, small_docs, embedder):
    """GPT-2-style BPE: id 0 is '!' and the pad is <|endoftext|>; RETRODataset pads with 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = " ".join(d["text"] for d in small_docs)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=600,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endoftext|>"])
    assert tok.id_to_token(0) == "!"
    tok.save(str(tmp_path / "tokenizer.json"))
    with retrostore.create(tmp_path / "bpe.rstore", embedder=embedder, tokenizer=tmp_path / "tokenizer.json") as st:
        st.append(["Hello! This is it! " * 20, small_docs[-1]["text"][:3000]])
        st.commit()
        assert st.manifest["tokenizer"]["pad_id"] == tok.token_to_id("<|endoftext|>")
        with pytest.raises(InvalidInputError, match=r"token id 0 \('!'\) occurs \d+ times"):
            retro.export_retro_pytorch(st, tmp_path / "out", seq_len=2 * T, eos_id=st.manifest["tokenizer"]["pad_id"])
