"""RETRO training and generation on a store: tokens from precomputed ids vs ``neighbors()``,
per-chunk retrieval latency at generation time, and the cost of an LM chunk tokenizer.

What is measured (one run, side by side; public API only)
-----------------------------------------------------------
1. **Tokens from precomputed ids vs** ``Store.neighbors``, per query chunk, k = 2:

   * ``neighbors``: ``store.neighbors(rows, k)`` on ``--rows`` rows of L = 512 stored tokens
     (C = 8 chunks each): embed + search + LMDB reads;
   * ``ids -> tokens (LMDB)``: ``retro.NeighborFile(store, knn.npy).tokens(a, b)`` over
     row ranges of ``precompute_neighbors`` output (``--batch`` rows a call): reads the
     distinct neighbour chunks and continuations with ``Store.get_chunks``;
   * ``ids -> tokens (table)``: the same with a ``retro.chunk_table`` in memory (no reads).

   The ratio neighbors / ids->tokens is the speed-up of training from precomputed ids.

2. **Generation-time retrieval of one 64-token chunk** (B = 1, k = 2), split into
   ``embed`` (``embedder.embed_token_ids``), ``search`` (``store.search_vectors``),
   ``fetch`` (``retro.neighbor_tokens`` of the k ids: chunks + continuations), and the end to
   end ``retro.fetch_fn(store, k)`` call (what retro-pytorch's ``TrainingWrapper.generate``
   makes every 64 tokens). Medians over ``--gen`` chunks of stored documents.

3. **Export** (``--export``): ``retro.export_retro_pytorch(store, ..., seq_len=512, k)``
   (packed windows, sequence exclusion, duplicate and 13-gram filters) end to end, with its
   summary (candidates dropped per rule, chunks searched again), the store's exact-duplicate
   chunks (``retro.duplicate_chunks``), and, where retro-pytorch is installed, the time
   its ``RETRODataset`` takes to yield every row and whether every row equals
   ``retro.TrainingSet``'s.

4. **LM chunk tokenizer** (``--lm-tokenizer FILE``, e.g. GPT-2's ``tokenizer.json``): two
   stores of the same ``--lm-docs`` documents, one cut by the default WordPiece, one by the LM
   tokenizer; ``neighbors()`` per query chunk on each, split into decode (LM ids -> text),
   embed (the embedder tokenizes the text again and runs), and the embedder tokens per chunk.

The store is opened read-only with ``--store PATH`` (e.g. a full build of pydocs:
``retrostore build pydocs.rstore ../shared/data/pydocs.jsonl.zst``), or built from the first
``--docs`` pydocs documents into a temporary directory. The machine is shared and noisy:
compare ratios within one run.

Run ``python benchmarks/retro.py --help`` for the options.
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
    p.add_argument("--store", help="existing store (opened read-only); default: build one from --docs documents")
    p.add_argument("--corpus", help="input .jsonl[.gz|.zst] (default: pydocs)")
    p.add_argument("--docs", type=int, default=60, help="documents in the built store (default 60)")
    p.add_argument("--k", type=int, default=2, help="neighbours per chunk (default 2)")
    p.add_argument("--rows", type=int, default=16, help="rows of 512 tokens for neighbors() (default 16)")
    p.add_argument("--batch", type=int, default=1024, help="precomputed rows per ids->tokens call (default 1024)")
    p.add_argument("--gen", type=int, default=100, help="chunks timed at generation time (default 100)")
    p.add_argument("--export", action="store_true", help="part 3: time a retro-pytorch export of the store")
    p.add_argument("--lm-tokenizer", help="an LM tokenizer.json (e.g. GPT-2 BPE) for part 4; skipped without")
    p.add_argument("--lm-docs", type=int, default=20, help="documents in the two part-4 stores (default 20)")
    p.add_argument("--threads", type=int, help="onnxruntime/FAISS threads (default: usable CPUs)")
    return p.parse_args(argv)


def stored_rows(st, length: int, n: int) -> np.ndarray:
    """``n`` rows of ``length`` tokens: consecutive windows of stored documents."""
    rows = []
    for d in range(int(st.manifest["next_doc_id"])):
        try:
            doc = st.get_document(d)
        except Exception:  # deleted
            continue
        ids = np.concatenate([c.tokens for c in st.get_chunks(list(doc.chunk_ids))]) if len(doc.chunk_ids) else []
        for s in range(0, len(ids) - length + 1, length):
            rows.append(ids[s:s + length])
            if len(rows) == n:
                return np.stack(rows)
    if not rows:
        raise SystemExit(f"no stored document has {length} tokens")
    return np.stack(rows)


def part1(st, args, tmp: Path) -> dict:
    from retrostore import retro

    k = args.k
    t0 = time.perf_counter()
    knn = st.precompute_neighbors(tmp / "knn.npy", k=k, exclude_same_doc=True, progress=False)
    pre_s = time.perf_counter() - t0
    rows = stored_rows(st, 512, args.rows)
    st.neighbors(rows[:1], k=k)  # warm-up
    nb_times = []
    for i in range(len(rows)):
        dt, _ = C.timed(st.neighbors, rows[i:i + 1], k=k)
        nb_times.append(dt / 8)
    t0 = time.perf_counter()
    table = retro.chunk_table(st)
    table_s = time.perf_counter() - t0
    out = {"precompute_s": pre_s, "chunks": len(st), "table_s": table_s, "neighbors": nb_times}
    for label, tab in (("lmdb", None), ("table", table)):
        nf = retro.NeighborFile(st, knn, table=tab)
        times, total = [], 0
        for a in range(0, len(nf), args.batch):
            b = min(len(nf), a + args.batch)
            dt, nt = C.timed(nf.tokens, a, b)
            times.append(dt / (b - a))
            total += b - a
        out[label] = times
        # the same neighbours through neighbors() would give the same tokens
    ids = np.load(knn)[:64]
    assert (retro.neighbor_tokens(st, ids).tokens == retro.neighbor_tokens(st, ids, table=table).tokens).all()
    return out


def part2(st, args) -> dict:
    from retrostore import retro

    k = args.k
    emb = st.embedder
    rows = stored_rows(st, 64, args.gen)
    fetch = retro.fetch_fn(st, k)
    fetch(rows[:1])  # warm-up
    res = {"embed": [], "search": [], "fetch": [], "e2e": []}
    for i in range(len(rows)):
        x = rows[i:i + 1]
        dt, vec = C.timed(emb.embed_token_ids, [x[0]])
        res["embed"].append(dt)
        dt, (_, ids) = C.timed(st.search_vectors, vec, k)
        res["search"].append(dt)
        dt, _ = C.timed(retro.neighbor_tokens, st, ids)
        res["fetch"].append(dt)
        dt, _ = C.timed(fetch, x)
        res["e2e"].append(dt)
    return res


def part_export(st, args, tmp: Path) -> dict | None:
    if not args.export:
        return None
    from retrostore import retro

    t0 = time.perf_counter()
    info = retro.export_retro_pytorch(st, tmp / "export", seq_len=512, k=args.k)
    res = {"export_s": time.perf_counter() - t0, "summary": info["neighbors"], "rows": info["rows"]}
    table = retro.chunk_table(st)
    first = retro.duplicate_chunks(table.tokens, table.lengths, table.live)
    res["duplicate_chunks"] = int((first != np.arange(len(first)))[table.live].sum())
    try:
        from retro_pytorch import RETRODataset
    except ImportError:
        return res
    ds = RETRODataset(**retro.retro_dataset_kwargs(tmp / "export"))
    ours = retro.TrainingSet(st, retro.training_sequences(st, 512, pad_id=0, table=table),
                             tmp / "export" / "seq_knn.npy")
    t0 = time.perf_counter()
    theirs = [ds[i] for i in range(len(ds))]
    res["retro_dataset_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mine = [ours[i] for i in range(len(ours))]
    res["training_set_s"] = time.perf_counter() - t0
    res["equal_rows"] = sum(np.array_equal(a.numpy(), c) and np.array_equal(b.numpy(), d)
                            for (a, b), (c, d) in zip(theirs, mine))
    res["sequences"] = len(ds)
    return res


def part3(args, docs, tmp: Path) -> dict | None:
    if not args.lm_tokenizer:
        return None
    import retrostore
    from tokenizers import Tokenizer

    texts = [d for d, _ in docs if d.strip()][: args.lm_docs]
    emb = retrostore.default_embedder(threads=args.threads)
    wordpiece = Tokenizer.from_file(str(retrostore.default_tokenizer_path()))  # what the embedder runs on text
    wordpiece.no_padding()
    wordpiece.no_truncation()
    res, stores, queries = {}, {}, {}
    for label, tok in (("default", None), ("lm", args.lm_tokenizer)):
        path = tmp / f"{label}.rstore"
        t0 = time.perf_counter()
        with retrostore.create(path, embedder=emb, tokenizer=tok) as st:
            st.append(texts)
            st.commit()
        st = stores[label] = retrostore.open(path, embedder=emb)
        chunks = st.get_chunks(list(range(0, len(st), max(1, len(st) // 64))))[:64]
        x = np.stack([c.tokens for c in chunks if len(c.tokens) == int(st.manifest["chunk_tokens"])])
        queries[label] = x
        texts_q = [st.chunker.decode(q) for q in x]
        res[label] = {"chunks": len(st), "build_s": time.perf_counter() - t0, "e2e": [], "decode": [],
                      "embed_text": [], "embed_ids": [], "chars": float(np.mean([len(c.text) for c in chunks])),
                      "embed_tokens": [len(wordpiece.encode(q).ids) for q in texts_q],
                      "vocab": int(st.manifest["tokenizer"]["vocab_size"]),
                      "pad_id": int(st.manifest["tokenizer"]["pad_id"])}
        st.neighbors(x[:1], k=args.k)  # warm-up
    # Interleaved, query by query, so that load swings on a shared machine hit both alike.
    for i in range(min(len(q) for q in queries.values())):
        for label, st in stores.items():
            q = queries[label][i]
            r = res[label]
            r["e2e"].append(C.timed(st.neighbors, q[None, :], k=args.k)[0])
            dt, text = C.timed(st.chunker.decode, q)
            r["decode"].append(dt)
            r["embed_text"].append(C.timed(emb.embed, [text])[0])
            if label == "default":
                r["embed_ids"].append(C.timed(emb.embed_token_ids, [q])[0])
    for st in stores.values():
        st.close()
    return res


def report(p1: dict, p2: dict, p3: dict | None, args, pe: dict | None = None) -> str:
    med = C.median
    nb = med(p1["neighbors"])
    lines = [f"store: {p1['chunks']} chunks; precompute_neighbors(k={args.k}, exclude_same_doc) "
             f"{p1['precompute_s']:.1f} s; chunk_table {p1['table_s']:.2f} s", "",
             "**1. Tokens for one query chunk (k = %d), median per chunk**" % args.k, "",
             C.table(["route", "us / chunk", "vs neighbors()"], [
                 ["neighbors() (embed + search + read)", f"{nb * 1e6:.0f}", "1x"],
                 [f"ids -> tokens, LMDB (NeighborFile, {args.batch} rows a call)", f"{med(p1['lmdb']) * 1e6:.1f}",
                  f"{nb / med(p1['lmdb']):.0f}x faster"],
                 ["ids -> tokens, ChunkTable in memory", f"{med(p1['table']) * 1e6:.1f}",
                  f"{nb / med(p1['table']):.0f}x faster"]]), "",
             "**2. Generation: retrieval of one 64-token chunk (B = 1, k = %d), median ms**" % args.k, "",
             C.table(["embed", "search", "fetch", "search + fetch", "fetch_fn end to end"], [[
                 C.ms(med(p2["embed"])), C.ms(med(p2["search"])), C.ms(med(p2["fetch"])),
                 C.ms(med(np.add(p2["search"], p2["fetch"]))), C.ms(med(p2["e2e"]))]])]
    if pe:
        sm = pe["summary"]
        lines += ["", f"**3. Export** (seq_len 512, k = {args.k}, packed): {pe['export_s']:.1f} s for "
                  f"{sm['rows']} windows ({sm['chunks']} chunks); candidates dropped: {sm['dropped']}; "
                  f"searched again: {sm['research']}; short: {sm['short']}; exact-duplicate chunks in the store: "
                  f"{pe['duplicate_chunks']}"]
        if "equal_rows" in pe:
            lines += [f"RETRODataset: {pe['equal_rows']} of {pe['sequences']} rows equal TrainingSet's; every row "
                      f"read in {pe['retro_dataset_s']:.1f} s (RETRODataset) vs {pe['training_set_s']:.1f} s "
                      "(TrainingSet)"]
    if p3:
        d, m = p3["default"], p3["lm"]
        lines += ["", f"**4. LM chunk tokenizer** ({args.lm_docs} docs: {d['chunks']} WordPiece chunks vs "
                  f"{m['chunks']} LM chunks; LM vocab {m['vocab']}, pad id {m['pad_id']}), median per 64-token "
                  "query chunk", "",
                  C.table(["chunk tokenizer", "neighbors() ms", "decode ms", "embed alone ms", "embedder tokens",
                           "chars / chunk", "build s"], [
                      ["default (WordPiece = embedder's)", C.ms(med(d["e2e"])), "-",
                       C.ms(med(d["embed_ids"])) + " (ids), " + C.ms(med(d["embed_text"])) + " (text)", f"{np.median(d['embed_tokens']):.0f}",
                       f"{d['chars']:.0f}", f"{d['build_s']:.1f}"],
                      ["LM tokenizer", C.ms(med(m["e2e"])), C.ms(med(m["decode"])),
                       C.ms(med(m["embed_text"])) + " (text)", f"{np.median(m['embed_tokens']):.0f}",
                       f"{m['chars']:.0f}", f"{m['build_s']:.1f}"]])]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    info, docs = C.start(args.corpus)
    import retrostore

    with tempfile.TemporaryDirectory(prefix="retro-bench-") as td:
        tmp = Path(td)
        path = Path(args.store) if args.store else C.build_tmp_store(tmp, docs[: args.docs])
        with retrostore.open(path, threads=args.threads) as st:
            p1 = part1(st, args, tmp)
            p2 = part2(st, args)
            pe = part_export(st, args, tmp)
        p3 = part3(args, docs, tmp)
    text = report(p1, p2, p3, args, pe)
    print(text)
    print("\n" + C.command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
