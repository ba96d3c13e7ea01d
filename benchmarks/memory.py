"""Index memory at scale: bytes per vector of the default large-store factory,
and resident memory of a memory-mapped search versus the index file size.

Builds a store of N synthetic vectors (default 1,000,000 x 384, clustered unit
vectors given to ``append(embeddings=...)``) with the factory the default
("auto") index picks for N vectors, compacts it to one segment, then measures
in fresh child processes (so that nothing else is resident):

* ``ram``: ``open(mmap=False)``: anonymous memory added by loading the index
  (the index in RAM), per vector;
* ``mmap``: ``open(mmap=True)``: anonymous and file-backed resident memory
  after opening and after 1,000 searches, against the index file size
  (skipped, and said, for a factory FAISS cannot map: the fast-scan default).

    python benchmarks/memory.py [--n 1000000] [--out DIR] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import retrostore  # noqa: E402

from _common import SYNTH_DIM as DIM, PrecomputedOnly  # noqa: E402
from _common import clustered_vectors as vectors  # noqa: E402


def build(path: Path, n: int, threads: int | None, batch: int = 100_000) -> dict:
    from retrostore.index.policy import default_factory

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1024, DIM)).astype(np.float32)
    factory = default_factory(n, DIM)
    t0 = time.perf_counter()
    with retrostore.create(path, embedder=PrecomputedOnly(), index=factory, threads=threads) as st:
        for lo in range(0, n, batch):
            m = min(batch, n - lo)
            st.append([f"d{lo + i}" for i in range(m)], embeddings=vectors(rng, m, centres))
            st.commit()
            print(f"  {lo + m:,} vectors committed ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        st.compact(progress=False)
        info = st.info()
        np.save(path.parent / "queries.npy", vectors(rng, 1000, centres))
    return {"factory": factory, "build_s": round(time.perf_counter() - t0, 1), "index": info["index"],
            "index_file_bytes": info["files"]["index_bytes"], "vectors_file_bytes": info["files"]["vectors_bytes"]}


_CHILD = r"""
import json, sys, numpy as np
sys.path.insert(0, {root!r})
def status():
    out = {{}}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "RssAnon", "RssFile")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out
import retrostore, faiss
sys.path.insert(0, {bench!r})
from memory import PrecomputedOnly
q = np.load({queries!r})
before = status()
st = retrostore.open({path!r}, embedder=PrecomputedOnly(), mmap={mmap}, threads=1)
opened = status()
for i in range(10):
    st.search_vectors(q[i:i + 1], 10, params={params})
ten = status()
for i in range(10, len(q)):
    st.search_vectors(q[i:i + 1], 10, params={params})
searched = status()
print(json.dumps({{"before": before, "opened": opened, "ten": ten, "searched": searched}}))
"""


def measure(path: Path, mmap: bool, params: dict) -> dict:
    code = _CHILD.format(root=str(ROOT), bench=str(Path(__file__).parent), queries=str(path.parent / "queries.npy"),
                         path=str(path), mmap=mmap, params=params)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:  # (its traceback, not only "returned non-zero exit status 1")
        sys.exit(f"the measuring child failed (exit status {out.returncode}):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the store")
    ap.add_argument("--threads", type=int, default=1, help="FAISS threads while building (default 1)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="rs-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    path = root / "memory.rstore"
    try:
        if not (path / "manifest.json").exists():
            built = build(path, args.n, args.threads)
        else:
            with retrostore.open(path, embedder=PrecomputedOnly()) as st:
                info = st.info()
            built = {"factory": info["index"]["factory"], "index": info["index"],
                     "index_file_bytes": info["files"]["index_bytes"], "vectors_file_bytes": info["files"]["vectors_bytes"]}
        res = {"n": args.n, **built}
        try:  # a fast-scan index (the default from 100,000 vectors) cannot be memory-mapped: refused at open
            retrostore.open(path, embedder=PrecomputedOnly(), mmap=True).close()
            mapped = ["mmap", "mmap_no_rerank"]
        except retrostore.InvalidInputError as exc:
            mapped, res["mmap_refused"] = [], str(exc)
        for label, mmap, params in (("ram", False, {}), ("mmap", True, {}), ("mmap_no_rerank", True, {"rerank": 0})):
            if mmap and label not in mapped:
                continue
            m = measure(path, mmap, params)
            res[label] = {
                "anon_after_open": m["opened"]["RssAnon"] - m["before"]["RssAnon"],
                "anon_after_search": m["searched"]["RssAnon"] - m["before"]["RssAnon"],
                "file_after_open": m["opened"]["RssFile"] - m["before"]["RssFile"],
                "anon_after_10": m["ten"]["RssAnon"] - m["before"]["RssAnon"],
                "file_after_10": m["ten"]["RssFile"] - m["before"]["RssFile"],
                "file_after_search": m["searched"]["RssFile"] - m["before"]["RssFile"],
            }
        if args.json:
            print(json.dumps(res, indent=2))
            return
        n, size = args.n, res["index_file_bytes"]
        print(f"{n:,} vectors x {DIM}, factory {res['factory']} params {json.dumps(res['index']['params'])}")
        print(f"index files: {size / 2**20:.1f} MiB = {size / n:.2f} bytes/vector "
              f"(raw float16 vectors on disk: {res['vectors_file_bytes'] / 2**20:.0f} MiB)")
        r = res["ram"]
        print(f"open(mmap=False): +{r['anon_after_open'] / 2**20:.1f} MiB anonymous = "
              f"{r['anon_after_open'] / n:.2f} bytes/vector in RAM")
        if not mapped:
            print(f"open(mmap=True): refused: {res['mmap_refused']}")
        for label in mapped:
            r = res[label]
            print(f"open(mmap=True){' rerank=0' if 'no' in label else ''}: after open +{r['anon_after_open'] / 2**20:.1f} MiB anon, "
                  f"+{r['file_after_open'] / 2**20:.1f} MiB file-backed; after 10 searches "
                  f"+{r['anon_after_10'] / 2**20:.1f} MiB anon, +{r['file_after_10'] / 2**20:.1f} MiB file-backed; "
                  f"after 1,000 searches "
                  f"+{r['anon_after_search'] / 2**20:.1f} MiB anon, +{r['file_after_search'] / 2**20:.1f} MiB "
                  f"file-backed (index file {size / 2**20:.1f} MiB)")
    finally:
        if args.out is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
