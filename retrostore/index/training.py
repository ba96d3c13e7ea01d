"""Training an index well: sample-size checks for every trained stage, the
default training sample, the seeded sample itself and training a template.

Every k-means stage needs at least :data:`MIN_POINTS_PER_CENTROID` (39)
training vectors per centroid, the number below which FAISS's clustering warns
that the result is poor; retrostore refuses instead of training badly.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from ..errors import IndexTrainingError, check_int
from ..storage.faisstypes import unwrap
from .factory import new_index

__all__ = [
    "MIN_POINTS_PER_CENTROID", "MIN_TRAIN_SIZE", "requirements", "vectors_needed", "suggest_factory", "check_sample",
    "default_train_size", "sample_ids", "train_template", "progress_bar",
]

log = logging.getLogger("retrostore")

#: FAISS's clustering warns below this many training points per centroid.
MIN_POINTS_PER_CENTROID = 39
#: FAISS's k-means subsamples above this many points per centroid.
MAX_POINTS_PER_CENTROID = 256
#: Training points per centroid of the default sample (the RETRO build used 64).
DEFAULT_POINTS_PER_CENTROID = 64
#: The smallest default training sample (fewer when the store holds fewer vectors).
MIN_TRAIN_SIZE = 16_384


# -- sample-size requirements ----------------------------------------------
def requirements(index: faiss.Index) -> list[tuple[str, int, int]]:
    """(stage, centroids, vectors needed) for every trained stage of an untrained index.

    ``vectors needed`` is :data:`MIN_POINTS_PER_CENTROID` times the centroids
    of that stage's k-means (IVF lists, 2^nbits per PQ sub-quantizer, 256 for
    OPQ's internal PQ, ``d_out`` for PCA), and at least 1 for other trained parts.
    """
    out: list[tuple[str, int, int]] = []
    _walk(faiss.downcast_index(index), out)
    return out


def _pq_stage(name: str, pq, out) -> None:
    k = 1 << int(pq.nbits)
    out.append((f"{name} ({pq.M} sub-quantizers x {k} centroids)", k, MIN_POINTS_PER_CENTROID * k))


def _walk(index, out) -> None:
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                out.append((f"OPQ{vt.M}_{vt.d_out} (rotation trained with 256-centroid PQ)", 256,
                            MIN_POINTS_PER_CENTROID * 256))
            elif isinstance(vt, faiss.PCAMatrix):
                out.append((f"PCA to {vt.d_out} dims", vt.d_out, max(vt.d_in, vt.d_out)))
            elif not vt.is_trained:
                out.append((type(vt).__name__, 1, vt.d_in))
        _walk(faiss.downcast_index(index.index), out)
        return
    if isinstance(index, faiss.IndexRefine):
        _walk(faiss.downcast_index(index.base_index), out)
        _walk(faiss.downcast_index(index.refine_index), out)
        return
    if isinstance(index, faiss.IndexIVF):
        q = faiss.downcast_index(index.quantizer)
        if isinstance(q, faiss.MultiIndexQuantizer):
            _pq_stage("IMI coarse quantizer", q.pq, out)
        elif not q.is_trained or q.ntotal == 0:
            out.append((f"IVF{index.nlist} coarse quantizer", index.nlist, MIN_POINTS_PER_CENTROID * index.nlist))
        if hasattr(index, "pq") and isinstance(index.pq, faiss.ProductQuantizer):
            _pq_stage(f"PQ{index.pq.M}x{index.pq.nbits} codes", index.pq, out)
        elif not isinstance(index, faiss.IndexIVFFlat):
            out.append((f"{type(index).__name__} codes", 1, 1))
        return
    if isinstance(index, faiss.IndexHNSW):
        _walk(faiss.downcast_index(index.storage), out)
        return
    if hasattr(index, "pq") and isinstance(getattr(index, "pq"), faiss.ProductQuantizer) and not index.is_trained:
        _pq_stage(f"PQ{index.pq.M}x{index.pq.nbits}", index.pq, out)
        return
    if not index.is_trained:
        out.append((type(index).__name__, 1, 1))


def _needed(factory: str, dim: int, metric: str) -> tuple[list[tuple[str, int, int]], int]:
    index = new_index(factory, dim, metric)
    if index.is_trained:
        return [], 0
    reqs = requirements(index)
    return reqs, max((r[2] for r in reqs), default=1)


def vectors_needed(factory: str, dim: int, metric: str) -> int:
    """The fewest training vectors that train every stage of ``factory`` well (0 when it needs
    no training): :data:`MIN_POINTS_PER_CENTROID` per centroid of its largest stage."""
    return _needed(factory, dim, metric)[1]


def suggest_factory(factory: str, n: int, dim: int, metric: str) -> str:
    """A variant of ``factory`` that ``n`` training vectors can train well (or ``"Flat"``)."""
    cand = factory
    nlist_fit = 1 << max(0, int(math.log2(max(n // MIN_POINTS_PER_CENTROID, 1))))
    cand = re.sub(r"IVF(\d+)", lambda m: f"IVF{min(int(m.group(1)), nlist_fit)}", cand)
    bits_fit = max(0, int(math.log2(max(n // MIN_POINTS_PER_CENTROID, 1))))
    if bits_fit < 8:
        cand = re.sub(r"\bPQ(\d+)(?![x\d])", lambda m: f"PQ{m.group(1)}x{max(bits_fit, 1)}" if bits_fit >= 4 else m.group(0), cand)
        cand = re.sub(r"^OPQ\d+(_\d+)?,", "", cand)
    for c in (cand, f"IVF{nlist_fit},Flat", "Flat"):
        try:
            _, need = _needed(c, dim, metric)
        except Exception:
            continue
        if need <= n and (c != f"IVF{nlist_fit},Flat" or nlist_fit >= 4):
            return c
    return "Flat"


def check_sample(factory: str, n_sample: int, dim: int, metric: str) -> None:
    """Refuse to train ``factory`` on ``n_sample`` vectors when any stage would train badly.

    Raises
    ------
    IndexTrainingError
        Naming each stage short of vectors, the counts, and a factory string that fits.
    InvalidInputError
        FAISS rejects the factory string.
    """
    reqs, need = _needed(factory, dim, metric)
    short = [r for r in reqs if r[2] > n_sample]
    if not short:
        return
    stages = "; ".join(f"{name} needs {req:,} ({MIN_POINTS_PER_CENTROID} per centroid x {cent:,})"
                       for name, cent, req in short)
    fit = suggest_factory(factory, n_sample, dim, metric)
    raise IndexTrainingError(
        f"cannot train {factory!r} well on {n_sample:,} vectors: {stages}. FAISS's k-means needs at least "
        f"{MIN_POINTS_PER_CENTROID} training vectors per centroid. Use {fit!r} (fits {n_sample:,} vectors), "
        f"or train once the store holds >= {need:,} vectors (train_size permitting)"
    )


def default_train_size(factory: str, n: int, dim: int, metric: str) -> int:
    """Training sample for ``factory``: 64 vectors per centroid of its largest stage, at least
    :data:`MIN_TRAIN_SIZE`, all of ``n`` at most.

    (FAISS subsamples beyond 256 per centroid anyway; the published RETRO
    build trained 1M lists on 64M vectors, i.e. 64 per centroid.) The floor
    is for stages without centroids to count: a scalar quantizer (``SQ8``)
    learns per-dimension ranges, which 64 vectors estimate badly (recall@10
    0.25 against 0.99 with 5,000 on heavy-tailed vectors).
    """
    reqs, _ = _needed(factory, dim, metric)
    cent = max((c for _, c, _ in reqs), default=1)
    want = max(DEFAULT_POINTS_PER_CENTROID * cent, MIN_TRAIN_SIZE, max((r for *_, r in reqs), default=1))
    return int(min(n, want))


def check_train_size(train_size: Any) -> int | None:
    """``train_size`` (vectors in the training sample, kept in the manifest) as an int in
    ``[1, 2**63 - 1]``, or None for the default sample.

    Raises
    ------
    InvalidInputError
        Not an int (a bool, a float, a string), below 1 or beyond int64.
    """
    return None if train_size is None else check_int("train_size", train_size, 1, 2**63 - 1,
                                                      fix="vectors in the training sample")


def check_seed(seed: Any) -> int:
    """``seed`` as an int in ``[0, 2**63 - 1]`` (numpy's ``default_rng`` takes no negative seed;
    the manifest keeps it as JSON, read back as int64).

    Raises
    ------
    InvalidInputError
        Not an int (a bool, a float, a string), negative or beyond int64.
    """
    return check_int("seed", seed, 0, 2**63 - 1, fix="the seed of the random sample (a reindex keeps it in the manifest); the default is 0")


def sample_ids(live_ids: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded uniform sample (without replacement) of ``size`` live chunk ids, sorted.

    Raises
    ------
    InvalidInputError
        ``seed`` is not an int >= 0 (:func:`check_seed`).
    """
    rng = np.random.default_rng(check_seed(seed))
    if size >= len(live_ids):
        return np.asarray(live_ids, np.int64)
    return np.sort(rng.choice(np.asarray(live_ids, np.int64), size=size, replace=False))


