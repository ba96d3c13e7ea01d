"""Following a writer's commits without a stall: each new version is opened and warmed off the
batcher thread, and the batcher swaps handles between batches.

A read-only handle merges a streamed store's index segments in memory at its first search
(:meth:`retrostore.index.search.SegmentSet.merge_segments`); ``Store.refresh()`` on the served
handle made the first batch on every new version pay that merge, ~0.3 s per 1M vectors of the
default codes (0.17 s at 600k measured, 2026-12-07), during which no request was answered.

:class:`Follower` watches ``manifest.json`` (a commit renames a new one into place), and when it
changed opens the store again in its own thread (``open``, as at start: a new handle, sharing
the process's LMDB environment and the served handle's embedder), runs one search on it so that
its merge is done, and leaves it for the batcher (:meth:`take`), which serves it from its next
batch on and closes the handle it replaces. Every answer still comes from one version, and from
the merged index of that version, as before. Costs: while a version is prepared the process holds
two copies of the index (the served one and the new one); the merge's CPU time is spent beside
the batches instead of inside one.

A store directory replaced by another store (a copy unpacked or synced over it) is the same
case: the new handle opens the new store; while that fails (a copy under way), the served
version stays, and the attempt is repeated at most every :data:`RETRY_S`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from retrostore.storage.layout import MANIFEST
from retrostore.storage.manifest import manifest_stamp

__all__ = ["Follower", "RETRY_S", "manifest_path"]

log = logging.getLogger("retrostore.serve")

#: Seconds between attempts to open a new version while they fail.
RETRY_S = 1.0


def manifest_path(store: str | os.PathLike) -> str:
    """The path the follower stats (:func:`retrostore.storage.manifest.manifest_stamp`)."""
    return os.fspath(Path(store) / MANIFEST)


class Follower:
    """The thread that prepares the next version's handle (see the module's docstring).

    Parameters
    ----------
    store : path
        The served store directory.
    open_handle : callable
        Opens the store read-only and warms the handle (its first search); returns it (an object
        with ``manifest_sha256`` and ``close()``), or raises (the served version stays).
    served : callable
        ``(version, manifest_sha256)`` of the version served (to skip a manifest of the same
        commit, and for the log).
    interval_s : float
        Seconds between looks at ``manifest.json``.
    stamp : tuple or None
        The manifest's stamp taken before the served handle was opened.
    """

    def __init__(self, store: str | os.PathLike, open_handle: Callable[[], Any], served: Callable[[], Any],
                 interval_s: float, stamp: tuple | None) -> None:
        self._manifest = manifest_path(store)
        self._open = open_handle
        self._served = served
        self.interval_s = max(0.005, float(interval_s))
        self._seen = stamp
        self._lock = threading.Lock()
        self._ready: Any = None
        self._failures: list[str] = []
        self._last_error: str | None = None
        self._retry_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retrostore-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop looking; close a prepared handle nobody took."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None:
            ready.close()

    def take(self) -> Any:
        """The prepared handle of a newer version, once (None when there is none)."""
        with self._lock:
            ready, self._ready = self._ready, None
        return ready

    def failures(self) -> list[str]:
        """The failed attempts since the last call (their messages), for the caller's metrics."""
        with self._lock:
            out, self._failures = self._failures, []
        return out

    # -- the thread --------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._look()
            except Exception:  # a bug must not end the following silently: logged, tried again
                log.exception("the follower failed; it looks for new versions again in %g s", RETRY_S)
                self._retry_at = time.monotonic() + RETRY_S

    def _look(self) -> None:
        """One look at ``manifest.json``; on a change, the new version's handle is prepared."""
        stamp = manifest_stamp(self._manifest)
        if stamp == self._seen or time.monotonic() < self._retry_at:
            return
        try:
            handle = self._open()
        except Exception as exc:  # a damaged new version, a copy under way: the served one stays
            self._failed(exc)
            return
        if self._stop.is_set():  # (stopped while it opened: nobody will take it)
            handle.close()
            return
        self._last_error = None
        self._seen = stamp
        if handle.manifest_sha256 == self._served()[1]:
            handle.close()  # (the commit the served handle already has)
            return
        with self._lock:
            superseded, self._ready = self._ready, handle
        if superseded is not None:  # a newer version came before the batcher took this one
            superseded.close()

    def _failed(self, exc: Exception) -> None:
        self._retry_at = time.monotonic() + RETRY_S
        message = f"{type(exc).__name__}: {exc}"
        if message != self._last_error:  # once per cause, not at every attempt
            log.error("staying at version %d: opening the newest version failed: %s", self._served()[0], message)
            self._last_error = message
        with self._lock:
            self._failures.append(message)
