"""Same-document exclusion when a document is a book: ``precompute_neighbors(exclude_same_doc=True)``.

What is measured
----------------
A RETRO training set excludes each chunk's own document from its neighbours
(Borgeaud et al. 2021, §2.4). For a chunk of a long document (a book), its
nearest chunks are mostly its own, so the first candidates (k + 8) hold fewer
than k admissible ones. The store used to fetch twice as many candidates
until k were admissible (up to the whole document per chunk); it now leaves
the document's chunks out inside the index search (FAISS's ID selector, exact
and IVF indexes; IVF probes more lists for rows still short) or, on a graph
of at most 262,144 chunks, scans the stored vectors exactly
(``retrostore.store.retrieval``).

The store: ``tinyshakespeare.txt`` as ONE document (~4,500 chunks) plus the
first ``--docs`` pydocs documents (built once, embedded; or ``--store``).
For each index (``--indexes``; the store is copied and reindexed from its
stored vectors, nothing embedded again), in one run, side by side:

* ``precompute_neighbors(out, k=2, exclude_same_doc=True)`` as shipped;
* the same with the former path (widening only: ``Reader.can_leave_out``
  False and ``EXACT_OUTSIDE_MAX`` 0, monkeypatched in this process);
* a plain k=2 search of all stored vectors (no exclusion), the floor.

Each output is checked against an exact answer (numpy over the stored
vectors, every 7th chunk): recall@2 overall and for the book's chunks, empty
slots, neighbours from the query's own document.

Usage::

    python benchmarks/exclusion.py [--store PATH] [--docs 60] [--indexes 'own;IVF64,PQ48x4fs:nprobe=16;Flat'] [--record]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SHAKESPEARE = C.PYDOCS.parent / "tinyshakespeare.txt"
#: Index variants: (label, factory or None for the store's own, search parameters).
DEFAULT_INDEXES = "own;IVF64,PQ48x4fs:nprobe=16:rerank=50;Flat"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", help="an existing store (copied, never changed) instead of building one")
    p.add_argument("--docs", type=int, default=60, help="pydocs documents beside the book (default 60)")
    p.add_argument("--indexes", default=DEFAULT_INDEXES,
                   help="';'-separated: 'own' (the store's index) or FACTORY[:param=value...] "
                        f"(default {DEFAULT_INDEXES})")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--work-dir", help="keep the built store here (default: a temporary directory)")
    p.add_argument("--record", action="store_true", help="write the results into docs/benchmarks.md")
    return p.parse_args(argv)


def build(work: Path, docs: list, n_docs: int) -> Path:
    book = SHAKESPEARE.read_text(encoding="utf-8")
    return C.build_tmp_store(work, [(book, {"name": "tinyshakespeare"})] + docs[:n_docs])


def variants(spec: str) -> list[tuple[str, str | None, dict]]:
    """``own;FACTORY:param=value:...;...`` as (label, factory or None, params)."""
    res = []
    for item in spec.split(";"):
        name, *params = item.split(":")
        res.append((name, None if name == "own" else name,
                    {k: float(v) if "." in v else int(v) for k, v in (p.split("=") for p in params)}))
    return res


def exact_truth(st, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reader = st._reader
    n = reader.limit
    stored = reader.version.stored_vectors(0, n)
    own = reader.doc_ids_of(np.arange(n))
    scores = stored[rows] @ stored.T
    scores[own[rows][:, None] == own[None, :]] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k], own


def check(knn: np.ndarray, truth: np.ndarray, own: np.ndarray, rows: np.ndarray, k: int, book_doc: int) -> dict:
    got = knn[rows]
    hit = np.array([len(set(a) & set(b)) / k for a, b in zip(got.tolist(), truth.tolist())])
    book = own[rows] == book_doc
    valid = knn >= 0
    same = int((own[np.where(valid, knn, 0)] == own[:, None])[valid].sum())
    return {"recall": float(hit.mean()), "recall_book": float(hit[book].mean()) if book.any() else float("nan"),
            "empty": int((~valid).sum()), "same": same}


def run_variant(path: Path, tmp: Path, label: str, factory: str | None, params: dict, k: int) -> dict:
    import retrostore
    from retrostore.store import retrieval

    copy = tmp / f"v-{abs(hash(label))}.rstore"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(path, copy)
    if factory is not None:
        with retrostore.open(copy, "a") as w:
            t_re, _ = C.timed(w.reindex, factory, params=params or None, progress=False)
        print(f"{label}: reindexed in {t_re:.1f} s", flush=True)
    out: dict = {"label": label}
    with retrostore.open(copy) as st:
        out["factory"] = st.manifest["index"]["factory"]
        out["params"] = {k2: v for k2, v in st.info()["index"]["params"].items() if k2 != "nlist"}
        n = len(st)
        own_all = st._reader.all_doc_ids()
        book_doc = int(np.bincount(own_all).argmax())
        out["n"], out["book"] = n, int((own_all == book_doc).sum())
        rows = np.arange(0, n, 7)
        truth, own = exact_truth(st, k, rows)
        vecs = st._reader.version.stored_vectors(0, n)
        t0 = time.perf_counter()
        for s in range(0, n, 1024):
            st.search_vectors(vecs[s : s + 1024], k)
        out["plain"] = time.perf_counter() - t0
        for name, former in (("now", False), ("former", True)):
            target = tmp / f"{name}.npy"
            target.unlink(missing_ok=True)
            reader = st._reader
            saved = retrieval.EXACT_OUTSIDE_MAX
            if former:
                reader.can_leave_out = lambda: False  # instance attribute: this handle only
                retrieval.EXACT_OUTSIDE_MAX = 0
            try:
                t, _ = C.timed(st.precompute_neighbors, target, k=k, exclude_same_doc=True, progress=False)
            finally:
                retrieval.EXACT_OUTSIDE_MAX = saved
                reader.__dict__.pop("can_leave_out", None)
            out[name] = {"seconds": t, **check(np.load(target), truth, own, rows, k, book_doc)}
            print(f"{label} {name}: {t:.1f} s {json.dumps(out[name])}", flush=True)
    shutil.rmtree(copy, ignore_errors=True)
    return out


def report(results: list[dict], k: int) -> str:
    r0 = results[0]
    rows = []
    for r in results:
        for name, title in (("now", "now"), ("former", "former: candidates widened")):
            m = r[name]
            rows.append([f"`{r['factory']}` {json.dumps(r['params'])}" if name == "now" else "", title,
                         f"**{m['seconds']:.1f}**" if name == "now" else f"{m['seconds']:.1f}",
                         f"{m['seconds'] / r['plain']:.1f}x",
                         f"**{r['former']['seconds'] / r['now']['seconds']:.1f}x**" if name == "now" else "",
                         f"{m['recall']:.4f}", f"{m['recall_book']:.4f}", m["empty"], m["same"]])
    tbl = C.table(["index", "path", "precompute s", "vs plain k-search", "speed-up", "recall@k (every 7th chunk)",
                   "recall@k, the book's chunks", "empty slots", "own-document neighbours"], rows)
    plain = ", ".join(f"`{r['factory']}` {r['plain']:.2f} s" for r in results)
    return "\n".join([
        f"Store: {r0['n']:,} chunks, its largest document {r0['book']:,} chunks (tinyshakespeare.txt as one document "
        "when this benchmark builds the store, beside pydocs documents); "
        f"`precompute_neighbors(out, k={k}, exclude_same_doc=True)` over every chunk, as shipped and with "
        "the former path (candidates doubled until k are admissible), in one process, one after the other; recall "
        "against an exact search of the stored vectors (own document left out), every 7th chunk. Plain k-search of "
        f"all stored vectors (no exclusion): {plain}.",
        "",
        tbl,
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    info, docs = C.start(None)
    with tempfile.TemporaryDirectory(prefix="rs-bench-exclusion-") as tmpd:
        tmp = Path(tmpd)
        if args.store:
            path = Path(args.store)
        else:
            work = Path(args.work_dir) if args.work_dir else tmp
            work.mkdir(parents=True, exist_ok=True)
            path = build(work, docs, args.docs)
        results = [run_variant(path, tmp, label, factory, params, args.k)
                   for label, factory, params in variants(args.indexes)]
    body = report(results, args.k)
    return C.finish(args, "exclusion", "same-document exclusion with a book-length document", body, info)


if __name__ == "__main__":
    sys.exit(main())
