"""The client of a retrostore server: ``retrostore.connect(url)``.

A :class:`RemoteStore` answers ``search``, ``search_vectors``, ``neighbors``,
``get_chunks``, ``get_document``, ``get_metadata`` and ``info`` with the same
signatures and return types as :class:`retrostore.Store`, so inference code
moves between an embedded store and a served one by changing the line that
opens it. It needs httpx and numpy (imported when a client is made); no
store, FAISS or model is loaded on the client side.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

import numpy as np

import retrostore.errors as _errors
from retrostore import Chunk, Document, Hit, Neighbors
from retrostore.errors import InvalidInputError, RetrostoreError

from . import errors as _serve_errors
from .errors import MissingDependencyError, ServerError, ServerUnavailableError
from .wire import NEIGHBOR_FIELDS, NPY_MEDIA, VERSION_HEADER, scores_from_json, unpack_arrays

__all__ = ["connect", "RemoteStore", "ServerError", "ServerUnavailableError"]


def _error_from(status: int, payload: Any) -> RetrostoreError:
    """The RetrostoreError subclass a server's JSON error names (4xx), with its details attached."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        cls = InvalidInputError if 400 <= status < 500 else ServerError
        exc = cls(f"the server answered HTTP {status}: {str(payload)[:300]}")
    else:
        name = str(err.get("type"))
        cls = getattr(_errors, name, None) or getattr(_serve_errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, RetrostoreError)):
            cls = InvalidInputError if 400 <= status < 500 else ServerError
        elif status >= 500 and issubclass(cls, InvalidInputError):
            cls = ServerError
        exc = cls(err.get("message") or f"HTTP {status}")
        exc.field, exc.value, exc.limit = err.get("field"), err.get("value"), err.get("limit")
    exc.status = status
    return exc


def _int_list(ids: Any, what: str) -> list[int]:
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Iterable):
        raise InvalidInputError(f"{what} ids must be an iterable of int, not {type(ids).__name__}")
    if isinstance(ids, np.ndarray):
        ids = ids.ravel().tolist()
    out = []
    for i in ids:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            if isinstance(i, (float, np.floating)) and float(i).is_integer():
                i = int(i)
            else:
                raise InvalidInputError(f"{what} id {i!r} is not an integer")
        out.append(int(i))
    return out


def _hit(d: dict) -> Hit:
    return Hit(d["chunk_id"], d["doc_id"], d["position"], d["score"], d["text"],
               np.asarray(d.get("tokens", []), dtype=np.int64), d.get("continuation_text", ""),
               np.asarray(d.get("continuation_tokens", []), dtype=np.int64))


