"""Request bodies of the HTTP API, checked field by field before anything is queued.

Every problem raises :class:`RequestError` naming the field, the value, the
limit and the fix; the app turns it into a 4xx JSON answer. Checks that need
the store (ids beyond the committed range, unknown search parameters) happen in
the engine, which raises the store's own errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrostore.errors import InvalidInputError, shown
from retrostore.index.params import FAISS_PARAMS, RERANK, check_params, param_limits
from retrostore.store.reading import query_text_problem

from .wire import NEIGHBOR_FIELDS, TAILS

__all__ = ["RequestError", "StoreFacts", "SearchRequest", "NeighborsRequest", "IdsRequest", "parse_json",
           "parse_search", "parse_compat_search", "parse_neighbors", "parse_ids", "show", "jsonable", "FLOAT32_MAX"]

#: Largest magnitude of a float32 (the store's vectors); a vector value beyond it is refused.
FLOAT32_MAX = float(np.finfo(np.float32).max)


class RequestError(InvalidInputError):
    """A request the server refuses (HTTP ``status``), naming ``field``, ``value`` and ``limit``."""

    def __init__(self, message: str, *, field: str, value: Any = None, limit: Any = None, status: int = 400,
                 kind: str = "InvalidInputError") -> None:
        super().__init__(message)
        self.field = field
        self.value = show(value)
        self.limit = limit
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class StoreFacts:
    """What checking a request needs to know of the store; fixed for its lifetime
    (the tokenizer and the embedder are pinned by the manifest)."""

    dim: int
    chunk_tokens: int
    vocab_size: int
    metric: str


@dataclass
class SearchRequest:
    """One ``/v1/search`` request: exactly one of ``texts``, ``token_rows``, ``vectors``."""

    single: bool
    k: int
    params: dict
    texts: list[str] | None = None
    token_rows: list[np.ndarray] | None = None
    vectors: np.ndarray | None = None
    exclude: frozenset = frozenset()
    tokens: bool = True
    metadata: bool = True
    output: str = "hits"
    params_key: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.params_key = json.dumps(self.params, sort_keys=True)

    @property
    def n(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        if self.token_rows is not None:
            return len(self.token_rows)
        return len(self.vectors)

    def split(self, size: int) -> list["SearchRequest"]:
        """The same request over consecutive runs of its queries, for sliced answering: at most ``size``
        queries a part and, for text, at most ``size * 256`` characters (about ``size`` chunks of 64
        tokens: long texts cost the embedder in proportion to their tokens), at least one query."""
        def part(a: int, b: int) -> "SearchRequest":
            return dataclasses.replace(
                self, single=False, texts=None if self.texts is None else self.texts[a:b],
                token_rows=None if self.token_rows is None else self.token_rows[a:b],
                vectors=None if self.vectors is None else self.vectors[a:b])
        cuts, start, chars = [], 0, 0
        for i in range(self.n):
            cost = len(self.texts[i]) if self.texts is not None else 0
            if i > start and (i - start >= size or chars + cost > size * 256):
                cuts.append((start, i))
                start, chars = i, 0
            chars += cost
        cuts.append((start, self.n))
        return [part(a, b) for a, b in cuts]

    @staticmethod
    def merge(answers: list[dict]) -> dict:
        """One answer from the answers of :meth:`split`'s parts, in order."""
        if "results" in answers[0]:
            return {"results": [row for a in answers for row in a["results"]]}
        return {"scores": [row for a in answers for row in a["scores"]],
                "chunk_ids": [row for a in answers for row in a["chunk_ids"]]}


