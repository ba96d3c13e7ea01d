"""Thread counts: the CPUs this process may use, the check of every ``threads`` argument
(``open``, ``create``, the builds, ``OnnxEmbedder``, ``retrostore serve``), and the process's
pool of call threads."""

from __future__ import annotations

import numbers
import os
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any

from .errors import InvalidInputError, shown

__all__ = ["cpu_count", "max_threads", "check_threads", "call_pool", "in_call_pool", "wait_all"]


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


#: (pid, pool) of the threads that run parts of one call side by side (an embedding call's length
#: groups, an exact search's database ranges), shared by the whole process (so a closed or forgotten
#: embedder or store holds no threads of its own).
_CALLS: tuple[int, ThreadPoolExecutor] | None = None
_CALLS_LOCK = threading.Lock()


def _forget_calls_in_child() -> None:
    """``fork()`` handler: the parent's pool threads do not exist in the child (nor may its lock be held)."""
    global _CALLS, _CALLS_LOCK
    _CALLS, _CALLS_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_calls_in_child)


_IN_POOL = threading.local()


def _mark_pool_thread() -> None:
    _IN_POOL.yes = True


def in_call_pool() -> bool:
    """Whether this thread is one of :func:`call_pool`'s: work split over the pool runs whole on such
    a thread instead (a task waiting for other tasks of a full pool waits for ever; helper-49: two
    tasks each searching a batch hung)."""
    return getattr(_IN_POOL, "yes", False)


def call_pool() -> ThreadPoolExecutor:
    """The process's pool of call threads (one per usable CPU), made on first use. Its tasks are
    native calls that release the GIL (onnxruntime's ``run``, FAISS's searches); a task never waits
    on another task of the pool (callers check :func:`in_call_pool`)."""
    global _CALLS
    with _CALLS_LOCK:
        if _CALLS is None or _CALLS[0] != os.getpid():
            _CALLS = (os.getpid(), ThreadPoolExecutor(cpu_count(), thread_name_prefix="retrostore-call",
                                                      initializer=_mark_pool_thread))
        return _CALLS[1]


def wait_all(futures: list) -> None:
    """Wait until every future is done, even through a KeyboardInterrupt or a signal handler's
    SystemExit (raised again once they are): their tasks read memory the caller may free as soon as it returns (helper-49: a search
    interrupted while a pool thread still scanned the index, then the store closed: a segfault)."""
    interrupted = None
    pending = [f for f in futures if not f.done()]
    while pending:
        try:
            pending[0].exception()  # waits; never raises the task's own exception
        except CancelledError:  # done, never run
            pass
        except BaseException as exc:  # KeyboardInterrupt, or SystemExit from a signal handler: after the wait
            interrupted = interrupted or exc
        pending = [f for f in pending if not f.done()]
    if interrupted is not None:
        raise interrupted
