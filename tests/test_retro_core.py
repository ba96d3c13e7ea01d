"""retrostore.retro without torch: neighbour tokens from ids, training windows, their
neighbours (exclusion, duplicates, n-gram overlap, resume) and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import retrostore
from retrostore import retro
from retrostore.errors import InvalidInputError, StoreExistsError, WriterLockedError
from retrostore.storage import fileio
from retrostore.store import reading

from _retro_stores import duplicated_store, pydocs_slice, retro_store

T = 64


@pytest.fixture(scope="module")
def store(tmp_path_factory, pydocs, embedder):
    with retrostore.open(retro_store(tmp_path_factory, pydocs, embedder), embedder=embedder) as st:
        yield st


@pytest.fixture(scope="module")
def table(store):
    return retro.chunk_table(store)


def _row_of_tokens(store, doc_id, n_chunks):
    ids = list(store.get_document(doc_id).chunk_ids)[:n_chunks]
    return np.concatenate([c.tokens for c in store.get_chunks(ids)])


# --- neighbour tokens from ids -------------------------------------------------------------

def test_neighbor_tokens_equal_store_neighbors(store, table):
    rows = np.stack([_row_of_tokens(store, 4, 4)[: 4 * T], _row_of_tokens(store, 0, 4)[: 4 * T]])
    nb = store.neighbors(rows, k=3)
    for tab in (None, table):  # read from the store, and from an in-memory table
        nt = retro.neighbor_tokens(store, nb.chunk_ids, table=tab)
        assert nt.tokens.shape == (2, 4, 3, 2 * T) and nt.tokens.dtype == np.int64
        np.testing.assert_array_equal(nt.tokens, nb.tokens)
        np.testing.assert_array_equal(nt.mask, nb.mask)
        np.testing.assert_array_equal(nt.doc_ids, nb.doc_ids)


def test_neighbor_tokens_any_shape_missing_and_continuations(store, table):
    n = len(store)
    last_of_doc = np.flatnonzero(~table.next_in_doc)[0]  # ends a document: no continuation
    ids = np.array([[0, -1], [last_of_doc, n - 1], [1, 1]])
    nt = retro.neighbor_tokens(store, ids)
    assert nt.tokens.shape == (3, 2, 2 * T)
    assert not nt.mask[0, 1].any() and (nt.tokens[0, 1] == 0).all() and nt.doc_ids[0, 1] == -1
    c0, c1 = store.get_chunks([0, 1])
    np.testing.assert_array_equal(nt.tokens[0, 0, : len(c0.tokens)], c0.tokens)
    np.testing.assert_array_equal(nt.tokens[0, 0, T: T + len(c1.tokens)], c1.tokens)   # continuation
    assert not nt.mask[1, 0, T:].any()                      # document end: no continuation
    assert not nt.mask[1, 1, T:].any()                      # the store's last chunk
    flat = retro.neighbor_tokens(store, [5, -1, 7])         # 1-D: (k,)
    assert flat.tokens.shape == (3, 2 * T)
    deep = retro.neighbor_tokens(store, np.arange(24).reshape(2, 3, 2, 2))
    assert deep.tokens.shape == (2, 3, 2, 2, 2 * T)
    padded = retro.neighbor_tokens(store, ids, pad_id=7)
    assert (padded.tokens[~padded.mask] == 7).all()


def test_neighbor_file_reads_row_ranges(store, table, tmp_path):
    out = store.precompute_neighbors(tmp_path / "knn.npy", k=2, exclude_same_doc=True, progress=False)
    nf = retro.NeighborFile(store, out, table=table)
    assert len(nf) == len(store) and nf.shape == (len(store), 2)
    part = nf.tokens(10, 20)
    full = retro.neighbor_tokens(store, np.load(out))
    np.testing.assert_array_equal(part.tokens, full.tokens[10:20])
    np.testing.assert_array_equal(nf[3].tokens, full.tokens[3])
    assert (part.doc_ids != table.doc_ids[10:20, None]).all()   # own document excluded
    with pytest.raises(InvalidInputError, match="stop"):
        nf.tokens(5, len(store) + 1)


@pytest.mark.parametrize("bad, match", [
    (np.array([[0.0, 1.0]]), "dtype float64"),
    (np.array([[True, False]]), "dtype bool"),
    (np.int64(3), "shape"),
    ([[0, 10**6]], r"chunk id 1000000,? (is )?outside \[-1, "),
    ([[-2, 0]], "chunk id -2"),
])
def test_neighbor_tokens_bad_input(store, table, bad, match):
    for tab in (None, table):  # the store's reads and the in-memory table refuse alike
        with pytest.raises(InvalidInputError, match=match):
            retro.neighbor_tokens(store, bad, table=tab)


def test_neighbor_tokens_refuse_wrapping_ids_and_no_k(store, table):
    for tab in (None, table):
        with pytest.raises(InvalidInputError, match="18446744073709551615"):  # not wrapped to -1
            retro.neighbor_tokens(store, np.array([[2**64 - 1, 5]], np.uint64), table=tab)
        with pytest.raises(InvalidInputError, match=r"shape \(3, 0\)"):
            retro.neighbor_tokens(store, np.zeros((3, 0), np.int64), table=tab)


def test_bad_pad_and_file(store, tmp_path):
    with pytest.raises(InvalidInputError, match=r"pad_id=30522 is outside the store's vocabulary \[0, 30522\)"):
        retro.neighbor_tokens(store, [[0]], pad_id=30522)
    for bad in (1.0, True, "0"):
        with pytest.raises(InvalidInputError, match="must be an int token id"):
            retro.neighbor_tokens(store, [[0]], pad_id=bad)
    (tmp_path / "x.npy").write_bytes(b"not numpy")
    with pytest.raises(InvalidInputError, match="not a readable .npy"):
        retro.NeighborFile(store, tmp_path / "x.npy")
    np.save(tmp_path / "f.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(InvalidInputError, match="integer"):
        retro.NeighborFile(store, tmp_path / "f.npy")


# --- training windows ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["packed", "document"])
def test_windows_layout(store, table, mode):
    seqs = retro.training_sequences(store, 4 * T, mode=mode, table=table)
    c = seqs.chunks_per_sequence
    assert c == 4 and seqs.eos_id == 102 and seqs.pad_id == 0
    toks = seqs.tokens()
    assert toks.shape == (len(seqs), 4 * T + 1)
    used = seqs.chunk_ids[seqs.chunk_ids >= 0]
    np.testing.assert_array_equal(np.sort(used), np.arange(len(store)))   # every chunk once
    ends = 0
    for i in range(len(seqs)):
        after_end = None  # document mode: where the [SEP] after a document's text stands (helper-44)
        for j, cid in enumerate(seqs.chunk_ids[i]):
            slot = toks[i, j * T:(j + 1) * T]
            if cid < 0:
                if after_end == j * T:  # the first token after a full last chunk
                    assert slot[0] == 102 and (slot[1:] == 0).all()
                else:
                    assert (slot == 0).all()
                assert seqs.doc_ids[i, j] == -1
                continue
            ch = store.get_chunks([int(cid)])[0]
            np.testing.assert_array_equal(slot[: len(ch.tokens)], ch.tokens)
            rest = slot[len(ch.tokens):]
            ends_doc = not table.next_in_doc[cid]
            if mode == "document" and ends_doc and len(ch.tokens) < T:
                assert rest[0] == 102 and (rest[1:] == 0).all()             # the text's end: [SEP]
                ends += 1
            else:
                assert (rest == 0).all()
            if mode == "document" and ends_doc and len(ch.tokens) == T:
                after_end = (j + 1) * T
            assert seqs.doc_ids[i, j] == ch.doc_id
        last = int(seqs.chunk_ids[i, -1])
        last_len = len(store.get_chunks([last])[0].tokens) if last >= 0 else 0
        if last < 0:
            assert toks[i, -1] == 0
        elif table.next_in_doc[last]:
            assert toks[i, -1] == store.get_chunks([last + 1])[0].tokens[0]   # the label shift
        elif mode == "document" and last_len < T:
            assert toks[i, -1] == 0                  # [SEP] is inside the window: RETRODataset zeroes after it
        else:
            assert toks[i, -1] == 102                                        # document end: [SEP]
    if mode == "document":
        assert ends > 0 and (toks == 102).sum() == len(set(table.doc_ids[table.live].tolist()))  # one per document
    if mode == "document":
        assert all(len(set(d[d >= 0].tolist())) == 1 for d in seqs.doc_ids)  # never crosses documents
        assert all(seqs.chunk_ids[i, 0] >= 0 for i in range(len(seqs)))
    else:
        assert (seqs.chunk_ids[:-1] >= 0).all()                              # only the last is padded
        assert any(len(set(d.tolist())) > 1 for d in seqs.doc_ids)


@pytest.mark.parametrize("seq_len", [100, 0, -64, 64.0, "256"])
def test_window_length_must_be_a_multiple_of_the_chunk(store, table, seq_len):
    with pytest.raises(InvalidInputError, match="multiple of the store's chunk size 64") as info:
        retro.training_sequences(store, seq_len, table=table)
    assert "use e.g. 64 or 128" in str(info.value)  # two different lengths (helper-16: "64 or 64" for 0)


def test_window_bad_settings(store, table):
    with pytest.raises(InvalidInputError, match="mode='rows'"):
        retro.training_sequences(store, 128, mode="rows", table=table)
    with pytest.raises(InvalidInputError, match="eos_id=0 equals pad_id=0"):
        retro.training_sequences(store, 128, eos_id=0, table=table)
    with pytest.raises(InvalidInputError, match=r"eos_id=99999 is outside the store's vocabulary \[0, 30522\)"):
        retro.training_sequences(store, 128, eos_id=99999, table=table)


# --- neighbours of the windows ---------------------------------------------------------------

def test_huge_and_mistyped_ints_are_clean_errors(store, tmp_path):
    """helper-20: an int of more than 4,300 digits made these raise a bare ValueError, and chunk_table
    took batch_size=0 or 2.0 to range()."""
    huge = 10 ** 5000
    for call in (lambda: retro.training_sequences(store, huge), lambda: retro.training_sequences(store, 128, pad_id=huge),
                 lambda: retro.training_sequences(store, 128, eos_id=huge),
                 lambda: retro.export_retro_pytorch(store, tmp_path / "x", seq_len=128, ngram=huge),
                 lambda: retro.export_retro_pytorch(store, tmp_path / "y", seq_len=128, overlap_threshold=huge)):
        with pytest.raises(InvalidInputError, match="<an integer of about 5,001 digits>"):
            call()
    for bad in (0, 2.0, "3"):
        with pytest.raises(InvalidInputError, match="batch_size="):
            retro.chunk_table(store, batch_size=bad)


@pytest.mark.parametrize("mode", ["packed", "document"])
def test_sequence_neighbors_exclude_every_document_of_the_window(store, table, mode, tmp_path):
    seqs = retro.training_sequences(store, 4 * T, mode=mode, table=table)
    summary = retro.sequence_neighbors(store, seqs, tmp_path / "knn.npy", k=2)
    knn = np.load(tmp_path / "knn.npy")
    assert knn.shape == (len(seqs), 4, 2) and knn.dtype == np.int64
    assert ((knn >= 0) == (seqs.chunk_ids >= 0)[..., None]).all()       # k for every real slot
    docs = table.doc_ids[np.maximum(knn, 0)]
    for i in range(len(seqs)):
        window_docs = set(seqs.doc_ids[i][seqs.doc_ids[i] >= 0].tolist())
        assert not window_docs & set(docs[i][knn[i] >= 0].tolist())
    assert summary["rows"] == len(seqs) and summary["short"] == 0
    saved = json.loads((tmp_path / "knn.summary.json").read_text())
    assert saved["dropped"] == summary["dropped"]
    if mode == "packed":  # the per-chunk exclusion of precompute_neighbors would not be enough
        assert summary["dropped"]["excluded_docs"] > 0


def test_sequence_neighbors_resume(store, table, tmp_path, monkeypatch):
    seqs = retro.training_sequences(store, 2 * T, mode="packed", table=table)
    want = retro.sequence_neighbors(store, seqs, tmp_path / "a.npy", k=2, batch_size=16)
    from retrostore.retro import sequences as mod

    real, calls = mod._atomic_json, []

    def dies_after_two(path, obj):  # killed right after the second batch's progress record
        real(path, obj)
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(mod, "_atomic_json", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        retro.sequence_neighbors(store, seqs, tmp_path / "b.npy", k=2, batch_size=16)
    state = json.loads((tmp_path / "b.npy.progress.json").read_text())
    assert state["done"] == 32 and not (tmp_path / "b.npy").exists()
    monkeypatch.setattr(mod, "_atomic_json", real)
    got = retro.sequence_neighbors(store, seqs, tmp_path / "b.npy", k=2, batch_size=16)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert got["dropped"] == want["dropped"] and not (tmp_path / "b.npy.progress.json").exists()


def test_sequence_neighbors_bad_input(store, table, tmp_path):
    seqs = retro.training_sequences(store, 2 * T, table=table)
    with pytest.raises(InvalidInputError, match="k=0"):
        retro.sequence_neighbors(store, seqs, tmp_path / "k.npy", k=0)
    with pytest.raises(InvalidInputError, match="overlap_threshold=1.5"):
        retro.sequence_neighbors(store, seqs, tmp_path / "k.npy", overlap_threshold=1.5)
    with pytest.raises(InvalidInputError, match="exclude='doc'"):
        retro.sequence_neighbors(store, seqs, tmp_path / "k.npy", exclude="doc")
    with pytest.raises(InvalidInputError, match="must be a path ending in .npy"):
        retro.sequence_neighbors(store, seqs, tmp_path / "k.bin")
    with pytest.raises(InvalidInputError, match="does not exist"):
        retro.sequence_neighbors(store, seqs, tmp_path / "no" / "k.npy")
    # helper-28: an n-gram longer than a chunk silently turned the overlap filters off; seqs=None was an
    # AttributeError; eos_id=1.0 was "outside the vocabulary"; k beyond the store was accepted by model_neighbors
    with pytest.raises(InvalidInputError, match=r"ngram=65 is longer than a chunk \(64 tokens\).*filters would be off"):
        retro.sequence_neighbors(store, seqs, tmp_path / "k.npy", ngram=65)
    with pytest.raises(InvalidInputError, match=r"ngram=0 must be an int in \[1, 64\]; RETRO uses 13"):
        retro.sequence_neighbors(store, seqs, tmp_path / "k.npy", ngram=0)
    for bad in ({"ngram": 65}, {"overlap_threshold": 2}, {"exclude": "doc"}):  # (helper-29: files were left behind)
        with pytest.raises(InvalidInputError):
            retro.export_retro_pytorch(store, tmp_path / "exp", seq_len=2 * T, **bad)
        assert not list(tmp_path.glob("exp*"))
    with pytest.raises(InvalidInputError, match="seqs is NoneType; pass the windows"):
        retro.sequence_neighbors(store, None, tmp_path / "k.npy")
    for eos in (1.0, True):
        with pytest.raises(InvalidInputError, match=r"eos_id=.* must be an int token id"):
            retro.training_sequences(store, 2 * T, eos_id=eos, table=table)
    with pytest.raises(InvalidInputError, match=rf"k={len(store) + 1} must be an int in \[1, {len(store)}\]"):
        retro.model_neighbors(store, np.arange(1000, 1000 + T)[None], len(store) + 1)
    with pytest.raises(InvalidInputError, match=rf"k={len(store) + 1} "):
        retro.fetch_fn(store, len(store) + 1)
    held = fileio.WriterLock(tmp_path / "k.npy.lock")  # as another process writing the same output holds it
    try:
        with pytest.raises(WriterLockedError, match="another process is writing neighbours"):
            retro.sequence_neighbors(store, seqs, tmp_path / "k.npy")
    finally:
        held.release()


def test_neighbours_of_other_windows_and_purged_candidates_are_never_used(tmp_path, small_docs, embedder):
    """helper-28: TrainingSet took a neighbour file of another version's windows (same shape: a document
    deleted and appended again), and a pinned handle reused candidates searched before a compaction,
    keeping chunks purged since (read back as padding, counted as neither dropped nor short)."""
    texts = [d["text"] for d in small_docs[:4]]
    path = tmp_path / "s.rstore"
    with retrostore.create(path, embedder=embedder) as st:
        st.append(texts)
        first = st.commit()
    with retrostore.open(path, "a", embedder=embedder) as st:
        seqs = retro.training_sequences(st, 2 * T)
        retro.sequence_neighbors(st, seqs, tmp_path / "knn.npy", k=1)
        retro.TrainingSet(st, seqs, tmp_path / "knn.npy")  # its own windows: accepted
        st.delete([0])
        st.append([texts[0]])
        st.commit()
        again = retro.training_sequences(st, 2 * T)
        assert again.chunk_ids.shape == seqs.chunk_ids.shape  # the shape check alone let it through
        with pytest.raises(InvalidInputError, match=r"another store or store version \(its summary names version 1; "
                                                    r"this is version 2\)"):
            retro.TrainingSet(st, again, tmp_path / "knn.npy")
    # helper-29: another store of as many chunks has the same packed chunk ids: its identity tells them apart
    with retrostore.create(tmp_path / "q.rstore", embedder=embedder) as q:
        q.append(texts[::-1])
        q.commit()
        q_seqs = retro.training_sequences(q, 2 * T)
        assert np.array_equal(q_seqs.chunk_ids, seqs.chunk_ids)
        with pytest.raises(InvalidInputError, match="another store or store version"):
            retro.TrainingSet(q, q_seqs, tmp_path / "knn.npy")
        (tmp_path / "knn.summary.json").unlink()
        with pytest.raises(InvalidInputError, match="no readable summary beside it"):
            retro.TrainingSet(q, q_seqs, tmp_path / "knn.npy")
        assert len(retro.TrainingSet(q, q_seqs, tmp_path / "knn.npy", verify=False)) == len(q_seqs)
    with retrostore.open(path, version=first, embedder=embedder) as st:  # helper-31: a file written over it
        seqs = retro.training_sequences(st, 2 * T)
        retro.sequence_neighbors(st, seqs, tmp_path / "v1.npy", k=1)
        retro.TrainingSet(st, seqs, tmp_path / "v1.npy")
        np.save(tmp_path / "v1.npy", np.zeros_like(np.load(tmp_path / "v1.npy")))  # same shape, other ids
        with pytest.raises(InvalidInputError, match="has changed since its summary was written"):
            retro.TrainingSet(st, seqs, tmp_path / "v1.npy")
    with retrostore.open(path, version=first, embedder=embedder) as pinned:
        retro.sequence_neighbors(pinned, retro.training_sequences(pinned, 2 * T), tmp_path / "p.npy", k=2)
        with retrostore.open(path, "a", embedder=embedder) as writer:
            writer.delete([1])
            writer.commit()
            writer.compact(progress=False)
        seqs = retro.training_sequences(pinned, 2 * T)
        summary = retro.sequence_neighbors(pinned, seqs, tmp_path / "p.npy", k=2)  # the candidates file is reused
        assert summary["dropped"]["purged"] > 0
        knn = np.load(tmp_path / "p.npy")
        assert len(list(tmp_path.glob("p.candidates-*"))) == 1
        assert seqs.table.live[knn[knn >= 0]].all() and (seqs.table.doc_ids[knn[knn >= 0]] != 1).all()


def test_an_export_finished_meanwhile_is_not_replaced(store, tmp_path, monkeypatch):
    """helper-29: the exists/force check ran before OUT.lock was taken, so an export (without force)
    that found no OUT, then waited, replaced the export another process finished meanwhile."""
    import retrostore.retro.export as export_module

    out = tmp_path / "exp"
    cut = export_module.training_sequences

    other = []

    def slow_cut(*args, **kwargs):  # another process's export finishes while this one reads its windows
        seqs = cut(*args, **kwargs)
        if not other:
            other.append(True)
            retro.export_retro_pytorch(store, out, seq_len=2 * T, k=1)
        return seqs

    monkeypatch.setattr(export_module, "training_sequences", slow_cut)
    with pytest.raises(StoreExistsError, match="another export finished it meanwhile"):
        retro.export_retro_pytorch(store, out, seq_len=2 * T, k=2)
    assert json.loads((out / "export.json").read_text())["retro_dataset"]["num_neighbors"] == 1  # kept


def test_force_never_removes_what_the_user_put_in_an_export(store, tmp_path, monkeypatch):
    """helper-60: --force removed a directory named like an export file with its contents, and files put
    into the directory while the export ran (the check ran once, before minutes of neighbour search)."""
    from retrostore.retro import export as export_module

    out = tmp_path / "exp"
    retro.export_retro_pytorch(store, out, seq_len=2 * T, k=1)
    (out / "train.seq.dat").unlink()
    (out / "train.seq.dat" / "mydata").mkdir(parents=True)
    (out / "train.seq.dat" / "mydata" / "results.csv").write_text("user results")
    with pytest.raises(retrostore.OutputExistsError, match="holds 'train.seq.dat', which an export does not write"):
        retro.export_retro_pytorch(store, out, seq_len=2 * T, k=1, force=True)
    assert (out / "train.seq.dat" / "mydata" / "results.csv").read_text() == "user results"

    out2 = tmp_path / "exp2"
    retro.export_retro_pytorch(store, out2, seq_len=2 * T, k=1)
    before = {p.name: p.read_bytes() for p in out2.iterdir()}
    run = export_module.sequence_neighbors

    def meanwhile(*args, **kwargs):
        (out2 / "notes.txt").write_text("user notes")  # written while the export searches
        return run(*args, **kwargs)

    monkeypatch.setattr(export_module, "sequence_neighbors", meanwhile)
    with pytest.raises(retrostore.OutputExistsError, match="holds 'notes.txt'"):
        retro.export_retro_pytorch(store, out2, seq_len=2 * T, k=2, force=True)
    assert (out2 / "notes.txt").read_text() == "user notes"  # kept, and the earlier export with it
    assert {p.name: p.read_bytes() for p in out2.iterdir() if p.name != "notes.txt"} == before
    assert not [p for p in tmp_path.iterdir() if ".replaced-" in p.name]
    monkeypatch.setattr(export_module, "sequence_neighbors", run)
    (out2 / "notes.txt").unlink()
    retro.export_retro_pytorch(store, out2, seq_len=2 * T, k=2, force=True)  # a clean export is replaced
    assert json.loads((out2 / "export.json").read_text())["retro_dataset"]["num_neighbors"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "exp2"]


def test_odd_export_paths_are_clean_errors(store, tmp_path):
    """helper-60: a symlink loop and a file at OUT.partial were tracebacks; a file at OUT was told to use force."""
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    with pytest.raises(InvalidInputError, match="cannot be resolved"):
        retro.export_retro_pytorch(store, tmp_path / "loop1", seq_len=2 * T)
    (tmp_path / "p.partial").write_text("junk")
    with pytest.raises(InvalidInputError, match="is a file or a link"):
        retro.export_retro_pytorch(store, tmp_path / "p", seq_len=2 * T)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "q.partial").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidInputError, match="is a file or a link"):
        retro.export_retro_pytorch(store, tmp_path / "q", seq_len=2 * T)
    (tmp_path / "f").write_text("mine")
    with pytest.raises(InvalidInputError, match="is a file; an export is a directory"):
        retro.export_retro_pytorch(store, tmp_path / "f", seq_len=2 * T, force=True)
    assert (tmp_path / "f").read_text() == "mine" and not any((tmp_path / "elsewhere").iterdir())


def test_export_replacement_edge_cases(store, tmp_path):
    """helper-61: a link in a leftover OUT.partial overwrote a file outside; a FIFO under an export's name passed
    as ours; a name too long for OUT.replaced-* failed after the work; leftovers of an interrupted replacement were
    never mentioned; a private export came back world-readable."""
    import os
    import warnings

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "L.partial").mkdir()
    (tmp_path / "L.partial" / "train.chunks.dat").symlink_to(victim)
    retro.export_retro_pytorch(store, tmp_path / "L", seq_len=2 * T, k=1)
    assert victim.read_text() == "precious" and not (tmp_path / "L" / "train.chunks.dat").is_symlink()

    out = tmp_path / "E"
    retro.export_retro_pytorch(store, out, seq_len=2 * T, k=1)
    os.chmod(out, 0o700)
    (out / "export.json").unlink()
    os.mkfifo(out / "export.json")
    with pytest.raises(retrostore.OutputExistsError, match="holds 'export.json'"):
        retro.export_retro_pytorch(store, out, seq_len=2 * T, k=1, force=True)
    (out / "export.json").unlink()
    (tmp_path / "E.replaced-abcd1234").mkdir()  # as an export killed while replacing E leaves it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        retro.export_retro_pytorch(store, out, seq_len=2 * T, k=2, force=True)
    assert any("E.replaced-abcd1234 is an earlier export of E" in str(w.message) for w in caught)
    assert oct(out.stat().st_mode & 0o777) == "0o700"
    assert json.loads((out / "export.json").read_text())["retro_dataset"]["num_neighbors"] == 2

    long = tmp_path / ("x" * 240)
    with pytest.raises(InvalidInputError, match="give a shorter name"):
        retro.export_retro_pytorch(store, long, seq_len=2 * T, k=1)
    assert not long.exists()


def test_an_export_that_cannot_replace_out_says_where_it_is(store, tmp_path, monkeypatch):
    """helper-61: an immutable or mounted OUT (EPERM, EBUSY at the rename) was a traceback after all the work."""
    import errno
    import os

    from retrostore.retro import export as export_module

    out = tmp_path / "E"
    retro.export_retro_pytorch(store, out, seq_len=2 * T, k=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rename = os.replace

    def busy(src, dst):
        if str(src) == str(out):
            raise OSError(errno.EBUSY, "Device or resource busy")
        return rename(src, dst)

    monkeypatch.setattr(export_module.os, "replace", busy)
    with pytest.raises(retrostore.StoreIOError, match=r"the export is finished in .*E\.partial, but .*E cannot be "
                                                      r"replaced: Device or resource busy"):
        retro.export_retro_pytorch(store, out, seq_len=2 * T, k=2, force=True)
    monkeypatch.setattr(export_module.os, "replace", rename)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert (tmp_path / "E.partial" / "export.json").is_file() and not list(tmp_path.glob("E.replaced-*"))


def test_a_store_without_live_chunks_is_refused(tmp_path, small_docs, embedder):
    """helper-28: exporting an empty store was an IndexError that left OUT.partial behind; a store whose
    documents were all deleted exported 0 windows with exit 0."""
    with retrostore.create(tmp_path / "e.rstore", embedder=embedder) as st:
        with pytest.raises(InvalidInputError, match="no live chunk"):
            retro.export_retro_pytorch(st, tmp_path / "exp", seq_len=T)
        st.append([small_docs[0]["text"]])
        st.commit()
        st.delete([0])
        st.commit()
        with pytest.raises(InvalidInputError, match="no live chunk"):
            retro.export_retro_pytorch(st, tmp_path / "exp", seq_len=T, k=1)
        with pytest.raises(InvalidInputError, match="no live chunk"):  # (helper-29: all -1, no error)
            retro.model_neighbors(st, np.arange(1000, 1000 + T)[None], 1)
        with pytest.raises(InvalidInputError, match="no live chunk"):
            retro.sequence_neighbors(st, retro.training_sequences(st, T), tmp_path / "k.npy", k=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.rstore"]


def test_a_store_of_one_document_is_refused_by_every_neighbour_path(tmp_path, small_docs, embedder):
    """helper-59: a one-file .txt corpus (one document) exported windows whose neighbours were all -1, exit 0:
    RETRO excludes the window's own document. chunk_neighbors refused it already (helper-31)."""
    text = max((d["text"] for d in small_docs), key=len)
    with retrostore.create(tmp_path / "one.rstore", embedder=embedder) as st:
        st.append([text])
        st.commit()
        assert len(st) > 8
        for run in (lambda: retro.chunk_neighbors(st, tmp_path / "c.npy", k=1),
                    lambda: retro.sequence_neighbors(st, retro.training_sequences(st, 2 * T), tmp_path / "k.npy", k=1),
                    lambda: retro.sequence_neighbors(st, retro.training_sequences(st, 2 * T), tmp_path / "k.npy", k=1,
                                                     exclude="chunk"),
                    lambda: retro.export_retro_pytorch(st, tmp_path / "exp", seq_len=2 * T, k=1)):
            with pytest.raises(InvalidInputError, match="live chunks in one document.*a .txt input is one document"):
                run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.rstore"]


