"""Thread counts: the CPUs this process may use, and the check of every ``threads`` argument
(``open``, ``create``, the builds, ``OnnxEmbedder``, ``retrostore serve``)."""

from __future__ import annotations

import numbers
import os
from typing import Any

from .errors import InvalidInputError, shown

__all__ = ["cpu_count", "max_threads", "check_threads"]


def cpu_count() -> int:
    """CPUs this process may run on (``os.sched_getaffinity``), else ``os.cpu_count()``; >= 1."""
    getaff = getattr(os, "sched_getaffinity", None)  # absent on macOS and Windows
    return max(1, len(getaff(0)) if getaff else (os.cpu_count() or 1))


def max_threads() -> int:
    """The most threads a caller may ask for: ``max(256, 4 * cpu_count())``.

    More threads than cores only slow FAISS and onnxruntime down, and GNU
    OpenMP fails (``libgomp: Thread creation failed``) or crashes the process
    (exit 139) when asked for tens of thousands (helper-16: ``retrostore eval
    --threads 100000``). The floor of 256 leaves room for settings made on a
    smaller machine than the one that runs them (a Ray Serve replica's
    ``num_cpus`` checked on its driver, helper-18).
    """
    return max(256, 4 * cpu_count())


def check_threads(threads: Any) -> int | None:
    """``threads`` as an int in ``[1, max_threads()]``, or None (the caller's default).

    Raises
    ------
    InvalidInputError
        Not an int (a bool, a float, a string), below 1 or above :func:`max_threads`.
    """
    if threads is None:
        return None
    limit = max_threads()
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or not 1 <= threads <= limit:
        raise InvalidInputError(
            f"threads={shown(threads)} must be an int in [1, {limit}] (at most max(256, 4 x the {cpu_count()} CPUs this "
            "process may use)); leave it out for one thread per CPU")
    return int(threads)
