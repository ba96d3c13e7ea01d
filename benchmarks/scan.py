"""One query's exact scan: numpy's OpenBLAS product against the store's scan, quiet and busy.

What is measured
----------------
An exact store answers a single query with one scan of its vectors. numpy's product
(``X @ q``) lets OpenBLAS cut it over every core and wait for all of them; the store's
``retrostore.index.scan.inner_products`` runs FAISS's single-threaded kernel on the caller's
thread and on one pool thread that takes pieces from the other end, and never waits for it.

1. *kernel*: for each size, ``X @ q`` (numpy, OpenBLAS's default threads), the kernel on one
   thread, and ``inner_products``.
2. *store*: an exact store (``index="Flat"``) of the same vectors (random unit vectors, tiny
   texts), ``search_vectors(q, k=10)`` one query at a time, against the numpy floor (``X @ q``,
   then ``argpartition``).

The paths take turns in 4 blocks of queries each, after a pause of 0.3 s: OpenBLAS's threads
spin on after a product (up to ~0.1 s) and, in turns of one query, slowed whatever ran next.

Both run on the machine as it is and again with ``--busy`` CPU-bound processes started by the
benchmark (issue 17: "the exact mode stays within 1.1x of the numpy floor in the same run, also
while another CPU-bound process runs"). The machine is shared and noisy: read the ratios, not the
absolute times.

``python benchmarks/scan.py [--sizes 51429,204450] [--busy 1] [--record]``.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import faiss
import numpy as np

import _common as C

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="51429,204450", help="comma-separated vector counts (default 51429,204450)")
    p.add_argument("--calls", type=int, default=200, help="calls (queries) per path and condition (default 200)")
    p.add_argument("--busy", type=int, default=1, help="CPU-bound processes for the busy runs (default 1)")
    p.add_argument("--record", action="store_true", help="write the result into docs/benchmarks.md")
    return p.parse_args(argv)


def kernel_paths(X: np.ndarray):
    from retrostore.index.scan import _kernel, inner_products

    out = np.empty(len(X), np.float32)

    def one_thread(q):
        _kernel(out, q, X)
        return out

    return {"numpy X @ q": lambda q: X @ q, "kernel, one thread": one_thread,
            "inner_products": lambda q: inner_products(X, q)}


def store_paths(st, X: np.ndarray, k: int = 10):
    def floor(q):
        s = X @ q
        top = np.argpartition(-s, k - 1)[:k]
        return top[np.argsort(-s[top])]

    return {"numpy floor (X @ q + argpartition)": floor,
            "store.search_vectors (Flat)": lambda q: st.search_vectors(q[None, :], k=k)}


def in_blocks(paths: dict, queries: np.ndarray, rounds: int = 4) -> dict[str, float]:
    """Median seconds per call of each path (after one warm call each), the paths taking turns in
    ``rounds`` blocks of queries, each block after a pause (``_common.take_turns``)."""
    for fn in paths.values():  # warm
        fn(queries[0])
    times = C.take_turns(paths, queries, rounds)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def build_flat_store(root: Path, X: np.ndarray):
    import retrostore

    st = retrostore.create(root, index="Flat", embedder=C.PrecomputedOnly())
    st.append([f"chunk {i}" for i in range(len(X))], embeddings=X)
    st.commit()
    return st


def main(argv=None) -> int:
    args = parse_args(argv)
    info = C.machine()
    C.print_machine(info)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="scan-bench-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            X = rng.standard_normal((n, C.SYNTH_DIM), dtype=np.float32)
            X /= np.linalg.norm(X, axis=1, keepdims=True)
            queries = rng.standard_normal((args.calls, C.SYNTH_DIM), dtype=np.float32)
            st = build_flat_store(Path(tmp) / f"flat-{n}", X)
            try:
                for busy in (0, args.busy):
                    with C.busy_processes(busy) if busy else contextlib.nullcontext():
                        for part, paths in (("kernel", kernel_paths(X)), ("store", store_paths(st, X))):
                            med = in_blocks(paths, queries)
                            base = next(iter(med.values()))
                            for name, t in med.items():
                                rows.append([f"{n:,}", part, busy, name, C.ms(t), f"{t / base:.2f}x"])
                            print(rows[-len(med):], flush=True)
            finally:
                st.close()
    body = "\n".join([
        C.table(["vectors", "part", "busy processes", "path", "median ms", "vs the first row of its group"], rows),
        "",
        f"{C.SYNTH_DIM}-d random unit vectors, one query per call, {args.calls} calls per path in 4 blocks taking "
        f"turns, each after a {C.TURN_PAUSE_S:g} s pause; "
        f"FAISS {faiss.__version__}; numpy's BLAS on its default threads. 'busy': CPU-bound processes started "
        "by the benchmark. Below 1.00x is faster than the first row of its group.",
    ])
    return C.finish(args, "scan", "one query's exact scan: numpy's OpenBLAS product against the store's scan", body,
                    info)


if __name__ == "__main__":
    raise SystemExit(main())
