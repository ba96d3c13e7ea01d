"""retrostore at scale, beside raw FAISS with the same factory, in one run (issues 17 and 19).

For each size (default 100k, 1M and 5M chunks; ``--long`` adds 10M) it builds,
from real chunk texts and clustered vectors with near-ties (``scale_data.py``;
nothing is embedded), streaming commits of 100,000 chunks:

* **the store**: ``retrostore.create(path)`` with every default (``index="auto"``),
  ``append(texts, embeddings=, chunks=)`` + ``commit()`` per batch;
* **raw FAISS**: what a user would write by hand with the factory string and search
  parameters the store ended with: the same training sample size, trained once on
  the first batch, each batch added; texts in LMDB (msgpack, as the peers' floor),
  the vectors in one float16 ``.npy`` file that re-ranks candidates exactly, as
  the store's raw vectors do; everything fsynced at the end;
* with ``--exact-max`` (default 1M) and above no other: **the exact mode**, a store
  created with ``index="Flat"``, against the numpy floor (float32 matrix in RAM,
  ``X @ q``, ``argpartition``, texts from LMDB).

and reports, store against raw FAISS: ingest time and ratio, commit time per
batch (the series, first after training and last), peak RSS of the ingest,
disk bytes per chunk by file kind, open time and first-query time after the
files were evicted from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``
per file after ``fsync``; median of rounds), single-query p50/p99 (both in one
process, taking turns in blocks of queries after a pause (``PAIR_BLOCKS``), each with one FAISS thread
for a single query as the store uses; k=10 with the chunk texts; a read-only
handle's first search merges a streamed store's segments in memory: the first
query after open is reported apart; the queries then run a second time: the first
pass includes the store's CRC-32 check of each raw-vectors block the first time
a query reads it, the second shows the same process once they are checked), recall@10
(tie-aware, against exact float32 search), the exact search's single-query
p50 (numpy on the float32 matrix) and the speed-up over it, the index's RAM per
vector (anonymous memory added by ``open``, in a fresh process), RSS after
1,000 queries (file-backed pages: the re-ranking's reads), and the time of
``verify`` and ``pack``. The exact mode is compared with the numpy floor
alternately, once on a quiet machine and once while a CPU-bound process runs.

Every measurement of a system runs in its own child process (``--child``), so
peak RSS, imports and caches are its own.

    python benchmarks/scale.py --quick              # 100k chunks, 200 queries: a few minutes
    python benchmarks/scale.py                      # 100k, 1M, 5M; about an hour on 2 cores
    python benchmarks/scale.py --sizes 1000000,5000000 --record
    python benchmarks/scale.py --long --record      # also 10M (hours; ~40 GB of disk while it runs)
    python benchmarks/scale.py --sizes 1000000 --index PQ32x4fs --index-params '{"rerank": 150}'
                                                    # a chosen index (the 16-byte recipe of docs/index.md)

Stores go to ``bench-out/scale`` (git-ignored) and are deleted after each size
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # retrostore itself: as installed, or a snapshot on PYTHONPATH

from _common import (PYDOCS, SAMPLE, TURN_PAUSE_S, PrecomputedOnly, busy_processes, machine,  # noqa: E402
                     print_machine, record, table, take_turns)
from scale_data import BLOCK, ClusteredVectors, TextPool  # noqa: E402

K = 10
CACHE_CHUNKS = HERE / ".cache" / "pydocs-chunks.json"


def _log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- process helpers -------------------------------------------------------------------------
def _status() -> dict:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "RssAnon", "RssFile", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def files_under(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, fs in os.walk(root) for f in fs]


def evict(root: Path) -> int:
    """fsync every file under ``root`` and drop its pages from the page cache; bytes evicted."""
    total = 0
    for p in files_under(root):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def fsync_tree(root: Path) -> None:
    for d, _, fs in os.walk(root):
        for f in fs:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        fd = os.open(d, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def disk_by_kind(root: Path) -> dict:
    """Allocated bytes by kind of file: index, raw vectors (+ block sums), texts (LMDB), other."""
    out = {"index": 0, "vectors": 0, "texts": 0, "other": 0}
    for p in files_under(root):
        rel = p.relative_to(root).as_posix()
        b = p.lstat().st_blocks * 512
        if rel.startswith("index/") or rel.endswith(".faiss"):
            out["index"] += b
        elif rel.startswith("vectors/") or rel == "vectors.npy":
            out["vectors"] += b
        elif ".lmdb" in rel:
            out["texts"] += b
        else:
            out["other"] += b
    return out


def run_child(role: str, spec: dict, out: Path, log: Path, env: dict | None = None, timeout: float = 6 * 3600) -> dict:
    spec_path = out.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", role, str(spec_path), str(out)]
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout,
                              env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"child {role} failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return json.loads(out.read_text())


# -- children ----------------------------------------------------------------------------------
def _data(spec: dict):
    return ClusteredVectors(seed=spec["seed"]), TextPool(CACHE_CHUNKS, Path(spec["corpus"]))


def child_ingest_store(spec: dict) -> dict:
    """Build the store with its defaults (or ``spec["index"]``), one commit per batch of whole documents."""
    import retrostore

    gen, pool = _data(spec)
    _reset_peak()
    append_s, commit_s, total = [], [], 0.0
    t0 = time.perf_counter()
    kwargs = {} if spec.get("index") is None else {"index": spec["index"]}
    if spec.get("index_params"):
        kwargs["index_params"] = spec["index_params"]
    st = retrostore.create(spec["path"], embedder=PrecomputedOnly(), **kwargs)
    total += time.perf_counter() - t0
    lo = 0
    for first, count, size in pool.plan(spec["n"], spec["batch"]):
        texts, chunks = pool.docs(first, count)
        vecs = gen.rows(lo, lo + size)  # generated outside the clock
        t1 = time.perf_counter()
        st.append(texts, embeddings=vecs, chunks=chunks)
        t2 = time.perf_counter()
        st.commit()
        t3 = time.perf_counter()
        append_s.append(t2 - t1)
        commit_s.append(t3 - t2)
        total += t3 - t1
        lo += size
        idx = st.manifest["index"]
        print(f"  {lo:,} chunks: append {t2 - t1:.2f} s, commit {t3 - t2:.2f} s, {idx['factory']}, "
              f"{len(idx['segments'])} segments", flush=True)
    t4 = time.perf_counter()
    m = st.manifest
    info = st.info()
    st.close()
    total += time.perf_counter() - t4
    return {"ingest_s": total, "append_s": append_s, "commit_s": commit_s, "chunks": lo,
            "peak_rss": _status()["VmHWM"], "factory": m["index"]["factory"], "params": m["index"]["params"],
            "trained": m["index"].get("trained"), "segments": len(m["index"]["segments"]),
            "pending": info["index"].get("pending"), "hint": info["index"].get("hint")}


def child_ingest_raw(spec: dict) -> dict:
    """Raw FAISS + LMDB + a float16 vectors file, with the store's factory, trained once on the first batch."""
    import faiss
    import lmdb
    import msgpack

    gen, pool = _data(spec)
    plan = pool.plan(spec["n"], spec["batch"])
    n, dim = sum(p[2] for p in plan), gen.dim
    root = Path(spec["path"])
    root.mkdir(parents=True)
    _reset_peak()
    per_batch, total = [], 0.0
    t0 = time.perf_counter()
    index = faiss.index_factory(dim, spec["factory"], faiss.METRIC_INNER_PRODUCT)
    env = lmdb.open(str(root / "texts.lmdb"), map_size=1 << 40, subdir=True)
    fh = open(root / "vectors.npy", "wb")
    np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                              "fortran_order": False, "shape": (n, dim)})
    total += time.perf_counter() - t0
    train_s, lo = 0.0, 0
    for first, count, size in plan:
        texts = pool.chunk_texts(first, count)
        vecs = gen.rows(lo, lo + size)
        t1 = time.perf_counter()
        if not index.is_trained:
            m = min(len(vecs), int(spec["train_size"]))
            rng = np.random.default_rng(0)
            index.train(vecs[np.sort(rng.choice(len(vecs), m, replace=False))])
            train_s = time.perf_counter() - t1
        index.add(vecs)
        fh.write(vecs.astype(np.float16).tobytes())
        with env.begin(write=True) as txn:
            txn.cursor().putmulti(((i.to_bytes(8, "big"), msgpack.packb({"t": t, "d": i}))
                                   for i, t in zip(range(lo, lo + size), texts)), append=True)
        per_batch.append(time.perf_counter() - t1)
        total += per_batch[-1]
        lo += size
    t2 = time.perf_counter()
    faiss.write_index(index, str(root / "index.faiss"))
    fh.close()
    env.sync(True)
    env.close()
    fsync_tree(root)
    total += time.perf_counter() - t2
    return {"ingest_s": total, "batch_s": per_batch, "train_s": train_s, "peak_rss": _status()["VmHWM"]}


