"""Stage 1 of a sharded build: the plan.

Count the documents of every input file (:func:`count_file`) and cut the
document stream into shards of about equal characters (:func:`make_plan`).
The same inputs and settings give the same plan and the same ``build_id``, the
sha256 of the plan's canonical JSON. See :mod:`retrostore.build.shards` for the
other stages and docs/scaling.md.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import CorruptStoreError, InvalidInputError
from ..storage import fileio
from ..text.inputs import InputDocument, expand_named, read_file

__all__ = ["FORMAT", "PLAN", "TOKENIZER", "SHARD_CHARS", "input_files", "plan_key", "count_file", "make_plan",
           "read_plan", "write_plan", "read_documents"]

FORMAT = 1
PLAN = "plan.json"
TOKENIZER = "tokenizer.json"
#: Default characters of input text per shard (~16 M tokens, ~250 k chunks of 64 tokens).
SHARD_CHARS = 64_000_000
#: Most balancing marks kept per input file (see :func:`count_file`).
MARKS_MAX = 4096


def canonical(obj: Any) -> bytes:
    """``obj`` as canonical JSON bytes (sorted keys, no spaces, ASCII)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _sha(obj: Any) -> str:
    return hashlib.sha256(canonical(obj)).hexdigest()


# -- stage 1: plan -------------------------------------------------------------
def input_files(inputs: Sequence[str | os.PathLike]) -> list[dict]:
    """The input files in reading order: ``{"path", "rel", "size", "mtime_ns"}``.

    ``rel`` is the name ``build`` stores as a ``.txt`` file's source.

    Raises
    ------
    InputNotFoundError, InvalidInputError
        As :func:`retrostore.text.inputs.expand_inputs`.
    """
    out = []
    for path, rel in expand_named(inputs):
        st = path.stat()
        out.append({"path": os.fspath(path.resolve()), "rel": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def plan_key(files: list[dict], settings: dict, shards: int | None, shard_chars: int) -> str:
    """A cheap identity of a build, known before any input is read.

    Changes when an input file's path, size or modification time, a setting or
    the requested shard count changes; a store that recorded a finished build
    with this key needs nothing more.
    """
    return _sha({"files": [[f["path"], f["size"], f["mtime_ns"]] for f in files], "settings": settings,
                 "shards": shards, "shard_chars": shard_chars})


def count_file(path: str, rel: str, text_field: str, meta_field: str) -> dict:
    """Documents and characters of one input file, with balancing marks.

    Returns
    -------
    dict
        ``{"documents": n, "chars": c, "marks": [[i, chars before document i], ...]}``;
        marks every ``stride`` documents (stride 1, doubled whenever more than
        ``MARKS_MAX`` marks would be kept), so the planner can cut shards of
        about equal characters without keeping a number per document.

    Raises
    ------
    InvalidDocumentError, InvalidMetadataError, InputReadError
        A bad line, named by ``file:line`` (found here, before any embedding).
    """
    n = chars = 0
    stride, marks = 1, []
    with contextlib.closing(read_file(Path(path), rel, text_field, meta_field, None)) as docs:
        for doc in docs:
            if n % stride == 0:
                marks.append([n, chars])
                if len(marks) > MARKS_MAX:
                    marks, stride = marks[::2], stride * 2
            n += 1
            chars += len(doc.text)
    return {"documents": n, "chars": chars, "marks": marks}


def make_plan(files: list[dict], counts: list[dict], settings: dict, *, shards: int | None,
              shard_chars: int = SHARD_CHARS, key: str) -> dict:
    """Cut the input's document stream into contiguous shards.

    Parameters
    ----------
    files : list of dict
        From :func:`input_files`.
    counts : list of dict
        :func:`count_file` of each file, in the same order.
    settings : dict
        The store settings the shards depend on (tokenizer, chunk size,
        embedder, index, fields).
    shards : int, optional
        Number of shards; default ``ceil(characters / shard_chars)``. At most
        one shard per document.
    shard_chars : int
        Target characters per shard when ``shards`` is not given.
    key : str
        :func:`plan_key` of the same arguments.

    Returns
    -------
    dict
        ``{"format", "build_id", "key", "body", "locations"}``. ``body`` (hashed
        into ``build_id``) holds the settings, each file's ``rel``, size,
        document and character counts, and the shards as global document
        ranges ``[first, end)`` of about equal characters. ``locations`` holds
        the files' absolute paths and mtimes, left out of ``build_id`` so that
        moving or touching the inputs does not make a finished build look new.
    """
    n_docs = sum(c["documents"] for c in counts)
    n_chars = sum(c["chars"] for c in counts)
    n = shards if shards is not None else max(1, math.ceil(n_chars / shard_chars))
    n = min(n, n_docs)
    # Global marks: (document index, characters before it), increasing in both.
    mark_docs, mark_chars = [], []
    d0 = c0 = 0
    for c in counts:
        for i, ch in c["marks"]:
            mark_docs.append(d0 + i)
            mark_chars.append(c0 + ch)
        d0 += c["documents"]
        c0 += c["chars"]
    mark_docs.append(n_docs)
    mark_chars.append(n_chars)
    bounds = [0]
    for k in range(1, n):
        target = n_chars * k / n
        j = bisect.bisect_left(mark_chars, target)
        if j > 0 and (j == len(mark_chars) or target - mark_chars[j - 1] <= mark_chars[j] - target):
            j -= 1
        # Every shard keeps at least one document, whatever the marks say.
        bounds.append(min(max(mark_docs[j], bounds[-1] + 1), n_docs - (n - k)))
    bounds.append(n_docs)
    body = {
        "format": FORMAT,
        "settings": settings,
        # each file's sha256 where the caller knows it: two inputs of the same name and shape but
        # other bytes are other builds (helper-24: the second was taken for the first, finished)
        "files": [{"rel": f["rel"], "size": f["size"], **({"sha256": f["sha256"]} if "sha256" in f else {}),
                   "documents": c["documents"], "chars": c["chars"]}
                  for f, c in zip(files, counts)],
        "documents": n_docs,
        "chars": n_chars,
        "shards_requested": shards,
        "shard_chars": shard_chars,
        "shards": [[a, b] for a, b in zip(bounds, bounds[1:])] if n else [],
    }
    return {"format": FORMAT, "build_id": _sha(body), "key": key, "body": body,
            "locations": [{"path": f["path"], "mtime_ns": f["mtime_ns"]} for f in files]}


def read_plan(work: Path) -> dict | None:
    """The plan saved in a work directory, or None.

    Raises
    ------
    CorruptStoreError
        The file is damaged (its ``build_id`` no longer matches its body).
    """
    try:
        plan = json.loads((work / PLAN).read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as exc:
        raise CorruptStoreError(f"{work / PLAN}: not a readable build plan ({exc}); delete the work directory") from exc
    if not isinstance(plan, dict) or plan.get("format") != FORMAT or _sha(plan.get("body")) != plan.get("build_id"):
        raise CorruptStoreError(f"{work / PLAN}: the build plan is damaged or of another format; "
                                "delete the work directory and build again")
    return plan


def write_plan(work: Path, plan: dict) -> None:
    fileio.atomic_write(work / PLAN, [json.dumps(plan, indent=1, sort_keys=True).encode() + b"\n"])


def read_documents(plan: dict, first: int, end: int) -> Iterator[InputDocument]:
    """Documents ``[first, end)`` of the plan's document stream (over all files).

    Raises
    ------
    InvalidInputError
        An input file changed since the plan was made (size or document count).
    InvalidDocumentError, InputReadError
        As :func:`retrostore.text.inputs.iter_documents`.
    """
    body = plan["body"]
    tf, mf = body["settings"]["text_field"], body["settings"]["meta_field"]
    offset = 0
    for f, loc in zip(body["files"], plan["locations"]):
        n = f["documents"]
        if offset + n > first and offset < end and n:
            path = Path(loc["path"])
            size = path.stat().st_size
            if size != f["size"]:
                raise InvalidInputError(
                    f"{path}: {size} bytes, but {f['size']} when the build was planned; the input changed: "
                    "restore it, or delete the work directory to plan the build again")
            lo, hi = max(first - offset, 0), min(end - offset, n)
            with contextlib.closing(read_file(path, f["rel"], tf, mf, None)) as docs:
                got = 0
                for doc in itertools.islice(docs, lo, hi):
                    got += 1
                    yield doc
            if got != hi - lo:
                raise InvalidInputError(f"{path}: holds fewer documents than when the build was planned; "
                                        "the input changed: delete the work directory to plan the build again")
        offset += n
        if offset >= end:
            break


# -- stage 3: one shard ----------------------------------------------------------
