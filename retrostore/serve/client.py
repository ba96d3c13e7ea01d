"""The client of a retrostore server: ``retrostore.connect(url)``.

A :class:`RemoteStore` answers ``search``, ``search_vectors``, ``neighbors``,
``get_chunks``, ``get_document``, ``get_metadata`` and ``info`` with the same
signatures and return types as :class:`retrostore.Store`, so inference code
moves between an embedded store and a served one by changing the line that
opens it. It needs urllib3 and numpy (imported when a client is made); no
store, FAISS or model is loaded on the client side.

The transport is urllib3 (a thread-safe pool of keep-alive connections): on
loopback a request costs 0.45 ms of client time with it against 0.72 ms with
httpx, which this client used before (docs/benchmarks.md, "serve"); at one
client that difference is a twentieth of a query answered in 6 ms. Its
connections write a request's headers and body in one ``send``
(:func:`_one_write_pools`).
"""

from __future__ import annotations

import ipaddress
import json
import functools
import os
import threading
import time
from typing import Any, Iterable, Sequence

import numpy as np

import retrostore.errors as _errors
from retrostore import Chunk, Document, Hit, Neighbors
from retrostore.errors import InvalidInputError, RetrostoreError, is_int, shown
from retrostore.store.reading import check_queries as _check_queries
from retrostore.store.reading import query_vectors as _query_vectors
from retrostore.store.retrieval import check_label_tail as _check_label_tail
from retrostore.store.retrieval import exclusion_sets as _exclusion_sets

from . import errors as _serve_errors
from .errors import MissingDependencyError, ServerError, ServerUnavailableError
from .wire import NEIGHBOR_FIELDS, NPY_MEDIA, VERSION_HEADER, scores_from_json, unpack_arrays

__all__ = ["connect", "RemoteStore", "ServerError", "ServerUnavailableError"]


#: The largest answer body the client reads (bytes, 256 MiB): the server's own answers are bounded far
#: below (at most 1,024 queries or rows a request); a larger one is not a retrostore server's.
MAX_ANSWER_BYTES = 1 << 28


#: Largest request body (bytes) sent in one ``send`` with its headers (:func:`_one_write_pools`); larger
#: ones are sent as urllib3 sends them (a copy of the body would cost more than a second write saves).
ONE_WRITE_MAX = 1 << 20


@functools.cache
def _one_write_pools(urllib3: Any) -> dict:
    """urllib3 pool classes (by scheme) whose connections send a request's headers and its body of
    at most :data:`ONE_WRITE_MAX` bytes in one ``send``, as the standard library's ``http.client``
    does; urllib3 2 writes them in two. The server then reads the request whole from one segment
    instead of parsing the headers, returning to its event loop and waiting for the body: a text
    search answered 0.5 ms sooner at one client in a paired run on loopback (6.0 against 6.5 ms p50,
    2 cores, 7,050-chunk store; vector searches 0.05 ms, within the noise)."""

    class OneWrite:
        _hold, _held = False, None

        def request(self, method, url, body=None, headers=None, **kwargs):
            self._held = None
            self._hold = isinstance(body, bytes) and 0 < len(body) <= ONE_WRITE_MAX
            try:
                super().request(method, url, body=body, headers=headers, **kwargs)
            finally:
                self._hold = False
            held, self._held = self._held, None
            if held is not None:  # no body write followed the headers (not urllib3 2's way): send them now
                super().send(held)

        def send(self, data):
            if self._hold:
                if self._held is None:  # the header block (http.client's endheaders): held for the body
                    self._held = bytes(data)
                    return
                data, self._held, self._hold = self._held + data, None, False
            super().send(data)

    conn = urllib3.connection
    return {"http": type("HTTPConnectionPool", (urllib3.HTTPConnectionPool,),
                         {"ConnectionCls": type("HTTPConnection", (OneWrite, conn.HTTPConnection), {})}),
            "https": type("HTTPSConnectionPool", (urllib3.HTTPSConnectionPool,),
                          {"ConnectionCls": type("HTTPSConnection", (OneWrite, conn.HTTPSConnection), {})})}