# --- leakage: duplicates and n-gram overlap ----------------------------------------------------

def test_ngram_overlap_and_duplicate_detection():
    a = np.arange(100, 164)
    assert retro.ngram_overlap(a, a) == 1.0
    assert retro.ngram_overlap(a[:5], a[:5]) == 1.0          # shorter than 13: exact copies still count
    assert retro.ngram_overlap(a[:5], a[:6]) == 0.0
    shifted = np.concatenate([np.arange(900, 910), a[:54]])  # the query's first 54 tokens, 10 later
    assert retro.ngram_overlap(a, shifted) == pytest.approx(42 / 52)
    assert retro.ngram_overlap(a, np.arange(500, 564)) == 0.0
    with pytest.raises(InvalidInputError, match="1-D integer"):
        retro.ngram_overlap(a.astype(float), a)
    toks = np.zeros((4, 8), np.int32)
    toks[0, :3] = toks[2, :3] = [5, 6, 7]
    toks[1, :3] = [5, 6, 8]
    toks[3, :2] = [5, 6]
    first = retro.duplicate_chunks(toks, np.array([3, 3, 3, 2]))
    np.testing.assert_array_equal(first, [0, 1, 0, 3])
    for bad in ((toks, np.array([3, 3, 3])), (toks[0], np.array([3])), (toks, np.array([3, 3, 3, 2]), [True])):
        with pytest.raises(InvalidInputError, match=r"must be shaped \(N, T\), \(N,\) and \(N,\)"):
            retro.duplicate_chunks(*bad)  # helper-17: a bare numpy ValueError


