"""retrostore serve: a real server in a subprocess on 127.0.0.1, queried with the client and raw
HTTP; every answer is compared with the embedded Store on the same store."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import retrostore

from retrostore import InvalidInputError

pytest.importorskip("starlette", reason="retrostore serve needs the serve extra: pip install '.[test,serve]'")

import httpx
from prometheus_client.parser import text_string_to_metric_families
from retrostore.serve import ServerUnavailableError
from retrostore.serve import client as client_module

import _serving

QUERIES = [
    "decode base64 encoded data back into bytes",
    "how do I upload a package to the index",
    "run a function in a pool of threads",
    "the license and copyright of python",
]


def _post(server, path, body=None, *, content=None, headers=None):
    if content is None:
        content = json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers=headers or {"Content-Type": "application/json"},
                      timeout=30)


def _same_hits(got, want):
    assert [h.chunk_id for h in got] == [h.chunk_id for h in want]
    for g, w in zip(got, want):
        assert (g.doc_id, g.position, g.text, g.continuation_text) == (w.doc_id, w.position, w.text,
                                                                        w.continuation_text)
        assert g.score == pytest.approx(w.score, abs=1e-5)
        assert np.array_equal(g.tokens, w.tokens) and g.tokens.dtype == np.int64
        assert np.array_equal(g.continuation_tokens, w.continuation_tokens)


def test_client_search_equals_embedded(remote, local):
    for k in (1, 3, 10):
        for q in QUERIES:
            _same_hits(remote.search(q, k=k), local.search(q, k=k))
        got, want = remote.search(QUERIES, k=k), local.search(QUERIES, k=k)
        assert len(got) == len(want) == len(QUERIES)
        for g, w in zip(got, want):
            _same_hits(g, w)
    assert remote.search([], k=3) == local.search([], k=3) == []
    assert remote.version == local.version


def test_client_sends_a_request_in_one_write(server, local, monkeypatch):
    """Headers and body leave in one send (urllib3 2 writes them in two); a body over the limit is
    sent as urllib3 sends it, and both are answered as the embedded store answers."""
    sends = []
    real = http.client.HTTPConnection.send
    monkeypatch.setattr(http.client.HTTPConnection, "send", lambda self, data: (sends.append(bytes(data)),
                                                                                 real(self, data))[1])
    with retrostore.connect(server.url) as remote:
        sends.clear()
        _same_hits(remote.search(QUERIES[0], k=3), local.search(QUERIES[0], k=3))
        assert len(sends) == 1 and sends[0].startswith(b"POST /v1/search ") and QUERIES[0].encode() in sends[0]
        sends.clear()
        assert remote.info()["version"] == local.version  # no body: the headers alone
        assert len(sends) == 1 and sends[0].startswith(b"GET /v1/info ")
        monkeypatch.setattr(client_module, "ONE_WRITE_MAX", 16)
        sends.clear()
        _same_hits(remote.search(QUERIES[1], k=3), local.search(QUERIES[1], k=3))
        assert len(sends) == 2 and sends[0].endswith(b"\r\n\r\n") and QUERIES[1].encode() in sends[1]


def test_raw_http_search_by_text_tokens_and_vectors(server, local):
    body = _post(server, "/v1/search", {"query": QUERIES[0], "k": 4}).json()
    want = local.search(QUERIES[0], k=4)
    assert body["version"] == local.version
    hits = body["results"][0]
    assert [h["chunk_id"] for h in hits] == [h.chunk_id for h in want]
    assert [h["metadata"] for h in hits] == local.get_metadata([h.doc_id for h in want])
    assert [h["continuation_text"] for h in hits] == [h.continuation_text for h in want]

    # token ids: one query chunk per row, embedded as Store.neighbors embeds a chunk
    rows = [c.tokens.tolist() for c in local.get_chunks([3, 40, 70])]
    rows[1] = rows[1][:20]  # a short chunk
    body = _post(server, "/v1/search", {"token_ids": rows, "k": 3, "tokens": False}).json()
    for row, hits in zip(rows, body["results"]):
        want_ids = local.neighbors(np.array([row]), k=3).chunk_ids[0, 0].tolist()
        assert [h["chunk_id"] for h in hits] == want_ids
        assert "tokens" not in hits[0]

    # vectors, answered as hits and as id arrays
    vecs = local.embedder.embed(QUERIES[:2])
    scores, ids = local.search_vectors(vecs, k=5)
    body = _post(server, "/v1/search", {"vectors": vecs.tolist(), "k": 5}).json()
    assert [[h["chunk_id"] for h in r] for r in body["results"]] == ids.tolist()
    body = _post(server, "/v1/search", {"vectors": vecs.tolist(), "k": 5, "output": "ids"}).json()
    assert body["chunk_ids"] == ids.tolist()
    assert np.allclose(body["scores"], scores, atol=1e-6)


def test_client_search_vectors_equals_embedded(remote, local):
    vecs = local.embedder.embed(QUERIES).astype(np.float64)  # float64 is converted, as Store does
    got_s, got_i = remote.search_vectors(vecs, k=6)
    want_s, want_i = local.search_vectors(vecs, k=6)
    assert got_i.dtype == np.int64 and got_s.dtype == np.float32 and got_i.shape == want_i.shape == (4, 6)
    assert np.array_equal(got_i, want_i)
    assert np.allclose(got_s, want_s, atol=1e-6)
    # more than the store holds: -1 padded like the embedded store
    got_s, got_i = remote.search_vectors(vecs[0], k=50)
    want_s, want_i = local.search_vectors(vecs[0], k=50)
    assert np.array_equal(got_i, want_i)


def test_search_params_and_excluded_documents(server, local):
    want = local.search(QUERIES[0], k=3, params={"rerank": 0})
    body = _post(server, "/v1/search", {"query": QUERIES[0], "k": 3, "params": {"rerank": 0}, "nprobe": 4}).json()
    assert [h["chunk_id"] for h in body["results"][0]] == [h.chunk_id for h in want]
    # exclusion: the k best of the store's ranking outside the excluded documents
    excluded = sorted({h.doc_id for h in want[:2]})
    ranking = local.search(QUERIES[0], k=len(local))
    expect = [h.chunk_id for h in ranking if h.doc_id not in excluded][:5]
    body = _post(server, "/v1/search", {"query": QUERIES[0], "k": 5, "exclude_doc_ids": excluded}).json()
    got = body["results"][0]
    assert [h["chunk_id"] for h in got] == expect
    assert not {h["doc_id"] for h in got} & set(excluded)


def test_neighbors_equal_embedded_as_npy_and_json(server, remote, local):
    ids, _ = local.chunker.encode(local.get_document(19).text)
    tokens = np.stack([ids[:256], ids[256:512]])  # (2, 256): four 64-token chunks per row
    for exclude in (None, [19, [19, 3]]):
        want = local.neighbors(tokens, k=2, exclude_doc_ids=exclude)
        got = remote.neighbors(tokens, k=2, exclude_doc_ids=exclude)  # .npy over the wire
        for name in ("tokens", "mask", "chunk_ids", "doc_ids", "scores"):
            g, w = getattr(got, name), getattr(want, name)
            assert g.shape == w.shape and g.dtype == w.dtype, name
            assert np.array_equal(g, w), name
        body = _post(server, "/v1/neighbors", {"token_ids": tokens.tolist(), "k": 2,
                                               "exclude_doc_ids": exclude}).json()
        assert body["shape"] == list(want.tokens.shape) == [2, 4, 2, 128]
        assert body["tokens"] == want.tokens.tolist() and body["mask"] == want.mask.tolist()
        assert body["chunk_ids"] == want.chunk_ids.tolist() and body["doc_ids"] == want.doc_ids.tolist()
    if exclude:
        assert not (got.doc_ids[0] == 19).any()
    # one row (L,) and a ragged tail, as Store.neighbors takes them
    row = ids[:100]
    got, want = remote.neighbors(row, k=3), local.neighbors(row, k=3)
    assert got.tokens.shape == want.tokens.shape == (1, 2, 3, 128)
    assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.chunk_ids, want.chunk_ids)


@pytest.mark.parametrize("kwargs, shape", [({"tail": "drop"}, (2, 1, 2, 128)), ({"tail": "pad"}, (2, 2, 2, 128)),
                                           ({"label_token": True}, (2, 1, 2, 128)),
                                           ({"label_token": True, "tail": "drop"}, (2, 1, 2, 128))])
def test_neighbors_label_token_and_tail_equal_embedded(server, remote, local, kwargs, shape):
    ids, _ = local.chunker.encode(local.get_document(19).text)
    tokens = np.stack([ids[:65], ids[65:130]])  # L = 65: one chunk and one token (the label, or a ragged tail)
    want = local.neighbors(tokens, k=2, **kwargs)
    got = remote.neighbors(tokens, k=2, **kwargs)
    assert want.tokens.shape == shape
    for name in ("tokens", "mask", "chunk_ids", "doc_ids", "scores"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.shape == w.shape and g.dtype == w.dtype and np.array_equal(g, w), name
    body = _post(server, "/v1/neighbors", {"token_ids": tokens.tolist(), "k": 2, **kwargs}).json()
    assert body["shape"] == list(shape) and body["chunk_ids"] == want.chunk_ids.tolist()


def test_neighbors_answers_negotiate_and_name_their_shape(server, local):
    ids, _ = local.chunker.encode(local.get_document(19).text)
    body = {"token_ids": [ids[:640].tolist()] * 4, "k": 10}  # 40 chunks x 10 = 400 neighbours, 51,200 tokens
    for accept in ("application/x-npy;q=0", "application/json, application/x-npy;q=0.5", None):
        res = _post(server, "/v1/neighbors", body, headers={"Content-Type": "application/json",
                                                           **({"Accept": accept} if accept else {})})
        assert res.headers["content-type"].startswith("application/json"), accept
        assert res.headers["X-Retrostore-Shape"] == "4,10,10,128"  # also on a JSON answer big enough to stream
        assert res.json()["shape"] == [4, 10, 10, 128]
    res = _post(server, "/v1/neighbors", body, headers={"Content-Type": "application/json",
                                                       "Accept": "application/json;q=0.9, application/x-npy"})
    assert res.headers["content-type"].startswith("application/x-npy")


def test_chunks_documents_and_info(server, remote, local):
    for g, w in zip(remote.get_chunks([0, 5, 89]), local.get_chunks([0, 5, 89])):
        assert (g.chunk_id, g.doc_id, g.position, g.start, g.text) == (w.chunk_id, w.doc_id, w.position, w.start,
                                                                      w.text)
        assert np.array_equal(g.tokens, w.tokens)
    for doc_id in (0, 7, 19):
        g, w = remote.get_document(doc_id), local.get_document(doc_id)
        assert (g.doc_id, g.text, g.metadata, g.chunk_ids) == (w.doc_id, w.text, w.metadata, w.chunk_ids)
    assert remote.get_metadata([1, 2, 19]) == local.get_metadata([1, 2, 19])
    info, want = remote.info(), local.info()
    server_facts = info.pop("server")
    assert info == want
    assert server_facts["len"] == len(local) == len(remote)
    assert server_facts["max_k"] == 50 and server_facts["max_queries"] == 40
    assert remote.refresh() == local.version


def test_massive_serve_compatible_route(server, local):
    # the request shape of massive-serve's README, sent as its clients send it (requests/curl style)
    body = _post(server, "/search", {"query": QUERIES[1], "n_docs": 2, "domains": "demo"}).json()
    want = local.search([QUERIES[1]], k=2)[0]
    res = body["results"]["results"]
    assert body["n_docs"] == 2 and body["query"] == QUERIES[1]
    assert res["IDs"] == [[[h.doc_id, h.chunk_id] for h in want]]
    assert res["passages"] == [[h.text for h in want]]
    assert np.allclose(res["scores"], [[h.score for h in want]], atol=1e-6)
    body = _post(server, "/search", {"query": QUERIES[:3], "n_docs": 3, "nprobe": 8}).json()
    assert [[i[1] for i in row] for row in body["results"]["results"]["IDs"]] == \
        [[h.chunk_id for h in hits] for hits in local.search(QUERIES[:3], k=3)]


BAD = [
    # (path, raw body, status, field, words in the message)
    ("/v1/search", b'{"query": "x", "k": ', 400, "body", "malformed JSON"),
    ("/v1/search", b'{"query": "x", "k": ' + b"9" * 5000 + b"}", 400, "body", "more than 4,300 digits"),
    ("/v1/chunks", b'{"ids": [' + b"9" * 5000 + b"]}", 400, "body", "more than 4,300 digits"),
    ("/v1/search", b'{"query": "x", "params": {"nprobe": 1' + b"0" * 400 + b"}}", 400, "params.nprobe",
     "nprobe"),  # helper-20: a 500 (math.isfinite of a 401-digit int)
    ("/v1/search", b"", 400, "body", "empty"),
    ("/v1/search", b'["a list"]', 400, "body", "JSON object"),
    ("/v1/search", b'{"query": 5}', 400, "query", "string"),
    ("/v1/search", b'{"query": ["ok", 7]}', 400, "query[1]", "not a string"),
    ("/v1/search", b'{"query": "  "}', 400, "query", "empty or whitespace"),
    ("/v1/search", b'{"query": "x", "k": 0}', 400, "k", "[1, 50]"),
    ("/v1/search", b'{"query": "x", "k": 51}', 400, "k", "max_k"),
    ("/v1/search", b'{"query": "x", "k": "5"}', 400, "k", "integer"),
    ("/v1/search", b'{"query": "x", "k": true}', 400, "k", "integer"),
    ("/v1/search", b'{"query": "x", "kk": 5}', 400, "kk", "unknown field"),
    ("/v1/search", b'{"query": "x", "token_ids": [1]}', 400, "query", "exactly one"),
    ("/v1/search", b'{"query": "x", "params": {"bogus": 1}}', 400, "params", "unknown search parameter"),
    ("/v1/search", b'{"query": "x", "params": {"nprobe": 0}}', 400, "params.nprobe", "nprobe=0"),
    ("/v1/search", b'{"query": "x", "params": [1]}', 400, "params", "object"),
    ("/v1/search", b'{"vectors": [[0.1, 0.2]]}', 400, "vectors[0]", "384 dimensions"),
    ("/v1/search", b'{"vectors": [' + b"0.1, " * 383 + b'NaN]}', 400, "vectors[383]", "finite"),
    ("/v1/search", b'{"vectors": [' + b"0.1, " * 383 + b'"a"]}', 400, "vectors[383]", "numbers"),
    ("/v1/search", b'{"token_ids": [[1, 2.5]]}', 400, "token_ids[0][1]", "integers"),
    ("/v1/search", b'{"token_ids": [99999999]}', 400, "token_ids", "vocabulary"),
    ("/v1/search", b'{"token_ids": [' + b"5, " * 64 + b'5]}', 400, "token_ids", "1 to 64"),
    ("/v1/search", json.dumps({"query": ["q"] * 41}).encode(), 400, "query", "limit is 40"),
    ("/v1/search", b'{"query": "x", "exclude_doc_ids": [-1]}', 400, "exclude_doc_ids[0]", ">= 0"),
    ("/v1/search", json.dumps({"query": "x" * 70_000}).encode(), 413, "body", "65536 bytes"),
    ("/v1/neighbors", b'{"token_ids": [[1, 2], [3]]}', 400, "token_ids", "same length"),
    ("/v1/neighbors", b'{"token_ids": [1, 2], "exclude_doc_ids": [1, 2]}', 400, "exclude_doc_ids", "one entry per row"),
    ("/v1/neighbors", b'{"token_ids": [1, 2], "k": 0}', 400, "k", "[1, 50]"),
    ("/v1/neighbors", json.dumps({"token_ids": [[1] * 64] * 41}).encode(), 400, "token_ids", "limit is 40"),
    ("/v1/neighbors", json.dumps({"token_ids": [[1] * 64] * 30, "k": 40}).encode(), 400, "k",
     "30 x 40 = 1200 neighbours"),
    ("/v1/neighbors", json.dumps({"token_ids": [[1] * 64] * 30, "k": 40}).encode(), 400, "k", "k <= 33"),
    ("/v1/neighbors", b'{"token_ids": [[1, 2], [3, 4]], "exclude_doc_ids": [null, -1]}', 400,
     "exclude_doc_ids[1]", "null excludes nothing"),
    ("/v1/neighbors", b'{"token_ids": [1, 2], "tail": "cut"}', 400, "tail", "'query', 'drop', 'pad'"),
    ("/v1/neighbors", b'{"token_ids": [1], "label_token": true}', 400, "label_token", "L + 1"),
    ("/v1/neighbors", b'{"token_ids": [1, 2], "label_token": 1}', 400, "label_token", "true or false"),
    ("/v1/search", b'{"query": "\\u0000\\u200b "}', 400, "query", "empty or whitespace"),
    ("/v1/search", b'{"query": ["ok", "\\ud83d"]}', 400, "query[1]", "surrogate U+D83D"),
    ("/v1/search", b'{"query": "x", "exclude_doc_ids": 0}', 400, "exclude_doc_ids", "a list of document ids"),
    ("/v1/search", b'{"vectors": [' + b"0.1, " * 383 + b'1e39]}', 400, "vectors[383]", "float32"),
    ("/v1/search", b'{"vectors": [' + b"3.4e38, " * 383 + b'3.4e38]}', 400, "vectors", "would overflow float32"),
    ("/v1/search", json.dumps({"query": ["q"] * 40, "k": 26}).encode(), 400, "k", "40 x 26 = 1040 hits"),
    ("/search", json.dumps({"query": ["q"] * 40, "n_docs": 26}).encode(), 400, "n_docs", "n_docs <= 25"),
    ("/v1/chunks", b'{"ids": [1, 90]}', 404, "ids", "[0, 90)"),
    ("/v1/chunks", b'{"ids": "1"}', 400, "ids", "list"),
    ("/v1/chunks", b'{"ids": [1.5]}', 400, "ids[0]", "integers"),
    ("/v1/documents", b'{"ids": [20]}', 404, "ids", "[0, 20)"),
    ("/search", b'{"query": "x", "n_docs": 0}', 400, "n_docs", "[1, 50]"),
    ("/search", b'{"n_docs": 3}', 400, "query", "required"),
    ("/v1/nothing", b"{}", 404, "path", "no such endpoint"),
    ("/v1/search/", b'{"query": "x"}', 404, "path", "no such endpoint"),  # helper-27: a 307 to the Host header
    ("/v1/search", b'{"token_ids": [[[2000, 2001], [3000, 3001]]]}', 400, "token_ids[0][0]", "integers"),
    ("/v1/search", b'{"query": "x", "params": {"rerank": -1}}', 400, "params.rerank", "[0, 2147483647]"),
    ("/v1/search", b"[" * 100_000 + b"]" * 100_000, 413, "body", "65536 bytes"),
    ("/v1/search", b"[" * 30_000 + b"]" * 30_000, 400, "body", "too deeply"),
]


def test_bad_input_is_a_4xx_naming_field_value_and_limit(server, remote, local):
    for path, raw, status, field, words in BAD:
        res = _post(server, path, content=raw)
        assert res.status_code == status, (path, raw[:60], res.text)
        err = res.json()["error"]
        assert err["field"] == field, (raw[:60], err)
        assert words in err["message"], (raw[:60], err)
        assert err["type"] == "InvalidInputError"
    # limits name the limit; values name the value
    err = _post(server, "/v1/search", {"query": "x", "k": 51}).json()["error"]
    assert (err["value"], err["limit"]) == (51, [1, 50])
    err = _post(server, "/v1/search", {"query": "x", "params": {"rerank": -1}}).json()["error"]
    assert (err["field"], err["value"], err["limit"]) == ("params.rerank", -1, [0, 2**31 - 1])
    # the server kept serving throughout
    _same_hits(remote.search(QUERIES[0], k=3), local.search(QUERIES[0], k=3))


def test_client_maps_errors_to_retrostore_errors(remote):
    for k in (2.0, "2", True):  # refused as Store refuses them (the server takes a whole float from JSON)
        with pytest.raises(InvalidInputError, match=r"must be an int >= 1"):
            remote.search("x", k=k)
        with pytest.raises(InvalidInputError, match=r"must be an int >= 1"):
            remote.neighbors([[1, 2, 3]], k=k)
    assert len(remote.search("x", k=np.int64(2))) == 2
    with pytest.raises(InvalidInputError, match=r"k=0 .*\[1, 50\] \(ask for at least 1\)") as info:
        remote.search("x", k=0)
    assert (info.value.status, info.value.field, info.value.value) == (400, "k", 0)
    with pytest.raises(InvalidInputError, match="outside the committed range") as info:
        remote.get_chunks([10_000])
    assert info.value.status == 404 and info.value.limit == [0, 89]
    with pytest.raises(InvalidInputError, match=r"expected \(n, 384\)"):  # refused as Store refuses it
        remote.search_vectors(np.zeros((2, 3), np.float32))
    with pytest.raises(InvalidInputError, match="finite"):
        remote.search_vectors(np.full(384, np.nan))
    with pytest.raises(InvalidInputError, match="vocabulary"):
        remote.neighbors([[1, 2, 10**8]])
    with pytest.raises(InvalidInputError, match="limit is 40"):
        remote.search(["q"] * 41)
    with pytest.raises(InvalidInputError, match="document id 20 is outside"):
        remote.get_document(20)
    with pytest.raises(ServerUnavailableError, match="cannot reach"):
        retrostore.connect(f"http://127.0.0.1:{_serving.free_port()}")
    assert isinstance(ServerUnavailableError("x"), retrostore.RetrostoreError)


def test_no_endpoint_writes(server, local):
    for path in ("/v1/search", "/v1/neighbors", "/v1/chunks", "/v1/documents", "/v1/info", "/search", "/"):
        for method in ("PUT", "DELETE", "PATCH"):
            res = httpx.request(method, server.url + path, content=b"{}", timeout=10)
            assert res.status_code == 405, (method, path)
            assert res.json()["error"]["field"] == "path"
    assert httpx.get(server.url + "/healthz").json()["version"] == local.version


def test_concurrent_requests_are_batched_and_counted(server, local):
    want = {q: [h.chunk_id for h in local.search(q, k=3)] for q in QUERIES}
    failures, answers = [], []

    def client(i):
        with retrostore.connect(server.url) as c:
            for j in range(6):
                q = QUERIES[(i + j) % len(QUERIES)]
                try:
                    answers.append(([h.chunk_id for h in c.search(q, k=3)], want[q]))
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    failures.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures
    assert len(answers) == 72 and all(got == exp for got, exp in answers)

    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("retrostore_requests_total", (("endpoint", "search"), ("status", "200")))] >= 72
    assert samples[("retrostore_requests_total", (("endpoint", "search"), ("status", "400")))] >= 1
    assert samples[("retrostore_request_seconds_count", (("endpoint", "search"),))] >= 72
    assert ("retrostore_request_seconds_bucket", (("endpoint", "search"), ("le", "0.05"))) in samples
    assert samples[("retrostore_store_version", ())] == local.version
    httpx.get(server.url + "/v1/nothing")
    httpx.delete(server.url + "/v1/search")
    text = httpx.get(server.url + "/metrics").text
    unrouted = {s.labels["status"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "retrostore_requests_total" and s.labels["endpoint"] == "unrouted"}
    assert unrouted["404"] >= 1 and unrouted["405"] >= 1
    assert samples[("retrostore_store_chunks", ())] == len(local)
    n_batches = samples[("retrostore_batch_requests_count", (("kind", "search"),))]
    n_requests = samples[("retrostore_batch_requests_sum", (("kind", "search"),))]
    assert n_requests >= 72
    assert n_batches < n_requests, "12 concurrent clients never shared a batch"


def test_a_client_gone_mid_body_is_no_server_error(server, remote, local):
    """helper-16: a client that closed its connection before its body arrived was logged as a failure
    with a traceback and counted as a 500, which alerting on server errors would page for."""
    import socket
    from urllib.parse import urlsplit

    def count(status):
        text = httpx.get(server.url + "/metrics").text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "retrostore_requests_total" and s.labels == {"endpoint": "neighbors", "status": status})

    before = count("499"), count("500")
    url = urlsplit(server.url)
    for _ in range(3):
        with socket.create_connection((url.hostname, url.port)) as sock:
            sock.sendall(b"POST /v1/neighbors HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"token_ids\"")
            time.sleep(0.2)
    deadline = time.monotonic() + 10
    while count("499") < before[0] + 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (count("499"), count("500")) == (before[0] + 3, before[1])
    assert "ClientDisconnect" not in server.log()
    _same_hits(remote.search(QUERIES[1], k=2), local.search(QUERIES[1], k=2))  # still serving


def test_a_body_that_never_arrives_is_a_408_after_body_timeout(server, remote, local):
    """helper-16: a client that declared a body and sent part of it held its connection (and its place
    among the requests a batch waits for) for ever; the server answers 408 after --body-timeout-s (2 s)."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=20)
    try:
        conn.putrequest("POST", "/v1/search")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", "100")
        conn.endheaders(b'{"query": ')
        t0 = time.monotonic()
        _same_hits(remote.search(QUERIES[2], k=2), local.search(QUERIES[2], k=2))  # others are answered meanwhile
        res = conn.getresponse()
        waited = time.monotonic() - t0
        assert res.status == 408
        err = json.loads(res.read())["error"]
    finally:
        conn.close()
    assert (err["field"], err["value"], err["limit"]) == ("body", 10, 2.0)
    assert "nothing arrived for 2 s (body_timeout_s) after 10 bytes" in err["message"] and 1.5 < waited < 15

    # a body that keeps arriving, slowly, in more than body_timeout_s all told, is answered
    body = json.dumps({"query": QUERIES[3], "k": 2}).encode()
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=20)
    try:
        conn.putrequest("POST", "/v1/search")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        for i in range(0, len(body), len(body) // 4 + 1):  # 4 parts over ~3 s
            conn.send(body[i:i + len(body) // 4 + 1])
            time.sleep(0.75)
        res = conn.getresponse()
        assert res.status == 200, res.read()
        got = [h["chunk_id"] for h in json.loads(res.read())["results"][0]]
    finally:
        conn.close()
    assert got == [h.chunk_id for h in local.search(QUERIES[3], k=2)]


def test_headers_that_never_arrive_close_the_connection(server, remote, local):
    """helper-27: half a request line, then nothing, held the connection open for ever (uvicorn bounds
    idle keep-alive connections and the app bounds bodies, nothing bounded headers). The server closes
    it after --body-timeout-s (2 s here), on a new connection and on a kept-alive one, and serves on."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    for first in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"):  # a new, then a kept-alive connection
        with socket.create_connection((url.hostname, url.port), timeout=20) as sock:
            if first:
                sock.sendall(first)
                answer = b""
                while not answer.endswith(b"}"):  # headers and body may come in two reads
                    answer += sock.recv(65536)
                assert answer.startswith(b"HTTP/1.1 200")
            sock.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\n")  # and the rest never comes
            t0 = time.monotonic()
            _same_hits(remote.search(QUERIES[1], k=2), local.search(QUERIES[1], k=2))  # others are answered
            assert sock.recv(65536) == b""  # closed by the server
            assert 1.5 < time.monotonic() - t0 < 15
    # Pipelined: the deadline for the next headers counts from the last answer, not the first (helper-30:
    # a stale one closed a connection idle for less than the deadline after a long second request).
    slow = json.dumps({"query": [(QUERIES[i % 4] + " ") * 40 for i in range(40)], "k": 1, "tokens": False})
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                     + f"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(slow)}\r\n\r\n{slow}".encode())
        answers = b""
        while answers.count(b"HTTP/1.1 200") < 2 or not answers.endswith(b"]}"):
            chunk = sock.recv(1 << 20)
            assert chunk, answers[-200:]
            answers += chunk
        time.sleep(1.0)  # idle, within the 2 s deadline counted from the second answer
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_binds_loopback_by_default(server):
    assert "Uvicorn running on http://127.0.0.1:" in server.log()


def _refused(store) -> str:
    res = subprocess.run([sys.executable, "-m", "retrostore", "serve", str(store), "--port",
                          str(_serving.free_port())], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "Uvicorn running" not in res.stderr + res.stdout
    return res.stderr


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only a checksum can tell
    path.write_bytes(bytes(data))


def test_store_failing_verification_is_refused(built_store, tmp_path):
    bad = tmp_path / "vectors.rstore"
    shutil.copytree(built_store, bad)
    vec = next((bad / "vectors").glob("*"))
    _flip_a_byte(vec)  # opens (sizes match), only verify reads it
    err = _refused(bad)
    assert "failed verification" in err and vec.name in err and "retrostore verify" in err
    bad = tmp_path / "index.rstore"
    shutil.copytree(built_store, bad)
    seg = next((bad / "index").glob("*"))
    _flip_a_byte(seg)  # refused at open already
    err = _refused(bad)
    assert "cannot be served" in err and seg.name in err and "checksum" in err
    err = _refused(tmp_path)
    assert "NotAStoreError" in err


def test_workers_share_mapped_index_and_sum_metrics(built_store, embedder):
    with _serving.serving(built_store, "--workers", "2") as srv, \
            retrostore.open(built_store, embedder=embedder, mmap=True) as mapped:
        pids = set()
        for i in range(40):  # a new connection each time, so both workers get some
            res = httpx.get(srv.url + "/v1/info", headers={"Connection": "close"}, timeout=30).json()
            pids.add(res["server"]["pid"])
            assert res["server"]["mmap"] is True and res["index"]["mmap"] is True
            if len(pids) == 2:
                break
        assert len(pids) == 2, "one worker answered every connection"
        for q in QUERIES:
            body = httpx.post(srv.url + "/v1/search", json={"query": q, "k": 5},
                              headers={"Connection": "close"}, timeout=30).json()
            assert [h["chunk_id"] for h in body["results"][0]] == [h.chunk_id for h in mapped.search(q, k=5)]
        text = httpx.get(srv.url + "/metrics").text
        versions = [s for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "retrostore_store_version"]
        assert {s.labels["pid"] for s in versions} == {str(p) for p in pids}
        searches = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                       if s.name == "retrostore_requests_total" and s.labels["endpoint"] in ("search", "info"))
        assert searches >= len(QUERIES) + len(pids)


def test_empty_store_then_its_first_commit(tmp_path, small_docs, embedder):
    path = tmp_path / "empty.rstore"
    retrostore.create(path, embedder=embedder).close()  # version 0, no chunks
    with _serving.serving(path) as srv, retrostore.connect(srv.url) as remote:
        with retrostore.open(path, embedder=embedder) as local:
            assert remote.search(QUERIES[0], k=3) == local.search(QUERIES[0], k=3) == []
            assert remote.search(QUERIES[:2], k=3) == [[], []]
            vec = np.ones((2, 384), np.float32)
            (gs, gi), (ws, wi) = remote.search_vectors(vec, k=3), local.search_vectors(vec, k=3)
            assert np.array_equal(gi, wi) and np.array_equal(gs, ws)  # -1 and -inf
            got, want = remote.neighbors([[1, 2, 3]], k=2), local.neighbors([[1, 2, 3]], k=2)
            assert np.array_equal(got.chunk_ids, want.chunk_ids) and np.array_equal(got.scores, want.scores)
        with retrostore.open(path, "a", embedder=embedder) as writer:  # a writer commits meanwhile
            writer.append([d["text"] for d in small_docs[-3:]], metadata=[d["meta"] for d in small_docs[-3:]])
            version = writer.commit()
        for _ in range(200):
            if remote.refresh() == version:
                break
            time.sleep(0.05)
        assert remote.version == version
        with retrostore.open(path, embedder=embedder) as local:
            _same_hits(remote.search(QUERIES[0], k=3), local.search(QUERIES[0], k=3))
            assert len(remote) == len(local) > 0


class OtherModel:
    """An embedder the server does not have: the store is searched by vectors only."""

    dim = 384
    fingerprint = {"kind": "test", "name": "other-model", "dim": 384}

    def embed(self, texts):
        raise AssertionError("not called: vectors come with the documents")


def test_store_of_another_model_answers_vectors_and_refuses_text(tmp_path, small_docs):
    path = tmp_path / "other.rstore"
    docs = [d["text"] for d in small_docs[:3]]
    with retrostore.create(path, embedder=OtherModel(), tokenizer=retrostore.default_tokenizer_path()) as st:
        chunks = st.chunker.chunk_many(docs)
        vecs = np.random.default_rng(0).standard_normal((sum(map(len, chunks)), 384)).astype(np.float32)
        st.append(docs, embeddings=vecs, chunks=chunks)
        st.commit()
    with _serving.serving(path) as srv, retrostore.connect(srv.url) as remote:
        with pytest.raises(retrostore.EmbedderMismatchError, match="send vectors instead") as info:
            remote.search("some text")
        assert info.value.status == 409
        res = _post(srv, "/v1/search", {"token_ids": [1, 2, 3]})
        assert res.status_code == 409 and res.json()["error"]["field"] == "token_ids"
        with retrostore.open(path, embedder=OtherModel()) as local:
            (gs, gi), (ws, wi) = remote.search_vectors(vecs[:2], k=3), local.search_vectors(vecs[:2], k=3)
            assert np.array_equal(gi, wi) and gi[0, 0] == 0 and gi[1, 0] == 1
            assert np.allclose(gs, ws, atol=1e-5)
        assert "text queries will be refused" in srv.log()


def test_engine_with_spinning_threads_answers_as_the_store(built_store, tmp_path):
    """ServeSettings(spin=True): the engine embeds with the default model's spinning threads and
    answers what the store answers; a store built with another model falls back to it (text
    queries refused as without spin, vector searches served)."""
    import numpy as np

    from retrostore.serve.engine import Engine
    from retrostore.serve.schema import parse_search
    from retrostore.serve.settings import ServeSettings

    eng = Engine(ServeSettings(store=str(built_store), spin=True, threads=2))
    eng.open()
    try:
        assert eng.store.embedder.spin
        req = parse_search({"query": "a file opened for reading", "k": 3}, eng.facts, max_queries=8, max_k=10,
                           max_ids=10)
        got = eng.search([req])[0]
        with retrostore.open(built_store) as st:
            want = st.search("a file opened for reading", k=3)
        assert [h["chunk_id"] for h in got["results"][0]] == [h.chunk_id for h in want]
    finally:
        eng.close()

    class Other:  # another model: 384-d random unit vectors
        dim, fingerprint = 384, {"kind": "test", "name": "other", "model_sha256": "e" * 64, "dim": 384}
        tokenizer_path = retrostore.default_tokenizer_path()

        def embed(self, texts):
            v = np.random.default_rng(len(texts)).standard_normal((len(texts), 384)).astype(np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    path = tmp_path / "other.rstore"
    with retrostore.create(path, embedder=Other()) as st:
        st.append(["one document", "another document"])
        st.commit()
    eng = Engine(ServeSettings(store=str(path), spin=True, verify=False))
    eng.open()
    try:
        vreq = parse_search({"vectors": [[1.0] + [0.0] * 383], "k": 1}, eng.facts, max_queries=8, max_k=10,
                            max_ids=10)
        assert eng.search([vreq])[0]["results"][0]
    finally:
        eng.close()


def test_a_large_request_is_answered_in_slices_while_others_are_served(built_store, local):
    """helper-27: one search of 128 long queries held a one-query search for 20 s. A request larger
    than a batch (here --max-batch 4) is answered a slice at a time, requests arriving meanwhile between
    its slices, and its answer is the embedded Store's, for text, vectors and neighbours."""
    text = " ".join(local.get_document(d).text for d in range(3))
    text = text * (1 + 130_000 // len(text))
    long_texts = [text[997 * i:997 * i + 1200] for i in range(120)]  # ~256 tokens each: ~10 s of embedding
    assert min(map(len, long_texts)) > 1000
    with _serving.serving(built_store, "--max-batch", "4", "--max-queries", "200") as srv:
        done = {}

        def big():
            res = _post(srv, "/v1/search", {"query": long_texts, "k": 3, "tokens": False})
            done["big"] = (time.monotonic(), res)

        def second():  # another large request queued behind the first (helper-30: small ones waited for both)
            done["second"] = _post(srv, "/v1/search", {"query": long_texts[::-1], "k": 3, "tokens": False})

        thread, other = threading.Thread(target=big), threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        other.start()
        time.sleep(0.3)
        asked = time.monotonic()
        small = _post(srv, "/v1/search", {"query": QUERIES[0], "k": 2})
        done["small"] = time.monotonic()
        thread.join(300)
        other.join(300)
        assert small.status_code == 200 and done["big"][1].status_code == 200
        assert done["second"].status_code == 200
        # Not held until the large requests were done: answered within about one slice of them.
        assert done["small"] < done["big"][0] and done["small"] - asked < (done["big"][0] - asked) / 3, \
            (done["small"] - asked, done["big"][0] - asked)
        rows = done["big"][1].json()["results"]
        assert [[h["chunk_id"] for h in r] for r in rows] == [[h.chunk_id for h in r]
                                                              for r in local.search(long_texts, k=3)]
        vecs = local.embedder.embed(QUERIES * 3)
        body = _post(srv, "/v1/search", {"vectors": vecs.tolist(), "k": 5, "output": "ids"}).json()
        assert body["chunk_ids"] == local.search_vectors(vecs, k=5)[1].tolist()
        tokens = np.asarray(local.chunker.encode(text)[0][:6 * 128]).reshape(6, 128)  # 6 rows x 2 chunks
        with retrostore.connect(srv.url) as client:
            got = client.neighbors(tokens, k=2)
        want = local.neighbors(tokens, k=2)
        assert np.array_equal(got.chunk_ids, want.chunk_ids) and np.array_equal(got.tokens, want.tokens)
        metrics = httpx.get(srv.url + "/metrics", timeout=30).text
        assert "retrostore_batch_requests" in metrics


def test_npy_answers_are_parsed_one_thread_at_a_time(monkeypatch):
    """numpy parses .npy headers with ast.literal_eval; on CPython 3.11 two threads building ASTs at
    once can raise SystemError (AST recursion depth mismatch: 1 of 32 clients in test_serve_follow's
    30 s run). A client's threads read neighbour answers one at a time."""
    from retrostore.serve import wire

    arrays = [np.arange(6).reshape(2, 3), np.ones((2, 2), bool)]
    data = wire.pack_arrays(arrays)
    real_load = np.load
    inside, most = [0], [0]

    def slow_load(*args, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.002)  # a thread switch in the middle of a parse
        try:
            return real_load(*args, **kwargs)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(wire.np, "load", slow_load)
    got = []
    threads = [threading.Thread(target=lambda: got.append(wire.unpack_arrays(data, 2))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and len(got) == 8
    assert all(np.array_equal(a, b) for g in got for a, b in zip(g, arrays))
