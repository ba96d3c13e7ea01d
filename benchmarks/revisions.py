"""This checkout against another revision of retrostore, side by side in one run.

For a change that must not cost speed (a refactor, a move of code between
modules), the same workloads run alternately on both trees, each round in a
fresh process per tree (``PYTHONPATH`` puts the tree first), so both see the
same machine load; the report gives each workload's median per tree and the
ratio this / base (1.00 = no change; the machine is shared and noisy, so read
ratios, not absolute times).

Workloads (no embedding: vectors are random unit vectors, so the library's own
costs are measured, not the ONNX model's):

* ``import``: ``import retrostore`` in a fresh interpreter;
* ``build``: create a store and append + commit the first ``--docs`` pydocs
  documents in 10 batches (chunking real, vectors given), then reopen it;
* ``commit``: 10 commits of 1,000 chunks into a store of ``--vectors`` chunks;
* ``query``: 500 single-query ``search_vectors`` + ``get_chunks`` (hits and
  their continuations) on an exact store of ``--vectors`` chunks (p50).

    python benchmarks/revisions.py --base 8423302 [--rounds 5] [--docs 60] [--vectors 20000]

The base revision is checked out with ``git worktree`` into a temporary
directory (removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("import", "build", "commit", "query")


# -- the workloads, run in a child process (the tree under test first on sys.path) ----------
def _texts(n_docs: int) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import read_pydocs

    return [d["text"] for d in read_pydocs()[:n_docs]]


class _Given:
    """An embedder whose vectors are always given (append(embeddings=...))."""

    dim = 384
    fingerprint = {"name": "given-vectors", "dim": 384}

    def embed(self, texts):  # pragma: no cover - never called
        raise AssertionError("vectors are given")


def _unit(rng, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _work_build(tmp: Path, args) -> dict:
    import retrostore

    texts = _texts(args.docs)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with retrostore.create(tmp / "b.rstore", embedder=_Given(), tokenizer=retrostore.default_tokenizer_path()) as st:
        for part in np.array_split(np.arange(len(texts)), 10):
            docs = [texts[i] for i in part]
            chunks = st.chunker.chunk_many(docs)
            st.append(docs, embeddings=_unit(rng, sum(len(c) for c in chunks)), chunks=chunks)
            st.commit()
    with retrostore.open(tmp / "b.rstore", embedder=_Given()) as st:
        n = len(st)
    return {"seconds": time.perf_counter() - t0, "chunks": n}


def _store_of(tmp: Path, n: int, index: str = "Flat"):
    import retrostore

    rng = np.random.default_rng(1)
    path = tmp / f"s{n}.rstore"
    with retrostore.create(path, embedder=_Given(), index=index,
                           tokenizer=retrostore.default_tokenizer_path()) as st:
        for lo in range(0, n, 5000):
            m = min(5000, n - lo)
            st.append([f"chunk {lo + i} of a synthetic document" for i in range(m)], embeddings=_unit(rng, m))
            st.commit()
    return path


def _work_commit(tmp: Path, args) -> dict:
    import retrostore

    path = _store_of(tmp, args.vectors)
    rng = np.random.default_rng(2)
    times = []
    with retrostore.open(path, "a", embedder=_Given()) as st:
        for r in range(11):
            st.append([f"new {r} {i}" for i in range(1000)], embeddings=_unit(rng, 1000))
            t0 = time.perf_counter()
            st.commit()
            if r:  # the first one warms caches
                times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times)}


def _work_query(tmp: Path, args) -> dict:
    import retrostore

    path = _store_of(tmp, args.vectors)
    rng = np.random.default_rng(3)
    queries = _unit(rng, 500)
    times = []
    with retrostore.open(path, embedder=_Given(), threads=1) as st:
        n = len(st)
        for q in queries:
            t0 = time.perf_counter()
            _, ids = st.search_vectors(q, 10)
            want = sorted({int(i) for i in ids[0] if i >= 0} | {int(i) + 1 for i in ids[0] if 0 <= i < n - 1})
            st.get_chunks(want)
            times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times)}


def _worker(name: str, args) -> None:
    if name == "import":
        t0 = time.perf_counter()
        import retrostore

        out = {"seconds": time.perf_counter() - t0, "file": retrostore.__file__}
    else:
        with tempfile.TemporaryDirectory() as d:
            out = {"build": _work_build, "commit": _work_commit, "query": _work_query}[name](Path(d), args)
        import retrostore

        out["file"] = retrostore.__file__
    print(json.dumps(out))


# -- the driver -------------------------------------------------------------------------------
def _run(tree: Path, name: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--docs", str(args.docs),
           "--vectors", str(args.vectors)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=1800)
    if res.returncode:
        raise SystemExit(f"{name} on {tree} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if not out["file"].startswith(str(tree)):
        raise SystemExit(f"{name}: imported {out['file']}, not the tree {tree}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="git revision to compare with (required unless --worker)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--docs", type=int, default=60, help="pydocs documents in the build workload")
    ap.add_argument("--vectors", type=int, default=20_000, help="chunks in the commit and query stores")
    ap.add_argument("--only", nargs="*", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, args)
        return
    if not args.base:
        ap.error("--base REV is required")
    base_dir = Path(tempfile.mkdtemp(prefix="retrostore-base-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_dir), args.base],
                   check=True, capture_output=True)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    try:
        trees = {"this": ROOT, "base": base_dir}
        times: dict[str, dict[str, list[float]]] = {w: {"this": [], "base": []} for w in args.only}
        for r in range(args.rounds):
            for w in args.only:
                order = ("this", "base") if r % 2 == 0 else ("base", "this")
                for t in order:
                    times[w][t].append(_run(trees[t], w, args)["seconds"])
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        print(f"\nretrostore {rev} (this) vs {args.base} (base), {args.rounds} rounds alternating, "
              f"load {os.getloadavg()[0]:.1f}, {len(os.sched_getaffinity(0))} CPUs\n")
        print("| workload | this (median) | base (median) | this / base | per-round ratios |")
        print("|---|---|---|---|---|")
        for w in args.only:
            a, b = times[w]["this"], times[w]["base"]
            ratios = [x / y for x, y in zip(a, b)]
            unit = 1e3 if statistics.median(a) < 1 else 1
            u = "ms" if unit == 1e3 else "s"
            print(f"| {w} | {statistics.median(a) * unit:.2f} {u} | {statistics.median(b) * unit:.2f} {u} | "
                  f"**{statistics.median(ratios):.2f}** | {', '.join(f'{x:.2f}' for x in ratios)} |")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_dir)], capture_output=True)


if __name__ == "__main__":
    main()
