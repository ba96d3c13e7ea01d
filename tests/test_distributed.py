"""Sharded builds (retrostore build --engine local|ray) on a real 30-document slice.

In-process and Ray builds of the same slice must give the same store as the plain
streaming build: the same chunk ids, tokens, document ids and record bytes, the
same vectors and the same exact-search results. A shard task that dies part-way is
retried (Ray) or redone on the next run (in-process) without duplicates or
half-written shards. Ray tests skip when Ray is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zstandard
from click.testing import CliRunner

import retrostore
from _checkout import checkout_cli
from retrostore.build import plan as _plan
from retrostore.build import shards as _shards
from retrostore.build.sharded import _settings
from retrostore.build import build_store
from retrostore.errors import IndexTrainingError, InvalidInputError
from retrostore.storage.fileio import sha256_file

QUERIES = ["decode base64 encoded data back into bytes", "what is a tuple", "raise an exception",
           "iterate over a dictionary", "regular expression syntax"]


@pytest.fixture(scope="module")
def slice30(pydocs) -> list[dict]:
    """The 30 smallest documents of the real corpus (cheap to embed: ~74 chunks)."""
    return sorted(pydocs, key=lambda d: len(d["text"]))[:30]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, slice30) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "slice30.jsonl.zst"
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in slice30)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return path


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory, corpus) -> Path:
    path = tmp_path_factory.mktemp("plain") / "plain.rstore"
    build_store(path, [corpus], progress=False)
    return path


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, corpus) -> Path:
    path = tmp_path_factory.mktemp("local") / "local.rstore"
    res = build_store(path, [corpus], engine="local", shards=3, progress=False)
    assert (res.engine, res.shards, res.documents, res.reused_shards) == ("local", 3, 30, 0)
    return path


@pytest.fixture(scope="module")
def local_snap(local_store) -> dict:
    return _snapshot(local_store)


def _snapshot(path: Path) -> dict:
    """Everything two equal builds must share (commit boundaries aside)."""
    with retrostore.open(path) as st:
        m = st.manifest
        n, n_docs = len(st), m["next_doc_id"]
        env = st._table.env
        raw = {}
        with env.begin() as txn:
            for name, db, end in (("chunks", st._table._chunks, n), ("docs", st._table._docs, n_docs)):
                raw[name] = [(k, v) for k, v in txn.cursor(db) if int.from_bytes(k, "big") < end]
        chunks = st.get_chunks(range(n))
        hits = st.search(QUERIES, k=8)
        assert st.verify() == []
        return {
            "counts": (n, n_docs),
            "chunk_ids": [c.chunk_id for c in chunks],
            "doc_ids": [c.doc_id for c in chunks],
            "tokens": [c.tokens.tolist() for c in chunks],
            "records": raw,
            "documents": [(d.text, d.metadata) for d in map(st.get_document, range(n_docs))],
            "vectors": st._head.version.stored_vectors(0, n),
            "hits": [[(h.chunk_id, h.doc_id, h.score) for h in row] for row in hits],
        }


def _assert_same(a: dict, b: dict) -> None:
    for key in ("counts", "chunk_ids", "doc_ids", "tokens", "records", "documents", "hits"):
        assert a[key] == b[key], key
    assert np.array_equal(a["vectors"], b["vectors"])


# -- in-process engine ---------------------------------------------------------------
def test_in_process_sharded_build_equals_plain_build(plain_store, local_store, slice30, local_snap):
    a, b = _snapshot(plain_store), local_snap
    _assert_same(a, b)
    assert a["counts"][1] == 30 and a["counts"][0] > 30
    assert not (local_store.parent / "local.rstore.build").exists()  # the work directory is removed
    with retrostore.open(local_store) as st:
        (bid, rec), = st.manifest["builds"].items()
        assert (rec["shards"], rec["merged"], rec["documents"], rec["first_chunk_id"]) == (3, 3, 30, 0)
        assert len(bid) == 64


def test_plan_is_deterministic(corpus, local_store, tmp_path):
    with retrostore.open(local_store) as st:
        settings = _settings(st.manifest, "text", "meta")
        recorded = next(iter(st.manifest["builds"]))

    def plan(inputs, shards):
        files = _plan.input_files(inputs)
        for f in files:  # as the build passes them: each file's sha256 is part of the plan
            f["sha256"] = sha256_file(f["path"])[1]
        counts = [_plan.count_file(f["path"], f["rel"], "text", "meta") for f in files]
        key = _plan.plan_key(files, settings, shards, _plan.SHARD_CHARS)
        return _plan.make_plan(files, counts, settings, shards=shards, key=key)

    p1, p2 = plan([corpus], 3), plan([corpus], 3)
    assert p1 == p2 and p1["build_id"] == recorded
    bounds = p1["body"]["shards"]
    assert bounds[0][0] == 0 and bounds[-1][1] == 30 and all(a < b for a, b in bounds)
    assert all(x[1] == y[0] for x, y in zip(bounds, bounds[1:]))
    assert plan([corpus], 4)["build_id"] != p1["build_id"]
    assert [len(r) for r in [plan([corpus], 100)["body"]["shards"]]] == [30]  # at most one shard per document
    # A copy (other path and mtime) keeps the build id but not the cheap key.
    copy = tmp_path / corpus.name
    shutil.copy(corpus, copy)
    os.utime(copy, ns=(1, 1))
    p3 = plan([copy], 3)
    assert p3["build_id"] == p1["build_id"] and p3["key"] != p1["key"]
    # Shards are balanced by characters, not by document count.
    chars = [sum(len(d.text) for d in _plan.read_documents(p1, a, b)) for a, b in bounds]
    assert max(chars) < 2 * min(chars)


def test_rerun_of_finished_build_does_nothing(local_store, corpus):
    with retrostore.open(local_store) as st:
        version = st.version
    res = build_store(local_store, [corpus], engine="local", shards=3, progress=False)
    assert (res.documents, res.chunks, res.version) == (0, 0, version)
    assert not (local_store.parent / "local.rstore.build").exists()


def test_interrupted_build_reuses_finished_shards(tmp_path, corpus, local_store, monkeypatch, local_snap):
    path, work = tmp_path / "s.rstore", tmp_path / "s.rstore.build"
    monkeypatch.setenv(_shards.FAULT_ENV, f"1:raise:{tmp_path / 'fired'}")
    with pytest.raises(RuntimeError, match="fault injected in shard 1"):
        build_store(path, [corpus], engine="local", shards=3, progress=False)
    assert (tmp_path / "fired").exists()
    # Shard 0 is finished; shard 1 left nothing (not even a temporary directory); nothing is committed.
    assert sorted(p.name for p in work.iterdir()) == ["LOCK", "plan.json", "shard-00000", "tokenizer.json"]
    assert not path.exists()  # a store this build created and never committed to is removed, as a plain build's
    res = build_store(path, [corpus], engine="local", shards=3, progress=False)
    assert (res.reused_shards, res.documents) == (1, 30)
    _assert_same(_snapshot(path), local_snap)
    assert not work.exists()


def test_interrupted_merge_resumes_after_its_last_commit(tmp_path, corpus, local_store, monkeypatch, local_snap):
    path = tmp_path / "s.rstore"
    monkeypatch.setenv(_shards.FAULT_ENV, f"2:raise:{tmp_path / 'fired'}")
    with pytest.raises(RuntimeError):
        build_store(path, [corpus], engine="local", shards=3, commit_every=1, progress=False)
    with retrostore.open(path) as st:  # shards 0 and 1 were merged and committed one by one
        (rec,) = st.manifest["builds"].values()
        assert rec["merged"] == 2 and st.version == 2
        first = len(st)
    res = build_store(path, [corpus], engine="local", shards=3, commit_every=1, progress=False)
    assert res.documents < 30 and res.chunks == local_snap["counts"][0] - first
    _assert_same(_snapshot(path), local_snap)


def test_retried_or_duplicated_shard_task_leaves_one_shard(tmp_path, corpus, embedder, local_store):
    with retrostore.open(local_store) as st:
        settings = _settings(st.manifest, "text", "meta")
        (tmp_path / _plan.TOKENIZER).write_bytes((local_store / "tokenizer.json").read_bytes())
    files = _plan.input_files([corpus])
    counts = [_plan.count_file(f["path"], f["rel"], "text", "meta") for f in files]
    plan = _plan.make_plan(files, counts, settings, shards=3, key="k")
    # A killed attempt's half-written directory is never taken for a shard.
    half = tmp_path / ".tmp-shard-00001.123.abcd"
    half.mkdir()
    (half / "chunks.msgpack").write_bytes(b"\x00")
    assert not _shards.shard_complete(tmp_path, plan, 1)
    first = _shards.run_shard(plan, 1, tmp_path, embedder)
    again = _shards.run_shard(plan, 1, tmp_path, embedder)  # a retry after success: nothing to do
    assert not first["reused"] and again["reused"] and again["chunks"] == first["chunks"]
    # A duplicate that finishes second is discarded, the first copy stays.
    before = _shards.load_shard(tmp_path, plan, 1)
    dup = tmp_path / ".tmp-shard-00001.999.dup"
    shutil.copytree(_shards.shard_dir(tmp_path, 1), dup)
    (dup / "docs.msgpack").write_bytes(b"garbage")
    _shards._publish(dup, _shards.shard_dir(tmp_path, 1))
    assert not dup.exists()
    after = _shards.load_shard(tmp_path, plan, 1)
    assert before[0] == after[0] and np.array_equal(before[3], after[3])
    assert _shards.clean_temporaries(tmp_path) == 1 and not half.exists()
    # Damage is detected before a merge reads the shard.
    (_shards.shard_dir(tmp_path, 1) / "vectors.npy").write_bytes(b"x" * 10)
    with pytest.raises(retrostore.CorruptStoreError, match="shard-00001"):
        _shards.load_shard(tmp_path, plan, 1)


def test_shard_records_use_the_store_encoding(local_store, tmp_path):
    """Shards write chunk records with the encoder the store's append uses (one function)."""
    from retrostore.storage.records import encode_chunks

    with retrostore.open(local_store) as st:
        doc = st.get_document(1)
        chunks = st.chunker.chunk(doc.text)
        first = doc.chunk_ids.start
        keyed = st._table.pack_chunks(first, 1, doc.text, chunks)
        assert [k for k, _ in keyed] == [(first + j).to_bytes(8, "big") for j in range(len(chunks))]
        stored = [st._table.env.begin().get(k, db=st._table._chunks) for k, _ in keyed]
        assert [v for _, v in keyed] == stored  # re-packing gives the committed bytes
        if st._table.sealed:  # the store appends a crc32 of key || msgpack (retrostore.storage.lmdbscan.seal)
            stored = [v[:-4] for v in stored]
        assert encode_chunks(st.manifest["tokenizer"]["token_dtype"], 1, doc.text, chunks) == stored


