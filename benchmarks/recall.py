"""Recall/latency trade-off of an index on a real store (docs/benchmarks-index.md).

Copies STORE (the source is never modified), reindexes the copy with --index
(from the stored vectors, no re-embedding), then runs ``Store.evaluate`` for
every combination of --nprobe and --rerank and prints a markdown table:
recall@k (tie-aware, leave-one-out, against exact search over the stored
vectors), exact-nearest-found rate, single-query latency p50/p99 and batch
throughput.

    python benchmarks/recall.py /tmp/full/pydocs.rstore --index "OPQ16_64,IVF256,PQ16x4fs" \\
        --nprobe 1 5 16 64 --rerank 0 50 --threads 1
    python benchmarks/recall.py COPY --in-place           # evaluate an existing copy as it is
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import retrostore  # noqa: E402
from retrostore.store.evaluate import evaluate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", type=Path)
    ap.add_argument("--index", default=None, help="factory string to reindex the copy with (default: keep)")
    ap.add_argument("--in-place", action="store_true", help="evaluate STORE itself (read-only), no copy/reindex")
    ap.add_argument("--work", type=Path, default=None, help="where the copy goes (default: a temp dir, removed)")
    ap.add_argument("--nprobe", type=int, nargs="*", default=[])
    ap.add_argument("--rerank", type=int, nargs="*", default=[])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--latency-queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="FAISS threads (1 for single-query latency)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    work = None
    path = args.store
    out = {"store": str(args.store)}
    try:
        if not args.in_place:
            work = args.work or Path(tempfile.mkdtemp(prefix="rs-recall-"))
            path = work / args.store.name
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(args.store, path)
            if args.index:
                with retrostore.open(path, "a", threads=args.threads) as st:
                    t0 = time.perf_counter()
                    st.reindex(args.index, progress=False)
                    out["reindex_s"] = round(time.perf_counter() - t0, 1)
        rows = []
        with retrostore.open(path, threads=args.threads) as st:
            info = st.info()["index"]
            out["index"] = info
            grid = [(n, r) for n in (args.nprobe or [None]) for r in (args.rerank or [None])]
            for nprobe, rerank in grid:
                params = {}
                if nprobe is not None:
                    params["nprobe"] = nprobe
                if rerank is not None:
                    params["rerank"] = rerank
                res = evaluate(st._reader, queries=args.queries, k=args.k, params=params,
                               latency_queries=args.latency_queries)
                rows.append(res)
                print(json.dumps(res), file=sys.stderr, flush=True)
        out["rows"] = rows
        print(f"{info['factory']} on {rows[0]['vectors']:,} vectors, {info['bytes_per_vector']} bytes/vector, "
              f"threads={args.threads or 'all'}" + (f", reindexed in {out['reindex_s']} s" if "reindex_s" in out else ""))
        print()
        print(f"| nprobe | rerank | recall@{args.k} | exact NN found | p50 ms | p99 ms | batch queries/s |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            p, lat = r["params"], r["latency_ms"]
            print(f"| {p.get('nprobe', '-')} | {p.get('rerank', 0)} | {r['recall_at_k']:.3f} | {r['nn_in_top_k']:.3f} "
                  f"| {lat['p50']:.2f} | {lat['p99']:.2f} | {r['batch_qps']:,.0f} |")
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    finally:
        if work is not None and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