def train_template(factory: str, dim: int, metric: str, vectors: np.ndarray, *,
                   describe: str = "") -> faiss.Index:
    """Train an empty index of ``factory`` on ``vectors`` (checked first, never aborting).

    Raises
    ------
    IndexTrainingError
        Too few vectors for a stage (see :func:`check_sample`), or FAISS fails.
    """
    check_sample(factory, len(vectors), dim, metric)
    index = new_index(factory, dim, metric)
    if index.is_trained:
        return index
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(x).all():
        raise IndexTrainingError("the training sample holds NaN or inf values")
    log.info("training %s on %s vectors%s", factory, f"{len(x):,}", describe)
    t0 = time.perf_counter()
    try:
        index.train(x)
    except RuntimeError as exc:
        raise IndexTrainingError(f"FAISS could not train {factory!r} on {len(x):,} vectors: {exc}") from exc
    ivfpq = unwrap(index)
    if isinstance(ivfpq, faiss.IndexIVFPQ) and metric == "l2":
        # Precomputed tables cost nlist * M * 256 floats of RAM: not in the 20 B/vector budget.
        ivfpq.use_precomputed_table = -1
        ivfpq.precomputed_table.clear()
    log.info("trained %s in %.1f s", factory, time.perf_counter() - t0)
    return index


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar (disabled unless ``enabled``) for encoding progress, in vectors."""
    return tqdm(total=total, desc=desc, unit="vec", disable=not enabled, dynamic_ncols=True)