def test_txt_directories_and_empty_documents(tmp_path, slice30):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text(slice30[0]["text"])
    (docs / "sub" / "b.txt").write_text("   \n")  # no chunks: the text is kept in the document record
    (docs / "sub" / "c.txt").write_text(slice30[1]["text"])
    extra = tmp_path / "more.jsonl"
    extra.write_text("".join(json.dumps(d) + "\n" for d in slice30[2:5]))
    build_store(tmp_path / "plain.rstore", [docs, extra], progress=False)
    res = build_store(tmp_path / "sharded.rstore", [docs, extra], shards=4, progress=False)  # --shards: in-process
    assert res.engine == "local" and res.shards == 4
    a, b = _snapshot(tmp_path / "plain.rstore"), _snapshot(tmp_path / "sharded.rstore")
    _assert_same(a, b)
    assert b["documents"][1] == ("   \n", {"source": "sub/b.txt"})


def test_device_cuda_falls_back_to_cpu(tmp_path, slice30):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: no fallback to test")
    src = tmp_path / "few.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in slice30[:3]))
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider.*onnxruntime-gpu.*Embedding on CPU"):
        res = build_store(tmp_path / "s.rstore", [src], device="cuda", progress=False)
    assert (res.engine, res.device, res.documents) == ("local", "cpu", 3)


