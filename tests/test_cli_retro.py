"""The RETRO training commands: ``neighbors --sequences`` / ``--tokens`` and ``export``, through click's
CliRunner on real pydocs stores (issue 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import retrostore
from retrostore import retro
from retrostore.cli import cli

from _retro_stores import duplicated_store, retro_store

T = 64


@pytest.fixture(scope="module")
def dup(tmp_path_factory, pydocs, embedder):
    return duplicated_store(tmp_path_factory, pydocs, embedder)


@pytest.fixture(scope="module")
def sliced(tmp_path_factory, pydocs, embedder):
    return retro_store(tmp_path_factory, pydocs, embedder)


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_neighbors_sequences_writes_windows_filtered_ids_and_tokens(dup, tmp_path):
    out, toks = tmp_path / "knn.npy", tmp_path / "tok.npy"
    res = _run("neighbors", dup, "--out", out, "--sequences", "--seq-len", 2 * T, "--tokens", toks, "-q")
    assert res.exit_code == 0, res.output
    assert "exact copies" in res.output
    knn = np.load(out)
    windows = np.load(tmp_path / "knn.windows.npy")
    with retrostore.open(dup) as st:
        seqs = retro.training_sequences(st, 2 * T)
        assert windows.dtype == np.int32 and np.array_equal(windows, seqs.tokens())
        assert np.array_equal(np.load(tmp_path / "knn.window_chunks.npy"), seqs.chunk_ids)
        assert np.array_equal(np.load(tmp_path / "knn.window_docs.npy"), seqs.doc_ids)
        assert knn.shape == (len(seqs), 2, 2)
        nt = retro.neighbor_tokens(st, knn)
        tokens, mask = np.load(toks), np.load(tmp_path / "tok.mask.npy")
        assert tokens.shape == knn.shape + (2 * T,) and tokens.dtype == np.int32
        assert np.array_equal(tokens, nt.tokens) and np.array_equal(mask, nt.mask)
        # The store holds two pages twice: no neighbour is the query chunk's verbatim copy, and none
        # comes from a document of the window.
        summary = json.loads((tmp_path / "knn.summary.json").read_text())
        assert summary["dropped"]["duplicates"] > 0
        for row in range(len(seqs)):
            for slot in range(2):
                cid = seqs.chunk_ids[row, slot]
                if cid < 0:
                    continue
                query = seqs.table.padded(np.array([cid]), 0)[0]
                for j in range(2):
                    n = knn[row, slot, j]
                    if n >= 0:
                        assert not np.array_equal(seqs.table.padded(np.array([n]), 0)[0], query)
                        assert seqs.table.doc_ids[n] not in set(seqs.doc_ids[row].tolist())


def test_document_mode_neighbor_tokens_equal_what_training_reads(sliced, tmp_path):
    """helper-59: in document mode the tokens `neighbors --tokens` wrote (and NeighborFile read) had no eos
    after a neighbour that ends its document, where TrainingSet and the export's rows have one."""
    out, toks = tmp_path / "dk.npy", tmp_path / "dtok.npy"
    res = _run("neighbors", sliced, "--out", out, "--sequences", "--seq-len", 2 * T, "--mode", "document",
               "--tokens", toks, "-q")
    assert res.exit_code == 0, res.output
    with retrostore.open(sliced) as st:
        seqs = retro.training_sequences(st, 2 * T, mode="document")
        _, retrieved, mask = retro.TrainingSet(st, seqs, out).batch(0, len(seqs))
        nf = retro.NeighborFile(st, out, table=seqs.table, eos_id=seqs.eos_id).tokens(0, len(seqs))
        with pytest.raises(retrostore.InvalidInputError, match="eos_id needs table="):
            retro.NeighborFile(st, out, eos_id=seqs.eos_id)
        for bad, match in ((seqs.pad_id, "equals pad_id"), (-1, "eos_id"), (10**9, "eos_id"), (1.5, "eos_id")):
            with pytest.raises(retrostore.InvalidInputError, match=match):
                retro.NeighborFile(st, out, table=seqs.table, eos_id=bad)
    written = np.load(toks)
    assert (written == seqs.eos_id).sum() > 0 and (written == seqs.eos_id).sum() == (retrieved == seqs.eos_id).sum()
    assert np.array_equal(written, retrieved) and np.array_equal(np.load(tmp_path / "dtok.mask.npy"), mask)
    assert np.array_equal(nf.tokens, retrieved) and np.array_equal(nf.mask, mask)


