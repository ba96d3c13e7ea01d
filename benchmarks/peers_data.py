"""Data for ``benchmarks/peers.py``: the cached corpus vectors, the held-out
query split, exact ground truth and recall.

Not a benchmark itself; ``peers.py`` and ``peers_worker.py`` import it (Python
puts ``benchmarks/`` on ``sys.path`` when a script there is run).

The cache (``benchmarks/.cache/`` by default, which ignores itself) holds the
chunks of the corpus embedded once with the default model:

- ``pydocs-vectors.npy``  float32 (N, 384), one row per chunk, in chunk order;
- ``pydocs-chunks.json``  ``{"doc_texts", "chunk_doc", "chunk_text", "meta"}``.

It is filled either by chunking and embedding the corpus with retrostore's
default chunker and embedder (10-15 minutes on 2 cores) or, faster, by reading
the chunks and exact float32 vectors of a complete store already built from
the same corpus with the default model (``--from-store``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

CACHE_VECTORS = "pydocs-vectors.npy"
CACHE_CHUNKS = "pydocs-chunks.json"
#: A returned id counts as a true neighbour when its exact score is within this
#: of the k-th exact score (ties and float32 rounding; scores are cosines).
RECALL_TOL = 1e-5


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_corpus(corpus: Path) -> list[str]:
    from retrostore.text.inputs import iter_documents

    return [d.text for d in iter_documents([corpus])]


def cache_ready(cache_dir: Path) -> bool:
    return (cache_dir / CACHE_VECTORS).is_file() and (cache_dir / CACHE_CHUNKS).is_file()


def _write_cache(cache_dir: Path, vectors: np.ndarray, doc_texts, chunk_doc, chunk_text, meta) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    ignore = cache_dir / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# benchmark cache: never committed\n*\n")
    tmp = cache_dir / (CACHE_VECTORS + ".tmp.npy")
    np.save(tmp, np.ascontiguousarray(vectors, dtype=np.float32))
    tmp.replace(cache_dir / CACHE_VECTORS)
    tmp = cache_dir / (CACHE_CHUNKS + ".tmp")
    tmp.write_text(json.dumps({"doc_texts": doc_texts, "chunk_doc": [int(d) for d in chunk_doc],
                               "chunk_text": chunk_text, "meta": meta}, ensure_ascii=False))
    tmp.replace(cache_dir / CACHE_CHUNKS)


def cache_from_store(cache_dir: Path, store_path: Path, corpus: Path) -> dict:
    """Fill the cache from a complete store built from ``corpus`` with the default model.

    Reads only through the store's read API (``retrostore.open(path)`` in mode
    "r"): its stored vectors (``Version.stored_vectors``; float32 as
    embedded for a store with ``vector_dtype="float32"`` or of format 2, their
    float16 values otherwise: the cache's source line says which), its chunk
    texts and document texts. The store is never written.

    Raises
    ------
    SystemExit
        The store is incomplete, not built with the default model and 64-token
        chunks, or its documents differ from the corpus.
    """
    import retrostore

    t0 = time.perf_counter()
    docs = _read_corpus(corpus)
    with retrostore.open(store_path) as st:
        m = st.manifest
        if m["embedder"].get("model_sha256") != retrostore.DEFAULT_MODEL_SHA256 or m["chunk_tokens"] != 64:
            raise SystemExit(f"{store_path} was not built with the default model and 64-token chunks")
        if m["next_doc_id"] != len(docs):
            raise SystemExit(f"{store_path} holds {m['next_doc_id']} documents, the corpus {len(docs)}: "
                             "it is incomplete (still building?)")
        n = len(st)
        vectors = st._head.version.stored_vectors(0, n)
        chunk_doc = np.empty(n, np.int64)
        chunk_text: list[str] = []
        for a in range(0, n, 10_000):
            for c in st.get_chunks(range(a, min(n, a + 10_000))):
                chunk_doc[c.chunk_id] = c.doc_id
                chunk_text.append(c.text)
        doc_texts = [st.get_document(d).text for d in range(len(docs))]
        factory = m["index"]["factory"]
        # float16 where the store keeps float16 raw vectors (the default) or float16 Flat segments
        # (the 2026-12-07 run, an HNSW store with float16 raw vectors, was labelled float32)
        fp16 = (m["vectors"].get("dtype") == "float16" and m["settings"]["keep_vectors"]
                or any(e.get("codec") == "fp16" for e in m["index"]["segments"]))
        precision = "float16 values" if fp16 else "exact float32 vectors"
    if doc_texts != docs:
        bad = next(i for i, (a, b) in enumerate(zip(doc_texts, docs)) if a != b)
        raise SystemExit(f"{store_path}: document {bad} differs from the corpus {corpus}")
    meta = {"source": f"store {store_path} (index {factory}, {precision} of its stored vectors)",
            "corpus": str(corpus), "corpus_sha256": _sha256(corpus),
            "model_sha256": retrostore.DEFAULT_MODEL_SHA256, "chunk_tokens": 64,
            "documents": len(docs), "chunks": int(n), "seconds": round(time.perf_counter() - t0, 1)}
    _write_cache(cache_dir, vectors, doc_texts, chunk_doc, chunk_text, meta)
    return meta


def cache_by_embedding(cache_dir: Path, corpus: Path, threads: int | None = None) -> dict:
    """Fill the cache by chunking and embedding ``corpus`` with the default chunker and model.

    The same computation as ``retrostore build``: 64-token chunks of the
    default (all-MiniLM-L6-v2 WordPiece) tokenizer, embedded from their token
    ids by the default int8 ONNX embedder.
    """
    import retrostore
    from tqdm import tqdm

    t0 = time.perf_counter()
    docs = _read_corpus(corpus)
    chunker = retrostore.Chunker(retrostore.default_tokenizer_path(), 64)
    emb = retrostore.default_embedder(threads=threads)
    per_doc = chunker.chunk_many(docs)
    chunk_doc, chunk_text, token_ids = [], [], []
    for d, (text, chunks) in enumerate(zip(docs, per_doc)):
        for c in chunks:
            chunk_doc.append(d)
            chunk_text.append(text[c.start:c.end])
            token_ids.append(c.token_ids)
    parts = []
    step = 512
    for a in tqdm(range(0, len(token_ids), step), desc="embedding chunks", unit_scale=step):
        parts.append(emb.embed_token_ids(token_ids[a:a + step]))
    vectors = np.concatenate(parts) if parts else np.zeros((0, emb.dim), np.float32)
    meta = {"source": "embedded by benchmarks/peers_data.py with the default chunker and embedder",
            "corpus": str(corpus), "corpus_sha256": _sha256(corpus),
            "model_sha256": retrostore.DEFAULT_MODEL_SHA256, "chunk_tokens": 64,
            "documents": len(docs), "chunks": len(chunk_text), "seconds": round(time.perf_counter() - t0, 1)}
    _write_cache(cache_dir, vectors, docs, chunk_doc, chunk_text, meta)
    return meta


def load_cache(cache_dir: Path) -> tuple[np.ndarray, dict]:
    vectors = np.load(cache_dir / CACHE_VECTORS, mmap_mode="r")
    chunks = json.loads((cache_dir / CACHE_CHUNKS).read_text())
    if len(chunks["chunk_text"]) != len(vectors):
        raise SystemExit(f"{cache_dir}: {len(vectors)} vectors for {len(chunks['chunk_text'])} chunks; delete the cache")
    return vectors, chunks


def prepare_split(cache_dir: Path, out: Path, *, heldout_docs: int, n_queries: int, max_chunks: int | None,
                  k: int, seed: int) -> dict:
    """Write one run's data to ``out``: the indexed documents and chunks, the queries and ground truth.

    ``heldout_docs`` documents (with at least one chunk) are drawn with ``seed``
    and removed from every system's data; ``n_queries`` of their chunks'
    vectors are the queries. With ``max_chunks``, only a random subset of the
    remaining documents (whole documents, about ``max_chunks`` chunks) is
    indexed. Ground truth: exact top-``k`` inner products (float64) by numpy.

    Files written: ``vectors.npy`` (n, dim) float32, ``texts.json``
    (``doc_texts``, ``chunk_doc`` local to ``doc_texts``, ``chunk_text``),
    ``chunks.npz`` (the indexed chunks as retrostore's chunker cuts them, see
    :func:`load_chunks`),
    ``queries.npy`` (q, dim) float32, ``truth.npz`` (``ids``, ``scores``
    (q, k)), ``split.json`` (the split's description).
    """
    vectors, chunks = load_cache(cache_dir)
    chunk_doc = np.asarray(chunks["chunk_doc"], np.int64)
    n_docs = len(chunks["doc_texts"])
    counts = np.bincount(chunk_doc, minlength=n_docs)
    rng = np.random.default_rng(seed)
    with_chunks = np.flatnonzero(counts > 0)
    heldout = np.sort(rng.choice(with_chunks, size=heldout_docs, replace=False))
    rest = np.setdiff1d(np.arange(n_docs), heldout)
    if max_chunks is not None and counts[rest].sum() > max_chunks:
        order = rng.permutation(rest)
        keep = order[: int(np.searchsorted(np.cumsum(counts[order]), max_chunks)) + 1]
        rest = np.sort(keep)
    indexed_rows = np.flatnonzero(np.isin(chunk_doc, rest))
    held_rows = np.flatnonzero(np.isin(chunk_doc, heldout))
    if len(held_rows) < n_queries:
        raise SystemExit(f"the {heldout_docs} held-out documents have {len(held_rows)} chunks, fewer than "
                         f"{n_queries} queries")
    q_rows = np.sort(rng.choice(held_rows, size=n_queries, replace=False))
    base = np.ascontiguousarray(vectors[indexed_rows], dtype=np.float32)
    queries = np.ascontiguousarray(vectors[q_rows], dtype=np.float32)
    local = {int(d): i for i, d in enumerate(rest)}
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "vectors.npy", base)
    np.save(out / "queries.npy", queries)
    (out / "texts.json").write_text(json.dumps({
        "doc_texts": [chunks["doc_texts"][d] for d in rest],
        "chunk_doc": [local[int(chunk_doc[r])] for r in indexed_rows],
        "chunk_text": [chunks["chunk_text"][r] for r in indexed_rows],
    }, ensure_ascii=False))
    _save_chunks(out / "chunks.npz", [chunks["doc_texts"][d] for d in rest],
                 [chunks["chunk_text"][r] for r in indexed_rows])
    ids, scores = exact_topk(base, queries, k)
    np.savez(out / "truth.npz", ids=ids, scores=scores)
    split = {"documents": int(len(rest)), "chunks": int(len(indexed_rows)), "dim": int(base.shape[1]),
             "heldout_documents": [int(d) for d in heldout], "heldout_chunks": int(len(held_rows)),
             "queries": int(n_queries), "k": k, "seed": seed, "cache": chunks["meta"]}
    (out / "split.json").write_text(json.dumps(split, indent=1))
    return split


def _save_chunks(path: Path, doc_texts: list[str], chunk_text: list[str]) -> None:
    """The chunks retrostore's default chunker cuts from ``doc_texts`` (what a pipeline keeps
    from embedding them): token ids (n, 64) int64 padded with -1, position, start, end."""
    import retrostore

    chunker = retrostore.Chunker(retrostore.default_tokenizer_path(), 64)
    rows = [(text, c) for text, cs in zip(doc_texts, chunker.chunk_many(doc_texts)) for c in cs]
    if [text[c.start:c.end] for text, c in rows] != chunk_text:
        raise SystemExit("the default chunker no longer cuts the cached chunks; delete the cache")
    tokens = np.full((len(rows), 64), -1, np.int64)
    for i, (_, c) in enumerate(rows):
        tokens[i, :len(c.token_ids)] = c.token_ids
    np.savez(path, tokens=tokens, position=[c.position for _, c in rows], start=[c.start for _, c in rows],
             end=[c.end for _, c in rows])


def load_chunks(path: Path) -> list[list]:
    """``chunks.npz`` as ``chunk_many`` returns it: per document, its ``retrostore.Chunk`` list."""
    from retrostore.text.chunking import Chunk  # what Chunker.chunk_many returns (not retrostore.Chunk)

    z = np.load(path)
    per_doc: list[list] = []
    for row, p, a, b in zip(z["tokens"], z["position"].tolist(), z["start"].tolist(), z["end"].tolist()):
        if p == 0:
            per_doc.append([])
        per_doc[-1].append(Chunk(p, row[row >= 0], a, b))
    return per_doc


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product in float64: ids (q, k) int64, scores (q, k) float64, best first."""
    b = base.astype(np.float64)
    ids = np.empty((len(queries), k), np.int64)
    scores = np.empty((len(queries), k), np.float64)
    for a in range(0, len(queries), 100):
        s = queries[a:a + 100].astype(np.float64) @ b.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(s, part, 1)
        order = np.argsort(-ps, axis=1, kind="stable")
        ids[a:a + 100] = np.take_along_axis(part, order, 1)
        scores[a:a + 100] = np.take_along_axis(ps, order, 1)
    return ids, scores


def recall_at_k(found: np.ndarray, base: np.ndarray, queries: np.ndarray, truth_scores: np.ndarray) -> dict:
    """Recall@k of ``found`` (q, k) ids (-1 for none) against exact search.

    ``tie_aware``: a distinct returned id counts when its exact score reaches
    the k-th exact score minus :data:`RECALL_TOL`, so chunks with equal
    vectors (repeated boilerplate) are interchangeable. :func:`id_overlap` is
    the plain id intersection with one exact answer, for reference.
    """
    k = truth_scores.shape[1]
    hits = 0
    for i, row in enumerate(found):
        ids = np.unique(row[row >= 0])
        if len(ids) == 0:
            continue
        s = base[ids].astype(np.float64) @ queries[i].astype(np.float64)
        hits += min(k, int((s >= truth_scores[i, k - 1] - RECALL_TOL).sum()))
    return {"tie_aware": hits / (k * len(found))}


def id_overlap(found: np.ndarray, truth_ids: np.ndarray) -> float:
    k = truth_ids.shape[1]
    return sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth_ids)) / (k * len(found))


