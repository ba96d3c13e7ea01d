"""Prometheus metrics of a server (``GET /metrics``), with prometheus_client.

With several uvicorn workers, ``retrostore serve`` sets
``PROMETHEUS_MULTIPROC_DIR`` before the workers start, and every worker's
counts are summed in each scrape (prometheus_client's multiprocess mode);
the store version and chunk gauges then carry a ``pid`` label per worker.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    """The server's metrics, in a registry of its own (or the multiprocess files)."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # In multiprocess mode values live in per-process files and a scrape collects them;
        # otherwise each app has its own registry (two apps in one process never collide).
        reg = None if self.multiprocess else CollectorRegistry()
        self.registry = reg
        self.requests = Counter("retrostore_requests_total", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=reg)
        self.latency = Histogram("retrostore_request_seconds", "Time from a request's arrival to its answer "
                                 "(seconds), by endpoint.", ["endpoint"], buckets=_LATENCY_BUCKETS_S, registry=reg)
        self.batch_queries = Histogram("retrostore_batch_queries", "Queries (texts, token rows, vectors, neighbour "
                                       "query chunks' rows) answered by one batch, by kind.", ["kind"],
                                       buckets=_BATCH_BUCKETS, registry=reg)
        self.batch_requests = Histogram("retrostore_batch_requests", "Requests answered together by one batch, by "
                                        "kind.", ["kind"], buckets=_BATCH_BUCKETS, registry=reg)
        self.version = Gauge("retrostore_store_version", "Committed store version being served.",
                             multiprocess_mode="liveall", registry=reg)
        self.chunks = Gauge("retrostore_store_chunks", "Committed chunks (len(store)) of the version served.",
                            multiprocess_mode="liveall", registry=reg)
        self.refreshes = Counter("retrostore_store_refreshes_total", "Moves to a newly committed version.",
                                 registry=reg)
        self.refresh_errors = Counter("retrostore_store_refresh_errors_total", "Failed moves to a newer version "
                                      "(the current one kept serving).", registry=reg)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def batch(self, kind: str, *, requests: int, queries: int) -> None:
        self.batch_requests.labels(kind).observe(requests)
        self.batch_queries.labels(kind).observe(queries)

    def set_store(self, version: int, chunks: int) -> None:
        self.version.set(version)
        self.chunks.set(chunks)

    def refreshed(self) -> None:
        self.refreshes.inc()

    def refresh_failed(self) -> None:
        self.refresh_errors.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (all workers' in multiprocess mode)."""
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def close(self) -> None:
        """Drop this process's live gauges from the multiprocess files (a worker exiting)."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())
