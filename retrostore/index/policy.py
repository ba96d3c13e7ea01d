"""The size-following default index ("auto"): which factory string and which
search parameters a store of a given size gets.

Three structures, by the store's size (docs/index.md gives the measurements
behind each threshold):

* below :data:`EXACT_MAX` vectors, ``Flat`` (exact): a single-query scan of
  fewer than 5,000 vectors costs about what a graph search does;
* from there to :data:`AUTO_TRAIN_MIN`, an HNSW graph over float16 vectors
  (``HNSW32,SQfp16``, ``efSearch`` 128): no training, sub-millisecond queries,
  recall@10 0.995 on held-out pydocs queries;
* from :data:`AUTO_TRAIN_MIN` on, ``IVF{nlist},PQ{M}x4fs``: 4-bit PQ fast-scan
  codes of ``dim / 16`` bytes (24 at 384-d: one 4-bit code per 8 dimensions),
  trained once on a bounded sample, probed at ``nlist / 4``, candidates re-ranked
  exactly from the raw vectors kept beside the index, with a re-ranking depth
  that grows with the store (:func:`default_rerank`). ``nlist`` is the power
  of two nearest ``4 * sqrt(N)`` at training (FAISS wiki, "Guidelines to choose
  an index"), capped so that the coarse centroids cost at most
  :data:`CENTROID_BYTES_PER_VECTOR` bytes per vector from 1M vectors on.
"""

from __future__ import annotations

import math
import re

from .training import MIN_POINTS_PER_CENTROID

__all__ = ["EXACT_MAX", "AUTO_TRAIN_MIN", "HNSW_FACTORY", "HNSW_EF_SEARCH", "DEFAULT_RERANK",
           "RERANK_FRACTION", "FS_DIMS_PER_SUBQUANTIZER", "NPROBE_DIVISOR", "default_nlist", "default_factory", "default_params",
           "default_rerank", "policy_stage"]

#: The default index is exact (``Flat``) below this many vectors.
EXACT_MAX = 5_000
#: The default index switches from the HNSW graph to a trained IVF index at this many vectors.
AUTO_TRAIN_MIN = 100_000
#: The graph of the middle sizes: 32 neighbours per node over float16 vectors.
HNSW_FACTORY = "HNSW32,SQfp16"
#: ``efSearch`` of the default graph (FAISS's default is 16).
HNSW_EF_SEARCH = 128
#: On stores of >= 1M vectors, the default's coarse centroids cost at most this much.
CENTROID_BYTES_PER_VECTOR = 1.0
#: Dimensions per 4-bit sub-quantizer of the default fast-scan code (48 sub-quantizers, 24 bytes, at
#: 384-d). Held-out pydocs queries, 49,203 chunks, IVF1024: 6-byte codes (PQ12x4fs) reach recall@10
#: 0.758 at nprobe 64 / rerank 50 and 0.953 at rerank 200; 24-byte codes (PQ48x4fs) 0.993 at nprobe
#: 256 / rerank 100 (docs/index.md).
FS_DIMS_PER_SUBQUANTIZER = 8
#: The smallest re-ranking depth (``rerank``: candidates per requested neighbour).
DEFAULT_RERANK = 100
#: Default IVF probes: ``nlist / NPROBE_DIVISOR`` (clamped, :func:`default_params`).
NPROBE_DIVISOR = 4
#: ``rerank`` grows so that ``10 * rerank`` candidates cover this share of the store.
RERANK_FRACTION = 1 / 3277


def default_nlist(n: int, dim: int) -> int:
    """IVF lists for ``n`` vectors: the power of two nearest 4 sqrt(n), memory-capped from 1M vectors.

    The cap keeps the coarse centroids (``nlist * dim * 4`` bytes) at most
    :data:`CENTROID_BYTES_PER_VECTOR` per vector; every stage keeps at least
    :data:`~retrostore.index.training.MIN_POINTS_PER_CENTROID` vectors per centroid.
    """
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    if n >= 1_000_000:
        cap = n * CENTROID_BYTES_PER_VECTOR / (4 * dim)
        while nlist > cap and nlist > 1:
            nlist //= 2
    while nlist > 1 and MIN_POINTS_PER_CENTROID * nlist > n:
        nlist //= 2
    return max(nlist, 1)


