"""The command line through click's CliRunner, on a real 20-document slice."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import zstandard
from click.testing import CliRunner

import retrostore
from _checkout import checkout_cli


cli = checkout_cli()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, small_docs):
    """The 20 small real documents as a Pile-style .jsonl.zst file."""
    path = tmp_path_factory.mktemp("corpus") / "slice.jsonl.zst"
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in small_docs)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return path


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("cli") / "slice.rstore"
    res = CliRunner().invoke(cli, ["build", str(path), str(corpus), "-q"])
    assert res.exit_code == 0, res.output
    return path


def test_build_matches_chunker(cli_store, small_docs):
    with retrostore.open(cli_store) as st:
        expected = sum(len(c) for c in st.chunker.chunk_many([d["text"] for d in small_docs]))
        info = st.info()
        assert info["documents"] == 20 and info["chunks"] == expected == info["vectors"]
        for i, d in enumerate(small_docs):
            assert st.get_document(i).text == d["text"]
            assert st.get_document(i).metadata == d["meta"]


def test_search_finds_base64(cli_store):
    res = CliRunner().invoke(cli, ["search", str(cli_store), "decode base64 encoded data back into bytes",
                                   "-k", "5", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out["hits"]) == 5
    assert any(h["metadata"]["source"].endswith("library/base64.rst") for h in out["hits"])
    for h in out["hits"]:
        assert {"chunk_id", "doc_id", "score", "text", "tokens", "continuation_text"} <= set(h)
    text = CliRunner().invoke(cli, ["search", str(cli_store), "base64", "-k", "2"])
    assert text.exit_code == 0 and "#1" in text.output and "#2" in text.output and "base64.rst" in text.output


def test_inspect(cli_store):
    res = CliRunner().invoke(cli, ["inspect", str(cli_store), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    for key in ("format_version", "version", "documents", "chunks", "vectors", "dim", "metric", "embedder",
                "tokenizer", "index", "files", "created_at", "modified_at"):
        assert key in info
    assert info["embedder"]["model_sha256"] == retrostore.DEFAULT_MODEL_SHA256
    assert info["tokenizer"]["sha256"] and info["index"]["factory"] == "Flat"
    assert info["index"]["codec"] == "float16" and info["index"]["bytes_per_vector"] < 2 * 384 + 8
    human = CliRunner().invoke(cli, ["inspect", str(cli_store)])
    assert human.exit_code == 0 and "documents" in human.output and "20" in human.output
    assert "Flat (float16 codes)" in human.output  # a fresh user read "Flat" at 768 B/vector as float32


def test_inspect_says_what_is_deleted(cli_store, tmp_path):
    """helper-36: after delete + compact, the text said 30 documents and 1,215 chunks, nothing more."""
    import shutil

    path = tmp_path / "d.rstore"
    shutil.copytree(cli_store, path)
    assert CliRunner().invoke(cli, ["delete", str(path), "0"]).exit_code == 0
    out = CliRunner().invoke(cli, ["inspect", str(path)]).output
    assert "documents  20 (1 deleted; compact purges them)" in out, out
    assert "deleted    documents 0 (1 not purged yet)" in out, out  # (helper-54: which ones, too)
    assert CliRunner().invoke(cli, ["compact", str(path)]).exit_code == 0
    out = CliRunner().invoke(cli, ["inspect", str(path)]).output
    assert "(1 deleted, 1 of them purged by compact)" in out and "deleted    documents 0 (purged at version" in out
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json"]).output)
    [gone] = info["deletes"]["deleted_documents"]
    assert gone["doc_id"] == 0 and gone["purged_at_version"] == info["version"] and gone["chunks"][0] == 0


def test_delete_dry_run_shows_the_documents_and_changes_nothing(cli_store, tmp_path):
    """A chunk id pasted as a document id deletes another document: --dry-run shows which one
    (its chunks, size, metadata and first words) before anything is committed."""
    import shutil

    path = tmp_path / "d.rstore"
    shutil.copytree(cli_store, path)
    with retrostore.open(path) as st:
        before = st.version
        d = max(range(1, 20), key=lambda i: len(st.get_document(i).chunk_ids))  # the longest
        doc = st.get_document(d)
    ids = doc.chunk_ids
    assert CliRunner().invoke(cli, ["delete", str(path), "0"]).exit_code == 0
    res = CliRunner().invoke(cli, ["delete", str(path), str(d), "0", str(d), "--dry-run"])
    assert res.exit_code == 0, res.output
    first_words = " ".join(doc.text[:120].split())
    assert f"doc {d}: {len(ids)} chunks (ids {ids.start:,}..{ids.stop - 1:,}), {len(doc.text):,} characters" \
        in res.output and repr(first_words) in res.output, res.output
    assert "doc 0: already deleted" in res.output and res.output.count(f"doc {d}:") == 1
    assert f"would delete 1 document ({len(ids)} chunks); nothing changed (dry run)" in res.output
    with retrostore.open(path) as st:
        assert st.version == before + 1 and st.get_document(d).text == doc.text  # only the real delete committed
    # every id is checked before anything is printed (helper-56: docs 1 and 2 were shown, then 99 failed)
    bad = CliRunner().invoke(cli, ["delete", str(path), str(d), "999999", "--dry-run"])
    assert bad.exit_code == 1 and f"doc {d}:" not in bad.output, bad.output
    assert "document id 999999 is not in" in bad.output and "document ids are 0 to 19" in bad.output
    # a chunk id pasted as a document id: said so, and the real delete refuses it before committing
    assert ids.stop - 1 >= 20  # (beyond the document ids)
    res = CliRunner().invoke(cli, ["delete", str(path), str(ids.stop - 1)])
    assert res.exit_code == 1 and f"is the id of a chunk of document {d}" in res.output, res.output
    with retrostore.open(path) as st:
        assert st.version == before + 1


def test_show_prints_a_document_or_a_chunk_exactly(cli_store):
    """helper-56: checking a document before a take-down needed Python's get_document."""
    with retrostore.open(cli_store) as st:
        d = max(range(20), key=lambda i: len(st.get_document(i).chunk_ids))
        doc = st.get_document(d)
        chunk = st.get_chunks([doc.chunk_ids.start + 1])[0]
    res = CliRunner().invoke(cli, ["show", str(cli_store), str(d)])
    assert res.exit_code == 0, res.output
    head, text = res.output.split("\n", 1)
    assert head.startswith(f"doc {d}: {len(doc.chunk_ids)} chunks (ids {doc.chunk_ids.start:,}..")
    assert text == doc.text + "\n"  # the exact text, not a decode of tokens
    got = json.loads(CliRunner().invoke(cli, ["show", str(cli_store), str(d), "--json"]).output)
    assert got["text"] == doc.text and got["metadata"] == doc.metadata
    assert (got["chunks"], got["first_chunk_id"], got["last_chunk_id"]) == (
        len(doc.chunk_ids), doc.chunk_ids.start, doc.chunk_ids.stop - 1)
    res = CliRunner().invoke(cli, ["show", str(cli_store), str(chunk.chunk_id), "--chunk"])
    assert res.exit_code == 0 and res.output.startswith(f"chunk {chunk.chunk_id}: doc {d}, chunk 1 of the document")
    assert res.output.split("\n", 1)[1] == chunk.text + "\n"
    got = json.loads(CliRunner().invoke(cli, ["show", str(cli_store), str(chunk.chunk_id), "--chunk", "--json"]).output)
    assert got["tokens"] == chunk.tokens.tolist() and got["start"] == chunk.start and got["doc_id"] == d
    assert doc.chunk_ids.stop - 1 >= 20  # (beyond the document ids)
    res = CliRunner().invoke(cli, ["show", str(cli_store), str(doc.chunk_ids.stop - 1)])  # a chunk id as a doc id
    assert res.exit_code == 1 and f"is the id of a chunk of document {d}" in res.output and "add --chunk" in res.output
    # helper-58: ids were first..last, characters first..end; both first..last now, and the count
    end = chunk.start + len(chunk.text)
    res = CliRunner().invoke(cli, ["show", str(cli_store), str(chunk.chunk_id), "--chunk"])
    assert f"characters {chunk.start:,}..{end - 1:,} ({len(chunk.text):,}), " in res.output
    assert f"(ids {doc.chunk_ids.start:,}..{doc.chunk_ids.stop - 1:,})" in CliRunner().invoke(
        cli, ["show", str(cli_store), str(d)]).output
    with retrostore.open(cli_store) as st:
        n = len(st)
    for bad in ("-1", str(n)):  # helper-58: "InvalidInputError: chunk id 51429 is outside the committed range"
        res = CliRunner().invoke(cli, ["show", str(cli_store), bad, "--chunk"])
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert res.output == (f"Error: chunk id {bad} is not in {cli_store}: its chunk ids are 0 to {n - 1:,}. "
                              "Chunk ids are the numbers after `chunk` in `retrostore search` output\n"), res.output