class _StoreSystem:
    """The store's query path: ``search_vectors`` then ``get_chunks`` (the texts)."""

    def __init__(self, spec):
        import retrostore

        self.st = retrostore.open(spec["path"], embedder=PrecomputedOnly())

    def query(self, q):
        _, ids = self.st.search_vectors(q, K)
        row = ids[0]
        texts = [c.text for c in self.st.get_chunks(row[row >= 0])]
        return row, texts

    def batch(self, qs):
        _, ids = self.st.search_vectors(qs, K)
        return ids

    def close(self):
        self.st.close()


class _RawSystem:
    """raw FAISS: the index file, the float16 vectors memory-mapped for re-ranking, LMDB texts."""

    def __init__(self, spec):
        import faiss
        import lmdb
        import msgpack

        self.faiss, self.msgpack = faiss, msgpack
        root = Path(spec["path"])
        self.index = faiss.read_index(str(root / "index.faiss"))
        ps = faiss.ParameterSpace()
        params = spec["params"]
        for name, value in params.items():
            if name != "rerank":
                ps.set_index_parameter(self.index, name, float(value))
        self.rerank = int(params.get("rerank", 0) or 0)
        self.vecs = np.load(root / "vectors.npy", mmap_mode="r")
        self.env = lmdb.open(str(root / "texts.lmdb"), subdir=True, readonly=True, lock=False)
        self.threads = faiss.omp_get_max_threads()

    def _search(self, qs):
        kk = K * self.rerank if self.rerank > 1 else K
        _, ids = self.index.search(qs, kk)
        if self.rerank <= 1:
            return ids
        out = np.full((len(qs), K), -1, np.int64)
        for i, row in enumerate(ids):
            c = np.sort(row[row >= 0])
            s = self.vecs[c].astype(np.float32) @ qs[i]
            top = np.argsort(-s, kind="stable")[:K]
            out[i, : len(top)] = c[top]
        return out

    def query(self, q):
        self.faiss.omp_set_num_threads(1)  # one thread for a single query, as the store does
        try:
            row = self._search(q)[0]
        finally:
            self.faiss.omp_set_num_threads(self.threads)
        with self.env.begin() as txn:
            texts = [self.msgpack.unpackb(txn.get(int(i).to_bytes(8, "big")))["t"] for i in row if i >= 0]
        return row, texts

    def batch(self, qs):
        return self._search(qs)

    def close(self):
        self.env.close()