def prepare_scale_split(cache_dir: Path, corpus: Path, out: Path, *, n: int, n_queries: int, k: int,
                        seed: int) -> dict:
    """Write the data of a peers run at scale (``peers.py --scale N``) in the layout of :func:`prepare_split`.

    About ``n`` chunks of ``scale_data.py``: the pydocs documents cycled (whole documents, with
    their real chunk texts and token ids) and clustered vectors with near-ties, rounded to float16
    values (so that retrostore's float16 raw vectors hold exactly what every system is given);
    ``n_queries`` fresh queries; exact top-``k`` by numpy.
    """
    from scale_data import ClusteredVectors, TextPool

    gen = ClusteredVectors(seed=seed)
    pool = TextPool(cache_dir / CACHE_CHUNKS, corpus)
    _, n_docs, n_chunks = pool.plan(n, n)[0]
    texts, chunks = pool.docs(0, n_docs)
    base = gen.rows(0, n_chunks).astype(np.float16).astype(np.float32)
    queries = gen.queries(n_queries)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "vectors.npy", base)
    np.save(out / "queries.npy", queries)
    chunk_doc = [d for d, cs in enumerate(chunks) for _ in cs]
    (out / "texts.json").write_text(json.dumps({
        "doc_texts": texts, "chunk_doc": chunk_doc,
        "chunk_text": [t[c.start:c.end] for t, cs in zip(texts, chunks) for c in cs]}, ensure_ascii=False))
    flat = [c for cs in chunks for c in cs]
    tokens = np.full((len(flat), 64), -1, np.int64)
    for i, c in enumerate(flat):
        tokens[i, :len(c.token_ids)] = c.token_ids
    np.savez(out / "chunks.npz", tokens=tokens, position=[c.position for c in flat], start=[c.start for c in flat],
             end=[c.end for c in flat])
    ids, scores = exact_topk(base, queries, k)
    np.savez(out / "truth.npz", ids=ids, scores=scores)
    split = {"documents": n_docs, "chunks": n_chunks, "dim": int(base.shape[1]), "heldout_documents": [],
             "heldout_chunks": 0, "queries": int(n_queries), "k": k, "seed": seed,
             "scale": f"{gen.describe()}, float16 values; texts: {pool.source}",
             "cache": {"source": "benchmarks/scale_data.py"}}
    (out / "split.json").write_text(json.dumps(split, indent=1))
    return split
