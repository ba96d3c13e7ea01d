"""Real stores for the retro tests, built once per test session (module-level cache)."""

from __future__ import annotations

from pathlib import Path

import retrostore

_CACHE: dict[str, Path] = {}


def pydocs_slice(pydocs: list[dict], n: int = 10, lo: int = 2_000, hi: int = 12_000) -> list[dict]:
    """The first ``n`` pydocs pages (file order) of ``lo``-``hi`` characters: 10 pages, about 270 chunks."""
    return [d for d in pydocs if lo <= len(d["text"]) <= hi][:n]


def retro_store(tmp_path_factory, pydocs, embedder) -> Path:
    """A committed store of a slice of the real corpus (read-only use)."""
    if "slice" not in _CACHE:
        docs = pydocs_slice(pydocs)
        path = tmp_path_factory.mktemp("retro") / "slice.rstore"
        with retrostore.create(path, embedder=embedder) as st:
            st.append([d["text"] for d in docs], metadata=[d["meta"] for d in docs])
            st.commit()
        _CACHE["slice"] = path
    return _CACHE["slice"]


def duplicated_store(tmp_path_factory, pydocs, embedder) -> Path:
    """Three real pages, two of them stored twice (as a build run twice would), plus one page
    that holds a third page's first half verbatim after other text (a copy at another chunk
    alignment)."""
    if "dup" not in _CACHE:
        docs = [d["text"] for d in pydocs_slice(pydocs, n=3, lo=1_500, hi=4_000)]
        shifted = "A preface that shifts the chunk boundaries. " * 3 + docs[2][: len(docs[2]) // 2]
        texts = docs + [docs[0], docs[1], shifted]
        path = tmp_path_factory.mktemp("retro") / "dup.rstore"
        with retrostore.create(path, embedder=embedder) as st:
            st.append(texts)
            st.commit()
        _CACHE["dup"] = path
    return _CACHE["dup"]
