"""One measurement of ``benchmarks/peers.py`` in its own process (not run by hand).

Roles:

``ingest``  load the split's vectors and texts, import the system, ingest into
            ``--store``, fsync the whole tree; write times and peak RSS.
``query``   import the system, open ``--store`` (reopen time and the first
            query), then single-query latency over every query and batch
            throughput, for each query variant; write times, the ids found
            (for recall), whether the texts match, and peak RSS.
``paired``  open several systems in this one process and alternate them
            query by query (the fairest latency comparison on a noisy
            machine); optionally cProfile each one's query path.

A process per system keeps peak RSS and import cost per system: nothing one
system loads is shared with another.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from peers_systems import SYSTEMS, fsync_tree


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (``/proc/self/clear_refs``, value 5; Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    """Peak RSS of this process image (VmHWM).

    Not ``getrusage().ru_maxrss``: Linux carries that across exec, so a worker
    started by a big parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _system(name: str, args):
    split = json.loads((args.data / "split.json").read_text())
    return SYSTEMS[name](split["chunks"], faiss_threads=args.faiss_threads)


def ingest(args) -> dict:
    sysm = _system(args.system, args)
    vectors = np.load(args.data / "vectors.npy")
    data = json.loads((args.data / "texts.json").read_text())
    rss_data = _rss_mb()
    t0 = time.perf_counter()
    sysm.load()
    import_s = time.perf_counter() - t0
    out = {"import_s": import_s, "rss_data_mb": rss_data, "versions": sysm.versions()}
    sysm.prepare(args.data, data)
    _reset_peak_rss()  # the ingest's peak, not that of preparing its input
    t0 = time.perf_counter()
    try:
        phases = sysm.ingest(args.store, data, vectors)
    except Exception as exc:  # e.g. a factory string this retrostore cannot train
        return {**out, "unavailable": f"{type(exc).__name__}: {exc}"}
    t1 = time.perf_counter()
    fsync_tree(args.store)
    t2 = time.perf_counter()
    out.update(ingest_s=t2 - t0, phases={**phases, "fsync_tree_s": t2 - t1}, peak_rss_mb=_peak_rss_mb())
    out["extra"] = sysm.after_ingest(args.store, data, vectors)
    return out


def _check_texts(ids: np.ndarray, texts: list[list[str]], chunk_text: list[str]) -> int:
    """Number of returned texts that differ from the indexed chunk with the returned id."""
    bad = 0
    for row_i, row_t in zip(ids, texts):
        valid = [int(i) for i in row_i if i >= 0]
        if len(valid) != len(row_t):
            bad += abs(len(valid) - len(row_t))
        bad += sum(chunk_text[i] != t for i, t in zip(valid, row_t))
    return bad


def query(args) -> dict:
    sysm = _system(args.system, args)
    queries = np.load(args.data / "queries.npy")
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    sysm.load()
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    h = sysm.open(args.store)
    t1 = time.perf_counter()
    sysm.query_one(h, queries[0:1], args.k)
    t2 = time.perf_counter()
    out = {"import_s": import_s, "open_s": t1 - t0, "first_query_s": t2 - t1, "rss_start_mb": rss0,
           "versions": sysm.versions(), "variants": {}}
    returned = {}
    for suffix, _label, kw in sysm.variants:
        for i in range(min(args.warmup, len(queries))):
            sysm.query_one(h, queries[i:i + 1], args.k, **kw)
        lat = np.empty(len(queries))
        single_ids = np.full((len(queries), args.k), -1, np.int64)
        single_texts = []
        for i in range(len(queries)):
            q = queries[i:i + 1]
            s = time.perf_counter()
            ids, texts = sysm.query_one(h, q, args.k, **kw)
            lat[i] = time.perf_counter() - s
            single_ids[i, :len(ids)] = ids
            single_texts.append(texts)
        batch_s = []
        for _ in range(args.batch_repeats):
            s = time.perf_counter()
            b_ids, b_texts = sysm.query_batch(h, queries, args.k, **kw)
            batch_s.append(time.perf_counter() - s)
        out["variants"][suffix] = {"latency_s": lat.tolist(), "batch_s": batch_s,
                                   "single_ids": single_ids.tolist(), "batch_ids": np.asarray(b_ids).tolist()}
        if not args.no_text_check:
            returned[suffix] = (single_ids, single_texts, np.asarray(b_ids), b_texts)
    sysm.close(h)
    out["peak_rss_mb"] = _peak_rss_mb()  # before the check below loads every chunk text
    if returned:
        chunk_text = json.loads((args.data / "texts.json").read_text())["chunk_text"]
        for suffix, (si, st, bi, bt) in returned.items():
            out["variants"][suffix]["bad_texts"] = _check_texts(si, st, chunk_text) + _check_texts(bi, bt, chunk_text)
    return out