@pytest.mark.parametrize("mode", ["document", "packed"])
def test_duplicates_never_leak_the_query(tmp_path_factory, tmp_path, pydocs, embedder, mode):
    """Two documents stored twice and a half-page copied at another chunk alignment: with
    own-document exclusion and the filters, no neighbour's tokens equal its query chunk's."""
    with retrostore.open(duplicated_store(tmp_path_factory, pydocs, embedder), embedder=embedder) as st:
        tab = retro.chunk_table(st)
        first = retro.duplicate_chunks(tab.tokens, tab.lengths, tab.live)
        assert (first != np.arange(len(tab))).sum() >= 34               # every chunk of the two copies
        # Without the filters, the verbatim copies are what own-document exclusion returns:
        plain = st.precompute_neighbors(tmp_path / "plain.npy", k=2, exclude_same_doc=True, progress=False)
        plain = np.load(plain)
        copies = sum(np.array_equal(tab.tokens[q], tab.tokens[plain[q, 0]]) for q in range(len(tab))
                     if tab.lengths[q] == tab.lengths[plain[q, 0]])
        assert copies >= 30
        seqs = retro.training_sequences(st, 2 * T, mode=mode, table=tab)
        summary = retro.sequence_neighbors(st, seqs, tmp_path / "knn.npy", k=2)
        knn = np.load(tmp_path / "knn.npy")
        q = np.broadcast_to(seqs.chunk_ids[..., None], knn.shape)
        ok = (knn >= 0) & (q >= 0)
        qa, na = q[ok], knn[ok]
        same = [(tab.lengths[a] == tab.lengths[b]) and np.array_equal(tab.tokens[a], tab.tokens[b])
                for a, b in zip(qa, na)]
        assert not any(same)
        overl = [retro.ngram_overlap(tab.tokens[a, :tab.lengths[a]], tab.tokens[b, :tab.lengths[b]])
                 for a, b in zip(qa, na)]
        assert max(overl) < retro.DEFAULT_OVERLAP_THRESHOLD
        assert summary["dropped"]["duplicates"] >= 30 and summary["dropped"]["overlap"] > 0


