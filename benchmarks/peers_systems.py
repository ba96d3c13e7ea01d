"""The systems compared by ``benchmarks/peers.py``, one adapter each.

Every adapter does the same four things with the same data: ``ingest``
(precomputed float32 vectors plus texts -> a directory on disk, durably),
``open`` (a fresh handle to that directory), ``query_one`` (one vector, k
nearest, returning ids *and texts*) and ``query_batch`` (all queries in as
few calls as the system allows, ids and texts). Ids are the row numbers of
the indexed chunks, so recall is computed identically for all systems.

Libraries are imported inside ``load()`` only, so that a worker process pays
for (and measures) the import of its own system alone.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (what a durable ingest must end with)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def ivf_lists(n: int) -> int:
    """IVF list count scaled to the corpus: the power of two nearest sqrt(n) (256 for 51k, 64 for 5k)."""
    return 2 ** max(4, round(math.log2(math.sqrt(max(n, 1)))))


class System:
    name = ""
    label = ""
    #: query-time variants: (suffix, label, kwargs); the first is the default
    variants: list[tuple[str, str, dict]] = [("", "", {})]

    def __init__(self, n_chunks: int, faiss_threads: int | None = None):
        self.n_chunks = n_chunks
        #: FAISS OpenMP threads (None: the library's default, which is what users get)
        self.faiss_threads = faiss_threads

    def load(self) -> None:  # import the library
        raise NotImplementedError

    def versions(self) -> dict:
        return {}

    def prepare(self, data_dir: Path, data: dict) -> None:
        """Input preparation before the ingest clock starts (as the chunk texts are prepared)."""

    def ingest(self, path: Path, data: dict, vectors: np.ndarray) -> dict:
        """Write everything; return named phase times (s). The worker fsyncs the tree afterwards."""
        raise NotImplementedError

    def after_ingest(self, path: Path, data: dict, vectors: np.ndarray) -> dict:
        """Extra, untimed-by-ingest measurements."""
        return {}

    def open(self, path: Path) -> Any:
        raise NotImplementedError

    def close(self, h: Any) -> None:
        pass

    def query_one(self, h: Any, q: np.ndarray, k: int, **kw) -> tuple[list[int], list[str]]:
        raise NotImplementedError

    def query_batch(self, h: Any, qs: np.ndarray, k: int, **kw) -> tuple[np.ndarray, list[list[str]]]:
        raise NotImplementedError


# -- the floor: raw FAISS + LMDB, written by hand -----------------------------------------
class FaissLmdb(System):
    """IndexFlatIP in one file + an LMDB of msgpack'd ``{"t": text, "d": doc}`` keyed by 8-byte big-endian id."""

    name = "faiss-lmdb"
    label = "raw FAISS Flat + LMDB (floor)"

    def load(self):
        global faiss, lmdb, msgpack
        import faiss
        import lmdb
        import msgpack

        if self.faiss_threads:
            faiss.omp_set_num_threads(self.faiss_threads)

    def build_index(self, vectors):
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return index

    def versions(self):
        return {"faiss-cpu": faiss.__version__, "lmdb": lmdb.__version__, "msgpack": ".".join(map(str, msgpack.version))}

    def ingest(self, path, data, vectors):
        t0 = time.perf_counter()
        path.mkdir(parents=True)
        index = self.build_index(vectors)
        faiss.write_index(index, str(path / "index.faiss"))
        t1 = time.perf_counter()
        env = lmdb.open(str(path / "texts.lmdb"), map_size=1 << 34, subdir=True)
        docs = data["chunk_doc"]
        with env.begin(write=True) as txn:
            txn.cursor().putmulti(
                ((i.to_bytes(8, "big"), msgpack.packb({"t": t, "d": docs[i]})) for i, t in enumerate(data["chunk_text"])),
                append=True)
        env.sync(True)
        env.close()
        return {"index_s": t1 - t0, "lmdb_s": time.perf_counter() - t1}

    def open(self, path):
        index = faiss.read_index(str(path / "index.faiss"))
        env = lmdb.open(str(path / "texts.lmdb"), subdir=True, readonly=True, lock=True)
        return index, env

    def close(self, h):
        h[1].close()

    def query_one(self, h, q, k, nprobe=None):
        index, env = h
        if nprobe:
            index.nprobe = nprobe
        _, I = index.search(q.reshape(1, -1), k)
        ids = [int(i) for i in I[0] if i >= 0]
        with env.begin() as txn:
            texts = [msgpack.unpackb(txn.get(i.to_bytes(8, "big")))["t"] for i in ids]
        return ids, texts

    def query_batch(self, h, qs, k, nprobe=None):
        index, env = h
        if nprobe:
            index.nprobe = nprobe
        _, I = index.search(qs, k)
        with env.begin() as txn:
            texts = [[msgpack.unpackb(txn.get(int(i).to_bytes(8, "big")))["t"] for i in row if i >= 0] for row in I]
        return I, texts


