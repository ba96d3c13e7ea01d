"""Search parameters: validation, setting them through FAISS wrappers, reading them back.

Parameters are set with ``faiss.ParameterSpace().set_index_parameter``, which
descends through ``IndexPreTransform`` (OPQ, PCA), ID maps, ``IndexRefine``
and reaches the IVF (``nprobe``, ``max_codes``, ``quantizer_efSearch``) or
HNSW (``efSearch``) index inside; setting ``index.nprobe`` on a wrapper would
silently do nothing. ``rerank`` is retrostore's own: re-score ``k * rerank``
candidates exactly with the raw vectors kept beside the index.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Any

import faiss
import numpy as np

from ..errors import InvalidInputError, shown
from ..storage.faisstypes import unwrap

__all__ = ["FAISS_PARAMS", "RERANK", "REFINE_FACTORS", "check_params", "apply_params", "bounded", "current_params",
           "effective_params", "RWLock"]

#: Search parameters FAISS's ParameterSpace understands (a ``quantizer_`` prefix
#: reaches an IVF's coarse quantizer), plus retrostore's own ``rerank``.
FAISS_PARAMS = ("nprobe", "max_codes", "efSearch", "k_factor_rf", "k_factor", "ht", "polysemous_ht")
RERANK = "rerank"
#: Parameters that multiply k: the candidates a refine step asks of its base index.
REFINE_FACTORS = ("k_factor_rf", "k_factor")
#: Parameters FAISS needs >= 1 (nprobe 0 fails every IVF search); the rest may be 0
#: (max_codes 0 = unlimited, rerank 0 = off, ht 0 = off).
_AT_LEAST_ONE = {"nprobe": 1, "efSearch": 1, "k_factor_rf": 1, "k_factor": 1}
_MAX_PARAM = 2**31 - 1  # FAISS stores these as int
#: Counts (FAISS truncates a float given for them: efSearch 1.5 would search with 1); k_factors are floats.
_INTEGER = {"nprobe", "max_codes", "efSearch", "ht", "polysemous_ht", RERANK}


def param_limits(name: str) -> list[int] | None:
    """``[low, high]``: the values :func:`check_params` accepts for the parameter ``name``; None
    for a name it does not know."""
    base = name[len("quantizer_"):] if name.startswith("quantizer_") else name
    if name != RERANK and base not in FAISS_PARAMS:
        return None
    return [_AT_LEAST_ONE.get(base, 0), _MAX_PARAM]


def check_params(params: Any, where: str = "params") -> dict:
    """Validate a search-parameter dict; returns a clean copy.

    Raises
    ------
    InvalidInputError
        Not a dict, an unknown name, or a value out of range (``nprobe``,
        ``efSearch``, ``k_factor``: >= 1; others >= 0; all < 2**31), or a
        fraction for a count (``nprobe``, ``efSearch``, ``max_codes``, ``ht``,
        ``rerank``: FAISS would truncate it).
    """
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInputError(f"{where} must be a dict such as {{'nprobe': 16}}, not a {type(params).__name__}")
    out = {}
    for name, value in params.items():
        base = name[len("quantizer_"):] if isinstance(name, str) and name.startswith("quantizer_") else name
        if name != RERANK and base not in FAISS_PARAMS:
            raise InvalidInputError(
                f"{where}: unknown search parameter {name!r}; known: {', '.join(FAISS_PARAMS + (RERANK,))} "
                "(a 'quantizer_' prefix reaches an IVF's coarse quantizer, e.g. 'quantizer_efSearch')"
            )
        low = _AT_LEAST_ONE.get(base, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or (isinstance(value, (float, np.floating)) and not math.isfinite(value)) \
                or not low <= value <= _MAX_PARAM:  # (an int has no isfinite beyond a float's range)
            raise InvalidInputError(f"{where}: {name}={shown(value)} must be a finite number in [{low}, {_MAX_PARAM}]"
                                    + (f" ({base} = 0 would make every search fail)" if low and value == 0 else ""))
        if base in _INTEGER and not float(value).is_integer():
            raise InvalidInputError(f"{where}: {name}={value!r} must be a whole number (a count); FAISS would "
                                    f"truncate it to {int(value)}")
        out[name] = int(value) if float(value).is_integer() else float(value)
    return out


def apply_params(index: faiss.Index, params: dict, k: int | None = None) -> None:
    """Set FAISS search parameters on ``index`` (through any wrappers).

    Names that do not apply to this index (``nprobe`` on a Flat index) are
    skipped: the store's parameters outlive a reindex to another family.
    Counts FAISS allocates per query are bounded by what the index can give
    (:func:`bounded`); ``k`` is the search's, for the refine factors.
    """
    ps = faiss.ParameterSpace()
    for name, value in params.items():
        if name == RERANK:
            continue
        try:
            ps.set_index_parameter(index, name, float(bounded(index, name, value, k)))
        except RuntimeError:
            pass


def bounded(index: faiss.Index, name: str, value: float, k: int | None = None) -> float:
    """``value`` for ``name``, at most what searching ``index`` can use: ``nprobe`` and
    ``quantizer_efSearch`` the IVF's lists, ``efSearch`` the vectors indexed, the refine
    factors (``k_factor_rf``, ``k_factor``) the vectors indexed over ``k``.

    FAISS allocates per query what these ask for before it looks at the index: one search with
    ``nprobe`` = 10**8 aborted the process (std::bad_alloc in an IVF fast-scan search; a server
    worker died with it), ``efSearch`` = 2**31 - 1 raised MemoryError. Larger values than
    these bounds find nothing more.
    """
    ntotal = max(int(index.ntotal), 1)
    if name in ("nprobe", "quantizer_efSearch"):
        try:
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError:
            return value  # no IVF inside: the name does not apply (set_index_parameter skips it)
        return min(value, max(int(ivf.nlist), 1))
    if name == "efSearch":
        if not isinstance(unwrap(index), faiss.IndexHNSW):  # an IVF's HNSW quantizer takes it: its lists
            try:
                return min(value, max(int(faiss.extract_index_ivf(index).nlist), 1))
            except RuntimeError:
                pass
        return min(value, ntotal)
    if name in REFINE_FACTORS:
        return min(value, max(1.0, ntotal / max(k or 1, 1)))
    return value


def current_params(index: faiss.Index, names: dict) -> dict:
    """Values of ``names`` as set on ``index`` now (to restore after a per-query change),
    read from the index that ParameterSpace would set (through wrappers; FAISS defaults
    included, e.g. ``max_codes`` 0 = unlimited, ``ht`` = the PQ's ``polysemous_ht``)."""
    out = {}
    for name in names:
        value = _read_param(index, name)
        if value is not None:
            out[name] = value
    return out


_ATTR = {"ht": "polysemous_ht", "k_factor_rf": "k_factor"}


def _read_param(index: faiss.Index, name: str) -> Any:
    if name.startswith("quantizer_"):
        try:
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError:
            return None
        return _read_param(ivf.quantizer, name[len("quantizer_"):])
    attr = _ATTR.get(name, name)
    node = index
    while node is not None:
        node = faiss.downcast_index(node)
        if name == "efSearch":
            if hasattr(node, "hnsw"):
                return int(node.hnsw.efSearch)
        elif hasattr(node, attr):
            return getattr(node, attr)
        node = getattr(node, "index", None) or getattr(node, "base_index", None)
    if name == "efSearch":  # ParameterSpace gives an IVF's HNSW quantizer a plain efSearch too (helper-35:
        return _read_param(index, "quantizer_efSearch")  # never read back, a per-query one stuck for good)
    return None


def effective_params(index: faiss.Index) -> dict:
    """The parameter values the index really searches with, read back from the inner indexes."""
    out: dict[str, Any] = {}
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        out["nprobe"] = int(ivf.nprobe)
        out["nlist"] = int(ivf.nlist)
        if ivf.max_codes:
            out["max_codes"] = int(ivf.max_codes)
        q = faiss.downcast_index(ivf.quantizer)
        if isinstance(q, faiss.IndexHNSW):
            out["quantizer_efSearch"] = int(q.hnsw.efSearch)
    inner = unwrap(index)
    if isinstance(inner, faiss.IndexHNSW):
        out["efSearch"] = int(inner.hnsw.efSearch)
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexRefine):
        out["k_factor_rf"] = float(outer.k_factor)
    return out


