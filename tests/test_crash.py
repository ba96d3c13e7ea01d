"""SIGKILL crash tests: a real writer process is killed at random moments.

The writer (``_workers.crash_writer``) appends real documents of the shared
corpus (with embeddings the parent computed once with the real embedder) and
commits, over and over, on one store that survives every kill. After each
kill the parent checks that the store opens, ``verify()`` finds nothing, and
its contents are exactly the batches whose ``commit()`` returned (plus, as a
whole, the batch in flight when the kill fell between the manifest rename and
``commit()`` returning), then on every other trial opens a writer itself and
checks that recovery removed every orphaned file and LMDB record.

Default run: 20 kills. ``-m slow``: 200 kills (see docs/reliability.md); set
RETROSTORE_CRASH_REPORT=path to also write the run's summary there as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import retrostore
from retrostore.storage import layout as _layout
from retrostore.storage import manifest as _manifest

import _workers


@pytest.fixture(scope="module")
def crash_data(tmp_path_factory, pydocs, embedder):
    """A pool of real documents and their real embeddings, computed once."""
    texts = [d["text"] for d in pydocs if 300 <= len(d["text"]) <= 2500][:24] + ["", "  \n\t "]
    chunker = retrostore.Chunker(retrostore.default_tokenizer_path(), 64)
    per_doc = chunker.chunk_many(texts)
    embs = [embedder.embed_token_ids([c.token_ids for c in chunks]) if chunks else np.zeros((0, 384), np.float32)
            for chunks in per_doc]
    out = tmp_path_factory.mktemp("crashdata")
    (out / "docs.json").write_text(json.dumps(texts))
    np.save(out / "emb.npy", np.concatenate(embs).astype(np.float32))
    np.save(out / "offsets.npy", np.cumsum([0] + [len(e) for e in embs]))
    return {"dir": out, "texts": texts, "n_chunks": [len(c) for c in per_doc], "embs": embs}


def _wait_for(path: Path, word: str, timeout_s: float, proc) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and word in path.read_text():
            return True
        if not proc.is_alive():
            return False
        time.sleep(0.005)
    return False


def _acks(path: Path) -> tuple[int | None, list[int]]:
    ready, committed = None, []
    if path.exists():
        for line in path.read_text().splitlines():
            word, _, v = line.partition(" ")
            if word == "ready":
                ready = int(v)
            elif word == "committed":
                committed.append(int(v))
    return ready, committed


def leftovers(path: Path) -> dict:
    """What a crashed writer may leave: files no retained version names, LMDB
    records beyond the high-water marks, manifests of uncommitted versions."""
    current = _manifest.read_manifest(path)
    referenced = {e["path"] for e in _manifest.referenced_files(current)}
    future = []
    for p in (path / _layout.VERSIONS_DIR).glob("manifest-*.json"):
        v = int(p.name[9:21])
        if v > current["version"]:
            future.append(p.name)
            continue
        referenced |= {e["path"] for e in _manifest.referenced_files(_manifest.read_manifest(path, v))}
    files = sorted(f"{d}/{p.name}" for d in ("index", "vectors") for p in (path / d).iterdir()
                   if f"{d}/{p.name}" not in referenced)
    tmp = sorted(p.name for p in list(path.glob(".tmp-*")) + list((path / "versions").glob(".tmp-*")))
    with retrostore.open(path) as st:
        stats = st._table.stats()
    beyond = {
        "chunks": stats["chunks"]["last"] is not None and stats["chunks"]["last"] >= current["next_chunk_id"],
        "docs": stats["docs"]["last"] is not None and stats["docs"]["last"] >= current["next_doc_id"],
        "commits": stats["commits"]["last"] is not None and stats["commits"]["last"] > current["version"],
    }
    return {"files": files, "tmp": tmp, "future_manifests": future, "lmdb_beyond": [k for k, v in beyond.items() if v]}


def check_contents(path: Path, version: int, data: dict, embedder, rng: random.Random) -> None:
    """The store at ``version`` holds exactly batches 0..version-1, verifies, and searches resolve."""
    texts, n_chunks = data["texts"], data["n_chunks"]
    expected = []
    for b in range(version):
        idx = _workers.batch_plan(b, len(texts))
        expected += list(zip(idx, _workers.batch_metadata(b, idx)))
    with retrostore.open(path, embedder=embedder) as st:
        assert st.version == version
        problems = st.verify()
        assert problems == [], problems
        info = st.info()
        assert info["documents"] == len(expected)
        assert len(st) == info["vectors"] == sum(n_chunks[i] for i, _ in expected)
        first_chunk = 0
        for d, (i, meta) in enumerate(expected):
            doc = st.get_document(d)
            assert doc.text == texts[i] and doc.metadata == meta, f"document {d}"
            assert list(doc.chunk_ids) == list(range(first_chunk, first_chunk + n_chunks[i]))
            first_chunk += n_chunks[i]
        with_chunks = [(d, i) for d, (i, _) in enumerate(expected) if n_chunks[i]]
        if with_chunks:
            d, i = rng.choice(with_chunks)
            j = rng.randrange(n_chunks[i])
            want = st.get_chunks([st.get_document(d).chunk_ids[j]])[0]
            _scores, ids = st.search_vectors(data["embs"][i][j : j + 1], k=1)
            assert st.get_chunks([int(ids[0, 0])])[0].text == want.text  # exact search finds the text
            for h in st.search(want.text[:200], k=3):
                assert 0 <= h.chunk_id < len(st)
                assert st.get_chunks([h.chunk_id])[0].text == h.text


def run_crash_trials(path: Path, data: dict, embedder, workers, n_trials: int, seed: int) -> dict:
    retrostore.create(path, embedder=embedder).close()
    rng = random.Random(seed)
    known = 0
    stats: Counter = Counter()
    t0 = time.perf_counter()
    for trial in range(n_trials):
        ack = path.parent / f"ack-{trial}.txt"
        proc = workers.Process(target=_workers.crash_writer, args=(str(path), str(data["dir"]), str(ack)))
        proc.start()
        if rng.random() < 0.15:
            time.sleep(rng.uniform(0, 0.2))  # during start-up and recovery
        else:
            assert _wait_for(ack, "ready", 120, proc), f"trial {trial}: the writer did not start ({proc.exitcode})"
            time.sleep(rng.uniform(0, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(60)
        assert proc.exitcode == -signal.SIGKILL, f"trial {trial}: writer ended with {proc.exitcode}, not SIGKILL"
        ready, committed = _acks(ack)
        assert ready in (None, known), f"trial {trial}: writer opened at {ready}, expected {known}"
        acked = max([known] + committed)
        assert committed == list(range(known + 1, acked + 1)), f"trial {trial}: acks {committed} after {known}"
        version = _manifest.read_manifest(path)["version"]
        assert version in (acked, acked + 1), f"trial {trial}: store at {version}, acknowledged {acked}"
        stats["commits_acknowledged"] += acked - known
        stats["in_flight_published"] += version == acked + 1
        check_contents(path, version, data, embedder, rng)
        left = leftovers(path)
        stats["trials_leaving_orphan_files"] += bool(left["files"] or left["tmp"] or left["future_manifests"])
        stats["trials_leaving_lmdb_records"] += bool(left["lmdb_beyond"])
        if trial % 2:  # recovery by a writer in this process; else by the next writer process
            with retrostore.open(path, "a") as w:
                assert w.version == version
            assert leftovers(path) == {"files": [], "tmp": [], "future_manifests": [], "lmdb_beyond": []}
        known = version
        stats["trials"] += 1
    return dict(stats, final_version=known, seconds=round(time.perf_counter() - t0, 1))


def test_sigkill_writer(tmp_path, crash_data, embedder, workers):
    summary = run_crash_trials(tmp_path / "crash.rstore", crash_data, embedder, workers, n_trials=20, seed=1)
    print("\ncrash run:", json.dumps(summary))
    assert summary["trials"] == 20
    assert summary["final_version"] > 0


@pytest.mark.slow
def test_sigkill_writer_long(tmp_path, crash_data, embedder, workers):
    summary = run_crash_trials(tmp_path / "crash.rstore", crash_data, embedder, workers, n_trials=200, seed=2)
    summary.update(machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}")
    print("\nlong crash run:", json.dumps(summary))
    if os.environ.get("RETROSTORE_CRASH_REPORT"):
        Path(os.environ["RETROSTORE_CRASH_REPORT"]).write_text(json.dumps(summary, indent=1) + "\n")
    assert summary["trials"] == 200


def test_sigkill_during_create(tmp_path, workers):
    """A create killed at any moment leaves nothing at the path or a valid empty
    store; a later create removes the killed one's temporary directory."""
    rng = random.Random(3)
    outcomes = Counter()
    for trial in range(8):
        path = tmp_path / f"s{trial}"
        proc = workers.Process(target=_workers.crash_creator, args=(str(path),))
        proc.start()
        time.sleep(rng.uniform(0, 0.25))
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the create finished (and was reaped) first, on a fast machine: a whole store
        proc.join(60)
        if path.exists():
            with retrostore.open(path) as st:
                assert st.version == 0 and len(st) == 0 and st.verify() == []
            outcomes["store"] += 1
        else:
            outcomes["nothing"] += 1
            retrostore.create(path, embedder=_workers._SmallEmbedder(),
                              tokenizer=retrostore.default_tokenizer_path()).close()
            with retrostore.open(path) as st:
                assert st.version == 0
    assert outcomes["store"] + outcomes["nothing"] == 8
    # every killed create's temporary directory is gone once a create ran after it
    retrostore.create(tmp_path / "last", embedder=_workers._SmallEmbedder(),
                      tokenizer=retrostore.default_tokenizer_path()).close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
