"""The baseline server of benchmarks/serve.py: minimal Flask + FAISS + LMDB, one search at a time.

What massive-serve-style servers do: a Flask app (``POST /search`` with
``query`` and ``n_docs``, the same answer shape), the query embedded and
searched alone under a lock, passages read from LMDB. It uses the same
embedder (all-MiniLM-L6-v2 int8 through retrostore.default_embedder) and the
same vectors as the retrostore store it is compared with, in a float32
``IndexFlatIP``.

    python benchmarks/_flask_baseline.py WORK_DIR PORT [THREADS [NAME]]

WORK_DIR holds ``NAME.faiss`` and ``NAME.lmdb`` (NAME defaults to
``baseline``; written by benchmarks/serve.py).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import faiss
import lmdb
import msgpack
from flask import Flask, jsonify, request

import retrostore


def make_app(work: Path, threads: int, name: str = "baseline") -> Flask:
    faiss.omp_set_num_threads(threads)
    index = faiss.read_index(str(work / f"{name}.faiss"))
    env = lmdb.open(str(work / f"{name}.lmdb"), readonly=True, lock=False, max_readers=512)
    embedder = retrostore.default_embedder(threads=threads)
    embedder.embed(["warm up"])
    lock = threading.Lock()
    app = Flask(__name__)

    @app.post("/search")
    def search():
        body = request.get_json()
        query = body["query"]
        queries = [query] if isinstance(query, str) else query
        n_docs = int(body.get("n_docs", 1))
        with lock:  # one request at a time, as massive-serve's queue does
            vecs = embedder.embed(queries)
            scores, ids = index.search(vecs, n_docs)
            with env.begin() as txn:
                passages = [[msgpack.unpackb(txn.get(int(i).to_bytes(8, "big")))["s"] for i in row if i >= 0]
                            for row in ids]
        results = {"IDs": ids.tolist(), "passages": passages, "scores": scores.tolist()}
        return jsonify({"message": "Search completed", "n_docs": n_docs, "query": query,
                        "results": {"n_docs": n_docs, "query": query, "results": results}})

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app


if __name__ == "__main__":
    work, port = Path(sys.argv[1]), int(sys.argv[2])
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    name = sys.argv[4] if len(sys.argv) > 4 else "baseline"
    make_app(work, threads, name).run(host="127.0.0.1", port=port, threaded=True)
