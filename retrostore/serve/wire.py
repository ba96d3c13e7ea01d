"""What travels between a retrostore server and its clients: JSON shapes and ``.npy`` bodies.

Shared by the server (``retrostore.serve.app``) and the client
(``retrostore.serve.client``), so both read and write the same shapes (and
take ``Store.neighbors``' own ``tail`` choices).

Neighbours in binary form (``Accept: application/x-npy``) are the five arrays of
:class:`retrostore.Neighbors`, each written by ``numpy.save`` one after the other
in :data:`NEIGHBOR_FIELDS` order; ``numpy.load(f, allow_pickle=False)`` called
five times on the body reads them back.
"""

from __future__ import annotations

import io
import math
import threading
from typing import Any, Sequence

import numpy as np

from retrostore.store.retrieval import TAILS  # what ``tail`` may be: ``Store.neighbors``' own choices

__all__ = ["NPY_MEDIA", "JSON_MEDIA", "NEIGHBOR_FIELDS", "VERSION_HEADER", "pack_arrays", "unpack_arrays",
           "finite_or_none", "scores_to_json", "scores_from_json", "wants_npy", "TAILS"]

NPY_MEDIA = "application/x-npy"
JSON_MEDIA = "application/json"
#: Response header naming the committed version that answered (every endpoint).
VERSION_HEADER = "X-Retrostore-Version"
#: The arrays of a binary neighbours answer, in body order.
NEIGHBOR_FIELDS = ("tokens", "mask", "chunk_ids", "doc_ids", "scores")


def pack_arrays(arrays: Sequence[np.ndarray]) -> bytes:
    """``numpy.save`` of each array, one after the other (no pickles)."""
    out = io.BytesIO()
    for arr in arrays:
        np.save(out, np.ascontiguousarray(arr), allow_pickle=False)
    return out.getvalue()


#: numpy parses a ``.npy`` header with ``ast.literal_eval``, and CPython 3.11 builds ASTs with
#: one recursion counter per interpreter: two threads parsing at once can fail with "SystemError:
#: AST constructor recursion depth mismatch" (python/cpython#106905; 1 of 32 clients asking for
#: neighbours in test_serve_follow's 30 s run). A client's threads take turns here.
_NPY_PARSE = threading.Lock()


def unpack_arrays(data: bytes, count: int) -> list[np.ndarray]:
    """Read ``count`` arrays written by :func:`pack_arrays` (never unpickles; one thread at a time)."""
    buf = io.BytesIO(data)
    with _NPY_PARSE:
        return [np.load(buf, allow_pickle=False) for _ in range(count)]


def finite_or_none(value: float) -> float | None:
    """A float JSON can carry: ``None`` for NaN and the infinities."""
    return value if math.isfinite(value) else None


def scores_to_json(scores: np.ndarray) -> Any:
    """Nested lists of floats, ``None`` where a score is not finite (no neighbour)."""
    arr = np.asarray(scores, dtype=np.float64)
    if np.isfinite(arr).all():
        return arr.tolist()
    obj = arr.astype(object)
    obj[~np.isfinite(arr)] = None
    return obj.tolist()


def scores_from_json(values: Any, missing: float) -> np.ndarray:
    """float32 array from :func:`scores_to_json` output, ``missing`` where it holds ``None``."""
    arr = np.array(values, dtype=object)
    if arr.size:
        arr[np.equal(arr, None)] = missing
    return arr.astype(np.float32)


def _quality(params: list[str]) -> float:
    for p in params:
        name, _, value = p.partition("=")
        if name.strip().lower() == "q":
            try:
                return min(1.0, max(0.0, float(value)))
            except ValueError:
                return 0.0
    return 1.0


def wants_npy(accept: str | None) -> bool:
    """Whether an ``Accept`` header asks for ``.npy`` neighbours rather than JSON.

    True when ``application/x-npy`` is listed with a quality above 0 and at least
    the quality JSON gets (``application/json``, ``application/*`` or ``*/*``);
    ``application/x-npy;q=0`` refuses it (RFC 9110, section 12.5.1).

    Parameters
    ----------
    accept : str or None
        The header's value.

    Returns
    -------
    bool
    """
    if not accept:
        return False
    json_q = 0.0
    specific: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = item.split(";")
        media = media.strip().lower()
        if media:
            specific[media] = max(specific.get(media, 0.0), _quality(params))
    npy = specific.get(NPY_MEDIA, 0.0)
    for media in (JSON_MEDIA, "application/*", "*/*"):
        if media in specific:
            json_q = specific[media]
            break
    return npy > 0 and npy >= json_q
