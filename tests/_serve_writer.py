"""A writer in its own process for the serve tests: append one document per commit, for a while.

    python _serve_writer.py STORE DOCS.json SECONDS OUT.jsonl

Each commit's version and len(store) go to OUT as one JSON line, written after
the commit returned (so every line names a committed version).
"""

from __future__ import annotations

import json
import sys
import time

import retrostore


def main(store: str, docs_path: str, seconds: float, out_path: str) -> None:
    docs = json.loads(open(docs_path).read())
    deadline = time.monotonic() + seconds
    with retrostore.open(store, "a") as st, open(out_path, "a") as out:
        for doc in docs:
            if time.monotonic() >= deadline:
                break
            st.append(doc["text"], metadata=doc["meta"])
            version = st.commit()
            out.write(json.dumps({"version": version, "len": len(st)}) + "\n")
            out.flush()
            time.sleep(0.1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
