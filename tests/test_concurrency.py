"""One writer, many readers, and fork(): real processes on a real store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import traceback

import numpy as np
import pytest

import retrostore
from retrostore import ForkedStoreError, WriterLockedError

import _workers


def _result(path, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"no result in {path}"
        time.sleep(0.01)
    return path.read_text()


# -- one writer -------------------------------------------------------------
def test_second_writer_in_this_process_fails_at_once(tmp_path, embedder):
    path = tmp_path / "s"
    with retrostore.create(path, embedder=embedder):
        t0 = time.perf_counter()
        with pytest.raises(WriterLockedError, match="another writer holds") as info:
            retrostore.open(path, "a")
        assert time.perf_counter() - t0 < 1.0
        assert isinstance(info.value, BlockingIOError)
        with retrostore.open(path) as reader:  # readers are never refused
            assert reader.version == 0
    with retrostore.open(path, "a") as again:  # released by close()
        assert again.version == 0


def test_writer_waits_up_to_timeout(tmp_path, embedder):
    import threading

    path = tmp_path / "s"
    first = retrostore.create(path, embedder=embedder)
    t0 = time.perf_counter()
    with pytest.raises(WriterLockedError, match="after waiting 0.5 s"):
        retrostore.open(path, "a", timeout_s=0.5)
    assert 0.45 <= time.perf_counter() - t0 < 5
    threading.Timer(0.3, first.close).start()
    t0 = time.perf_counter()
    with retrostore.open(path, "a", timeout_s=20) as second:
        assert 0.25 <= time.perf_counter() - t0 < 20 and second.version == 0


def test_second_writer_in_another_process(tmp_path, embedder, workers):
    path = tmp_path / "s"
    with retrostore.create(path, embedder=embedder):
        for timeout_s, name in ((None, "a"), (0.5, "b")):
            proc = workers.Process(target=_workers.try_writer, args=(str(path), timeout_s, str(tmp_path / name)))
            proc.start()
            proc.join(60)
            result, seconds = _result(tmp_path / name).split()
            assert result == "locked"
            if timeout_s:
                assert float(seconds) >= 0.45
        proc = workers.Process(target=_workers.try_writer, args=(str(path), 30, str(tmp_path / "c")))
        proc.start()
        time.sleep(0.5)
    proc.join(60)  # the writer above closed: the waiting process got the lock
    assert _result(tmp_path / "c").split()[0] == "opened"


# -- readers and a writer -----------------------------------------------------
def test_readers_see_whole_versions_in_order_while_writer_commits(tmp_path, pydocs, embedder, workers):
    """One writer process commits 50 times while 4 reader processes search
    continuously (2 refresh, 2 also reopen the store) and a 5th holds a read
    transaction open all along. LMDB maps start at 64 KiB in every process, so
    the writer grows the map and readers adopt the new size mid-run."""
    path = tmp_path / "s"
    retrostore.create(path, embedder=embedder).close()
    texts = [d["text"] for d in pydocs if 1000 <= len(d["text"]) <= 4000][:30]
    stop = tmp_path / "stop"
    map_bytes = 64 << 10
    slow = workers.Process(target=_workers.slow_reader, args=(str(path), str(stop), str(tmp_path / "slow.json")))
    slow.start()
    readers = [workers.Process(target=_workers.conc_reader,
                               args=(str(path), str(stop), str(tmp_path / f"r{i}.json"), i, 7 if i % 2 else 0, map_bytes))
               for i in range(4)]
    for r in readers:
        r.start()
    writer = workers.Process(target=_workers.conc_writer, args=(str(path), texts, 50, str(tmp_path / "w.json"), map_bytes))
    writer.start()
    writer.join(300)
    stop.touch()
    for p in readers + [slow]:
        p.join(120)
    w = json.loads(_result(tmp_path / "w.json"))
    assert w["errors"] == [] and w["version"] == 50
    assert w["map_size"] > map_bytes  # the map grew
    seen = []
    for i in range(4):
        r = json.loads(_result(tmp_path / f"r{i}.json"))
        assert r["errors"] == [], r["errors"]
        assert r["versions"] == sorted(set(r["versions"])), r["versions"]  # strictly increasing
        assert r["versions"][-1] == 50 and r["resolved"] > 0
        seen.append(len(r["versions"]))
    assert max(seen) >= 3, seen  # readers ran while versions were being committed
    assert json.loads(_result(tmp_path / "slow.json"))["held_version"] <= 50
    with retrostore.open(path) as st:
        assert st.version == 50 and st.verify() == []


# -- fork -----------------------------------------------------------------------
def _in_child(fn, log_path, timeout_s=120) -> None:
    """Run ``fn`` in a forked child; fail if it raises, exits non-zero or hangs."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            with open(log_path, "w") as fh:
                fh.write(traceback.format_exc())
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child hung for {timeout_s} s (deadlock after fork)")
        time.sleep(0.02)
    log = log_path.read_text() if log_path.exists() else ""
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child failed ({status}):\n{log}"