@dataclass
class NeighborsRequest:
    tokens: np.ndarray  # (B, L) int64, as sent (label token included)
    k: int
    exclude: list | None  # per row: set of doc ids (possibly empty), or None for the whole request
    chunks: int  # C of the answer (after the label token is dropped and the tail handled)
    label_token: bool = False
    tail: str = "query"

    @property
    def n(self) -> int:
        """Query chunks: what the batcher counts."""
        return len(self.tokens) * self.chunks

    def split(self, size: int) -> list["NeighborsRequest"]:
        """The same request over row ranges of about ``size`` query chunks each (at least one row)."""
        rows = max(1, size // max(self.chunks, 1))
        return [dataclasses.replace(self, tokens=self.tokens[a:a + rows],
                                    exclude=None if self.exclude is None else self.exclude[a:a + rows])
                for a in range(0, len(self.tokens), rows)]

    @staticmethod
    def merge(answers: list) -> Any:
        """One :class:`retrostore.Neighbors` from the parts' answers, rows in order."""
        first = answers[0]
        return type(first)(*(np.concatenate([getattr(a, f) for a in answers]) for f in NEIGHBOR_FIELDS))


@dataclass
class IdsRequest:
    ids: list[int]
    text: bool = True


def jsonable(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` that strict JSON (no NaN/Infinity) can encode.

    Non-finite floats become their ``repr`` (``"nan"``, ``"inf"``); strings lose
    lone surrogates (replaced by U+FFFD); anything else not JSON becomes its
    ``repr``; nesting deeper than 16 levels is cut (``"..."``).

    Parameters
    ----------
    value : object
    depth : int, default 0

    Returns
    -------
    object
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**20 else shown(value)  # (the message's own wording of a huge int)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8") if _has_surrogate(value) else value
    if depth >= 16:
        return "..."
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {jsonable(str(k), depth + 1): jsonable(v, depth + 1) for k, v in value.items()}
    return repr(value)[:80]


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def show(value: Any, limit: int = 80) -> Any:
    """A short JSON-able rendering of a refused value, for error answers (strict JSON: no NaN)."""
    if isinstance(value, str):
        value = value if len(value) <= limit else value[:limit] + f"... ({len(value)} characters)"
        return jsonable(value)
    if isinstance(value, (list, tuple)):
        if len(value) > 8:
            return f"a list of {len(value)} items"
        value = jsonable(value)
        return value if len(json.dumps(value)) <= limit else f"a list of {len(value)} items"
    if isinstance(value, dict):
        if len(value) > 8:
            return f"an object with {len(value)} keys"
        value = jsonable(value)
        return value if len(json.dumps(value)) <= limit else f"an object with {len(value)} keys"
    return jsonable(value)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def parse_json(body: bytes) -> Any:
    """Decode a JSON body (UTF-8)."""
    if not body.strip():
        raise RequestError("the request body is empty; send a JSON object", field="body", value="")
    try:
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise RequestError(f"the request body is not UTF-8 ({exc})", field="body") from None
    except ValueError as exc:
        if not isinstance(exc, json.JSONDecodeError):  # Python's limit on the digits of an int
            raise RequestError("the request body holds a number of more than 4,300 digits; no id, k or "
                               "parameter is that large", field="body", value=body[:80].decode("utf-8", "replace"),
                               limit=4300) from None
        raise RequestError(f"the request body is malformed JSON: {exc}", field="body",
                           value=body[:80].decode("utf-8", "replace")) from None
    except RecursionError:
        raise RequestError("the request body nests JSON arrays or objects too deeply to read", field="body",
                           value=body[:80].decode("utf-8", "replace")) from None


def _object(body: Any, known: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object with the fields {', '.join(known)}, "
                           f"not {_type_name(body)}", field="body", value=body)
    for name in body:
        if name not in known:
            raise RequestError(f"unknown field {name!r}; this endpoint takes {', '.join(known)}", field=name,
                               value=body[name], limit=list(known))
    return body


def _int(body: dict, name: str, default: int, low: int, high: int, what: str) -> int:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer ({what}), not {_type_name(value)}", field=name, value=value,
                           limit=[low, high])
    if not low <= value <= high:
        fix = (f"ask for at least {low}" if value < low
               else "the server's max_k; ask with a smaller k" if name in ("k", "n_docs") else f"ask for at most {high}")
        raise RequestError(f"{name}={shown(value)} is out of range: {what} must be in [{low}, {high}] ({fix})",
                           field=name, value=value, limit=[low, high])
    return value


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, not {_type_name(value)}", field=name, value=value)
    return value


def _params(body: dict) -> dict:
    params = body.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RequestError("params must be an object of search parameters such as {\"nprobe\": 16}, not "
                           f"{_type_name(params)}", field="params", value=params)
    for name, value in params.items():  # the store's own check, one parameter at a time: the field names it
        try:
            check_params({name: value})
        except InvalidInputError as exc:
            limits = param_limits(name)  # None: an unknown name, refused as such
            raise RequestError(str(exc), field="params" if limits is None else f"params.{name}",
                               value=name if limits is None else value,
                               limit=list(FAISS_PARAMS + (RERANK,)) if limits is None else limits) from None
    params = dict(params)
    if body.get("nprobe") is not None:
        nprobe = _int(body, "nprobe", 1, 1, 2**31 - 1, "IVF lists probed per query")
        if "nprobe" in params and params["nprobe"] != nprobe:
            raise RequestError(f"nprobe={nprobe} and params.nprobe={params['nprobe']} disagree; give one",
                               field="nprobe", value=nprobe)
        params["nprobe"] = nprobe
    return params


def _texts(value: Any, name: str, max_queries: int) -> tuple[list[str], bool]:
    if isinstance(value, str):
        texts, single = [value], True
    elif isinstance(value, list):
        texts, single = value, False
    else:
        raise RequestError(f"{name} must be a string or a list of strings, not {_type_name(value)}", field=name,
                           value=value)
    if len(texts) > max_queries:
        raise RequestError(f"{name} holds {len(texts)} queries; the server's limit is {max_queries} per request "
                           "(max_queries): split it", field=name, value=len(texts), limit=max_queries)
    for i, text in enumerate(texts):
        where = name if single else f"{name}[{i}]"
        if not isinstance(text, str):
            raise RequestError(f"{where} is {_type_name(text)}, not a string", field=where, value=text)
        problem = query_text_problem(text)
        if problem:
            raise RequestError(f"{where} {problem}", field=where, value=text)
    return texts, single


def _int_matrix(value: Any, name: str, *, flat: bool = False) -> np.ndarray:
    """A list (one row) or list of equal-length lists of JSON integers as (B, L) int64; with ``flat``, one
    row only (a list in it is refused, never read as rows: helper-27 had rows after the first dropped)."""
    nested = not flat and bool(value) and isinstance(value[0], list)
    rows = value if nested else [value]
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise RequestError(f"{name}[{i}] is {_type_name(row)}; every row must be a list of token ids",
                               field=f"{name}[{i}]", value=row)
        for j, x in enumerate(row):
            if type(x) is not int or not -_INT64 <= x < _INT64:
                where = f"{name}[{i}][{j}]" if nested else f"{name}[{j}]"
                what = "an integer beyond int64" if type(x) is int else _type_name(x)
                raise RequestError(f"{where} is {what} {show(x)!r}; token ids are integers in the store's "
                                   "vocabulary", field=where, value=x)
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise RequestError(f"{name} rows have different lengths {sorted(lengths)[:4]}; every row must have the "
                           "same length L (pad them)", field=name, value=sorted(lengths)[:8])
    return np.array(rows, dtype=np.int64).reshape(len(rows), -1)


_INT64 = 2**63


def _check_vocab(arr: np.ndarray, name: str, vocab_size: int) -> None:
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise RequestError(f"{name} holds the id {bad}, outside the store's vocabulary [0, {vocab_size}); tokenize "
                           "with the store's own tokenizer", field=name, value=bad, limit=[0, vocab_size - 1])


def _vectors(value: Any, facts: StoreFacts, max_queries: int) -> tuple[np.ndarray, bool]:
    if not isinstance(value, list) or not value:
        raise RequestError(f"vectors must be a list of {facts.dim} numbers or a list of such lists, not "
                           f"{_type_name(value)}", field="vectors", value=value, limit=facts.dim)
    single = not isinstance(value[0], list)
    rows = [value] if single else value
    if len(rows) > max_queries:
        raise RequestError(f"vectors holds {len(rows)} queries; the server's limit is {max_queries} per request "
                           "(max_queries): split it", field="vectors", value=len(rows), limit=max_queries)
    for i, row in enumerate(rows):
        where = "vectors" if single else f"vectors[{i}]"
        if not isinstance(row, list) or len(row) != facts.dim:
            got = f"{len(row)} values" if isinstance(row, list) else _type_name(row)
            raise RequestError(f"{where} has {got}; the store's vectors have {facts.dim} dimensions", field=where,
                               value=len(row) if isinstance(row, list) else row, limit=facts.dim)
        for j, x in enumerate(row):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise RequestError(f"{where}[{j}] is {_type_name(x)}; vector values are numbers",
                                   field=f"{where}[{j}]", value=x)
            if type(x) is int and not -FLOAT32_MAX <= x <= FLOAT32_MAX:  # also what float64 cannot hold
                _beyond_float32(f"{where}[{j}]", x)
    arr = np.array(rows, dtype=np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        where = f"vectors[{j}]" if single else f"vectors[{i}][{j}]"
        raise RequestError(f"{where} is {float(arr[i, j])!r}; every value must be finite", field=where,
                           value=float(arr[i, j]), limit=[-FLOAT32_MAX, FLOAT32_MAX])
    big = np.abs(arr) > FLOAT32_MAX
    if big.any():
        i, j = (int(v) for v in np.argwhere(big)[0])
        _beyond_float32(f"vectors[{j}]" if single else f"vectors[{i}][{j}]", float(arr[i, j]))
    norms = np.sqrt((arr ** 2).sum(axis=1)) if arr.size else np.zeros(0)
    if (norms > MAX_NORM).any():  # (helper-30: 3.4e38 per value made inf scores, then a 500 writing them)
        i = int(np.argmax(norms > MAX_NORM))
        where = "vectors" if single else f"vectors[{i}]"
        raise RequestError(f"{where} has a length of {float(norms[i]):.3g}; its scores (inner products or squared "
                           f"distances with the store's vectors) would overflow float32 beyond a length of "
                           f"{MAX_NORM:g}: scale it (embeddings are usually unit length)", field=where,
                           value=float(norms[i]), limit=MAX_NORM)
    return arr.astype(np.float32), single


#: The longest query vector the server takes: its squared distance to a unit vector stays far within float32.
MAX_NORM = 1e18


def _beyond_float32(where: str, value: Any) -> None:
    raise RequestError(f"{where} is {show(value)}, beyond float32 (the store's vectors): every value must be in "
                       f"[-{FLOAT32_MAX:.7g}, {FLOAT32_MAX:.7g}]", field=where, value=value,
                       limit=[-FLOAT32_MAX, FLOAT32_MAX])


def _doc_id_list(value: Any, name: str, max_ids: int) -> list[int]:
    if not isinstance(value, list):
        raise RequestError(f"{name} must be a list of document ids, not {_type_name(value)}", field=name, value=value)
    if len(value) > max_ids:
        raise RequestError(f"{name} holds {len(value)} ids; the server's limit is {max_ids} (max_ids)", field=name,
                           value=len(value), limit=max_ids)
    for i, x in enumerate(value):
        if type(x) is not int or x < 0:
            raise RequestError(f"{name}[{i}] is {show(x)!r}; document ids are integers >= 0", field=f"{name}[{i}]",
                               value=x)
    return value


SEARCH_FIELDS = ("query", "token_ids", "vectors", "k", "params", "nprobe", "exclude_doc_ids", "tokens", "metadata",
                 "output")


def _check_hits(req: SearchRequest, max_neighbors: int | None, field: str) -> SearchRequest:
    """Queries x k at most ``max_neighbors``: the answer's size is bounded as /v1/neighbors' is."""
    n = req.n
    if max_neighbors is not None and n * req.k > max_neighbors:
        raise RequestError(
            f"{n} queries with {field}={req.k} would return {n} x {req.k} = {n * req.k} hits; the server's limit is "
            f"{max_neighbors} hits (queries x k) per request (max_neighbors): ask with {field} <= "
            f"{max(1, max_neighbors // n)} or send fewer queries per request", field=field, value=req.k,
            limit=max_neighbors)
    return req


def parse_search(body: Any, facts: StoreFacts, *, max_queries: int, max_k: int, max_ids: int,
                 max_neighbors: int | None = None) -> SearchRequest:
    """Check a ``POST /v1/search`` body; queries x k at most ``max_neighbors``."""
    return _check_hits(_parse_search(body, facts, max_queries=max_queries, max_k=max_k, max_ids=max_ids),
                       max_neighbors, "k")


def _parse_search(body: Any, facts: StoreFacts, *, max_queries: int, max_k: int, max_ids: int) -> SearchRequest:
    body = _object(body, SEARCH_FIELDS)
    given = [name for name in ("query", "token_ids", "vectors") if body.get(name) is not None]
    if len(given) != 1:
        raise RequestError("give exactly one of query (text), token_ids or vectors"
                           + (f"; got {', '.join(given)}" if given else ""), field="query",
                           value=given or None)
    k = _int(body, "k", 5, 1, max_k, "neighbours per query")
    params = _params(body)
    exclude = body.get("exclude_doc_ids")
    if exclude is not None and not isinstance(exclude, list):
        raise RequestError(f"exclude_doc_ids is {_type_name(exclude)} {show(exclude)!r}; it must be a list of "
                           "document ids (integers >= 0), e.g. [3, 17], or null / absent to exclude nothing",
                           field="exclude_doc_ids", value=exclude)
    exclude = frozenset(_doc_id_list(exclude or [], "exclude_doc_ids", max_ids))
    output = body.get("output", "hits")
    if output not in ("hits", "ids"):
        raise RequestError(f"output={show(output)!r} must be \"hits\" (chunks with text and continuation) or "
                           "\"ids\" (score and chunk id arrays)", field="output", value=output,
                           limit=["hits", "ids"])
    common = dict(k=k, params=params, exclude=exclude, tokens=_bool(body, "tokens", True),
                  metadata=_bool(body, "metadata", True), output=output)
    name = given[0]
    if name == "query":
        texts, single = _texts(body["query"], "query", max_queries)
        return SearchRequest(single=single, texts=texts, **common)
    if name == "vectors":
        vectors, single = _vectors(body["vectors"], facts, max_queries)
        return SearchRequest(single=single, vectors=vectors, **common)
    value = body["token_ids"]
    if not isinstance(value, list) or not value:
        raise RequestError("token_ids must be a list of token ids (one query chunk) or a list of such lists, not "
                           f"{_type_name(value)}", field="token_ids", value=value)
    single = not isinstance(value[0], list)
    rows = [value] if single else value
    if len(rows) > max_queries:
        raise RequestError(f"token_ids holds {len(rows)} queries; the server's limit is {max_queries} per request "
                           "(max_queries): split it", field="token_ids", value=len(rows), limit=max_queries)
    out = []
    for i, row in enumerate(rows):
        where = "token_ids" if single else f"token_ids[{i}]"
        if not isinstance(row, list) or not 1 <= len(row) <= facts.chunk_tokens:
            got = f"{len(row)} ids" if isinstance(row, list) else _type_name(row)
            raise RequestError(f"{where} has {got}; a query chunk holds 1 to {facts.chunk_tokens} token ids "
                               "(chunk_tokens); for longer sequences use /v1/neighbors", field=where,
                               value=len(row) if isinstance(row, list) else row, limit=[1, facts.chunk_tokens])
        arr = _int_matrix(row, where, flat=True)[0]
        _check_vocab(arr, where, facts.vocab_size)
        out.append(arr)
    return SearchRequest(single=single, token_rows=out, **common)


COMPAT_FIELDS = ("query", "n_docs", "nprobe", "domains")


def parse_compat_search(body: Any, facts: StoreFacts, *, max_queries: int, max_k: int,
                        max_neighbors: int | None = None) -> SearchRequest:
    """Check a massive-serve style ``POST /search`` body (``query``, ``n_docs``, ``nprobe``; ``domains`` ignored);
    queries x n_docs at most ``max_neighbors``."""
    body = _object(body, COMPAT_FIELDS)
    if body.get("query") is None:
        raise RequestError("query is required: a string or a list of strings", field="query")
    texts, single = _texts(body["query"], "query", max_queries)
    k = _int(body, "n_docs", 1, 1, max_k, "passages per query")
    return _check_hits(SearchRequest(single=single, texts=texts, k=k, params=_params(body), tokens=False,
                                     metadata=False), max_neighbors, "n_docs")


NEIGHBORS_FIELDS = ("token_ids", "k", "exclude_doc_ids", "label_token", "tail")


def parse_neighbors(body: Any, facts: StoreFacts, *, max_queries: int, max_k: int, max_ids: int,
                    max_neighbors: int | None = None) -> NeighborsRequest:
    """Check a ``POST /v1/neighbors`` body: ``token_ids`` (L,) or (B, L), ``k``, ``exclude_doc_ids`` per row,
    ``label_token`` and ``tail`` (as ``Store.neighbors``); B x C x k at most ``max_neighbors``."""
    body = _object(body, NEIGHBORS_FIELDS)
    value = body.get("token_ids")
    if not isinstance(value, list) or not value or (isinstance(value[0], list) and not value[0]):
        raise RequestError("token_ids must be a non-empty list of token ids (L,) or a list of equal-length rows "
                           f"(B, L), not {_type_name(value) if not isinstance(value, list) else 'an empty list'}",
                           field="token_ids", value=value)
    label_token = _bool(body, "label_token", False)
    tail = body.get("tail", "query")
    if tail is None:
        tail = "query"
    if tail not in TAILS:
        raise RequestError(f"tail={show(tail)!r} must be one of {', '.join(map(repr, TAILS))}: query the last "
                           "ragged chunk, drop it, or give it an empty (padded) slot", field="tail", value=tail,
                           limit=list(TAILS))
    arr = _int_matrix(value, "token_ids")
    b, length = arr.shape
    if label_token and length < 2:
        raise RequestError(f"rows of {length} token with label_token=true hold no input token; a training row is "
                           "L + 1 tokens (inputs, then the last label)", field="label_token", value=True,
                           limit="rows of >= 2 tokens")
    inputs = length - label_token
    t = facts.chunk_tokens
    c = inputs // t if tail == "drop" else -(-inputs // t)
    if b * c > max_queries:
        raise RequestError(f"token_ids make {b} x {c} = {b * c} query chunks of {t} tokens; the "
                           f"server's limit is {max_queries} per request (max_queries): split the batch",
                           field="token_ids", value=[b, length], limit=max_queries)
    _check_vocab(arr, "token_ids", facts.vocab_size)
    k = _int(body, "k", 2, 1, max_k, "neighbours per chunk")
    if max_neighbors is not None and b * c * k > max_neighbors:
        mib = b * c * k * 2 * t * 8 / (1 << 20)
        raise RequestError(
            f"token_ids make {b} x {c} = {b * c} query chunks; with k={k} the answer would hold {b * c} x {k} = "
            f"{b * c * k} neighbours ({mib:.1f} MiB of int64 tokens); the server's limit is {max_neighbors} "
            f"neighbours (B x C x k) per request (max_neighbors): ask with k <= {max(1, max_neighbors // (b * c))} "
            f"or send fewer rows per request", field="k", value=k, limit=max_neighbors)
    exclude = body.get("exclude_doc_ids")
    rows = None
    if exclude is not None:
        if not isinstance(exclude, list) or len(exclude) != b:
            raise RequestError(f"exclude_doc_ids must be a list with one entry per row ({b} rows): a doc id, a list "
                               "of doc ids, or null", field="exclude_doc_ids",
                               value=len(exclude) if isinstance(exclude, list) else exclude, limit=b)
        rows = []
        total = 0
        for i, entry in enumerate(exclude):
            if entry is None:
                rows.append(set())
            elif type(entry) is int and entry >= 0:
                rows.append({entry})
            elif isinstance(entry, list):
                rows.append(set(_doc_id_list(entry, f"exclude_doc_ids[{i}]", max_ids)))
            else:
                hint = " (null excludes nothing for this row)" if type(entry) is int else ""
                raise RequestError(f"exclude_doc_ids[{i}] is {_type_name(entry)} {show(entry)!r}; each row's entry "
                                   f"is a document id (an integer >= 0), a list of them, or null{hint}",
                                   field=f"exclude_doc_ids[{i}]", value=entry)
            total += len(rows[-1])
        if total > max_ids:
            raise RequestError(f"exclude_doc_ids holds {total} ids in all; the server's limit is {max_ids} (max_ids)",
                               field="exclude_doc_ids", value=total, limit=max_ids)
    return NeighborsRequest(tokens=arr, k=k, exclude=rows, chunks=c, label_token=label_token, tail=tail)


def parse_ids(body: Any, *, max_ids: int, documents: bool) -> IdsRequest:
    """Check a ``POST /v1/chunks`` (``ids``) or ``/v1/documents`` (``ids``, ``text``) body."""
    body = _object(body, ("ids", "text") if documents else ("ids",))
    ids = body.get("ids")
    if not isinstance(ids, list):
        raise RequestError(f"ids must be a list of integer ids, not {_type_name(ids)}", field="ids", value=ids)
    if len(ids) > max_ids:
        raise RequestError(f"ids holds {len(ids)} ids; the server's limit is {max_ids} per request (max_ids)",
                           field="ids", value=len(ids), limit=max_ids)
    for i, x in enumerate(ids):
        if type(x) is not int or x < 0:
            raise RequestError(f"ids[{i}] is {show(x)!r}; ids are integers >= 0", field=f"ids[{i}]", value=x)
    return IdsRequest(ids=ids, text=_bool(body, "text", True) if documents else True)
