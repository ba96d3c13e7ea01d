"""Building the same inputs again: nothing is duplicated silently, an interrupted build resumes.

A second copy of every document would put each training chunk's own text into
its retrieval set (RETRO, Borgeaud et al. 2021, §4.4), so re-running a build
must be idempotent and ``--append`` is needed to add the same documents again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import retrostore
from retrostore.build import build_store
from retrostore.cli import cli
from retrostore.storage import manifest as _manifest


def _jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"text": d["text"], "meta": d["meta"]}) + "\n" for d in docs))
    return path


def _texts(store: Path) -> list[str]:
    with retrostore.open(store) as st:
        return [st.get_document(i).text for i in range(st.info()["documents"])]


@pytest.fixture(scope="module")
def two_files(tmp_path_factory, small_docs):
    d = tmp_path_factory.mktemp("inputs")
    return _jsonl(d / "a.jsonl", small_docs[:6]), _jsonl(d / "b.jsonl", small_docs[6:10])


def test_rerun_adds_nothing_and_append_adds_a_copy(tmp_path, two_files):
    a, _ = two_files
    path = tmp_path / "s.rstore"
    first = build_store(path, [a], progress=False)
    assert first.documents == 6 and not first.already_built
    with retrostore.open(path) as st:
        version, n_chunks = st.version, len(st)
    again = build_store(path, [a], progress=False)
    assert again.already_built and again.documents == 0 and again.version == version
    assert "built before as 'a.jsonl', documents 0..5" in again.skipped[0]
    with retrostore.open(path) as st:
        assert (st.version, len(st)) == (version, n_chunks)
    res = CliRunner().invoke(cli, ["build", str(path), str(a), "-q"])
    assert res.exit_code == 0 and res.output.startswith("already built") and "--append" in res.output
    copy = build_store(path, [a], append=True, progress=False)
    assert copy.documents == 6 and copy.version > version
    assert _texts(path) == _texts(path)[:6] * 2
    assert build_store(path, [a], progress=False).already_built  # both copies recorded as finished


def test_a_repaired_file_resumes_after_what_its_failed_build_committed(tmp_path, small_docs):
    """helper-17: a build that failed partway through a file (a truncated download, a bad line) keeps
    what it committed; building the repaired file (other bytes, the same name) started from document
    0 again and silently added those documents a second time. helper-18: a refusal instead also hit
    unrelated files of the same name and came back after its own advice was followed."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    texts = [f"Document {i} of a download. " * 80 for i in range(5)]  # ~2,000 characters: one batch each
    good = [json.dumps({"text": t}) + "\n" for t in texts]
    (inputs / "dl.jsonl").write_text("".join(good[:3]) + "{not json\n" + "".join(good[3:]))
    path = tmp_path / "s.rstore"
    build_store(path, [_jsonl(inputs / "first.jsonl", small_docs[5:6])], progress=False)  # document 0
    with pytest.raises(retrostore.InvalidInputError):
        build_store(path, [inputs / "dl.jsonl"], commit_every=1, progress=False)
    with retrostore.open(path) as st:
        assert st.manifest["next_doc_id"] == 4  # documents 1..3 of dl.jsonl were committed
    (inputs / "dl.jsonl").write_text("".join(good))  # repaired
    res = build_store(path, [inputs / "dl.jsonl"], progress=False)
    assert (res.documents, res.resumed_documents, res.repaired) == (2, 3, ("dl.jsonl",))
    with retrostore.open(path) as st:
        assert [st.get_document(i).text for i in range(st.manifest["next_doc_id"])] == [small_docs[5]["text"]] + texts
    again = build_store(path, [inputs / "dl.jsonl"], progress=False)
    assert again.already_built and "built before as 'dl.jsonl', documents 1..5" in again.skipped[0]
    gz = inputs / "dl.jsonl.gz"  # helper-22: the repair kept the broken file's content digest
    gz.write_bytes(__import__("gzip").compress((inputs / "dl.jsonl").read_bytes()))
    assert build_store(path, [gz], progress=False).already_built

    # another file of the same name, in another directory, is not that file: built as itself
    (inputs / "other").mkdir()
    (inputs / "other" / "dl.jsonl").write_text("".join(json.dumps({"text": t[::-1]}) + "\n" for t in texts[:2]))
    (inputs / "broken").mkdir()
    (inputs / "broken" / "dl.jsonl").write_text(good[0] + "{not json\n")
    with pytest.raises(retrostore.InvalidInputError):
        build_store(path, [inputs / "broken" / "dl.jsonl"], commit_every=1, progress=False)
    res = build_store(path, [inputs / "other" / "dl.jsonl"], progress=False)
    assert (res.documents, res.resumed_documents, res.repaired) == (2, 0, ())


