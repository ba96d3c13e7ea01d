"""The stages of a sharded build, as plain functions (no engine).

``retrostore build --engine local|ray`` runs a build in four stages (see
docs/scaling.md); this module holds the work of each, and
:mod:`retrostore._distributed` decides where it runs (in this process, or as
Ray tasks and actors):

1. **plan**: count the documents of every input file (:func:`count_file`) and
   cut the document stream into shards of about equal characters
   (:func:`make_plan`). The same inputs and settings give the same plan and
   the same ``build_id``, the sha256 of the plan's canonical JSON.
2. **train**: when the store's FAISS factory needs training, train an empty
   index template once on a seeded sample (:func:`train_template`); skipped
   for ``Flat``.
3. **shard**: tokenize, embed and encode (with the trained template, when
   there is one) one shard's documents into a shard
   directory (:func:`run_shard`), written under a temporary name and renamed
   into place when complete, so a retried or duplicated task never leaves a
   duplicate or a half-written shard.
4. **merge**: :func:`load_shard` reads a shard back for
   ``Store._append_chunked`` (done by :mod:`retrostore._distributed`).

A shard directory ``shard-NNNNN/``::

    shard.json      {"format", "build_id", "shard", "docs": [first, end), counts,
                     "files": {name: {"size", "sha256"}}}
    chunks.msgpack  one msgpack record per chunk, the encoding of
                    retrostore._chunks.encode_chunks, with doc ids local to the shard
    docs.msgpack    one record per document, the encoding of ChunkTable.pack_doc,
                    with first chunk ids local to the shard
    vectors.npy     float32 (chunks, dim), exactly as embedded
    codes.faiss     when the work directory holds the store's trained template
                    (``template.faiss``): the vectors encoded by a clone of it,
                    adopted by the merge's commit instead of encoding there
                    (``shard.json`` records the template's sha256)
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import itertools
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import msgpack
import numpy as np

from . import _fileio
from ._chunking import Chunk, Chunker
from ._chunks import encode_chunks
from ._inputs import InputDocument, _expand, _read_file
from ._metadata import clean_metadata
from ._vectors import write_vectors
from .errors import CorruptStoreError, InvalidInputError

__all__ = [
    "PLAN", "SHARD_CHARS", "input_files", "plan_key", "count_file", "make_plan", "read_documents",
    "run_shard", "load_shard", "shard_complete", "shard_dir", "needs_training", "train_template",
    "FAULT_ENV",
]

FORMAT = 1
PLAN = "plan.json"
TOKENIZER = "tokenizer.json"
TEMPLATE = "template.faiss"
CODES = "codes.faiss"  # a shard's vectors encoded with TEMPLATE (when stage 2 trained one)
#: Default characters of input text per shard (~16 M tokens, ~250 k chunks of 64 tokens).
SHARD_CHARS = 64_000_000
#: Most balancing marks kept per input file (see :func:`count_file`).
MARKS_MAX = 4096
#: Fault injection for tests: ``"SHARD:MODE:MARKER"``; the first attempt of shard
#: SHARD (while MARKER does not exist) creates MARKER then dies part-way through
#: writing: MODE ``exit`` is ``os._exit(1)`` (a killed worker), ``raise`` raises.
FAULT_ENV = "RETROSTORE_FAULT_SHARD"
_TMP = f"{_fileio.TMP_PREFIX}shard-"
_FILES = ("chunks.msgpack", "docs.msgpack", "vectors.npy")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _sha(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()


# -- stage 1: plan -------------------------------------------------------------
def input_files(inputs: Sequence[str | os.PathLike]) -> list[dict]:
    """The input files in reading order: ``{"path", "rel", "size", "mtime_ns"}``.

    ``rel`` is the name ``build`` stores as a ``.txt`` file's source.

    Raises
    ------
    InputNotFoundError, InvalidInputError
        As :func:`retrostore._inputs.expand_inputs`.
    """
    out = []
    for path, rel in _expand(inputs):
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
    with contextlib.closing(_read_file(Path(path), rel, text_field, meta_field, None)) as docs:
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
        "files": [{"rel": f["rel"], "size": f["size"], "documents": c["documents"], "chars": c["chars"]}
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
    _fileio.atomic_write(work / PLAN, [json.dumps(plan, indent=1, sort_keys=True).encode() + b"\n"])


def read_documents(plan: dict, first: int, end: int) -> Iterator[InputDocument]:
    """Documents ``[first, end)`` of the plan's document stream (over all files).

    Raises
    ------
    InvalidInputError
        An input file changed since the plan was made (size or document count).
    InvalidDocumentError, InputReadError
        As :func:`retrostore._inputs.iter_documents`.
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
            with contextlib.closing(_read_file(path, f["rel"], tf, mf, None)) as docs:
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
def shard_dir(work: Path, index: int) -> Path:
    return work / f"shard-{index:05d}"


