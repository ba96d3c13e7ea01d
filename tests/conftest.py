"""Shared fixtures: the real corpus, the real default embedder, small real stores."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import zstandard

# The shared corpus and model files sit in ../shared beside the checkout (as in CI);
# RETROSTORE_SHARED points elsewhere.
SHARED = Path(os.environ.get("RETROSTORE_SHARED") or Path(__file__).resolve().parents[2] / "shared")
PYDOCS = SHARED / "data" / "pydocs.jsonl.zst"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"


def read_pydocs() -> list[dict]:
    """All 497 records of the real corpus, in file order."""
    with open(PYDOCS, "rb") as fh:
        reader = zstandard.ZstdDecompressor().stream_reader(fh)
        return [json.loads(line) for line in io.TextIOWrapper(reader, encoding="utf-8")]


@pytest.fixture(scope="session")
def pydocs() -> list[dict]:
    return read_pydocs()


@pytest.fixture(scope="session")
def small_docs(pydocs) -> list[dict]:
    """20 real documents, the smallest of the corpus plus library/base64.rst (cheap to embed)."""
    by_size = sorted(pydocs, key=lambda d: len(d["text"]))
    picked = [d for d in by_size if d["text"].strip()][:19]
    base64 = next(d for d in pydocs if d["meta"]["source"].endswith("library/base64.rst"))
    return picked + [base64]


@pytest.fixture(scope="session")
def embedder():
    import retrostore

    return retrostore.default_embedder()


@pytest.fixture(scope="session")
def built_store(tmp_path_factory, small_docs, embedder):
    """A committed store of the 20 small real documents (read-only use in tests)."""
    import retrostore

    path = tmp_path_factory.mktemp("stores") / "small.rstore"
    with retrostore.create(path, embedder=embedder) as st:
        st.append([d["text"] for d in small_docs], metadata=[d["meta"] for d in small_docs])
        st.commit()
    return path


@pytest.fixture(scope="session")
def workers():
    """A multiprocessing forkserver context whose server has imported retrostore
    and tests/_workers.py once, so child processes (writers to kill, readers,
    sweeps) start with a fork instead of an interpreter start."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["_workers"])
    return ctx


#: The limits of the module-scoped test server (tests/test_serve.py, tests/test_serve_adversarial.py).
SERVE_LIMITS = ("--max-body-bytes", "65536", "--body-timeout-s", "2", "--max-queries", "40", "--max-k", "50", "--max-neighbors", "1000")


@pytest.fixture(scope="module")
def server(built_store):
    """``retrostore serve`` on the small real store, with :data:`SERVE_LIMITS`, for one test module."""
    import _serving

    with _serving.serving(built_store, *SERVE_LIMITS) as srv:
        yield srv


@pytest.fixture(scope="module")
def remote(server):
    """``retrostore.connect`` to :func:`server`."""
    import retrostore

    with retrostore.connect(server.url) as client:
        yield client


@pytest.fixture(scope="module")
def local(built_store, embedder):
    """The same store opened in-process, to compare answers with."""
    import retrostore

    with retrostore.open(built_store, embedder=embedder) as st:
        yield st