def _fs_subquantizers(dim: int) -> int | None:
    """Sub-quantizers of the default fast-scan code: the even divisor of ``dim`` nearest
    ``dim / FS_DIMS_PER_SUBQUANTIZER`` (4 bits each), or None when ``dim`` has no even divisor."""
    want = max(2, dim // FS_DIMS_PER_SUBQUANTIZER)
    cands = [m for m in range(2, dim + 1, 2) if dim % m == 0]
    return min(cands, key=lambda m: (abs(m - want), m)) if cands else None


def policy_stage(n: int) -> str:
    """``"exact"``, ``"graph"`` or ``"trained"``: the structure the default index uses at ``n`` vectors."""
    if n < EXACT_MAX:
        return "exact"
    return "graph" if n < AUTO_TRAIN_MIN else "trained"


def default_factory(n: int, dim: int, *, keep_vectors: bool = True, trained: bool = False,
                    mmap: bool = False) -> str:
    """The factory string the default ("auto") index uses for ``n`` vectors.

    Parameters
    ----------
    n : int
        Vectors in the store.
    dim : int
    keep_vectors : bool
        With raw vectors kept, fast-scan PQ codes (``dim / 16`` bytes) are re-ranked exactly
        from them; without, the codes must carry the precision: SQ8 (``dim`` bytes).
    trained : bool
        Return the trained factory even below :data:`AUTO_TRAIN_MIN`.
    mmap : bool
        The store is served memory-mapped: fast-scan codes cannot be mapped
        (docs/index.md), so the trained factory is ``IVF{nlist},PQ8`` instead.
    """
    if not trained:
        stage = policy_stage(n)
        if stage == "exact" or (stage == "graph" and not keep_vectors):
            return "Flat"  # without raw vectors a graph's codes could not train the IVF index later
        if stage == "graph":
            return HNSW_FACTORY
    nlist = default_nlist(n, dim)
    m = _fs_subquantizers(dim)
    if not keep_vectors or m is None or n < MIN_POINTS_PER_CENTROID * 16:
        return f"IVF{nlist},SQ8"
    if mmap:
        return f"IVF{nlist},PQ8" if dim % 8 == 0 and n >= MIN_POINTS_PER_CENTROID * 256 else f"IVF{nlist},SQ8"
    return f"IVF{nlist},PQ{m}x4fs"


def default_rerank(n: int) -> int:
    """``rerank`` of the default trained index at ``n`` vectors: ``max(100, ceil(n * RERANK_FRACTION / 10))``.

    Codes of a few bytes cannot order vectors whose exact scores differ by less
    than their error, and in a store that grows from one distribution the
    number of such near-ties around a query grows in proportion to the store
    (issue 19: recall@10 0.51 at 5M vectors with 500 candidates, 0.996 with
    1,500). From 3.3M vectors on, ``k = 10`` re-ranks 1/3,277 of the store
    (1,530 candidates at 5M); below, 100 per neighbour: on held-out pydocs
    queries 24-byte codes need 1,000 candidates for recall@10 0.99 at
    49,203 chunks (docs/index.md).
    """
    return max(DEFAULT_RERANK, math.ceil(n * RERANK_FRACTION / 10))


def default_params(factory: str, *, keep_vectors: bool, n: int = 0) -> dict:
    """retrostore's search parameters for a factory (FAISS's own defaults are not used silently).

    IVF: ``nprobe = nlist / 4``, at least ``min(nlist, 8)`` and at most 256
    (FAISS's default of 1 probes too little for recall; on held-out pydocs
    queries with IVF1024, nprobe 64 capped recall@10 near 0.97 whatever the
    codes, 256 reached 0.995 with SQ8 and 0.993 with 24-byte fast-scan codes;
    small user-chosen nlists get 8 lists rather than 1). HNSW: ``efSearch =`` :data:`HNSW_EF_SEARCH`
    (FAISS: 16). PQ codes with raw vectors kept: ``rerank =``
    :func:`default_rerank` of ``n``, the store's vectors (re-score ``k * rerank``
    candidates exactly). Parameters given by the user (``index_params``,
    ``reindex(params=)``) win.
    """
    out: dict = {}
    m = re.search(r"IVF(\d+)", factory)
    if m:
        nlist = int(m.group(1))
        out["nprobe"] = int(min(256, max(min(nlist, 8), nlist // NPROBE_DIVISOR)))
    elif factory.startswith("HNSW") or ",HNSW" in factory:
        out["efSearch"] = HNSW_EF_SEARCH
    if keep_vectors and re.search(r"PQ\d", factory):
        out["rerank"] = default_rerank(n)
    return out