def test_index_training_stage(tmp_path, corpus, embedder, local_store):
    assert not _shards.needs_training("Flat", 384, "ip") and not _shards.needs_training("auto", 384, "ip")
    assert _shards.needs_training("IVF4,Flat", 384, "ip")
    with retrostore.open(local_store) as st:
        settings = _settings(st.manifest, "text", "meta")
        (tmp_path / _plan.TOKENIZER).write_bytes((local_store / "tokenizer.json").read_bytes())
    files = _plan.input_files([corpus])
    counts = [_plan.count_file(f["path"], f["rel"], "text", "meta") for f in files]
    flat = _plan.make_plan(files, counts, settings, shards=2, key="k")
    assert _shards.train_template(flat, tmp_path, embedder) is None  # auto: trains at a commit
    assert _shards.train_template(flat, tmp_path, embedder, factory="Flat") is None  # nothing to train
    info: dict = {}
    t1 = _shards.train_template(flat, tmp_path, embedder, factory="IVF1,Flat", train_vectors=50, seed=7,
                                info=info).read_bytes()
    t2 = _shards.train_template(flat, tmp_path, embedder, factory="IVF1,Flat", train_vectors=50, seed=7).read_bytes()
    assert t1 == t2 and info == {"sample": 50}  # seeded sample, same template
    import faiss

    index = faiss.deserialize_index(np.frombuffer(t1, dtype=np.uint8))
    assert index.is_trained and index.ntotal == 0
    with pytest.raises(IndexTrainingError, match="IVF4,Flat"):  # the store's sample checks, never a FAISS abort
        _shards.train_template(flat, tmp_path, embedder, factory="IVF4,Flat", train_vectors=50, seed=7)