def _shard_meta(work: Path, plan: dict, index: int) -> dict | None:
    """The shard's ``shard.json`` when it belongs to this plan, else None."""
    try:
        meta = json.loads((shard_dir(work, index) / "shard.json").read_bytes())
    except (OSError, ValueError):
        return None
    if (not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("build_id") != plan["build_id"]
            or meta.get("shard") != index or meta.get("docs") != plan["body"]["shards"][index]):
        return None
    return meta


def shard_complete(work: Path, plan: dict, index: int, *, checksums: bool = False) -> bool:
    """Whether shard ``index`` of ``plan`` is finished (its directory is in place
    and its files have the recorded sizes, and checksums when asked)."""
    meta = _shard_meta(work, plan, index)
    if meta is None:
        return False
    d = shard_dir(work, index)
    for name in _FILES:
        want = meta["files"].get(name, {})
        try:
            if checksums:
                size, sha = _fileio.sha256_file(d / name)
                if (size, sha) != (want.get("size"), want.get("sha256")):
                    return False
            elif (d / name).stat().st_size != want.get("size"):
                return False
        except OSError:
            return False
    return True


def _fault_point(index: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    shard, mode, marker = spec.split(":", 2)
    if int(shard) != index or os.path.exists(marker):
        return
    Path(marker).write_text("fault injected\n")
    if mode == "exit":
        os._exit(1)
    raise RuntimeError(f"fault injected in shard {index} ({FAULT_ENV})")


def run_shard(plan: dict, index: int, work: str | os.PathLike, embedder: Any) -> dict:
    """Tokenize, embed and encode shard ``index`` into ``work/shard-NNNNN/``.

    Idempotent: a finished shard is left as it is. The directory is written as
    ``.tmp-shard-NNNNN.<pid>.<random>/``, fsynced and renamed into place; when
    a duplicate of this task finished first, this copy is discarded.

    Parameters
    ----------
    plan : dict
        From :func:`make_plan`.
    index : int
    work : path-like
        The work directory (``plan.json`` and ``tokenizer.json`` in it).
    embedder : Embedder
        The store's embedder (any execution provider).

    Returns
    -------
    dict
        ``{"shard", "documents", "chunks", "reused", "providers"}``.

    Raises
    ------
    InvalidInputError, InvalidDocumentError, InvalidMetadataError, InputReadError
        Bad or changed input.
    InvalidEmbeddingsError
        The embedder returned a wrong shape or non-finite values.
    OSError
        Writing the shard failed; nothing is left in place.
    """
    work = Path(work)
    providers = list(getattr(getattr(embedder, "_session", None), "get_providers", lambda: ["?"])())
    meta = _shard_meta(work, plan, index)
    if meta is not None and shard_complete(work, plan, index):
        return {"shard": index, "documents": meta["documents"], "chunks": meta["chunks"], "reused": True,
                "providers": providers}
    settings = plan["body"]["settings"]
    first, end = plan["body"]["shards"][index]
    texts, metas = [], []
    for doc in read_documents(plan, first, end):
        texts.append(doc.text)
        metas.append(clean_metadata(doc.metadata, f"{doc.source} metadata"))
    chunker = Chunker(work / TOKENIZER, settings["chunk_tokens"])
    if chunker.sha256 != settings["tokenizer_sha256"]:
        raise CorruptStoreError(f"{work / TOKENIZER}: differs from the store's tokenizer; delete the work directory")
    per_doc = chunker.chunk_many(texts)
    n_chunks = sum(len(c) for c in per_doc)
    vectors = _embed(embedder, settings, texts, per_doc, n_chunks)

    tmp = work / f"{_TMP}{index:05d}.{os.getpid()}.{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        dtype = settings["token_dtype"]
        chunk_recs, doc_recs, cid = [], [], 0
        for did, (text, chunks, m) in enumerate(zip(texts, per_doc, metas)):
            doc_recs.append(msgpack.packb({"c": cid, "n": len(chunks), "m": m, **({} if chunks else {"x": text})},
                                          use_bin_type=True))
            chunk_recs += encode_chunks(dtype, did, text, chunks)
            cid += len(chunks)
        files = {}
        files["chunks.msgpack"] = _fileio.write_durable(tmp / "chunks.msgpack", chunk_recs)
        _fault_point(index)  # tests: die part-way, leaving a half-written temporary directory
        files["docs.msgpack"] = _fileio.write_durable(tmp / "docs.msgpack", doc_recs)
        files["vectors.npy"] = write_vectors(tmp / "vectors.npy", vectors, "float32")
        tpl_sha = None
        if n_chunks and (work / TEMPLATE).is_file():  # stage 2 trained the index: encode here, not at merge
            from ._index import write_index

            tpl_sha, codes = _encode(work / TEMPLATE, vectors)
            files[CODES] = write_index(tmp / CODES, codes)  # streamed: no in-memory copy of the file
        meta = {"format": FORMAT, "build_id": plan["build_id"], "shard": index, "docs": [first, end],
                "documents": len(texts), "chunks": n_chunks, "dim": int(vectors.shape[1]),
                "template_sha256": tpl_sha,
                "files": {name: {"size": s, "sha256": h} for name, (s, h) in files.items()}}
        _fileio.write_durable(tmp / "shard.json", [json.dumps(meta, indent=1, sort_keys=True).encode()])
        _fileio.fsync_dir(tmp)
        _publish(tmp, shard_dir(work, index))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"shard": index, "documents": len(texts), "chunks": n_chunks, "reused": False, "providers": providers}


