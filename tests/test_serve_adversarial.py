"""retrostore serve under hostile input (issue 18, adversarial review).

Each test documents one defect found by attacking a real server (subprocess on a
free 127.0.0.1 port, as tests/test_serve.py starts it); they were strict xfails
until the library was fixed, and now guard against regressions.
"""

from __future__ import annotations

import http.server
import inspect
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest

import retrostore
from retrostore.serve.errors import ServerError, ServerUnavailableError

pytest.importorskip("starlette", reason="retrostore serve needs the serve extra: pip install '.[test,serve]'")

import httpx

import _serving

QUERY = "decode base64 encoded data back into bytes"


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


def test_lone_surrogate_in_query_is_a_400(server):
    for path, raw in [("/v1/search", b'{"query": "a\\ud83d"}'),
                      ("/v1/search", b'{"query": ["ok", "\\udfff"]}'),
                      ("/search", b'{"query": "\\ud800"}')]:
        res = _post(server, path, raw)
        assert res.status_code == 400, (path, raw, res.status_code, res.text[:200])
        assert _error(res)["field"].startswith("query")


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


def test_vector_value_beyond_float32_names_the_element(server):
    res = _post(server, "/v1/search", _vector_with_last("1e39"))
    assert res.status_code == 400
    err = _error(res)
    assert err["field"] == "vectors[383]", err


def test_huge_integer_in_vector_is_a_400(server, remote, local):
    res = _post(server, "/v1/search", _vector_with_last("1" + "0" * 400))
    assert res.status_code == 400, (res.status_code, res.text[:200])
    assert _error(res)["field"] == "vectors[383]"
    _still_serving(remote, local)


def test_exclude_doc_ids_of_the_wrong_type_is_refused(server):
    for value in (0, False, {}, ""):
        res = _post(server, "/v1/search", json.dumps({"query": QUERY, "k": 3, "exclude_doc_ids": value}).encode())
        assert res.status_code == 400, (value, res.status_code)
        assert _error(res)["field"] == "exclude_doc_ids"


def test_neighbors_answer_size_is_bounded_by_a_limit(built_store):
    body = json.dumps({"token_ids": [[1012] * 64] * 32, "k": 1000}).encode()
    with _serving.serving(built_store, "--max-queries", "32", "--max-k", "1000") as srv:
        res = _post(srv, "/v1/neighbors", body, headers={"Content-Type": "application/json",
                                                         "Accept": "application/x-npy"})
        assert len(body) < 20_000
        assert 400 <= res.status_code < 500, (res.status_code, len(res.content))
        assert _error(res)["field"] in ("k", "token_ids")


# -- the client -------------------------------------------------------------------------------------------------


def test_client_takes_numpy_integers_as_store_does(remote, local):
    k = np.int64(3)
    assert [h.chunk_id for h in remote.search(QUERY, k=k)] == [h.chunk_id for h in local.search(QUERY, k=k)]
    vec = local.embedder.embed([QUERY])
    assert np.array_equal(remote.search_vectors(vec, k=k)[1], local.search_vectors(vec, k=k)[1])


def test_client_empty_batches_return_what_store_returns(remote, local):
    vec = np.zeros((0, 384), np.float32)
    (gs, gi), (ws, wi) = remote.search_vectors(vec, k=3), local.search_vectors(vec, k=3)
    assert gs.shape == ws.shape and gi.shape == wi.shape and gs.dtype == ws.dtype and gi.dtype == wi.dtype
    rows = np.zeros((0, 64), np.int64)
    got, want = remote.neighbors(rows, k=2), local.neighbors(rows, k=2)
    assert got.tokens.shape == want.tokens.shape and got.chunk_ids.shape == want.chunk_ids.shape


def test_client_neighbors_has_the_store_signature(remote, local):
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(type(remote).neighbors) == params(retrostore.Store.neighbors)
    row = local.get_chunks([5])[0].tokens
    got, want = remote.neighbors(row, k=2, label_token=True), local.neighbors(row, k=2, label_token=True)
    assert np.array_equal(got.tokens, want.tokens)