def test_sharded_build_trains_its_index_at_stage_2(tmp_path, corpus, plain_store, monkeypatch):
    """A trainable factory: stage 2 trains it once on a seeded sample of the build's chunks and
    installs it before any shard is merged; each shard task encodes its vectors with a clone of
    it and the merge adopts those codes (it encodes nothing itself). The chunk table equals the
    plain build's; the index answers; re-running does nothing."""
    from retrostore.store import indexer as _maintenance

    encoded_at_merge = []
    real = _maintenance.build_segment
    monkeypatch.setattr(_maintenance, "build_segment",
                        lambda vectors, *a, **kw: encoded_at_merge.append(len(vectors)) or real(vectors, *a, **kw))
    path = tmp_path / "s.rstore"
    res = build_store(path, [corpus], engine="local", shards=2, index="IVF1,Flat", progress=False)
    assert encoded_at_merge == []
    with retrostore.open(path) as st:
        idx = st.manifest["index"]
        assert (idx["factory"], idx["target"]) == ("IVF1,Flat", "IVF1,Flat")
        assert idx["template"] and idx["trained"]["vectors"] == 0 and idx["trained"]["sample"] > 0
        assert st.verify() == []
        n = len(st)
        _scores, ids = st.search_vectors(st._head.version.stored_vectors(0, 5), k=1)
        assert ids[:, 0].tolist() == list(range(5))  # IVF1 probes its one list: exact
    same = ("counts", "chunk_ids", "doc_ids", "tokens", "records", "documents")
    snap = _snapshot(path)
    plain = _snapshot(plain_store)
    assert {k: snap[k] for k in same} == {k: plain[k] for k in same}
    assert [[c for c, _d, _s in row] for row in snap["hits"]] == [[c for c, _d, _s in row] for row in plain["hits"]]
    assert res.chunks == n
    again = build_store(path, [corpus], engine="local", shards=2, index="IVF1,Flat", progress=False)
    assert again.chunks == 0 and {k: _snapshot(path)[k] for k in same} == {k: snap[k] for k in same}
    # Appending another sharded build to the trained store: its shards encode with the store's template.
    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps({"text": "Another page, about the codes a shard encodes. " * 20}) + "\n")
    added = build_store(path, [more], engine="local", shards=1, progress=False)
    assert added.chunks > 0 and encoded_at_merge == []
    with retrostore.open(path) as st:
        assert st.verify() == [] and len(st) == n + added.chunks
        v = st._head.version.stored_vectors(n, n + 1)
        assert st.search_vectors(v, k=1)[1][0, 0] == n


def test_sharded_build_with_too_small_a_sample_trains_at_a_commit_later(tmp_path, corpus):
    """Too few chunks for the factory: stage 2 steps aside, the store is served exactly (Flat)
    and keeps the factory as its target, as an in-process build does."""
    path = tmp_path / "s.rstore"
    build_store(path, [corpus], engine="local", shards=2, index="IVF4096,Flat", progress=False)
    with retrostore.open(path) as st:
        idx = st.manifest["index"]
        assert (idx["factory"], idx["target"], idx["template"]) == ("Flat", "IVF4096,Flat", None)
        assert st.verify() == [] and len(st) > 0


