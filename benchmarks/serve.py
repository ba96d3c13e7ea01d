"""Serving: retrostore serve against in-process search and a Flask + FAISS + LMDB baseline.

What is measured
----------------
The same real query texts (sentences sampled with a fixed seed from pydocs
documents that are not in the store), k = 5, answered by:

* **in-process** (the floor per query): ``store.search(q, k=5)`` one call at a
  time in this process;
* **retrostore serve** (one worker, default settings): ``POST /v1/search``
  ``{"query": q, "k": 5}``, answered with the full hits (text, token ids,
  continuation and its tokens, document metadata) by a batching server;
* **Flask baseline**: ``benchmarks/_flask_baseline.py``, a minimal Flask app
  answering massive-serve's ``POST /search`` ``{"query": q, "n_docs": 5}``
  one request at a time (embed, FAISS ``IndexFlatIP`` search, LMDB passages),
  with the same model and the same vectors, threads=2 like the server.

Both servers run during the whole benchmark. With one client (C = 1), blocks
of 24 queries are asked of the three systems in turn, the order rotating, for
3 x ``--seconds`` (the first 4 of each block not counted): paired samples, so
that the machine's load swings hit all three alike; retrostore serve is asked through ``retrostore.connect(url).search(q,
k=5)`` (the project's client: the same call and return type as in-process),
the Flask baseline through the same transport (a urllib3 keep-alive
connection); each latency is timed around the query alone. With C = 8 and 32,
C client threads, each with its own keep-alive urllib3 connection, send one
query after another for ``--seconds`` (after a warm-up second), serve and
Flask alternating. The levels run in ``--rounds``
rounds; each cell reports the round with the median throughput. Reported per
cell: throughput (answers/s), p50 and p99 latency (ms), the server's CPU time
per answer (all its threads; less sensitive to other jobs on the machine than
wall time), failed requests. Targets (issue #18): at 32 clients retrostore serve >= 3x the Flask
baseline's throughput; at 1 client its p50 within 1.3x of in-process.

Memory (``--memory``, on by default): ``retrostore serve`` started with 1, 2
and 4 workers, each worker warmed up, then the RSS and PSS of every worker
process (``/proc/PID/smaps_rollup``; PSS splits shared pages among the
processes that map them), with the index memory-mapped (``--mmap``) and not.

Stores: the first ``--docs`` (default 100) pydocs documents, embedded once;
the store and the baseline's FAISS index and LMDB are built from the same
vectors into ``--work-dir`` and reused. Then the same measurements on a store
of ``--big-chunks`` (default 200,000) chunks: those documents copied over and
over, each chunk with a random unit vector (and the baseline's files of the
same vectors), where exact search costs more than embedding a query and where
the index is large enough for memory mapping to show.

The machine is shared and noisy: read the ratios of one run, not absolute
numbers between runs. ``--record`` writes the result into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import _common as C

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/retrostore-bench-serve",
                   help="where the store and the baseline's files are built once and reused")
    p.add_argument("--corpus", help="input .jsonl[.gz|.zst] (default: pydocs, else examples/pydocs-sample)")
    p.add_argument("--docs", type=int, default=100, help="documents in the built store (default 100)")
    p.add_argument("--queries", type=int, default=512, help="query texts (default 512)")
    p.add_argument("--k", type=int, default=5, help="neighbours per query (default 5)")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels (default 1,8,32)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell (default 10)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the concurrency levels (default 2)")
    p.add_argument("--threads", type=int, default=2, help="FAISS/onnxruntime threads of every system (default 2)")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra argument for retrostore serve, e.g. --serve-arg=--batch-window-ms=1 (repeatable)")
    p.add_argument("--load", action=argparse.BooleanOptionalAction, default=True,
                   help="measure throughput and latency under load (default on)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure RSS/PSS per worker with 1, 2, 4 workers (default on)")
    p.add_argument("--workers", default="1,2,4", help="worker counts of the memory section (default 1,2,4)")
    p.add_argument("--big-chunks", type=int, default=200_000,
                   help="load and memory are also measured on a store this large, where exact search costs more "
                        "than embedding a query: the benchmark's documents copied over and over with random unit "
                        "vectors (default 200000; 0 = only the benchmark store)")
    p.add_argument("--quick", action="store_true", help="a short run: 3 s cells, one round, 200 queries")
    p.add_argument("--record", action="store_true", help="write the results into docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds, args.queries = 3.0, 1, 200
    args.clients = [int(x) for x in args.clients.split(",")]
    args.workers = [int(x) for x in args.workers.split(",")]
    return args


# -- the store and the baseline's files ---------------------------------------------
def write_baseline(work: Path, name: str, vecs, texts: list[str], chunks: list[list]) -> None:
    """The baseline's files: a float32 ``IndexFlatIP`` of ``vecs`` and an LMDB of chunk id -> text."""
    import faiss
    import lmdb
    import msgpack

    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    faiss.write_index(index, str(work / f"{name}.faiss"))
    env = lmdb.open(str(work / f"{name}.lmdb"), map_size=1 << 34)
    with env.begin(write=True) as txn:
        cid = 0
        for doc_id, (text, per) in enumerate(zip(texts, chunks)):
            for c in per:
                txn.put(cid.to_bytes(8, "big"), msgpack.packb({"s": text[c.start:c.end], "d": doc_id}))
                cid += 1
    env.close()
    assert cid == len(vecs)