def _error_from(status: int, payload: Any, where: str = "the server") -> RetrostoreError:
    """The RetrostoreError subclass a server's JSON error names (4xx), with its details attached;
    a server-side failure (5xx) names ``where`` (the method and URL) too."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        cls = InvalidInputError if 400 <= status < 500 else ServerError
        exc = cls(f"{where} answered HTTP {status}: {str(payload)[:300]}")
    else:
        name = str(err.get("type"))
        cls = getattr(_errors, name, None) or getattr(_serve_errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, RetrostoreError)):
            cls = InvalidInputError if 400 <= status < 500 else ServerError
        elif status >= 500 and issubclass(cls, InvalidInputError):
            cls = ServerError
        message = str(err.get("message") or f"HTTP {status}")
        exc = cls(f"{where} answered HTTP {status}: {message}" if status >= 500 else message)
        exc.field, exc.value, exc.limit = err.get("field"), err.get("value"), err.get("limit")
    exc.status = status
    return exc


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays as JSON (``json.dumps``' ``default``): what ``Store`` accepts, the client sends."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r:.60} is not JSON")


def _k_int(k: Any) -> int:
    """``k`` as an int for the request, refused here when ``Store`` would refuse its type (helper-16: the
    server takes a whole float such as 2.0 from any JSON client, so ``search(q, k=2.0)`` worked remotely
    and raised embedded); its range is the server's to check (its ``max_k``, named in the error)."""
    if not is_int(k):
        raise InvalidInputError(f"k={shown(k)} must be an int >= 1 (the number of neighbours to return)")
    return int(k)


def _check_k(k: Any) -> int:
    """``k`` as ``Store`` takes it, range included, for answers made here (no request sent)."""
    if _k_int(k) < 1:
        raise InvalidInputError(f"k={shown(k)} must be an int >= 1 (the number of neighbours to return)")
    return int(k)


def _int_list(ids: Any, what: str) -> list[int]:
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Iterable):
        raise InvalidInputError(f"{what} ids must be an iterable of int, not {type(ids).__name__}")
    if isinstance(ids, np.ndarray):
        ids = ids.ravel().tolist()
    out = []
    for i in ids:
        if not is_int(i):
            if isinstance(i, (float, np.floating)) and float(i).is_integer():
                i = int(i)
            else:
                raise InvalidInputError(f"{what} id {shown(i)} is not an integer")
        out.append(int(i))
    return out