def test_a_grown_file_adds_only_its_new_documents(tmp_path):
    """helper-38: a file that grew after its build finished (lines appended: a crawl, a dump
    extended) was added again in full, its first documents stored twice with no notice. Its new
    documents are added now; a same-named file of other documents is added beside the earlier
    ones with a warning naming their ids."""
    texts = [f"Grown document {i}. " + "some words here " * 15 for i in range(6)]
    lines = [json.dumps({"text": t, "meta": {"i": i}}) + "\n" for i, t in enumerate(texts)]
    src = tmp_path / "grow.jsonl"
    src.write_text("".join(lines[:3]))
    path = tmp_path / "s.rstore"
    assert build_store(path, [src], progress=False).documents == 3
    src.write_text("".join(lines))  # grown
    res = build_store(path, [src], progress=False)
    assert (res.documents, res.resumed_documents, res.grown, res.notes) == (3, 3, ("grow.jsonl",), ())
    assert _texts(path) == texts
    assert build_store(path, [src], progress=False).already_built
    out = CliRunner().invoke(cli, ["build", str(path), str(src), "-q"])
    assert out.exit_code == 0 and out.output.startswith("already built")

    other = tmp_path / "other"
    other.mkdir()
    (other / "grow.jsonl").write_text(json.dumps({"text": "Another file, another document."}) + "\n")
    res = CliRunner().invoke(cli, ["build", str(path), str(other / "grow.jsonl"), "-q"])
    assert res.exit_code == 0 and "+1 document," in res.stdout, res.output
    assert "warning: grow.jsonl: a finished build of a file of this name stored documents 0..5" in res.stderr
    assert "retrostore delete STORE" in res.stderr
    assert len(_texts(path)) == 7


def test_inputs_and_fields_that_cannot_work_are_refused_first(tmp_path):
    """helper-38: --text-field ""/--meta-field equal to it reached the first line's parser (a
    metadata error), a mistyped --meta-field dropped every document's metadata in silence, a FIFO
    blocked then failed with "Illegal seek ... re-download it", "-" was "no such file"."""
    src = tmp_path / "fields.jsonl"
    src.write_text("".join(json.dumps({"body": f"Text {i} here.", "info": {"i": i}}) + "\n" for i in range(3)))
    path = tmp_path / "s.rstore"
    run = CliRunner().invoke
    for args, match in [(["--text-field", "body", "--meta-field", "body"], "meta_field must be a string other than"),
                        (["--text-field", ""], "text_field must be a non-empty string")]:
        res = run(cli, ["build", str(path), str(src), "-q", *args])
        assert res.exit_code == 1 and match in res.output, res.output
        assert not path.exists()
    res = run(cli, ["build", str(path), str(src), "-q", "--text-field", "body", "--meta-field", "inof"])
    assert res.exit_code == 0, res.output
    assert "warning: fields.jsonl: none of its 3 documents has a 'inof' field (--meta-field)" in res.stderr
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    for arg, match in [(str(fifo), r"fifo.jsonl: not a regular file \(a pipe or a device\)"),
                       ("-", "reading documents from standard input is not supported")]:
        with pytest.raises(retrostore.InvalidInputError, match=match):
            build_store(tmp_path / "t.rstore", [arg], progress=False)
    with retrostore.create(tmp_path / "d.rstore") as st:
        with pytest.raises(retrostore.InvalidDocumentError, match="docs is a dict; pass a str or a list of str"):
            st.append({"a": 1})
        with pytest.raises(retrostore.InvalidInputError, match="when several documents are given"):
            st.append((t for t in ["x", "y"]), metadata=(m for m in [1, 2]))


