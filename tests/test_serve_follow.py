"""Load on a served store while another process commits: no request fails, every answer comes
from a committed version, and the answers equal the embedded Store at that version."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import retrostore

pytest.importorskip("starlette", reason="retrostore serve needs the serve extra: pip install '.[test,serve]'")

import httpx

import _serving

QUERIES = [
    "decode base64 encoded data back into bytes",
    "how do I upload a package to the index",
    "run a function in a pool of threads",
    "the license and copyright of python",
    "parse command line options",
    "read and write files",
    "regular expression syntax",
    "what is new in this release",
]
CLIENTS = 32


@pytest.fixture
def growing_store(tmp_path, small_docs, pydocs, embedder):
    """A store of the 20 small documents, keeping every version readable, and 60 more to append."""
    path = tmp_path / "growing.rstore"
    with retrostore.create(path, embedder=embedder, retain_versions=10_000) as st:
        st.append([d["text"] for d in small_docs], metadata=[d["meta"] for d in small_docs])
        first = st.commit()
    used = {d["meta"]["source"] for d in small_docs}
    more = sorted((d for d in pydocs if d["text"].strip() and d["meta"]["source"] not in used),
                  key=lambda d: len(d["text"]))[:60]
    docs = tmp_path / "more.json"
    docs.write_text(json.dumps(more))
    return path, docs, first


@pytest.mark.parametrize("seconds", [8, pytest.param(30, marks=pytest.mark.slow)])
def test_load_while_a_writer_commits(growing_store, tmp_path, embedder, seconds):
    path, docs, first = growing_store
    committed = tmp_path / "committed.jsonl"
    with _serving.serving(path) as srv:
        writer = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_serve_writer.py")), str(path),
                                   str(docs), str(seconds), str(committed)])
        answers: list[tuple[int, int, str, list[int]]] = []  # (client, version, query, chunk ids)
        failures: list[BaseException] = []
        deadline = time.monotonic() + seconds

        def client(i: int) -> None:
            rng = random.Random(i)
            try:
                with retrostore.connect(srv.url, timeout_s=60) as c:
                    while time.monotonic() < deadline:
                        q = rng.choice(QUERIES)
                        if rng.random() < 0.1:
                            tokens = np.array(rng.choices(range(1000, 20000), k=96))
                            nb = c.neighbors(tokens, k=2)
                            assert nb.tokens.shape == (1, 2, 2, 128)
                            continue
                        hits = c.search(q, k=3)
                        answers.append((i, c.version, q, [h.chunk_id for h in hits]))
            except BaseException as exc:  # noqa: BLE001 - every failure is reported below
                failures.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 120)
        assert writer.wait(120) == 0
        assert not any(t.is_alive() for t in threads)
        lines = [json.loads(x) for x in committed.read_text().splitlines()]
        versions = {first} | {x["version"] for x in lines}
        lengths = {first: 90} | {x["version"]: x["len"] for x in lines}
        # the server reaches the writer's last commit by itself
        last = max(versions)
        for _ in range(100):
            if httpx.get(srv.url + "/healthz").json()["version"] == last:
                break
            time.sleep(0.05)
        assert httpx.get(srv.url + "/healthz").json() == {"status": "ok", "version": last, "len": lengths[last]}

    assert not failures, failures[:3]
    assert len(lines) >= 5, "the writer committed too rarely to test following"
    assert len(answers) >= 100
    seen = {v for _, v, _, _ in answers}
    assert seen <= versions, f"answers from versions never committed: {sorted(seen - versions)}"
    assert len(seen) >= 3, f"the server did not follow the commits (answers came from {sorted(seen)})"
    for i in range(CLIENTS):
        mine = [v for c, v, _, _ in answers if c == i]
        assert mine == sorted(mine), f"client {i} saw versions go backwards"
    for _, v, _, ids in answers:
        assert all(0 <= c < lengths[v] for c in ids)
    # answers equal the embedded store's at the version that gave them
    sample = random.Random(0).sample(answers, 40)
    by_version: dict[int, list] = {}
    for _, v, q, ids in sample:
        by_version.setdefault(v, []).append((q, ids))
    for v, items in by_version.items():
        with retrostore.open(path, version=v, embedder=embedder) as st:
            for q, ids in items:
                assert [h.chunk_id for h in st.search(q, k=3)] == ids, (v, q)


def test_a_store_synced_over_the_served_one_is_taken_over_whole(tmp_path, small_docs, embedder):
    """helper-33: with `rsync -a NEW/ SERVED/` the server moved to the new manifest and index but
    kept the old chunk table: wrong passages and metadata labelled with the new version, 500s for
    ids the old table lacks, until a restart. Now it opens the new store whole once its copy is
    complete (the chunk table's commit records chain to the manifest's) and serves the old one
    until then: every answer equals one of the two stores' own."""
    from test_concurrency import _sync_over

    old, new = tmp_path / "served.rstore", tmp_path / "new.rstore"
    texts = [d["text"] for d in small_docs]
    with retrostore.create(old, embedder=embedder) as st:
        st.append(texts[:8])
        st.commit()
    with retrostore.create(new, embedder=embedder) as st:
        st.append(texts[8:] + texts[:8])  # another store: other documents at the same ids
        st.commit()
    want = {}
    for name, path in (("old", old), ("new", new)):
        with retrostore.open(path, embedder=embedder) as st:
            want[name] = {q: [(h.chunk_id, h.text) for h in st.search(q, k=3)] for q in QUERIES}
    with _serving.serving(old) as server:
        client = retrostore.connect(server.url)
        seen, stop = [], threading.Event()

        def ask():
            while not stop.is_set():
                for q in QUERIES:
                    got = [(h.chunk_id, h.text) for h in client.search(q, k=3)]
                    seen.append("old" if got == want["old"][q] else "new" if got == want["new"][q] else "mixed")

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        _sync_over(new, old)
        with retrostore.open(new, embedder=embedder) as st:
            chunks = len(st)
        deadline = time.monotonic() + 30
        while client.info()["chunks"] != chunks and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        log = server.log()
    assert "mixed" not in seen and seen[0] == "old" and seen[-1] == "new", (seen.count("mixed"), log[-3000:])
    assert "the store directory was replaced: now serving version 1" in log