def paired(args) -> dict:
    """Alternate paths query by query in one process; time their batches alternately; profile each.

    With ``--thread-sweep``, the FAISS-based paths also run with one OpenMP
    thread (``faiss.omp_set_num_threads(1)`` before the call, the default
    restored after), alternated with the default like any other path.
    """
    queries = np.load(args.data / "queries.npy")
    runs = []  # dicts: key, sysm, h, kw, threads
    for spec in args.pair:
        name, store = spec.split("=", 1)
        sysm = _system(name, args)
        sysm.load()
        h = sysm.open(Path(store))
        for j, (suffix, _label, kw) in enumerate(sysm.variants):
            runs.append({"key": name + suffix, "sysm": sysm, "h": h, "kw": kw, "threads": None})
            if args.thread_sweep and j == 0 and name in ("faiss-lmdb", "retrostore-flat"):
                runs.append({"key": name + suffix + "@1t", "sysm": sysm, "h": h, "kw": kw, "threads": 1})
    faiss = sys.modules.get("faiss")
    default_threads = faiss.omp_get_max_threads() if faiss else None

    def call(run, q, batch=False):
        if run["threads"]:
            faiss.omp_set_num_threads(run["threads"])
        s = time.perf_counter()
        if batch:
            run["sysm"].query_batch(run["h"], q, args.k, **run["kw"])
        else:
            run["sysm"].query_one(run["h"], q, args.k, **run["kw"])
        d = time.perf_counter() - s
        if run["threads"]:
            faiss.omp_set_num_threads(default_threads)
        return d

    for run in runs:  # warm up every path
        for i in range(min(args.warmup, len(queries))):
            call(run, queries[i:i + 1])
    lat = {r["key"]: [] for r in runs}
    rng = np.random.default_rng(0)
    for _rep in range(args.repeats):
        for i in range(len(queries)):
            q = queries[i:i + 1]
            # a fresh random order per query: no path always runs first or after the same one
            for j in rng.permutation(len(runs)):
                lat[runs[j]["key"]].append(call(runs[j], q))
    batch = {r["key"]: [] for r in runs}
    for _rep in range(args.batch_repeats):
        for j in rng.permutation(len(runs)):
            batch[runs[j]["key"]].append(call(runs[j], queries, batch=True))
    out = {"latency_s": lat, "batch_s": batch, "order": [r["key"] for r in runs],
           "faiss_default_threads": default_threads}
    handles = {r["key"]: r["h"] for r in runs}
    if "faiss-lmdb" in handles and "retrostore-flat" in handles:
        out["steps_s"] = _steps(handles["faiss-lmdb"], handles["retrostore-flat"], queries, args)
    if args.profile:
        import cProfile
        import io
        import pstats

        prof = {}
        for run in runs:
            if run["threads"]:
                continue
            pr = cProfile.Profile()
            n = min(args.profile, len(queries))
            pr.enable()
            for i in range(n):
                run["sysm"].query_one(run["h"], queries[i:i + 1], args.k, **run["kw"])
            pr.disable()
            buf = io.StringIO()
            st = pstats.Stats(pr, stream=buf)
            st.sort_stats("tottime").print_stats(18)
            prof[run["key"]] = {"queries": n, "text": buf.getvalue(),
                                "total_s": sum(v[2] for v in st.stats.values())}
        out["profile"] = prof
    for run in runs:
        try:
            run["sysm"].close(run["h"])
        except Exception:
            pass
    return out