class _NumpyFloor:
    """Exact search by numpy on the float32 matrix in RAM, texts from the raw baseline's LMDB."""

    def __init__(self, spec):
        import lmdb
        import msgpack

        self.msgpack = msgpack
        self.x = _load_f32(Path(spec["raw"]) / "vectors.npy")
        self.env = lmdb.open(str(Path(spec["raw"]) / "texts.lmdb"), subdir=True, readonly=True, lock=False)

    def query(self, q):
        s = self.x @ q[0]
        top = np.argpartition(-s, K - 1)[:K]
        row = top[np.argsort(-s[top], kind="stable")]
        with self.env.begin() as txn:
            texts = [self.msgpack.unpackb(txn.get(int(i).to_bytes(8, "big")))["t"] for i in row]
        return row, texts

    def close(self):
        self.env.close()


def _load_f32(path: Path) -> np.ndarray:
    src = np.load(path, mmap_mode="r")
    x = np.empty(src.shape, np.float32)
    for lo in range(0, len(src), 500_000):
        x[lo : lo + 500_000] = src[lo : lo + 500_000]
    return x


SYSTEMS = {"store": _StoreSystem, "raw": _RawSystem, "floor": _NumpyFloor}


def child_cold(spec: dict) -> dict:
    """Open (after the caller evicted the files) and answer the first query."""
    import faiss  # noqa: F401  (imports are not the open's cost)
    import lmdb  # noqa: F401

    import retrostore  # noqa: F401

    q = np.load(spec["queries"])[:1]
    t0 = time.perf_counter()
    sysm = SYSTEMS[spec["system"]](spec)
    t1 = time.perf_counter()
    row, texts = sysm.query(q)
    t2 = time.perf_counter()
    sysm.close()
    return {"open_s": t1 - t0, "first_query_s": t2 - t1, "found": len(texts)}


def child_queries(spec: dict) -> dict:
    """One system alone: RSS of the open, every query once (ids for recall), RSS after them, a batch."""
    import faiss  # noqa: F401

    import retrostore  # noqa: F401

    qs = np.load(spec["queries"])
    s0 = _status()
    sysm = SYSTEMS[spec["system"]](spec)
    s1 = _status()
    found = np.full((len(qs), K), -1, np.int64)
    lat = []
    for i in range(len(qs)):
        t = time.perf_counter()
        row, _ = sysm.query(qs[i : i + 1])
        lat.append(time.perf_counter() - t)
        found[i, : len(row)] = row[:K]
    s2 = _status()
    t = time.perf_counter()
    sysm.batch(qs)
    batch_s = time.perf_counter() - t
    sysm.close()
    np.save(spec["found"], found)
    return {"before": s0, "opened": s1, "after": s2, "latency_s": lat, "batch_s": batch_s}


#: Paired runs: the systems take turns in this many blocks of queries (random order per block),
#: each block after a pause (``_common.take_turns``: the numpy floor's and the raw baseline's
#: re-ranking products leave OpenBLAS's threads spinning).
PAIR_BLOCKS = 10


def child_paired(spec: dict) -> dict:
    """Several systems in one process, taking turns in blocks of queries (after a warm-up).

    With ``passes`` 2 the queries run twice: the first pass is what a process sees after ``open``
    (the store checks each raw-vectors block's CRC-32 the first time a query reads it), the
    second what it sees once the blocks its queries read are checked (``latency_s`` holds the
    first pass, ``warm_latency_s`` the second).
    """
    qs = np.load(spec["queries"])[: spec.get("n_queries")]
    systems = {name: SYSTEMS[name]({**spec, **spec["specs"][name]}) for name in spec["order"]}
    for sysm in systems.values():
        for i in range(min(20, len(qs))):
            sysm.query(qs[i : i + 1])
    rng = np.random.default_rng(0)
    calls = {name: sysm.query for name, sysm in systems.items()}
    rows = [qs[i : i + 1] for i in range(len(qs))]
    with busy_processes(1) if spec.get("hog") else contextlib.nullcontext():
        passes = [take_turns(calls, rows, PAIR_BLOCKS, rng=rng) for _ in range(int(spec.get("passes", 1)))]
    for sysm in systems.values():
        sysm.close()
    out = {"latency_s": passes[0], "load_during": os.getloadavg()}
    if len(passes) > 1:
        out["warm_latency_s"] = passes[1]
    return out