def _grams(tokens, n: int = 13) -> set:
    tokens = [int(x) for x in tokens]
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


@pytest.mark.parametrize("mode", ["document", "packed"])
def test_copies_never_hand_a_window_its_own_future(tmp_path_factory, tmp_path, pydocs, embedder, mode):
    """helper-28: with a page stored twice, a slot's neighbour was the copy of the window's *next*
    chunk (not of the query chunk, so no filter saw it), and neighbour + continuation held the text the
    window predicts (69 of 568 slots). Checked here by brute force on the retrieved tokens: no slot's
    neighbour + continuation holds half a chunk's worth of 13-grams of its window from its chunk on."""
    with retrostore.open(duplicated_store(tmp_path_factory, pydocs, embedder), embedder=embedder) as st:
        tab = retro.chunk_table(st)
        seqs = retro.training_sequences(st, 4 * T, mode=mode, table=tab)
        summary = retro.sequence_neighbors(st, seqs, tmp_path / "knn.npy", k=2)
        knn = np.load(tmp_path / "knn.npy")
        nt = retro.neighbor_tokens(st, knn, table=tab)
        worst = 0
        for i in range(len(seqs)):
            window = seqs[i]
            for u in np.flatnonzero(seqs.chunk_ids[i] >= 0):
                ahead = _grams(window[u * T:])
                for j in np.flatnonzero(knn[i, u] >= 0):
                    worst = max(worst, len(ahead & _grams(nt.tokens[i, u, j][nt.mask[i, u, j]])))
        assert worst < retro.DEFAULT_OVERLAP_THRESHOLD * (T - 13 + 1), worst
        assert summary["dropped"]["window"] > 0  # the copies of later chunks were there, and dropped
        assert (knn >= 0).sum() >= 0.9 * 2 * (seqs.chunk_ids >= 0).sum()  # and slots were still filled


