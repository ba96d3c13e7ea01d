"""Per-chunk cost of every stage of a (sharded) build, measured in one run.

The numbers feed docs/scaling.md, which plans a Pile-sized build on paper.
One run takes the leading ``--docs`` documents of ``../shared/data/pydocs.jsonl.zst``
and times, on this machine, the real functions a sharded build calls:

read      stage 1/3: decompress + parse the JSON lines (``build.plan.count_file``)
tokenize  stage 3: ``Chunker.chunk_many`` (64-token chunks, HF tokenizers, Rust)
embed     stage 3: ``embed_chunks`` with the default int8 all-MiniLM-L6-v2 on CPU,
          with 1 onnxruntime thread (what one Ray task with num_cpus=1 sees)
          and with every CPU of this process
encode    stage 3: pack the msgpack chunk/doc records and write the shard files
          (fsynced), i.e. ``run_shard`` minus reading, tokenizing and embedding
merge     stage 4: ``load_shard`` (checksums, unpack) + ``Writer.stage``
          (pack, LMDB put, hash) + ``commit`` (vectors .npy, Flat segment, LMDB
          sync, manifest)
verify    stage 4: ``Store.verify`` (every checksum, record hash chain, counts)
ivfpq     what a compressed index would add: encoding a vector with a trained
          ``IVF4096,PQ48`` (synthetic unit vectors; training is a one-off, not counted)

Usage: ``python benchmarks/stages.py [--docs 20] [--all-threads] [--json]``. The machine is shared and
noisy; the script prints the best of ``--rounds`` for the cheap stages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import retrostore  # noqa: E402
from retrostore.build import plan as _plan  # noqa: E402
from retrostore.build import shards as _shards  # noqa: E402
from retrostore.build.sharded import _settings  # noqa: E402
from retrostore.text.models import embed_chunks  # noqa: E402

PYDOCS = ROOT.parent / "shared" / "data" / "pydocs.jsonl.zst"


def _best(fn, rounds: int) -> tuple[tuple[float, float], object]:
    """(wall s, CPU s of this process) of the fastest of ``rounds`` calls, and its result."""
    best, out = (float("inf"), 0.0), None
    for _ in range(rounds):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        got = (time.perf_counter() - t, time.process_time() - c)
        best = min(best, got)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=20, help="leading documents of pydocs to use (default 20)")
    ap.add_argument("--rounds", type=int, default=3, help="repeats of the cheap stages; the best is kept")
    ap.add_argument("--input", type=Path, default=PYDOCS, help="a .jsonl.zst corpus (default: pydocs)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--all-threads", action="store_true", help="also embed with every CPU (one more embedding pass)")
    args = ap.parse_args()

    import zstandard

    tmp = Path(tempfile.mkdtemp(prefix="rs-stages-"))
    lines = zstandard.ZstdDecompressor().decompress(args.input.read_bytes(), max_output_size=1 << 31)
    lines = b"\n".join(lines.split(b"\n")[: args.docs]) + b"\n"
    src = tmp / "slice.jsonl.zst"
    src.write_bytes(zstandard.ZstdCompressor().compress(lines))

    emb1 = retrostore.default_embedder(threads=1)
    st = retrostore.create(tmp / "s.rstore", embedder=emb1)
    settings = _settings(st.manifest, "text", "meta")
    work = tmp / "work"
    work.mkdir()
    (work / _plan.TOKENIZER).write_bytes((tmp / "s.rstore" / "tokenizer.json").read_bytes())
    files = _plan.input_files([src])
    rows: list[tuple[str, float]] = []

    t_read, counts = _best(lambda: [_plan.count_file(f["path"], f["rel"], "text", "meta") for f in files],
                           args.rounds)
    plan = _plan.make_plan(files, counts, settings, shards=1, key="bench")
    docs = list(_plan.read_documents(plan, 0, plan["body"]["documents"]))
    texts = [d.text for d in docs]
    chunker = st.chunker
    t_tok, per_doc = _best(lambda: chunker.chunk_many(texts), args.rounds)
    n = sum(len(c) for c in per_doc)
    rows += [("read (decompress + JSON)", t_read), ("tokenize + chunk", t_tok)]

    sha = settings["tokenizer_sha256"]
    embed_chunks(emb1, sha, texts[:2], per_doc[:2])  # warm up
    t_emb, vectors = _best(lambda: embed_chunks(emb1, sha, texts, per_doc), 1)
    rows.append(("embed, CPU, 1 thread", t_emb))
    cpus = len(os.sched_getaffinity(0))
    if cpus > 1 and args.all_threads:
        emb_all = retrostore.default_embedder(threads=cpus)
        embed_chunks(emb_all, sha, texts[:2], per_doc[:2])
        rows.append((f"embed, CPU, {cpus} threads", _best(lambda: embed_chunks(emb_all, sha, texts, per_doc), 1)[0]))

    class Precomputed:  # run_shard with the vectors above: times everything but embedding
        dim, fingerprint = emb1.dim, emb1.fingerprint
        tokenizer_sha256 = emb1.tokenizer_sha256

        def embed_token_ids(self, chunks):
            return vectors

    def shard():
        for p in work.glob("shard-*"):
            shutil.rmtree(p)
        return _shards.run_shard(plan, 0, work, Precomputed())

    t_shard, _ = _best(shard, args.rounds)
    rows.append(("encode + write shard (msgpack, .npy, fsync)",
                 tuple(max(a - b - c, 0.0) for a, b, c in zip(t_shard, t_read, t_tok))))

    t_load, loaded = _best(lambda: _shards.load_shard(work, plan, 0), 1)
    t_append, _ = _best(lambda: st._writer.stage(*loaded), 1)
    t_commit, _ = _best(st.commit, 1)
    rows += [("merge: load shard (sha256, unpack)", t_load), ("merge: append (pack, LMDB put, hash)", t_append),
             ("merge: commit (vectors, Flat add, sync, manifest)", t_commit)]
    t_verify, problems = _best(st.verify, args.rounds)
    assert problems == [], problems
    rows.append(("verify", t_verify))
    st.close()
    shutil.rmtree(tmp, ignore_errors=True)

    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60_000, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ivf = faiss.index_factory(384, "IVF4096,PQ48", faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(ivf).cp.niter = 2  # centroid quality does not change the encoding cost
    faiss.extract_index_ivf(ivf).cp.min_points_per_centroid = 1
    ivf.train(x[:40_000])
    faiss.omp_set_num_threads(1)
    t_add, _ = _best(lambda: ivf.add(x[40_000:]), 1)
    rows.append(("encode IVF4096,PQ48 (1 thread)", tuple(v * n / 20_000 for v in t_add)))

    out = {"documents": len(texts), "chunks": n, "cpus": cpus, "load_average": os.getloadavg(),
           "stages": {name: {"wall_s": w, "cpu_s": c, "wall_us_per_chunk": w / n * 1e6, "cpu_us_per_chunk":
                             c / n * 1e6} for name, (w, c) in rows}}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{len(texts)} documents, {n} chunks of 64 tokens, {cpus} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} (wall times stretch when the machine is shared; CPU times less so)")
    print(f"{'stage':<50} {'wall s':>8} {'CPU s':>8} {'wall us/ch':>11} {'CPU us/ch':>10} {'ch/CPU-s':>9}")
    for name, (w, c) in rows:
        print(f"{name:<50} {w:8.3f} {c:8.3f} {w / n * 1e6:11.1f} {c / n * 1e6:10.1f} "
              f"{n / c if c else float('inf'):9.0f}")


if __name__ == "__main__":
    main()