def child_exact(spec: dict) -> dict:
    """Ground truth (exact top-k scores, float32 matrix) and the exact search's single-query latency."""
    import faiss

    x = _load_f32(Path(spec["raw"]) / "vectors.npy")
    qs = np.load(spec["queries"])
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index = faiss.IndexFlatIP(x.shape[1])
    t0 = time.perf_counter()
    scores = np.full((len(qs), K), -np.inf, np.float32)
    ids = np.full((len(qs), K), -1, np.int64)
    for lo in range(0, len(x), 1_000_000):  # top-k per block of rows, merged
        index.reset()
        index.add(x[lo : lo + 1_000_000])
        d, i = index.search(qs, K)
        i = np.where(i >= 0, i + lo, -1)
        s2, i2 = np.concatenate([scores, d], 1), np.concatenate([ids, i], 1)
        order = np.argsort(-s2, axis=1, kind="stable")[:, :K]
        scores, ids = np.take_along_axis(s2, order, 1), np.take_along_axis(i2, order, 1)
    truth_s = time.perf_counter() - t0
    np.savez(spec["truth"], scores=scores, ids=ids)
    return {"truth_s": truth_s}


def child_exact_latency(spec: dict) -> dict:
    """What exact search costs per single query: numpy on the float32 matrix (no FAISS in this process,
    whose OpenMP threads would still be spinning after the ground truth's parallel search)."""
    x = _load_f32(Path(spec["raw"]) / "vectors.npy")
    qs = np.load(spec["queries"])
    lat = []
    for i in range(spec["exact_queries"] + 3):
        t = time.perf_counter()
        s = x @ qs[i]
        top = np.argpartition(-s, K - 1)[:K]
        top[np.argsort(-s[top])]
        lat.append(time.perf_counter() - t)
    return {"exact_latency_s": lat[3:]}  # the first 3 warm up


def child_verify_pack(spec: dict) -> dict:
    import retrostore

    t0 = time.perf_counter()
    with retrostore.open(spec["path"], embedder=PrecomputedOnly()) as st:
        problems = st.verify()
    t1 = time.perf_counter()
    out = Path(spec["pack"])
    retrostore.pack(spec["path"], out)
    t2 = time.perf_counter()
    size = out.stat().st_size
    out.unlink()
    return {"verify_s": t1 - t0, "problems": [str(p) for p in problems], "pack_s": t2 - t1, "pack_bytes": size}


def child_compact(spec: dict) -> dict:
    """``Store.compact()`` after the ingest (``--compact``): what ``retrostore build`` ends with."""
    import retrostore

    with retrostore.open(spec["path"], mode="a", embedder=PrecomputedOnly()) as st:
        before = len(st.manifest["index"]["segments"])
        t0 = time.perf_counter()
        st.compact(progress=False)
        seconds = time.perf_counter() - t0
        return {"compact_s": seconds, "segments_before": before, "segments": len(st.manifest["index"]["segments"])}


CHILDREN = {"compact": child_compact, "ingest-store": child_ingest_store, "ingest-raw": child_ingest_raw, "cold": child_cold,
            "queries": child_queries, "paired": child_paired, "exact": child_exact,
            "exact-latency": child_exact_latency,
            "verify-pack": child_verify_pack}


