"""Exact search of small batches: FAISS's shipped BLAS threshold against the store's.

What is measured
----------------
FAISS's exact search (``IndexFlat``; every IVF coarse quantizer is one) computes
distances with BLAS's matrix product only when ``queries x dim`` reaches
``faiss.cvar.distance_compute_blas_threshold``; below it, each query scans every
vector on its own. FAISS 1.15 ships 128,000 (333 queries of 384-d); a store's batch
search of an inner-product index sets ``retrostore.index.search.BLAS_THRESHOLD``
for the search when it finds that value. For each
database (random unit vectors: a store's exact segment, and a coarse quantizer's
centroids), metric and batch size, the same queries are searched with both
thresholds, interleaved (``--repeats`` rounds, best of each), and the ratio of
the two times is printed: > 1 means the store's setting is faster.

The machine is shared and noisy: read the ratios, not the absolute times.

``python benchmarks/flat_batch.py [--record]``.
"""

from __future__ import annotations

import argparse

import faiss
import numpy as np

import _common as C

SHIPPED = 128_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=C.SYNTH_DIM, help="vector dimension (default 384)")
    p.add_argument("--vectors", type=int, default=56_400, help="exact segment size (default 56,400)")
    p.add_argument("--centroids", type=int, default=2_048, help="coarse quantizer size (default 2,048)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds, best kept (default 5)")
    p.add_argument("--record", action="store_true", help="write the result into docs/benchmarks.md")
    return p.parse_args(argv)


def search_time(index, queries: np.ndarray, k: int, threshold: int) -> float:
    """Seconds of one ``index.search`` with FAISS's BLAS threshold set to ``threshold``."""
    faiss.cvar.distance_compute_blas_threshold = threshold
    return C.timed(index.search, queries, k)[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    info = C.machine()
    C.print_machine(info)
    from retrostore.index.search import BLAS_THRESHOLD

    rng = np.random.default_rng(0)
    rows = []
    for name, n, k, batches in (("exact segment", args.vectors, 10, (1, 2, 4, 6, 8, 16, 32, 64)),
                                ("coarse quantizer", args.centroids, 8, (8, 16, 32, 256))):
        xb = rng.standard_normal((n, args.dim), dtype=np.float32)
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        for metric, cls in (("ip", faiss.IndexFlatIP), ("l2", faiss.IndexFlatL2)):
            index = cls(args.dim)
            index.add(xb)
            for nq in batches:
                q = rng.standard_normal((nq, args.dim), dtype=np.float32)
                times = {SHIPPED: [], BLAS_THRESHOLD: []}
                for r in range(args.repeats + 1):  # round 0 warms caches, not counted
                    order = (SHIPPED, BLAS_THRESHOLD) if r % 2 else (BLAS_THRESHOLD, SHIPPED)
                    for thr in order:
                        t = search_time(index, q, k, thr)
                        if r:
                            times[thr].append(t)
                shipped, ours = min(times[SHIPPED]), min(times[BLAS_THRESHOLD])
                rows.append([f"{name} ({n:,})", metric, nq, f"{shipped / nq * 1e3:.3f}",
                             f"{ours / nq * 1e3:.3f}", f"{shipped / ours:.2f}x"])
                print(" | ".join(map(str, rows[-1])), flush=True)
    faiss.cvar.distance_compute_blas_threshold = SHIPPED
    body = "\n".join([
        C.table(["database", "metric", "queries", f"ms/query, FAISS's {SHIPPED:,}",
                 f"ms/query, {BLAS_THRESHOLD:,} (the store's, ip)", "speed-up"], rows),
        "",
        f"{args.dim}-d random unit vectors, k = 10 (segment) / 8 (quantizer: the probes of a batch), "
        f"FAISS on {faiss.omp_get_max_threads()} OpenMP threads; best of {args.repeats} interleaved rounds. "
        "The threshold compares queries x dim: the store's value sends batches of >= "
        f"{-(-BLAS_THRESHOLD // args.dim)} queries of {args.dim}-d to BLAS. The store lowers it for inner-product "
        "indexes only: BLAS computes L2 as |x|^2 + |y|^2 - 2xy, which loses precision on vectors of large norm "
        "(the l2 rows show what the speed would be).",
    ])
    return C.finish(args, "flat-batch", "exact search of small batches: FAISS's BLAS threshold against the store's",
                    body, info)


if __name__ == "__main__":
    raise SystemExit(main())