def test_neighbors_tokens_of_store_chunks(sliced, tmp_path):
    out, toks = tmp_path / "knn.npy", tmp_path / "tok.npy"
    res = _run("neighbors", sliced, "--out", out, "--exclude-same-doc", "--tokens", toks, "-q")
    assert res.exit_code == 0, res.output
    with retrostore.open(sliced) as st:
        nb = st.neighbor_tokens(np.load(out))
    assert np.array_equal(np.load(toks), nb.tokens) and np.array_equal(np.load(tmp_path / "tok.mask.npy"), nb.mask)


def test_neighbors_of_store_chunks_exclude_their_own_document_by_default(sliced, tmp_path):
    """helper-28: `retrostore neighbors STORE --out` gave every chunk itself as a neighbour."""
    assert _run("neighbors", sliced, "--out", tmp_path / "a.npy", "-q").exit_code == 0
    assert _run("neighbors", sliced, "--out", tmp_path / "b.npy", "--include-same-doc", "-q").exit_code == 0
    with retrostore.open(sliced) as st:
        docs = retro.chunk_table(st).doc_ids
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert (docs[a] != docs[:, None]).all()
    assert (b[:, 0] == np.arange(len(b))).mean() > 0.9  # its own chunk first, when asked for


def test_neighbors_of_store_chunks_pass_over_their_copies(dup, tmp_path):
    """helper-29: on a store holding pages twice, the default left each chunk's copy (in the other
    document) as its neighbour, whose continuation is the chunk's own next chunk."""
    res = _run("neighbors", dup, "--out", tmp_path / "n.npy", "-q")
    assert res.exit_code == 0 and "exact copies" in res.output, res.output
    knn = np.load(tmp_path / "n.npy")
    with retrostore.open(dup) as st:
        tab = retro.chunk_table(st)
        assert knn.shape == (len(st), 2)
    copies = [q for q in range(len(knn)) for n in knn[q] if n >= 0 and tab.lengths[n] == tab.lengths[q]
              and np.array_equal(tab.tokens[n], tab.tokens[q])]
    assert not copies and (knn >= 0).all()  # chunks whose candidates all fell were searched again
    summary = json.loads((tmp_path / "n.summary.json").read_text())
    assert summary["dropped"]["duplicates"] > 0 and summary["dropped"]["window"] > 0
    assert summary["short"] == 0

    # helper-31: nor the copy of the chunk's next chunk, whose continuation is the one after
    def grams(tokens):
        tokens = [int(x) for x in tokens]
        return {tuple(tokens[i:i + 13]) for i in range(len(tokens) - 12)}

    with retrostore.open(dup) as st:
        nt = retro.neighbor_tokens(st, knn, table=tab)
    for q in range(len(knn)):
        after = [q] + [q + j for j in (1, 2) if q + j < len(tab) and (tab.doc_ids[q:q + j + 1] == tab.doc_ids[q]).all()]
        ahead = grams(np.concatenate([tab.tokens[c, :tab.lengths[c]] for c in after]))
        for j in np.flatnonzero(knn[q] >= 0):
            assert len(ahead & grams(nt.tokens[q, j][nt.mask[q, j]])) < 26, (q, j)


