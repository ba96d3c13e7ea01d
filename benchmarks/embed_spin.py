"""The default embedder's onnxruntime threads: spinning vs sleeping idle threads, on a quiet
and on a busy machine.

What is measured
----------------
Query sentences sampled from the corpus (``--queries``, default 32) are embedded by the
default embedder (all-MiniLM-L6-v2 int8, onnxruntime on the CPU), one at a time and in one
batch of all of them, by sessions that differ only in ``intra_op_num_threads`` (1 and the
usable CPUs) and ``session.intra_op.allow_spinning`` (1: onnxruntime's default, idle threads
spin; 0: they sleep, retrostore's setting since issue 17). Every configuration is timed in
each round, in rotating order (``--rounds``, default 5); the report gives median wall and CPU
milliseconds per query.

The whole is run twice: on the machine as it is, then with ``--busy`` (default 1) CPU-bound
processes started by the benchmark (a pure-Python loop each) and stopped at the end: a shared
machine. Compare the ratios within one part; the machine is shared and noisy.

Run ``python benchmarks/embed_spin.py --help``; ``--record`` writes docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import onnxruntime as ort

import _common as C


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", help="input .jsonl[.gz|.zst] (default: pydocs)")
    p.add_argument("--queries", type=int, default=32, help="query sentences (default 32)")
    p.add_argument("--rounds", type=int, default=5, help="rounds over the configurations (default 5)")
    p.add_argument("--busy", type=int, default=1, help="CPU-bound processes in the busy part (default 1)")
    p.add_argument("--record", action="store_true", help="write the result into docs/benchmarks.md")
    return p.parse_args(argv)



def _session(threads: int, spin: str):
    """The default embedder with its session rebuilt with ``allow_spinning`` = ``spin``."""
    import retrostore

    emb = retrostore.default_embedder(threads=threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    emb._session = ort.InferenceSession(str(emb.model_path), so, providers=emb.providers)
    return emb


def measure(queries: list[str], rounds: int) -> dict:
    configs = [(t, spin) for t in sorted({1, C.usable_cpus()}) for spin in ("1", "0")]
    sessions = {c: _session(*c) for c in configs}
    for emb in sessions.values():
        emb.embed(queries[:2])  # warm-up
    res = {(c, mode): {"wall": [], "cpu": []} for c in configs for mode in ("single", "batch")}
    for r in range(rounds):
        for c in configs[r % len(configs):] + configs[: r % len(configs)]:
            emb = sessions[c]
            for mode in ("single", "batch"):
                w0, c0 = time.perf_counter(), time.process_time()
                if mode == "single":
                    for q in queries:
                        emb.embed([q])
                else:
                    emb.embed(queries)
                res[(c, mode)]["wall"].append((time.perf_counter() - w0) / len(queries))
                res[(c, mode)]["cpu"].append((time.process_time() - c0) / len(queries))
    return res


def report_part(res: dict) -> str:
    rows = []
    for (c, mode), r in res.items():
        threads, spin = c
        base = res[((threads, "1"), mode)]
        rows.append([threads, "spin" if spin == "1" else "sleep", mode, C.ms(C.median(r["wall"])),
                     C.ms(C.median(r["cpu"])), f"{C.median(base['wall']) / C.median(r['wall']):.2f}x"])
    return C.table(["threads", "idle threads", "queries", "wall ms/query", "CPU ms/query", "speed vs spin"], rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    info, docs = C.start(args.corpus)
    queries = C.sample_sentences([t for t, _ in docs], args.queries)
    quiet = measure(queries, args.rounds)
    with C.busy_processes(args.busy):
        busy = measure(queries, args.rounds)
    body = "\n".join([
        f"{len(queries)} query sentences from the corpus, {args.rounds} rounds; 'single': one query a call, "
        f"'batch': all {len(queries)} in one call; medians.", "",
        "**The machine as it is:**", "", report_part(quiet), "",
        f"**With {args.busy} CPU-bound process(es) started by the benchmark:**", "", report_part(busy)])
    print(body)
    if args.record:
        C.record("embed-spin", "onnxruntime idle threads: spin vs sleep", body, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