def test_fields_do_not_make_a_txt_file_new(tmp_path, small_docs):
    """helper-17: --text-field / --meta-field, which a .txt file does not use, re-added it."""
    txt = tmp_path / "a.txt"
    txt.write_text(small_docs[0]["text"])
    path = tmp_path / "s.rstore"
    assert build_store(path, [txt], progress=False).documents == 1
    for kw in ({"text_field": "content"}, {"meta_field": "source"}):
        again = build_store(path, [txt], progress=False, **kw)
        assert again.already_built and again.documents == 0, kw
    with retrostore.open(path) as st:
        assert st.manifest["next_doc_id"] == 1


def test_new_files_are_built_and_known_ones_skipped(tmp_path, two_files, small_docs):
    a, b = two_files
    path = tmp_path / "s.rstore"
    build_store(path, [a], progress=False)
    moved = tmp_path / "renamed.jsonl"  # same content, another name and time: still the same input
    shutil.copy(a, moved)
    os.utime(moved, (time.time() + 100, time.time() + 100))
    res = build_store(path, [moved, b], progress=False)
    assert res.documents == 4 and len(res.skipped) == 1 and res.skipped[0].startswith("renamed.jsonl")
    assert _texts(path) == [d["text"] for d in small_docs[:10]]
    dup = build_store(tmp_path / "t.rstore", [a, moved], progress=False)  # the same content twice in one run
    assert dup.documents == 6 and "the same content as an input before it" in dup.skipped[0]


