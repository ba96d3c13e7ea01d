"""Batch searches: FAISS's OpenMP threads against the store's split, on a quiet and on a busy machine.

What is measured
----------------
A batch search (k = 5) three ways, interleaved (``--repeats`` rounds): FAISS on 1 OpenMP thread;
FAISS on the usable CPUs (what a store did before 2026-12-06); and the store's split, each part
searched by FAISS on one thread side by side, one part per usable CPU: an exact ``IndexFlatIP``
of random unit vectors (the store's BLAS threshold) cut by database range
(``retrostore.index.search._split_flat_search``; a store splits from ``SPLIT_FLAT_MIN_WORK``
multiply-adds and runs smaller batches on one thread), and an ``HNSW32,SQfp16`` graph (the
default below 100,000 chunks, ``efSearch`` 128) and an ``IVF1024,PQ48x4fs`` index (the
default's codes beyond, ``nprobe`` 256; no re-ranking, which the store does after the search)
cut by queries (``_split_by_queries``; parts of at least ``SPLIT_MIN_QUERIES``). The report gives the median and the 90th percentile of each,
and the ratios of the medians. Each search starts 50 ms after the one before: GNU OpenMP's idle
workers spin after a region of several threads (``GOMP_SPINCOUNT``), and would slow whichever
way came next.

Why: FAISS computes an exact batch one database block of 1,024 vectors at a time
(``faiss.cvar.distance_compute_blas_database_bs``), a BLAS product and an OpenMP loop over the
queries per block, so a search of 200,000 vectors meets ~400 OpenMP barriers; a graph batch
meets one per search. On a shared machine a thread waiting at a barrier for a descheduled one
spins (GNU OpenMP's default): a batch of 8 took up to a second, and retrostore serve at 8
clients on a 204,450-chunk store answered nothing in 3 s while other jobs ran.

The whole is run twice: on the machine as it is, then with ``--busy`` (default 1) CPU-bound
processes started by the benchmark (a pure-Python loop each) and stopped at the end.

``python benchmarks/batch_threads.py [--record]``.
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
    p.add_argument("--graph-vectors", type=int, default=20_000,
                   help="an HNSW32,SQfp16 graph of this many vectors too, split by queries (default 20,000; 0: none)")
    p.add_argument("--graph-batches", default="8,16,32,128", help="queries per graph and IVF search (default 8..128)")
    p.add_argument("--ivf-vectors", type=int, default=200_000,
                   help="an IVF1024,PQ48x4fs index of this many vectors too, split by queries (default 200,000; "
                        "0: none)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--busy", type=int, default=1, help="CPU-bound processes in the busy part (default 1)")
    p.add_argument("--record", action="store_true", help="write the result into docs/benchmarks.md")
    return p.parse_args(argv)



def measure(indexes: dict, batches: list[int], graph_batches: list[int], repeats: int, threads: int,
            rng: np.random.Generator) -> list:
    from retrostore.index.search import _split_by_queries, _split_flat_search

    def split(index, q):
        faiss.omp_set_num_threads(threads)  # the caller's setting, which the store's split reads
        if isinstance(index, faiss.IndexFlat):
            return _split_flat_search(index, q, 5, threads)
        return _split_by_queries(lambda x: index.search(x, 5), q)

    def faiss_on(t: int):
        def run(index, q):
            faiss.omp_set_num_threads(t)
            return index.search(q, 5)
        return run

    ways = {"one": faiss_on(1), "faiss": faiss_on(threads), "split": split}
    names = list(ways)
    rows = []
    for name, index in indexes.items():
        for nq in (batches if isinstance(index, faiss.IndexFlat) else graph_batches):
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
            rows.append([name, nq] + [f"{p50[w] * 1e3:.1f} / {C.pct(times[w], 90) * 1e3:.1f}" for w in names]
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
        indexes[f"Flat, {n:,}"] = faiss.IndexFlatIP(args.dim)
        indexes[f"Flat, {n:,}"].add(xb)
    if args.graph_vectors:  # the default below 100,000 chunks (docs/index.md)
        xb = rng.standard_normal((args.graph_vectors, args.dim), dtype=np.float32)
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        graph = faiss.index_factory(args.dim, "HNSW32,SQfp16", faiss.METRIC_INNER_PRODUCT)
        graph.train(xb)
        graph.add(xb)
        faiss.downcast_index(graph).hnsw.efSearch = 128
        indexes[f"HNSW32,SQfp16, {args.graph_vectors:,}"] = faiss.downcast_index(graph)
    if args.ivf_vectors:  # the default's codes from 100,000 chunks (docs/index.md), its nprobe
        xb = rng.standard_normal((args.ivf_vectors, args.dim), dtype=np.float32)
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        ivf = faiss.index_factory(args.dim, "IVF1024,PQ48x4fs", faiss.METRIC_INNER_PRODUCT)
        ivf.train(xb[:1024 * 39])
        ivf.add(xb)
        faiss.extract_index_ivf(ivf).nprobe = 256
        indexes[f"IVF1024,PQ48x4fs, {args.ivf_vectors:,}"] = ivf
    batches = [int(x) for x in args.batches.split(",")]
    graph_batches = [int(x) for x in args.graph_batches.split(",")]
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    header = ["index, vectors", "queries", "1 thread p50 / p90 ms", f"FAISS, {threads} threads p50 / p90 ms",
              f"the store's split, {threads} threads p50 / p90 ms", "split faster than FAISS's threads by",
              "than 1 thread by"]
    print("the machine as it is")
    quiet = measure(indexes, batches, graph_batches, args.repeats, threads, rng)
    with C.busy_processes(args.busy):
        print(f"with {args.busy} CPU-bound process(es)")
        busy = measure(indexes, batches, graph_batches, args.repeats, threads, rng)
    body = "\n".join([
        "**The machine as it is:**", "", C.table(header, quiet), "",
        f"**With {args.busy} CPU-bound process(es) started by the benchmark:**", "", C.table(header, busy), "",
        f"{args.dim}-d random unit vectors, k = 5. Flat: IndexFlatIP, BLAS threshold {BLAS_THRESHOLD:,} (the "
        f"store's: batches of >= {-(-BLAS_THRESHOLD // args.dim)} queries take the matrix product), split by "
        "database range. HNSW32,SQfp16: efSearch 128; IVF1024,PQ48x4fs: nprobe 256; both split by queries. "
        f"{args.repeats} interleaved rounds per cell; times per search (the whole batch)."])
    return C.finish(args, "batch-threads", "batch searches: FAISS's OpenMP threads against the store's split",
                    body, info)


if __name__ == "__main__":
    raise SystemExit(main())