def _reads_answer(method):
    """Turn a failure to read a server's answer (a malformed body from a proxy, another program or
    another version: KeyError, TypeError, ValueError...) into a :class:`ServerError` naming it (helper-27:
    raw TypeErrors). Failures before any answer came back are raised as they are."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._local.answered = None
        try:
            return method(self, *args, **kwargs)
        except RetrostoreError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError, EOFError) as exc:
            path = getattr(self._local, "answered", None)
            if path is None:
                raise
            raise ServerError(f"{self.url}{path} sent an answer this client cannot read ({type(exc).__name__}: "
                              f"{str(exc)[:120]}): is this a retrostore server (`retrostore serve STORE`) of the "
                              "same version as the client?") from None
    return wrapper


def _expect(ok: bool, what: str) -> None:
    """A server's answer is what the API says, or a TypeError that :func:`_reads_answer` turns into a
    ServerError (helper-40: ``Hit(chunk_id='a', score='x', text=5)`` came back without a word)."""
    if not ok:
        raise TypeError(what)


def _hit(d: dict) -> Hit:
    _expect(all(is_int(d[f]) for f in ("chunk_id", "doc_id", "position")) and isinstance(d["text"], str)
            and (d["score"] is None or (isinstance(d["score"], (int, float)) and not isinstance(d["score"], bool))),
            f"a hit of the wrong types: {str(d)[:80]}")
    return Hit(d["chunk_id"], d["doc_id"], d["position"], d["score"], d["text"],
               np.asarray(d.get("tokens", []), dtype=np.int64), d.get("continuation_text", ""),
               np.asarray(d.get("continuation_tokens", []), dtype=np.int64))


def _chunk(c: dict) -> Chunk:
    _expect(all(is_int(c[f]) for f in ("chunk_id", "doc_id", "position", "start")) and isinstance(c["text"], str),
            f"a chunk of the wrong types: {str(c)[:80]}")
    return Chunk(c["chunk_id"], c["doc_id"], c["position"], c["start"], c["text"],
                 np.asarray(c["tokens"], dtype=np.int64))


class RemoteStore:
    """A store served by ``retrostore serve``, used like :class:`retrostore.Store`.

    Make one with :func:`retrostore.connect`. Use as a context manager;
    ``close()`` is idempotent. Thread-safe (one urllib3 connection pool).

    Attributes
    ----------
    url : str
        The server's base URL.
    version : int
        The committed version that gave the latest answer (the server moves to
        each new commit by itself). One client shared by threads: the version of
        whichever answer arrived last, not necessarily the calling thread's
        (helper-52); a thread that must know which version answered it uses a
        client of its own.
    """

    def __init__(self, url: str, *, timeout_s: float = 60.0, headers: dict | None = None) -> None:
        try:
            import urllib3
        except ImportError as exc:  # pragma: no cover - urllib3 is in the serve extra
            raise MissingDependencyError(
                "retrostore.connect needs urllib3: pip install '.[serve]' in the retrostore checkout "
                "(or pip install urllib3)") from exc
        self._urllib3 = urllib3
        if not isinstance(url, str):
            raise InvalidInputError(f"url={url!r} must be a str such as 'http://127.0.0.1:8808'")
        self.url = url.rstrip("/")
        if not self.url.lower().startswith(("http://", "https://")):
            hint = (" (a store directory opens with retrostore.open)" if os.path.isdir(url) else "")
            raise InvalidInputError(f"url={url!r} is not an http:// or https:// URL; give the server's base URL, "
                                    f"e.g. 'http://{url if ':' in url and '/' not in url else '127.0.0.1:8808'}'"
                                    + hint)
        try:
            parsed = urllib3.util.parse_url(self.url)
            if not parsed.host:
                raise ValueError("no host")
            if parsed.port is not None and not 0 < parsed.port < 65536:
                raise ValueError(f"port {parsed.port}")
            if all(c.isdigit() or c == "." for c in parsed.host):  # dotted digits: an IPv4 address or nothing
                ipaddress.IPv4Address(parsed.host)
        except (urllib3.exceptions.LocationParseError, ValueError) as exc:
            raise InvalidInputError(f"cannot connect to {url!r}: it is not a valid URL ({exc}); give the server's "
                                    "base URL, e.g. 'http://127.0.0.1:8808'") from None
        if parsed.query is not None or parsed.fragment is not None:
            raise InvalidInputError(f"url={url!r} has a query or fragment (?..., #...); give the server's base URL, "
                                    "e.g. 'http://127.0.0.1:8808' (a path prefix such as http://host/retro is fine)")
        extra = _check_headers(headers)
        if parsed.auth:  # user:password@host: sent as HTTP basic auth, never shown in messages
            extra = {**urllib3.util.make_headers(basic_auth=parsed.auth), **extra}
            self.url = parsed._replace(auth=None).url.rstrip("/")
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or not 0 < timeout_s < 1e9):
            raise InvalidInputError(f"timeout_s={timeout_s!r} must be a positive number of seconds (below 1e9), "
                                    "or None to wait for ever")
        timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        self._timeout_s = timeout_s
        # No retries (as httpx, which this client used before): a request is sent once, its failure
        # is the caller's to retry; redirects are not followed (the API has none). A keep-alive
        # connection the server closed meanwhile is noticed before reuse and replaced.
        retries = False
        self._proxy = _proxy_for(parsed.scheme, parsed.host)
        # Up to 64 keep-alive connections (threads) per server; more are opened and closed as needed.
        common = dict(headers=extra, timeout=timeout, retries=retries, maxsize=64, block=False)
        if self._proxy:
            var, value = self._proxy
            try:
                self._client = urllib3.ProxyManager(value, **common)
            except (urllib3.exceptions.HTTPError, ValueError) as exc:
                raise InvalidInputError(f"the proxy {var}={value!r} from the environment is not usable ({exc}): fix "
                                        f"it (e.g. http://proxyhost:3128), or unset it, or add {parsed.host} to "
                                        "no_proxy") from None
        else:
            self._client = urllib3.PoolManager(**common)
        self._client.pool_classes_by_scheme = _one_write_pools(urllib3)
        self._closed = False
        self._local = threading.local()  # the path whose answer this thread reads (see _reads_answer)
        self._facts: dict | None = None
        self.version = -1
        self._len = 0
        try:
            self.refresh()
        except (ServerError, InvalidInputError) as exc:  # something answered, but not a retrostore server
            self.close()
            raise ServerUnavailableError(f"no retrostore server answers at {self.url}: {exc}") from None
        except BaseException:
            self.close()
            raise

    # -- plumbing ----------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, *, accept: str | None = None) -> Any:
        if self._closed:
            raise _errors.StoreClosedError(f"the connection to {self.url} is closed; call retrostore.connect() again")
        headers = {"Accept": accept} if accept else None
        content = None
        if body is not None:
            try:
                content = json.dumps(body, separators=(",", ":"), default=_json_default).encode("utf-8")
            except (TypeError, ValueError) as exc:  # NaN/inf are sent as JSON's extensions; this is another failure
                why = "it holds an integer of more than 4,300 digits; no id, k or parameter is that large" \
                    if "digits" in str(exc) else str(exc)
                raise InvalidInputError(f"the request to {path} cannot be sent as JSON: {why}") from None
            headers = {**(headers or {}), "Content-Type": "application/json"}
        u3 = self._urllib3.exceptions
        deadline = None if self._timeout_s is None else time.monotonic() + self._timeout_s
        try:
            res = self._client.request(method, self.url + path, body=content, headers=headers,
                                       preload_content=False)
            data = self._read_body(res, method, path, deadline)
        except RetrostoreError:
            raise
        except u3.LocationValueError as exc:
            raise InvalidInputError(f"cannot send a request to {self.url}{path}: invalid URL ({exc})") from None
        except (u3.HTTPError, OSError) as exc:
            reason = exc.reason if isinstance(exc, u3.MaxRetryError) else exc
            # (urllib3's NewConnectionError is a ConnectTimeoutError: a refused connection is not a timeout)
            if isinstance(reason, u3.TimeoutError) and not isinstance(reason, u3.NewConnectionError):
                raise ServerUnavailableError(f"{self.url}{path} did not answer in time ({reason}); the server may "
                                             "be overloaded: retry, or connect with a larger timeout_s") from None
            if isinstance(reason, u3.ProxyError) and self._proxy:
                var, value = self._proxy
                raise ServerUnavailableError(f"cannot reach {self.url} through the proxy {value} (from {var}): "
                                             f"{reason}; fix the proxy, or add the server's host to no_proxy "
                                             "(e.g. no_proxy=127.0.0.1,localhost)") from None
            raise ServerUnavailableError(f"cannot reach {self.url} ({type(reason).__name__}: {reason}); is "
                                         "`retrostore serve STORE` running there?") from None
        if res.status >= 400:
            try:
                payload = json.loads(data)
            except (ValueError, RecursionError):
                payload = data.decode("utf-8", "replace")
            raise _error_from(res.status, payload, f"{method} {self.url}{path}")
        if VERSION_HEADER in res.headers:
            got = res.headers[VERSION_HEADER]
            if not got.isdigit() or len(got) > 18:
                raise ServerError(f"{method} {self.url}{path} answered with {VERSION_HEADER}: {got[:40]!r}, not a "
                                  "version number: is this a retrostore server (`retrostore serve STORE`)?")
            if int(got) != self.version:
                self._facts = None  # read again: the server may now serve another store (helper-40: a restart)
            self.version = int(got)
        self._local.answered = path
        kind = res.headers.get("content-type", "")
        if accept == NPY_MEDIA and kind.startswith(NPY_MEDIA):
            return data
        try:
            return json.loads(data)
        except RecursionError:  # helper-40: a raw RecursionError from every method
            raise ServerError(f"{method} {self.url}{path} answered JSON nested too deeply to read: is this a "
                              "retrostore server (`retrostore serve STORE`)?") from None
        except ValueError:
            raise ServerError(f"{method} {self.url}{path} answered HTTP {res.status} with "
                              f"{kind or 'no content type'} that is not JSON ({data[:80].decode('utf-8', 'replace')!r}): is this a "
                              "retrostore server (`retrostore serve STORE`), and is the URL's path right?") from None

    def _read_body(self, res, method: str, path: str, deadline: float | None) -> bytes:
        """The answer's body, read by pieces: at most :data:`MAX_ANSWER_BYTES` and, with a
        ``timeout_s``, done by ``deadline`` (helper-40: urllib3's read timeout applies to each
        socket read, so a server sending a byte a second held the client for ever, and a huge
        Content-Length made http.client allocate it at once: MemoryError)."""
        where = f"{method} {self.url}{path}"
        length = res.headers.get("content-length", "")
        ok = False
        try:
            if length.isdigit() and int(length) > MAX_ANSWER_BYTES:
                raise ServerError(f"{where} announced an answer of {int(length):,} bytes, over the client's limit of "
                                  f"{MAX_ANSWER_BYTES:,}: is this a retrostore server (`retrostore serve STORE`)?")
            parts, size = [], 0
            while part := res.read1(1 << 16):  # what one socket read gives: the deadline is checked between
                size += len(part)
                if size > MAX_ANSWER_BYTES:
                    raise ServerError(f"{where} sent more than {MAX_ANSWER_BYTES:,} bytes, the client's limit for "
                                      "one answer: is this a retrostore server (`retrostore serve STORE`)?")
                if deadline is not None and time.monotonic() > deadline:
                    raise ServerUnavailableError(
                        f"{where} did not finish its answer within timeout_s={self._timeout_s:g} s; the server may be "
                        "overloaded: retry, or connect with a larger timeout_s")
                parts.append(part)
            ok = True
            return b"".join(parts)
        finally:
            if ok:
                res.release_conn()
            else:  # a connection with unread data is never reused
                res.close()

    def _store_facts(self) -> dict:
        """The store's metric, dim and chunk_tokens (fixed for a store's lifetime), read from ``/v1/info``
        again only after the server's version or length changed (it may serve another store since)."""
        facts = self._facts  # one read: another thread's answer may reset it meanwhile
        if facts is None:
            info = self.info()
            facts = {"metric": info["metric"], "dim": int(info["dim"]), "chunk_tokens": int(info["chunk_tokens"])}
            self._facts = facts
        return facts

    def _missing_score(self) -> float:
        return -np.inf if self._store_facts()["metric"] == "ip" else np.inf

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection pool; safe to call twice."""
        if not self._closed:
            self._closed = True
            self._client.clear()

    def __enter__(self) -> "RemoteStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<retrostore.RemoteStore {self.url!r} {'closed' if self._closed else f'version={self.version}'}>"

    def __len__(self) -> int:
        """Committed chunk ids of the version served: ids ``[0, len)``."""
        self.refresh()
        return self._len

    @_reads_answer
    def refresh(self) -> int:
        """The version the server now serves (it follows commits by itself).

        Returns
        -------
        int
        """
        health = self._request("GET", "/healthz")  # (a new version in its header drops the facts)
        if not (isinstance(health, dict) and is_int(health.get("version")) and is_int(health.get("len"))):
            raise ServerUnavailableError(
                f"{self.url}/healthz answered {str(health)[:80]!r}, not a retrostore server's health "
                "({\"status\": \"ok\", \"version\": V, \"len\": N}): is `retrostore serve STORE` running at that "
                "URL (and is its path right)?")
        if health["len"] != self._len:
            self._facts = None
        self.version, self._len = health["version"], health["len"]
        return self.version

    # -- the Store API ---------------------------------------------------------------
    @_reads_answer
    def info(self) -> dict:
        """``Store.info()`` of the version served, plus a ``server`` section (settings, pid, ``len``).

        Returns
        -------
        dict
        """
        return self._request("GET", "/v1/info")

    @_reads_answer
    def search(self, query: str | Sequence[str], k: int = 5, *,
               params: dict | None = None) -> list[Hit] | list[list[Hit]]:
        """Embed query text on the server and return the k nearest chunks with continuations.

        Parameters
        ----------
        query : str or sequence of str
        k : int, default 5
        params : dict, optional
            Search parameters for this call (``nprobe``, ``efSearch``, ``rerank``, ...).

        Returns
        -------
        list of Hit (for one string) or list of list of Hit (for a sequence),
        nearest first, as :meth:`retrostore.Store.search`.

        Raises
        ------
        InvalidInputError
            ``k`` out of range, a query that is not a str, an empty query, too
            many queries or a body over the server's limits (the message names
            the field, the value and the limit).
        EmbedderMismatchError
            The server cannot embed text for this store.
        ServerUnavailableError, ServerError
        """
        queries, single = _check_queries(query)  # the checks Store.search makes, the same messages
        queries = queries[0] if single else queries
        if not single and not queries:
            _check_k(k)
            return []
        # Hit has no metadata: not asked for (helper-51: the server read and sent it, the client dropped it)
        body: dict[str, Any] = {"query": queries, "k": _k_int(k), "metadata": False}
        if params is not None:
            body["params"] = params
        rows = self._request("POST", "/v1/search", body)["results"]
        _expect(isinstance(rows, list) and len(rows) == (1 if single else len(queries))
                and all(isinstance(row, list) and len(row) <= int(k) for row in rows),
                f"{len(rows)} result rows for {1 if single else len(queries)} queries at k={int(k)}")
        hits = [[_hit(h) for h in row] for row in rows]
        return hits[0] if single else hits

    @_reads_answer
    def search_vectors(self, vectors: np.ndarray, k: int = 5, *,
                       params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest committed chunks of query vectors, as :meth:`retrostore.Store.search_vectors`.

        Parameters
        ----------
        vectors : ndarray, shape (n, dim) or (dim,)
            float64 is converted to float32 before sending.
        k : int, default 5
        params : dict, optional

        Returns
        -------
        scores : ndarray, shape (n, k), float32
        chunk_ids : ndarray, shape (n, k), int64
            -1 where fewer than k chunks exist.

        Raises
        ------
        InvalidInputError
            Wrong width, non-finite values, ``k`` out of range.
        ServerUnavailableError, ServerError
        """
        # Store's own checks (helper-27: complex was sent as its real part, 1e39 as inf); k's range is the
        # server's (its max_k), and the output check takes its lower bound, 1.
        q = _query_vectors(vectors, self._store_facts()["dim"], max(1, _k_int(k)))
        if len(q) == 0:  # as Store: no queries, no search (the width is still checked)
            k = _check_k(k)
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        body: dict[str, Any] = {"vectors": q.tolist(), "k": _k_int(k), "output": "ids", "metadata": False,
                                "tokens": False}
        if params is not None:
            body["params"] = params
        res = self._request("POST", "/v1/search", body)
        ids = np.asarray(res["chunk_ids"], dtype=np.int64).reshape(len(q), -1)
        scores = scores_from_json(res["scores"], self._missing_score()).reshape(len(q), -1)
        _expect(ids.shape == scores.shape == (len(q), int(k)), f"ids {ids.shape} and scores {scores.shape} for "
                f"{len(q)} queries at k={int(k)}")
        return scores, ids

    @_reads_answer
    def neighbors(self, token_ids: Any, k: int = 2, *, exclude_doc_ids: Any = None, label_token: bool = False,
                  tail: str = "query") -> Neighbors:
        """RETRO neighbours with continuations, as :meth:`retrostore.Store.neighbors`.

        Parameters
        ----------
        token_ids : array-like of int, shape (B, L) or (L,)
            Ids in the store's chunk-tokenizer space.
        k : int, default 2
        exclude_doc_ids : sequence of length B, optional
            Per row: a doc id, an iterable of doc ids, or None.
        label_token : bool, default False
            Drop each row's last token first (it is the label of a training row).
        tail : {"query", "drop", "pad"}, default "query"
            The last L % chunk_tokens tokens: queried as one shorter chunk,
            dropped (C = floor(L / chunk_tokens)), or given a slot with no
            neighbours (ids -1, mask False).

        Returns
        -------
        Neighbors
            ``tokens`` (B, C, k, 2 * chunk_tokens) int64, ``mask`` (bool),
            ``chunk_ids`` / ``doc_ids`` (B, C, k) int64, ``scores`` (B, C, k)
            float32; fetched as ``.npy`` arrays, bit for bit the server's. An
            empty batch (B = 0) gives empty arrays of those shapes, as ``Store``.

        Raises
        ------
        InvalidInputError
            Bad shape, non-integer or out-of-vocabulary ids, ``k`` out of range,
            ``exclude_doc_ids`` of the wrong length, a bad ``tail``,
            ``label_token`` with rows of one token, or over the server's limits
            (``max_queries`` chunks, ``max_neighbors`` = B x C x k).
        ServerUnavailableError, ServerError
        """
        try:
            arr = np.asarray(token_ids)
        except ValueError as exc:
            raise InvalidInputError(f"token_ids cannot form a (B, L) array ({exc}); every row must have the same "
                                    "length L") from None
        if arr.ndim == 2 and arr.shape[0] == 0 and arr.shape[1] > 0:
            return self._no_neighbors(arr.shape[1], k, exclude_doc_ids, label_token, tail)
        label_token = _check_label_tail(label_token, tail)  # as Store checks them (helper-27: "yes" was sent as true)
        body: dict[str, Any] = {"token_ids": arr.tolist(), "k": _k_int(k)}
        if label_token:
            body["label_token"] = True
        if tail != "query":
            body["tail"] = tail
        if exclude_doc_ids is not None:
            if not isinstance(exclude_doc_ids, (str, bytes)) and hasattr(exclude_doc_ids, "__iter__"):
                exclude_doc_ids = list(exclude_doc_ids)  # read once (helper-30: a generator was used up)
            batch = len(arr) if arr.ndim == 2 else 1
            sets = _exclusion_sets(exclude_doc_ids, batch) if arr.ndim in (1, 2) else None
            if sets is not None:  # Store's own check; None rows stay None (the server: "excludes nothing")
                body["exclude_doc_ids"] = [None if entry is None else sorted(ids)
                                           for entry, ids in zip(exclude_doc_ids, sets)]
            else:
                body["exclude_doc_ids"] = exclude_doc_ids  # a bad token_ids shape: the server names it first
        data = self._request("POST", "/v1/neighbors", body, accept=NPY_MEDIA)
        if isinstance(data, bytes):
            return Neighbors(*unpack_arrays(data, len(NEIGHBOR_FIELDS)))
        missing = -np.inf if data["metric"] == "ip" else np.inf
        return Neighbors(np.asarray(data["tokens"], np.int64), np.asarray(data["mask"], bool),
                         np.asarray(data["chunk_ids"], np.int64), np.asarray(data["doc_ids"], np.int64),
                         scores_from_json(data["scores"], missing))

    def _no_neighbors(self, length: int, k: Any, exclude_doc_ids: Any, label_token: Any, tail: Any) -> Neighbors:
        """What ``Store.neighbors`` returns for B = 0 rows of L tokens (JSON cannot carry a (0, L) shape),
        after the checks it makes."""
        k = _check_k(k)
        label_token = _check_label_tail(label_token, tail)
        _exclusion_sets(exclude_doc_ids, 0)
        if label_token and length < 2:
            raise InvalidInputError(f"rows of {length} token with label_token=True hold no input token; a training "
                                    "row is L + 1 tokens (inputs, then the last label)")
        t = self._store_facts()["chunk_tokens"]
        inputs = length - label_token
        c = inputs // t if tail == "drop" else -(-inputs // t)
        ids = np.full((0, c, k), -1, np.int64)
        tokens = np.zeros((0, c, k, 2 * t), np.int64)
        return Neighbors(tokens, np.zeros(tokens.shape, bool), ids, ids.copy(), np.zeros((0, c, k), np.float32))

    @_reads_answer
    def get_chunks(self, chunk_ids: Iterable[int]) -> list[Chunk]:
        """Committed chunks by id, as :meth:`retrostore.Store.get_chunks`.

        Parameters
        ----------
        chunk_ids : iterable of int

        Returns
        -------
        list of Chunk

        Raises
        ------
        InvalidInputError
            An id is negative, not committed or deleted (HTTP 404), or too many ids.
        """
        ids = _int_list(chunk_ids, "chunk")
        if not ids:
            return []
        res = self._request("POST", "/v1/chunks", {"ids": ids})
        _expect(isinstance(res["chunks"], list) and len(res["chunks"]) == len(ids),
                f"{len(res['chunks'])} chunks for {len(ids)} ids")
        return [_chunk(c) for c in res["chunks"]]

    @_reads_answer
    def get_document(self, doc_id: int) -> Document:
        """A committed document (exact text and metadata), as :meth:`retrostore.Store.get_document`.

        Raises
        ------
        InvalidInputError
            ``doc_id`` is not an int, negative, not committed or deleted.
        """
        if not is_int(doc_id):
            raise InvalidInputError(f"document id {shown(doc_id)} is not an int")
        if doc_id < 0:
            raise InvalidInputError(f"document id {shown(doc_id)} is negative; ids start at 0")
        d = self._request("POST", "/v1/documents", {"ids": [int(doc_id)]})["documents"][0]
        _expect(is_int(d["doc_id"]) and isinstance(d["text"], str), f"a document of the wrong types: {str(d)[:80]}")
        return Document(d["doc_id"], d["text"], d["metadata"], range(*d["chunk_ids"]))

    @_reads_answer
    def get_metadata(self, doc_ids: Iterable[int]) -> list[Any]:
        """Metadata of committed documents, as :meth:`retrostore.Store.get_metadata`.

        Raises
        ------
        InvalidInputError
            An id is negative, not committed or deleted.
        """
        ids = _int_list(doc_ids, "document")
        if not ids:
            return []
        res = self._request("POST", "/v1/documents", {"ids": ids, "text": False})
        _expect(isinstance(res["documents"], list) and len(res["documents"]) == len(ids),
                f"{len(res['documents'])} documents for {len(ids)} ids")
        return [d["metadata"] for d in res["documents"]]


