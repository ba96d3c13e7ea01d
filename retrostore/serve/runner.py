"""Running the app: check the store once, then uvicorn with N worker processes.

Each uvicorn worker is a fresh process (spawned, not forked: ``Store``
handles are not fork-safe) that builds the app from the settings in
``RETROSTORE_SERVE_SETTINGS`` and opens the store read-only itself. With
several workers, memory mapping lets them share the index pages (see
:class:`ServeSettings`), and ``PROMETHEUS_MULTIPROC_DIR`` makes ``/metrics``
count every worker's requests.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import logging
import os
import signal
import socket
import tempfile

import faiss

import retrostore
from retrostore.errors import CorruptStoreError, FormatVersionError, InvalidInputError

from .errors import MissingDependencyError
from .settings import SETTINGS_ENV, ServeSettings

__all__ = ["run", "check_store"]

log = logging.getLogger("retrostore.serve")


def check_store(settings: ServeSettings) -> dict:
    """Open the store read-only (and verify it unless ``settings.verify`` is False); return its info.

    Raises
    ------
    NotAStoreError, FormatVersionError, CorruptStoreError
        The store cannot be served; for a failed verification the message
        lists the problems ``retrostore verify`` reports.
    """
    try:
        store = retrostore.open(settings.store)
    except (CorruptStoreError, FormatVersionError) as exc:
        raise type(exc)(f"{settings.store} cannot be served: {exc}") from None
    with store:
        if settings.verify:
            problems = store.verify()
            if problems:
                shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
                raise CorruptStoreError(
                    f"{settings.store} failed verification, so it is not served: {shown}. Run `retrostore verify "
                    f"{settings.store}` for every problem; restore the store from a good copy (or start with "
                    "--no-verify to serve it anyway)")
        return store.info()


def check_port(host: str, port: int) -> None:
    """Refuse a port another process listens on, before the store is opened and anything is logged.

    Raises
    ------
    InvalidInputError
        ``host:port`` cannot be bound (in use, or not an address of this machine).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InvalidInputError(f"--host {host!r} is not an address of this machine ({exc}); use 127.0.0.1 "
                                "(the default) or 0.0.0.0 for every address") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(addr)
        except OSError as exc:
            what = "is in use (another server?)" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc})"
            raise InvalidInputError(f"port {port} on {host} {what}: pass --port with a free port, or stop the "
                                    "process that holds it") from None


def run(settings: ServeSettings, *, log_level: str = "info") -> None:
    """Check the store, then serve it on ``settings.host:settings.port`` until SIGINT/SIGTERM.

    Raises
    ------
    MissingDependencyError
        uvicorn or starlette is not installed.
    InvalidInputError
        The port is in use (:func:`check_port`).
    NotAStoreError, FormatVersionError, CorruptStoreError
        The store cannot be opened, or fails verification.
    """
    missing = [name for name in ("starlette", "uvicorn", "prometheus_client") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(f"retrostore serve needs the serve extra ({', '.join(missing)} missing): "
                                     "pip install '.[serve]' in the retrostore checkout")
    import uvicorn
    # Our h11 protocol with a deadline on headers; its module imports uvicorn (optional), so it is
    # loaded here, with uvicorn, and not at import (retrostore.serve.protocol).
    protocol = importlib.import_module("retrostore.serve.protocol").HeaderDeadlineH11
    check_port(settings.host, settings.port)
    info = check_store(settings)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    log.info("serving %s: version %d, %d documents, %d chunks, index %s, on http://%s:%d with %d worker(s)",
             settings.store, info["version"], info["documents"], info["chunks"], info["index"]["factory"],
             settings.host, settings.port, settings.workers)
    os.environ[SETTINGS_ENV] = settings.to_json()
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again with the handler
    # found before it started: this one, so that the process exits normally and cleans up after itself.
    previous = signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        with contextlib.ExitStack() as stack:
            if settings.workers > 1:  # every worker writes its metrics here; a scrape sums them
                metrics_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="retrostore-metrics-"))
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
                stack.callback(os.environ.pop, "PROMETHEUS_MULTIPROC_DIR", None)
            uvicorn.run("retrostore.serve.app:app_from_environ", factory=True, host=settings.host,
                        port=settings.port, workers=settings.workers, log_level=log_level, access_log=False,
                        timeout_graceful_shutdown=10, http=protocol)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if settings.workers == 1:  # the app ran here: FAISS's Ctrl-C check back (app_from_environ)
            faiss.PythonInterruptCallback.reset()


def _exit_quietly(signum, frame) -> None:
    raise SystemExit(0)