def test_client_refuses_what_store_refuses(remote, local):
    """helper-27: the client sent label_token="yes" as true, tail=None as the default, complex vectors
    as their real part and 1e39 as inf, and let exclude_doc_ids=1 raise a bare TypeError."""
    row = local.get_chunks([5])[0].tokens
    vec = local.embedder.embed([QUERY])
    calls = [
        lambda s: s.neighbors(row, k=2, label_token="yes"),
        lambda s: s.neighbors(row, k=2, label_token=1),
        lambda s: s.neighbors(row, k=2, tail=None),
        lambda s: s.neighbors([row], k=2, exclude_doc_ids=1),
        lambda s: s.neighbors([row], k=2, exclude_doc_ids=[-1]),
        lambda s: s.search_vectors(vec.astype(complex), k=2),
        lambda s: s.search_vectors(np.full((1, 384), 1e39), k=2),
    ]
    gen = [s.neighbors([row], k=2, exclude_doc_ids=(d for d in [0])).chunk_ids for s in (local, remote)]
    assert np.array_equal(*gen)  # a generator is read once (helper-30: the client used it up, then sent [])
    for i, call in enumerate(calls):
        with pytest.raises(retrostore.InvalidInputError) as want:
            call(local)
        with pytest.raises(retrostore.InvalidInputError) as got:
            call(remote)
        assert str(got.value) == str(want.value), (i, got.value, want.value)


class _NotRetrostore(http.server.BaseHTTPRequestHandler):
    """Some other HTTP service answering 200 to everything."""

    def do_GET(self):
        if self.path == "/trickle/healthz":  # helper-40: a body a byte a second held the client for ever
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(30):
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
            return
        if self.path == "/huge/healthz":  # a huge Content-Length made http.client raise MemoryError
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(10**11))
            self.end_headers()
            self.wfile.write(b"{}")
            return
        body, kind = {"/json/healthz": (b'{"status": "ok"}', "application/json"),
                      "/bool/healthz": (b'{"status": "ok", "version": true, "len": 5}', "application/json"),
                      "/fake/healthz": (b'{"status": "ok", "version": 1, "len": 5}', "application/json"),
                      "/typed/healthz": (b'{"status": "ok", "version": 1, "len": 5}', "application/json"),
                      "/list/healthz": (b"[1, 2]", "application/json"),
                      "/deep/healthz": (b"[" * 100_000 + b"]" * 100_000, "application/json")}.get(
                          self.path, (b"<html>hi</html>",
                                                                                       "text/html"))
        self.send_response(200)
        self.send_header("X-Retrostore-Version", "1")
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # "/fake": passes the health check, then answers nonsense (another program, a proxy)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = {"/fake/v1/chunks": b'{"chunks": "zzz"}', "/fake/v1/search": b'{"results": 5}',
                "/typed/v1/search": b'{"results": [[{"chunk_id": "a", "doc_id": null, "position": [], "score": "x", '
                                    b'"text": 5}]]}',
                "/typed/v1/documents": b'{"documents": []}'}.get(self.path, b"{}")
        self.send_response(200)
        self.send_header("X-Retrostore-Version", "abc" if self.path == "/fake/v1/documents" else "1")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_connect_to_something_else_raises_a_retrostore_error():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _NotRetrostore)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        for url in (base + "/html", base + "/json", base + "/list", base + "/bool", "http://256.0.0.1:8808"):
            with pytest.raises(retrostore.RetrostoreError):
                retrostore.connect(url, timeout_s=5)
        # helper-40: a raw RecursionError; MemoryError; a wait without end despite timeout_s
        for path, match in [("/deep", "nested too deeply"), ("/huge", "announced an answer of 100,000,000,000 bytes"),
                            ("/trickle", r"did not finish its answer within timeout_s=1 s")]:
            t0 = time.monotonic()
            with pytest.raises(ServerUnavailableError, match=match) as got:
                retrostore.connect(base + path, timeout_s=1)
            assert base + path in str(got.value) and time.monotonic() - t0 < 4, path
        fake = retrostore.connect(base + "/fake", timeout_s=5)  # helper-27: raw TypeError / ValueError
        for call in (lambda: fake.get_chunks([1]), lambda: fake.search("x"), lambda: fake.get_document(0),
                     lambda: fake.neighbors([1, 2, 3])):
            with pytest.raises(ServerError, match="cannot read|not a version number"):
                call()
        typed = retrostore.connect(base + "/typed", timeout_s=5)  # helper-40: wrong types came back as they were
        with pytest.raises(ServerError, match="a hit of the wrong types"):
            typed.search("x")
        with pytest.raises(ServerError, match="0 documents for 1 ids"):
            typed.get_metadata([0])
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_connect_to_a_path_or_an_address_without_scheme_names_the_fix(built_store):
    with pytest.raises(retrostore.InvalidInputError, match=r"not an http:// or https:// URL.*'http://127.0.0.1:9'"):
        retrostore.connect("127.0.0.1:9")
    with pytest.raises(retrostore.InvalidInputError, match="a store directory opens with retrostore.open"):
        retrostore.connect(str(built_store))


