"""The size-following default index ("auto"): which factory string and which
search parameters a store of a given size gets.

Thresholds (docs/index.md explains them with their sources):

* below :data:`AUTO_TRAIN_MIN` vectors the default index is ``Flat`` (exact);
* from there on it is ``IVF{nlist},PQ8`` with ``nlist`` the power of two
  nearest ``4 * sqrt(N)`` (FAISS wiki, "Guidelines to choose an index": K
  between 4 sqrt(N) and 16 sqrt(N), trained on 30 K to 256 K vectors), capped
  so that the coarse centroids cost at most :data:`CENTROID_BYTES_PER_VECTOR`
  bytes per vector on stores of 1M vectors and more; candidates are re-ranked
  exactly with the raw vectors kept beside the index (``rerank``).
"""

from __future__ import annotations

import math
import re

from .training import MIN_POINTS_PER_CENTROID

__all__ = ["AUTO_TRAIN_MIN", "RETRAIN_GROWTH", "DEFAULT_RERANK", "default_nlist", "default_factory",
           "default_params"]

#: The default index switches from Flat to a trained IVF index at this many vectors.
AUTO_TRAIN_MIN = 100_000
#: With the default ("auto") index, retrain once the store holds this many times
#: the vectors it was trained at (nlist then lags 4 sqrt(N) by 2x at most).
RETRAIN_GROWTH = 4
#: On stores of >= 1M vectors, the default's coarse centroids cost at most this much.
CENTROID_BYTES_PER_VECTOR = 4.0
#: Default search parameters of the default trained index.
DEFAULT_RERANK = 50


def default_nlist(n: int, dim: int) -> int:
    """IVF lists for ``n`` vectors: the power of two nearest 4 sqrt(n), memory-capped from 1M vectors."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    if n >= 1_000_000:
        cap = n * CENTROID_BYTES_PER_VECTOR / (4 * dim)
        while nlist > cap and nlist > 1:
            nlist //= 2
    while nlist > 1 and MIN_POINTS_PER_CENTROID * nlist > n:
        nlist //= 2
    return max(nlist, 1)


def default_factory(n: int, dim: int, *, keep_vectors: bool = True, trained: bool = False) -> str:
    """The factory string the default ("auto") index uses for ``n`` vectors.

    Parameters
    ----------
    n : int
        Vectors in the store.
    dim : int
    keep_vectors : bool
        With raw vectors kept, PQ8 codes (8 bytes) are re-ranked exactly from
        them; without, the codes must carry the precision: SQ8 (``dim`` bytes).
    trained : bool
        Return the trained factory even below :data:`AUTO_TRAIN_MIN`.
    """
    if n < AUTO_TRAIN_MIN and not trained:
        return "Flat"
    nlist = default_nlist(n, dim)
    pq_ok = keep_vectors and dim % 8 == 0 and n >= MIN_POINTS_PER_CENTROID * 256
    codes = "PQ8" if pq_ok else "SQ8"
    return f"IVF{nlist},{codes}"


def default_params(factory: str, *, keep_vectors: bool) -> dict:
    """retrostore's search parameters for a factory (FAISS's own defaults are not used silently).

    IVF: ``nprobe = nlist / 16``, at least ``min(nlist, 8)`` and at most 256
    (FAISS's default of 1 probes too little for recall; small user-chosen
    nlists get 8 lists rather than 1). HNSW: ``efSearch = 64`` (FAISS: 16). PQ codes with raw
    vectors kept: ``rerank = 50`` (re-score ``k * 50`` candidates exactly).
    Parameters given by the user (``index_params``, ``reindex(params=)``) win.
    """
    out: dict = {}
    m = re.search(r"IVF(\d+)", factory)
    if m:
        nlist = int(m.group(1))
        out["nprobe"] = int(min(256, max(min(nlist, 8), nlist // 16)))
    elif factory.startswith("HNSW") or ",HNSW" in factory:
        out["efSearch"] = 64
    if keep_vectors and re.search(r"PQ\d", factory):
        out["rerank"] = DEFAULT_RERANK
    return out
