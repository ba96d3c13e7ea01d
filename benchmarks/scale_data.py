"""The data of ``benchmarks/scale.py`` (and of the 1M-chunk peers run): real chunk texts,
clustered vectors with near-ties, generated deterministically without embedding anything.

Not a benchmark itself; ``scale.py`` and ``peers.py`` import it (Python puts
``benchmarks/`` on ``sys.path`` when a script there is run).

**Vectors.** Row ``i`` of a store of any size is a unit vector drawn around one
of ``topics`` (4,096) random centres::

    x = centres[t] + spread * g,   t ~ U{0..topics-1},  g ~ N(0, I_384),  x /= |x|

with ``spread`` 0.4 and the centres ``N(0, I_384)`` (the generator of
``_common.clustered_vectors``, which the other benchmarks use, with more
centres). Rows are produced in blocks of 100,000 ids, each from its own
generator ``numpy.random.default_rng([seed, 1, block])``, so the same id gets
the same vector whatever the batch sizes, and a store of 5M holds the 1M
store's vectors as its first rows. Queries are fresh draws of the same process
(``default_rng([seed, 2])``): vectors the store does not hold, as held-out text.

**Near-ties.** In 384 dimensions the points of one topic are almost equidistant
from a query near it: at 1M rows a topic holds ~244 of them, at 5M ~1,220,
and their exact scores against the query differ by ~0.005 between the 1st
and the 10th, well inside the error of an 8-byte PQ code. An index whose
codes cannot order them must re-rank (exactly, from the raw vectors) about
every member of the query's topic, so the candidates needed grow in
proportion to the store: the behaviour issue 19's probe found (recall@10
0.51 at 5M with 500 candidates, 0.996 with 1,500).

**Texts.** The pydocs documents (``benchmarks/.cache/pydocs-chunks.json`` when
``peers.py`` filled it, else the corpus), cycled: document ``j`` of a store is
pydocs document ``j mod 497`` with its 64-token chunks, handed to ``append``
with its chunks so nothing is tokenized during the benchmark. Chunk id ``i``
gets vector row ``i``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: Rows per generator block (ids [b * BLOCK, (b + 1) * BLOCK) come from generator b).
BLOCK = 100_000
DIM = 384
TOPICS = 4096
SPREAD = 0.4


class ClusteredVectors:
    """Deterministic clustered unit vectors by id (see the module docstring).

    Parameters
    ----------
    seed : int
    topics : int
        Cluster centres.
    spread : float
        Standard deviation of the per-dimension noise around a centre (centres are N(0, 1)).
    dim : int
    """

    def __init__(self, seed: int = 0, topics: int = TOPICS, spread: float = SPREAD, dim: int = DIM):
        self.seed, self.topics, self.spread, self.dim = seed, topics, spread, dim
        self.centres = np.random.default_rng([seed, 0]).standard_normal((topics, dim)).astype(np.float32)
        self._cached: tuple[int, np.ndarray] | None = None

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = self.centres[rng.integers(0, self.topics, n)]
        x += self.spread * rng.standard_normal((n, self.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def block(self, b: int) -> np.ndarray:
        """Rows ``[b * BLOCK, (b + 1) * BLOCK)``, float32 (the last block is cached)."""
        if self._cached is None or self._cached[0] != b:
            self._cached = (b, self._draw(np.random.default_rng([self.seed, 1, b]), BLOCK))
        return self._cached[1]

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)``, shape (hi - lo, dim), float32."""
        out = np.empty((hi - lo, self.dim), np.float32)
        at = lo
        while at < hi:
            b = at // BLOCK
            end = min(hi, (b + 1) * BLOCK)
            out[at - lo : end - lo] = self.block(b)[at - b * BLOCK : end - b * BLOCK]
            at = end
        return out

    def queries(self, n: int) -> np.ndarray:
        """``n`` query vectors not in any store (fresh draws), float32."""
        return self._draw(np.random.default_rng([self.seed, 2]), n)

    def describe(self) -> str:
        return (f"{self.topics} topics (centres N(0, I_{self.dim})), spread {self.spread}, unit vectors, "
                f"seed {self.seed}, blocks of {BLOCK:,} ids")


class TextPool:
    """Real documents cut into chunks by the store's chunker, cycled to any number of chunks.

    Document ``j`` of a store is pool document ``j mod D`` (the whole pydocs
    corpus, 497 pages and 51,429 chunks, when it is available), handed to
    ``append`` with its chunks (``chunk_many``, made once here), so nothing is
    tokenized while the benchmark runs and every chunk holds its real text and
    token ids.

    Parameters
    ----------
    cache : Path
        ``pydocs-chunks.json`` of the peers cache (its ``doc_texts``); used when it exists.
    corpus : Path
        The ``.jsonl[.zst]`` corpus read otherwise.
    """

    def __init__(self, cache: Path, corpus: Path):
        import retrostore

        if cache.is_file():
            docs = json.loads(cache.read_text())["doc_texts"]
            where = f"the documents of {cache.name}"
        else:
            from retrostore.text.inputs import iter_documents

            docs = [d.text for d in iter_documents([corpus])]
            where = corpus.name
        chunker = retrostore.Chunker(retrostore.default_tokenizer_path(), 64)
        pairs = [(t, cs) for t, cs in zip(docs, chunker.chunk_many(docs)) if cs]
        self.texts = [t for t, _ in pairs]
        self.chunks = [cs for _, cs in pairs]
        self.counts = np.array([len(cs) for cs in self.chunks], np.int64)
        self.source = (f"{len(self.texts)} documents, {int(self.counts.sum()):,} chunks of 64 tokens ({where}), "
                       "cycled")

    def plan(self, n: int, batch: int) -> list[tuple[int, int, int]]:
        """Commits for a store of about ``n`` chunks: ``(first document, documents, chunks)`` each, whole
        documents of about ``batch`` chunks; the last document may take the store past ``n``."""
        out, doc, total = [], 0, 0
        while total < n:
            first, size = doc, 0
            while size < batch and total + size < n:
                size += int(self.counts[doc % len(self.texts)])
                doc += 1
            out.append((first, doc - first, size))
            total += size
        return out

    def docs(self, first: int, count: int) -> tuple[list[str], list[list]]:
        """Documents ``[first, first + count)`` and their chunks, for ``append(docs, chunks=...)``."""
        idx = [j % len(self.texts) for j in range(first, first + count)]
        return [self.texts[i] for i in idx], [self.chunks[i] for i in idx]

    def chunk_texts(self, first: int, count: int) -> list[str]:
        """The chunk texts of documents ``[first, first + count)``, in chunk-id order."""
        texts, chunks = self.docs(first, count)
        return [t[c.start:c.end] for t, cs in zip(texts, chunks) for c in cs]