def test_neighbors_usage_errors(sliced, tmp_path):
    out = tmp_path / "k.npy"
    for args, msg in [(["--sequences"], "--seq-len"), (["--seq-len", 128], "with --sequences"),
                      (["--sequences", "--seq-len", 128, "--exclude-same-doc"], "drop --exclude-same-doc"),
                      (["--sequences", "--seq-len", 128, "--include-same-doc"], "drop --include-same-doc"),
                      (["--no-overlap-filter", "--overlap-threshold", 0.3], "--overlap-threshold 0.3 would be ignored"),
                      (["--tokens", out], "would overwrite")]:
        res = _run("neighbors", sliced, "--out", out, *args)
        assert res.exit_code == 2 and msg in res.output, res.output
    np.save(tmp_path / "q.npy", np.ones((2, 64), np.int64))
    for args, msg in [(["--queries", tmp_path / "q.npy", "--ngram", 5], "--ngram does not apply to --queries"),
                      (["--include-same-doc", "--overlap-threshold", 0.1], "--overlap-threshold does not apply"),
                      (["--mode", "document", "--exclude", "chunk"], "--exclude, --mode do not apply to the store's "
                                                                     "chunks (the default); drop them"),
                      (["--label-token"], "--label-token does not apply"),
                      (["--queries", tmp_path / "q.npy", "--include-same-doc"], "--include-same-doc applies to the "
                                                                                "store's own chunks"),
                      (["--sequences", "--seq-len", 128, "--batch-size", 5], "--batch-size does not apply")]:
        res = _run("neighbors", sliced, "--out", tmp_path / "o.npy", *args)  # (helper-31: ignored, exit 0)
        assert res.exit_code == 2 and msg in res.output, (args, res.output)
    res = _run("neighbors", sliced, "--out", out, "--sequences", "--seq-len", 100, "-q")
    assert res.exit_code == 1 and "seq_len=100" in res.output and "64" in res.output
    res = _run("neighbors", sliced, "--out", out, "--tokens", tmp_path / "no" / "dir" / "t.npy", "-q")
    assert res.exit_code == 2 and "does not exist; create it first" in res.output
    assert not out.exists()  # refused before the work (review: the neighbours were computed, then it failed)
    res = _run("neighbors", sliced, "--out", out, "--tokens", Path(sliced) / "t.npy", "-q")
    assert res.exit_code == 2 and "inside the store" in res.output and not out.exists(), res.output
    (tmp_path / "sl.npy").symlink_to(out)  # (helper-50: refused only after the work, naming path=)
    res = _run("neighbors", sliced, "--out", out, "--tokens", tmp_path / "sl.npy", "-q")
    assert res.exit_code == 2 and "--tokens=" in res.output and "would overwrite" in res.output, res.output
    assert not out.exists()


def test_neighbor_tokens_are_written_outside_stores_only(sliced, tmp_path):
    """NeighborFile.write_tokens (``neighbors --tokens``): the rows' tokens and masks, and no file
    inside a store (helper-48: the next commit deleted it), nor over the ids being read."""
    knn_path = tmp_path / "k.npy"
    np.save(knn_path, np.array([[0, 1], [2, -1], [3, 4]], np.int64))
    with retrostore.open(sliced) as st:
        knn = retro.NeighborFile(st, knn_path)
        toks, mask = knn.write_tokens(tmp_path / "t.npy", rows=2)
        assert mask == tmp_path / "t.mask.npy"
        want = knn.tokens(0, 3)
        assert np.array_equal(np.load(toks), want.tokens) and np.array_equal(np.load(mask), want.mask)
        (tmp_path / "own.npy").symlink_to(tmp_path / "own.mask.npy")  # helper-50: a bus error, a file left
        os.link(knn_path, tmp_path / "hard.npy")  # helper-50: the ids were overwritten with tokens
        (tmp_path / "m.mask.npy").symlink_to(Path(sliced) / "m.mask.npy")  # the mask inside the store
        for bad, msg in [(Path(sliced) / "t.npy", "inside the store"), (knn_path, "would overwrite"),
                         (tmp_path / "no" / "t.npy", "does not exist"), (tmp_path / "own.npy", "are the same file"),
                         (tmp_path / "hard.npy", "would overwrite"), (tmp_path / "m.npy", "mask.*inside the store"),
                         (str(tmp_path / "a\0b.npy"), "without NUL"), (str(tmp_path / "newdir") + "/", "is a directory"),
                         (5, "must be a non-empty str")]:
            with pytest.raises(retrostore.InvalidInputError, match=msg):
                knn.write_tokens(bad)
        assert not (Path(sliced) / "t.npy").exists() and not (tmp_path / "own.mask.npy").exists()
        assert np.array_equal(np.load(knn_path), [[0, 1], [2, -1], [3, 4]])
        with pytest.raises(retrostore.InvalidInputError, match="must be a non-empty str"):
            retro.NeighborFile.mask_path(5)