def test_killed_build_resumes_after_its_last_commit(tmp_path, pydocs):
    """A real build process killed (SIGKILL) after some commits; the re-run adds exactly the rest."""
    docs = [d for d in pydocs if 3000 <= len(d["text"]) <= 6000][:12]  # ~20 chunks each, a commit every ~2
    src = _jsonl(tmp_path / "in.jsonl", docs)
    path = tmp_path / "s.rstore"
    proc = subprocess.Popen([sys.executable, "-m", "retrostore", "build", str(path), str(src), "-q",
                             "--commit-every", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if _manifest.read_manifest(path)["version"] >= 2:
                    break
            except retrostore.RetrostoreError:
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    body = _manifest.read_manifest(path)
    rec = next(iter(body["builds"].values()))
    assert not rec["done"] and 0 < rec["documents"] < 12 and rec["documents"] == body["next_doc_id"]
    res = build_store(path, [src], progress=False)
    assert res.resumed_documents == rec["documents"] and res.documents == 12 - rec["documents"]
    assert _texts(path) == [d["text"] for d in docs]
    with retrostore.open(path) as st:
        assert st.verify() == []
    assert build_store(path, [src], progress=False).already_built


def test_sharded_and_plain_builds_see_each_other(tmp_path, two_files):
    a, b = two_files
    path = tmp_path / "s.rstore"
    build_store(path, [a], progress=False)
    # an input a finished build holds is skipped and the rest built, as a plain build does (the
    # whole run was refused: a re-run over a growing list of inputs failed)
    res = build_store(path, [a, b], engine="local", progress=False)
    assert res.documents == 4 and res.skipped == ("a.jsonl: built before as 'a.jsonl', documents 0..5",)
    again = build_store(path, [a, b], engine="local", progress=False)
    assert again.already_built and again.documents == 0
    res = CliRunner().invoke(cli, ["build", str(path), str(a), str(b), "--shards", "2", "-q"])
    assert res.exit_code == 0 and res.output.startswith("already built"), res.output
    assert sorted(_texts(path)) == sorted(_texts(path)[:6] + _texts(path)[6:]) and len(_texts(path)) == 10
    other = tmp_path / "sharded.rstore"
    build_store(other, [a, b], engine="local", shards=2, progress=False)
    res = build_store(other, [b], progress=False)  # a plain build of a file the sharded build holds
    assert res.already_built and "sharded build" in res.skipped[0]
    assert len(_texts(other)) == 10


def test_the_same_documents_compressed_another_way_are_the_same_input(tmp_path, two_files):
    """A dump re-compressed (.jsonl -> .jsonl.zst -> .jsonl.gz) has other bytes but the same documents:
    it was built again as a new file, a second copy of every document (RETRO would retrieve the text
    it is trained on). The records now also keep the sha256 of the bytes a build reads."""
    import gzip

    import zstandard

    a, b = two_files
    raw = a.read_bytes()
    zst = tmp_path / "a.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor(level=3).compress(raw))
    gz = tmp_path / "renamed.jsonl.gz"
    gz.write_bytes(gzip.compress(raw))
    path = tmp_path / "s.rstore"
    assert build_store(path, [zst], progress=False).documents == 6
    for again in ([gz], [a], [gz, a]):
        res = build_store(path, again, progress=False)
        assert res.already_built and res.documents == 0, res
        assert all("built before as 'a.jsonl.zst' (the same documents in another file or compression)" in s
                   for s in res.skipped), res.skipped
    assert len(_texts(path)) == 6
    assert build_store(path, [gz], append=True, progress=False).documents == 6  # on purpose: a second copy
    assert _texts(path) == _texts(path)[:6] * 2
    res = build_store(path, [gz, b], engine="local", shards=2, progress=False)
    assert res.documents == 4 and "another file or compression" in res.skipped[0]
    other = tmp_path / "sharded.rstore"
    build_store(other, [zst, b], engine="local", shards=2, progress=False)
    res = build_store(other, [gz], progress=False)
    assert res.already_built and "sharded build" in res.skipped[0] and "another file" in res.skipped[0]
    # one run: a sharded build takes an input once, as a plain build does (helper-22: 12 documents, not 6)
    res = build_store(tmp_path / "once.rstore", [a, gz], engine="local", shards=2, progress=False)
    assert res.documents == 6 and res.skipped == ("renamed.jsonl.gz: the same content as an input before it",)
    # a store whose records predate content digests: an uncompressed file's sha256 is its content's
    old = tmp_path / "old.rstore"
    build_store(old, [a], progress=False)
    signed = json.loads((old / "manifest.json").read_text())
    for rec in signed["body"]["builds"].values():
        del rec["content_sha256"]
    (old / "manifest.json").write_bytes(_manifest.encode_manifest(signed["body"]))
    res = build_store(old, [gz], progress=False)
    assert res.already_built and "another file or compression" in res.skipped[0]
    txt = tmp_path / "same-bytes.txt"  # the same bytes read as one document are other documents
    txt.write_bytes(raw)
    assert build_store(path, [txt], progress=False).documents == 1
    damaged = tmp_path / "damaged.jsonl.zst"
    damaged.write_bytes(zst.read_bytes()[:-8])  # no content digest: the build's own read names the damage
    with pytest.raises(retrostore.RetrostoreError, match="damaged.jsonl.zst: cannot read the file"):
        build_store(tmp_path / "d.rstore", [damaged], progress=False)


def test_sharded_skips_only_what_finished_builds_hold(tmp_path, two_files, small_docs, monkeypatch):
    """helper-23, against a first version that skipped before planning by the plan key: an
    unfinished build's inputs are refused (not skipped, not built twice), this build's own
    interrupted run resumes even after its inputs were touched and its work directory deleted,
    and a work directory's plan from before another build finished one of its inputs is refused
    (reusing it built that input a second time)."""
    from retrostore.build import shards as _shards

    a, b = two_files
    c = _jsonl(tmp_path / "c.jsonl", small_docs[10:14])
    texts = {p: [json.loads(line)["text"] for line in p.read_text().splitlines()] for p in (a, b, c)}
    path, work = tmp_path / "s.rstore", tmp_path / "s.rstore.build"

    # X = [a, b] is interrupted after its first merge commit: an unfinished record holds a and b
    monkeypatch.setenv(_shards.FAULT_ENV, f"1:raise:{tmp_path / 'fired'}")
    with pytest.raises(RuntimeError, match="fault injected"):
        build_store(path, [a, b], engine="local", shards=2, commit_every=1, progress=False)
    monkeypatch.delenv(_shards.FAULT_ENV)
    with retrostore.open(path) as st:
        (rec,) = st.manifest["builds"].values()
        assert rec["merged"] == 1 and rec["shards"] == 2
    # another build of [b, c] is refused: b is being built by X
    with pytest.raises(retrostore.InvalidInputError, match="b.jsonl.*being built by the sharded build"):
        build_store(path, [b, c], engine="local", shards=2, work_dir=tmp_path / "w2", progress=False)
    # X's own re-run resumes, also with a touched input (its plan records the bytes: helper-25)
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))
    assert work.is_dir()
    res = build_store(path, [a, b], engine="local", shards=2, commit_every=1, progress=False)
    assert not res.interrupted and sorted(_texts(path)) == sorted(texts[a] + texts[b])
    # now finished: [b, c] skips b and builds c
    res = build_store(path, [b, c], engine="local", shards=2, work_dir=tmp_path / "w2", progress=False)
    assert res.documents == 4 and "b.jsonl" in res.skipped[0]
    assert sorted(_texts(path)) == sorted(texts[a] + texts[b] + texts[c])

    # a plan from before another build finished one of its inputs is refused, then rebuilt
    d = _jsonl(tmp_path / "d.jsonl", small_docs[14:16])
    e = _jsonl(tmp_path / "e.jsonl", small_docs[16:18])
    monkeypatch.setenv(_shards.FAULT_ENV, f"0:raise:{tmp_path / 'fired2'}")
    with pytest.raises(RuntimeError, match="fault injected"):
        build_store(path, [d, e], engine="local", shards=2, progress=False)  # nothing merged: a plan only
    monkeypatch.delenv(_shards.FAULT_ENV)
    assert (work / "plan.json").exists()
    build_store(path, [d], progress=False)  # a plain build finishes d meanwhile
    res = build_store(path, [d, e], engine="local", shards=2, progress=False)  # plans again: e only
    assert res.documents == 2 and "d.jsonl" in res.skipped[0] and not work.exists()
    all_texts = texts[a] + texts[b] + texts[c] + [x["text"] for x in small_docs[14:18]]
    assert sorted(_texts(path)) == sorted(all_texts)  # every document once