def prepare(work: Path, docs: list[tuple[str, dict | None]]) -> Path:
    """The store of ``docs`` and the baseline's index and LMDB, from one embedding pass (cached)."""
    import shutil

    import retrostore

    store = work / "bench.rstore"
    stamp = work / "prepared.json"
    want = {"docs": len(docs), "chars": sum(len(t) for t, _ in docs)}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return store
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    texts = [t for t, _ in docs]
    with retrostore.create(store) as st:
        chunks = st.chunker.chunk_many(texts)
        flat = [c for per in chunks for c in per]
        vecs = st.embedder.embed_token_ids([c.token_ids for c in flat])  # what append would compute
        st.append(texts, metadata=[m for _, m in docs], embeddings=vecs, chunks=chunks)
        st.commit()
        n = len(st)
    write_baseline(work, "baseline", vecs, texts, chunks)
    stamp.write_text(json.dumps(want))
    print(f"built {store} and the baseline's files: {len(docs)} documents, {n} chunks in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return store


def prepare_big(work: Path, docs: list[tuple[str, dict | None]], n_chunks: int) -> Path:
    """A store of about ``n_chunks`` chunks where exact search costs more than embedding a query:
    ``docs`` appended again and again, each chunk with a random unit vector (an exact Flat index,
    float16 on disk), and the baseline's files of the same vectors (``big{n_chunks}.faiss`` /
    ``.lmdb``). Cached."""
    import shutil

    import numpy as np

    import retrostore

    path = work / f"big{n_chunks}.rstore"
    stamp = work / f"big{n_chunks}.json"
    if stamp.exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    texts = [t for t, _ in docs]
    rng = np.random.default_rng(0)
    all_vecs, all_texts, all_chunks = [], [], []
    with retrostore.create(path, index="Flat") as st:
        per = st.chunker.chunk_many(texts)
        n = sum(map(len, per))
        for copy in range(-(-n_chunks // n)):
            vecs = rng.standard_normal((n, st.info()["dim"])).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            st.append(texts, metadata=[{"copy": copy, **(m or {})} for _, m in docs], embeddings=vecs, chunks=per)
            all_vecs.append(vecs)
            all_texts += texts
            all_chunks += per
            if copy % 8 == 7:
                st.commit()
        st.commit()
        total = len(st)
    write_baseline(work, f"big{n_chunks}", np.concatenate(all_vecs), all_texts, all_chunks)
    stamp.write_text(json.dumps({"chunks": total}))
    print(f"built {path}: {total} chunks (random vectors) and its baseline in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return path


# -- servers -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(argv: list[str], url: str, log: Path) -> subprocess.Popen:
    import httpx

    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise SystemExit(f"server did not start:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def serve_argv(store: Path, port: int, threads: int, extra: list[str], workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "retrostore", "serve", str(store), "--port", str(port), "--threads", str(threads),
            "--workers", str(workers), *extra]


# -- load ------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def transport(urllib3):
    """The urllib3 pool class ``retrostore.connect`` uses (headers and body written in one send): the
    baseline and the load clients are asked through the same transport as the project's client."""
    from retrostore.serve.client import _one_write_pools

    return _one_write_pools(urllib3)["http"]


def load(url: str, path: str, bodies: list[bytes], clients: int, seconds: float, pid: int) -> dict:
    """``clients`` threads, each on its own keep-alive connection (urllib3), for 1 s + ``seconds``;
    the server's CPU time (process ``pid``) over the measured ``seconds`` too."""
    import urllib3

    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    barrier = threading.Barrier(clients + 1)
    times: dict[str, float] = {}

    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)

    def client(i: int) -> None:
        with transport(urllib3)(host, int(port), maxsize=1, timeout=120, retries=False,
                                headers={"Content-Type": "application/json"}) as c:
            j = i * 997
            barrier.wait()
            while True:
                now = time.perf_counter()
                if now >= times["end"]:
                    break
                body = bodies[j % len(bodies)]
                j += 1
                t0 = time.perf_counter()
                try:
                    res = c.request("POST", path, body=body)
                    ok = res.status == 200 and json.loads(res.data)["results"]
                except Exception:  # noqa: BLE001 - counted as a failed request
                    ok = False
                t1 = time.perf_counter()
                if t0 >= times["start"] and t1 <= times["end"]:
                    if ok:
                        latencies[i].append(t1 - t0)
                    else:
                        errors[i] += 1
                elif not ok:
                    errors[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    now = time.perf_counter()
    times["start"], times["end"] = now + 1.0, now + 1.0 + seconds
    barrier.wait()
    time.sleep(max(0.0, times["start"] - time.perf_counter()))
    cpu0 = cpu_seconds(pid)
    time.sleep(max(0.0, times["end"] - time.perf_counter()))
    cpu1 = cpu_seconds(pid)
    for t in threads:
        t.join()
    lat = [x for per in latencies for x in per]
    return {"qps": len(lat) / seconds, "p50": C.pct(lat, 50) if lat else float("nan"),
            "p99": C.pct(lat, 99) if lat else float("nan"), "n": len(lat), "errors": sum(errors),
            "cpu_ms": (cpu1 - cpu0) * 1e3 / max(1, len(lat))}


#: One client: queries per block of one system, and the first ones of each block left out (the
#: system's caches after the others ran, and a spinning server's threads still busy meanwhile).
BLOCK, BLOCK_SKIP = 24, 4


def paired_one_client(systems: list[tuple[str, object]], queries: list[str], seconds: float) -> dict:
    """One client: blocks of :data:`BLOCK` queries asked of one system, the systems taking turns
    (order rotating) for ``seconds`` in all, so that the machine's load swings hit every system
    alike while each answers a run of queries as a lone client's would be; the first
    :data:`BLOCK_SKIP` of each block are not counted (one system's work, such as a server's
    onnxruntime threads spinning after its answer, never lands on another's samples).
    ``systems``: (name, call) where ``call(q)`` answers one query and returns (its latency, the
    CPU seconds it cost), the latency timed around the query alone."""
    lat: dict[str, list[float]] = {name: [] for name, _ in systems}
    cpu: dict[str, list[float]] = {name: [] for name, _ in systems}
    end = time.perf_counter() + seconds
    i = r = 0
    while time.perf_counter() < end:
        order = systems[r % len(systems):] + systems[:r % len(systems)]
        for name, call in order:
            for j in range(BLOCK):
                t, c = call(queries[(i + j) % len(queries)])
                if j >= BLOCK_SKIP:
                    lat[name].append(t)
                    cpu[name].append(c)
        i += BLOCK
        r += 1
    return {name: {"qps": len(xs) / sum(xs), "p50": C.pct(xs, 50), "p99": C.pct(xs, 99), "n": len(xs), "errors": 0,
                   "cpu_ms": 1e3 * sum(cpu[name]) / len(xs)} for name, xs in lat.items()}


# -- memory ------------------------------------------------------------------------------
def smaps(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("Rss:", "Pss:"):
            out[parts[0][:-1].lower()] = int(parts[1]) * 1024
    return out


def worker_pids(url: str, workers: int) -> set[int]:
    import httpx

    pids: set[int] = set()
    for _ in range(400):
        pids.add(httpx.get(url + "/v1/info", headers={"Connection": "close"}, timeout=60).json()["server"]["pid"])
        if len(pids) == workers:
            break
    return pids


def memory(store: Path, work: Path, queries: list[str], args) -> list[dict]:
    import httpx

    rows = []
    for mmap_flag in ("--mmap", "--no-mmap"):
        for workers in args.workers:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start_server(serve_argv(store, port, 1, [mmap_flag], workers), url, work / "memory.log")
            try:
                pids = worker_pids(url, workers)
                # warm every worker: new connections spread over them; each searches a while
                for q in queries[:40 * workers]:
                    httpx.post(url + "/v1/search", json={"query": q, "k": args.k}, headers={"Connection": "close"},
                               timeout=60)
                mem = [smaps(p) for p in pids]
                info = httpx.get(url + "/v1/info").json()
            finally:
                stop_server(proc)
            rows.append({"store": info["chunks"], "mmap": mmap_flag == "--mmap", "workers": workers, "seen": len(pids),
                         "rss": sum(m["rss"] for m in mem), "pss": sum(m["pss"] for m in mem),
                         "index_bytes": info["files"]["index_bytes"], "mapped": info["index"]["mmap"]})
            print(f"memory: {rows[-1]}", flush=True)
    return rows


# -- the run ------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    import retrostore

    info, docs = C.start(args.corpus)
    work = Path(args.work_dir)
    n_docs = min(args.docs, len(docs))
    stores = [(prepare(work, docs[:n_docs]), "baseline")]
    if args.big_chunks:
        stores.append((prepare_big(work, docs[:n_docs], args.big_chunks), f"big{args.big_chunks}"))
    queries = C.sample_sentences([t for t, _ in docs[n_docs:]] or [t for t, _ in docs], args.queries, seed=0)
    sections = []
    for path, baseline in stores:
        with retrostore.open(path) as st:
            n_chunks, factory = len(st), st.info()["index"]["factory"]
        results, batches = run_load(path, baseline, work, queries, args) if args.load else ({}, {})
        mem = memory(path, work, queries, args) if args.memory else []
        sections.append((n_chunks, results, batches, mem, factory))
    body = report(sections, args, n_docs)
    key = "serve-quick" if args.quick else "serve" if args.threads == 2 else f"serve-threads{args.threads}"
    return C.finish(args, key, f"serving ({n_docs} pydocs documents, k = {args.k}, {args.threads} threads per system)",
                    body, info)


def run_load(store_path: Path, baseline: str, work: Path, queries: list[str], args) -> tuple[dict, dict]:
    import httpx
    import urllib3

    import retrostore

    # what retrostore.connect(url).search(q, k) sends (it asks for no metadata: Hit has none)
    serve_bodies = [json.dumps({"query": q, "k": args.k, "metadata": False}).encode() for q in queries]
    flask_bodies = [json.dumps({"query": q, "n_docs": args.k}).encode() for q in queries]
    results: dict[tuple[str, int], list[dict]] = {}
    sp, fp = free_port(), free_port()
    serve_url, flask_url = f"http://127.0.0.1:{sp}", f"http://127.0.0.1:{fp}"
    serve = start_server(serve_argv(store_path, sp, args.threads, args.serve_arg), serve_url, work / "serve.log")
    flask = start_server([sys.executable, str(HERE / "_flask_baseline.py"), str(work), str(fp), str(args.threads),
                          baseline], flask_url, work / "flask.log")
    try:
        with retrostore.open(store_path, threads=args.threads) as st, retrostore.connect(serve_url) as remote, \
                transport(urllib3)("127.0.0.1", fp, maxsize=1, timeout=120, retries=False) as flask_pool:
            st.search(queries[0], k=args.k)

            def remote_call(q):  # the project's client: same call and return type as in-process
                c0 = cpu_seconds(serve.pid)
                t0 = time.perf_counter()
                hits = remote.search(q, k=args.k)
                t = time.perf_counter() - t0
                assert hits
                return t, cpu_seconds(serve.pid) - c0

            def flask_call(q):  # the same transport (urllib3, keep-alive), the baseline's request
                c0 = cpu_seconds(flask.pid)
                t0 = time.perf_counter()
                res = flask_pool.request("POST", "/search", body=json.dumps({"query": q, "n_docs": args.k}).encode(),
                                         headers={"Content-Type": "application/json"})
                ok = res.status == 200 and json.loads(res.data)["results"]
                t = time.perf_counter() - t0
                assert ok, res.data[:200]
                return t, cpu_seconds(flask.pid) - c0

            def local_call(q):
                c0 = time.process_time()
                t0 = time.perf_counter()
                st.search(q, k=args.k)
                t = time.perf_counter() - t0
                return t, time.process_time() - c0

            one = [("retrostore serve", remote_call), ("Flask baseline", flask_call), ("in-process", local_call)]
            print(f"store {store_path}: {len(st)} chunks; {len(queries)} queries", flush=True)
            for rnd in range(args.rounds):
                for c in args.clients:
                    if c == 1:
                        cells = paired_one_client(one, queries, 3 * args.seconds)
                    else:
                        runs = [("retrostore serve", lambda: load(serve_url, "/v1/search", serve_bodies, c,
                                                                  args.seconds, serve.pid)),
                                ("Flask baseline", lambda: load(flask_url, "/search", flask_bodies, c,
                                                                args.seconds, flask.pid))]
                        if rnd % 2:
                            runs.reverse()
                        cells = {name: fn() for name, fn in runs}
                    for name, r in cells.items():
                        results.setdefault((name, c), []).append(r)
                        print(f"round {rnd + 1} {name:16s} C={c:<3d} {r['qps']:8.1f} q/s  p50 {C.ms(r['p50'])} ms  "
                              f"p99 {C.ms(r['p99'])} ms  CPU {r['cpu_ms']:.2f} ms/answer  failed {r['errors']}",
                              flush=True)
        metrics = httpx.get(serve_url + "/metrics").text
    finally:
        stop_server(serve)
        stop_server(flask)
    return results, _batch_summary(metrics)


def _batch_summary(metrics_text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(metrics_text):
        for s in fam.samples:
            if s.name in ("retrostore_batch_requests_sum", "retrostore_batch_requests_count") \
                    and s.labels.get("kind") == "search":
                out[s.name] = s.value
    return out


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["qps"])[len(runs) // 2]


def _load_table(n_chunks: int, results: dict, batches: dict, args) -> list[str]:
    cell = {key: _median_run(runs) for key, runs in results.items()}
    rows = []
    for name in ("in-process", "retrostore serve", "Flask baseline"):
        for c in args.clients:
            r = cell.get((name, c))
            if r:
                rows.append([name, c, f"{r['qps']:.1f}", C.ms(r["p50"]), C.ms(r["p99"]), f"{r['cpu_ms']:.2f}",
                             r["n"], r["errors"]])
    out = [C.table(["system", "clients", "answers/s", "p50 ms", "p99 ms", "CPU ms/answer", "answers", "failed"],
                   rows), ""]
    top = max(args.clients)
    s, f = cell.get(("retrostore serve", top)), cell.get(("Flask baseline", top))
    one, floor = cell.get(("retrostore serve", 1)), cell.get(("in-process", 1))
    if s and f:
        ratio = s["qps"] / f["qps"]
        out.append(f"* at {top} clients: retrostore serve {s['qps']:.1f} answers/s = **{ratio:.2f}x** the Flask "
                   f"baseline's {f['qps']:.1f} (target >= 3x: {'met' if ratio >= 3 else 'NOT met'}); server CPU time "
                   f"per answer {s['cpu_ms']:.2f} ms against {f['cpu_ms']:.2f} ms: **{f['cpu_ms'] / s['cpu_ms']:.2f}x** "
                   "less")
    if one and floor:
        ratio = one["p50"] / floor["p50"]
        out.append(f"* at 1 client: retrostore serve p50 {C.ms(one['p50'])} ms = **{ratio:.2f}x** in-process "
                   f"{C.ms(floor['p50'])} ms (target <= 1.3x: {'met' if ratio <= 1.3 else 'NOT met'})")
        flask_one = cell.get(("Flask baseline", 1))
        if flask_one:  # what one HTTP hop costs a minimal server on this machine, for scale
            out.append(f"* at 1 client the minimal Flask baseline's p50 {C.ms(flask_one['p50'])} ms is "
                       f"{flask_one['p50'] / floor['p50']:.2f}x in-process (lighter answers, no batcher): for "
                       "scale, the same loopback HTTP hop to a minimal Python server, in the same run")
    if batches.get("retrostore_batch_requests_count"):
        mean = batches["retrostore_batch_requests_sum"] / batches["retrostore_batch_requests_count"]
        out.append(f"* the server answered {batches['retrostore_batch_requests_sum']:.0f} search requests in "
                   f"{batches['retrostore_batch_requests_count']:.0f} batches ({mean:.1f} requests per batch over the "
                   "whole run, all client counts, from /metrics)")
    failed = sum(r["errors"] for runs in results.values() for r in runs)
    out += [f"* failed requests in all rounds: {failed}", ""]
    return out


def report(sections: list, args, n_docs: int) -> str:
    out = []
    for i, (n_chunks, results, batches, _, factory) in enumerate(sections):
        if not results:
            continue
        what = (f"{n_docs} pydocs documents, {n_chunks:,} chunks, store index `{factory}` (the default at this "
                "size; the baseline searches an exact IndexFlatIP)" if i == 0 else
                f"{n_chunks:,} chunks: the same documents copied over and over with random unit vectors, store index "
                f"`{factory}`, the baseline's IndexFlatIP (exact search now costs more than embedding the query)")
        out += [f"**{what}**", ""] + _load_table(n_chunks, results, batches, args)
    if out:
        out.append(f"{args.queries} held-out query sentences (pydocs documents not in the store), k = {args.k}, "
                   f"{args.threads} threads per system; median of {args.rounds} rounds. One client: blocks of "
                   f"{BLOCK} queries asked of the three systems in turn (rotating order; the first {BLOCK_SKIP} of "
                   f"each block not counted), {3 * args.seconds:g} s; serve through "
                   "`retrostore.connect(url).search(q, k)`, the baseline through the same urllib3 transport. "
                   "8 and 32 clients (urllib3 keep-alive connections): "
                   f"{args.seconds:g} s per cell after a 1 s warm-up, serve and Flask alternating. CPU ms/answer: the "
                   "server process's CPU time (all threads) over the measured time / answers (for in-process, this "
                   "process's). retrostore serve answers full hits (text, token ids, continuation; no metadata, as the client asks); the "
                   "baseline answers passages and scores.")
    mem = [m for _, _, _, ms, _ in sections for m in ms]
    if mem:
        out += ["", "Memory of the worker processes (after each worker answered searches):", ""]
        rows = []
        for size in sorted({m["store"] for m in mem}):
            base = {m["mmap"]: m for m in mem if m["store"] == size and m["workers"] == min(args.workers)}
            for m in (m for m in mem if m["store"] == size):
                b = base[m["mmap"]]
                extra = m["workers"] - b["workers"]
                per = [(m[x] - b[x]) / extra / 2**20 if extra else None for x in ("rss", "pss")]
                rows.append([f"{size:,}", f"{m['index_bytes'] / 2**20:.1f}", "yes" if m["mapped"] else "no",
                             m["workers"], f"{m['rss'] / 2**20:.0f}", f"{m['pss'] / 2**20:.0f}",
                             "-" if per[0] is None else f"{per[0]:.0f}", "-" if per[1] is None else f"{per[1]:.0f}"])
        out.append(C.table(["store chunks", "index MiB", "index mmap", "workers", "RSS MiB (sum)", "PSS MiB (sum)",
                            "RSS per extra worker MiB", "PSS per extra worker MiB"], rows))
        out.append("")
        out.append("RSS counts shared pages in every process that maps them; PSS splits them among those processes.")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
