"""Commit cost vs store size: committing 1,000 chunks into a 10,000-chunk store
and into a 200,000-chunk store (issue 5: the second may take at most 1.5x the first).

Two pairs of stores are measured in one run:

* **same index** (``--index``, default ``IVF256,PQ8``): both stores use one
  trained factory string (IVF256 trains on 10,000 vectors: 39 per centroid),
  so the only difference between them is their size. Each new batch is
  encoded by a clone of the store's trained template into a new segment: the
  cost follows the batch, not the store. This pair is the goal's measure.
* **default index** (``auto``): the 10k store is exact Flat (adding costs a
  copy); the 200k store crossed 100,000 vectors while it was built and was
  trained then (``IVF1024,PQ8``), so each batch also pays IVF assignment and
  PQ encoding (1,000 x 1,024 centroids). That extra work is per batch vector
  (it grows with nlist, ~sqrt of the store, not with the stored vectors).

Vectors are synthetic (clustered unit vectors, 384-d) and given to
``append(embeddings=...)``, so nothing is embedded. Within a pair, commits
alternate between the two stores so both see the same machine noise.

    python benchmarks/commit.py [--repeats 11] [--threads 1] [--index IVF256,PQ8] [--out DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import retrostore  # noqa: E402

from _common import SYNTH_DIM as DIM, PrecomputedOnly  # noqa: E402
from _common import clustered_vectors as vectors  # noqa: E402


def build(path: Path, n: int, rng, centres, index: str = "auto", batch: int = 20_000) -> float:
    t0 = time.perf_counter()
    with retrostore.create(path, embedder=PrecomputedOnly(), index=index) as st:
        for lo in range(0, n, batch):
            m = min(batch, n - lo)
            st.append([f"doc {lo + i}" for i in range(m)], embeddings=vectors(rng, m, centres))
            st.commit()
    return time.perf_counter() - t0


def commit_batches(paths: dict, repeats: int, rng, centres, threads: int | None, size: int = 1000) -> dict:
    """Alternate 1,000-chunk commits between the stores, so that both see the same machine noise."""
    stores = {n: retrostore.open(p, "a", embedder=PrecomputedOnly(), threads=threads) for n, p in paths.items()}
    times = {n: {"append_s": [], "commit_s": [], "chunks_before": len(st)} for n, st in stores.items()}
    try:
        for r in range(repeats + 1):  # the first round warms caches and is not counted
            for n, st in stores.items():
                texts = [f"new {r} {i}" for i in range(size)]
                vecs = vectors(rng, size, centres)
                t0 = time.perf_counter()
                st.append(texts, embeddings=vecs)
                t1 = time.perf_counter()
                st.commit()
                t2 = time.perf_counter()
                if r:
                    times[n]["append_s"].append(t1 - t0)
                    times[n]["commit_s"].append(t2 - t1)
        for n, st in stores.items():
            info = st.info()
            res = times[n]
            res.update(factory=info["index"]["factory"], segments=info["index"]["segments"],
                       median_commit_s=statistics.median(res["commit_s"]),
                       mean_commit_s=statistics.fmean(res["commit_s"]),
                       median_append_commit_s=statistics.median(a + c for a, c in zip(res["append_s"], res["commit_s"])))
    finally:
        for st in stores.values():
            st.close()
    return times


def measure_pair(root: Path, index: str, args, rng, centres) -> dict:
    """Build a 10k and a 200k store with ``index``, then alternate 1,000-chunk commits into them."""
    paths, build_s = {}, {}
    for n in (10_000, 200_000):
        paths[n] = root / f"store-{index.replace(',', '_')}-{n}.rstore"
        shutil.rmtree(paths[n], ignore_errors=True)
        build_s[n] = build(paths[n], n, rng, centres, index=index)
    os.sync()  # the builds' dirty pages must not land in the measured fsyncs
    results = commit_batches(paths, args.repeats, rng, centres, args.threads)
    for n, res in results.items():
        res["build_s"] = round(build_s[n], 1)
    return {
        "index": index,
        "results": results,
        "ratio_commit": results[200_000]["median_commit_s"] / results[10_000]["median_commit_s"],
        "ratio_commit_mean": results[200_000]["mean_commit_s"] / results[10_000]["mean_commit_s"],
        "ratio_append_commit": results[200_000]["median_append_commit_s"] / results[10_000]["median_append_commit_s"],
    }


def report(pair: dict) -> None:
    print(f"index={pair['index']!r}:")
    for n, res in pair["results"].items():
        print(f"  {n:>7,} chunks ({res['factory']}, {res['segments']} segments): commit of 1,000 chunks "
              f"median {res['median_commit_s'] * 1e3:.0f} ms, mean {res['mean_commit_s'] * 1e3:.0f} ms "
              f"(each: {', '.join(f'{c * 1e3:.0f}' for c in res['commit_s'])} ms); "
              f"append+commit median {res['median_append_commit_s'] * 1e3:.0f} ms; built in {res['build_s']:.0f} s")
    print(f"  ratio 200k/10k: commit median {pair['ratio_commit']:.2f}x, mean {pair['ratio_commit_mean']:.2f}x, "
          f"append+commit median {pair['ratio_append_commit']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=11, help="1,000-chunk commits measured per store")
    ap.add_argument("--threads", type=int, default=1,
                    help="FAISS threads of the stores (default 1: OpenMP barriers on a busy shared machine "
                         "otherwise measure the neighbours' load, not the commit)")
    ap.add_argument("--index", default="IVF256,PQ8",
                    help="factory string of the same-index pair (must train on 10,000 vectors)")
    ap.add_argument("--out", type=Path, default=None, help="directory for the stores (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((256, DIM)).astype(np.float32)
    root = args.out or Path(tempfile.mkdtemp(prefix="rs-commit-"))
    try:
        pairs = [measure_pair(root, index, args, rng, centres) for index in (args.index, "auto")]
        if args.json:
            print(json.dumps(pairs, indent=2))
            return
        for pair in pairs:
            report(pair)
        same = pairs[0]
        verdict = "holds" if same["ratio_commit"] <= 1.5 else "MISSES"
        print(f"goal (same index, 200k commit <= 1.5x the 10k commit): {verdict} at {same['ratio_commit']:.2f}x")
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