class _OwnVectors:
    """An embedder whose vectors come from elsewhere: it cannot embed (the quick start's MyModel)."""
    dim = 384
    fingerprint = {"kind": "mine", "name": "vectors-from-elsewhere", "dim": 384}

    def embed(self, texts):
        raise NotImplementedError("vectors come from my own pipeline")


def test_slots_searched_again_use_the_stored_vectors(tmp_path_factory, tmp_path, pydocs, embedder):
    """Slots whose candidates all fell are searched again with the vectors the candidates were
    searched with, read back (re-embedding cost 36% of a filtered run on a store built twice): a
    store fed its own vectors gets those slots filled (they were left short) and the very ids of a
    store that embedded the same chunks itself."""
    dup = duplicated_store(tmp_path_factory, pydocs, embedder)
    with retrostore.open(dup, embedder=embedder) as st:
        texts = [st.get_document(d).text for d in range(st.info()["documents"])]
        vecs = st._stored_vectors(np.arange(len(st)))
        seqs = retro.training_sequences(st, 4 * T)
        ref = retro.sequence_neighbors(st, seqs, tmp_path / "ref.npy", k=2, candidates=2)
    assert ref["research"] > 0 and ref["short"] == 0
    with retrostore.create(tmp_path / "own.rstore", embedder=_OwnVectors(),
                           tokenizer=retrostore.default_tokenizer_path()) as own:
        chunks = own.chunker.chunk_many(texts)
        assert sum(len(c) for c in chunks) == len(vecs)
        own.append(texts, embeddings=vecs, chunks=chunks)
        own.commit()
        got = retro.sequence_neighbors(own, retro.training_sequences(own, 4 * T), tmp_path / "own.npy", k=2,
                                       candidates=2)
    assert got["research"] == ref["research"] and got["short"] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "own.npy"), np.load(tmp_path / "ref.npy"))


