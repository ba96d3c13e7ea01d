"""Dynamic batching: one thread owns the store and answers queued requests in batches.

Request handlers (on the event loop) put :class:`Job` objects on the queue and
await their futures. The batcher thread takes every job waiting, and, while
more requests are known to be on their way (handlers still reading or checking
a body, or the previous batch held several requests), waits up to
``batch_window_ms`` for more, up to ``max_batch`` queries. A lone client never
waits: with nothing else in flight the batch runs at once. A request of more
than ``max_batch`` queries (or, for text, more than ``max_batch * 256``
characters) is answered a slice at a time, the requests that arrive meanwhile
answered between its slices (from the same version). Between batches the
thread moves to the newest committed version (the handle the engine's follower
thread opened and warmed for it), so a batch is answered from one version,
never from a half-switched one.

FAISS and onnxruntime run their own thread pools inside each call, so one
thread issuing the calls keeps the CPUs busy; it also means the store is never
used from two threads (``Store`` handles are not documented as thread-safe).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .engine import Engine
from .errors import ServerStoppingError
from .metrics import Metrics

__all__ = ["Batcher", "Job"]

log = logging.getLogger("retrostore.serve")


@dataclass
class Job:
    """One request's work. ``kind``: "search" and "neighbors" batch with their kind;
    "call" runs ``payload(engine)`` alone. ``done(result, exc, version)`` is called
    once, from the batcher thread."""

    kind: str
    payload: Any
    n: int
    done: Callable[[Any, BaseException | None, int], None]
    queued_at: float = field(default_factory=time.monotonic)
    parts: list | None = None  # its slices when too large for one batch ([] when not; see Batcher._parts)


class Batcher:
    """The thread that owns the :class:`Engine` and answers :class:`Job` batches."""

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        s = engine.settings
        self.window_s = s.batch_window_ms / 1000.0
        self.max_batch = s.max_batch
        self.tick_s = s.refresh_interval_s if s.follow else 1.0
        #: Requests a handler is reading or checking, not yet queued (updated on the event loop).
        self.arriving = 0
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="retrostore-batcher", daemon=True)

    # -- control (any thread) ------------------------------------------------------
    def start(self) -> None:
        """Start the thread; it opens the store. Raises what opening raised."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the batch in progress, refuse what is queued, close the store."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stop:
                stopping = True
            else:
                stopping = False
                self._queue.append(job)
                self._cond.notify()
        if stopping:
            job.done(None, ServerStoppingError("the server is shutting down; retry"), self.engine.version)

    # -- the thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine.open()
            self.metrics.set_store(self.engine.version, self.engine.len)
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        last_requests = 1
        try:
            while True:
                batch = self._take(last_requests)
                if batch is None:
                    break
                self._refresh()
                if batch:
                    self._execute(batch)
                last_requests = max(1, len(batch))
        finally:
            with self._cond:
                left = list(self._queue)
                self._queue.clear()
            for job in left:
                job.done(None, ServerStoppingError("the server is shutting down; retry"), self.engine.version)
            self.engine.close()

    def _take(self, last_requests: int) -> list[Job] | None:
        """The next batch; [] after an idle tick (time to look for a new version); None to stop."""
        with self._cond:
            if not self._queue and not self._stop:
                self._cond.wait(self.tick_s)
            if self._stop:
                return None
            if not self._queue:
                return []
            batch = [self._queue.popleft()]
            if self._parts(batch[0]):
                return batch  # answered alone, a slice at a time
            n = batch[0].n
            n = self._drain(batch, n)
            if self.window_s > 0 and n < self.max_batch and (self.arriving > 0 or last_requests > 1):
                deadline = time.monotonic() + self.window_s
                while n < self.max_batch and not self._stop:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    if not self._queue:
                        self._cond.wait(remaining)
                    n = self._drain(batch, n)
            return batch

    def _parts(self, job: Job) -> list | None:
        """The slices of a request too large for one batch (None for the others), worked out once."""
        if job.parts is None:
            sliceable = job.kind in ("search", "neighbors") and hasattr(type(job.payload), "merge")
            job.parts = job.payload.split(self.max_batch) if sliceable else []
            if len(job.parts) == 1:
                job.parts = []
        return job.parts or None

    def _drain(self, batch: list[Job], n: int) -> int:
        """Move the queued requests that fit into ``batch``, in order, passing over those that need
        slicing (they run alone, next); the caller holds the lock. Returns the batch's queries."""
        left: deque[Job] = deque()
        while self._queue:
            job = self._queue.popleft()
            if not self._parts(job) and n + job.n <= self.max_batch:
                batch.append(job)
                n += job.n
            else:
                left.append(job)
        self._queue = left
        return n

    def _refresh(self) -> None:
        try:
            if self.engine.maybe_refresh():
                self.metrics.set_store(self.engine.version, self.engine.len)
                self.metrics.refreshed()
        except Exception:  # logged by the engine; the current version keeps serving
            self.metrics.refresh_failed()

    @staticmethod
    def _run_isolated(run: Callable[[list], list], jobs: list[Job]) -> list:
        """``run`` over the jobs' payloads together; when that call fails unexpectedly (not a refusal
        the engine returns per request), each job is run alone, so one bad request gets the error and
        never fails the others batched with it."""
        try:
            return run([j.payload for j in jobs])
        except Exception as exc:
            if len(jobs) == 1:
                return [exc]  # the app logs it with its traceback and answers 500
            log.warning("a batch of %d %s requests failed (%s: %s); answering each alone", len(jobs),
                        jobs[0].kind, type(exc).__name__, exc)
        results = []
        for job in jobs:
            try:
                results.append(run([job.payload])[0])
            except Exception as exc:
                results.append(exc)
        return results

    def _take_waiting(self) -> list[Job]:
        """The requests waiting now that fit one batch, in order, passing over those that need slicing
        (helper-30: stopping at a second large request kept every small one behind it waiting for
        the whole first), without waiting."""
        batch: list[Job] = []
        with self._cond:
            if not self._stop:
                self._drain(batch, 0)
        return batch

    def _execute_sliced(self, job: Job, parts: list) -> None:
        """A request of more than ``max_batch`` queries, answered ``max_batch`` at a time; between
        slices the requests that came meanwhile are answered too, from the same version (no refresh
        until the request is done), so one large request never holds every other client for its whole
        run (helper-27: 128 long queries held a one-query search for 20 s)."""
        run = self.engine.search if job.kind == "search" else self.engine.neighbors
        version = self.engine.version
        answers = []
        for part in parts:
            result = self._run_isolated(run, [Job(job.kind, part, part.n, job.done)])[0]
            self.metrics.batch(job.kind, requests=1, queries=part.n)
            if isinstance(result, BaseException):
                job.done(None, result, version)
                return
            answers.append(result)
            others = self._take_waiting()
            if others:
                self._execute(others)
        job.done(job.payload.merge(answers), None, version)

    def _execute(self, batch: list[Job]) -> None:
        engine = self.engine
        version = engine.version
        if len(batch) == 1 and (parts := self._parts(batch[0])):
            try:
                self._execute_sliced(batch[0], parts)
            except Exception as exc:  # a bug or an unexpected library failure: answer 500, keep serving
                log.exception("sliced request failed")
                batch[0].done(None, exc, version)
            return
        pending = list(batch)
        try:
            for job in [j for j in batch if j.kind == "call"]:
                pending.remove(job)
                try:
                    result = job.payload(engine)
                except Exception as exc:
                    job.done(None, exc, version)
                else:
                    job.done(result, None, version)
            for kind, run in (("search", engine.search), ("neighbors", engine.neighbors)):
                jobs = [j for j in batch if j.kind == kind]
                if not jobs:
                    continue
                results = self._run_isolated(run, jobs)
                self.metrics.batch(kind, requests=len(jobs), queries=sum(j.n for j in jobs))
                for job, result in zip(jobs, results):
                    pending.remove(job)
                    if isinstance(result, BaseException):
                        job.done(None, result, version)
                    else:
                        job.done(result, None, version)
        except Exception as exc:  # a bug or an unexpected library failure: answer 500, keep serving
            log.exception("batch failed")
            for job in pending:
                job.done(None, exc, version)