def test_work_dir_of_another_build_is_refused(tmp_path, corpus, monkeypatch):
    work = tmp_path / "w"
    monkeypatch.setenv(_shards.FAULT_ENV, f"0:raise:{tmp_path / 'fired'}")
    with pytest.raises(RuntimeError):
        build_store(tmp_path / "a.rstore", [corpus], shards=2, work_dir=work, progress=False)
    monkeypatch.delenv(_shards.FAULT_ENV)
    with pytest.raises(InvalidInputError, match=r"holds an unfinished build \(plan \w+\) of other --shards; to "
                                                r"finish it, run its own command again \(the same inputs, --shards 2\)"):
        build_store(tmp_path / "a.rstore", [corpus], shards=3, work_dir=work, progress=False)
    with pytest.raises(InvalidInputError, match="engine"):
        build_store(tmp_path / "b.rstore", [corpus], engine="spark", progress=False)
    with pytest.raises(InvalidInputError, match="address"):
        build_store(tmp_path / "b.rstore", [corpus], address="auto", progress=False)


def test_bad_sharded_build_arguments_fail_first_and_leave_nothing(tmp_path, corpus):
    """helper-39: an --address nothing answers at hung ray.init without end (deaf to Ctrl-C and
    SIGTERM); a malformed one, or an unusable --work-dir, gave a traceback; --append was refused
    or made a second copy depending on --shards; each left an empty store behind."""
    import time

    from retrostore.build import engines

    path = tmp_path / "s.rstore"
    (tmp_path / "afile").write_text("x")
    t0 = time.monotonic()
    for kwargs, match in [
        ({"engine": "ray", "address": "127.0.0.1:1"}, r"cannot reach the Ray cluster at --address '127.0.0.1:1'"),
        ({"engine": "ray", "address": "not an address"}, r"is not a Ray cluster address: give HOST:PORT"),
        ({"shards": 2, "work_dir": tmp_path / "afile" / "sub"}, r"cannot be made: .*afile is a file"),
        ({"shards": 2, "append": True}, r"--append .* works with a plain build only"),
    ]:
        with pytest.raises(InvalidInputError, match=match):
            build_store(path, [corpus], progress=False, **kwargs)
        assert not path.exists() and not (tmp_path / "s.rstore.build").exists(), kwargs
    assert time.monotonic() - t0 < 2 * engines.CONNECT_TIMEOUT_S
    engines.check_ray_address("auto")  # Ray finds (or says it cannot find) a local instance itself
    engines.check_ray_address(None)


def test_inputs_of_an_unfinished_sharded_build(tmp_path, corpus, slice30, monkeypatch):
    """helper-39: a plain build of an input an interrupted sharded build is merging said "already
    built ... nothing to add" (exit 0) with most documents missing; an input fixed after a sharded
    build failed on it was refused for good (the old plan could never be finished)."""
    path = tmp_path / "s.rstore"
    monkeypatch.setenv(_shards.FAULT_ENV, f"2:raise:{tmp_path / 'fired'}")
    with pytest.raises(RuntimeError):
        build_store(path, [corpus], engine="local", shards=3, commit_every=1, progress=False)
    monkeypatch.delenv(_shards.FAULT_ENV)
    with pytest.raises(InvalidInputError, match=r"being built by the sharded build \w+, 2 of its 3 shards merged: "
                                                r"finish it by running its own command again"):
        build_store(path, [corpus], progress=False)
    assert build_store(path, [corpus], engine="local", shards=3, commit_every=1, progress=False).documents > 0
    with retrostore.open(path) as st:
        assert st.manifest["next_doc_id"] == 30 and st.verify() == []

    src = tmp_path / "fixed.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in slice30[:12]))
    fixed = tmp_path / "f.rstore"
    monkeypatch.setenv(_shards.FAULT_ENV, f"0:raise:{tmp_path / 'fired2'}")
    with pytest.raises(RuntimeError):
        build_store(fixed, [src], engine="local", shards=2, progress=False)
    monkeypatch.delenv(_shards.FAULT_ENV)
    assert (tmp_path / "f.rstore.build" / "plan.json").exists()
    src.write_text("".join(json.dumps(d) + "\n" for d in slice30[:11]))  # the input fixed: other bytes
    res = build_store(fixed, [src], engine="local", shards=2, progress=False)
    assert res.documents == 11 and not (tmp_path / "f.rstore.build").exists()


