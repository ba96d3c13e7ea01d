"""RETRO neighbour retrieval: ``Store.neighbors`` throughput and ``precompute_neighbors`` time.

What is measured
----------------
1. ``store.neighbors(token_ids, k=2)`` for batches of B rows of L = 512
   tokens (C = 8 query chunks of 64 tokens per row) for each B of
   ``--batches`` (default 1, 8, 32), in query chunks per second. Rows are
   consecutive 512-token windows of pydocs documents that are not in the store
   (when there are any). In the same loop, the parts are timed separately on
   the same rows:

   * embedding: ``store.embedder.embed_token_ids`` of the B x C chunks;
   * index search: ``store.search_vectors(vecs, k)``;
   * token fetch: the LMDB reads of the neighbour chunks and their
     continuations (``store._table.get_chunks``), as ``neighbors`` does;
   * other: end to end minus the parts (input checks, splitting, and the
     assembly of the (B, C, k, 128) token and mask arrays).

   Each round runs every B (order rotating between rounds) with the same
   number of rows, end-to-end call and parts alternating; medians per call.

2. ``store.precompute_neighbors(out, k=2, exclude_same_doc=True)`` over every
   chunk of the store (the RETRO training setup; exact search with the store's
   ``Flat`` index), in chunks per second. For reference it is compared, in the
   same run, with a plain exact k=2 search of all stored vectors without
   exclusion (``search_vectors`` in batches of 1024), the cost floor of the
   search itself. The output is checked: no neighbour from the query's own
   document, no missing neighbour.

3. RETRO training and generation (``benchmarks/retro.py``'s parts 1 and 2, issue 15):
   tokens for a query chunk from precomputed neighbour ids (``retro.NeighborFile``: LMDB reads,
   nothing embedded; and from an in-memory ``retro.chunk_table``) against ``neighbors()``
   (target: >= 100x faster per chunk), and the retrieval of one 64-token chunk at generation
   time (B = 1, k = 2) split into embed (the embedder alone) / search (``search_vectors``) /
   fetch (``neighbor_tokens`` of the k ids), with retro-pytorch's ``fetch_fn`` end to end
   (targets: search + fetch <= 1 ms; end to end minus search and fetch near the embedder alone).

The store is built from the first ``--docs`` pydocs documents (default 100)
into a temporary directory, or all 497 with ``--full``, or an existing store
is opened read-only with ``--store PATH``; ``out`` is always written to a
temporary directory, never into the store.

The machine is shared and noisy: compare the shares and ratios measured in one
run, not absolute times between runs.

Run ``python benchmarks/neighbors.py --help`` for the options; ``--record``
writes the result into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _common as C
import retro as retro_bench  # benchmarks/retro.py


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="use this existing store (opened read-only) instead of building one")
    p.add_argument("--corpus", help="input .jsonl[.gz|.zst] (default: pydocs, else examples/pydocs-sample)")
    p.add_argument("--docs", type=int, default=100, help="documents in the built store (default 100)")
    p.add_argument("--full", action="store_true", help="build the store from the whole corpus")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes B (default 1,8,32)")
    p.add_argument("--length", type=int, default=512, help="tokens per row L (default 512)")
    p.add_argument("--k", type=int, default=2, help="neighbours per chunk (default 2, as RETRO)")
    p.add_argument("--rows", type=int, default=32,
                   help="rows per batch size per round (default 32; at least the largest B)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the batch sizes (default 3)")
    p.add_argument("--no-precompute", action="store_true", help="skip the precompute_neighbors timing")
    p.add_argument("--gen", type=int, default=100, help="chunks timed at generation time, part 3 (default 100)")
    p.add_argument("--token-rows", type=int, default=16,
                   help="rows of 512 stored tokens for neighbors() against ids -> tokens, part 3 (default 16)")
    p.add_argument("--no-retro", action="store_true", help="skip part 3")
    p.add_argument("--threads", type=int, help="onnxruntime/FAISS threads (default: usable CPUs)")
    p.add_argument("--quick", action="store_true", help="small run: 20 docs, B in 1,8, 8 rows, 2 rounds")
    p.add_argument("--record", action="store_true", help="write the results into docs/benchmarks.md")
    a = p.parse_args(argv)
    a.batches = [int(x) for x in a.batches.split(",")]
    if a.quick:
        a.docs, a.rows, a.rounds = min(a.docs, 20), min(a.rows, 8), min(a.rounds, 2)
        a.batches = [b for b in a.batches if b <= 8] or [1]
    a.rows = max(a.rows, max(a.batches))
    return a


def token_rows(chunker, texts: list[str], length: int, n: int) -> np.ndarray:
    """``n`` rows of ``length`` consecutive tokens from the documents, in order."""
    rows = []
    for text in texts:
        ids, _ = chunker.encode(text)
        for s in range(0, len(ids) - length + 1, length):
            rows.append(ids[s : s + length])
            if len(rows) == n:
                return np.stack(rows).astype(np.int64)
    if not rows:
        raise SystemExit(f"no document has {length} tokens")
    return np.stack([rows[i % len(rows)] for i in range(n)]).astype(np.int64)


def fetch(st, ids: np.ndarray) -> list:
    """The LMDB reads ``neighbors`` makes for neighbour ids (chunks and continuations)."""
    limit = len(st)
    flat = ids.ravel()
    wanted = sorted({int(i) for i in flat if i >= 0} | {int(i) + 1 for i in flat if 0 <= i and i + 1 < limit})
    return st._table.get_chunks(wanted, limit)


def bench_neighbors(st, rows: np.ndarray, args) -> dict:
    from retrostore.store.retrieval import _split_chunks

    t = int(st.manifest["chunk_tokens"])
    k = args.k
    emb = st.embedder
    st.neighbors(rows[:1], k=k)  # warm-up
    res = {b: {"e2e": [], "embed": [], "search": [], "fetch": []} for b in args.batches}
    for r in range(args.rounds):
        order = args.batches[r % len(args.batches):] + args.batches[: r % len(args.batches)]
        for b in order:
            for call, start in enumerate(range(0, args.rows - b + 1, b)):
                x = rows[start : start + b]

                def parts():
                    chunks, _ = _split_chunks(x, t)
                    dt, vecs = C.timed(emb.embed_token_ids, chunks)
                    res[b]["embed"].append(dt)
                    dt, (_, ids) = C.timed(st.search_vectors, vecs, k)
                    res[b]["search"].append(dt)
                    dt, _ = C.timed(fetch, st, ids)
                    res[b]["fetch"].append(dt)
                    return ids

                if call % 2:
                    ids = parts()
                dt, nb = C.timed(st.neighbors, x, k=k)
                res[b]["e2e"].append(dt)
                if not call % 2:
                    ids = parts()
                if not np.array_equal(nb.chunk_ids.reshape(-1, k), ids):
                    raise SystemExit(f"B={b}: neighbors() and its parts disagree")
    res["C"] = -(-rows.shape[1] // t)
    return res


def bench_precompute(st, tmp: Path, k: int) -> dict:
    import retrostore.store.precompute as _precompute
    from retrostore.store.reading import Reader
    from retrostore.store.version import Version

    out = tmp / "neighbors.npy"
    n = len(st)
    # Instrumented run: every index search it makes (rows, candidates) and its other parts.
    timer, calls = C.Timer(), []
    search = st._reader.search_vectors  # what the precompute calls

    def counted(v, kk):
        t0 = time.perf_counter()
        try:
            return search(v, kk)
        finally:
            calls.append((len(v), kk, time.perf_counter() - t0))

    st._reader.search_vectors = timer.wrap("search", counted)  # instance attribute: this handle only
    try:
        with C.patched((_precompute, "atomic_write", timer.wrap("progress file", _precompute.atomic_write)),
                       (Version, "stored_vectors", timer.wrap("vectors", Version.stored_vectors)),
                       (Reader, "all_doc_ids", timer.wrap("doc ids", Reader.all_doc_ids))):
            t_pre, _ = C.timed(st.precompute_neighbors, out, k=k, exclude_same_doc=True, progress=False)
    finally:
        del st._reader.search_vectors
    first = [c for c in calls if c[1] == k + max(8, k)]
    retries = [c for c in calls if c[1] != k + max(8, k)]
    per_k: dict[int, list] = {}
    for rows, kk, dt in calls:
        agg = per_k.setdefault(kk, [0, 0, 0.0])
        agg[0] += 1
        agg[1] += rows
        agg[2] += dt
    got = np.load(out, mmap_mode="r")
    doc = st._reader.all_doc_ids()
    valid = got >= 0
    same = int((doc[np.where(valid, got, 0)] == doc[:, None])[valid].sum())
    missing = int((~valid).sum())
    # Reference, same run: plain exact search of every stored vector, k neighbours, no exclusion.
    t_vec, vecs = C.timed(st._head.version.stored_vectors, 0, n)
    t0 = time.perf_counter()
    for s in range(0, n, 1024):
        st.search_vectors(vecs[s : s + 1024], k)
    t_plain = time.perf_counter() - t0
    # The candidate search precompute makes (k + max(8, k) candidates, before filtering).
    t0 = time.perf_counter()
    for s in range(0, n, 1024):
        st.search_vectors(vecs[s : s + 1024], k + max(8, k))
    t_cand = time.perf_counter() - t0
    return {"n": n, "pre": t_pre, "plain": t_plain, "cand": t_cand, "vec": t_vec, "same": same,
            "missing": missing, "shape": tuple(got.shape), "parts": dict(timer.seconds),
            "first_calls": len(first), "retry_calls": len(retries), "retry_rows": sum(r for r, _, _ in retries),
            "retry_max_k": max((kk for _, kk, _ in retries), default=0), "per_k": per_k}


def report(res: dict, pre: dict | None, args, meta: dict) -> str:
    c = res["C"]
    rows = []
    for b in args.batches:
        r = res[b]
        e2e = C.median(r["e2e"])
        parts = [C.median(r[p]) for p in ("embed", "search", "fetch")]
        other = C.median([e - a - s - f for e, a, s, f in zip(r["e2e"], r["embed"], r["search"], r["fetch"])])
        n_chunks = b * c
        rows.append([b, n_chunks, len(r["e2e"]), f"{e2e * 1e3:.1f}", f"**{n_chunks / e2e:.0f}**",
                     *(f"{100 * p / e2e:.1f}%" for p in parts), f"{100 * other / e2e:.1f}%",
                     f"{n_chunks / parts[0]:.0f}"])
    tbl = C.table(["B", "query chunks/call", "calls", "median ms/call", "chunks/s", "embedding", "index search",
                   "token fetch", "other", "embedder-alone chunks/s"], rows)
    lines = [
        f"Store: {meta['n_docs']} pydocs documents, {meta['n_chunks']} chunks, index `{meta['factory']}`, "
        f"{meta['where']}. Query rows: L = {args.length} tokens (C = {c} chunks of 64) from {meta['source']}; "
        f"k = {args.k}; {args.rounds} rounds x {args.rows} rows per B; medians per call; shares are of the "
        "end-to-end median.",
        "",
        "`store.neighbors(token_ids (B, L), k)`:",
        "",
        tbl,
    ]
    if pre is not None:
        n = pre["n"]
        ptbl = C.table(
            ["measure", "seconds", "chunks/s", "vs plain search"],
            [[f"**`precompute_neighbors(out, k={args.k}, exclude_same_doc=True)`**", f"**{pre['pre']:.2f}**",
              f"**{n / pre['pre']:.0f}**", f"{pre['pre'] / pre['plain']:.2f}x"],
             [f"plain exact search of all stored vectors, k={args.k} (reference)", f"{pre['plain']:.2f}",
              f"{n / pre['plain']:.0f}", "1.00x"],
             [f"same with k={args.k + max(8, args.k)} (the candidates precompute fetches)", f"{pre['cand']:.2f}",
              f"{n / pre['cand']:.0f}", f"{pre['cand'] / pre['plain']:.2f}x"],
             ["reading all stored vectors (`Version.stored_vectors`)", f"{pre['vec']:.2f}", f"{n / pre['vec']:.0f}", ""]])
        p = pre["parts"]
        rest = pre["pre"] - sum(p.values())
        split = C.table(
            ["part of precompute_neighbors", "seconds", "share"],
            [[f"index search: {pre['first_calls']} first calls (k + 8 candidates) + {pre['retry_calls']} retries "
              f"({pre['retry_rows']} rows, up to k = {pre['retry_max_k']})", f"{p.get('search', 0):.2f}",
              f"{100 * p.get('search', 0) / pre['pre']:.1f}%"],
             ["stored vectors (`Version.stored_vectors`)", f"{p.get('vectors', 0):.2f}",
              f"{100 * p.get('vectors', 0) / pre['pre']:.1f}%"],
             ["document ids (`Reader.all_doc_ids`)", f"{p.get('doc ids', 0):.2f}",
              f"{100 * p.get('doc ids', 0) / pre['pre']:.1f}%"],
             ["progress file (`atomic_write`, once per batch)", f"{p.get('progress file', 0):.2f}",
              f"{100 * p.get('progress file', 0) / pre['pre']:.1f}%"],
             ["other (exclusion filtering in Python, memmap writes)", f"{rest:.2f}",
              f"{100 * rest / pre['pre']:.1f}%"]])
        krows = [[kk, c, r, f"{100 * r / n:.1f}%", f"{t:.2f}", f"{100 * t / pre['pre']:.1f}%", f"{1e3 * t / r:.2f}"]
                 for kk, (c, r, t) in sorted(pre["per_k"].items())]
        ktbl = C.table(["candidates k", "search calls", "query rows", "rows / store", "seconds", "share of precompute",
                        "ms per row"], krows)
        lines += ["", f"Precomputed neighbours for the whole store ({n} chunks, output {pre['shape']} int64; "
                  f"check: {pre['same']} same-document neighbours, {pre['missing']} missing):", "", ptbl,
                  "", "Where the precompute time goes (timed inside the run above):", "", split,
                  "", "Its index searches by number of candidates (the first pass fetches k + max(8, k); rows whose "
                  "candidates are all from the query's own document are searched again with twice as many):", "",
                  ktbl]
    return "\n".join(lines)


def retro_report(p1: dict, p2: dict, k: int, batch: int) -> str:
    """Part 3: benchmarks/retro.py's table and the issue's targets, judged."""
    ns = argparse.Namespace(k=k, batch=batch)
    med = C.median
    ratio = med(p1["neighbors"]) / med(p1["lmdb"])
    sf = med(np.add(p2["search"], p2["fetch"]))
    embed_in_e2e = med(np.subtract(p2["e2e"], np.add(p2["search"], p2["fetch"])))
    return "\n".join([
        "RETRO training and generation (`benchmarks/retro.py` parts 1-2):", "",
        retro_bench.report(p1, p2, None, ns), "",
        f"Targets: tokens from precomputed ids {ratio:.0f}x faster per chunk than neighbors() (target >= 100x: "
        f"{'met' if ratio >= 100 else 'NOT met'}); generation-time search + fetch {sf * 1e3:.2f} ms (target <= 1 ms: "
        f"{'met' if sf <= 1e-3 else 'NOT met'}); fetch_fn end to end minus search and fetch "
        f"{embed_in_e2e * 1e3:.1f} ms against the embedder alone {med(p2['embed']) * 1e3:.1f} ms "
        f"({embed_in_e2e / med(p2['embed']):.2f}x)."])


def main(argv=None) -> int:
    args = parse_args(argv)
    import retrostore

    info, docs = C.start(args.corpus)
    with tempfile.TemporaryDirectory(prefix="rs-bench-neighbors-") as tmp:
        tmp = Path(tmp)
        if args.store:
            path = Path(args.store)
            where = f"`{path}` (read-only)"
        else:
            n_docs = len(docs) if args.full else min(args.docs, len(docs))
            path = C.build_tmp_store(tmp, docs[:n_docs])
            where = "built in a temporary directory"
        with retrostore.open(path, "r", threads=args.threads) as st:
            in_store = int(st.manifest["next_doc_id"])
            held_out = [t for t, _ in docs[in_store:]] if in_store < len(docs) else []
            source = (f"{len(held_out)} held-out documents (not in the store)" if held_out else
                      "documents that are in the store (no held-out documents left)")
            rows = token_rows(st.chunker, held_out or [t for t, _ in docs], args.length, args.rows)
            meta = {"n_docs": in_store, "n_chunks": len(st), "factory": st.manifest["index"]["factory"],
                    "where": where, "source": source}
            print(f"store {path}: {len(st)} chunks, {in_store} documents; {len(rows)} rows from {source}",
                  flush=True)
            res = bench_neighbors(st, rows, args)
            pre = None if args.no_precompute else bench_precompute(st, tmp, args.k)
            part3 = None
            if not args.no_retro:
                ns = argparse.Namespace(k=args.k, rows=args.token_rows, batch=1024, gen=args.gen)
                part3 = retro_report(retro_bench.part1(st, ns, tmp), retro_bench.part2(st, ns), args.k, ns.batch)
    body = report(res, pre, args, meta) + ("\n\n" + part3 if part3 else "")
    key = "neighbors-quick" if args.quick else ("neighbors-full" if meta["n_docs"] >= len(docs) else "neighbors")
    return C.finish(args, key, f"RETRO neighbours ({meta['n_docs']} documents, {meta['n_chunks']} chunks)", body,
                    info)


if __name__ == "__main__":
    sys.exit(main())
