"""Exact search of batches: FAISS's OpenMP threads against the store's split by database range, on
a quiet and on a busy machine.

What is measured
----------------
An exact batch search (``IndexFlatIP`` of random unit vectors, the store's BLAS threshold, k = 5)
of ``--batches`` queries three ways, interleaved (``--repeats`` rounds): FAISS on 1 OpenMP
thread; FAISS on the usable CPUs (what a store did before 2026-12-06); and the store's search,
the vectors cut into one range per usable CPU, each searched on one thread side by side
(``retrostore.index.search._split_flat_search``; a store splits from ``SPLIT_FLAT_MIN_WORK``
multiply-adds and runs smaller batches on one thread). The report gives the median and the 90th
percentile of each, and the ratios of the medians. Each search starts 50 ms after the one before: GNU OpenMP's idle workers
spin after a region of several threads (``GOMP_SPINCOUNT``), and would slow whichever way came
next. FAISS computes such a batch one database block
of 1,024 vectors at a time (``faiss.cvar.distance_compute_blas_database_bs``): a BLAS product and
an OpenMP loop over the queries per block, so a search of 200,000 vectors meets ~400 OpenMP
barriers. On a shared machine a thread waiting at a barrier for a descheduled one spins (GNU
OpenMP's default), and a batch of 8 took up to a second (retrostore serve at 8 clients on a
204,450-chunk store answered nothing in 3 s while other jobs ran).

The whole is run twice: on the machine as it is, then with ``--busy`` (default 1) CPU-bound
processes started by the benchmark (a pure-Python loop each) and stopped at the end.

``python benchmarks/flat_threads.py [--record]``.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

import _common as C


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=C.SYNTH_DIM, help="vector dimension (default 384)")
    p.add_argument("--vectors", default="56400,204450", help="database sizes (default 56,400 and 204,450)")
    p.add_argument("--batches", default="6,8,16,32,64,128", help="queries per search (default 6..128)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--busy", type=int, default=1, help="CPU-bound processes in the busy part (default 1)")
    p.add_argument("--record", action="store_true", help="write the result into docs/benchmarks.md")
    return p.parse_args(argv)



def measure(indexes: dict, batches: list[int], repeats: int, threads: int, rng: np.random.Generator) -> list:
    from retrostore.index.search import _split_flat_search

    def faiss_on(t: int):
        def run(index, q):
            faiss.omp_set_num_threads(t)
            return index.search(q, 5)
        return run

    ways = {"one": faiss_on(1), "faiss": faiss_on(threads),
            "split": lambda index, q: _split_flat_search(index, q, 5, threads)}
    names = list(ways)
    rows = []
    for n, index in indexes.items():
        for nq in batches:
            q = rng.standard_normal((nq, index.d), dtype=np.float32)
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            faiss.omp_set_num_threads(1)
            assert (ways["split"](index, q)[1] == index.search(q, 5)[1]).all()
            times: dict[str, list[float]] = {w: [] for w in names}
            for r in range(repeats + 1):  # round 0 warms caches, not counted
                for w in names[r % 3:] + names[:r % 3]:
                    time.sleep(0.05)  # GNU OpenMP's idle workers of the way before stop spinning (up to ~10 ms)
                    seconds = C.timed(ways[w], index, q)[0]
                    if r:
                        times[w].append(seconds)
            p50 = {w: C.median(times[w]) for w in names}
            rows.append([f"{n:,}", nq] + [f"{p50[w] * 1e3:.1f} / {C.pct(times[w], 90) * 1e3:.1f}" for w in names]
                        + [f"{p50['faiss'] / p50['split']:.2f}x", f"{p50['one'] / p50['split']:.2f}x"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    faiss.omp_set_num_threads(threads)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    info = C.machine()
    C.print_machine(info)
    from retrostore.index.search import BLAS_THRESHOLD

    threads = C.usable_cpus()
    rng = np.random.default_rng(0)
    indexes = {}
    for n in (int(x) for x in args.vectors.split(",")):
        xb = rng.standard_normal((n, args.dim), dtype=np.float32)
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        indexes[n] = faiss.IndexFlatIP(args.dim)
        indexes[n].add(xb)
    batches = [int(x) for x in args.batches.split(",")]
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    header = ["vectors", "queries", "1 thread p50 / p90 ms", f"FAISS, {threads} threads p50 / p90 ms",
              f"split, {threads} ranges (the store's) p50 / p90 ms", "split faster than FAISS's threads by",
              "than 1 thread by"]
    print("the machine as it is")
    quiet = measure(indexes, batches, args.repeats, threads, rng)
    with C.busy_processes(args.busy):
        print(f"with {args.busy} CPU-bound process(es)")
        busy = measure(indexes, batches, args.repeats, threads, rng)
    body = "\n".join([
        "**The machine as it is:**", "", C.table(header, quiet), "",
        f"**With {args.busy} CPU-bound process(es) started by the benchmark:**", "", C.table(header, busy), "",
        f"{args.dim}-d random unit vectors, IndexFlatIP, k = 5, BLAS threshold {BLAS_THRESHOLD:,} (the store's: "
        f"batches of >= {-(-BLAS_THRESHOLD // args.dim)} queries take the matrix product); {args.repeats} "
        "interleaved rounds per cell; times per search (the whole batch)."])
    print()
    print(body)
    if args.record:
        C.record("flat-threads", "exact batches: FAISS's OpenMP threads against the store's split by range",
                 body, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
