"""The HTTP app of ``retrostore serve``: Starlette routes over one batching engine.

``create_app(settings)`` returns an ASGI app (run it with uvicorn, or as a Ray
Serve ingress); its lifespan opens the store read-only in the batcher thread
and closes it at shutdown. Endpoints (docs/serving.md has the full reference):

====================  =======================================================
``POST /v1/search``   ``query`` / ``token_ids`` / ``vectors``; ``k``, ``params``
                      (``nprobe``...), ``exclude_doc_ids``: hits with text,
                      continuation, document id and metadata
``POST /v1/neighbors`` RETRO arrays of ``Store.neighbors`` (JSON, or ``.npy``
                      with ``Accept: application/x-npy``)
``POST /v1/chunks``   chunks by id; ``POST /v1/documents``: documents by id
``GET /v1/info``      ``Store.info()`` of the version served, and the settings
``GET /healthz``      liveness and the version served
``GET /metrics``      Prometheus text
``POST /search``      massive-serve's request and answer shape
``GET /``             a page to try the store in a browser
====================  =======================================================

No endpoint writes. Every answer names the committed version that answered
(``version`` in JSON, and the ``X-Retrostore-Version`` header).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import Any, Awaitable, Callable

import anyio
import faiss
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from retrostore.errors import EmbedderMismatchError, InvalidInputError, RetrostoreError

from .batching import Batcher, Job
from .engine import Engine
from .errors import ServerStoppingError
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .schema import (RequestError, jsonable, parse_compat_search, parse_ids, parse_json, parse_neighbors,
                     parse_search)
from .settings import SETTINGS_ENV, ServeSettings
from .wire import NEIGHBOR_FIELDS, NPY_MEDIA, VERSION_HEADER, pack_arrays, scores_to_json, wants_npy

__all__ = ["create_app", "app_from_environ"]

log = logging.getLogger("retrostore.serve")

#: Answers at least this large are JSON-encoded on a worker thread, not on the event loop.
_BIG_ANSWER_VALUES = 50_000

#: The status counted for a request whose client went away before its body arrived (nginx's "client
#: closed request"): not the server's failure, so not a 5xx that alerting on errors would page for.
CLIENT_CLOSED = 499


def _error_body(exc: BaseException) -> tuple[int, dict]:
    if isinstance(exc, RequestError):
        status, kind = exc.status, exc.kind
        detail = {"field": exc.field, "value": exc.value, "limit": exc.limit}
    else:
        detail = {"field": None, "value": None, "limit": None}
        if isinstance(exc, ServerStoppingError):
            status = 503
        elif isinstance(exc, InvalidInputError):
            status = 400
        elif isinstance(exc, EmbedderMismatchError):
            status = 409
        else:
            status = 500
        kind = type(exc).__name__ if isinstance(exc, RetrostoreError) else "InternalError"
    message = str(exc) if isinstance(exc, RetrostoreError) else f"{type(exc).__name__}: {exc}"
    return status, {"error": {"type": kind, "message": message, **detail}, "status": status}


def error_response(exc: BaseException) -> JSONResponse:
    status, body = _error_body(exc)
    try:
        return JSONResponse(body, status_code=status)
    except (TypeError, ValueError):  # a value strict JSON cannot carry (NaN, a lone surrogate): render it safely
        return JSONResponse(jsonable(body), status_code=status)


class _Server:
    """State of one app: settings, metrics, the engine and its batcher thread."""

    def __init__(self, settings: ServeSettings, embedder: Any = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.engine = Engine(settings, embedder)
        self.batcher = Batcher(self.engine, self.metrics)
        self.page = importlib.resources.files("retrostore.serve").joinpath("page.html").read_text("utf-8")

    @asynccontextmanager
    async def lifespan(self, app: Starlette):
        await anyio.to_thread.run_sync(self.batcher.start)
        e = self.engine
        log.info("retrostore serve: %s version %d (%d chunks), pid %d, %d threads, mmap %s", self.settings.store,
                 e.version, e.len, os.getpid(), self.settings.worker_threads(), e.mmap)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(self.batcher.stop)
            self.metrics.close()

    async def submit(self, kind: str, payload: Any, n: int = 1) -> tuple[Any, int]:
        """Queue work for the batcher and wait for (result, version)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def settle(result: Any, exc: BaseException | None, version: int) -> None:
            if future.done():  # the client went away
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result((result, version))

        def done(result: Any, exc: BaseException | None, version: int) -> None:
            loop.call_soon_threadsafe(settle, result, exc, version)

        self.batcher.submit(Job(kind, payload, n, done))
        return await future

    async def read_json(self, request: Request) -> Any:
        """The body as JSON, refused past ``max_body_bytes`` (413) or when malformed (400)."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise RequestError(f"Content-Length {declared!r} is not a number", field="body",
                                   value=declared) from None
            if size > limit:
                raise RequestError(f"the request body is {size} bytes; the server's limit is {limit} bytes "
                                   "(max_body_bytes): send fewer queries per request", field="body", value=size,
                                   limit=limit, status=413)
        parts = []
        size = 0
        timeout = self.settings.body_timeout_s
        stream = request.stream().__aiter__()
        while True:
            try:  # an idle limit, per part: a large body that keeps arriving is never cut off (helper-18)
                with anyio.fail_after(timeout):
                    chunk = await stream.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise RequestError(f"the request body stalled: nothing arrived for {timeout:g} s (body_timeout_s) "
                                   f"after {size} bytes; send the whole body without pausing", field="body",
                                   value=size, limit=timeout, status=408) from None
            size += len(chunk)
            if size > limit:
                raise RequestError(f"the request body exceeds the server's limit of {limit} bytes (max_body_bytes): "
                                   "send fewer queries per request", field="body", value=size, limit=limit,
                                   status=413)
            parts.append(chunk)
        return parse_json(b"".join(parts))

    async def parsed(self, request: Request, parse: Callable[[Any], Any]) -> Any:
        """Read and check a body, counting the request as on its way to the batcher meanwhile."""
        self.batcher.arriving += 1
        try:
            return parse(await self.read_json(request))
        finally:
            self.batcher.arriving -= 1


def _json(body: dict, version: int, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={VERSION_HEADER: str(version)})


async def _json_big(body: dict, headers: dict) -> Response:
    text = await anyio.to_thread.run_sync(functools.partial(
        json.dumps, body, ensure_ascii=False, allow_nan=False, separators=(",", ":")))
    return Response(text.encode("utf-8"), media_type="application/json", headers=headers)


def create_app(settings: ServeSettings, *, embedder: Any = None) -> Starlette:
    """The ASGI app serving one store (what ``retrostore serve`` runs in each worker).

    Parameters
    ----------
    settings : ServeSettings
        The store, batching and request limits (``host``, ``port`` and
        ``workers`` are for the runner, not the app).
    embedder : Embedder, optional
        For a store built with a model other than the default one: the same
        embedder, so that text and token-id queries can be embedded.

    Returns
    -------
    starlette.applications.Starlette
        Opens the store when its lifespan starts (in the batcher thread) and
        closes it when it ends.

    Raises
    ------
    NotAStoreError, CorruptStoreError, EmbedderMismatchError
        At lifespan start, when the store cannot be opened.
    """
    server = _Server(settings, embedder)
    s = settings

    def endpoint(name: str) -> Callable[[Callable[[Request], Awaitable[Response]]], Callable]:
        def wrap(handler: Callable[[Request], Awaitable[Response]]) -> Callable:
            @functools.wraps(handler)
            async def run(request: Request) -> Response:
                start = time.perf_counter()
                try:
                    response = await handler(request)
                except ClientDisconnect:  # nobody to answer (helper-16: was logged and counted as a 500)
                    log.debug("%s: the client disconnected before its request body arrived", name)
                    response = Response(status_code=CLIENT_CLOSED)
                except Exception as exc:  # every failure is a JSON answer; the server keeps serving
                    if not isinstance(exc, RetrostoreError):
                        log.exception("%s failed", name)
                    response = error_response(exc)
                server.metrics.observe(name, response.status_code, time.perf_counter() - start)
                return response
            return run
        return wrap

    def facts():
        return server.engine.facts

    @endpoint("search")
    async def search(request: Request) -> Response:
        req = await server.parsed(request, lambda body: parse_search(
            body, facts(), max_queries=s.max_queries, max_k=s.max_k, max_ids=s.max_ids,
            max_neighbors=s.max_neighbors))
        result, version = await server.submit("search", req, req.n)
        return _json({"version": version, "k": req.k, **result}, version)

    @endpoint("compat_search")
    async def compat_search(request: Request) -> Response:
        req = await server.parsed(request, lambda body: parse_compat_search(
            body, facts(), max_queries=s.max_queries, max_k=s.max_k, max_neighbors=s.max_neighbors))
        result, version = await server.submit("search", req, req.n)
        query = req.texts[0] if req.single else req.texts
        rows = result["results"]
        inner = {"IDs": [[[h["doc_id"], h["chunk_id"]] for h in row] for row in rows],
                 "passages": [[h["text"] for h in row] for row in rows],
                 "scores": [[h["score"] for h in row] for row in rows]}
        return _json({"message": f"Search completed for {query!r} from {os.path.basename(s.store.rstrip('/'))}",
                      "n_docs": req.k, "query": query, "version": version,
                      "results": {"n_docs": req.k, "query": query, "results": inner}}, version)

    @endpoint("neighbors")
    async def neighbors(request: Request) -> Response:
        req = await server.parsed(request, lambda body: parse_neighbors(
            body, facts(), max_queries=s.max_queries, max_k=s.max_k, max_ids=s.max_ids,
            max_neighbors=s.max_neighbors))
        nb, version = await server.submit("neighbors", req, req.n)
        headers = {VERSION_HEADER: str(version), "X-Retrostore-Shape": ",".join(map(str, nb.tokens.shape))}
        if wants_npy(request.headers.get("accept")):
            body = await anyio.to_thread.run_sync(pack_arrays, [getattr(nb, f) for f in NEIGHBOR_FIELDS])
            return Response(body, media_type=NPY_MEDIA, headers=headers)
        answer = {"version": version, "metric": facts().metric, "shape": list(nb.tokens.shape),
                  "tokens": nb.tokens.tolist(), "mask": nb.mask.tolist(), "chunk_ids": nb.chunk_ids.tolist(),
                  "doc_ids": nb.doc_ids.tolist(), "scores": scores_to_json(nb.scores)}
        if nb.tokens.size >= _BIG_ANSWER_VALUES:
            return await _json_big(answer, headers)
        return JSONResponse(answer, headers=headers)

    @endpoint("chunks")
    async def chunks(request: Request) -> Response:
        req = await server.parsed(request, lambda body: parse_ids(body, max_ids=s.max_ids, documents=False))
        result, version = await server.submit("call", lambda engine: engine.chunks(req))
        return _json({"version": version, **result}, version)

    @endpoint("documents")
    async def documents(request: Request) -> Response:
        req = await server.parsed(request, lambda body: parse_ids(body, max_ids=s.max_ids, documents=True))
        result, version = await server.submit("call", lambda engine: engine.documents(req))
        return _json({"version": version, **result}, version)

    @endpoint("info")
    async def info(request: Request) -> Response:
        result, version = await server.submit("call", lambda engine: engine.info())
        return _json(result, version)

    @endpoint("healthz")
    async def healthz(request: Request) -> Response:
        e = server.engine
        if not server.batcher.alive():
            return JSONResponse({"status": "down", "version": e.version}, status_code=503)
        return _json({"status": "ok", "version": e.version, "len": e.len}, e.version)

    @endpoint("metrics")
    async def metrics(request: Request) -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @endpoint("page")
    async def page(request: Request) -> Response:
        return HTMLResponse(server.page)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        known = "GET /, /healthz, /metrics, /v1/info; POST /v1/search, /v1/neighbors, /v1/chunks, /v1/documents, /search"
        what = "no such endpoint" if exc.status_code == 404 else f"{request.method} is not allowed here"
        err = RequestError(f"{what}: {request.method} {request.url.path}; the server answers {known}", field="path",
                           value=request.url.path, status=exc.status_code)
        response = error_response(err)
        server.metrics.observe("unrouted", response.status_code, 0.0)
        return response

    async def internal_error(request: Request, exc: Exception) -> Response:
        """Last resort for a failure outside the endpoints' own handling: still a JSON 500, counted."""
        response = error_response(exc)
        server.metrics.observe("unhandled", response.status_code, 0.0)
        return response

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/info", info, methods=["GET"]),
        Route("/v1/search", search, methods=["POST"]),
        Route("/v1/neighbors", neighbors, methods=["POST"]),
        Route("/v1/chunks", chunks, methods=["POST"]),
        Route("/v1/documents", documents, methods=["POST"]),
        Route("/search", compat_search, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=server.lifespan,
                    exception_handlers={HTTPException: not_found, Exception: internal_error})
    # A trailing slash is an unknown path (JSON 404, counted), not Starlette's 307 to a URL built from the
    # client's Host header (helper-27).
    app.router.redirect_slashes = False
    app.state.server = server
    return app


def app_from_environ() -> Starlette:
    """The app of one uvicorn worker, from the settings ``retrostore serve`` put in the environment."""
    text = os.environ.get(SETTINGS_ENV)
    if not text:
        raise InvalidInputError(f"{SETTINGS_ENV} is not set; start the server with `retrostore serve STORE`")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    # FAISS's Python build takes the GIL every few thousand rows of a search to check for Ctrl-C
    # (PythonInterruptCallback); the batcher's searches then wait for the event loop's Python work
    # to let go of it, up to sys.getswitchinterval() (5 ms) each time. uvicorn handles this process's
    # signals while it serves and a search lasts milliseconds: no callback until the server stops
    # (retrostore.serve.runner.run puts it back when uvicorn ran in the caller's process). Paired quick
    # runs of benchmarks/serve.py (2026-12-07, 7,050 chunks): 32 clients 410-420 answers/s against
    # 378-398, server CPU per answer 3.67-3.74 ms against 3.91-4.10.
    faiss.InterruptCallback.clear_instance()
    return create_app(ServeSettings.from_json(text))
