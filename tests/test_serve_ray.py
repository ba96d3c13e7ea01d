"""The same app as a Ray Serve deployment with two replicas, on a local Ray cluster.

Slow (a local Ray cluster and Serve's proxy take most of a minute to start on 2 cores):
run with `pytest -m slow tests/test_serve_ray.py` after `pip install ".[test,ray-serve]"`."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

import retrostore

import _serving

QUERIES = ["decode base64 encoded data back into bytes", "run a function in a pool of threads"]


@pytest.mark.slow
def test_ray_serve_replicas_answer_like_the_embedded_store(built_store, embedder):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray-serve]')")
    serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install '.[ray-serve]')")
    from retrostore.serve.ray_serve import deployment

    port = _serving.free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 << 20, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(built_store, replicas=2), route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with retrostore.connect(url) as remote, retrostore.open(built_store, embedder=embedder) as local:
            for q in QUERIES:
                assert [h.chunk_id for h in remote.search(q, k=4)] == [h.chunk_id for h in local.search(q, k=4)]
            tokens = np.asarray(local.get_chunks([40])[0].tokens)[None, :]
            got, want = remote.neighbors(tokens, k=2), local.neighbors(tokens, k=2)
            assert np.array_equal(got.chunk_ids, want.chunk_ids) and np.array_equal(got.tokens, want.tokens)
            pids = {httpx.get(url + "/v1/info", timeout=30).json()["server"]["pid"] for _ in range(30)}
            assert len(pids) == 2, f"requests reached {len(pids)} replica(s), not 2"
    finally:
        serve.shutdown()
        ray.shutdown()
