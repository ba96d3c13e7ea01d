"""Build throughput against the embedder alone, and where the rest of the time goes.

What is measured
----------------
Building a store is chunking + embedding + storing. The embedder is the part
that cannot be made cheaper by the store, so the figure of merit is the ratio

    build throughput / embedder-alone throughput   (both in chunks per second)

over the SAME chunks. The issue target is >= 0.85: everything besides
embedding (reading the input, chunking, packing and hashing records, LMDB
writes, the commit with its vectors file, FAISS segment and manifest) costs
at most 15% of a build.

One run takes a slice of pydocs (the leading documents up to ``--chunks``
chunks, or ``--docs`` documents), cuts it with the store's own chunker
(``Store.chunker.chunk_many``) and then, ``--rounds`` times, interleaved:

1. embedder alone: ``embedder.embed_token_ids`` over exactly those chunks
   (a default embedder loaded once beforehand, so its load is not counted);
2. a full build through the public path: ``retrostore.build.build_store``
   into a fresh temporary store (``progress=False``) from the slice written
   as a ``.jsonl`` file. This includes creating the store and loading its
   embedder, as a real ``retrostore build`` does.

The order of the two flips every round (A B, B A, A B, ...). Medians over
the rounds are compared, in wall time and in the process's CPU time. On a
loaded machine the wall-time ratio of separate runs varies a lot from round
to round; the build's own split (embedding time / build time, both measured
inside the same build) does not, and is printed as a second estimate.

During each build, the library functions it calls are wrapped with timers (a
handful of calls per build, so the wrappers cost nothing measurable), which
splits the build time into:
store creation, embedder load, chunking, embedding, record packing/hashing,
LMDB put, and the commit's parts (vectors file, FAISS add, segment write,
LMDB sync, manifest); "input reading + other" is what remains.

The machine is shared and noisy: read the ratios, which are measured side by
side in one run, not the absolute times.

Run ``python benchmarks/build.py --help`` for the options; ``--record``
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

TARGET = 0.85


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", help="input .jsonl[.gz|.zst] (default: pydocs, else examples/pydocs-sample)")
    p.add_argument("--chunks", type=int, default=3000,
                   help="take leading documents until they make at least this many chunks (default 3000)")
    p.add_argument("--docs", type=int, help="take exactly this many leading documents (overrides --chunks)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved embed/build rounds (default 3)")
    p.add_argument("--threads", type=int, help="onnxruntime/FAISS threads (default: usable CPUs)")
    p.add_argument("--quick", action="store_true", help="small run: ~500 chunks, 2 rounds")
    p.add_argument("--record", action="store_true", help="write the results into docs/benchmarks.md")
    a = p.parse_args(argv)
    if a.quick:
        a.chunks, a.rounds = min(a.chunks, 500), min(a.rounds, 2)
    return a


def select_docs(docs, chunker, want_chunks: int, n_docs: int | None):
    """Leading documents of the corpus and their chunks (store chunker)."""
    if n_docs is not None:
        chosen = docs[:n_docs]
        per_doc = chunker.chunk_many([t for t, _ in chosen])
    else:
        chosen, per_doc, total = [], [], 0
        for doc in docs:
            if total >= want_chunks:
                break
            cs = chunker.chunk_many([doc[0]])[0]
            chosen.append(doc)
            per_doc.append(cs)
            total += len(cs)
    return chosen, [c.token_ids for cs in per_doc for c in cs]


#: What a build calls, timed under a label: (module, attribute path, label, only inside this label).
#: Attributes are looked up at run time and the missing ones skipped (docs/architecture.md
#: says which module does what). The raw vectors file is written in a second thread while
#: the segment is built and written, and an exact store's float32 Flat is built in a second
#: thread while its float16 codes are written: those threads' time is not a part of its own.
PROBES = [
    ("retrostore.build.stream", "create", "create store", None),
    ("retrostore.store.store", "default_embedder", "load embedder", None),
    ("retrostore.store.store", "Store.append", "append", None),
    ("retrostore.text.chunking", "Chunker.chunk_many", "chunking", None),
    ("retrostore.text.embed", "OnnxEmbedder.embed_token_ids", "embedding", None),
    ("retrostore.text.embed", "OnnxEmbedder.embed", "embedding", None),
    ("retrostore.storage.chunktable", "ChunkTable.put_records", "LMDB put", None),
    ("retrostore.store.store", "Store.commit", "commit", None),
    ("retrostore.store.indexer", "build_segment", "commit: FAISS add", "commit"),
    ("retrostore.store.indexer", "fp16_codes", "commit: FAISS add", "commit"),
    ("retrostore.store.commit", "write_segment", "commit: segment write", "commit"),
    ("retrostore.storage.fileio", "sync_lmdb", "commit: LMDB sync", "commit"),
    ("retrostore.storage.manifest", "write_manifest", "commit: manifest", "commit"),
    ("retrostore.store.writer", "collect_garbage", "commit: garbage collection", "commit"),
    ("retrostore.store.version", "Head.load", "commit: reload segments", "commit"),
]


def _probes(timer: C.Timer) -> list[tuple[object, str, object]]:
    """``(owner, name, timed function)`` for every probe the installed library has."""
    import importlib

    out = []
    for module, attr, label, within in PROBES:
        try:
            owner = importlib.import_module(module)
        except ImportError:
            continue
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        fn = getattr(owner, name, None) if owner is not None else None
        if fn is None or (isinstance(owner, type) and name not in vars(owner)):
            continue
        out.append((owner, name, timer.wrap(label, fn, within=within)))
    return out


def instrumented_build(store_path: Path, src: Path, threads, timer: C.Timer):
    """``build_store`` with timers around the library functions it calls (see PROBES)."""
    import retrostore.build as _build

    with C.patched(*_probes(timer)):
        t0 = time.perf_counter()
        res = _build.build_store(store_path, [src], threads=threads, progress=False)
        dt = time.perf_counter() - t0
    return dt, res


def breakdown(timers: list[C.Timer], totals: list[float]) -> list[tuple[str, float]]:
    """Median seconds of each part over the builds (exclusive parts, summing to the total)."""
    def med(label):
        return C.median([t.seconds.get(label, 0.0) for t in timers])

    parts = {}
    # The default model loads at the store's first embedding (in the first append), not at create.
    parts["create store (files, LMDB init)"] = med("create store")
    parts["load embedder (onnxruntime session)"] = med("load embedder")
    parts["chunking (Chunker.chunk_many)"] = med("chunking")
    parts["embedding (embed_token_ids)"] = med("embedding")
    parts["LMDB put (put_records)"] = med("LMDB put")
    parts["append: validate, pack + hash records"] = C.median(
        [t.seconds.get("append", 0) - t.seconds.get("load embedder", 0) - t.seconds.get("chunking", 0)
         - t.seconds.get("embedding", 0) - t.seconds.get("LMDB put", 0) for t in timers])
    commit_parts = ["commit: FAISS add", "commit: segment write", "commit: LMDB sync",
                    "commit: manifest", "commit: garbage collection", "commit: reload segments"]
    for label in commit_parts:
        parts[label] = med(label)
    parts["commit: other"] = C.median(
        [t.seconds.get("commit", 0) - sum(t.seconds.get(lb, 0) for lb in commit_parts) for t in timers])
    parts["input reading, batching, close (rest)"] = C.median(
        [tot - t.seconds.get("create store", 0) - t.seconds.get("append", 0) - t.seconds.get("commit", 0)
         for t, tot in zip(timers, totals)])
    return list(parts.items())


def main(argv=None) -> int:
    args = parse_args(argv)
    import retrostore
    from retrostore import default_embedder

    info, docs = C.start(args.corpus)
    corpus = C.corpus_path(args.corpus)
    with tempfile.TemporaryDirectory(prefix="rs-bench-build-") as tmp:
        tmp = Path(tmp)
        # The store's own chunker (its copy of tokenizer.json), from an empty scratch store.
        with retrostore.create(tmp / "scratch.rstore", threads=args.threads) as scratch:
            chunker = scratch.chunker
        chosen, chunks = select_docs(docs, chunker, args.chunks, args.docs)
        n = len(chunks)
        src = C.write_jsonl(tmp / "slice.jsonl", chosen)
        ntok = sum(len(c) for c in chunks)
        print(f"corpus {corpus.name}: {len(chosen)} documents -> {n} chunks ({ntok / n:.1f} tokens/chunk)")

        t_load, emb = C.timed(default_embedder, threads=args.threads)
        emb.embed_token_ids(chunks[:64])  # warm-up: first-run allocations
        embed_s, build_s, embed_cpu, build_cpu, timers, vecs = [], [], [], [], [], None
        for r in range(args.rounds):
            # Embedder alone, then build; the order flips every round (A B B A ...) so that a
            # steady drift of the machine's load favours neither.
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                c0 = time.process_time()
                if which == 0:
                    dt, vecs = C.timed(emb.embed_token_ids, chunks)
                    embed_s.append(dt)
                    embed_cpu.append(time.process_time() - c0)
                    continue
                timer = C.Timer()
                dt, res = instrumented_build(tmp / f"round{r}.rstore", src, args.threads, timer)
                build_cpu.append(time.process_time() - c0)
                if res.chunks != n:
                    raise SystemExit(f"the build stored {res.chunks} chunks, the chunker made {n}")
                build_s.append(dt)
                timers.append(timer)
            print(f"round {r + 1}: embedder alone {embed_s[-1]:.2f} s ({n / embed_s[-1]:.0f} chunks/s), "
                  f"build {build_s[-1]:.2f} s ({n / build_s[-1]:.0f} chunks/s), "
                  f"ratio {embed_s[-1] / build_s[-1]:.3f} (CPU time ratio {embed_cpu[-1] / build_cpu[-1]:.3f})",
                  flush=True)
        # Sanity: the build stored the vectors the embedder alone computes.
        with retrostore.open(tmp / f"round{args.rounds - 1}.rstore", threads=args.threads) as st:
            diff = float(np.abs(st._head.version.stored_vectors(0, n) - vecs).max())

    e, b = C.median(embed_s), C.median(build_s)
    ratio = e / b
    ratios = [x / y for x, y in zip(embed_s, build_s)]
    emb_in_build = C.median([t.seconds.get("embedding", 0) for t in timers])
    share = C.median([t.seconds.get("embedding", 0) / tot for t, tot in zip(timers, build_s)])
    parts = breakdown(timers, build_s)

    head = C.table(
        ["measure", "median", "throughput"],
        [["embedder alone (embed_token_ids)", f"{e:.2f} s", f"{n / e:.0f} chunks/s"],
         ["full build (build_store)", f"{b:.2f} s", f"{n / b:.0f} chunks/s"],
         ["**build / embedder**", f"**{ratio:.3f}**",
          f"target >= {TARGET}: {'**met**' if ratio >= TARGET else '**NOT met**'}"],
         ["ratio per round", ", ".join(f"{x:.3f}" for x in ratios), ""],
         ["build / embedder in process CPU time", f"{C.median(embed_cpu) / C.median(build_cpu):.3f}",
          "(CPU seconds of this process, all threads; less sensitive to other jobs)"],
         ["embedding time / build time, within each build", f"{share:.3f}",
          "(same-run estimate of build / embedder, immune to load changes between runs)"],
         ["embedding inside the build / embedder alone", f"{emb_in_build / e:.3f}",
          "(1.0 = the build's embedding runs as fast as the embedder alone)"],
         ["build excluding embedder load / embedder", f"{e / (b - C.median([t.seconds.get('load embedder', 0) for t in timers])):.3f}",
          "(fixed cost of loading the model taken out)"]])
    rows = [[name, C.ms(s), f"{100 * s / b:.1f}%"] for name, s in parts]
    rows.append(["total (median build)", C.ms(b), "100%"])
    parts_md = C.table(["part of the build", "median ms", "share of build"], rows)
    body = "\n".join([
        f"{len(chosen)} leading documents of `{corpus.name}` -> {n} chunks of <= 64 WordPiece tokens "
        f"(mean {ntok / n:.1f}); {args.rounds} interleaved rounds (embedder alone and build, order "
        f"flipping every round), medians. "
        f"Default embedder load (outside the rounds): {t_load:.2f} s. Max |stored vector - embedder vector| "
        f"= {diff:.2g}.",
        "",
        head,
        "",
        "Where the build's time goes (library functions timed inside each build, medians; "
        "the parts are exclusive and sum to the build time up to rounding of medians):",
        "",
        parts_md,
    ])
    label = "quick" if args.quick else f"{n} chunks"
    return C.finish(args, "build" + ("-quick" if args.quick else ""), f"build vs embedder ({label})", body, info)


if __name__ == "__main__":
    sys.exit(main())