def connect(url: str, *, timeout_s: float = 60.0, headers: dict | None = None) -> RemoteStore:
    """Connect to a store served by ``retrostore serve``.

    The returned object has the read API of :class:`retrostore.Store`
    (``search``, ``search_vectors``, ``neighbors``, ``get_chunks``,
    ``get_document``, ``get_metadata``, ``info``, ``version``, ``refresh``),
    with the same signatures and return types, so code switches between an
    embedded and a served store by one line::

        store = retrostore.open("wiki.rstore")              # embedded
        store = retrostore.connect("http://127.0.0.1:8808")  # served

    Needs only urllib3 and numpy on the client side.

    Parameters
    ----------
    url : str
        The server's base URL, e.g. ``"http://127.0.0.1:8808"`` (a path prefix is kept;
        ``user:password@`` is sent as HTTP basic auth and left out of messages; no query
        or fragment). The environment's ``http_proxy`` / ``https_proxy`` / ``all_proxy``
        are used unless ``no_proxy`` names the host or holds a CIDR range with its
        address (``no_proxy=127.0.0.0/8``).
    timeout_s : float or None, default 60.0
        Seconds to wait for a connection and for each answer (> 0), or None for ever.
    headers : dict of str to str, optional
        Extra HTTP headers sent with every request (e.g. for a proxy in front).

    Returns
    -------
    RemoteStore
        Connected: the server answered ``GET /healthz``.

    Raises
    ------
    ServerUnavailableError
        Nothing answers at ``url``, or what answers is not a retrostore
        server (``GET /healthz`` is not its JSON health); a subclass of
        ``RetrostoreError`` and ``ConnectionError``
        (``retrostore.serve.ServerUnavailableError``).
    InvalidInputError
        ``url`` is not a valid URL (e.g. ``http://256.0.0.1:8808``), ``timeout_s`` or
        ``headers`` cannot be used, or the environment's proxy is not a usable URL.
    MissingDependencyError
        urllib3 is not installed (``pip install '.[serve]'``).
    """
    return RemoteStore(url, timeout_s=timeout_s, headers=headers)


