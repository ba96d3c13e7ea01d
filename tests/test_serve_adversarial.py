"""retrostore serve under hostile input (issue 18, adversarial review).

Each test documents one defect found by attacking a real server (subprocess on a
free 127.0.0.1 port, as tests/test_serve.py starts it) and is marked
``xfail(strict=True)`` until the library is fixed: when a fix lands the test
passes, strict xfail turns that into a failure, and the marker comes off.
"""

from __future__ import annotations

import http.server
import inspect
import json
import threading
from collections import Counter

import numpy as np
import pytest

import retrostore

pytest.importorskip("starlette", reason="retrostore serve needs the serve extra: pip install '.[test,serve]'")

import httpx

import _serving

QUERY = "decode base64 encoded data back into bytes"
#: The limits of tests/test_serve.py's server.
LIMITS = ("--max-body-bytes", "65536", "--max-queries", "40", "--max-k", "50")


@pytest.fixture(scope="module")
def server(built_store):
    with _serving.serving(built_store, *LIMITS) as srv:
        yield srv


@pytest.fixture(scope="module")
def remote(server):
    with retrostore.connect(server.url) as client:
        yield client


@pytest.fixture(scope="module")
def local(built_store, embedder):
    with retrostore.open(built_store, embedder=embedder) as st:
        yield st


def _post(server, path, raw: bytes, headers=None):
    return httpx.post(server.url + path, content=raw, headers=headers or {"Content-Type": "application/json"},
                      timeout=60)


def _error(res) -> dict:
    """The JSON error of a refusal (fails the test when the answer is not one)."""
    assert res.headers.get("content-type", "").startswith("application/json"), (res.status_code, res.text[:200])
    return res.json()["error"]


def _vector_with_last(text: str) -> bytes:
    return b'{"vectors": [' + b"0.1, " * 383 + text.encode() + b"]}"


def _still_serving(remote, local):
    assert [h.chunk_id for h in remote.search(QUERY, k=3)] == [h.chunk_id for h in local.search(QUERY, k=3)]


# -- the server ---------------------------------------------------------------------------------------------


@pytest.mark.xfail(strict=True, reason="a refused value holding NaN/Infinity inside a list or object is echoed in "
                   "error.value; Starlette's JSONResponse (allow_nan=False) then raises inside the error handler, so "
                   "the client gets a text/plain 500 'Internal Server Error' (not counted in /metrics) instead of a "
                   "400 JSON error naming the field")
def test_nan_inside_a_refused_value_is_a_400_json_error(server, remote, local):
    # Python's json (the server's parser) accepts NaN and Infinity; show() only sanitises a top-level float.
    for raw, field in [(b'{"query": "x", "k": [NaN]}', "k"),
                       (b'{"query": "x", "kk": [Infinity]}', "kk"),
                       (b'{"query": {"a": NaN}}', "query"),
                       (b'{"query": "x", "params": {"nprobe": [NaN]}}', "params.nprobe")]:
        res = _post(server, "/v1/search", raw)
        assert res.status_code == 400, (raw, res.status_code, res.text[:200])
        assert _error(res)["field"] == field
    _still_serving(remote, local)


@pytest.mark.xfail(strict=True, reason="a lone UTF-16 surrogate in query text (valid JSON: \"\\ud800\") reaches the "
                   "tokenizer, which raises TypeError ('TextInputSequence must be str'): a 500 InternalError instead "
                   "of a 400 naming query")
def test_lone_surrogate_in_query_is_a_400(server):
    for path, raw in [("/v1/search", b'{"query": "a\\ud83d"}'),
                      ("/v1/search", b'{"query": ["ok", "\\udfff"]}'),
                      ("/search", b'{"query": "\\ud800"}')]:
        res = _post(server, path, raw)
        assert res.status_code == 400, (path, raw, res.status_code, res.text[:200])
        assert _error(res)["field"].startswith("query")


@pytest.mark.xfail(strict=True, reason="the lone-surrogate TypeError is raised by the batch's one embedder call and "
                   "is not a RetrostoreError, so Batcher._execute fails every request of the batch with 500: one bad "
                   "client makes the concurrent good searches fail (measured: 114 of 120 good requests answered 500)")