def _steps(floor, st, queries, args) -> dict:
    """Time each step of the floor's and retrostore's single-query paths, interleaved per query.

    Steps: the floor's FAISS call and LMDB text fetch; the bare FAISS call on
    retrostore's own (single) segment; ``Store.search_vectors``;
    ``Store.get_chunks`` of the ids found; ``Reader.hits`` (chunks plus
    continuations, what ``Store.search`` does after embedding).
    """
    import msgpack

    index, env = floor
    segs = st._head.version.segments
    seg = segs[0].index if len(segs) == 1 else None
    k = args.k
    steps = {n: [] for n in ("floor_faiss", "floor_texts", "retro_faiss_call", "retro_search_vectors",
                             "retro_get_chunks", "retro_hits")}
    pc = time.perf_counter
    for _ in range(args.repeats):
        for i in range(len(queries)):
            q = queries[i:i + 1]
            # each LMDB step runs right after a FAISS scan (which evicts the CPU caches), as in a real query
            t0 = pc()
            _, I = index.search(q, k)
            t1 = pc()
            ids = [int(x) for x in I[0] if x >= 0]
            with env.begin() as txn:
                [msgpack.unpackb(txn.get(x.to_bytes(8, "big")))["t"] for x in ids]
            t2 = pc()
            s, rid = st.search_vectors(q, k)
            t4 = pc()
            [c.text for c in st.get_chunks(rid[0][rid[0] >= 0])]
            t5 = pc()
            if seg is not None:
                seg.search(q, k)
            t3 = pc()
            st._reader.hits(s, rid)
            t6 = pc()
            for name, d in zip(steps, (t1 - t0, t2 - t1, t3 - t5, t4 - t2, t5 - t4, t6 - t3)):
                steps[name].append(d)
    if seg is None:
        del steps["retro_faiss_call"]
    out = {"segments": len(segs), **steps}
    if seg is not None:
        # retrostore's own work around FAISS, with FAISS's share made negligible: swap the
        # segment's index for a 64-vector copy of its head and time search_vectors against
        # the bare call on that same tiny index. Each timed call follows a full scan of the
        # floor's index, so CPU caches are as cold as after a real search (hot, the Python
        # and numpy work costs several times less).
        import faiss

        tiny = faiss.IndexFlat(seg.d, seg.metric_type)
        tiny.add(seg.reconstruct_n(0, 64))
        segs[0].index = tiny
        try:
            bare, wrapped = [], []
            for i in range(min(200, len(queries))):
                q = queries[i:i + 1]
                for j in ((0, 1) if i % 2 else (1, 0)):
                    index.search(q, k)
                    t0 = pc()
                    if j == 0:
                        tiny.search(q, k)
                    else:
                        st.search_vectors(q, k)
                    (bare if j == 0 else wrapped).append(pc() - t0)
        finally:
            segs[0].index = seg
        out["tiny_faiss_call"] = bare
        out["tiny_search_vectors"] = wrapped
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=["ingest", "query", "paired"])
    p.add_argument("--system", choices=sorted(SYSTEMS))
    p.add_argument("--data", type=Path, required=True, help="the split directory written by peers.py")
    p.add_argument("--store", type=Path)
    p.add_argument("--pair", action="append", default=[], metavar="SYSTEM=STORE")
    p.add_argument("--out", type=Path, required=True, help="JSON result file")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-repeats", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--profile", type=int, default=0, metavar="N")
    p.add_argument("--no-text-check", action="store_true")
    p.add_argument("--faiss-threads", type=int, help="FAISS OpenMP threads (default: each library's default)")
    p.add_argument("--thread-sweep", action="store_true", help="paired: also run FAISS paths with 1 thread")
    args = p.parse_args(argv)
    res = {"ingest": ingest, "query": query, "paired": paired}[args.role](args)
    args.out.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