def test_sharded_build_ids_name_the_inputs_bytes(tmp_path, small_docs, monkeypatch):
    """helper-24: two inputs of one name and shape (size, documents, characters) but other bytes
    gave one build id, so the second was taken for the finished first ('already built', its
    documents never stored); --append after a touch said 'already built' instead of refusing;
    an all-skipped run left its own unmerged plan behind, blocking the next sharded build."""
    from retrostore.build import shards as _shards

    first, second = tmp_path / "d1", tmp_path / "d2"
    first.mkdir(), second.mkdir()
    docs = small_docs[:4]
    a1 = _jsonl(first / "B.jsonl", docs)
    edited = [dict(d) for d in docs]
    i = edited[0]["text"].index("e")
    edited[0]["text"] = edited[0]["text"][:i] + "f" + edited[0]["text"][i + 1:]
    a2 = _jsonl(second / "B.jsonl", edited)
    assert a1.stat().st_size == a2.stat().st_size
    path = tmp_path / "s.rstore"
    assert build_store(path, [a1], engine="local", shards=2, progress=False).documents == 4
    assert build_store(path, [a2], engine="local", shards=2, progress=False).documents == 4
    assert edited[0]["text"] in _texts(path)
    os.utime(a1, ns=(a1.stat().st_atime_ns, a1.stat().st_mtime_ns + 10**9))
    with pytest.raises(retrostore.InvalidInputError, match="--append .* works with a plain build only"):
        build_store(path, [a1], engine="local", shards=2, append=True, progress=False)
    # a plan-only run of [c, e], then a plain build of both, then the sharded command again
    c = _jsonl(tmp_path / "c.jsonl", small_docs[10:12])
    e = _jsonl(tmp_path / "e.jsonl", small_docs[12:14])
    monkeypatch.setenv(_shards.FAULT_ENV, f"0:raise:{tmp_path / 'fired'}")
    with pytest.raises(RuntimeError, match="fault injected"):
        build_store(path, [c, e], engine="local", shards=2, progress=False)
    monkeypatch.delenv(_shards.FAULT_ENV)
    build_store(path, [c, e], progress=False)
    assert build_store(path, [c, e], engine="local", shards=2, progress=False).already_built
    assert not (tmp_path / "s.rstore.build").exists()  # its own unmerged plan went with it
    f = _jsonl(tmp_path / "f.jsonl", small_docs[14:16])
    assert build_store(path, [f], engine="local", shards=2, progress=False).documents == 2
    assert len(_texts(path)) == 4 + 4 + 2 + 2 + 2
    # an interrupted build's input edited (same size), its work directory deleted: resuming mixed
    # the two versions, building anew stored the merged documents twice; now refused
    g = _jsonl(tmp_path / "g.jsonl", small_docs[16:20])
    monkeypatch.setenv(_shards.FAULT_ENV, f"1:raise:{tmp_path / 'fired2'}")
    with pytest.raises(RuntimeError, match="fault injected"):
        build_store(path, [g], engine="local", shards=2, commit_every=1, progress=False)
    monkeypatch.delenv(_shards.FAULT_ENV)
    n = len(_texts(path))
    text = g.read_text()
    j = text.rindex("e")
    g.write_text(text[:j] + "f" + text[j + 1:])
    shutil.rmtree(tmp_path / "s.rstore.build")
    with pytest.raises(retrostore.InvalidInputError, match="'g.jsonl' has other bytes than when the interrupted"):
        build_store(path, [g], engine="local", shards=2, commit_every=1, progress=False)
    assert len(_texts(path)) == n and not (tmp_path / "s.rstore.build").exists()  # no plan left to block the fix
    g.write_text(text)  # as the message says: restore the bytes and re-run
    res = build_store(path, [g], engine="local", shards=2, commit_every=1, progress=False)
    assert not res.interrupted and sorted(_texts(path)[-4:]) == sorted(d["text"] for d in small_docs[16:20])
    assert len(_texts(path)) == n + res.documents and res.documents < 4  # resumed after the merged shard


