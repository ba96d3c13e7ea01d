"""retrostore against its peers, measured side by side in one run on the same data.

Users choose between retrostore, a hand-rolled FAISS + LMDB pipeline and
embedded vector databases (LanceDB, Chroma). This benchmark gives all of them
the same precomputed vectors and chunk texts and measures what a user of a
RETRO-style retrieval store pays:

ingest time      vectors + texts -> a durable directory (every system's tree is
                 fsynced at the end; retrostore's includes chunking the documents,
                 which the peers, given chunk texts, are spared; measured separately)
disk size        bytes allocated by that directory
reopen time      open a fresh handle in a fresh process, and the first query
                 (lazy systems load their index on the first query)
latency p50/p99  one query vector, k=10, *returning texts* (retrieval for a language
                 model needs the texts, not ids)
batch q/s        all queries in as few calls as the system allows, with texts
recall@10        against exact top-10 by numpy (tie-aware)
peak RSS         of the ingest process and of the query process, per system
import time      of the system's Python package, per system

Data: the 64-token chunks of pydocs (497 Python documentation pages) embedded
once with retrostore's default model (all-MiniLM-L6-v2, int8, 384-d,
normalised) and cached in ``benchmarks/.cache``; 30 documents are held out of
every system's data and 500 of their chunks' vectors are the queries (queries
from unseen documents, as at inference time).

Each system runs in its own subprocesses (so peak RSS and import costs are its
own): ingest rounds, then query rounds, in an order that rotates per round so
no system always runs first on this noisy machine; figures are medians over
rounds. A final *paired* process opens the floor and retrostore together and
alternates them query by query in random order, the fairest latency comparison, and profiles
both paths with cProfile. Ratios are against raw FAISS + LMDB (the floor: the
least any store built on FAISS and LMDB can cost).

Run ``python benchmarks/peers.py --quick`` (about 5k chunks, 100 queries) or
``python benchmarks/peers.py`` (all chunks, 500 queries), with the ``bench``
extra installed (``pip install -e '.[bench]'``). The full run writes its table
into ``docs/benchmarks-peers.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import peers_data  # noqa: E402
import peers_report  # noqa: E402
from peers_systems import SYSTEMS, ivf_lists  # noqa: E402

DEFAULT_SYSTEMS = ["faiss-lmdb", "faiss-ivf-lmdb", "retrostore", "retrostore-flat", "retrostore-ivf", "retrostore-ivfsq",
                   "lancedb-flat", "lancedb-ivfpq", "chroma"]
FLOOR = "faiss-lmdb"
#: ``--scale``: the floor, the store with its defaults, LanceDB's IVF_PQ and Chroma (issue 17, "peers at scale").
SCALE_SYSTEMS = ["faiss-lmdb", "retrostore", "lancedb-ivfpq", "chroma"]


def _log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def disk_bytes(root: Path) -> dict:
    """Allocated (``st_blocks``) and apparent bytes of every file under ``root``."""
    alloc = apparent = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            alloc += st.st_blocks * 512
            apparent += st.st_size
    return {"allocated": alloc, "apparent": apparent}


def disk_breakdown(root: Path) -> dict:
    """Allocated bytes per top-level entry of ``root`` (which part of a store takes the space)."""
    out = {}
    for p in sorted(root.iterdir()):
        out[p.name] = disk_bytes(p)["allocated"] if p.is_dir() else p.lstat().st_blocks * 512
    return out


def run_worker(role: str, args: argparse.Namespace, out: Path, extra: list[str], log: Path) -> dict:
    cmd = [sys.executable, str(HERE / "peers_worker.py"), role, "--data", str(args.work_dir / "data"),
           "--out", str(out), "--k", str(args.k), *extra]
    if args.faiss_threads:
        cmd += ["--faiss-threads", str(args.faiss_threads)]
    env = dict(os.environ, ANONYMIZED_TELEMETRY="False", RUST_LOG="error", LANCE_LOG="error")
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=args.timeout_s)
        except subprocess.TimeoutExpired:
            if role != "ingest":
                raise
            return {"unavailable": f"ingest did not finish within the limit of {args.timeout_s:.0f} s "
                                   f"(--timeout-s); stopped after {time.perf_counter() - t0:.0f} s"}
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"worker {role} {' '.join(extra)} failed (exit {proc.returncode}); log {log}:\n{tail}")
    res = json.loads(out.read_text())
    res["process_wall_s"] = wall
    return res


def machine() -> dict:
    import psutil

    from _common import cpu_model, usable_cpus

    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "numpy": np.__version__, "psutil": psutil.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="benchmarks/peers.py",
        description="retrostore vs raw FAISS + LMDB, LanceDB and Chroma on the same cached pydocs vectors: "
                    "ingest time, disk size, reopen time, single-query latency p50/p99 (k=10, with texts), "
                    "batch throughput, recall@10 and peak RSS, each system in its own subprocess.",
        epilog="Quick, with the cache filled from a store built by `retrostore build STORE CORPUS`: "
               "python benchmarks/peers.py --quick --from-store STORE. "
               "Full (writes docs/benchmarks-peers.md): python benchmarks/peers.py",
    )
    p.add_argument("--quick", action="store_true",
                   help="about 5000 indexed chunks, 100 queries, 2 rounds (minutes, not the published figures)")
    p.add_argument("--corpus", type=Path, default=Path(os.environ.get("RETROSTORE_PYDOCS",
                                                                      "/work/shared/data/pydocs.jsonl.zst")),
                   help="the .jsonl.zst corpus (default: $RETROSTORE_PYDOCS or /work/shared/data/pydocs.jsonl.zst)")
    p.add_argument("--cache-dir", type=Path, default=HERE / ".cache",
                   help="where the embedded chunks are cached (default: benchmarks/.cache)")
    p.add_argument("--from-store", type=Path, metavar="STORE",
                   help="fill a missing cache from this complete store, built from --corpus with the default model "
                        "(read only), instead of embedding the corpus (30-40 min on 2 cores)")
    p.add_argument("--work-dir", type=Path, default=REPO / "bench-out" / "peers",
                   help="split, stores, logs and raw results (default: bench-out/peers, git-ignored)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma-separated subset of {','.join(DEFAULT_SYSTEMS)} (the floor {FLOOR} is always run)")
    p.add_argument("--queries", type=int, help="queries (default 500; 100 with --quick)")
    p.add_argument("--heldout-docs", type=int, default=30, help="documents held out as the query source (default 30)")
    p.add_argument("--max-chunks", type=int, help="index about this many chunks (default all; 5000 with --quick)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--rounds", type=int, help="query rounds, each a fresh process per system (default 3; 2 quick)")
    p.add_argument("--ingest-rounds", type=int, help="ingest rounds per system (default 3; 1 quick)")
    p.add_argument("--paired-repeats", type=int, default=3, help="passes over the queries in the paired process (default 3)")
    p.add_argument("--profile", type=int, default=300, metavar="N",
                   help="cProfile N single queries of each path in the paired process (0: off; default 300)")
    p.add_argument("--faiss-threads", type=int, metavar="N",
                   help="FAISS OpenMP threads for the floor and retrostore (default: the libraries' defaults, "
                        "all usable CPUs)")
    p.add_argument("--no-thread-sweep", action="store_true",
                   help="do not also time the FAISS paths with 1 thread in the paired process")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the query sample")
    p.add_argument("--doc", type=Path, help="markdown file to update between its peers markers "
                                           "(default docs/benchmarks-peers.md for a full run, none for --quick)")
    p.add_argument("--no-doc", action="store_true", help="do not write the markdown file")
    p.add_argument("--report-only", action="store_true",
                   help="re-render the report (and --doc) from WORK_DIR/results.json without measuring")
    p.add_argument("--timeout-s", type=float, default=3600, help="limit per worker process (default 3600 s)")
    p.add_argument("--scale", type=int, metavar="N",
                   help="peers at scale: N chunks of benchmarks/scale_data.py (real pydocs chunk texts, clustered "
                        "vectors with near-ties, rounded to float16 values) instead of the pydocs vectors, queries "
                        "drawn fresh; systems default to the floor, retrostore (defaults), LanceDB IVF_PQ and Chroma")
    args = p.parse_args(argv)

    quick = args.quick
    if args.scale and args.systems == ",".join(DEFAULT_SYSTEMS):
        args.systems = ",".join(SCALE_SYSTEMS)
    args.queries = args.queries or (100 if quick else 500)
    args.max_chunks = args.max_chunks or (5000 if quick else None)
    args.rounds = args.rounds or (2 if quick else 3)
    args.ingest_rounds = args.ingest_rounds or (1 if quick else 3)
    if args.doc is None and not quick:
        args.doc = REPO / "docs" / ("benchmarks-peers-scale.md" if args.scale else "benchmarks-peers.md")
    if args.no_doc:
        args.doc = None
    if args.report_only:
        saved = json.loads((args.work_dir / "results.json").read_text())
        report = peers_report.render(saved["info"], saved["rows"], saved["ingest"], saved["paired"], FLOOR)
        print(report)
        if args.doc and not saved["info"]["quick"]:
            peers_report.update_doc(args.doc, report)
            _log(f"updated {args.doc}")
        return 0
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in systems:
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r}; choose from {', '.join(DEFAULT_SYSTEMS)}")
    if FLOOR not in systems:
        systems.insert(0, FLOOR)
    import importlib.util

    need = {"faiss": "faiss-cpu", "lmdb": "lmdb", "retrostore": "retrostore", "psutil": "psutil"}
    if any(x.startswith("lancedb") for x in systems):
        need.update(lancedb="lancedb", pyarrow="pyarrow")
    if "chroma" in systems:
        need["chromadb"] = "chromadb"
    missing = [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]
    if missing:
        p.error(f"{', '.join(missing)} not installed for {sys.executable}; pip install -e '.[bench]'")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_start = os.getloadavg()

    # -- data -------------------------------------------------------------------------
    if not args.scale and not peers_data.cache_ready(args.cache_dir):
        if args.from_store:
            _log(f"filling the cache {args.cache_dir} from {args.from_store}")
            meta = peers_data.cache_from_store(args.cache_dir, args.from_store, args.corpus)
        else:
            _log(f"embedding {args.corpus} into the cache {args.cache_dir} (30-40 minutes on 2 cores)")
            meta = peers_data.cache_by_embedding(args.cache_dir, args.corpus)
        _log(f"cache: {meta['documents']} documents, {meta['chunks']} chunks in {meta['seconds']} s")
    work = args.work_dir
    for sub in ("data", "stores", "results"):
        if (work / sub).exists():
            shutil.rmtree(work / sub)
        (work / sub).mkdir(parents=True)
    log = work / "workers.log"
    log.write_text("")
    if args.scale:
        split = peers_data.prepare_scale_split(args.cache_dir, args.corpus, work / "data", n=args.scale,
                                               n_queries=args.queries, k=args.k, seed=args.seed)
    else:
        split = peers_data.prepare_split(args.cache_dir, work / "data", heldout_docs=args.heldout_docs,
                                         n_queries=args.queries, max_chunks=args.max_chunks, k=args.k, seed=args.seed)
    _log(f"split: {split['documents']} documents / {split['chunks']} chunks indexed, {split['queries']} queries "
         f"from {len(split['heldout_documents'])} held-out documents" if not args.scale else
         f"split: {split['chunks']:,} chunks of {split['scale']}, {split['queries']} fresh queries")

    # -- ingest rounds ----------------------------------------------------------------------
    ingest: dict[str, list[dict]] = {s: [] for s in systems}
    stores: dict[str, Path] = {}
    for r in range(args.ingest_rounds):
        order = systems[r % len(systems):] + systems[: r % len(systems)]
        for s in order:
            if ingest[s] and "unavailable" in ingest[s][0]:
                continue
            store = work / "stores" / f"{s}.r{r}"
            _log(f"ingest round {r + 1}/{args.ingest_rounds}: {s}")
            res = run_worker("ingest", args, work / "results" / f"ingest-{s}-r{r}.json",
                             ["--system", s, "--store", str(store)], log)
            if "unavailable" in res:
                _log(f"  {s} unavailable: {res['unavailable']}")
                shutil.rmtree(store, ignore_errors=True)
            else:
                res["disk"] = disk_bytes(store)
                res["disk_breakdown"] = disk_breakdown(store)
                _log(f"  {res['ingest_s']:.2f} s, {res['disk']['allocated'] / 2**20:.1f} MiB, "
                     f"peak RSS {res['peak_rss_mb']:.0f} MB")
                if s in stores:
                    shutil.rmtree(stores[s])
                stores[s] = store
            ingest[s].append(res)
    live = [s for s in systems if s in stores]

    # -- query rounds -------------------------------------------------------------------------
    queries: dict[str, list[dict]] = {s: [] for s in live}
    for r in range(args.rounds):
        order = live[r % len(live):] + live[: r % len(live)]
        for s in order:
            _log(f"query round {r + 1}/{args.rounds}: {s}")
            extra = ["--system", s, "--store", str(stores[s])]
            if r > 0:
                extra.append("--no-text-check")
            res = run_worker("query", args, work / "results" / f"query-{s}-r{r}.json", extra, log)
            v0 = next(iter(res["variants"].values()))
            _log(f"  open {res['open_s'] * 1e3:.0f} ms + first query {res['first_query_s'] * 1e3:.0f} ms, "
                 f"p50 {np.median(v0['latency_s']) * 1e3:.3f} ms, peak RSS {res['peak_rss_mb']:.0f} MB")
            queries[s].append(res)

    # -- paired latency + profile -------------------------------------------------------------
    paired = None
    pair = [s for s in (FLOOR, "retrostore-flat") if s in stores]
    if len(pair) > 1:
        _log(f"paired latency: {', '.join(pair)} alternating, {args.paired_repeats} passes")
        paired = run_worker("paired", args, work / "results" / "paired.json",
                            [a for s in pair for a in ("--pair", f"{s}={stores[s]}")]
                            + ["--repeats", str(args.paired_repeats), "--profile", str(args.profile)]
                            + ([] if args.no_thread_sweep else ["--thread-sweep"]), log)

    # -- report -------------------------------------------------------------------------------
    base = np.load(work / "data" / "vectors.npy")
    qv = np.load(work / "data" / "queries.npy")
    truth = np.load(work / "data" / "truth.npz")
    info = {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "machine": machine(),
            "command": "python benchmarks/peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "quick": quick, "split": split, "rounds": args.rounds, "ingest_rounds": args.ingest_rounds,
            "paired_repeats": args.paired_repeats, "ivf_lists": ivf_lists(split["chunks"]),
            "faiss_threads": args.faiss_threads}
    rows = peers_report.aggregate(systems, ingest, queries, base, qv, truth, args.k)
    report = peers_report.render(info, rows, ingest, paired, FLOOR)
    (work / "results.json").write_text(json.dumps({"info": info, "rows": rows, "paired": paired,
                                                   "ingest": ingest}, indent=1, default=str))
    (work / "report.md").write_text(report)
    print(report)
    if args.doc:
        peers_report.update_doc(args.doc, report)
        _log(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