def test_export_writes_retro_dataset_kwargs_and_refuses_to_overwrite(sliced, tmp_path):
    out = tmp_path / "exp"
    res = _run("export", sliced, out, "--seq-len", 2 * T, "--no-overlap-filter", "--overlap-threshold", 0.3, "-q")
    assert res.exit_code == 2 and "would be ignored" in res.output and not out.exists()  # (helper-47: exit 0)
    res = _run("export", sliced, out, "--seq-len", 2 * T, "--mode", "document", "-q")
    assert res.exit_code == 0, res.output
    kwargs = retro.retro_dataset_kwargs(out)
    info = json.loads((out / "export.json").read_text())
    assert kwargs["seq_len"] == 2 * T and kwargs["chunk_size"] == T and kwargs["num_neighbors"] == 2
    assert info["mode"] == "document" and f"{kwargs['num_sequences']} windows" in res.output
    for key in ("chunk_memmap_path", "chunk_nn_memmap_path", "seq_memmap_path"):
        assert (out / kwargs[key]).stat().st_size > 0
    again = _run("export", sliced, out, "--seq-len", 2 * T, "-q")
    # helper-59: named "StoreExistsError" (an export is not a store); OutputExistsError is one, for old excepts
    assert again.exit_code == 1 and "OutputExistsError" in again.output and "--force" in again.output
    assert issubclass(retrostore.OutputExistsError, retrostore.StoreExistsError)
    assert _run("export", sliced, out, "--seq-len", 2 * T, "--force", "-q").exit_code == 0
    # helper-59: --force removed a file the user had put in the export directory, without a word
    (out / "my_notes.txt").write_text("mine")
    res = _run("export", sliced, out, "--seq-len", 2 * T, "--force", "-q")
    assert res.exit_code == 1 and "holds 'my_notes.txt', which an export does not write" in res.output, res.output
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "retro_pytorch.json").is_file()
    res = _run("export", sliced, tmp_path / "e2")
    assert res.exit_code == 2 and "Missing option '--seq-len'" in res.output


def test_two_exports_to_one_directory_never_mix(sliced, tmp_path):
    """helper-28: two `retrostore export` processes into one directory (two ranks of a job) shared
    OUT.partial; one exited 0 with 148 of 151 windows' neighbours all chunk 0. Now one wins, the other
    is refused (another process holds OUT.lock, or OUT exists by then), and the files are a solo export's."""
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "retrostore", "export", str(sliced), str(out), "--seq-len", str(2 * T), "-q"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stdout.read() + p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    lost = next(text for rc, text in results if rc == 1)
    assert "another process is writing the export" in lost or "exists" in lost, lost
    solo = tmp_path / "solo"
    assert _run("export", sliced, solo, "--seq-len", 2 * T, "-q").exit_code == 0
    for name in ("seq_knn.npy", "rows.npy"):
        assert np.array_equal(np.load(out / name), np.load(solo / name)), name
    assert not (tmp_path / "exp.partial").exists()
