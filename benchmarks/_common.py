"""Helpers shared by the benchmarks: corpus access, timing statistics, the
machine description and recording results into ``docs/benchmarks.md``.

Not a benchmark itself. The benchmark scripts put their own directory on
``sys.path`` (Python does that for ``python benchmarks/X.py``), so they import
this module as ``_common``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DOCS_MD = REPO / "docs" / "benchmarks.md"
#: The corpus of the benchmarks: 497 Python documentation pages in The Pile's format.
PYDOCS = Path(os.environ.get("RETROSTORE_PYDOCS", "/work/shared/data/pydocs.jsonl.zst"))
#: 16 pydocs pages shipped with the repository (fallback when PYDOCS is absent).
SAMPLE = REPO / "examples" / "pydocs-sample.jsonl.zst"


# -- a busy machine ----------------------------------------------------------------
@contextlib.contextmanager
def busy_processes(n: int = 1, settle_s: float = 1.0):
    """Run ``n`` CPU-bound processes (a pure-Python loop each) for the ``with`` block, then kill
    them: the benchmark's own shared machine."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(settle_s)
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


# -- synthetic vectors -----------------------------------------------------------
#: Dimension of the synthetic benchmark vectors (the default embedder's).
SYNTH_DIM = 384


class PrecomputedOnly:
    """An embedder that is never called: the benchmark's vectors come with ``append(embeddings=...)``."""

    dim = SYNTH_DIM
    fingerprint = {"kind": "benchmark", "name": "synthetic", "model_sha256": "0" * 64, "dim": SYNTH_DIM}

    @property
    def tokenizer_path(self) -> Path:
        import retrostore

        return retrostore.default_tokenizer_path()

    def embed(self, texts):
        raise AssertionError("benchmark vectors are precomputed")


def clustered_vectors(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    """``n`` unit vectors around random ``centres`` (like text embeddings, clustered), float32."""
    x = centres[rng.integers(0, len(centres), n)] + 0.4 * rng.standard_normal((n, centres.shape[1])).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- corpus ---------------------------------------------------------------------
def corpus_path(path: str | None = None) -> Path:
    """The corpus file: ``path`` if given, else pydocs, else the shipped sample."""
    if path:
        return Path(path)
    return PYDOCS if PYDOCS.is_file() else SAMPLE


def read_docs(path: Path) -> list[tuple[str, dict | None]]:
    """All documents of a ``.jsonl[.gz|.zst]`` file as ``(text, metadata)``, in order."""
    from retrostore.text.inputs import iter_documents

    return [(d.text, d.metadata) for d in iter_documents([path])]


def write_jsonl(path: Path, docs: Sequence[tuple[str, dict | None]]) -> Path:
    """Write documents as plain JSON lines (``{"text", "meta"}``), the Pile layout."""
    import json

    with open(path, "w", encoding="utf-8") as fh:
        for text, meta in docs:
            fh.write(json.dumps({"text": text, "meta": meta}, ensure_ascii=False) + "\n")
    return path


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def sample_sentences(texts: Iterable[str], n: int, seed: int = 0, lo: int = 40, hi: int = 300) -> list[str]:
    """``n`` sentences of ``lo``..``hi`` characters sampled (fixed seed) from ``texts``.

    Sentences are cut at ``.``/``!``/``?`` followed by whitespace and at
    newlines; lines that look like code or tables (few letters) are skipped.
    Sampled with replacement only when fewer than ``n`` exist.
    """
    pool = []
    for text in texts:
        for s in _SENTENCE_END.split(text):
            s = " ".join(s.split())
            letters = sum(c.isalpha() for c in s)
            if lo <= len(s) <= hi and letters >= 0.6 * len(s):
                pool.append(s)
    if not pool:
        raise SystemExit("no query sentences found in the held-out documents")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pool), size=n, replace=len(pool) < n)
    return [pool[i] for i in idx]


def build_tmp_store(root: Path, docs: Sequence[tuple[str, dict | None]], *, quiet: bool = False) -> Path:
    """Build a store of ``docs`` at ``root/bench.rstore`` with the public build path."""
    from retrostore.build import build_store

    src = write_jsonl(root / "docs.jsonl", docs)
    out = root / "bench.rstore"
    t0 = time.perf_counter()
    res = build_store(out, [src], progress=False)
    if not quiet:
        print(f"built {out}: {res.documents} docs, {res.chunks} chunks in {time.perf_counter() - t0:.1f} s",
              flush=True)
    return out