def test_a_build_of_empty_inputs_says_so(tmp_path):
    """helper-56: a build of an empty file succeeded with "+0 documents" and nothing else."""
    (tmp_path / "empty.jsonl").write_text("")
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "e.rstore"), str(tmp_path / "empty.jsonl"), "-q"])
    assert res.exit_code == 0 and "+0 documents" in res.output, res.output
    assert "warning: the inputs held no documents" in res.output
    # helper-56: a search of it printed "no hits (the store is empty)" and then "(0 hits in 0.0 ms)"
    res = CliRunner().invoke(cli, ["search", str(tmp_path / "e.rstore"), "anything"])
    assert res.exit_code == 0 and res.stdout == "no hits: the store holds no chunks (version 1)\n" and res.stderr == ""


def test_a_search_with_every_document_deleted_says_so(cli_store, tmp_path):
    import shutil

    path = tmp_path / "d.rstore"
    shutil.copytree(cli_store, path)
    res = CliRunner().invoke(cli, ["delete", str(path)] + [str(i) for i in range(20)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["search", str(path), "decode base64 data"])
    assert res.exit_code == 0 and res.output.startswith("no hits: every chunk is of a deleted document (version "), res.output


def test_a_packed_copy_keeps_no_byte_of_a_take_down(cli_store, tmp_path):
    """helper-54: after delete + compact, `grep` found most lines of the taken-down page in
    chunks.lmdb/data.mdb (LMDB's free pages), while the README said "purged from every file".
    compact says so now, and the packed copy (a new LMDB file) holds none of them."""
    import shutil

    path = tmp_path / "d.rstore"
    shutil.copytree(cli_store, path)
    with retrostore.open(path) as st:
        texts = [st.get_document(i).text for i in range(st.info()["documents"])]

    def unique_lines(d):
        others = "\n".join(t for i, t in enumerate(texts) if i != d)
        return [ln.strip() for ln in texts[d].splitlines() if len(ln.strip()) > 20 and ln.strip() not in others]

    doc = max(range(len(texts)), key=lambda d: len(unique_lines(d)))
    unique = unique_lines(doc)
    assert len(unique) > 5
    assert CliRunner().invoke(cli, ["delete", str(path), str(doc)]).exit_code == 0
    res = CliRunner().invoke(cli, ["compact", str(path), "-q"])
    assert res.exit_code == 0 and "free pages of chunks.lmdb/data.mdb" in res.output, res.output
    assert CliRunner().invoke(cli, ["pack", str(path), str(tmp_path / "d.tar")]).exit_code == 0
    assert CliRunner().invoke(cli, ["unpack", str(tmp_path / "d.tar"), str(tmp_path / "u")]).exit_code == 0
    for f in [tmp_path / "d.tar"] + [p for p in (tmp_path / "u").rglob("*") if p.is_file()]:
        data = f.read_bytes()
        assert not [ln for ln in unique if ln.encode() in data], f


def test_verify_ok(cli_store):
    res = CliRunner().invoke(cli, ["verify", str(cli_store), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ok"] is True


def test_build_is_idempotent_appends_when_asked_and_refuses_other_settings(tmp_path, corpus):
    path = tmp_path / "s"
    runner = CliRunner()
    res = runner.invoke(cli, ["build", str(path), str(corpus), "-q", "--index", ""])  # (helper-48: became auto)
    assert res.exit_code == 1 and "index='' must be a FAISS factory string" in res.output and not path.exists()
    assert runner.invoke(cli, ["build", str(path), str(corpus), "-q", "--commit-every", "1"]).exit_code == 0
    with retrostore.open(path) as st:
        n, v = len(st), st.version
        assert v > 1  # periodic commits
    res = runner.invoke(cli, ["build", str(path), str(corpus), "-q"])
    assert res.exit_code == 0 and res.output.startswith("already built"), res.output
    with retrostore.open(path) as st:
        assert len(st) == n and st.version == v  # the same inputs again add nothing
    res = runner.invoke(cli, ["build", str(path), str(corpus), "-q", "--append"])
    assert res.exit_code == 0, res.output
    with retrostore.open(path) as st:
        assert len(st) == 2 * n and st.info()["documents"] == 40
    res = runner.invoke(cli, ["build", str(path), str(corpus), "--chunk-tokens", "32"])
    assert res.exit_code == 1 and "--chunk-tokens 32" in res.output and "Traceback" not in res.output


def test_errors_are_one_line(tmp_path):
    runner = CliRunner()
    (tmp_path / "notastore").mkdir()
    res = runner.invoke(cli, ["search", str(tmp_path / "notastore"), "q"])
    assert res.exit_code == 1
    assert res.output.startswith("Error: NotAStoreError:") and res.output.count("\n") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    res = runner.invoke(cli, ["build", str(tmp_path / "s"), str(bad), "-q"])
    assert res.exit_code == 1 and "bad.jsonl:2" in res.output and "--text-field" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(cli, ["build", str(tmp_path / "s2"), str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 1 and "missing.jsonl" in res.output


def test_os_level_errors_print_without_errno(cli_store):
    """helper-41: "WriterLockedError: [Errno 11] another writer holds ..." (the OSError prefix)."""
    with retrostore.open(cli_store, mode="a"):  # this process holds the writer lock
        res = CliRunner().invoke(cli, ["delete", str(cli_store), "0"])
    assert res.exit_code == 1 and res.output.startswith("Error: WriterLockedError: another writer holds "), res.output
    assert "Errno" not in res.output
    # helper-56: the library's advice (mode='r', timeout_s=...) names no option of the command line
    assert "(from the command line: wait until the other writer" in res.output, res.output


def test_k_must_be_positive(cli_store):
    # a bad option value is a usage error (exit 2, docs/cli.md), as helper-58 expected from the docs
    for args in (["search", str(cli_store), "q", "-k", "0"], ["eval", str(cli_store), "--k", "0"]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2 and "'--k': 0 is not in the range x>=1" in res.output, res.output


def test_every_command_has_help():
    for name, cmd in cli.commands.items():
        assert cmd.help and len(cmd.help) > 20, name
        for param in cmd.params:
            if param.param_type_name == "option":
                assert param.help, f"{name} {param.name}"


def test_the_command_list_shows_whole_descriptions():
    # helper-56: click cut each docstring's first sentence at the terminal's width ("STORE from INPUT files: .txt (one...")
    res = CliRunner().invoke(cli, ["--help"], terminal_width=80)
    listed = res.output.split("Commands:")[1].strip().splitlines()
    assert len(listed) == len(cli.commands), listed
    for line in listed:
        assert not line.endswith("...") and line.endswith(".") and len(line) <= 80, line


def test_python_dash_m_and_no_top_level_cli():
    res = subprocess.run([sys.executable, "-m", "retrostore", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "build" in res.stdout and "search" in res.stdout
    import importlib.util

    import retrostore.cli as c

    assert c.__name__ == "retrostore.cli"
    spec = importlib.util.find_spec("cli")
    # The project's cli/ folder must never be importable as a top-level module from an install.
    assert spec is None or "site-packages" not in (spec.origin or "")


def test_failed_new_build_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "a\\ud800b"}\n')
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "s"), str(bad), "-q"])
    assert res.exit_code == 1 and "bad.jsonl:2" in res.output and "surrogate" in res.output
    assert not (tmp_path / "s").exists()


def test_neighbors_out_must_be_npy_in_existing_dir(cli_store, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["neighbors", str(cli_store), "--out", str(tmp_path / "x.txt"), "-q"])
    assert res.exit_code == 1 and ".npy" in res.output
    res = runner.invoke(cli, ["neighbors", str(cli_store), "--out", str(tmp_path / "nodir" / "x.npy"), "-q"])
    assert res.exit_code == 1 and "does not exist" in res.output and "Traceback" not in res.output