class FaissIvfLmdb(FaissLmdb):
    """The floor with a trained IVF index: what a trained retrostore index should match at equal recall."""

    name = "faiss-ivf-lmdb"
    variants = [("/np16", " nprobe=16", {"nprobe": 16}), ("/np64", " nprobe=64", {"nprobe": 64})]

    @property
    def label(self):
        return f"raw FAISS IVF{ivf_lists(self.n_chunks)},Flat + LMDB"

    def build_index(self, vectors):
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.index_factory(x.shape[1], f"IVF{ivf_lists(len(x))},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.add(x)
        return index


# -- retrostore ----------------------------------------------------------------------------
class Retrostore(System):
    """retrostore through its public API: ``create`` / ``append(docs, embeddings=, chunks=)`` /
    ``commit``; ``open`` / ``search_vectors`` / ``get_chunks``.

    Documents go in, with the chunks the store's chunker makes of them
    (``chunk_many``, cut when the split was prepared and loaded before the
    clock starts, as the peers' chunk texts are): the chunks a pipeline made
    to embed, handed back so the documents are not tokenized again. The chunks it stores are the
    cached ones (asserted), so chunk ids equal row numbers. ``after_ingest``
    also times the same ingest from documents alone (tokenizing included).
    The ``hits`` variant returns what ``Store.search`` returns after
    embedding (``Reader.hits``: each hit with its continuation chunk).
    """

    name = "retrostore-flat"
    label = "retrostore, index=\"Flat\""
    variants = [("", "", {"hits": False}),
                ("+cont", " + continuations (search() path)", {"hits": True})]
    append_docs = 64

    def factory(self) -> str:
        return "Flat"

    def load(self):
        global retrostore
        import retrostore

    def versions(self):
        import subprocess

        rev = subprocess.run(["git", "-C", str(Path(retrostore.__file__).parent), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        return {"retrostore": f"{retrostore.__version__} ({rev or 'no git'})"}

    #: create(index_params=...): store-wide search parameters
    index_params: dict | None = None

    def _build(self, path, data, vectors, per_doc=None) -> dict:
        docs = data["doc_texts"]
        counts = np.bincount(np.asarray(data["chunk_doc"], np.int64), minlength=len(docs))
        starts = np.concatenate([[0], np.cumsum(counts)])
        t0 = time.perf_counter()
        factory = self.factory()
        kwargs = {} if factory is None else {"index": factory}
        st = retrostore.create(path, index_params=self.index_params, threads=self.faiss_threads, **kwargs)
        t1 = time.perf_counter()
        try:
            for a in range(0, len(docs), self.append_docs):
                b = min(len(docs), a + self.append_docs)
                st.append(docs[a:b], embeddings=vectors[starts[a]:starts[b]],
                          chunks=None if per_doc is None else per_doc[a:b])
            t2 = time.perf_counter()
            st.commit()
            t3 = time.perf_counter()
            n = len(st)
        finally:
            st.close()
        if n != len(vectors):
            raise RuntimeError(f"retrostore made {n} chunks, the cache has {len(vectors)}")
        return {"create_s": t1 - t0, "append_s": t2 - t1, "commit_s": t3 - t2}

    def prepare(self, data_dir, data):
        from peers_data import load_chunks

        self.per_doc = load_chunks(data_dir / "chunks.npz")

    def ingest(self, path, data, vectors):
        return self._build(path, data, vectors, self.per_doc)

    def after_ingest(self, path, data, vectors):
        """The same ingest from documents alone (append tokenizes them), into a sibling
        directory removed afterwards, and chunking alone; neither is in ingest_s."""
        import shutil

        other = Path(path).with_name(Path(path).name + "-from-documents")
        shutil.rmtree(other, ignore_errors=True)
        t0 = time.perf_counter()
        phases = self._build(other, data, vectors)
        from_docs = time.perf_counter() - t0
        shutil.rmtree(other)
        docs = data["doc_texts"]
        t0 = time.perf_counter()
        chunker = retrostore.Chunker(retrostore.default_tokenizer_path(), 64)
        for a in range(0, len(docs), self.append_docs):
            chunker.chunk_many(docs[a:a + self.append_docs])
        return {"from_documents_s": from_docs, "from_documents_append_s": phases["append_s"],
                "chunking_s": time.perf_counter() - t0}

    def open(self, path):
        return retrostore.open(path, threads=self.faiss_threads)

    def close(self, h):
        h.close()

    def query_one(self, h, q, k, hits=False, params=None):
        scores, ids = h.search_vectors(q, k, params=params)
        if hits:
            row = h._reader.hits(scores, ids)[0]
            return [x.chunk_id for x in row], [x.text for x in row]
        chunks = h.get_chunks(ids[0][ids[0] >= 0])
        return [c.chunk_id for c in chunks], [c.text for c in chunks]

    def query_batch(self, h, qs, k, hits=False, params=None):
        scores, ids = h.search_vectors(qs, k, params=params)
        if hits:
            rows = h._reader.hits(scores, ids)
            return ids, [[x.text for x in row] for row in rows]
        flat = ids[ids >= 0]
        by_id = {c.chunk_id: c.text for c in h.get_chunks(np.unique(flat))}
        return ids, [[by_id[int(i)] for i in row if i >= 0] for row in ids]


class RetrostoreDefault(Retrostore):
    """retrostore as a user gets it: ``retrostore.create(path)`` with no index argument (``auto``:
    exact Flat, an HNSW graph or trained IVF fast-scan + re-ranking, by the store's size), default
    search parameters."""

    name = "retrostore"
    variants = [("", "", {})]

    def factory(self):
        return None

    @property
    def label(self):
        from retrostore.index.policy import default_factory

        return f"retrostore, no index argument (auto: `{default_factory(self.n_chunks, 384)}` at this size)"


class RetrostoreTrained(Retrostore):
    """retrostore with the index ``index="auto"`` trains for a large store: ``IVF{nlist},PQ8``
    (nlist from the store's size) searched with its default parameters (nprobe 64, re-ranking
    ``k x 50`` candidates exactly from the float16 raw vectors). ``auto`` itself keeps this
    corpus (< 100,000 chunks) exact; the factory string is given so that it trains at the commit."""

    name = "retrostore-ivf"
    variants = [("", "", {})]

    def factory(self):
        from retrostore.index.policy import default_factory

        return default_factory(self.n_chunks, 384, trained=True)

    @property
    def label(self):
        return f"retrostore, index=\"{self.factory()}\" (what auto trains at this size; default search parameters)"


class RetrostoreSQ(Retrostore):
    """retrostore with an 8-bit scalar-quantised IVF index (384 bytes/vector) tuned for recall:
    ``IVF{nlist},SQ8``, nprobe 256 and 128, re-ranking ``k x 2`` candidates from the raw vectors.
    Stated in ``index_params`` at create, as a user would."""

    name = "retrostore-ivfsq"
    variants = [("", " nprobe=256", {}), ("/np128", " nprobe=128", {"params": {"nprobe": 128}})]
    index_params = {"nprobe": 256, "rerank": 2}

    def factory(self):
        from retrostore.index.policy import default_factory

        nlist = default_factory(self.n_chunks, 384, trained=True).split(",")[0]
        return f"{nlist},SQ8"

    @property
    def label(self):
        return f"retrostore, index=\"{self.factory()}\", rerank 2,"


# -- LanceDB -------------------------------------------------------------------------------
class Lance(System):
    """LanceDB embedded (``lancedb.connect(dir)``), one table ``id, doc_id, text, vector``; dot product."""

    name = "lancedb-flat"
    label = "LanceDB, no index (exact scan)"
    index = False

    def load(self):
        global lancedb, pa
        import lancedb
        import pyarrow as pa

    def versions(self):
        return {"lancedb": lancedb.__version__, "pyarrow": pa.__version__}

    def ingest(self, path, data, vectors):
        n, dim = vectors.shape
        t0 = time.perf_counter()
        table = pa.table({
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "doc_id": pa.array(np.asarray(data["chunk_doc"], np.int64)),
            "text": pa.array(data["chunk_text"], pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(vectors, np.float32).ravel()), dim),
        })
        db = lancedb.connect(str(path))
        tbl = db.create_table("chunks", data=table)
        t1 = time.perf_counter()
        phases = {"table_s": t1 - t0}
        if self.index:
            from lancedb.index import IvfPq

            # lancedb 0.40: the first positional argument names the column when config is given
            tbl.create_index("vector", config=IvfPq(distance_type="dot", num_partitions=ivf_lists(n)))
            phases["index_s"] = time.perf_counter() - t1
        return phases

    def open(self, path):
        return lancedb.connect(str(path)).open_table("chunks")

    def _q(self, tbl, q, k, nprobes=None, refine=None):
        b = tbl.search(q).distance_type("dot").limit(k).select(["id", "text", "_distance"])
        if nprobes:
            b = b.nprobes(nprobes)
        if refine:
            b = b.refine_factor(refine)
        return b.to_arrow()

    def query_one(self, tbl, q, k, **kw):
        r = self._q(tbl, q.reshape(-1), k, **kw)
        return r["id"].to_pylist(), r["text"].to_pylist()

    def query_batch(self, tbl, qs, k, **kw):
        r = self._q(tbl, [row for row in qs], k, **kw)
        qi = r["query_index"].to_numpy()
        rid = r["id"].to_numpy()
        text = r["text"].to_pylist()
        ids = np.full((len(qs), k), -1, np.int64)
        texts: list[list[str]] = [[] for _ in range(len(qs))]
        fill = np.zeros(len(qs), np.int64)
        for j in range(len(qi)):
            i = int(qi[j])
            if fill[i] < k:
                ids[i, fill[i]] = rid[j]
                texts[i].append(text[j])
                fill[i] += 1
        return ids, texts


class LanceIvfPq(Lance):
    name = "lancedb-ivfpq"
    index = True
    variants = [("", " (default nprobes=20)", {}),
                ("/np64r10", " (nprobes=64, refine_factor=10)", {"nprobes": 64, "refine": 10})]

    @property
    def label(self):
        return f"LanceDB, IVF_PQ ({ivf_lists(self.n_chunks)} partitions, 24 sub-vectors, dot)"


# -- Chroma --------------------------------------------------------------------------------
class Chroma(System):
    """Chroma ``PersistentClient``, one collection, HNSW with space "ip" (defaults otherwise)."""

    name = "chroma"
    label = "Chroma PersistentClient (HNSW, ip, M=16, ef_search=100)"

    def load(self):
        global chromadb, Settings
        os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
        import chromadb
        from chromadb.config import Settings

    def versions(self):
        return {"chromadb": chromadb.__version__}

    def _client(self, path):
        return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))

    def ingest(self, path, data, vectors):
        t0 = time.perf_counter()
        client = self._client(path)
        col = client.create_collection("chunks", embedding_function=None, configuration={"hnsw": {"space": "ip"}})
        step = client.get_max_batch_size()
        texts, docs = data["chunk_text"], data["chunk_doc"]
        for a in range(0, len(vectors), step):
            b = min(len(vectors), a + step)
            col.add(ids=[str(i) for i in range(a, b)], embeddings=np.ascontiguousarray(vectors[a:b], np.float32),
                    documents=texts[a:b], metadatas=[{"doc_id": docs[i]} for i in range(a, b)])
        return {"add_s": time.perf_counter() - t0}

    def open(self, path):
        return self._client(path).get_collection("chunks", embedding_function=None)

    def query_one(self, col, q, k):
        r = col.query(query_embeddings=q.reshape(1, -1), n_results=k, include=["documents"])
        return [int(i) for i in r["ids"][0]], r["documents"][0]

    def query_batch(self, col, qs, k):
        r = col.query(query_embeddings=qs, n_results=k, include=["documents"])
        ids = np.full((len(qs), k), -1, np.int64)
        for i, row in enumerate(r["ids"]):
            ids[i, :len(row)] = [int(x) for x in row]
        return ids, r["documents"]


SYSTEMS: dict[str, type[System]] = {c.name: c for c in (FaissLmdb, FaissIvfLmdb, Retrostore, RetrostoreDefault,
                                                          RetrostoreTrained,
                                                          RetrostoreSQ, Lance, LanceIvfPq, Chroma)}
