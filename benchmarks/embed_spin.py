"""The default embedder's onnxruntime threads: spinning vs sleeping idle threads, on a quiet
and on a busy machine.

What is measured
----------------
Query sentences sampled from the corpus (``--queries``, default 32) are embedded by the
default embedder (all-MiniLM-L6-v2 int8, onnxruntime on the CPU) one at a time back to back
('single'), one at a time each after a pause of ``--pause-ms`` (default 5: a lone client's
queries reaching a server, 'paced'; the CPU column counts the pauses too, so a thread still
spinning after its call shows there), and in one batch of all of them ('batch'), by sessions
that differ only in ``intra_op_num_threads`` (1 and the usable CPUs) and how idle threads wait:
'spin' (``OnnxEmbedder(spin=True)``, onnxruntime's default: they spin between the model's
operations and on after a call), 'spin-stop' (not a retrostore setting; tried for ``retrostore
serve``: they spin during a call, ``session.force_spinning_stop`` ends it when the call returns)
and 'sleep' (``OnnxEmbedder()``, the default since issue 17: ``session.intra_op.allow_spinning``
0). Every configuration is timed in each round, in rotating
order (``--rounds``, default 5); the report gives median wall and CPU milliseconds per query.

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
    p.add_argument("--pause-ms", type=float, default=5.0, help="pause before each 'paced' query (default 5)")
    p.add_argument("--record", action="store_true", help="write the result into docs/benchmarks.md")
    return p.parse_args(argv)



WAITS = ("spin", "spin-stop", "sleep")
MODES = ("single", "paced", "batch")


def _session(threads: int, wait: str):
    """The default embedder as retrostore opens it ('sleep'; ``spin=True`` for 'spin'), or, for
    'spin-stop', with its session rebuilt spinning and ``session.force_spinning_stop`` set."""
    import retrostore

    emb = retrostore.default_embedder(threads=threads, spin=wait != "sleep")
    if wait == "spin-stop":
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        so.add_session_config_entry("session.force_spinning_stop", "1")
        emb._session = ort.InferenceSession(str(emb.model_path), so, providers=emb.providers)
    return emb


def measure(queries: list[str], rounds: int, pause_s: float) -> dict:
    configs = [(t, wait) for t in sorted({1, C.usable_cpus()}) for wait in WAITS]
    sessions = {c: _session(*c) for c in configs}
    for emb in sessions.values():
        emb.embed(queries[:2])  # warm-up
    res = {(c, mode): {"wall": [], "cpu": []} for c in configs for mode in MODES}
    for r in range(rounds):
        for c in configs[r % len(configs):] + configs[: r % len(configs)]:
            emb = sessions[c]
            for mode in MODES:
                time.sleep(0.1)  # the previous configuration's threads stop spinning (onnxruntime's ~50 ms)
                c0, wall = time.process_time(), 0.0
                if mode == "batch":
                    w0 = time.perf_counter()
                    emb.embed(queries)
                    wall = time.perf_counter() - w0
                else:
                    for q in queries:
                        if mode == "paced":
                            time.sleep(pause_s)
                        w0 = time.perf_counter()
                        emb.embed([q])
                        wall += time.perf_counter() - w0
                    if mode == "paced":
                        time.sleep(pause_s)  # the last query's threads, like the others', get their pause
                res[(c, mode)]["wall"].append(wall / len(queries))
                res[(c, mode)]["cpu"].append((time.process_time() - c0) / len(queries))
    return res


def report_part(res: dict) -> str:
    rows = []
    for (c, mode), r in res.items():
        threads, wait = c
        base = res[((threads, "sleep"), mode)]
        rows.append([threads, wait, mode, C.ms(C.median(r["wall"])), C.ms(C.median(r["cpu"])),
                     f"{C.median(base['wall']) / C.median(r['wall']):.2f}x"])
    return C.table(["threads", "idle threads", "queries", "wall ms/query", "CPU ms/query", "speed vs sleep"], rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    info, docs = C.start(args.corpus)
    queries = C.sample_sentences([t for t, _ in docs], args.queries)
    quiet = measure(queries, args.rounds, args.pause_ms / 1e3)
    with C.busy_processes(args.busy):
        busy = measure(queries, args.rounds, args.pause_ms / 1e3)
    body = "\n".join([
        f"{len(queries)} query sentences from the corpus, {args.rounds} rounds; 'single': one query a call, "
        f"back to back; 'paced': one query a call after a pause of {args.pause_ms:g} ms (wall: the calls; CPU: "
        f"the pauses too); 'batch': all {len(queries)} in one call; 'spin': `OnnxEmbedder(spin=True)`; 'spin-stop': spinning during "
        "a call only (`session.force_spinning_stop`, not a retrostore setting); medians.", "",
        "**The machine as it is:**", "", report_part(quiet), "",
        f"**With {args.busy} CPU-bound process(es) started by the benchmark:**", "", report_part(busy)])
    return C.finish(args, "embed-spin", "onnxruntime idle threads: spin, spin during calls only, sleep", body, info)


if __name__ == "__main__":
    sys.exit(main())
