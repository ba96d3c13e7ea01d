"""Validation of document metadata: JSON-like values that round-trip exactly."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import InvalidMetadataError

__all__ = ["clean_metadata"]

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # msgpack's integer range


def clean_metadata(value: Any, where: str) -> Any:
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
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        return clean_metadata(value.item(), where)
    if isinstance(value, np.ndarray):
        return clean_metadata(value.tolist(), where)
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidMetadataError(f"{where} = {value} is outside the storable integer range [-2**63, 2**64-1]")
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidMetadataError(f"{where} = {value!r} is not finite; JSON cannot represent it, store it as a string")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [clean_metadata(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise InvalidMetadataError(
                    f"{where} has the key {key!r} of type {type(key).__name__}; metadata map keys must be "
                    "str (JSON objects), convert it with str()"
                )
            out[key] = clean_metadata(v, f"{where}[{key!r}]")
        return out
    raise InvalidMetadataError(
        f"{where} is a {type(value).__name__}, which cannot be stored and read back; metadata must be "
        "JSON-like (dict with str keys, list, str, int, float, bool, None)"
    )
