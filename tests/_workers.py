"""Process bodies for the crash and concurrency tests.

They run in child processes forked from a multiprocessing forkserver that
has imported retrostore once (see ``workers`` in the tests), so a trial costs
a fork, not an interpreter start. Children report through files written with
``os.write`` (page cache: a line survives the child's SIGKILL), never through
pipes or queues that a kill could cut mid-message.
"""

from __future__ import annotations

import json
import os
import random
import time
import traceback

import numpy as np

import retrostore
from retrostore.storage import chunktable as _chunks


def batch_plan(b: int, n_docs: int) -> list[int]:
    """Indices (into the test's document pool) of the documents of batch ``b``;
    version ``v`` of a crash-test store holds exactly batches ``0..v-1``."""
    rng = random.Random(7919 * b + 17)
    return [rng.randrange(n_docs) for _ in range(rng.randint(1, 3))]


def batch_metadata(b: int, idx: list[int]) -> list[dict]:
    return [{"batch": b, "j": j, "src": i} for j, i in enumerate(idx)]


def _line(fd: int, text: str) -> None:
    os.write(fd, (text + "\n").encode())


def crash_writer(path: str, data_dir: str, ack_path: str) -> None:
    """Append and commit planned batches of real documents until killed.

    Writes ``ready V`` once open (recovery done) and ``committed V`` after
    each ``commit()`` returns.
    """
    with open(os.path.join(data_dir, "docs.json")) as fh:
        texts = json.load(fh)
    flat = np.load(os.path.join(data_dir, "emb.npy"))
    offsets = np.load(os.path.join(data_dir, "offsets.npy"))
    embs = [flat[offsets[i] : offsets[i + 1]] for i in range(len(texts))]
    fd = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    st = retrostore.open(path, "a")
    _line(fd, f"ready {st.version}")
    while True:
        b = st.version
        idx = batch_plan(b, len(texts))
        docs, metas = [texts[i] for i in idx], batch_metadata(b, idx)
        vecs = [embs[i] for i in idx]
        if len(idx) > 1 and b % 2:  # sometimes two appends per commit
            st.append(docs[:1], metadata=metas[:1], embeddings=vecs[0])
            st.append(docs[1:], metadata=metas[1:], embeddings=np.concatenate(vecs[1:]))
        else:
            st.append(docs, metadata=metas, embeddings=np.concatenate(vecs))
        v = st.commit()
        _line(fd, f"committed {v}")


def crash_creator(path: str) -> None:
    """Create a store (to be killed at a random moment)."""
    retrostore.create(path, embedder=_SmallEmbedder(), tokenizer=retrostore.default_tokenizer_path()).close()


class _SmallEmbedder:
    """A fixed embedder for create() in the kill-during-create test (no model to load)."""

    dim = 8
    fingerprint = {"kind": "test", "name": "ones", "model_sha256": "1" * 64, "dim": 8}

    def embed(self, texts):
        return np.ones((len(texts), 8), np.float32) / np.sqrt(8)


def _unit(rng: np.random.Generator, n: int, dim: int = 384) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def conc_writer(path: str, texts: list[str], n_commits: int, out_path: str, map_bytes: int) -> None:
    """Commit ``n_commits`` small batches (real text, random unit vectors)."""
    _chunks._INITIAL_MAP_BYTES = map_bytes
    out = {"errors": []}
    try:
        rng = np.random.default_rng(5)
        t0 = time.perf_counter()
        with retrostore.open(path, "a") as st:
            for i in range(n_commits):
                docs = [texts[(3 * i + j) % len(texts)] for j in range(int(rng.integers(1, 4)))]
                n = sum(len(c) for c in st.chunker.chunk_many(docs))
                st.append(docs, metadata=[{"commit": i, "j": j} for j in range(len(docs))], embeddings=_unit(rng, n))
                st.commit()
            out["version"] = st.version
            out["map_size"] = st._table.env.info()["map_size"]
        out["seconds"] = time.perf_counter() - t0
    except Exception:
        out["errors"].append(traceback.format_exc())
    with open(out_path, "w") as fh:
        json.dump(out, fh)


def conc_reader(path: str, stop_path: str, out_path: str, seed: int, reopen_every: int, map_bytes: int) -> None:
    """Search and resolve results until ``stop_path`` exists, then once more.

    Records every distinct version seen, in order, and every inconsistency.
    """
    _chunks._INITIAL_MAP_BYTES = map_bytes
    rng = np.random.default_rng(seed)
    out = {"versions": [], "iterations": 0, "resolved": 0, "reopens": 0, "errors": []}
    st = None
    try:
        st = retrostore.open(path)
        last = -1
        stopping = False
        while True:
            stopping = stopping or os.path.exists(stop_path)
            out["iterations"] += 1
            if reopen_every and out["iterations"] % reopen_every == 0:
                st.close()
                st = retrostore.open(path)
                out["reopens"] += 1
            else:
                st.refresh()
            v = st.version
            if v < last:
                out["errors"].append(f"version went back from {last} to {v}")
            if v != last:
                out["versions"].append(v)
            last = v
            n = len(st)
            if n:
                _scores, ids = st.search_vectors(_unit(rng, 3), k=4)
                found = [int(i) for i in ids.ravel() if i >= 0]
                if any(i >= n for i in found):
                    out["errors"].append(f"version {v}: search returned ids {found} with only {n} chunks")
                for c in st.get_chunks([i for i in found if i < n]):
                    doc = st.get_document(c.doc_id)
                    if c.chunk_id not in doc.chunk_ids or doc.text[c.start : c.start + len(c.text)] != c.text:
                        out["errors"].append(f"version {v}: chunk {c.chunk_id} does not resolve in document {c.doc_id}")
                    out["resolved"] += 1
            if stopping:
                break
            time.sleep(0.003)  # continuous, but leaving the 2-core CI machine to the writer too
    except Exception:
        out["errors"].append(traceback.format_exc())
    finally:
        if st is not None:
            st.close()
    with open(out_path, "w") as fh:
        json.dump(out, fh)