def test_reader_after_fork_and_tokenizer_before_fork(built_store, small_docs, embedder, tmp_path):
    """The inherited handle refuses with a clear error, closing it is safe, a
    store opened in the child works, the tokenizer and embedder used before
    the fork do not deadlock the child, and the parent's handle is unharmed."""
    st = retrostore.open(built_store, embedder=embedder)
    texts = [d["text"] for d in small_docs]
    st.chunker.chunk_many(texts * 4)  # parallel (Rust) tokenization before the fork
    before = st.search("decode base64 data", k=3)

    def child():
        with pytest.raises(ForkedStoreError, match=r"call retrostore.open\(\) in the child"):
            st.search_vectors(np.ones((1, 384), np.float32))
        with pytest.raises(ForkedStoreError):
            st.get_document(0)
        st.close()  # safe in the child: the parent's LMDB environment is left alone
        assert len(st.chunker.chunk_many(texts * 2)) == 2 * len(texts)  # tokenizer works in the child
        with retrostore.open(built_store, embedder=embedder) as mine:
            hits = mine.search("decode base64 data", k=3)
            assert [h.chunk_id for h in hits] == [h.chunk_id for h in before]

    _in_child(child, tmp_path / "child.log")
    after = st.search("decode base64 data", k=3)
    assert [h.chunk_id for h in after] == [h.chunk_id for h in before]
    assert st.get_document(0).text == small_docs[0]["text"] and st.verify() == []
    st.close()


def test_writer_after_fork(tmp_path, small_docs, embedder, workers):
    """A forked child cannot write through, truncate or unlock the parent's
    writer; the parent commits its staged data afterwards."""
    path = tmp_path / "s"
    w = retrostore.create(path, embedder=embedder)
    ids = w.append([small_docs[0]["text"]])

    def child():
        with pytest.raises(ForkedStoreError):
            w.append("from the child")
        with pytest.raises(ForkedStoreError):
            w.commit()
        w.close()  # must neither drop the parent's staged records nor release its lock
        with pytest.raises(WriterLockedError):
            retrostore.open(path, "a")

    _in_child(child, tmp_path / "child.log")
    proc = workers.Process(target=_workers.try_writer, args=(str(path), None, str(tmp_path / "lock")))
    proc.start()
    proc.join(60)
    assert _result(tmp_path / "lock").split()[0] == "locked"  # the parent still holds the lock
    assert w.commit() == 1
    assert w.get_document(ids[0]).text == small_docs[0]["text"] and w.verify() == []
    w.close()