class RWLock:
    """Many searches at once, or one holder that changes the parameters (a search with its own,
    or a new version setting the store's on the segments it shares with the one before).

    Writer-preferring: while an exclusive holder waits, new searches wait behind it, so a
    stream of overlapping searches from several threads cannot hold off a commit or a
    refresh for ever. Phase-fair: the searches that waited behind an exclusive holder go in
    when it leaves, before the next exclusive one (review: two or three threads searching with
    their own parameters, each search exclusive, otherwise held a thread's plain searches off
    for the whole run: 1 search in 5 s against 224 before the writer preference). Not reentrant."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._admit = 0  # searches let in ahead of waiting exclusive holders (those that waited for the last)

    def acquire_shared(self) -> None:
        """Enter as one of many searches (wait while a holder changes the parameters, or waits to,
        unless this search waited behind the holder that just left)."""
        with self._cond:
            self._readers_waiting += 1
            try:
                while self._writer or (self._writers_waiting and not self._admit):
                    self._cond.wait()
            except BaseException:
                if self._admit:  # (interrupted: a slot it may hold goes back, so no exclusive waits on it)
                    self._admit -= 1
                    self._cond.notify_all()
                raise
            finally:
                self._readers_waiting -= 1
            if self._admit:
                self._admit -= 1
            self._readers += 1

    def release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()  # only a waiting exclusive() can be waiting for this

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers or self._admit:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._admit = self._readers_waiting  # the searches that waited behind it go first
                self._cond.notify_all()