class RemoteStore:
    """A store served by ``retrostore serve``, used like :class:`retrostore.Store`.

    Make one with :func:`retrostore.connect`. Use as a context manager;
    ``close()`` is idempotent. Thread-safe (one ``httpx.Client`` pool).

    Attributes
    ----------
    url : str
        The server's base URL.
    version : int
        The committed version that gave the latest answer (the server moves to
        each new commit by itself).
    """

    def __init__(self, url: str, *, timeout_s: float = 60.0, headers: dict | None = None) -> None:
        try:
            import httpx
        except ImportError as exc:  # pragma: no cover - httpx is in the serve extra
            raise MissingDependencyError(
                "retrostore.connect needs httpx: pip install 'retrostore[serve]' (or pip install httpx)") from exc
        self._httpx = httpx
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)
        self._closed = False
        self._metric: str | None = None
        self.version = -1
        health = self._request("GET", "/healthz")
        self.version = int(health["version"])
        self._len = int(health["len"])

    # -- plumbing ----------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, *, accept: str | None = None) -> Any:
        if self._closed:
            raise _errors.StoreClosedError(f"the connection to {self.url} is closed; call retrostore.connect() again")
        headers = {"Accept": accept} if accept else None
        content = None
        if body is not None:
            try:
                content = json.dumps(body, separators=(",", ":")).encode("utf-8")
            except ValueError as exc:  # NaN/inf are sent as JSON's extensions; this is another failure
                raise InvalidInputError(f"the request cannot be sent as JSON: {exc}") from None
            headers = {**(headers or {}), "Content-Type": "application/json"}
        try:
            res = self._client.request(method, path, content=content, headers=headers)
        except self._httpx.TimeoutException as exc:
            raise ServerUnavailableError(f"{self.url}{path} did not answer in time ({exc}); the server may be "
                                         "overloaded: retry, or connect with a larger timeout_s") from None
        except self._httpx.HTTPError as exc:
            raise ServerUnavailableError(f"cannot reach {self.url} ({type(exc).__name__}: {exc}); is "
                                         "`retrostore serve STORE` running there?") from None
        if res.status_code >= 400:
            try:
                payload = res.json()
            except ValueError:
                payload = res.text
            raise _error_from(res.status_code, payload)
        if VERSION_HEADER in res.headers:
            self.version = int(res.headers[VERSION_HEADER])
        if accept == NPY_MEDIA and res.headers.get("content-type", "").startswith(NPY_MEDIA):
            return res.content
        return res.json()

    def _missing_score(self) -> float:
        if self._metric is None:
            self._metric = self.info()["metric"]
        return -np.inf if self._metric == "ip" else np.inf

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection pool; safe to call twice."""
        if not self._closed:
            self._closed = True
            self._client.close()

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

    def refresh(self) -> int:
        """The version the server now serves (it follows commits by itself).

        Returns
        -------
        int
        """
        health = self._request("GET", "/healthz")
        self.version, self._len = int(health["version"]), int(health["len"])
        return self.version

    # -- the Store API ---------------------------------------------------------------
    def info(self) -> dict:
        """``Store.info()`` of the version served, plus a ``server`` section (settings, pid, ``len``).

        Returns
        -------
        dict
        """
        return self._request("GET", "/v1/info")

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
        single = isinstance(query, str)
        if not single and (isinstance(query, (bytes, bytearray)) or not isinstance(query, Iterable)):
            raise InvalidInputError(f"query must be a str or a sequence of str, not {type(query).__name__}")
        queries = query if single else list(query)
        if not single and not queries:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
                raise InvalidInputError(f"k={k!r} must be an int >= 1 (the number of neighbours to return)")
            return []
        body: dict[str, Any] = {"query": queries, "k": k}
        if params is not None:
            body["params"] = params
        rows = self._request("POST", "/v1/search", body)["results"]
        hits = [[_hit(h) for h in row] for row in rows]
        return hits[0] if single else hits

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
        q = np.asarray(vectors)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or not np.issubdtype(q.dtype, np.number):
            raise InvalidInputError(f"query vectors have shape {q.shape} and dtype {q.dtype}; expected (n, dim) floats")
        q = q.astype(np.float32)
        body: dict[str, Any] = {"vectors": q.tolist(), "k": k, "output": "ids", "metadata": False, "tokens": False}
        if params is not None:
            body["params"] = params
        res = self._request("POST", "/v1/search", body)
        ids = np.asarray(res["chunk_ids"], dtype=np.int64).reshape(len(q), -1)
        scores = scores_from_json(res["scores"], self._missing_score()).reshape(len(q), -1)
        return scores, ids

    def neighbors(self, token_ids: Any, k: int = 2, *, exclude_doc_ids: Any = None) -> Neighbors:
        """RETRO neighbours with continuations, as :meth:`retrostore.Store.neighbors`.

        Parameters
        ----------
        token_ids : array-like of int, shape (B, L) or (L,)
            Ids in the store's chunk-tokenizer space.
        k : int, default 2
        exclude_doc_ids : sequence of length B, optional
            Per row: a doc id, an iterable of doc ids, or None.

        Returns
        -------
        Neighbors
            ``tokens`` (B, C, k, 2 * chunk_tokens) int64, ``mask`` (bool),
            ``chunk_ids`` / ``doc_ids`` (B, C, k) int64, ``scores`` (B, C, k)
            float32; fetched as ``.npy`` arrays, bit for bit the server's.

        Raises
        ------
        InvalidInputError
            Bad shape, non-integer or out-of-vocabulary ids, ``k`` out of range,
            ``exclude_doc_ids`` of the wrong length, or over the server's limits.
        ServerUnavailableError, ServerError
        """
        try:
            arr = np.asarray(token_ids)
        except ValueError as exc:
            raise InvalidInputError(f"token_ids cannot form a (B, L) array ({exc}); every row must have the same "
                                    "length L") from None
        body: dict[str, Any] = {"token_ids": arr.tolist(), "k": k}
        if exclude_doc_ids is not None:
            rows = []
            for entry in list(exclude_doc_ids):
                if entry is None or isinstance(entry, (bool, np.bool_)):
                    rows.append(entry)
                elif isinstance(entry, (int, np.integer)):
                    rows.append(int(entry))
                elif isinstance(entry, (str, bytes)) or not isinstance(entry, Iterable):
                    rows.append(entry)  # the server names what is wrong with it
                else:
                    rows.append([int(x) if isinstance(x, np.integer) else x for x in entry])
            body["exclude_doc_ids"] = rows
        data = self._request("POST", "/v1/neighbors", body, accept=NPY_MEDIA)
        if isinstance(data, bytes):
            return Neighbors(*unpack_arrays(data, len(NEIGHBOR_FIELDS)))
        missing = -np.inf if data["metric"] == "ip" else np.inf
        return Neighbors(np.asarray(data["tokens"], np.int64), np.asarray(data["mask"], bool),
                         np.asarray(data["chunk_ids"], np.int64), np.asarray(data["doc_ids"], np.int64),
                         scores_from_json(data["scores"], missing))

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
        return [Chunk(c["chunk_id"], c["doc_id"], c["position"], c["start"], c["text"],
                      np.asarray(c["tokens"], dtype=np.int64)) for c in res["chunks"]]

    def get_document(self, doc_id: int) -> Document:
        """A committed document (exact text and metadata), as :meth:`retrostore.Store.get_document`.

        Raises
        ------
        InvalidInputError
            ``doc_id`` is not an int, negative, not committed or deleted.
        """
        if isinstance(doc_id, (bool, np.bool_)) or not isinstance(doc_id, (int, np.integer)):
            raise InvalidInputError(f"document id {doc_id!r} is not an int")
        if doc_id < 0:
            raise InvalidInputError(f"document id {doc_id} is negative; ids start at 0")
        d = self._request("POST", "/v1/documents", {"ids": [int(doc_id)]})["documents"][0]
        return Document(d["doc_id"], d["text"], d["metadata"], range(*d["chunk_ids"]))

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

    Needs only httpx and numpy on the client side.

    Parameters
    ----------
    url : str
        The server's base URL, e.g. ``"http://127.0.0.1:8808"``.
    timeout_s : float, default 60.0
        Seconds to wait for each answer.
    headers : dict, optional
        Extra HTTP headers sent with every request (e.g. for a proxy in front).

    Returns
    -------
    RemoteStore
        Connected: the server answered ``GET /healthz``.

    Raises
    ------
    ServerUnavailableError
        Nothing answers at ``url`` (a subclass of ``RetrostoreError`` and
        ``ConnectionError``; ``retrostore.serve.ServerUnavailableError``).
    ModelNotInstalledError
        httpx is not installed (``pip install 'retrostore[serve]'``).
    """
    return RemoteStore(url, timeout_s=timeout_s, headers=headers)
