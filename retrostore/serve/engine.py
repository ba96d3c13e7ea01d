"""The store side of a server: one read-only Store, used by one thread (the batcher's).

:class:`Engine` opens the store, answers batches of search and neighbours
requests with as few embedder and FAISS calls as the requests allow, looks
chunks and documents up by id, and moves to each newly committed version
between batches: a follower thread opens and warms that version's handle
(:mod:`retrostore.serve.follow`), and the batcher swaps it in. It uses
``retrostore.open`` and ``Store`` methods, and three internals named where
they are used (the exclusion search's reader, the chunk table's commit chain
and file identity); every answer is built from one committed version.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

import retrostore
from retrostore.errors import EmbedderMismatchError, InvalidInputError, RetrostoreError, StoreReplacedError
from retrostore.storage.manifest import manifest_stamp
from retrostore.store.retrieval import search_excluding

from .follow import Follower, manifest_path
from .schema import IdsRequest, NeighborsRequest, RequestError, SearchRequest, StoreFacts
from .settings import ServeSettings
from .wire import scores_to_json

__all__ = ["Engine"]

log = logging.getLogger("retrostore.serve")

class Engine:
    """A read-only store and the batch operations a server runs on it.

    Not thread-safe: one thread (the batcher's) opens it and makes every call.
    """

    def __init__(self, settings: ServeSettings, embedder: Any = None) -> None:
        self.settings = settings
        self._embedder = embedder
        self.store: retrostore.Store | None = None
        self.facts: StoreFacts | None = None
        self.version = -1
        self.len = 0
        self.doc_limit = 0
        self.mmap = False
        self.started_at = time.time()
        self._info: dict | None = None
        self._follower: Follower | None = None
        self._shared_embedder: Any = None  # the served handle's, given to each next version's handle

    # -- lifecycle -----------------------------------------------------------
    def open(self) -> None:
        """Open the store read-only (memory-mapped when asked, or by default with several workers)."""
        s = self.settings
        stamp = manifest_stamp(manifest_path(s.store))  # before the open: a commit after it is the follower's to see
        embedder = self._embedder
        if embedder is None and s.spin:
            try:  # the default model with spinning threads (ServeSettings.spin)
                embedder = retrostore.default_embedder(threads=s.worker_threads(), spin=True)
            except RetrostoreError:  # not installed: the store says so when text must be embedded
                embedder = None
        self.store = self._open(embedder)
        if self.store is None:  # the store was built with another model: as without spin
            self.store = self._open(self._embedder)
        self._on_version(self.store.info())
        _warm(self.store)
        try:  # load the model now, not on the first request
            self.store.embedder.embed(["warm up"])
            self._shared_embedder = self.store.embedder
        except EmbedderMismatchError:
            self._shared_embedder = self._embedder
            log.warning("%s was built with an embedder this server does not have: text queries will be refused; "
                        "search with vectors, or serve it from Python with create_app(..., embedder=...)", s.store)
        if s.follow:
            self._follower = Follower(s.store, self._open_next,
                                      lambda: (self.version, self._info["manifest_sha256"]), s.refresh_interval_s, stamp)
            self._follower.start()

    def _open(self, embedder: Any) -> "retrostore.Store | None":
        """The store opened read-only (memory-mapped when asked, or by default with several
        workers); None when ``embedder`` is the spinning default one and the store has another."""
        s = self.settings
        kwargs = dict(embedder=embedder, threads=s.worker_threads())
        try:
            if s.mmap is None and s.workers > 1:
                try:
                    return retrostore.open(s.store, mmap=True, **kwargs)
                except InvalidInputError as exc:  # a factory FAISS cannot map (fast-scan PQ)
                    log.warning("serving %s without memory mapping: %s", s.store, exc)
            return retrostore.open(s.store, mmap=s.mmap, **kwargs)
        except EmbedderMismatchError:
            if embedder is None or embedder is self._embedder:
                raise
            return None

    def close(self) -> None:
        if self._follower is not None:
            self._follower.stop()
            self._follower = None
        if self.store is not None:
            self.store.close()

    def _on_version(self, info: dict) -> None:
        """Take the facts of the handle now served (``info``: its ``Store.info()``; a replaced store
        directory can hold a store of another width, metric or tokenizer, and a ``reindex --mmap``
        changes ``mmap``)."""
        store = self.store
        self.version = store.version
        self.len = len(store)
        self.doc_limit = int(store.manifest["next_doc_id"])
        self._info = info
        self.mmap = bool(info["index"]["mmap"])
        self.facts = StoreFacts(dim=int(info["dim"]), chunk_tokens=int(info["chunk_tokens"]),
                                vocab_size=int(info["tokenizer"]["vocab_size"]), metric=str(info["metric"]))

    def maybe_refresh(self) -> bool:
        """Serve the newest committed version when the follower has prepared it (between batches,
        on the batcher thread; :mod:`retrostore.serve.follow`): the handle it opened and warmed
        replaces the served one, which is closed.

        Returns True when the version changed.

        Raises
        ------
        RetrostoreError
            Opening a newer version failed since the last call (logged by the follower; the
            served version stays): for the caller's metrics.
        """
        follower = self._follower
        if follower is None:
            return False
        failures = follower.failures()
        new = follower.take()
        if new is None:
            if failures:
                raise RetrostoreError(failures[-1])
            return False
        old = self.store
        replaced = old._table.replaced()  # (the directory now holds another store)
        self.store = new.store
        self._on_version(new.info)
        old.close()
        if replaced:
            log.info("the store directory was replaced: now serving version %d (%d chunks) of the new store",
                     self.version, self.len)
        else:
            log.info("now serving version %d (%d chunks)", self.version, self.len)
        return True

    def _open_next(self) -> "_Prepared":
        """The follower's work (its thread): the store opened again as at start, with the served
        handle's embedder, checked, warmed and its ``info()`` read; the served handle is not touched."""
        s = self.settings
        try:
            store = self._open(self._shared_embedder)
        except StoreReplacedError as exc:  # its lock file is the old store's: LMDB allows one per process
            raise StoreReplacedError(
                f"the store directory {s.store} was replaced by copying a store over it; this server "
                f"keeps serving version {self.version} of the store it opened (whose files it holds) and cannot "
                "open the new one beside it: restart the server to serve the new store (a directory replaced "
                "whole, rm -rf then unpack or rename, is taken over without a restart)") from exc
        if store is None:
            store = self._open(self._embedder)
        try:
            if not store._table_matches_manifest():  # (rsync replaces chunks.lmdb before manifest.json)
                raise StoreReplacedError(
                    f"the store directory {s.store} was replaced and its new copy is not complete yet "
                    f"(its chunk table and manifest are of different commits); staying at version {self.version} "
                    "of the store opened before until it is")
            _warm(store)
            return _Prepared(store, store.info())
        except BaseException:
            store.close()
            raise

    # -- facts -----------------------------------------------------------------
    def server_facts(self) -> dict:
        s = self.settings
        return {"pid": os.getpid(), "workers": s.workers, "threads": s.worker_threads(), "mmap": self.mmap,
                "follow": s.follow, "batch_window_ms": s.batch_window_ms, "max_batch": s.max_batch,
                "max_body_bytes": s.max_body_bytes, "body_timeout_s": s.body_timeout_s,
                "max_queries": s.max_queries, "max_k": s.max_k, "max_ids": s.max_ids,
                "max_neighbors": s.max_neighbors, "len": self.len, "next_doc_id": self.doc_limit,
                "retrostore_version": retrostore.__version__,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at))}

    def info(self) -> dict:
        """``Store.info()`` of the version served (read when it was opened), with a ``server`` section."""
        return {**self._info, "server": self.server_facts()}

    # -- search ----------------------------------------------------------------
    def _embed_tokens(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """Vectors of token-id chunks, as ``Store.neighbors`` embeds them."""
        store = self.store
        emb = store.embedder
        fingerprint = getattr(emb, "fingerprint", None) or {}
        if hasattr(emb, "embed_token_ids") and fingerprint.get("tokenizer_sha256") == store.chunker.sha256:
            return emb.embed_token_ids(list(rows))
        return emb.embed([store.chunker.decode(r) for r in rows])

    def search(self, reqs: Sequence[SearchRequest]) -> list:
        """Answer search requests together: one embedder call per kind of input, one FAISS
        call per (k, params) group. Returns, per request, its answer dict or the exception
        that refused it (one bad request never fails the others)."""
        out: list[Any] = [None] * len(reqs)
        vecs: list[np.ndarray | None] = [None] * len(reqs)
        for i, r in enumerate(reqs):
            if r.n == 0 or self.len == 0:  # as Store.search: no queries, or an empty store
                out[i] = _empty_answer(r)
        todo = [i for i in range(len(reqs)) if out[i] is None]
        self._embed_group(reqs, todo, out, vecs, "texts", lambda items: self.store.embedder.embed(items))
        self._embed_group(reqs, todo, out, vecs, "token_rows", self._embed_tokens)
        for i in todo:
            if reqs[i].vectors is not None:
                vecs[i] = reqs[i].vectors
        found: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in todo:
            if out[i] is None and not reqs[i].exclude:
                groups[(reqs[i].k, reqs[i].params_key)].append(i)
        for idx in groups.values():
            self._search_group(reqs, idx, vecs, out, found)
        records: dict[int, Any] = {}
        for i in todo:
            if out[i] is None and reqs[i].exclude:
                try:
                    found[i] = self._search_excluding(vecs[i], reqs[i])
                except RetrostoreError as exc:
                    out[i] = _as_request_error(exc, "params", reqs[i].params)
        live = [i for i in todo if out[i] is None]
        try:
            self._answer(reqs, live, found, records, out)
        except RetrostoreError as exc:
            for i in live:
                out[i] = exc
        return out

    def _embed_group(self, reqs, todo: list[int], out, vecs, attr: str, embed) -> None:
        idx = [i for i in todo if getattr(reqs[i], attr) is not None]
        if not idx:
            return
        items = [x for i in idx for x in getattr(reqs[i], attr)]
        try:
            allv = embed(items)
        except EmbedderMismatchError as exc:
            err = RequestError(f"{exc} (this server cannot embed {'text' if attr == 'texts' else 'token ids'}: "
                               "send vectors instead)", field="query" if attr == "texts" else "token_ids",
                               status=409, kind="EmbedderMismatchError")
            for i in idx:
                out[i] = err
            return
        start = 0
        for i in idx:
            n = reqs[i].n
            vecs[i] = allv[start:start + n]
            start += n

    def _search_group(self, reqs, idx: list[int], vecs, out, found) -> None:
        r0 = reqs[idx[0]]
        try:
            scores, ids = self.store.search_vectors(np.concatenate([vecs[i] for i in idx]), r0.k, params=r0.params)
        except RetrostoreError as exc:
            # Vectors and k were checked before queueing; what is left to refuse is the
            # search parameters, which every request of the group shares.
            err = _as_request_error(exc, "params", r0.params)
            for i in idx:
                out[i] = err
            return
        start = 0
        for i in idx:
            n = reqs[i].n
            found[i] = (scores[start:start + n], ids[start:start + n])
            start += n

    def _search_excluding(self, vectors: np.ndarray, r: SearchRequest) -> tuple[np.ndarray, np.ndarray]:
        """k nearest chunks per query outside ``r.exclude``, with the request's search parameters:
        what ``Store.neighbors`` does (:func:`retrostore.store.retrieval.search_excluding`: the
        excluded documents left out inside the index, or widened up to the whole store)."""
        reader = self.store._reader
        return search_excluding(reader, vectors, r.k, [set(r.exclude)] * len(vectors), reader.doc_ids_of,
                                params=r.params)

    def _fetch_chunks(self, ids: set, records: dict, *, missing_ok: bool = False) -> None:
        """Read the chunks ``ids`` not yet in ``records`` (one LMDB pass). With
        ``missing_ok``, ids that cannot be read (chunks of a deleted document) are skipped."""
        want = sorted(i for i in ids if i not in records)
        if not want:
            return
        try:
            records.update(zip(want, self.store.get_chunks(want)))
        except InvalidInputError:
            if not missing_ok:
                raise
            for i in want:
                try:
                    records[i] = self.store.get_chunks([i])[0]
                except InvalidInputError:
                    records[i] = None

    def _answer(self, reqs, live: list[int], found, records: dict, out) -> None:
        """Turn (scores, ids) into answers: hits with text, continuation and metadata, or id arrays."""
        hit_reqs = [i for i in live if reqs[i].output == "hits"]
        ids = {int(c) for i in hit_reqs for c in found[i][1].ravel() if c >= 0}
        self._fetch_chunks(ids, records)
        nexts = {c + 1 for c in ids if c + 1 < self.len}
        self._fetch_chunks(nexts, records, missing_ok=True)
        docs = sorted({records[c].doc_id for i in hit_reqs if reqs[i].metadata
                       for c in (int(x) for x in found[i][1].ravel()) if c >= 0})
        meta = dict(zip(docs, self.store.get_metadata(docs))) if docs else {}
        for i in live:
            r = reqs[i]
            scores, chunk_ids = found[i]
            if r.output == "ids":
                out[i] = {"scores": scores_to_json(scores), "chunk_ids": chunk_ids.tolist()}
                continue
            results = []
            for row_s, row_i in zip(scores.tolist(), chunk_ids.tolist()):
                hits = []
                for s, c in zip(row_s, row_i):
                    if c < 0:
                        continue
                    rec = records[c]
                    nxt = records.get(c + 1)
                    if nxt is not None and nxt.doc_id != rec.doc_id:
                        nxt = None
                    hit = {"chunk_id": c, "doc_id": rec.doc_id, "position": rec.position, "score": s,
                           "text": rec.text, "continuation_text": nxt.text if nxt else ""}
                    if r.tokens:
                        hit["tokens"] = rec.tokens.tolist()
                        hit["continuation_tokens"] = nxt.tokens.tolist() if nxt else []
                    if r.metadata:
                        hit["metadata"] = meta[rec.doc_id]
                    hits.append(hit)
                results.append(hits)
            out[i] = {"results": results}

    # -- neighbours ------------------------------------------------------------
    def neighbors(self, reqs: Sequence[NeighborsRequest]) -> list:
        """``Store.neighbors`` for requests of equal (L, k, label_token, tail) stacked into one call."""
        out: list[Any] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(reqs):
            groups[(r.tokens.shape[1], r.k, r.label_token, r.tail)].append(i)
        for idx in groups.values():
            self._neighbors_group(reqs, idx, out)
        return out

    def _neighbors_group(self, reqs, idx: list[int], out) -> None:
        parts = [reqs[i] for i in idx]
        tokens = parts[0].tokens if len(parts) == 1 else np.concatenate([p.tokens for p in parts])
        exclude = None
        if any(p.exclude is not None for p in parts):
            exclude = [row for p in parts for row in (p.exclude if p.exclude is not None else [None] * len(p.tokens))]
        try:
            p0 = parts[0]
            nb = self.store.neighbors(tokens, p0.k, exclude_doc_ids=exclude, label_token=p0.label_token, tail=p0.tail)
        except EmbedderMismatchError as exc:
            for i in idx:
                out[i] = RequestError(f"{exc} (this server cannot embed token ids)", field="token_ids", status=409,
                                      kind="EmbedderMismatchError")
            return
        except RetrostoreError as exc:
            if len(idx) > 1:
                for i in idx:
                    self._neighbors_group(reqs, [i], out)
                return
            out[idx[0]] = _as_request_error(exc, "token_ids", None)
            return
        start = 0
        for i, p in zip(idx, parts):
            b = len(p.tokens)
            sl = slice(start, start + b)
            out[i] = retrostore.Neighbors(nb.tokens[sl], nb.mask[sl], nb.chunk_ids[sl], nb.doc_ids[sl], nb.scores[sl])
            start += b

    # -- by id -------------------------------------------------------------------
    def chunks(self, req: IdsRequest) -> dict:
        for i in req.ids:
            if i >= self.len:
                raise RequestError(f"chunk id {i} is outside the committed range [0, {self.len}) of version "
                                   f"{self.version}", field="ids", value=i, limit=[0, self.len - 1], status=404)
        try:
            chunks = self.store.get_chunks(req.ids)
        except InvalidInputError as exc:
            raise _as_request_error(exc, "ids", None, status=404) from None
        return {"chunks": [{"chunk_id": c.chunk_id, "doc_id": c.doc_id, "position": c.position, "start": c.start,
                            "text": c.text, "tokens": c.tokens.tolist()} for c in chunks]}

    def documents(self, req: IdsRequest) -> dict:
        for i in req.ids:
            if i >= self.doc_limit:
                raise RequestError(f"document id {i} is outside the committed range [0, {self.doc_limit}) of "
                                   f"version {self.version}", field="ids", value=i, limit=[0, self.doc_limit - 1],
                                   status=404)
        try:
            if not req.text:
                metas = self.store.get_metadata(req.ids)
                return {"documents": [{"doc_id": i, "metadata": m} for i, m in zip(req.ids, metas)]}
            docs = [self.store.get_document(i) for i in req.ids]
        except InvalidInputError as exc:
            raise _as_request_error(exc, "ids", None, status=404) from None
        return {"documents": [{"doc_id": d.doc_id, "text": d.text, "metadata": d.metadata,
                               "chunk_ids": [d.chunk_ids.start, d.chunk_ids.stop]} for d in docs]}


@dataclass
class _Prepared:
    """A newly opened handle and its ``info()``, read in the follower's thread."""

    store: "retrostore.Store"
    info: dict

    @property
    def manifest_sha256(self) -> str:
        return self.info["manifest_sha256"]

    def close(self) -> None:
        self.store.close()


def _warm(store: "retrostore.Store") -> None:
    """Run what a handle's first requests would otherwise pay: its first search (a read-only handle
    of a streamed store merges the index segments in memory then: 0.2 s for 600k vectors) and the
    chunker's tokenizer."""
    if len(store):
        store.search_vectors(np.zeros((1, store.manifest["index"]["dim"]), np.float32), 1)
    store.chunker  # noqa: B018


def _empty_answer(r: SearchRequest) -> dict:
    """The answer of a request with no queries, or to an empty store (no neighbours)."""
    if r.output == "hits":
        return {"results": [[] for _ in range(r.n)]}
    return {"scores": [[None] * r.k for _ in range(r.n)], "chunk_ids": [[-1] * r.k for _ in range(r.n)]}


def _as_request_error(exc: RetrostoreError, field: str, value: Any, status: int = 400) -> RetrostoreError:
    """The store's refusal of a request, as a 4xx naming the field (other errors pass through)."""
    if isinstance(exc, RequestError) or not isinstance(exc, InvalidInputError):
        return exc
    return RequestError(str(exc), field=field, value=value, status=status, kind=type(exc).__name__)