def test_one_bad_text_query_never_fails_other_requests_in_its_batch(server):
    statuses: Counter = Counter()

    def good(i):
        with httpx.Client(timeout=60) as c:
            for j in range(8):
                r = c.post(server.url + "/v1/search", json={"query": f"{QUERY} {i} {j}", "k": 2, "tokens": False})
                statuses[r.status_code] += 1

    def bad():
        with httpx.Client(timeout=60) as c:
            for _ in range(20):
                c.post(server.url + "/v1/search", content=b'{"query": "x \\ud800"}',
                       headers={"Content-Type": "application/json"})

    threads = [threading.Thread(target=good, args=(i,)) for i in range(6)] + [threading.Thread(target=bad)
                                                                              for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert statuses == Counter({200: 48}), statuses


@pytest.mark.xfail(strict=True, reason="a vector value finite as float64 but beyond float32 (1e39) passes the schema "
                   "check, becomes inf in astype(float32) and is refused by the store, reported as field 'params' "
                   "with value {} instead of the vector element, its value and the float32 range")
def test_vector_value_beyond_float32_names_the_element(server):
    res = _post(server, "/v1/search", _vector_with_last("1e39"))
    assert res.status_code == 400
    err = _error(res)
    assert err["field"] == "vectors[383]", err


@pytest.mark.xfail(strict=True, reason="a vector value that is a huge JSON integer (10**400) passes the isinstance "
                   "check; np.array(rows, float64) raises OverflowError in the handler: a 500 InternalError instead of "
                   "a 400 naming vectors[383]")
def test_huge_integer_in_vector_is_a_400(server, remote, local):
    res = _post(server, "/v1/search", _vector_with_last("1" + "0" * 400))
    assert res.status_code == 400, (res.status_code, res.text[:200])
    assert _error(res)["field"] == "vectors[383]"
    _still_serving(remote, local)


@pytest.mark.xfail(strict=True, reason="parse_search reads `body.get('exclude_doc_ids') or []`, so a falsy non-list "
                   "(0, false, {}, \"\") is silently taken as 'exclude nothing' and answered 200, whereas "
                   "exclude_doc_ids: 0 reads as 'exclude document 0' (neighbors accepts a bare id per row); a wrong "
                   "type must be a 400 naming exclude_doc_ids")
def test_exclude_doc_ids_of_the_wrong_type_is_refused(server):
    for value in (0, False, {}, ""):
        res = _post(server, "/v1/search", json.dumps({"query": QUERY, "k": 3, "exclude_doc_ids": value}).encode())
        assert res.status_code == 400, (value, res.status_code)
        assert _error(res)["field"] == "exclude_doc_ids"


@pytest.mark.xfail(strict=True, reason="no limit bounds k x B x C: max_k and max_queries are checked separately, so "
                   "a ~12 KB neighbours request (32 chunks, k=1000, both within the limits) makes the server build "
                   "and send 37 MB of arrays (measured in JSON: 34 MB answer, +200 MB server RSS; with the default "
                   "limits, 1024 chunks x k=1000 is a 1 GB tokens array, several GB as JSON); such a request should "
                   "be refused with a 4xx naming the limit")
def test_neighbors_answer_size_is_bounded_by_a_limit(built_store):
    body = json.dumps({"token_ids": [[1012] * 64] * 32, "k": 1000}).encode()
    with _serving.serving(built_store, "--max-queries", "32", "--max-k", "1000") as srv:
        res = _post(srv, "/v1/neighbors", body, headers={"Content-Type": "application/json",
                                                         "Accept": "application/x-npy"})
        assert len(body) < 20_000
        assert 400 <= res.status_code < 500, (res.status_code, len(res.content))
        assert _error(res)["field"] in ("k", "token_ids")


# -- the client -------------------------------------------------------------------------------------------------


@pytest.mark.xfail(strict=True, reason="RemoteStore sends k and params through json.dumps, which cannot encode numpy "
                   "integers: search(q, k=np.int64(3)) raises a bare TypeError where Store.search answers")
def test_client_takes_numpy_integers_as_store_does(remote, local):
    k = np.int64(3)
    assert [h.chunk_id for h in remote.search(QUERY, k=k)] == [h.chunk_id for h in local.search(QUERY, k=k)]
    vec = local.embedder.embed([QUERY])
    assert np.array_equal(remote.search_vectors(vec, k=k)[1], local.search_vectors(vec, k=k)[1])


@pytest.mark.xfail(strict=True, reason="Store.search_vectors of (0, dim) and Store.neighbors of (0, L) return empty "
                   "arrays; RemoteStore sends [] and the server refuses it, so the client raises InvalidInputError "
                   "(search([]) is special-cased in the client, these are not)")
def test_client_empty_batches_return_what_store_returns(remote, local):
    vec = np.zeros((0, 384), np.float32)
    (gs, gi), (ws, wi) = remote.search_vectors(vec, k=3), local.search_vectors(vec, k=3)
    assert gs.shape == ws.shape and gi.shape == wi.shape and gs.dtype == ws.dtype and gi.dtype == wi.dtype
    rows = np.zeros((0, 64), np.int64)
    got, want = remote.neighbors(rows, k=2), local.neighbors(rows, k=2)
    assert got.tokens.shape == want.tokens.shape and got.chunk_ids.shape == want.chunk_ids.shape


@pytest.mark.xfail(strict=True, reason="Store.neighbors takes label_token= and tail=; RemoteStore.neighbors (and "
                   "/v1/neighbors) take neither, so code that passes them fails with TypeError on the remote store "
                   "(the issue asks for the same signatures)")
def test_client_neighbors_has_the_store_signature(remote, local):
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(type(remote).neighbors) == params(retrostore.Store.neighbors)
    row = local.get_chunks([5])[0].tokens
    got, want = remote.neighbors(row, k=2, label_token=True), local.neighbors(row, k=2, label_token=True)
    assert np.array_equal(got.tokens, want.tokens)


class _NotRetrostore(http.server.BaseHTTPRequestHandler):
    """Some other HTTP service answering 200 to everything."""

    def do_GET(self):
        body, kind = {"/json/healthz": (b'{"status": "ok"}', "application/json"),
                      "/list/healthz": (b"[1, 2]", "application/json")}.get(self.path, (b"<html>hi</html>",
                                                                                       "text/html"))
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.xfail(strict=True, reason="connect() to a server that is not retrostore's but answers 200 raises bare "
                   "JSONDecodeError / KeyError('version') / TypeError, and an invalid host raises httpx.InvalidURL, "
                   "instead of a RetrostoreError (ServerUnavailableError) saying no retrostore server answers there")
def test_connect_to_something_else_raises_a_retrostore_error():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _NotRetrostore)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        for url in (base + "/html", base + "/json", base + "/list", "http://256.0.0.1:8808"):
            with pytest.raises(retrostore.RetrostoreError):
                retrostore.connect(url, timeout_s=5)
    finally:
        httpd.shutdown()
        httpd.server_close()
