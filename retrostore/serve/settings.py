"""Settings of a retrostore server: one dataclass, checked once, passed to each worker as JSON."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from retrostore.errors import InvalidInputError, check_int
from retrostore.threads import check_threads, cpu_count

__all__ = ["ServeSettings", "SETTINGS_ENV"]

#: Environment variable through which ``retrostore serve`` hands its settings to
#: uvicorn's worker processes (each builds its app from them).
SETTINGS_ENV = "RETROSTORE_SERVE_SETTINGS"


@dataclass(frozen=True)
class ServeSettings:
    """How a server opens its store, batches requests and bounds what a request may ask.

    Attributes
    ----------
    store : str
        The store directory; opened read-only by every worker.
    host : str, default "127.0.0.1"
        Address to bind. Only loopback unless told otherwise.
    port : int, default 8808
    workers : int, default 1
        Worker processes (uvicorn's); each opens the store and runs its own batcher.
    threads : int, optional
        FAISS and onnxruntime threads per worker; default: the CPUs this process
        may use divided by ``workers`` (at least 1).
    mmap : bool, optional
        Serve search from memory-mapped index files, so workers share the index
        pages. Default: on when ``workers > 1`` (falling back to reading the index
        when its factory cannot be mapped), else the store's own setting.
    follow : bool, default True
        Move to each newly committed version between batches: a follower thread
        opens it and runs its first search (a streamed store's in-memory merge) off
        the batcher thread, which then swaps handles (:mod:`retrostore.serve.follow`).
    refresh_interval_s : float, default 0.05
        How often the follower looks at ``manifest.json`` for a new commit (seconds).
    batch_window_ms : float, default 2.0
        How long a batch waits for more requests once one arrived, and only while
        other requests are known to be on their way (milliseconds; 0 = never wait).
    max_batch : int, default 64
        Most queries (texts, token rows, vectors, or neighbour query chunks) one
        batch gathers from several requests; one larger request runs alone.
    max_body_bytes : int, default 8 MiB
        Largest request body accepted (HTTP 413 beyond it).
    body_timeout_s : float, default 30
        Longest pause in a request's body, from its headers on (seconds; HTTP
        408 beyond it): a client that declares a body and stops sending it does
        not hold its connection and its place among the requests a batch waits
        for; a large body that keeps arriving is never cut off.
    max_queries : int, default 1024
        Most queries in one search request, and most query chunks (B x C) in one
        neighbours request.
    max_k : int, default 1000
        Largest ``k`` (``n_docs``) a request may ask for.
    max_ids : int, default 10000
        Most ids in one chunks/documents request, and most excluded doc ids.
    max_neighbors : int, default 16384
        Most neighbours one ``/v1/neighbors`` answer may hold: B rows x C chunks
        x k; and most hits one search answer may hold: queries x k
        (``/v1/search``, ``/search``). ``max_queries`` and ``max_k`` alone would allow a small request to
        ask for a gigabyte-sized answer; the default bounds the tokens array at
        16 MiB for 64-token chunks (each neighbour is 2 x chunk_tokens int64),
        and allows ``max_queries`` chunks at k = 16.
    verify : bool, default True
        Verify the store (``Store.verify``) before serving it; refuse it with the
        problems when it fails.
    spin : bool, default False
        The default embedder's idle onnxruntime threads spin between the model's
        operations (``OnnxEmbedder(spin=True)``, onnxruntime's own default) rather
        than sleep. It helps a server that sits idle between single queries (each
        operation otherwise wakes the sleeping threads): one client's p50 was 1.22x
        the in-process floor with it and 1.42x without (benchmarks/serve.py, quick
        runs of 2026-12-06), at the price of a core kept busy up to ~50 ms after
        every answer and of throughput at 32 clients (1.99x against 2.31x the Flask
        baseline's); on a machine shared with CPU-bound work it is slower
        (docs/serving.md, "Performance"; docs/benchmarks.md, "embed-spin").
    """

    store: str
    host: str = "127.0.0.1"
    port: int = 8808
    workers: int = 1
    threads: int | None = None
    mmap: bool | None = None
    follow: bool = True
    refresh_interval_s: float = 0.05
    batch_window_ms: float = 2.0
    max_batch: int = 64
    max_body_bytes: int = 8 << 20
    body_timeout_s: float = 30.0
    max_queries: int = 1024
    max_k: int = 1000
    max_ids: int = 10_000
    max_neighbors: int = 16_384
    verify: bool = True
    spin: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", os.fspath(self.store))
        ints = {"port": (0, 65535), "workers": (1, 256), "max_batch": (1, 1 << 20), "max_body_bytes": (1, 1 << 40),
                "max_queries": (1, 1 << 24), "max_k": (1, 100_000), "max_ids": (1, 1 << 24),
                "max_neighbors": (1, 1 << 30)}
        for name, (low, high) in ints.items():
            object.__setattr__(self, name, check_int(name, getattr(self, name), low, high))
        for name in ("follow", "verify", "spin"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name}={getattr(self, name)!r} must be a bool")
        check_threads(self.threads)
        for name in ("refresh_interval_s", "batch_window_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 60_000:
                raise InvalidInputError(f"{name}={value!r} must be a number in [0, 60000]")
        value = self.body_timeout_s
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
            raise InvalidInputError(f"body_timeout_s={value!r} must be a number of seconds in (0, 3600]")

    def worker_threads(self) -> int:
        """FAISS/onnxruntime threads for one worker (``threads``, else CPUs / workers)."""
        if self.threads:
            return self.threads
        return max(1, cpu_count() // self.workers)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeSettings":
        data: dict[str, Any] = json.loads(text)
        return cls(**data)