def test_build_ends_with_one_segment_of_a_trained_index(tmp_path, small_docs):
    """A build commits every commit_every chunks and the tiered merge leaves several segments, each
    probed per query (7 segments: 5.6 ms, one: 2.9 ms at 700k vectors): a build of a trained IVF index
    ends by merging them (compact), keeping every chunk and its answers; Flat builds are left alone."""
    src = _jsonl(tmp_path / "in.jsonl", small_docs)
    path = tmp_path / "ivf.rstore"
    res = build_store(path, [src], index="IVF2,Flat", commit_every=20, progress=False)
    with retrostore.open(path) as st:
        m = st.manifest
        assert m["index"]["template"] and len(m["index"]["segments"]) == 1
        assert res.version == m["version"] and st.info()["vectors"] == res.chunks == len(st)
        assert m["builds"] and all(r["done"] for r in m["builds"].values())  # the records survive the merge
        hit = st.search("How do I decode base64 data?", k=1)[0]
        assert hit.text == st.get_chunks([hit.chunk_id])[0].text and st.verify() == []
    assert build_store(path, [src], progress=False).already_built
    flat = tmp_path / "flat.rstore"
    build_store(flat, [src], index="Flat", commit_every=20, progress=False)
    with retrostore.open(flat) as st:
        assert len(st.manifest["index"]["segments"]) > 1  # nothing to gain: exact segments are not merged


def test_bad_metadata_names_its_file_and_line(tmp_path):
    """helper-17: a plain build reported bad metadata as "metadata[1]['x']" of an append batch, naming
    neither the file nor the line (the sharded build named both)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one", "meta": {"x": 1}}\n{"text": "two", "meta": {"x": 1e999}}\n')
    with pytest.raises(retrostore.InvalidMetadataError, match=r"bad.jsonl:2 metadata\['x'\] = inf is not finite"):
        build_store(tmp_path / "s.rstore", [bad], progress=False)
    (tmp_path / "mine.rstore").mkdir()  # helper-17: a failed first build removed the user's own directory
    with pytest.raises(retrostore.InvalidMetadataError):
        build_store(tmp_path / "mine.rstore", [bad], progress=False)
    assert (tmp_path / "mine.rstore").is_dir() and not list((tmp_path / "mine.rstore").iterdir())
    assert not (tmp_path / "s.rstore").exists()  # one the build made is removed whole