# -- timing ---------------------------------------------------------------------
class Timer:
    """Accumulates wall time (``perf_counter``) and call counts per label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.active: dict[str, int] = {}  # labels whose wrapped function is running

    def add(self, label: str, dt: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + dt
        self.calls[label] = self.calls.get(label, 0) + 1

    def wrap(self, label: str, fn: Callable, within: str | None = None) -> Callable:
        """``fn`` with its wall time added under ``label``.

        Nested calls under the same label are counted once. With ``within``,
        only calls made while a function wrapped under ``within`` runs count.
        """
        def timed(*args, **kwargs):
            if self.active.get(label) or (within is not None and not self.active.get(within)):
                return fn(*args, **kwargs)
            self.active[label] = self.active.get(label, 0) + 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - t0)
                self.active[label] -= 1

        timed.__wrapped__ = fn
        return timed


class patched:
    """Context manager: replace attributes (``(owner, name, new)``) and restore them."""

    def __init__(self, *items: tuple[object, str, object]) -> None:
        self.items = items
        self.saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> "patched":
        for owner, name, new in self.items:
            self.saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, new)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, old in reversed(self.saved):
            setattr(owner, name, old)


#: Seconds before each block of calls in :func:`take_turns` (numpy's OpenBLAS threads go back to sleep).
TURN_PAUSE_S = 0.3


def take_turns(calls: dict[str, Callable[[object], object]], items: Sequence, blocks: int, *,
               rng: np.random.Generator | None = None, pause_s: float = TURN_PAUSE_S) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls`` on every item, the calls taking turns in ``blocks``
    blocks of items (in random order per block with ``rng``, else in the dict's), each block after
    ``pause_s``. numpy's OpenBLAS threads spin on after a product (up to ~0.1 s): in turns of one
    item, a baseline's products slowed whatever ran next (benchmarks/scan.py: the store's scan 2.35
    against 1.6 ms at 51,429 vectors)."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for block in np.array_split(np.arange(len(items)), blocks):
        for j in (rng.permutation(len(names)) if rng is not None else range(len(names))):
            fn, out = calls[names[j]], times[names[j]]
            time.sleep(pause_s)
            for i in block:
                t = time.perf_counter()
                fn(items[i])
                out.append(time.perf_counter() - t)
    return times


def timed(fn: Callable, *args, **kwargs) -> tuple[float, object]:
    """``(seconds, result)`` of one call."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


def pct(xs: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation)."""
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


# -- machine --------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def start(corpus: str | None) -> tuple[dict[str, str], list[tuple[str, dict | None]]]:
    """A benchmark's preamble: describe and print the machine, read the corpus's documents."""
    info = machine()
    print_machine(info)
    return info, read_docs(corpus_path(corpus))


def machine() -> dict[str, str]:
    """CPU model, cores, load and library versions, for every report."""
    cpu, usable = cpu_model(), usable_cpus()
    import faiss
    import lmdb
    import onnxruntime
    import tokenizers

    import retrostore

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return {
        "cpu": cpu,
        "cores": f"{os.cpu_count()} ({usable} usable)",
        "load average (1/5/15 min) at start": load,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "onnxruntime": onnxruntime.__version__,
        "lmdb": lmdb.__version__,
        "tokenizers": tokenizers.__version__,
        "retrostore": f"{retrostore.__version__} (git {commit or '?'})",
        "platform": platform.platform(),
    }


def print_machine(info: dict[str, str]) -> None:
    print("machine:")
    for k, v in info.items():
        print(f"  {k}: {v}")
    print(flush=True)


# -- reporting ------------------------------------------------------------------
def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def command_line() -> str:
    """The command that ran this benchmark, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", str(script)] + [shlex.quote(a) for a in sys.argv[1:]])


def finish(args, key: str, title: str, body: str, info: dict[str, str]) -> int:
    """Print ``body`` and, with ``--record``, :func:`record` it; the exit status (0)."""
    print()
    print(body)
    if args.record:
        record(key, title, body, info)
    return 0


def record(key: str, title: str, body: str, info: dict[str, str], path: Path = DOCS_MD) -> None:
    """Replace (or append) the block ``key`` of ``docs/benchmarks.md``.

    The block lies between ``<!-- BEGIN key -->`` and ``<!-- END key -->`` and
    holds ``title``, the command, the date, the machine and ``body``.
    """
    begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    mach = "; ".join(f"{k} {v}" for k, v in info.items() if k != "platform")
    block = "\n".join([
        begin,
        f"#### {title}",
        "",
        f"Command: `{command_line()}`  ",
        f"Date: {now}  ",
        f"Machine: {mach}",
        "",
        body.rstrip(),
        end,
    ])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"recorded in {path} ({key})")
