"""The stages of a sharded build, as plain functions (no engine).

``retrostore build --engine local|ray`` runs a build in four stages (see
docs/scaling.md); this module holds the work of each, and
:mod:`retrostore.build.engines` decides where it runs (in this process, or as
Ray tasks and actors):

1. **plan**: :mod:`retrostore.build.plan`.
2. **train**: when the store's FAISS factory needs training, train an empty
   index template once on a seeded sample (:func:`train_template`); skipped
   for ``Flat``.
3. **shard**: tokenize, embed and encode (with the trained template, when
   there is one) one shard's documents into a shard
   directory (:func:`run_shard`), written under a temporary name and renamed
   into place when complete, so a retried or duplicated task never leaves a
   duplicate or a half-written shard.
4. **merge**: :func:`load_shard` reads a shard back for
   the writer's ``stage`` (done by :mod:`retrostore.build.sharded`).

A shard directory ``shard-NNNNN/``::

    shard.json      {"format", "build_id", "shard", "docs": [first, end), counts,
                     "files": {name: {"size", "sha256"}}}
    chunks.msgpack  one msgpack record per chunk, the encoding of
                    retrostore.storage.records.encode_chunks, with doc ids local to the shard
    docs.msgpack    one record per document, the encoding of retrostore.storage.records.encode_doc,
                    with first chunk ids local to the shard
    vectors.npy     float32 (chunks, dim), exactly as embedded
    codes.faiss     when the work directory holds the store's trained template
                    (``template.faiss``): the vectors encoded by a clone of it,
                    adopted by the merge's commit instead of encoding there
                    (``shard.json`` records the template's sha256)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import faiss
import msgpack
import numpy as np

from ..errors import CorruptStoreError, InvalidEmbeddingsError
from ..index.training import default_train_size
from ..index.training import train_template as train_index
from ..storage import fileio
from ..storage.layout import TMP_PREFIX
from ..storage.metadata import clean_metadata
from ..storage.records import encode_chunks, encode_doc
from ..storage.faisstypes import METRICS
from ..storage.segments import write_index
from ..storage.vectors import write_vectors
from ..text.chunking import Chunk, Chunker
from ..text.models import embed_chunks
from .plan import FORMAT, TOKENIZER, read_documents

__all__ = [
    "TEMPLATE", "CODES", "FAULT_ENV", "run_shard", "load_shard", "load_codes", "shard_complete", "shard_dir",
    "clean_temporaries", "needs_training", "train_template",
]

TEMPLATE = "template.faiss"
CODES = "codes.faiss"  # a shard's vectors encoded with TEMPLATE (when stage 2 trained one)
#: Fault injection for tests: ``"SHARD:MODE:MARKER"``; the first attempt of shard
#: SHARD (while MARKER does not exist) creates MARKER then dies part-way through
#: writing: MODE ``exit`` is ``os._exit(1)`` (a killed worker), ``raise`` raises.
FAULT_ENV = "RETROSTORE_FAULT_SHARD"
_TMP = f"{TMP_PREFIX}shard-"
_FILES = ("chunks.msgpack", "docs.msgpack", "vectors.npy")


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
                size, sha = fileio.sha256_file(d / name)
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
            doc_recs.append(encode_doc(cid, len(chunks), m, None if chunks else text))
            chunk_recs += encode_chunks(dtype, did, text, chunks)
            cid += len(chunks)
        files = {}
        files["chunks.msgpack"] = fileio.write_durable(tmp / "chunks.msgpack", chunk_recs)
        _fault_point(index)  # tests: die part-way, leaving a half-written temporary directory
        files["docs.msgpack"] = fileio.write_durable(tmp / "docs.msgpack", doc_recs)
        files["vectors.npy"] = write_vectors(tmp / "vectors.npy", vectors, "float32")
        tpl_sha = None
        if n_chunks and (work / TEMPLATE).is_file():  # stage 2 trained the index: encode here, not at merge
            tpl_sha, codes = _encode(work / TEMPLATE, vectors)
            files[CODES] = write_index(tmp / CODES, codes)  # streamed: no in-memory copy of the file
        meta = {"format": FORMAT, "build_id": plan["build_id"], "shard": index, "docs": [first, end],
                "documents": len(texts), "chunks": n_chunks, "dim": int(vectors.shape[1]),
                "template_sha256": tpl_sha,
                "files": {name: {"size": s, "sha256": h} for name, (s, h) in files.items()}}
        fileio.write_durable(tmp / "shard.json", [json.dumps(meta, indent=1, sort_keys=True).encode()])
        fileio.fsync_dir(tmp)
        _publish(tmp, shard_dir(work, index))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"shard": index, "documents": len(texts), "chunks": n_chunks, "reused": False, "providers": providers}


def _encode(template_path: Path, vectors: np.ndarray) -> tuple[str, Any]:
    """(sha256 of the template file, an index of ``vectors`` encoded by a clone of it)."""
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
    meta = _shard_meta(work, plan, index)
    if meta is None or meta.get("template_sha256") != template_sha256 or CODES not in meta["files"]:
        return None
    path = shard_dir(work, index) / CODES
    want = meta["files"][CODES]
    try:
        size, sha = fileio.sha256_file(path)
        if (size, sha) != (want["size"], want["sha256"]):
            raise CorruptStoreError(f"{path}: shard codes are damaged; delete the shard and build again")
        codes = faiss.read_index(str(path))
    except (OSError, RuntimeError) as exc:
        raise CorruptStoreError(f"{path}: shard codes cannot be read ({exc})") from exc
    if codes.ntotal != meta["chunks"]:
        raise CorruptStoreError(f"{path}: holds {codes.ntotal} vectors, the shard {meta['chunks']}")
    return codes


def _embed(embedder: Any, settings: dict, texts: list[str], per_doc: list, n_chunks: int) -> np.ndarray:
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
    fileio.fsync_dir(final.parent)


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
    if factory == "auto":
        return False
    return not faiss.index_factory(int(dim), factory, METRICS[metric]).is_trained


def train_template(plan: dict, work: Path, embedder: Any, *, factory: str | None = None,
                   train_vectors: int | None = None, seed: int = 0, info: dict | None = None) -> Path | None:
    """Train an index factory once, on a seeded sample of the build's chunks (stage 2).

    Returns None when ``factory`` (default: the plan's ``index`` setting)
    needs no training (``Flat``). Otherwise documents at seeded random
    positions of the document stream are chunked and embedded (one pass over
    the inputs), ``train_vectors`` of their chunks (default: the store's
    :func:`retrostore.index.training.default_train_size`, 64 per centroid, at least
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
    tmp = fileio.temporary_name(path)
    write_index(tmp, index)  # streamed: a template of a large nlist is large
    fileio.put_in_place(tmp, path)
    return path