def _engine(path, embedder, **settings):
    from retrostore.serve import ServeSettings
    from retrostore.serve.engine import Engine

    eng = Engine(ServeSettings(store=str(path), verify=False, refresh_interval_s=0.01, **settings), embedder)
    eng.open()
    return eng


def _until(cond, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_new_version_is_opened_and_warmed_off_the_batcher_thread(tmp_path, small_docs, embedder, monkeypatch):
    """A read-only handle merges a streamed store's segments at its first search (0.17 s at 600k
    vectors); with ``Store.refresh()`` on the served handle that merge stalled the first batch on
    every new version. A follower thread now opens and warms the new version: until it is done the
    batcher answers from the old one, then it swaps handles between batches and closes the old."""
    from retrostore.errors import StoreClosedError
    from retrostore.serve import engine as engine_mod

    path = tmp_path / "s.rstore"
    texts = [d["text"] for d in small_docs]
    with retrostore.create(path, embedder=embedder) as st:
        st.append(texts[:10])
        v1 = st.commit()
    warmed, gate = [], threading.Event()
    real_warm = engine_mod._warm

    def held_warm(store):
        warmed.append(threading.current_thread().name)
        if threading.current_thread().name == "retrostore-follower":
            assert gate.wait(20)
        real_warm(store)

    monkeypatch.setattr(engine_mod, "_warm", held_warm)
    eng = _engine(path, embedder)
    try:
        old = eng.store
        before = [h.chunk_id for h in old.search(QUERIES[0], k=3)]
        with retrostore.open(path, "a", embedder=embedder) as w:
            w.append(texts[10:])
            v2 = w.commit()
            total = len(w)
        _until(lambda: "retrostore-follower" in warmed)
        # the new version is being prepared (held): the batcher's side still serves the old one
        assert eng.maybe_refresh() is False and eng.version == v1 and eng.store is old
        assert [h.chunk_id for h in eng.store.search(QUERIES[0], k=3)] == before
        gate.set()
        _until(eng.maybe_refresh)
        assert eng.version == v2 and eng.len == total and eng.store is not old
        assert eng.info()["version"] == v2 and eng.info()["chunks"] == total  # (read by the follower)
        with pytest.raises(StoreClosedError):
            old.search(QUERIES[0], k=3)  # the replaced handle is closed, not leaked
        with retrostore.open(path, embedder=embedder) as fresh:
            for q in QUERIES:
                assert [h.chunk_id for h in eng.store.search(q, k=3)] == [h.chunk_id for h in fresh.search(q, k=3)]
        assert warmed == [threading.current_thread().name, "retrostore-follower"]
    finally:
        gate.set()
        eng.close()


def test_a_damaged_new_version_leaves_the_served_one_serving(tmp_path, small_docs, embedder, caplog, monkeypatch):
    """A new version whose index segment is damaged fails to open in the follower: the served
    version stays, the failure reaches the batcher (for the refresh-error metric) and the log,
    once per cause."""
    from retrostore.serve import follow

    path = tmp_path / "s.rstore"
    texts = [d["text"] for d in small_docs]
    with retrostore.create(path, embedder=embedder) as st:
        st.append(texts[:10])
        v1 = st.commit()
    damaged = threading.Event()  # the follower sees the commit only once its segment is damaged
    real_stamp = follow.manifest_stamp
    first = real_stamp(follow.manifest_path(path))
    monkeypatch.setattr(follow, "manifest_stamp", lambda p: real_stamp(p) if damaged.is_set() else first)
    eng = _engine(path, embedder)
    try:
        want = [h.chunk_id for h in eng.store.search(QUERIES[0], k=3)]
        with retrostore.open(path, "a", embedder=embedder) as w:
            w.append(texts[10:])
            w.commit()
            newest = w.manifest["index"]["segments"][-1]["path"]
        seg = path / newest
        seg.write_bytes(b"\0" * seg.stat().st_size)  # same size, wrong checksum
        damaged.set()
        errors = []

        def failed():
            try:
                eng.maybe_refresh()
            except retrostore.RetrostoreError as exc:
                errors.append(str(exc))
            return bool(errors)

        _until(failed)
        assert "CorruptStoreError" in errors[0] and newest.split("/")[-1] in errors[0], errors
        time.sleep(0.3)
        assert eng.version == v1 and [h.chunk_id for h in eng.store.search(QUERIES[0], k=3)] == want
        assert sum("opening the newest version failed" in r.getMessage() for r in caplog.records) == 1
    finally:
        eng.close()