def _encode(template_path: Path, vectors: np.ndarray) -> tuple[str, Any]:
    """(sha256 of the template file, an index of ``vectors`` encoded by a clone of it)."""
    import faiss

    raw = template_path.read_bytes()
    index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
    for lo in range(0, len(vectors), 65536):
        index.add(np.ascontiguousarray(vectors[lo : lo + 65536], dtype=np.float32))
    return hashlib.sha256(raw).hexdigest(), index


def load_codes(work: Path, plan: dict, index: int, template_sha256: str) -> Any:
    """The shard's vectors as encoded by the shard task (a FAISS index), when it encoded them
    with the template whose sha256 is ``template_sha256`` (the store's); else None.

    Raises
    ------
    CorruptStoreError
        The codes file is damaged or holds another number of vectors.
    """
    import faiss

    meta = _shard_meta(work, plan, index)
    if meta is None or meta.get("template_sha256") != template_sha256 or CODES not in meta["files"]:
        return None
    path = shard_dir(work, index) / CODES
    want = meta["files"][CODES]
    try:
        size, sha = _fileio.sha256_file(path)
        if (size, sha) != (want["size"], want["sha256"]):
            raise CorruptStoreError(f"{path}: shard codes are damaged; delete the shard and build again")
        codes = faiss.read_index(str(path))
    except (OSError, RuntimeError) as exc:
        raise CorruptStoreError(f"{path}: shard codes cannot be read ({exc})") from exc
    if codes.ntotal != meta["chunks"]:
        raise CorruptStoreError(f"{path}: holds {codes.ntotal} vectors, the shard {meta['chunks']}")
    return codes