# -- recall -------------------------------------------------------------------------------------
def _rows_by_id(gen: ClusteredVectors, ids: np.ndarray) -> np.ndarray:
    """Vectors of many ids (sorted by block, so each block is generated once)."""
    out = np.empty((len(ids), gen.dim), np.float32)
    order = np.argsort(ids // BLOCK, kind="stable")
    for i in order:
        out[i] = gen.block(int(ids[i]) // BLOCK)[int(ids[i]) % BLOCK]
    return out


def recall(found: np.ndarray, gen: ClusteredVectors, qs: np.ndarray, truth_scores: np.ndarray) -> float:
    """Tie-aware recall@k against exact search over the vectors as stored (float16, as both systems
    re-rank them): a distinct returned id counts when its exact score reaches the k-th exact score - 1e-5."""
    flat = found.ravel()
    valid = flat >= 0
    vecs = np.zeros((len(flat), gen.dim), np.float32)
    vecs[valid] = _rows_by_id(gen, flat[valid]).astype(np.float16)  # the values stored (float16), as the truth
    s = np.einsum("qkd,qd->qk", vecs.reshape(found.shape + (gen.dim,)), qs)
    hits = 0
    for i, row in enumerate(found):
        ok = row >= 0
        _, first = np.unique(row[ok], return_index=True)
        hits += min(K, int((s[i][ok][first] >= truth_scores[i, K - 1] - 1e-5).sum()))
    return hits / (K * len(found))


# -- one size ---------------------------------------------------------------------------------
def run_size(n: int, args, root: Path, log: Path) -> dict:
    gen = ClusteredVectors(seed=args.seed)
    d = root / f"n{n}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    qpath = d / "queries.npy"
    qs = gen.queries(args.queries)
    np.save(qpath, qs)
    base = {"seed": args.seed, "corpus": str(args.corpus), "n": n, "batch": args.batch}
    store, raw, flat = d / "store.rstore", d / "raw", d / "flat.rstore"
    res: dict = {"n": n}

    _log(f"{n:,}: ingest, store ({'defaults' if args.index is None else 'index=' + repr(args.index)})")
    res["store_ingest"] = run_child("ingest-store", {**base, "path": str(store), "index": args.index,
                                                     "index_params": args.index_params},
                                    d / "ingest-store.json", log)
    s = res["store_ingest"]
    _log(f"  {s['ingest_s']:.1f} s -> {s['factory']} {s['params']}, {s['segments']} segments")
    if args.compact:
        _log(f"{n:,}: compact the store (one segment, as a build ends)")
        res["compact"] = run_child("compact", {"path": str(store)}, d / "compact.json", log)
        s["segments"] = res["compact"]["segments"]
        _log(f"  {res['compact']['compact_s']:.1f} s: {res['compact']['segments_before']} -> "
             f"{res['compact']['segments']} segments")
    trained = s.get("trained") or {}
    train_size = int(trained.get("sample") or 0) or BLOCK
    _log(f"{n:,}: ingest, raw FAISS {s['factory']}")
    res["raw_ingest"] = run_child("ingest-raw", {**base, "path": str(raw), "factory": s["factory"],
                                                 "train_size": train_size}, d / "ingest-raw.json", log)
    _log(f"  {res['raw_ingest']['ingest_s']:.1f} s")
    res["disk"] = {"store": disk_by_kind(store), "raw": disk_by_kind(raw)}
    sys_specs = {"store": {"path": str(store)}, "raw": {"path": str(raw), "params": s["params"]}}

    _log(f"{n:,}: exact ground truth and exact latency")
    truth = d / "truth.npz"
    res["exact"] = run_child("exact", {"raw": str(raw), "queries": str(qpath), "truth": str(truth)},
                             d / "exact.json", log)
    res["exact"].update(run_child("exact-latency", {"raw": str(raw), "queries": str(qpath),
                                                    "exact_queries": args.exact_queries}, d / "exact-latency.json", log))
    truth_scores = np.load(truth)["scores"]

    _log(f"{n:,}: cold open + first query ({args.cold_rounds} rounds, files evicted before each)")
    res["cold"] = {"store": [], "raw": []}
    for r in range(args.cold_rounds):
        for name in (("store", "raw") if r % 2 == 0 else ("raw", "store")):
            path = store if name == "store" else raw
            evicted = evict(path)
            out = run_child("cold", {"system": name, "queries": str(qpath), **sys_specs[name]},
                            d / f"cold-{name}-{r}.json", log)
            out["evicted_bytes"] = evicted
            res["cold"][name].append(out)
    _log("  store: " + ", ".join(f"{c['open_s']:.3f}+{c['first_query_s']:.3f}" for c in res["cold"]["store"])
         + " s; raw: " + ", ".join(f"{c['open_s']:.3f}+{c['first_query_s']:.3f}" for c in res["cold"]["raw"]) + " s")

    _log(f"{n:,}: {args.queries} queries per system alone (recall, RSS)")
    res["queries"] = {}
    for name in ("store", "raw"):
        found = d / f"found-{name}.npy"
        res["queries"][name] = run_child("queries", {"system": name, "queries": str(qpath), "found": str(found),
                                                     **sys_specs[name]}, d / f"queries-{name}.json", log)
        res["queries"][name]["recall"] = recall(np.load(found), gen, qs, truth_scores)
        _log(f"  {name}: recall@10 {res['queries'][name]['recall']:.4f}, "
             f"p50 {np.median(res['queries'][name]['latency_s']) * 1e3:.2f} ms")

    _log(f"{n:,}: paired latency, store and raw FAISS alternating")
    res["paired"] = run_child("paired", {"queries": str(qpath), "order": ["store", "raw"], "specs": sys_specs,
                                         "passes": 2},
                              d / "paired.json", log)

    if n <= args.exact_max:
        _log(f"{n:,}: exact mode (index='Flat') against the numpy floor")
        res["flat_ingest"] = run_child("ingest-store", {**base, "path": str(flat), "index": "Flat"},
                                       d / "ingest-flat.json", log)
        specs = {"store": {"path": str(flat)}, "floor": {"raw": str(raw)}}
        nq = min(args.queries, args.exact_pair_queries)
        res["exact_mode"] = {}
        for hog in (False, True):
            key = "busy" if hog else "quiet"
            res["exact_mode"][key] = run_child("paired", {"queries": str(qpath), "order": ["store", "floor"],
                                                          "specs": specs, "hog": hog, "n_queries": nq},
                                               d / f"exact-mode-{key}.json", log)
            lat = res["exact_mode"][key]["latency_s"]
            _log(f"  {key}: Flat store p50 {np.median(lat['store']) * 1e3:.2f} ms, numpy floor "
                 f"{np.median(lat['floor']) * 1e3:.2f} ms")
        shutil.rmtree(flat, ignore_errors=True)

    if not args.no_pack:
        _log(f"{n:,}: verify and pack")
        res["verify_pack"] = run_child("verify-pack", {"path": str(store), "pack": str(d / "pack.rstore.tar")},
                                       d / "verify-pack.json", log)
    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(raw, ignore_errors=True)
    return res


# -- report -------------------------------------------------------------------------------------
def _mb(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def summarize(r: dict) -> dict:
    """The figures of one size (what the tables and the goals read)."""
    s, w = r["store_ingest"], r["raw_ingest"]
    n = int(s.get("chunks") or r["n"])  # whole documents: the store holds at least the size asked for
    trained = s.get("trained") or {}
    t_commit = (trained.get("version") or 1) - 1  # the commit that trained (versions count from 1)
    after = s["commit_s"][t_commit + 1:] if t_commit + 1 < len(s["commit_s"]) else []
    cold = {k: (float(np.median([c["open_s"] for c in v])), float(np.median([c["first_query_s"] for c in v])))
            for k, v in r["cold"].items()}
    pl = r["paired"]["latency_s"]
    q = r["queries"]
    anon = q["store"]["opened"]["RssAnon"] - q["store"]["before"]["RssAnon"]
    file_q = q["store"]["after"]["RssFile"] - q["store"]["opened"]["RssFile"]
    exact_p50 = float(np.median(r["exact"]["exact_latency_s"]))
    out = {
        "n": n, "factory": s["factory"], "params": s["params"], "segments": s["segments"],
        "ingest_s": s["ingest_s"], "raw_ingest_s": w["ingest_s"], "ingest_ratio": s["ingest_s"] / w["ingest_s"],
        "commit_first_after_training": after[0] if after else None, "commit_last": s["commit_s"][-1],
        "commit_ratio": (s["commit_s"][-1] / after[0]) if after else None,
        "commit_max": max(s["commit_s"]), "commit_median": float(np.median(s["commit_s"])),
        "training_commit_s": s["commit_s"][t_commit] if s["commit_s"] else None,
        "peak_rss": s["peak_rss"], "raw_peak_rss": w["peak_rss"],
        "open_s": cold["store"][0], "first_query_s": cold["store"][1],
        "raw_open_s": cold["raw"][0], "raw_first_query_s": cold["raw"][1],
        "first_query_ratio": cold["store"][1] / cold["raw"][1],
        "p50": float(np.median(pl["store"])), "p99": float(np.percentile(pl["store"], 99)),
        "raw_p50": float(np.median(pl["raw"])), "raw_p99": float(np.percentile(pl["raw"], 99)),
        "recall": q["store"]["recall"], "raw_recall": q["raw"]["recall"],
        "exact_p50": exact_p50,
        "index_ram_per_vector": anon / n,
        "anon_added_by_queries": q["store"]["after"]["RssAnon"] - q["store"]["opened"]["RssAnon"],
        "first_query_warm": q["store"]["latency_s"][0], "raw_first_query_warm": q["raw"]["latency_s"][0],
        "rss_after_open": q["store"]["opened"]["VmRSS"], "rss_after_queries": q["store"]["after"]["VmRSS"],
        "file_rss_per_query": file_q / max(1, len(q["store"]["latency_s"])),
        "disk": r["disk"],
        "batch_qps": len(q["store"]["latency_s"]) / q["store"]["batch_s"],
        "raw_batch_qps": len(q["raw"]["latency_s"]) / q["raw"]["batch_s"],
    }
    out["p50_ratio"] = out["p50"] / out["raw_p50"]
    warm = r["paired"].get("warm_latency_s")
    if warm:
        out["warm_p50"], out["raw_warm_p50"] = float(np.median(warm["store"])), float(np.median(warm["raw"]))
        out["warm_p50_ratio"] = out["warm_p50"] / out["raw_warm_p50"]
    out["speedup_vs_exact"] = exact_p50 / out["p50"]
    if "verify_pack" in r:
        out.update(verify_s=r["verify_pack"]["verify_s"], pack_s=r["verify_pack"]["pack_s"],
                   verify_problems=len(r["verify_pack"]["problems"]))
    if "compact" in r:
        out["compact_s"] = r["compact"]["compact_s"]
    if "exact_mode" in r:
        for key, v in r["exact_mode"].items():
            lat = v["latency_s"]
            out[f"flat_{key}"] = (float(np.median(lat["store"])), float(np.median(lat["floor"])))
    return out


def _record_key(args) -> tuple[str, str]:
    if args.compact:
        return "scale-compacted", "scale: the default store, compacted after the ingest, against raw FAISS"
    return "scale", "scale: the default store against raw FAISS with the same factory"


def render(results: list[dict], info: dict, args) -> str:
    sums = [summarize(r) for r in results]
    lines = [f"Data: {ClusteredVectors(seed=args.seed).describe()}; texts: {info['texts']}. "
             f"Commits of whole documents, {args.batch:,} chunks each (the last document may pass it); "
             f"{args.queries} queries (fresh draws, not in the store), k = {K}, "
             f"with their texts. Store: " + ("every default (`index=\"auto\"`)" if args.index is None else
                                             f"`index={args.index!r}`, `index_params={args.index_params}` (not the default)")
             + ". raw FAISS: the store's final factory and "
             f"search parameters, trained once on the first batch with the store's sample size, float16 vectors "
             f"file for re-ranking, LMDB texts. Cold: files evicted with `posix_fadvise(DONTNEED)` after "
             f"`fsync`, median of {args.cold_rounds} rounds. Latency: both in one process, taking turns in {PAIR_BLOCKS} blocks of queries (random order), each after a {TURN_PAUSE_S:g} s pause, after 20 warm-up queries each (the store's "
             f"first, a read-only handle's, merged its segments in memory). ",
             ""]
    hdr = ["chunks"] + [f"{s['n']:,}" for s in sums]

    def row(label, fn):
        return [label] + [fn(s) for s in sums]

    rows = [
        row("index (defaults)" if args.index is None else "index (chosen)", lambda s: f"`{s['factory']}` {json.dumps(s['params'])}, {s['segments']} segments"
            + (f" (compacted after the ingest in {s['compact_s']:.1f} s)" if "compact_s" in s else "")),
        row("ingest s: store / raw FAISS", lambda s: f"{s['ingest_s']:.1f} / {s['raw_ingest_s']:.1f} = **{s['ingest_ratio']:.2f}x**"),
        row("commit s per batch: training / first after / last (ratio) / max", lambda s: (
            f"{s['training_commit_s']:.1f} / " + (f"{s['commit_first_after_training']:.2f} / {s['commit_last']:.2f} "
                                                f"(**{s['commit_ratio']:.2f}x**) / {s['commit_max']:.2f}"
                                                if s['commit_ratio'] else "- (one commit)"))),
        row("peak RSS of ingest MiB: store / raw", lambda s: f"{_mb(s['peak_rss'])} / {_mb(s['raw_peak_rss'])}"),
        row("disk B/chunk store: index / vectors / texts / other", lambda s: " / ".join(
            f"{s['disk']['store'][k] / s['n']:.1f}" for k in ("index", "vectors", "texts", "other"))),
        row("disk B/chunk raw: index / vectors / texts", lambda s: " / ".join(
            f"{s['disk']['raw'][k] / s['n']:.1f}" for k in ("index", "vectors", "texts"))),
        row("cold open s: store / raw", lambda s: f"{s['open_s']:.3f} / {s['raw_open_s']:.3f}"),
        row("cold first query s: store / raw", lambda s: f"{s['first_query_s']:.3f} / {s['raw_first_query_s']:.3f} = **{s['first_query_ratio']:.2f}x**"),
        row("single query p50 ms: store / raw (ratio)", lambda s: f"{s['p50'] * 1e3:.2f} / {s['raw_p50'] * 1e3:.2f} (**{s['p50_ratio']:.2f}x**)"),
        row("single query p99 ms: store / raw", lambda s: f"{s['p99'] * 1e3:.2f} / {s['raw_p99'] * 1e3:.2f}"),
        row("same queries again, p50 ms: store (raw-vector blocks read already checked) / raw", lambda s: (
            f"{s['warm_p50'] * 1e3:.2f} / {s['raw_warm_p50'] * 1e3:.2f} ({s['warm_p50_ratio']:.2f}x)"
            if "warm_p50" in s else "-")),
        row("exact search p50 ms (numpy, float32 in RAM); store speed-up", lambda s: f"{s['exact_p50'] * 1e3:.1f}; **{s['speedup_vs_exact']:.0f}x**"),
        row("recall@10: store / raw", lambda s: f"**{s['recall']:.4f}** / {s['raw_recall']:.4f}"),
        row("index RAM B/vector (anon. memory of open); anon. MiB added by the queries (and merge)", lambda s: (
            f"**{s['index_ram_per_vector']:.1f}**; {s['anon_added_by_queries'] / 2**20:+.1f}")),
        row("first query after open, files cached, s: store (merges the segments in memory) / raw", lambda s: (
            f"{s['first_query_warm']:.3f} / {s['raw_first_query_warm']:.3f}")),
        row("RSS MiB after open / after queries", lambda s: f"{_mb(s['rss_after_open'])} / {_mb(s['rss_after_queries'])}"),
        row("file-backed RSS added per query KiB (re-ranking reads)", lambda s: f"{s['file_rss_per_query'] / 1024:.0f}"),
        row("batch q/s (all queries, one call): store / raw", lambda s: f"{s['batch_qps']:.0f} / {s['raw_batch_qps']:.0f}"),
    ]
    if any("verify_s" in s for s in sums):
        rows.append(row("verify s / pack s", lambda s: f"{s['verify_s']:.1f} / {s['pack_s']:.1f}" if "verify_s" in s else "-"))
    if any("flat_quiet" in s for s in sums):
        rows.append(row("exact mode p50 ms: Flat store / numpy floor, quiet", lambda s: (
            f"{s['flat_quiet'][0] * 1e3:.2f} / {s['flat_quiet'][1] * 1e3:.2f} (**{_ratio(*s['flat_quiet'])}**)" if "flat_quiet" in s else "-")))
        rows.append(row("same with a CPU-bound process running", lambda s: (
            f"{s['flat_busy'][0] * 1e3:.2f} / {s['flat_busy'][1] * 1e3:.2f} (**{_ratio(*s['flat_busy'])}**)" if "flat_busy" in s else "-")))
    lines.append(table(hdr, rows))
    lines.append("")
    lines.append("Commit seconds per batch (store), in order: ")
    for r in results:
        lines.append(f"* {r['n']:,}: " + ", ".join(f"{c:.1f}" for c in r["store_ingest"]["commit_s"]))
    lines.append("")
    lines.append("Goals (issue 17 at 1M and 5M, issue 19): " + "; ".join(_goals(s) for s in sums))
    return "\n".join(lines)


def _goals(s: dict) -> str:
    def ok(c):
        return "met" if c else "NOT met"

    parts = [f"recall {s['recall']:.3f} >= 0.99 {ok(s['recall'] >= 0.99)}",
             f"p50 {s['p50_ratio']:.2f}x raw <= 1.5x {ok(s['p50_ratio'] <= 1.5)}",
             f"{s['speedup_vs_exact']:.0f}x exact >= 20x {ok(s['speedup_vs_exact'] >= 20)}",
             f"index RAM {s['index_ram_per_vector']:.1f} <= 17 B {ok(s['index_ram_per_vector'] <= 17)}",
             f"ingest {s['ingest_ratio']:.2f}x raw <= 1.3x {ok(s['ingest_ratio'] <= 1.3)}",
             f"first query {s['first_query_ratio']:.2f}x raw <= 1.5x {ok(s['first_query_ratio'] <= 1.5)}"]
    if s["commit_ratio"]:
        parts.append(f"last commit {s['commit_ratio']:.2f}x first after training <= 1.5x {ok(s['commit_ratio'] <= 1.5)}")
    for key in ("flat_quiet", "flat_busy"):
        if key in s:
            rr = s[key][0] / s[key][1]
            parts.append(f"exact mode {key[5:]} {rr:.2f}x floor <= 1.1x {ok(rr <= 1.1)}")
    return f"**{s['n']:,}**: " + ", ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000,5000000", help="store sizes in chunks, comma-separated")
    ap.add_argument("--quick", action="store_true", help="100k chunks, 200 queries, 2 cold rounds")
    ap.add_argument("--long", action="store_true", help="also 10M chunks (hours, ~40 GB of disk)")
    ap.add_argument("--batch", type=int, default=100_000, help="chunks per commit (default 100,000)")
    ap.add_argument("--queries", type=int, default=1000, help="queries (default 1000)")
    ap.add_argument("--exact-queries", type=int, default=20, help="single queries timed for the exact search")
    ap.add_argument("--exact-max", type=int, default=1_000_000, help="largest size with the exact-mode comparison")
    ap.add_argument("--exact-pair-queries", type=int, default=300, help="queries of the exact-mode comparison")
    ap.add_argument("--cold-rounds", type=int, default=3, help="cold open + first query rounds per system")
    ap.add_argument("--no-pack", action="store_true", help="skip verify and pack")
    ap.add_argument("--compact", action="store_true",
                    help="compact the store after the ingest (one segment, as `retrostore build` ends); "
                         "recorded apart (docs/benchmarks.md, scale-compacted)")
    ap.add_argument("--index", default=None,
                    help="a factory string for the store instead of the default (e.g. PQ32x4fs: docs/index.md); "
                         "not with --record, whose section is the defaults'")
    ap.add_argument("--index-params", type=json.loads, default=None, metavar="JSON",
                    help='the store\'s index_params with --index, e.g. \'{"rerank": 150}\'')
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", type=Path, default=PYDOCS if PYDOCS.is_file() else SAMPLE,
                    help="chunk texts when benchmarks/.cache has none (default pydocs)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "scale")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument("--record", action="store_true", help="write the results into docs/benchmarks.md")
    ap.add_argument("--report-only", action="store_true", help="re-render from OUT/results.json")
    ap.add_argument("--child", nargs=3, metavar=("ROLE", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        role, spec, out = args.child
        res = CHILDREN[role](json.loads(Path(spec).read_text()))
        Path(out).write_text(json.dumps(res))
        return 0
    if args.index is not None and args.record:
        ap.error("--record writes the defaults' section of docs/benchmarks.md; run --index without it")
    if args.quick:
        args.sizes, args.queries, args.cold_rounds = "100000", min(args.queries, 200), 2
    sizes = [int(x) for x in args.sizes.split(",") if x]
    if args.long and 10_000_000 not in sizes:
        sizes.append(10_000_000)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        saved = json.loads((args.out / "results.json").read_text())
        report = render(saved["results"], saved["info"], args)
        print(report)
        if args.record:
            record(*_record_key(args), report, saved["info"]["machine"])
        return 0
    info = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print_machine(info["machine"])
    info["texts"] = TextPool(CACHE_CHUNKS, args.corpus).source
    log = args.out / "children.log"
    log.write_text("")
    results = []
    for n in sizes:
        results.append(run_size(n, args, args.out, log))
        (args.out / "results.json").write_text(json.dumps({"info": info, "results": results}, default=str))
    info["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    (args.out / "results.json").write_text(json.dumps({"info": info, "results": results}, default=str))
    report = render(results, info, args)
    print(report)
    if args.record:
        record(*_record_key(args), report, info["machine"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
