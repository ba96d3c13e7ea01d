"""Run every benchmark, one after the other: the one command that runs them all.

    python benchmarks/run_all.py                  # short runs (minutes each), nothing recorded
    python benchmarks/run_all.py --record         # the recorded runs: each replaces its own section of
                                                  # docs/benchmarks.md (hours on 2 cores)
    python benchmarks/run_all.py --only build query serve
    python benchmarks/run_all.py --list           # the commands, without running them

Each benchmark runs in its own process, with this interpreter, so one that fails or is
interrupted never stops the others; the summary at the end gives each one's status and wall
time. A benchmark whose extra is not installed (``serve`` needs ``.[serve,bench]``, ``peers``
``.[bench]``) is skipped, and the summary says which package it lacks. Short runs print the
same tables as the recorded ones on smaller inputs: read their ratios, not their absolute
times, and never record them. Benchmarks that take an argument no default can give are not
run here: ``recall.py STORE`` (a store to reindex and evaluate) and ``revisions.py --base REV``
(a revision to compare with).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    """One script: its arguments for a short run, for the recorded run (None: it records nothing,
    it prints), and the modules it needs beyond retrostore's own dependencies."""

    name: str
    short: list[str]
    record: list[str] | None = field(default_factory=lambda: ["--record"])
    needs: tuple[str, ...] = ()


#: In the order of docs/benchmarks.md: the build and query paths first, the long scale runs last.
SUITE = [
    Bench("build", ["--quick"]),
    Bench("stages", ["--docs", "5", "--rounds", "1"], record=None),
    Bench("query", ["--quick"]),
    Bench("neighbors", ["--quick"]),
    Bench("retro", ["--docs", "20", "--gen", "20"], record=None),
    Bench("exclusion", ["--docs", "20"]),
    Bench("commit", ["--repeats", "3"], record=None),
    Bench("scan", ["--sizes", "51429", "--calls", "50"]),
    Bench("flat_batch", ["--repeats", "2"]),
    Bench("batch_threads", ["--vectors", "56400", "--repeats", "3"]),
    Bench("embed_spin", ["--queries", "8", "--rounds", "2"]),
    Bench("serve", ["--quick"], needs=("starlette", "uvicorn", "flask", "httpx")),
    Bench("memory", ["--n", "200000"], record=None),
    Bench("scale", ["--quick"]),
    Bench("peers", ["--quick"], record=[], needs=("chromadb", "lancedb")),  # peers writes its own page
]


def command(b: Bench, record: bool) -> list[str] | None:
    """The command line of one benchmark, or None when it has nothing to record."""
    args = b.short if not record else b.record
    if args is None:
        return None
    return [sys.executable, str(HERE / f"{b.name}.py"), *args]


def missing(b: Bench) -> list[str]:
    return [m for m in b.needs if importlib.util.find_spec(m) is None]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true",
                    help="the full runs that write docs/benchmarks.md (and docs/benchmarks-peers.md); "
                         "benchmarks that record nothing are not run")
    ap.add_argument("--only", nargs="+", choices=[b.name for b in SUITE], metavar="NAME",
                    help="run these benchmarks only (names: " + ", ".join(b.name for b in SUITE) + ")")
    ap.add_argument("--list", action="store_true", help="print the commands and exit")
    args = ap.parse_args()

    chosen = [b for b in SUITE if not args.only or b.name in args.only]
    rows: list[tuple[str, str, float]] = []
    for b in chosen:
        cmd = command(b, args.record)
        if cmd is None:
            if args.list:  # (helper-60: --list --record left these out without a word)
                print(f"# {b.name}: records nothing (its short run: python benchmarks/{b.name}.py {' '.join(b.short)})")
            rows.append((b.name, "not run: records nothing (run it without --record)", 0.0))
            continue
        shown = " ".join(["python", *cmd[1:]]).replace(str(HERE.parent) + "/", "")
        if args.list:
            print(shown)
            continue
        if lacks := missing(b):
            rows.append((b.name, f"skipped: needs {', '.join(lacks)} (pip install \".[serve,bench]\")", 0.0))
            continue
        print(f"\n===== {b.name}: {shown}", flush=True)
        t0 = time.monotonic()
        try:
            rc = subprocess.call(cmd, cwd=HERE.parent)
        except KeyboardInterrupt:
            rows.append((b.name, "interrupted", time.monotonic() - t0))
            break
        rows.append((b.name, "ok" if rc == 0 else f"FAILED (exit status {rc})", time.monotonic() - t0))
    if args.list:
        return 0
    print("\n| benchmark | status | minutes |\n|---|---|---|")
    for name, status, seconds in rows:
        print(f"| {name} | {status} | {seconds / 60:.1f} |")
    return 1 if any(s.startswith(("FAILED", "interrupted")) for _, s, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