def test_serve_on_a_port_in_use_is_refused_before_it_starts(built_store):
    """A second server on a busy port said "serving ... on" and died in uvicorn with exit 3."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "retrostore", "serve", str(built_store), "--port", str(port),
                              "--no-verify"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert f"port {port} on 127.0.0.1 is in use" in res.stderr and "--port" in res.stderr
    assert "serving" not in res.stderr + res.stdout


# -- units: the batcher's isolation and content negotiation ---------------------------------------------------


class _FlakyEngine:
    """An engine whose batched search raises a non-library error when any payload is "bad"."""

    def __init__(self):
        from retrostore.serve import ServeSettings

        self.settings = ServeSettings(store="unused", follow=False, batch_window_ms=0)
        self.version, self.len, self.calls = 7, 1, []

    def open(self):
        pass

    def close(self):
        pass

    def maybe_refresh(self):
        return False

    def search(self, payloads):
        self.calls.append(list(payloads))
        if "bad" in payloads:
            raise TypeError("TextInputSequence must be str")
        return [f"answer to {p}" for p in payloads]

    neighbors = search


def test_batcher_answers_each_request_of_a_failed_batch_alone():
    from retrostore.serve.batching import Batcher, Job
    from retrostore.serve.metrics import Metrics

    engine = _FlakyEngine()
    batcher = Batcher(engine, Metrics())
    answers = {}
    for p in ("a", "bad", "b"):  # queued before the thread starts, so they form one batch
        batcher.submit(Job("search", p, 1, lambda r, e, v, p=p: answers.__setitem__(p, (r, e, v))))
    batcher.start()
    try:
        for _ in range(200):
            if len(answers) == 3:
                break
            threading.Event().wait(0.05)
    finally:
        batcher.stop()
    assert engine.calls[0] == ["a", "bad", "b"]  # batched first, then each alone
    assert answers["a"] == ("answer to a", None, 7) and answers["b"] == ("answer to b", None, 7)
    result, exc, _ = answers["bad"]
    assert result is None and isinstance(exc, TypeError)


@pytest.mark.parametrize("accept, npy", [("application/x-npy", True), ("application/x-npy;q=0", False),
                                         ("application/json, application/x-npy;q=0.5", False),
                                         ("application/json;q=0.5, application/x-npy", True),
                                         ("*/*", False), (None, False), ("application/x-npy;q=bogus", False)])
def test_accept_header_negotiation(accept, npy):
    from retrostore.serve.wire import wants_npy

    assert wants_npy(accept) is npy


def test_client_sends_numpy_values_in_params_and_ids(remote, local):
    params = {"nprobe": np.int32(4)}
    got = remote.search(QUERY, k=np.int32(2), params=params)
    assert [h.chunk_id for h in got] == [h.chunk_id for h in local.search(QUERY, k=2)]
    assert [c.chunk_id for c in remote.get_chunks(np.array([3, 4]))] == [3, 4]
    nb = remote.neighbors(np.array([[5, 6, 7]], np.int32), k=np.int64(2), label_token=np.bool_(True))
    assert nb.tokens.shape == local.neighbors([[5, 6, 7]], k=2, label_token=True).tokens.shape


def test_error_values_are_strict_json():
    from retrostore.serve.schema import show

    assert show([float("nan"), {"a": float("inf")}]) == ["nan", {"a": "inf"}]
    assert show(10**400) == "<an integer of about 401 digits>"  # as errors.shown words it in messages
    assert show("a\ud800") == "a?"
    json.dumps(show({"x": [float("-inf")]}), allow_nan=False)


def test_connect_refuses_bad_timeouts_headers_urls_and_proxies(monkeypatch):
    """retrostore.connect's own arguments and the environment's proxy: every mistake is an
    InvalidInputError naming the value (helper-9 found ValueError, OverflowError and urllib3's
    exceptions escaping), credentials in the URL never appear in messages, and a proxy that
    cannot be reached is named with the variable it came from."""
    for bad in (0, -1, float("nan"), float("inf"), True, "5"):
        with pytest.raises(retrostore.InvalidInputError, match="timeout_s="):
            retrostore.connect("http://127.0.0.1:9", timeout_s=bad)
    for bad in ({"X": "a\nb"}, {"X Y": "a"}, {"X": 1}, [("X", "a")], {"X-A": "é☃"}, {"X-é": "a"}):  # (helper-27)
        with pytest.raises(retrostore.InvalidInputError, match="header"):
            retrostore.connect("http://127.0.0.1:9", headers=bad)
    for url in ("http://127.0.0.1:9/?x=1", "http://127.0.0.1:9#top"):
        with pytest.raises(retrostore.InvalidInputError, match="query or fragment"):
            retrostore.connect(url)
    with pytest.raises(retrostore.RetrostoreError) as info:
        retrostore.connect("http://user:secret@127.0.0.1:9", timeout_s=5)
    assert "secret" not in str(info.value)
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("http_proxy", "socks5://127.0.0.1:9")
    with pytest.raises(retrostore.InvalidInputError, match="http_proxy='socks5://127.0.0.1:9'.*no_proxy"):
        retrostore.connect("http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    with pytest.raises(retrostore.RetrostoreError, match="through the proxy http://127.0.0.1:9 .from http_proxy"):
        retrostore.connect("http://127.0.0.1:8", timeout_s=5)
    monkeypatch.delenv("http_proxy")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    with pytest.raises(retrostore.RetrostoreError, match="through the proxy"):
        retrostore.connect("http://127.0.0.1:8", timeout_s=5)


def test_no_proxy_ranges_bypass_the_proxy(monkeypatch):
    """no_proxy=127.0.0.0/8 (a CIDR range, as requests and curl read it) sends 127.x hosts direct;
    a name or an address outside the range still goes through the proxy."""
    from retrostore.serve.client import _proxy_for

    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "example.org, 127.0.0.0/8,fd00::/8, not-a-range/x")
    assert _proxy_for("http", "127.0.0.1") is None
    assert _proxy_for("http", "127.9.9.9") is None
    assert _proxy_for("http", "[fd00::1]") is None
    assert _proxy_for("http", "docs.example.org") is None  # urllib's suffix rule
    assert _proxy_for("http", "10.0.0.1") == ("http_proxy", "http://proxy.example:3128")
    assert _proxy_for("http", "server.local") == ("http_proxy", "http://proxy.example:3128")
    with pytest.raises(retrostore.RetrostoreError) as info:  # tried directly: nothing listens on port 9
        retrostore.connect("http://127.0.0.1:9", timeout_s=5)
    assert "proxy" not in str(info.value), info.value


def test_header_deadline_without_the_servers_settings_takes_their_default(monkeypatch):
    """The protocol given to a uvicorn the user runs (no RETROSTORE_SERVE_SETTINGS in its
    environment) raised TypeError at every connection and every response: ServeSettings() needs a
    store. It takes the settings' default body_timeout_s instead."""
    from retrostore.serve import protocol
    from retrostore.serve.settings import SETTINGS_ENV, ServeSettings

    monkeypatch.delenv(SETTINGS_ENV, raising=False)
    monkeypatch.setattr(protocol, "_TIMEOUT", [])
    assert protocol.header_timeout_s() == ServeSettings(store="x").body_timeout_s == 30.0