def _proxy_for(scheme: str | None, host: str) -> tuple[str, str] | None:
    """(variable, proxy URL) the environment names for this URL (``http_proxy``, ``https_proxy``,
    else ``all_proxy``), as ``urllib.request.getproxies`` reads them; None for a direct
    connection: ``no_proxy`` names the host (a name, a domain suffix, ``*``), or, as ``requests``
    and curl read it, holds a CIDR range with the host's address (``127.0.0.0/8``)."""
    import urllib.request  # (here, not at import time: it costs `import retrostore` ~9 ms)

    proxies = urllib.request.getproxies()
    key = (scheme or "http").lower()
    key = key if proxies.get(key) else "all"
    proxy = proxies.get(key)
    if not proxy or urllib.request.proxy_bypass(host) or _in_ranges(host, proxies.get("no", "")):
        return None
    return f"{key}_proxy", proxy


def _in_ranges(host: str, no_proxy: str) -> bool:
    """Whether ``host`` is an IP address inside a CIDR range of the ``no_proxy`` list."""
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    for entry in no_proxy.split(","):
        entry = entry.strip()
        if "/" not in entry:
            continue
        try:
            if addr in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:  # not a range: urllib.request's own rules have had their say
            continue
    return False


def _check_headers(headers: Any) -> dict:
    """``connect(headers=)``: a dict of str names to str values without line breaks."""
    if headers is None:
        return {}
    if not isinstance(headers, dict):
        raise InvalidInputError(f"headers must be a dict of str to str, not {type(headers).__name__}")
    for name, value in headers.items():
        if (not isinstance(name, str) or not isinstance(value, str) or not name.strip()
                or any(c in name + value for c in "\r\n\0") or any(c in name for c in ": ")
                or not name.isascii() or any(ord(c) > 255 for c in value)):
            raise InvalidInputError(f"header {name!r}: {value!r} cannot be sent: names and values must be str, "
                                    "names of ASCII without spaces or colons, values of Latin-1 (HTTP's), neither "
                                    "with line breaks or NUL")
    return dict(headers)
