"""Validation of document metadata: JSON-like values that round-trip exactly."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import InvalidMetadataError, shown

__all__ = ["clean_metadata"]

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # msgpack's integer range
#: Deepest nesting of lists and maps accepted (msgpack and JSON readers recurse).
MAX_DEPTH = 64


def clean_metadata(value: Any, where: str, _depth: int = 0) -> Any:
    """Return ``value`` as plain JSON-like Python, or raise.

    Accepted: ``None``, ``bool``, ``int`` (int64/uint64 range), finite ``float``,
    ``str``, ``list``/``tuple`` (stored as lists) and ``dict`` with ``str`` keys;
    numpy scalars and arrays are converted to their Python equivalents.

    Raises
    ------
    InvalidMetadataError
        Naming the key path (e.g. ``metadata[3]['tags'][0]``) and the problem:
        a non-string map key, a non-finite float, an out-of-range integer or a
        type that cannot be stored and read back (bytes, sets, objects).
    """
    if _depth > MAX_DEPTH:
        short = where if len(where) <= 80 else where[:60] + "..."
        raise InvalidMetadataError(f"{short} is nested deeper than {MAX_DEPTH} levels; flatten the metadata")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidMetadataError(
                f"{where} holds the lone surrogate {value[exc.start]!r} at character {exc.start}, which "
                "cannot be stored as UTF-8; fix the string (e.g. decode its source with errors='replace')"
            ) from None
        return value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, np.generic):
        return clean_metadata(value.item(), where, _depth)
    if isinstance(value, np.ndarray):
        return clean_metadata(value.tolist(), where, _depth)
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidMetadataError(f"{where} = {shown(value)} is outside the storable integer range [-2**63, 2**64-1]")
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidMetadataError(f"{where} = {value!r} is not finite; JSON cannot represent it, store it as a string")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [clean_metadata(v, f"{where}[{i}]", _depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise InvalidMetadataError(
                    f"{where} has the key {key!r} of type {type(key).__name__}; metadata map keys must be "
                    "str (JSON objects), convert it with str()"
                )
            clean_metadata(key, f"{where} key {key!r}", _depth)  # keys: the same UTF-8 check
            out[key] = clean_metadata(v, f"{where}[{key!r}]", _depth + 1)
        return out
    raise InvalidMetadataError(
        f"{where} is a {type(value).__name__}, which cannot be stored and read back; metadata must be "
        "JSON-like (dict with str keys, list, str, int, float, bool, None)"
    )
