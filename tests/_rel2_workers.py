"""Process bodies for tests/test_reliability2.py (run through the ``workers`` forkserver)."""

from __future__ import annotations

import json
import os
import signal
import time
import traceback

import numpy as np

import retrostore

import _powercut


def old_reader(path: str, query_path: str, ready_path: str, stop_path: str, out_path: str) -> None:
    """Open the store once (never refresh) and search and read the hits until ``stop_path``
    exists: a reader on an old version while the writer deletes and compacts."""
    out = {"version": None, "searches": 0, "errors": []}
    try:
        queries = np.load(query_path)
        with retrostore.open(path) as st:
            out["version"] = st.version
            with open(ready_path, "w") as fh:
                fh.write("ready")
            stopping = False
            while True:
                stopping = stopping or os.path.exists(stop_path)
                _scores, ids = st.search_vectors(queries, k=3)
                found = st.neighbor_tokens(ids)  # hits with continuations; a chunk purged meanwhile is -1
                for d in {int(x) for x in found.doc_ids.ravel() if x >= 0}:
                    try:
                        st.get_document(d)
                    except retrostore.InvalidInputError as exc:  # purged between the two calls: deleted
                        if "deleted" not in str(exc):
                            raise
                        out["deleted_meanwhile"] = out.get("deleted_meanwhile", 0) + 1
                out["searches"] += 1
                if stopping:
                    break
                time.sleep(0.005)
            out["last_ids"] = [int(i) for i in st.search_vectors(queries, k=3)[1].ravel()]
            out["learned"] = st._head.version.tombstones.chunks.tolist()
    except Exception as exc:
        out["errors"].append(f"{type(exc).__name__}: {exc}")
        out["trace"] = traceback.format_exc()
    with open(out_path, "w") as fh:
        json.dump(out, fh)


def compact_killed_after_manifest_rename(path: str) -> None:
    """Run ``compact()`` and die (SIGKILL) the moment its ``manifest.json`` rename is done."""
    fileio = _powercut.internal("fileio")
    real = fileio._rename

    def _rename(src: str, dst: str) -> None:
        real(src, dst)
        if os.path.basename(dst) == "manifest.json":
            os.kill(os.getpid(), signal.SIGKILL)

    with retrostore.open(path, "a") as st:
        fileio._rename = _rename
        st.compact(progress=False)