def store_snapshot(st) -> str:
    """Everything a reader can get from a store, as one JSON string (to compare)."""
    n_docs = st.info()["documents"]
    docs = [st.get_document(d) for d in range(n_docs)]
    chunks = st.get_chunks(range(len(st)))
    rng = np.random.default_rng(0)
    scores, ids = st.search_vectors(_unit(rng, 4, st.manifest["index"]["dim"]), k=5)
    return json.dumps({
        "docs": [[d.text, d.metadata, list(d.chunk_ids)] for d in docs],
        "chunks": [[c.doc_id, c.position, c.start, c.text, c.tokens.tolist()] for c in chunks],
        "search": [ids.tolist(), np.round(scores, 4).tolist()],
    })


def lmdb_sweep(root: str, original: str, positions: list[int], xor: int, isolate: bool, out_path: str) -> None:
    """Flip one byte of ``chunks.lmdb/data.mdb`` at each position (one at a time)
    and record what a user of the store meets.

    For each position writes ``P pos phase`` before each phase (``open``,
    ``verify``, ``read``) and finally ``R pos outcome``: ``open`` (open raised
    CorruptStoreError naming the file), ``verify`` (verify reported problems,
    all naming the file), ``intact`` (verify clean and every read equals the
    original), ``read`` (verify clean, a read raised CorruptStoreError),
    ``SILENT`` (verify clean, reads differ) or ``OTHER:...`` (any other error).
    If the process dies, the last ``P`` line says in which phase.
    """
    from retrostore.store.verify import verify_version

    data = os.path.join(root, "chunks.lmdb", "data.mdb")
    with open(original, "rb") as fh:
        orig = fh.read()
    with open(data, "r+b") as fh:  # a previous worker may have died with a byte flipped
        fh.write(orig)
    with retrostore.open(root) as st:
        baseline = store_snapshot(st)
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for pos in positions:
        flipped = bytearray(orig)
        flipped[pos] ^= xor
        with open(data, "r+b") as fh:
            fh.write(flipped)
        _line(fd, f"P {pos} open")
        try:
            st = retrostore.open(root)
        except retrostore.CorruptStoreError as exc:
            outcome = "open" if "chunks.lmdb" in str(exc) else f"OTHER:open names {exc}"
            _line(fd, f"R {pos} {outcome}")
            continue
        except Exception as exc:
            _line(fd, f"R {pos} OTHER:open {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            continue
        try:
            _line(fd, f"P {pos} verify")
            problems = verify_version(st._head.version, st._table, readonly_media=st.readonly_media, isolate=isolate)
            if problems:
                bad = [p for p in problems if not p.startswith("chunks.lmdb/data.mdb:")]
                outcome = "verify" if not bad else f"OTHER:verify names {bad[0]}"
            else:
                _line(fd, f"P {pos} read")
                try:
                    outcome = "intact" if store_snapshot(st) == baseline else "SILENT"
                except retrostore.CorruptStoreError:
                    outcome = "read"
        except Exception as exc:
            outcome = f"OTHER:{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        finally:
            st.close()
        _line(fd, f"R {pos} {outcome}")
    with open(data, "r+b") as fh:
        fh.write(orig)


def try_writer(path: str, timeout_s: float | None, out_path: str) -> None:
    """Try to become the writer; record ``opened``/``locked`` and the seconds it took."""
    t0 = time.perf_counter()
    try:
        with retrostore.open(path, "a", timeout_s=timeout_s):
            result = "opened"
    except retrostore.WriterLockedError:
        result = "locked"
    with open(out_path, "w") as fh:
        fh.write(f"{result} {time.perf_counter() - t0:.3f}")


def slow_reader(path: str, stop_path: str, out_path: str) -> None:
    """Hold one LMDB read transaction (a reader in the middle of a long read)
    until ``stop_path`` exists; the writer must not wait for it."""
    with retrostore.open(path) as st:
        txn = st._table.env.begin()
        held_version = st.version
        n = len(st)
        while not os.path.exists(stop_path):
            time.sleep(0.01)
        txn.abort()
    with open(out_path, "w") as fh:
        json.dump({"held_version": held_version, "chunks": n}, fh)
