"""Argument checks shared by the retro/ modules (messages name value, limit and fix)."""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

from ..errors import InvalidInputError, check_int, is_int, shown
from ..storage.manifest import manifest_sha256

__all__ = ["check_k_of", "check_pad_id", "store_pad_id", "settings"]


class Settings(NamedTuple):
    chunk_tokens: int
    pad_id: int
    vocab_size: int
    deletes: int
    identity: str  # the sha256 of the version's manifest: which store and version (retro.table.store_identity)


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
                 int((m.get("deletes") or {}).get("documents", 0)), manifest_sha256(store.path, m))
    _SETTINGS[store] = (version, s)
    return s


def check_k_of(store, k: Any) -> int:
    """RETRO's neighbour count ``k`` for ``store``: an int in ``[1, max(1, len(store))]``.

    A window chunk has at most every chunk of the store as a neighbour: a larger k
    only writes -1 padding (helper-17: k = 100,000 on a 60-chunk store wrote
    6 million -1s; k = 10**9 ended in a MemoryError).
    """
    hi = max(1, len(store))
    return check_int("k", k, 1, hi, fix=f"the store holds {len(store):,} chunks; RETRO uses k = 2")


def store_pad_id(store) -> int:
    return settings(store).pad_id


def check_pad_id(store, pad_id: Any) -> int:
    """``pad_id`` (default: the store's) checked against the store's vocabulary."""
    vocab = settings(store).vocab_size
    if pad_id is None:
        return store_pad_id(store)
    if not is_int(pad_id):
        raise InvalidInputError(f"pad_id={shown(pad_id)} must be an int token id in [0, {vocab}) (the model's pad_id), "
                                f"or None for the store's own ({store_pad_id(store)})")
    if not 0 <= pad_id < vocab:
        raise InvalidInputError(
            f"pad_id={shown(pad_id)} is outside the store's vocabulary [0, {vocab}); give the id of a token of the "
            "store's tokenizer (the model's pad_id), or leave it None for the store's own pad id "
            f"({store_pad_id(store)})")
    return int(pad_id)
