"""FAISS factory strings: building an empty index with clear errors, the limits
FAISS does not check, and whether an index can be memory-mapped.
"""

from __future__ import annotations

import re
from typing import Any

import faiss
import numpy as np

from ..errors import InvalidInputError
from ..storage.faisstypes import METRICS, unwrap

__all__ = ["new_index", "mmap_problem", "check_mmap", "check_index_arg", "check_small_batches"]

def new_index(factory: str, dim: int, metric: str) -> faiss.Index:
    """``faiss.index_factory`` with a clear error.

    Raises
    ------
    InvalidInputError
        FAISS rejects the string, it asks for an ID map (retrostore assigns ids), or for FAISS's
        spectral hash (its copies crash the process when destroyed, FAISS 1.15).
    """
    if not isinstance(factory, str) or not factory.strip():
        raise InvalidInputError(f"index={factory!r} must be a FAISS factory string such as 'Flat'")
    if not (factory.isascii() and factory.isprintable()):  # FAISS reads a C string: "Flat\x00junk" is "Flat"
        raise InvalidInputError(f"index={factory!r} holds a character that is not printable ASCII; a FAISS factory "
                                "string is letters, digits and punctuation such as 'IVF1024,PQ48x4fs'")
    if "IDMap" in factory:
        raise InvalidInputError(
            f"factory string {factory!r} asks for an ID map; retrostore assigns chunk ids itself "
            f"(sequential ids per segment), so drop the IDMap component: "
            f"{','.join(p for p in factory.split(',') if p.strip() not in ('IDMap', 'IDMap2'))!r}"
        )
    if any(re.fullmatch(r"SH\d.*", part.strip()) for part in factory.split(",")):
        raise InvalidInputError(
            f"factory string {factory!r} asks for FAISS's spectral hash (IndexIVFSpectralHash), which a store "
            "cannot keep: FAISS 1.15 frees its transform twice when a copy of the index is destroyed (a "
            "segmentation fault that kills the process; the store copies its trained index for every segment); "
            "use another compact code, e.g. 'IVF1024,PQ16x4fs' or 'IVF1024,SQ4'")
    for name, low, high, what in _FACTORY_LIMITS:
        for m in re.finditer(name + r"(\d+)", factory):
            if not low <= int(m.group(1)) <= high:
                raise InvalidInputError(
                    f"factory string {factory!r}: {m.group(0)} has {what} {m.group(1)}, outside [{low}, {high}] "
                    "(FAISS would crash or exhaust memory); choose a value in range")
    try:
        return faiss.index_factory(int(dim), factory, METRICS[metric])
    except (RuntimeError, MemoryError) as exc:
        hint = ("; this index supports only squared L2: create the store with metric='l2'"
                if "METRIC_L2" in str(exc) and metric != "l2" else "")
        raise InvalidInputError(
            f"FAISS cannot build the factory string {factory!r} for dimension {dim}: {exc}{hint}"
        ) from exc


#: Numbers in factory strings that FAISS accepts but then aborts or segfaults on (HNSW0/1 at the
#: first add) or tries to allocate without bound (IVF1000000000): (prefix, low, high, meaning).
_FACTORY_LIMITS = (("HNSW", 2, 1024, "M (neighbours per node)"),
                   ("IVF", 1, 1 << 24, "nlist (inverted lists)"),
                   ("NSG", 2, 1024, "R (neighbours per node)"))


def mmap_problem(index: faiss.Index, factory: str) -> str | None:
    """Why FAISS cannot serve ``index`` memory-mapped (None when it can).

    ``faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC)`` maps flat codes, HNSW
    storage and IVF inverted lists from the file; fast-scan indexes keep their
    codes in SIMD blocks (``BlockInvertedLists``) that are always read into RAM.
    """
    if "FastScan" in type(unwrap(index)).__name__:
        return (f"FAISS cannot memory-map the fast-scan index {factory!r} (its PQ codes live in SIMD "
                "blocks that are always read into RAM); use mmap=False, or a factory without the 'fs' "
                "suffix such as 'IVF4096,PQ8' or 'IVF4096,SQ8'")
    return None


def check_mmap(factory: str, dim: int, metric: str) -> None:
    """Raise when ``factory`` cannot be memory-mapped (see :func:`mmap_problem`).

    Raises
    ------
    InvalidInputError
        Naming the factory and a factory string that can be mapped.
    """
    problem = mmap_problem(new_index(factory, dim, metric), factory)
    if problem:
        raise InvalidInputError(problem)


def check_index_arg(index: Any, dim: int, *, mmap: bool) -> tuple[str, str]:
    """(target, current factory) for ``create(index=...)``; validates the string.

    ``"auto"`` starts exact (``Flat``); a factory that needs training is served
    by ``Flat`` until the store can train it.

    Raises
    ------
    InvalidInputError
        A factory string FAISS rejects, one with an ID map, or one that cannot be memory-mapped with ``mmap``.
    """
    if index == "auto":
        return "auto", "Flat"
    probe = new_index(index, dim, "ip")
    if mmap:
        check_mmap(index, dim, "ip")
    if probe.is_trained:
        check_small_batches(probe, index)
    return index, index if probe.is_trained else "Flat"


def check_small_batches(probe: faiss.Index, factory: str) -> None:
    """Refuse an index that cannot take a commit of 2 vectors (NSG builds its graph once from
    enough vectors: every small commit would fail and wedge the store)."""
    x = np.random.default_rng(0).standard_normal((2, probe.d)).astype(np.float32)
    try:
        faiss.clone_index(probe).add(x)
    except RuntimeError as exc:
        raise InvalidInputError(
            f"factory string {factory!r} cannot add a batch of 2 vectors ({' '.join(str(exc).split())[:200]}); "
            "a store commits batches of any size, so use an index that grows, e.g. 'HNSW32' for a graph"
        ) from None
