"""Argument checks shared by the retro/ modules (messages name value, limit and fix)."""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import numpy as np

from ..errors import InvalidInputError
from ..store.reading import id_bounds

__all__ = ["is_int", "check_int", "check_pad_id", "store_pad_id", "as_id_array", "settings"]


class Settings(NamedTuple):
    chunk_tokens: int
    pad_id: int
    vocab_size: int
    deletes: int


_SETTINGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def settings(store) -> Settings:
    """The manifest values retro/ needs, cached per store handle and version.

    ``Store.manifest`` deep-copies the whole manifest (about 0.1-3 ms with many
    segments), too slow to read on every generation-time fetch.
    """
    version = store.version
    hit = _SETTINGS.get(store)
    if hit is not None and hit[0] == version:
        return hit[1]
    m = store.manifest
    s = Settings(int(m["chunk_tokens"]), int(m["tokenizer"]["pad_id"]), int(m["tokenizer"]["vocab_size"]),
                 int((m.get("deletes") or {}).get("documents", 0)))
    _SETTINGS[store] = (version, s)
    return s


def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_int(name: str, value: Any, lo: int, hi: int | None = None, fix: str = "") -> int:
    """``value`` as an int in ``[lo, hi]`` (``hi`` None: no upper limit)."""
    if not is_int(value) or value < lo or (hi is not None and value > hi):
        limit = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidInputError(f"{name}={value!r} must be an int {limit}" + (f"; {fix}" if fix else ""))
    return int(value)


def store_pad_id(store) -> int:
    return settings(store).pad_id


def check_pad_id(store, pad_id: Any) -> int:
    """``pad_id`` (default: the store's) checked against the store's vocabulary."""
    vocab = settings(store).vocab_size
    if pad_id is None:
        return store_pad_id(store)
    if not is_int(pad_id):
        raise InvalidInputError(f"pad_id={pad_id!r} must be an int token id in [0, {vocab}) (the model's pad_id), "
                                f"or None for the store's own ({store_pad_id(store)})")
    if not 0 <= pad_id < vocab:
        raise InvalidInputError(
            f"pad_id={pad_id!r} is outside the store's vocabulary [0, {vocab}); give the id of a token of the "
            "store's tokenizer (the model's pad_id), or leave it None for the store's own pad id "
            f"({store_pad_id(store)})")
    return int(pad_id)


def as_id_array(name: str, ids: Any, *, limit: int, min_ndim: int = 1, allow_missing: bool = True) -> np.ndarray:
    """Integer chunk ids as int64, each in ``[-1 or 0, limit)``."""
    try:
        arr = np.asarray(ids)
    except ValueError as exc:  # ragged nested lists
        raise InvalidInputError(f"{name} cannot form an array ({exc}); every row must have the same length") from None
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype == float):  # (kind: no bool)
        raise InvalidInputError(
            f"{name} has dtype {arr.dtype}; chunk ids are integers (int32/int64), -1 where there is no neighbour")
    if arr.ndim < min_ndim:
        raise InvalidInputError(f"{name} has shape {arr.shape}; expected at least {min_ndim} dimension(s), the last "
                                "one the k neighbours of a query chunk: shape (..., k)")
    if arr.size:
        lo, hi = id_bounds(arr)  # before the int64 cast: a uint64 above 2**63 must not wrap to -1
        floor = -1 if allow_missing else 0
        if lo < floor or hi >= limit:
            bad = lo if lo < floor else hi
            raise InvalidInputError(
                f"{name} holds chunk id {bad}, outside [{floor}, {limit}) (the store's committed chunks"
                + (", -1 for no neighbour" if allow_missing else "")
                + "); were these ids computed on another store or version? recompute them on this one")
    return arr.astype(np.int64, copy=False)