def _embed(embedder: Any, settings: dict, texts: list[str], per_doc: list, n_chunks: int) -> np.ndarray:
    from ._embed import embed_chunks
    from .errors import InvalidEmbeddingsError

    dim = settings["dim"]
    if not n_chunks:
        return np.zeros((0, dim), np.float32)
    vectors = embed_chunks(embedder, settings["tokenizer_sha256"], texts, per_doc)
    if vectors.shape != (n_chunks, dim):
        raise InvalidEmbeddingsError(f"the embedder returned shape {vectors.shape}, expected ({n_chunks}, {dim})")
    if not np.isfinite(vectors).all():
        raise InvalidEmbeddingsError("the embedder returned NaN or inf")
    return vectors


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temporary shard directory into place, once."""
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # a duplicate of this task finished first: same content
        return
    _fileio.fsync_dir(final.parent)


def clean_temporaries(work: Path) -> int:
    """Remove half-written shard directories left by killed tasks; returns how many."""
    n = 0
    for p in work.glob(f"{_TMP}*"):
        shutil.rmtree(p, ignore_errors=True)
        n += 1
    return n


# -- stage 4 input: a shard read back ----------------------------------------------
def load_shard(work: Path, plan: dict, index: int) -> tuple[list[str], list[list[Chunk]], list, np.ndarray]:
    """Read a finished shard back: texts, chunks per document, metadata, vectors.

    The checksums recorded in ``shard.json`` are verified first.

    Raises
    ------
    CorruptStoreError
        The shard is missing, incomplete, damaged or of another build.
    """
    d = shard_dir(work, index)
    meta = _shard_meta(work, plan, index)
    if meta is None or not shard_complete(work, plan, index, checksums=True):
        raise CorruptStoreError(f"{d}: shard is missing or damaged; delete it and build again to redo it")
    dtype = np.dtype(plan["body"]["settings"]["token_dtype"])
    try:
        with open(d / "chunks.msgpack", "rb") as fh:
            chunk_recs = list(msgpack.Unpacker(fh, raw=False))
        with open(d / "docs.msgpack", "rb") as fh:
            doc_recs = list(msgpack.Unpacker(fh, raw=False))
        vectors = np.load(d / "vectors.npy", allow_pickle=False)
    except Exception as exc:
        raise CorruptStoreError(f"{d}: shard files cannot be read ({exc})") from exc
    if (len(chunk_recs), len(doc_recs), vectors.shape) != (meta["chunks"], meta["documents"],
                                                             (meta["chunks"], meta["dim"])):
        raise CorruptStoreError(f"{d}: shard holds other counts than its shard.json says")
    texts, per_doc = [], []
    for did, r in enumerate(doc_recs):
        recs = chunk_recs[r["c"] : r["c"] + r["n"]]
        if any(c["d"] != did for c in recs):
            raise CorruptStoreError(f"{d}: chunk records of document {did} are out of order")
        per_doc.append([Chunk(c["p"], np.frombuffer(c["t"], dtype).astype(np.int64), c["o"], c["o"] + len(c["s"]))
                        for c in recs])
        texts.append("".join(c["s"] for c in recs) if recs else r.get("x", ""))
    return texts, per_doc, [r["m"] for r in doc_recs], np.ascontiguousarray(vectors, dtype=np.float32)


# -- stage 2: index template ------------------------------------------------------
def needs_training(factory: str, dim: int, metric: str) -> bool:
    """Whether FAISS needs a training pass before vectors can be added (``auto``: no, the
    store trains at the commit that crosses its threshold; see docs/index.md)."""
    import faiss

    if factory == "auto":
        return False

    from ._index import METRICS

    return not faiss.index_factory(int(dim), factory, METRICS[metric]).is_trained


def train_template(plan: dict, work: Path, embedder: Any, *, factory: str | None = None,
                   train_vectors: int | None = None, seed: int = 0, info: dict | None = None) -> Path | None:
    """Train an index factory once, on a seeded sample of the build's chunks (stage 2).

    Returns None when ``factory`` (default: the plan's ``index`` setting)
    needs no training (``Flat``). Otherwise documents at seeded random
    positions of the document stream are chunked and embedded (one pass over
    the inputs), ``train_vectors`` of their chunks (default: the store's
    :func:`retrostore._training.default_train_size`, 64 per centroid, at least
    16,384) train an
    empty index after the store's sample checks, and it is written to
    ``work/template.faiss``. Same plan, factory and seed: same template.
    ``info``, when given, receives ``sample``: the vectors trained on.

    Raises
    ------
    IndexTrainingError
        The sample is too small for a stage of ``factory`` (the message gives
        the counts and a factory string that fits), or FAISS fails.
    """
    from ._index import write_index
    from ._training import default_train_size
    from ._training import train_template as train_index

    s = plan["body"]["settings"]
    factory = factory or s["index"]
    dim, metric = int(s["dim"]), s["metric"]
    if not needs_training(factory, dim, metric):
        return None
    if train_vectors is None:
        train_vectors = default_train_size(factory, 1 << 62, dim, metric)
    n_docs = plan["body"]["documents"]
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(n_docs, size=min(n_docs, train_vectors), replace=False)) if n_docs else []
    wanted = set(int(i) for i in picked)
    texts = [doc.text for i, doc in enumerate(read_documents(plan, 0, n_docs)) if i in wanted]
    chunker = Chunker(work / TOKENIZER, s["chunk_tokens"])
    per_doc = chunker.chunk_many(texts)
    order = [(d, j) for d, cs in enumerate(per_doc) for j in range(len(cs))]
    keep = sorted(rng.permutation(len(order))[:train_vectors]) if len(order) > train_vectors else range(len(order))
    sub: list[list[Chunk]] = [[] for _ in texts]
    for k in keep:
        d, j = order[k]
        sub[d].append(per_doc[d][j])
    x = _embed(embedder, s, texts, sub, sum(len(c) for c in sub))
    if info is not None:
        info["sample"] = len(x)
    index = train_index(factory, dim, metric, x, describe=f" (stage 2: seeded sample {seed} of the build's chunks)")
    path = work / TEMPLATE
    tmp = _fileio.temporary_name(path)
    write_index(tmp, index)  # streamed: a template of a large nlist is large
    _fileio.put_in_place(tmp, path)
    return path
