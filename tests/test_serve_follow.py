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
