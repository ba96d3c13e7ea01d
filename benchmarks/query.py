"""Query latency of ``Store.search`` end to end and of its parts, and batch throughput.

What is measured
----------------
``store.search(text, k=5)`` embeds the query text, searches the FAISS index
segments and fetches the hits (with their continuations) from LMDB. For
``--queries`` real query texts (sentences sampled with a fixed seed from
pydocs documents that are not in the store, when there are any), each query
is timed, in the same loop:

* end to end: ``store.search(q, k=5)``;
* embedding: ``store.embedder.embed([q])``;
* index search: ``store.search_vectors(vec, 5)``;
* LMDB fetch: ``store._reader.hits(scores, ids)`` (chunk records and continuations);

alternating which comes first from one query to the next. p50 and p99 are
reported per part, and each part's share of the end-to-end time (ratio of
means, so shares add up; "other" is input checks and glue).

Batch throughput: ``store.search(batch, k=5)`` with batches of ``--batch``
queries, interleaved with the same queries searched one at a time; queries/s
of both and their ratio (with the parts of a batched search).

Threads: embedding and index search, for one query and for a batch, with the
store's threads (one per usable CPU, for onnxruntime and FAISS's OpenMP)
against one thread, interleaved; on a busy machine fewer threads can be
faster (``--no-threads`` skips this).

The store is built from the first ``--docs`` pydocs documents (default 100)
into a temporary directory, or all 497 with ``--full``, or an existing store
is opened read-only with ``--store PATH`` (never written).

The machine is shared and noisy: compare the shares and ratios measured in one
run, not absolute times between runs.

Run ``python benchmarks/query.py --help`` for the options; ``--record`` writes
the result into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _common as C


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="use this existing store (opened read-only) instead of building one")
    p.add_argument("--corpus", help="input .jsonl[.gz|.zst] (default: pydocs, else examples/pydocs-sample)")
    p.add_argument("--docs", type=int, default=100, help="documents in the built store (default 100)")
    p.add_argument("--full", action="store_true", help="build the store from the whole corpus")
    p.add_argument("--queries", type=int, default=200, help="query texts (default 200)")
    p.add_argument("--k", type=int, default=5, help="hits per query (default 5)")
    p.add_argument("--batch", type=int, default=64, help="queries per batched search (default 64)")
    p.add_argument("--batch-rounds", type=int, default=5, help="batched/single rounds (default 5)")
    p.add_argument("--threads", type=int, help="onnxruntime/FAISS threads (default: usable CPUs)")
    p.add_argument("--no-threads", action="store_true",
                   help="skip the comparison of the store's threads against 1 thread")
    p.add_argument("--quick", action="store_true", help="small run: 20 docs, 50 queries, 3 batch rounds")
    p.add_argument("--record", action="store_true", help="write the results into docs/benchmarks.md")
    a = p.parse_args(argv)
    if a.quick:
        a.docs, a.queries, a.batch_rounds = min(a.docs, 20), min(a.queries, 50), min(a.batch_rounds, 3)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    import retrostore

    info, docs = C.start(args.corpus)
    with tempfile.TemporaryDirectory(prefix="rs-bench-query-") as tmp:
        if args.store:
            path = Path(args.store)
        else:
            n_docs = len(docs) if args.full else min(args.docs, len(docs))
            path = C.build_tmp_store(Path(tmp), docs[:n_docs])
        with retrostore.open(path, "r", threads=args.threads) as st:
            in_store = int(st.manifest["next_doc_id"])
            held_out = [t for t, _ in docs[in_store:]] if in_store < len(docs) else []
            source = (f"{len(held_out)} held-out documents (not in the store)" if held_out else
                      "documents that are in the store (no held-out documents left)")
            queries = C.sample_sentences(held_out or [t for t, _ in docs], args.queries, seed=0)
            print(f"store {path}: {len(st)} chunks, {in_store} documents; "
                  f"{len(queries)} query sentences from {source}", flush=True)
            result = run(st, queries, args)
    body = report(result, args, path if args.store else None, source)
    key = "query-quick" if args.quick else ("query-full" if result["n_docs"] >= len(docs) else "query")
    return C.finish(args, key, f"query latency ({result['n_docs']} documents, {result['n_chunks']} chunks)", body,
                    info)


def run(st, queries: list[str], args) -> dict:
    k = args.k
    emb = st.embedder  # loaded before timing
    for q in queries[:10]:  # warm-up
        st.search(q, k=k)
    e2e, t_emb, t_search, t_fetch = [], [], [], []

    def parts(q):
        dt, v = C.timed(emb.embed, [q])
        t_emb.append(dt)
        dt, (s, ids) = C.timed(st.search_vectors, v, k)
        t_search.append(dt)
        dt, hits = C.timed(st._reader.hits, s, ids)
        t_fetch.append(dt)
        return hits

    for i, q in enumerate(queries):
        if i % 2:
            hits = parts(q)
        dt, got = C.timed(st.search, q, k=k)
        e2e.append(dt)
        if not i % 2:
            hits = parts(q)
        if [h.chunk_id for h in got] != [h.chunk_id for h in hits[0]]:
            raise SystemExit(f"query {i}: search() and its parts disagree")

    # Batched search against the same queries one at a time, interleaved.
    b = args.batch
    rng = np.random.default_rng(1)
    batch_s, single_s, b_emb, b_search, b_fetch = [], [], [], [], []
    for r in range(args.batch_rounds):
        batch = [queries[i] for i in rng.choice(len(queries), size=b, replace=len(queries) < b)]
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for which in order:
            if which == 0:
                dt, _ = C.timed(st.search, batch, k=k)
                batch_s.append(dt)
            else:
                t0 = time.perf_counter()
                for q in batch:
                    st.search(q, k=k)
                single_s.append(time.perf_counter() - t0)
        dt, v = C.timed(emb.embed, batch)
        b_emb.append(dt)
        dt, (s, ids) = C.timed(st.search_vectors, v, k)
        b_search.append(dt)
        dt, _ = C.timed(st._reader.hits, s, ids)
        b_fetch.append(dt)
    threads = None if args.no_threads or st.threads < 2 else compare_threads(st, queries, args)
    return {"threads": threads, "e2e": e2e, "embed": t_emb, "search": t_search, "fetch": t_fetch,
            "batch": batch_s, "single": single_s, "b_embed": b_emb, "b_search": b_search, "b_fetch": b_fetch,
            "n_chunks": len(st), "n_docs": int(st.manifest["next_doc_id"]),
            "segments": len(st.manifest["index"]["segments"]), "factory": st.manifest["index"]["factory"]}


def compare_threads(st, queries: list[str], args) -> dict:
    """Latency of embedding and index search with the store's threads against 1 thread, interleaved.

    The store runs onnxruntime and FAISS (OpenMP) with one thread per usable
    CPU; on a busy machine fewer threads can be faster, so both are timed.
    Single queries: up to 100; batches of ``--batch``: ``--batch-rounds``.
    """
    import faiss

    from retrostore import default_embedder

    k, n_th, b = args.k, st.threads, args.batch
    embs = {n_th: st.embedder, 1: default_embedder(threads=1)}
    names = ["embed 1 query", "index search 1 query", f"embed {b} queries", f"index search {b} queries"]
    rng = np.random.default_rng(2)
    out: dict[tuple[str, int], list[float]] = {}
    try:
        for i in range(min(len(queries), 100)):
            one = queries[i : i + 1]
            batch = [queries[j] for j in rng.choice(len(queries), size=b)] if i < args.batch_rounds else None
            v1 = st.embedder.embed(one)
            vb = None if batch is None else st.embedder.embed(batch)
            for th in ((n_th, 1) if i % 2 == 0 else (1, n_th)):
                faiss.omp_set_num_threads(th)
                runs = [(names[0], embs[th].embed, one), (names[1], lambda v: st.search_vectors(v, k), v1)]
                if batch is not None:
                    runs += [(names[2], embs[th].embed, batch), (names[3], lambda v: st.search_vectors(v, k), vb)]
                for name, fn, arg in runs:
                    dt, _ = C.timed(fn, arg)
                    out.setdefault((name, th), []).append(dt)
    finally:
        faiss.omp_set_num_threads(n_th)
    return {"n": n_th, "times": out, "names": names}


def report(r: dict, args, store_path, source: str) -> str:
    n_chunks, n_docs = r["n_chunks"], r["n_docs"]
    e2e = np.asarray(r["e2e"])
    names = [("embedding: `embedder.embed([q])`", "embed"), ("index search: `search_vectors(vec, k)`", "search"),
             ("LMDB fetch: `Reader.hits(scores, ids)`", "fetch")]
    rows = []
    mean_e2e = float(e2e.mean())
    summed = np.zeros_like(e2e)
    for label, key in names:
        x = np.asarray(r[key])
        summed += x
        rows.append([label, C.ms(C.pct(x, 50)), C.ms(C.pct(x, 99)), C.ms(x.mean()), f"{100 * x.mean() / mean_e2e:.1f}%"])
    other = e2e - summed
    rows.append(["other (checks, glue: end to end - parts)", C.ms(C.pct(other, 50)), C.ms(C.pct(other, 99)),
                 C.ms(other.mean()), f"{100 * other.mean() / mean_e2e:.1f}%"])
    rows.append([f"**end to end: `search(q, k={args.k})`**", C.ms(C.pct(e2e, 50)), C.ms(C.pct(e2e, 99)),
                 C.ms(mean_e2e), "100%"])
    lat = C.table(["part", "p50 ms", "p99 ms", "mean ms", "share of end to end"], rows)

    b = args.batch
    bt, st_ = C.median(r["batch"]), C.median(r["single"])
    ratios = [s / t for s, t in zip(r["single"], r["batch"])]
    parts_b = [C.median(r["b_embed"]), C.median(r["b_search"]), C.median(r["b_fetch"])]
    thr = C.table(
        ["measure", "median", "queries/s"],
        [[f"batched: `search(batch of {b}, k={args.k})`", f"{bt * 1e3:.1f} ms", f"{b / bt:.0f}"],
         [f"{b} single `search(q)` calls", f"{st_ * 1e3:.1f} ms", f"{b / st_:.0f}"],
         ["**batched / single throughput**", f"**{C.median(ratios):.2f}x**",
          "per round: " + ", ".join(f"{x:.2f}" for x in ratios)],
         ["batch parts: embed / search / fetch", " / ".join(f"{p * 1e3:.1f}" for p in parts_b) + " ms",
          " / ".join(f"{100 * p / bt:.0f}%" for p in parts_b) + " of batched"]])
    where = f"`{store_path}` (read-only)" if store_path else "built in a temporary directory"
    thr_lines = []
    if r["threads"]:
        t, n = r["threads"]["times"], r["threads"]["n"]
        trows = []
        for name in r["threads"]["names"]:
            a, b1 = C.median(t[(name, n)]), C.median(t[(name, 1)])
            trows.append([name, len(t[(name, n)]), C.ms(a), C.ms(b1), f"**{a / b1:.2f}**"])
        thr_lines = ["", f"Threads: the store's {n} threads (onnxruntime intra-op, FAISS OpenMP) against 1 thread, "
                     "interleaved (medians; ratio > 1: one thread is faster):", "",
                     C.table(["operation", "samples", f"{n} threads ms", "1 thread ms", f"{n} threads / 1 thread"],
                             trows)]
    return "\n".join([
        f"Store: {n_docs} pydocs documents, {n_chunks} chunks, index `{r['factory']}` in {r['segments']} "
        f"segment(s), {where}. {len(r['e2e'])} queries: sentences of 40-300 characters from {source}, "
        f"k = {args.k}; parts timed in the same loop as the end-to-end call.",
        "",
        lat,
        "",
        f"Batch throughput ({len(r['batch'])} interleaved rounds, medians):",
        "",
        thr,
        *thr_lines,
    ])


if __name__ == "__main__":
    sys.exit(main())