def test_an_ivf_index_is_searched_again_in_more_lists(tmp_path, pydocs, embedder):
    """helper-32: on an IVF store (nprobe 1 of 16 lists) slots and rows were left with no
    neighbour although other lists held admissible chunks: the search again stopped when the
    probed lists ran out, and a slot whose candidates were fewer than asked was never searched
    again. It probes more lists as it widens, all of them at the last step."""
    pages = [d["text"] for d in pydocs_slice(pydocs, n=6, lo=1_500, hi=6_000)]
    with retrostore.create(tmp_path / "base.rstore", embedder=embedder) as st:
        st.append(pages)
        st.commit()
        vecs = st._stored_vectors(np.arange(len(st)))
    copies = -(-700 // len(vecs))  # stored that many times: enough vectors to train IVF16
    with retrostore.create(tmp_path / "ivf.rstore", embedder=_OwnVectors(), tokenizer=retrostore.default_tokenizer_path(),
                           index="IVF16,PQ16x4fs", index_params={"nprobe": 1}) as st:
        chunks = st.chunker.chunk_many(pages)
        for _ in range(copies):
            st.append(pages, embeddings=vecs, chunks=chunks)
            st.commit()
        assert st.info()["index"]["factory"] == "IVF16,PQ16x4fs"
        seq = retro.sequence_neighbors(st, retro.training_sequences(st, 8 * T), tmp_path / "s.npy", k=2)
        per_chunk = retro.chunk_neighbors(st, tmp_path / "c.npy", k=2)
    assert seq["research"] > 0 and seq["short"] == 0
    assert per_chunk["research"] > 0 and per_chunk["short"] == 0 and (np.load(tmp_path / "c.npy") >= 0).all()


def test_chunks_whose_candidates_all_fell_are_searched_again(tmp_path, pydocs, embedder):
    """A page stored eight times: each chunk's candidates are its copies and their neighbours'
    copies, all dropped; ``chunk_neighbors`` left those chunks with no neighbour (134 of 6,116 on a
    store built twice). They are searched again, wider, and hold no copy of their chunk or of the
    two chunks after it."""
    page, other = [d["text"] for d in pydocs_slice(pydocs, n=2, lo=1_500, hi=4_000)]
    with retrostore.create(tmp_path / "eight.rstore", embedder=embedder) as st:
        st.append([page] * 8 + [other])
        st.commit()
        summary = retro.chunk_neighbors(st, tmp_path / "n.npy", k=2)
        tab = retro.chunk_table(st)
        knn = np.load(tmp_path / "n.npy")
        nt = retro.neighbor_tokens(st, knn, table=tab)
    assert summary["research"] > 0 and summary["short"] == 0 and (knn >= 0).all()
    for q in range(len(knn)):
        after = [q] + [q + j for j in (1, 2) if q + j < len(tab) and (tab.doc_ids[q:q + j + 1] == tab.doc_ids[q]).all()]
        ahead = _grams(np.concatenate([tab.tokens[c, :tab.lengths[c]] for c in after]))
        for j in range(2):
            assert tab.doc_ids[knn[q, j]] != tab.doc_ids[q]
            assert len(ahead & _grams(nt.tokens[q, j][nt.mask[q, j]])) < retro.DEFAULT_OVERLAP_THRESHOLD * (T - 12), (q, j)


def test_a_reader_searches_again_after_another_process_compacts(tmp_path, pydocs, embedder):
    """helper-32: the search again read the raw vectors files afresh, which another process's
    compact had retired: CorruptStoreError "vectors file ... missing" on a handle whose own mapped
    files (what the candidates' search read) were intact."""
    pages = [d["text"] for d in pydocs_slice(pydocs, n=2, lo=1_500, hi=4_000)]
    path = tmp_path / "c.rstore"
    with retrostore.create(path, embedder=embedder, index="HNSW32,SQfp16") as st:
        for _ in range(4):
            st.append(pages)
            st.commit()
    with retrostore.open(path, embedder=embedder) as reader:
        seqs = retro.training_sequences(reader, 4 * T)
        subprocess.run([sys.executable, "-c", "import retrostore, sys\n"
                        "with retrostore.open(sys.argv[1], mode='a') as w:\n"
                        "    w.delete([0]); w.commit(); w.compact(progress=False)", str(path)], check=True)
        summary = retro.sequence_neighbors(reader, seqs, tmp_path / "knn.npy", k=2, candidates=2)
        assert summary["research"] > 0  # (slots left short: every other page is a copy of the window's)
        assert retro.chunk_neighbors(reader, tmp_path / "c.npy", k=2)["rows"] == len(reader)


def test_model_neighbors_pass_over_copies_of_the_row(tmp_path_factory, pydocs, embedder):
    """helper-28: on a store holding a page twice, a held-out row of that page (its own document
    excluded) retrieved the copy of each of its chunks, whose continuation is the row's next chunk;
    generation's fetch_fn the same for a prompt chunk."""
    with retrostore.open(duplicated_store(tmp_path_factory, pydocs, embedder), embedder=embedder) as st:
        ids, _ = st.chunker.encode(st.get_document(0).text)  # document 3 is its copy
        row = ids[None, :3 * T]
        plain = retro.model_neighbors(st, row, 2, exclude_doc_ids=[[0]], overlap_threshold=None)
        assert (plain.doc_ids[0, :, 0] == 3).all()  # the copy of each chunk comes first without the rules
        nb = retro.model_neighbors(st, row, 2, exclude_doc_ids=[[0]])
        assert nb.tokens.shape == plain.tokens.shape and nb.mask[..., :T].any(-1).all()
        for u in range(3):
            ahead = _grams(row[0, u * T:])
            for j in range(2):
                got = nb.tokens[0, u, j][nb.mask[0, u, j]]
                assert len(ahead & _grams(got)) < retro.DEFAULT_OVERLAP_THRESHOLD * (T - 13 + 1), (u, j)
                assert not np.array_equal(nb.tokens[0, u, j, :T], row[0, u * T:(u + 1) * T])
        chunk = row[:, :T]
        fetched = retro.fetch_fn(st, 2, exclude_doc_ids=[0])(chunk)
        assert not (fetched[:, :, :T] == chunk[:, None, :]).all(-1).any()
        assert (retro.fetch_fn(st, 2, exclude_doc_ids=[0], overlap_threshold=None)(chunk)[:, 0, :T] == chunk).all()
        with pytest.raises(InvalidInputError, match=r"overlap_threshold=2 must be a share in \(0, 1\]"):
            retro.model_neighbors(st, row, 2, overlap_threshold=2)


def test_future_overlap_counts_chunks_and_spans_across_them():
    rng = np.random.default_rng(0)
    win = rng.integers(1_000, 30_000, (1, 4 * T + 1))
    spans = np.zeros((1, 4, 3, 2 * T), np.int64)
    spans[0, :, 0] = win[0, T:3 * T]                         # a copy of chunks 1 and 2
    spans[0, :, 1] = rng.integers(1_000, 30_000, 2 * T)       # unrelated text
    spans[0, :, 2] = win[0, 2 * T - 40:4 * T - 40]            # a copy across chunk boundaries
    share = retro.future_overlap(win, np.ones_like(win, bool), T, spans, np.full((1, 4, 3), 2 * T))[0]
    # In chunks' worth of n-grams (T - 13 + 1 = 52 per chunk): 1 and more is a whole chunk or more.
    assert share[0, 0] > 2 and share[1, 0] > 2 and share[2, 0] == 1  # chunks 1-2 / chunk 2 (52 n-grams)
    assert share[3, 0] == 0 and (share[:, 1] == 0).all()                  # slot 3: chunks 1-2 are its past
    assert share[2, 2] > 1 and 0.2 < share[3, 2] < 0.5                     # 88 tokens from chunk 2 on / 24 of 3
    padded = np.ones_like(win, bool)
    padded[0, T:] = False  # padding from chunk 1 on: nothing there to protect
    assert (retro.future_overlap(win, padded, T, spans, np.full((1, 4, 3), 2 * T))[0][:, 0] == 0).all()


def test_deleted_documents_are_left_out(tmp_path, small_docs, embedder):
    texts = [d["text"] for d in small_docs[-3:]]
    with retrostore.create(tmp_path / "d.rstore", embedder=embedder) as st:
        st.append(texts)
        st.commit()
        gone = list(st.get_document(1).chunk_ids)
        st.delete(1)
        st.commit()
        tab = retro.chunk_table(st)
        assert not tab.live[gone].any() and tab.live.sum() == len(st) - len(gone)
        last0 = gone[0] - 1                      # document 0's last chunk: its id + 1 is deleted
        assert st.deleted_chunks([[gone[-1], last0, -1]]).tolist() == [[True, False, False]]
        with pytest.raises(InvalidInputError, match=rf"chunk id {len(st)} is outside \[-1, {len(st)}\)"):
            st.deleted_chunks([len(st)])
        nt = retro.neighbor_tokens(st, [[last0, -1]])
        assert nt.doc_ids[0, 0] == 0 and not nt.mask[0, 0, T:].any()
        np.testing.assert_array_equal(nt.tokens, retro.neighbor_tokens(st, [[last0, -1]], table=tab).tokens)
        for kw in ({}, {"table": tab}):          # a deleted chunk is not served: no neighbour, as Store's rule
            nt = retro.neighbor_tokens(st, [[gone[0], last0]], **kw)
            assert nt.chunk_ids.tolist() == [[-1, last0]] and nt.doc_ids[0, 0] == -1 and not nt.mask[0, 0].any()
        seqs = retro.training_sequences(st, 2 * T, mode="document", table=tab)
        assert not set(seqs.chunk_ids.ravel().tolist()) & set(gone)
        retro.sequence_neighbors(st, seqs, tmp_path / "k.npy", k=2)
        assert not set(np.load(tmp_path / "k.npy").ravel().tolist()) & set(gone)


def test_table_path_never_serves_chunks_purged_since_it_was_read(store, tmp_path, embedder):
    """A reader's chunk_table is a snapshot; a compaction that purges a document (a take-down)
    must hide its chunks on the table path too, as Store.neighbor_tokens does."""
    import shutil

    path = tmp_path / "copy.rstore"
    shutil.copytree(store.path, path)
    with retrostore.open(path, embedder=embedder) as reader:
        tab = retro.chunk_table(reader)
        doc = reader.get_document(1)
        first = int(doc.chunk_ids[0])
        ids = np.array([[first, first - 1]])
        assert (retro.neighbor_tokens(reader, ids, table=tab).chunk_ids == ids).all()
        assert not reader.deleted_chunks(ids).any()
        with retrostore.open(path, "a", embedder=embedder) as writer:
            writer.delete([1])
            writer.commit()
            writer.compact(progress=False)
        assert reader.deleted_chunks(ids).tolist() == [[True, False]]  # purged since this handle's version
        for t in (None, tab):
            nt = retro.neighbor_tokens(reader, ids, table=t)
            assert nt.chunk_ids.tolist() == [[-1, first - 1]]
            assert not nt.mask[0, 0].any() and not nt.mask[0, 1, T:].any()  # no continuation into doc 1


def test_results_larger_than_the_machine_are_refused_before_any_work(store, table):
    """An output that could not fit in RAM is a clear error naming the size, not a bare MemoryError
    after seconds of work (or the OOM killer); nothing is allocated for the check."""
    huge = np.broadcast_to(np.int64(3), (10**7, 100))  # a view: no memory
    for tab in (None, table):
        with pytest.raises(InvalidInputError, match=r"would need [\d.]+ GiB, more than half of this machine's"):
            retro.neighbor_tokens(store, huge, table=tab)
    queries = np.broadcast_to(np.full(store.embedder.dim, 0.05, np.float32), (10**6, store.embedder.dim))
    with pytest.raises(InvalidInputError, match="search fewer queries per call or ask for a smaller k"):
        store.search_vectors(queries, 100_000)


def test_a_table_or_candidates_of_another_store_are_never_reused(tmp_path, small_docs, embedder):
    """helper-17: two stores at the same version with as many chunks (the same documents in another
    order) took each other's chunk table, and sequence_neighbors reused the other's candidates file
    (named by the version number only): other neighbours, silently."""
    texts = [d["text"] for d in small_docs[-4:]]
    for name, order in (("b", texts), ("c", texts[::-1])):
        with retrostore.create(tmp_path / name, embedder=embedder) as st:
            st.append(order)
            st.commit()
    with retrostore.open(tmp_path / "b", embedder=embedder) as b, retrostore.open(tmp_path / "c", embedder=embedder) as c:
        assert (b.version, len(b)) == (c.version, len(c))
        tb = retro.chunk_table(b)
        with pytest.raises(InvalidInputError, match="read from another store"):
            retro.neighbor_tokens(c, [[0, 1]], table=tb)
        with pytest.raises(InvalidInputError, match="read from another store"):
            retro.training_sequences(c, 2 * T, table=tb)
        with pytest.raises(InvalidInputError, match="read from another store"):
            retro.sequence_neighbors(c, retro.training_sequences(b, 2 * T, table=tb), tmp_path / "x.npy")
        out = tmp_path / "knn.npy"
        retro.sequence_neighbors(b, retro.training_sequences(b, 2 * T), out, k=2)
        seqs_c = retro.training_sequences(c, 2 * T)
        retro.sequence_neighbors(c, seqs_c, out, k=2)  # the same OUT: b's candidates must not be used
        (tmp_path / "fresh").mkdir()
        retro.sequence_neighbors(c, seqs_c, tmp_path / "fresh" / "knn.npy", k=2)
        np.testing.assert_array_equal(np.load(out), np.load(tmp_path / "fresh" / "knn.npy"))
        assert len(list(tmp_path.glob("knn.candidates-*-k*.npy"))) == 2


def test_k_and_seq_len_beyond_the_store_are_refused_before_any_work(store, table, tmp_path):
    """helper-17: k = 100,000 on a small store wrote a file of -1 padding, k = 10**9 and a window of
    6.4e9 tokens ended in MemoryError (6.4e10: the OOM killer)."""
    n = len(store)
    seqs = retro.training_sequences(store, 2 * T, table=table)
    for k in (n + 1, 10**9):
        with pytest.raises(InvalidInputError, match=rf"k={k} must be an int in \[1, {n}\]; the store holds {n:,}"):
            retro.sequence_neighbors(store, seqs, tmp_path / "knn.npy", k=k)
        with pytest.raises(InvalidInputError, match=rf"k={k} must be an int in \[1, {n}\]"):
            retro.export_retro_pytorch(store, tmp_path / "exp", seq_len=2 * T, k=k)
    for seq_len in ((n + 1) * T, 6_400_000_000):
        with pytest.raises(InvalidInputError, match=rf"seq_len={seq_len:,} is more than the store's {n:,} chunks"):
            retro.training_sequences(store, seq_len, table=table)
    assert retro.training_sequences(store, n * T, table=table).seq_len == n * T  # the whole store: allowed
    assert not list(tmp_path.iterdir())


def _tokens_in_child(store, table, ids, queue):
    try:
        queue.put(("ok", retro.neighbor_tokens(store, ids, table=table).tokens.shape))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(("fail", type(exc).__name__))


def test_table_path_works_in_a_forked_worker(store, table):
    """helper-18: DataLoader workers forked after open read neighbour tokens through a chunk table
    (no LMDB); the take-down check added for it must not refuse the fork as LMDB reads do."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_tokens_in_child, args=(store, table, np.array([[0, 1]]), queue))
    proc.start()
    got = queue.get(timeout=60)
    proc.join(60)
    assert got == ("ok", (1, 2, 2 * T)), got


def test_outputs_flags_and_tables_checked_before_work(store, table, tmp_path):
    """helper-42: an unwritable output directory was a "writer lock file" CorruptStoreError (or a raw
    PermissionError) after the work; a directory named *.npy a raw IsADirectoryError at the end;
    force="no" replaced an export; table="x" an AttributeError; fetch_fn("31") excluded docs 3 and 1."""
    seqs = retro.training_sequences(store, 2 * T, table=table)
    if sys.platform.startswith("linux"):  # no file can be created in /proc, not even by root
        for call in (lambda: retro.sequence_neighbors(store, seqs, "/proc/x.npy"),
                     lambda: retro.chunk_neighbors(store, "/proc/x.npy"),
                     lambda: store.precompute_neighbors("/proc/x.npy"),
                     lambda: retro.export_retro_pytorch(store, "/proc/exp", seq_len=2 * T)):
            with pytest.raises(InvalidInputError, match=r"no file can be created in '/proc'.*choose a writable"):
                call()
    (tmp_path / "d.npy").mkdir()
    for call in (lambda: retro.sequence_neighbors(store, seqs, tmp_path / "d.npy"),
                 lambda: retro.chunk_neighbors(store, tmp_path / "d.npy")):
        with pytest.raises(InvalidInputError, match=r"d.npy' is a directory; give a file name ending in .npy"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npy"]  # nothing written beside it
    summary = retro.sequence_neighbors(store, seqs, tmp_path / "s.npy", k=1)  # helper-41: OUT.lock stayed behind
    assert summary["rows"] == len(seqs) and not (tmp_path / "s.npy.lock").exists()
    retro.chunk_neighbors(store, tmp_path / "c.npy", k=1)
    assert (tmp_path / "c.npy").exists() and not (tmp_path / "c.npy.lock").exists()
    for bad in ({"force": "no"}, {"allow_pad_collision": "no"}, {"progress": 1}):
        with pytest.raises(InvalidInputError, match=r"must be True or False"):
            retro.export_retro_pytorch(store, tmp_path / "exp", seq_len=2 * T, **bad)
    with pytest.raises(InvalidInputError, match=r"drop_duplicates='no' must be True or False"):
        retro.sequence_neighbors(store, seqs, tmp_path / "s.npy", drop_duplicates="no")
    with pytest.raises(InvalidInputError, match=r"table is 'x' \(str\); pass the ChunkTable"):
        retro.neighbor_tokens(store, np.array([[0, 1]]), table="x")
    with pytest.raises(InvalidInputError, match=r"table is 'x' \(str\)"):
        retro.training_sequences(store, 2 * T, table="x")
    with pytest.raises(InvalidInputError, match=r"path=5 must be the path of an export"):
        retro.retro_dataset_kwargs(5)
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(InvalidInputError, match=r"it lacks one of chunk_memmap_path"):
        retro.retro_dataset_kwargs(tmp_path / "list.json")
    np.save(tmp_path / "empty.npy", np.zeros((0, 2), np.int64))
    with pytest.raises(InvalidInputError, match=r"holds no row \(shape \(0, 2\)\)"):
        retro.NeighborFile(store, tmp_path / "empty.npy")[0]
    for bad, msg in (("31", r"exclude_doc_ids is '31'; give an iterable"), ([3.9], r"holds 3.9; doc ids are ints"),
                     (3, r"exclude_doc_ids is 3"), ([-1], r"holds -1; doc ids are ints >= 0")):
        with pytest.raises(InvalidInputError, match=msg):
            retro.fetch_fn(store, 2, exclude_doc_ids=bad)


def test_exclusion_searches_past_the_k_limit(store, table, monkeypatch):
    """helper-42: excluding a document that holds more than MAX_K (100,000) of a query's nearest chunks
    failed with "k=144367 exceeds the limit" (the widening search passed its fetch as a caller's k).
    Here the limit is lowered to 8 so that a real document outgrows it."""
    doc = int(np.bincount(table.doc_ids[table.doc_ids >= 0]).argmax())
    assert len(store.get_document(doc).chunk_ids) > 12
    rows = np.stack([_row_of_tokens(store, doc, 1)[:T]])
    want = store.neighbors(rows, k=3, exclude_doc_ids=[[doc]])
    monkeypatch.setattr(reading, "MAX_K", 8)
    with pytest.raises(InvalidInputError, match="k=9 exceeds the limit of 8"):
        store.search_vectors(np.full((1, store.manifest["index"]["dim"]), 0.05, np.float32), 9)
    got = store.neighbors(rows, k=3, exclude_doc_ids=[[doc]])
    np.testing.assert_array_equal(got.chunk_ids, want.chunk_ids)
    assert (got.doc_ids != doc).all() and (got.chunk_ids >= 0).all()


def test_document_mode_neighbours_end_their_documents_with_eos(store, table, tmp_path):
    """helper-44: in document mode the windows now hold [SEP] right after each document's text (as
    retro-pytorch's preprocessing does); the neighbours and continuations that end a document carry it
    too, as the export's rows that RETRODataset reads (tests/test_retro_pytorch.py checks every row)."""
    seqs = retro.training_sequences(store, 2 * T, mode="document", table=table)
    retro.sequence_neighbors(store, seqs, tmp_path / "knn.npy", k=2)
    seq, retrieved, mask = retro.TrainingSet(store, seqs, tmp_path / "knn.npy").batch(0, len(seqs))
    ids = np.load(tmp_path / "knn.npy")
    checked = 0
    for (w, j, n), cid in np.ndenumerate(ids):
        if cid < 0:
            continue
        length = int(table.lengths[cid])
        if not table.next_in_doc[cid] and length < T:
            assert retrieved[w, j, n, length] == 102 and mask[w, j, n, length]
            assert (retrieved[w, j, n, length + 1:] == 0).all()              # no continuation
            checked += 1
        elif table.next_in_doc[cid]:
            nxt = int(table.lengths[cid + 1])
            np.testing.assert_array_equal(retrieved[w, j, n, T:T + nxt], table.tokens[cid + 1, :nxt])
            if not table.next_in_doc[cid + 1] and nxt < T:
                assert retrieved[w, j, n, T + nxt] == 102                    # the continuation ends its document
    assert checked > 0


def test_output_lock_opened_before_a_finished_run_removed_it_is_not_held_twice(tmp_path, monkeypatch):
    """review: a process that opened OUT.lock, then locked it after the run holding it had finished
    (done() removed the file, then release), held a lock on a removed file; a third process then
    locked a new OUT.lock: two writers of one output."""
    import os

    from retrostore.retro._checks import output_lock

    out = tmp_path / "knn.npy"
    first = output_lock(out, "neighbours")
    real_open = os.open

    def open_then_first_finishes(*args, **kwargs):
        fd = real_open(*args, **kwargs)
        monkeypatch.setattr(os, "open", real_open)
        first.done()
        first.release()
        return fd

    monkeypatch.setattr(os, "open", open_then_first_finishes)
    second = output_lock(out, "neighbours")
    assert os.path.exists(second.path)  # it holds the OUT.lock that is there, not the removed one
    with pytest.raises(WriterLockedError, match="another process is writing neighbours"):
        output_lock(out, "neighbours")
    second.release()