def test_cli_build_with_shards(tmp_path, corpus, local_store, local_snap):
    cli = checkout_cli()
    path = tmp_path / "cli.rstore"
    runner = CliRunner()
    res = runner.invoke(cli, ["build", str(path), str(corpus), "--engine", "local", "--shards", "3", "-q"])
    assert res.exit_code == 0, res.output
    assert "built" in res.output and "[local, 3 shards, cpu]" in res.output
    _assert_same(_snapshot(path), local_snap)
    res = runner.invoke(cli, ["build", str(path), str(corpus), "--engine", "local", "--shards", "3", "-q"])
    assert res.exit_code == 0 and res.output.startswith("already built")
    res = runner.invoke(cli, ["build", str(tmp_path / "x"), str(corpus), "--address", "auto"])
    assert res.exit_code == 2 and "--address needs --engine ray" in res.output
    res = runner.invoke(cli, ["build", str(tmp_path / "x"), str(corpus), "--shards", "0"])
    assert res.exit_code == 2 and "--shards" in res.output
    for name in ("--engine", "--address", "--shards", "--device", "--work-dir"):
        opt = next(p for p in cli.commands["build"].params if name in p.opts)
        assert opt.help


# -- Ray, in local mode, started by the tests ----------------------------------------------
@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    ray = pytest.importorskip("ray")
    marker = tmp_path_factory.mktemp("fault") / "fired"
    # Shard 1's first attempt kills its worker while marker is absent (see _shards.FAULT_ENV).
    # One declared GPU (there is none): the model-holding actor path runs, and falls back to CPU.
    ray.init(num_cpus=2, num_gpus=1, object_store_memory=256 << 20, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {_shards.FAULT_ENV: f"1:exit:{marker}"}})
    try:
        yield marker
    finally:
        ray.shutdown()


def test_ray_build_equals_in_process_build(ray_session, tmp_path, corpus, local_store, plain_store, local_snap):
    ray_session.write_text("disabled")  # no fault here
    res = build_store(tmp_path / "ray.rstore", [corpus], engine="ray", shards=3, progress=False)
    assert (res.engine, res.shards, res.documents, res.device) == ("ray", 3, 30, "cpu")
    snap = _snapshot(tmp_path / "ray.rstore")
    _assert_same(snap, local_snap)
    _assert_same(snap, _snapshot(plain_store))
    with retrostore.open(tmp_path / "ray.rstore") as r, retrostore.open(local_store) as loc:
        assert r.manifest["builds"].keys() == loc.manifest["builds"].keys()  # the same plan, the same build id


def test_ray_retries_a_killed_shard_task(ray_session, tmp_path, corpus, local_store, local_snap):
    ray_session.unlink(missing_ok=True)  # arm the fault: shard 1's worker dies part-way through writing
    res = build_store(tmp_path / "killed.rstore", [corpus], engine="ray", shards=3, progress=False)
    assert ray_session.exists()  # the fault fired, the task was retried
    assert res.documents == 30
    _assert_same(_snapshot(tmp_path / "killed.rstore"), local_snap)
    assert not (tmp_path / "killed.rstore.build").exists()


def test_ray_gpu_actors_fall_back_to_cpu(ray_session, tmp_path, corpus, local_snap):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: no fallback to test")
    ray_session.write_text("disabled")
    with pytest.warns(RuntimeWarning, match="no CUDAExecutionProvider.*onnxruntime-gpu.*Embedding on CPU"):
        res = build_store(tmp_path / "gpu.rstore", [corpus], engine="ray", shards=3, device="cuda", progress=False)
    assert (res.engine, res.device, res.documents) == ("ray", "cpu", 30)
    _assert_same(_snapshot(tmp_path / "gpu.rstore"), local_snap)  # batches of 256 embed the same vectors


def test_ray_cluster_without_gpus_falls_back(ray_session, tmp_path, slice30, monkeypatch):
    import ray

    ray_session.write_text("disabled")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    src = tmp_path / "few.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in slice30[:3]))
    with pytest.warns(RuntimeWarning, match="no GPUs.*Embedding on CPU"):
        res = build_store(tmp_path / "s.rstore", [src], engine="ray", device="cuda", progress=False)
    assert (res.engine, res.device, res.documents) == ("ray", "cpu", 3)


def test_ray_bad_input_raises_the_library_error(ray_session, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(retrostore.InvalidDocumentError, match="bad.jsonl:2"):
        build_store(tmp_path / "s.rstore", [bad], engine="ray", progress=False)