def test_store_replaced_while_a_handle_is_open(tmp_path):
    """rm -rf + a new store at the same path (a redeploy) while this process holds a handle on
    the old one: new handles read the new files, a writer commits into them, and the old handle
    keeps reading its own (deleted) files until closed."""
    rng = np.random.default_rng(0)

    def unit(n):
        v = rng.standard_normal((n, 384)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    p = tmp_path / "s.rstore"
    with retrostore.create(p) as st:
        st.append(["OLD doc zero", "OLD doc one"], embeddings=unit(2))
        st.commit()
    old = retrostore.open(p)
    shutil.rmtree(p)
    with retrostore.create(p) as st:
        st.append(["new A", "new B", "new C"], embeddings=unit(3))
        st.commit()
    new = retrostore.open(p)
    assert [new.get_document(i).text for i in range(3)] == ["new A", "new B", "new C"]
    assert old.get_document(0).text == "OLD doc zero"
    with retrostore.open(p, mode="a") as w:
        w.append(["x"], embeddings=unit(1))
        w.commit()
    new.close()
    old.close()
    with retrostore.open(p) as st:
        assert st.verify() == [] and [st.get_document(i).text for i in range(4)] == ["new A", "new B", "new C", "x"]


_FORK_AND_EXIT = """
import os, sys
import retrostore
st = retrostore.open(sys.argv[1])
first = st.get_chunks([0, 1])
assert "onnxruntime" not in sys.modules, "imported by a store that embeds nothing"
pid = os.fork()
if pid == 0:  # a worker that reads its own handle and ends as scripts do: sys.exit, not os._exit
    with retrostore.open(sys.argv[1]) as mine:
        assert [c.text for c in mine.get_chunks([0, 1])] == [c.text for c in first]
    sys.exit(0)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


def test_a_forked_reader_exits_normally(built_store):
    """onnxruntime is imported when an embedder is made, not with retrostore: once imported, a
    forked child's normal exit hangs in onnxruntime's exit-time destructors (onnxruntime 1.32), so
    a process forking workers that only read chunks, tokens or vectors never pays that."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FORK_AND_EXIT, str(built_store)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["child", "0"], proc.stderr[-2000:]


def _sync_over(src, dst) -> None:
    """What ``rsync -a SRC/ DST/`` does: each file of SRC written beside its name and renamed over
    it, directory by directory (manifest.json before chunks.lmdb/); files only DST has stay."""
    for dirpath, _, files in sorted(os.walk(src)):
        rel = os.path.relpath(dirpath, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in sorted(files):
            tmp = os.path.join(dst, rel, f".{name}.sync")
            shutil.copy2(os.path.join(dirpath, name), tmp)
            os.replace(tmp, os.path.join(dst, rel, name))


def test_a_store_synced_over_an_open_one_is_refused_not_mixed(tmp_path):
    """helper-33: rsync of another store over an open one, then refresh(): the handle served the new
    manifest and index with the old chunk table (the old texts at the new ids, no error). refresh()
    now refuses (StoreReplacedError) and the handle keeps answering from the store it opened; closed
    and opened again, it reads the new one."""
    rng = np.random.default_rng(0)

    def unit(n):
        v = rng.standard_normal((n, 384)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    a, b = tmp_path / "a.rstore", tmp_path / "b.rstore"
    with retrostore.create(a) as st:
        st.append(["OLD doc zero", "OLD doc one"], embeddings=unit(2))
        st.commit()
    with retrostore.create(b) as st:
        st.append(["new A", "new B"], embeddings=unit(2))
        st.commit()
        st.append(["new C"], embeddings=unit(1))
        st.commit()
    old = retrostore.open(a)
    shutil.copy2(b / "manifest.json", a / "manifest.json.new")  # rsync's first file: b's manifest over a's
    os.replace(a / "manifest.json.new", a / "manifest.json")
    assert old.refresh() == 1  # (helper-34: it took version 2 of b over a's chunk table: chunks missing)
    assert [old.get_document(i).text for i in range(2)] == ["OLD doc zero", "OLD doc one"]
    _sync_over(b, a)
    with pytest.raises(retrostore.StoreReplacedError, match="was replaced since this handle opened it.*close it"):
        old.refresh()
    assert old.version == 1 and [old.get_document(i).text for i in range(2)] == ["OLD doc zero", "OLD doc one"]
    old.close()
    with retrostore.open(a) as st:
        assert st.version == 2 and st.get_document(2).text == "new C" and st.verify() == []


# -- threads of one handle ------------------------------------------------------------
def _clustered(n, seed, dim=384):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim)).astype(np.float32)
    x = centres[rng.integers(0, 50, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_per_query_params_hold_while_the_same_handle_commits(tmp_path, embedder):
    """helper-43: a handle's versions share the FAISS objects of common segments, each version with
    its own lock; a commit (or a reader's refresh) set the store's nprobe=1 on them under a search
    with params={"nprobe": 64}: 7,653 of 14,400 rows inexact, and FAISS failing "Invalid key"."""
    st = retrostore.create(tmp_path / "s.rstore", embedder=embedder, index="IVF64,Flat", index_params={"nprobe": 1})
    xs = [_clustered(6000, 0)]
    st.append([f"document {i}" for i in range(6000)], embeddings=xs[0])
    st.commit()
    queries = _clustered(50, 99)
    stop = time.monotonic() + 4.0
    bad, rows, errors, commits = [0], [0], [], [0]
    seen = threading.Lock()

    def search():
        while time.monotonic() < stop:
            try:
                _, ids = st.search_vectors(queries, k=10, params={"nprobe": 64})  # all 64 lists: exact
                with seen:
                    x = np.concatenate(xs)
                exact = queries @ x[: ids.max() + 1].T
                kth = np.sort(exact, axis=1)[:, -10]
                got = np.take_along_axis(exact, np.maximum(ids, 0), 1)
                bad[0] += int(((got < kth[:, None] - 1e-3) | (ids < 0)).any(1).sum())
                rows[0] += len(queries)
            except Exception as exc:  # noqa: BLE001 (any failure of a search is the finding)
                errors.append(repr(exc))

    def commit():
        seed = 1000
        while time.monotonic() < stop:
            x = _clustered(20, seed)
            st.append([f"extra {seed} {j}" for j in range(20)], embeddings=x)
            with seen:  # recorded before the commit makes it searchable (ids only reach committed rows)
                xs.append(x)
            st.commit()
            seed += 1
            commits[0] += 1

    threads = [threading.Thread(target=search), threading.Thread(target=commit)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    st.close()
    assert commits[0] >= 5 and rows[0] >= 500, (commits, rows)
    assert not errors and bad[0] == 0, (bad, rows, errors[:2])


def test_graph_search_returns_k_live_chunks_among_many_deleted(tmp_path, embedder):
    """helper-43: HNSW, 2,700 of 3,000 documents deleted: k=100 came back with as few as 63 (the
    tombstone filter's wider fetches went past efSearch, whose -1s read as "no more"); a per-query
    efSearch=1 with k=16 gave -1s with no delete at all."""
    st = retrostore.create(tmp_path / "g.rstore", embedder=embedder, index="HNSW32,SQfp16")
    st.append([f"d {i}" for i in range(3000)], embeddings=_clustered(3000, 3))
    st.commit()
    queries = _clustered(20, 8)
    _, ids = st.search_vectors(queries, k=16, params={"efSearch": 1})
    assert (ids >= 0).all()
    st.delete([i for i in range(3000) if i % 10])
    st.commit()
    for k, params in ((100, None), (300, None), (10, {"efSearch": 8})):
        _, ids = st.search_vectors(queries, k=k, params=params)
        assert (ids >= 0).all() and (ids % 10 == 0).all(), (k, params)  # k live chunks, none deleted
    st.close()


@pytest.mark.parametrize("factory", ["PCA64,HNSW32,Flat", "HNSW32,Flat,RFlat"])
def test_wrapped_graph_search_returns_k_live_chunks_among_many_deleted(tmp_path, embedder, factory):
    """review: the per-call efSearch reached only a bare IndexHNSW; a graph behind a pre-transform or a
    refine wrapper still answered k=100 of 300 live chunks with 31 (PCA) or 63 (RFlat)."""
    st = retrostore.create(tmp_path / "g.rstore", embedder=embedder, index=factory)
    st.append([f"d {i}" for i in range(3000)], embeddings=_clustered(3000, 3))
    st.commit()
    st.delete([i for i in range(3000) if i % 10])
    st.commit()
    queries = _clustered(20, 8)
    for k, params in ((100, None), (300, None), (10, {"efSearch": 8})):
        _, ids = st.search_vectors(queries, k=k, params=params)
        assert (ids >= 0).all() and (ids % 10 == 0).all(), (factory, k, params)
    st.close()


def _wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_search_lock_lets_waiting_searches_in_before_the_next_exclusive_holder():
    """review: per-query parameters make a search exclusive; with the writer preference, two or three
    threads searching with their own parameters held a plain search off for the whole run (1 search
    in 5 s, worst 5 s). The searches that waited behind a holder now go in before the next one; a
    search arriving while a holder waits still waits (a commit is not held off)."""
    from retrostore.index.params import RWLock

    lock, order = RWLock(), []

    def waiting(n):  # threads blocked in the lock's condition
        _wait_for(lambda: len(lock._cond._waiters) == n)

    def search(name):
        lock.acquire_shared()
        order.append(name)
        lock.release_shared()

    def exclusive(name):
        with lock.exclusive():
            order.append(name)

    with lock.exclusive():  # a search with its own parameters
        reader = threading.Thread(target=search, args=("search",))
        reader.start()
        waiting(1)
        writer = threading.Thread(target=exclusive, args=("next exclusive",))
        writer.start()
        waiting(2)
    reader.join(10)
    writer.join(10)
    assert order == ["search", "next exclusive"]

    order.clear()
    lock.acquire_shared()  # a search in progress; a commit waits; a new search waits behind it
    writer = threading.Thread(target=exclusive, args=("commit",))
    writer.start()
    waiting(1)
    reader = threading.Thread(target=search, args=("later search",))
    reader.start()
    waiting(2)
    assert order == []
    lock.release_shared()
    writer.join(10)
    reader.join(10)
    assert order == ["commit", "later search"]


def test_map_growth_by_another_process_waits_for_open_reads(tmp_path, pydocs, embedder, workers, monkeypatch):
    """A process's handles on one store share one LMDB environment. When another process grows
    the map, the first thread to read adopts the new size (``mdb_env_set_mapsize``), which
    remaps the file under every transaction open in the process: threads reading through their
    own handles failed with "Attempt to operate on closed/deleted/dropped object" (reported as a
    damaged file). The resize now waits for the open transaction to end."""
    from retrostore.storage import chunktable as _chunks

    monkeypatch.setattr(_chunks, "_INITIAL_MAP_BYTES", 64 << 10)
    path = tmp_path / "s"
    retrostore.create(path, embedder=embedder).close()
    texts = [d["text"] for d in pydocs if 1000 <= len(d["text"]) <= 4000][:30]
    first = workers.Process(target=_workers.conc_writer, args=(str(path), texts[:3], 1, str(tmp_path / "w1.json"),
                                                               64 << 10))
    first.start()
    first.join(120)
    holder, reader = retrostore.open(path), retrostore.open(path)
    held, entered, release = [], threading.Event(), threading.Event()

    def hold():  # a transaction open across the other process's growth, read after it
        with holder._table._begin() as txn:
            entered.set()
            release.wait(60)
            held.extend(bytes(k) for k, _ in txn.cursor(holder._table._chunks))

    t = threading.Thread(target=hold)
    t.start()
    entered.wait(10)
    grow = workers.Process(target=_workers.conc_writer, args=(str(path), texts, 40, str(tmp_path / "w2.json"),
                                                              64 << 10))
    grow.start()
    grow.join(300)
    w = json.loads(_result(tmp_path / "w2.json"))
    assert w["errors"] == [] and w["map_size"] > 64 << 10
    got = []
    other = threading.Thread(target=lambda: (reader.refresh(), got.append(reader.get_chunks(range(len(reader))))))
    other.start()
    other.join(1.0)
    assert other.is_alive()  # it waits for the open transaction rather than remapping under it
    release.set()
    t.join(30)
    other.join(30)
    assert len(held) == len(holder) > 0  # the held transaction read its snapshot intact
    assert got and [c.chunk_id for c in got[0]] == list(range(len(reader))) and reader.version == 41
    holder.close()
    reader.close()


def test_a_full_reader_table_and_a_close_during_a_read_are_named_not_damage(tmp_path, embedder):
    """helper-53: 300 threads reading at once (LMDB's 126 reader slots) and ``close()`` while another
    thread read through the handle were both reported as a damaged file."""
    path = tmp_path / "s"
    rng = np.random.default_rng(0)
    with retrostore.create(path, embedder=embedder) as st:
        st.append(["some text " * 50], embeddings=_workers._unit(rng, len(st.chunker.chunk_many(["some text " * 50])[0])))
        st.commit()
    st = retrostore.open(path)
    slots = st._table.env.max_readers()
    entered, release = threading.Barrier(slots + 1), threading.Event()

    def holder():
        with st._table._begin():  # one reader slot each, as a thread inside a long read holds one
            entered.wait(30)
            release.wait(30)

    threads = [threading.Thread(target=holder) for _ in range(slots)]
    for t in threads:
        t.start()
    entered.wait(30)
    try:
        with pytest.raises(retrostore.ReadersFullError, match="reader table is full"):
            st.get_chunks([0])
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert st.get_chunks([0])[0].chunk_id == 0  # the slots are free again
    outcomes = []

    def reader():
        try:
            for _ in range(200):
                st.get_chunks(range(len(st)))
            outcomes.append("finished")
        except retrostore.StoreClosedError:
            outcomes.append("closed")
        except Exception as exc:  # pragma: no cover - the defect
            outcomes.append(repr(exc))

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.005)
    st.close()
    t.join(30)
    assert outcomes in (["closed"], ["finished"]), outcomes


def test_a_fork_during_another_threads_read_never_ends_the_parents_read(built_store, tmp_path):
    """helper-53: the child's open closed LMDB's inherited copy, which aborted the copy of a read the
    parent's other thread had open and cleared the parent's reader slot (shared memory): a writer
    could then reuse the pages under the parent's read. The child now gets ForkedStoreError, and the
    parent's slot stays."""
    path = tmp_path / "s"
    shutil.copytree(built_store, path)
    st = retrostore.open(path)
    entered, release = threading.Event(), threading.Event()

    def hold():
        with st._table._begin():
            entered.set()
            release.wait(60)

    t = threading.Thread(target=hold)
    t.start()
    assert entered.wait(10)
    mine = f" {os.getpid()} "
    try:
        assert mine in st._table.env.readers()

        def child():
            with pytest.raises(ForkedStoreError, match="forked while another thread of the parent was reading"):
                retrostore.open(path)

        _in_child(child, tmp_path / "child.log")
        assert mine in st._table.env.readers()  # the parent's read still holds its slot
    finally:
        release.set()
        t.join(30)
    assert st.get_chunks([0])[0].chunk_id == 0

    def child_after():  # with no read open at the fork, the child opens the store
        with retrostore.open(path) as again:
            assert again.get_chunks([0])[0].chunk_id == 0

    _in_child(child_after, tmp_path / "child2.log")
    st.close()


def test_threads_appending_through_one_handle_take_turns(tmp_path):
    """Appends, commits and a close from several threads of one writer handle: every document
    is stored once under its own ids, and each committed version verifies (helper-55: two
    threads staging at once got the same ids, and a committed version lacked 500 document records)."""
    from test_index import FakeEmbedder, _vectors

    rng = np.random.default_rng(0)
    st = retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index="IVF16,PQ8x4fs")
    st.append([f"seed {j}" for j in range(1200)], embeddings=_vectors(rng, 1200))
    st.commit()
    given: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        r = np.random.default_rng(k)
        try:
            for i in range(6):
                texts = [f"thread {k} part {i} doc {j}" for j in range(300)]
                given.update(zip(st.append(texts, embeddings=_vectors(r, len(texts))), texts))
                if i % 3 == 2:
                    st.commit()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    st.commit()
    assert st.verify() == []
    assert st.manifest["counts"]["documents"] == 1200 + 3 * 6 * 300
    assert len(given) == 3 * 6 * 300
    ids = sorted(given)
    assert [st.get_document(i).text for i in ids] == [given[i] for i in ids]
    st.close()
