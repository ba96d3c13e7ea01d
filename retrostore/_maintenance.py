"""Index maintenance: the index part of a commit (template clones, tier merges,
training when due), ``reindex``, ``compact`` and reading stored vectors back.

The Store composes these; each function works on a Store and a manifest body
being prepared, writes only new immutable files (listed in ``new_files`` so a
failed commit removes them) and leaves publishing to the manifest write.
See docs/index.md for the policy and the on-disk entries.
"""

from __future__ import annotations

import copy
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

import faiss
import numpy as np

from . import _fileio, _manifest
from ._deletes import Tombstones, write_tombstones
from ._index import (METRICS, Segment, SegmentSet, build_segment, fp16_codes, fp16_flat, is_ivf, load_segment,
                     merge_segments, mmap_problem, new_index, owned_copy, plan_merge, segment_vectors, write_index)
from ._params import check_params
from ._training import (AUTO_TRAIN_MIN, RETRAIN_GROWTH, check_sample, default_factory, default_params,
                        default_train_size, progress_bar, sample_ids, train_template)
from ._vectors import RawVectors, keeps_files, load_vectors, write_vectors
from .errors import IndexTrainingError, InvalidInputError, RetrostoreError

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["version_index", "commit_index", "reindex", "compact", "stored_vectors", "VectorSource", "fp16_batches"]

log = logging.getLogger("retrostore")
_BATCH = 65536


# -- loading ---------------------------------------------------------------
def version_index(store: "Store", segments: list[Segment]) -> tuple[SegmentSet, Tombstones]:
    """The searchable index of the store's current manifest, and its tombstones."""
    m = store._manifest
    tomb = Tombstones.load(store.path, m)
    files = m["vectors"]["files"]
    raw = (RawVectors(store.path, files, m["index"]["dim"], verify=not store_mmap(store))
           if m["settings"]["keep_vectors"] and files else None)
    if segments and store_mmap(store):
        check_mmap(m["index"]["factory"], m["index"]["dim"], m["metric"])
    index = SegmentSet(segments, m["metric"], m["index"]["dim"], params=m["index"]["params"],
                       deleted=tomb.chunks, raw=raw)
    return index, tomb


def load_template(store: "Store", idx: dict) -> faiss.Index | None:
    """The trained empty index of ``idx`` (cached on the store by checksum)."""
    entry = idx.get("template")
    if not entry:
        return None
    cached = getattr(store, "_template_cache", None)
    if cached is None or cached[0] != entry["sha256"]:
        _manifest.safe_path(store.path, entry["path"], _manifest.MANIFEST)
        cached = (entry["sha256"], load_segment(store.path, entry).index)
        store._template_cache = cached
    return cached[1]


def store_mmap(store: "Store") -> bool:
    """Whether this handle serves segments memory-mapped (open(mmap=) over the manifest's setting)."""
    arg = getattr(store, "_mmap_arg", None)
    return bool(store._manifest["settings"].get("mmap", False) if arg is None else arg)


def check_mmap(factory: str, dim: int, metric: str) -> None:
    """Raise when ``factory`` cannot be memory-mapped (see :func:`retrostore._index.mmap_problem`)."""
    problem = mmap_problem(new_index(factory, dim, metric), factory)
    if problem:
        raise InvalidInputError(problem)


# -- vectors ---------------------------------------------------------------
class VectorSource:
    """Vectors of a manifest's chunks: read back from the segments when they are
    exact (Flat, HNSW-Flat, segments stored as float16: the stored vectors,
    lossless; :attr:`retrostore._index.Segment.exact`), else from the raw
    vectors files.

    Raises
    ------
    RetrostoreError
        Neither is available (explaining why, for reindex and eval).
    """

    def __init__(self, store: "Store", manifest: dict, segments: list[Segment], what: str):
        self.dim = manifest["index"]["dim"]
        files = manifest["vectors"]["files"]
        self.segments = [s for s in segments if s.count]
        self.exact = all(s.exact for s in self.segments)
        self.raw = None
        if not self.exact:
            if not (manifest["settings"]["keep_vectors"] and files):
                if manifest["vectors"].get("dropped_at_pack"):
                    from ._artifact import require_raw_vectors  # says they were dropped by pack --no-vectors

                    require_raw_vectors(manifest, what)
                raise RetrostoreError(
                    f"{what} needs the stored vectors, but this store keeps no raw vectors (keep_vectors=False) "
                    f"and its index ({manifest['index']['factory']!r}) is compressed, so they cannot be read "
                    "back; rebuild the store from its documents with keep_vectors=True"
                )
            self.raw = RawVectors(store.path, files, self.dim)
        self._firsts = np.array([s.first_id for s in self.segments], np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of chunk ids (any shape), float32; zeros for ids not indexed."""
        ids = np.asarray(ids, np.int64)
        if self.raw is not None:
            return self.raw.take(ids)
        if ids.ndim != 1:
            return self.take(ids.ravel()).reshape(ids.shape + (self.dim,))
        out = np.zeros((len(ids), self.dim), np.float32)
        which = np.searchsorted(self._firsts, ids, side="right") - 1
        for w in np.unique(which[which >= 0]):
            seg = self.segments[int(w)]
            sel = np.nonzero(which == w)[0]
            local = ids[sel] - seg.first_id
            index = faiss.downcast_index(seg.index)
            if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
                idmap = self._maps.get(int(w))
                if idmap is None:
                    idmap = self._maps[int(w)] = faiss.vector_to_array(index.id_map).astype(np.int64)
                pos = np.searchsorted(idmap, local)
                ok = (pos < len(idmap)) & (idmap[np.minimum(pos, len(idmap) - 1)] == local)
                sel, local = sel[ok], pos[ok]
                index = faiss.downcast_index(index.index)
            else:
                ok = local < seg.count
                sel, local = sel[ok], local[ok]
            if len(local):
                out[sel] = index.reconstruct_batch(np.ascontiguousarray(local))
        return out


def live_ids(end: int, tomb: Tombstones) -> np.ndarray:
    """Chunk ids ``[0, end)`` not deleted."""
    ids = np.arange(end, dtype=np.int64)
    return ids[~tomb.chunk_mask(ids)] if len(tomb) else ids


def stored_vectors(store: "Store", first: int, end: int) -> np.ndarray:
    """See ``Store._stored_vectors``: exact from Flat segments, else from the raw vectors files."""
    m = store._manifest
    out = np.zeros((max(0, end - first), m["index"]["dim"]), np.float32)
    raw = store._index.raw
    for seg in store._index.segments:
        lo, hi = max(first, seg.first_id), min(end, seg.end_id)
        if lo >= hi:
            continue
        plain = type(faiss.downcast_index(seg.index)) not in (faiss.IndexIDMap, faiss.IndexIDMap2)
        if seg.exact and not seg.holes and plain:
            out[lo - first : hi - first] = seg.index.reconstruct_n(lo - seg.first_id, hi - lo)
        elif seg.exact:
            ids, vecs = segment_vectors(seg)
            sel = (ids + seg.first_id >= lo) & (ids + seg.first_id < hi)
            out[ids[sel] + seg.first_id - first] = vecs[sel]
        elif raw is not None:
            out[lo - first : hi - first] = raw.rows(lo, hi)
        else:
            from ._artifact import require_raw_vectors  # says when they were dropped at pack time

            require_raw_vectors(m, "precomputing store neighbours over this index")
            raise RetrostoreError(
                f"chunks {lo}..{hi - 1}: the index cannot reconstruct vectors and no raw vectors are kept; "
                "precomputing store neighbours needs keep_vectors=True or a reconstructible index"
            )
    return out


# -- commit ----------------------------------------------------------------
def fp16_batches(manifest: dict) -> bool:
    """Whether a commit's batch becomes a float16 Flat segment (:func:`_write_fp16_batch`);
    the commit then stages the batch's vectors as float16."""
    return manifest["index"]["factory"] == "Flat" and manifest["vectors"]["dtype"] == "float16"


def commit_index(store: "Store", new: dict, vectors: np.ndarray, tag: str, first_id: int,
                 new_files: list, tomb: Tombstones, vectors_ready: Callable[[], None] = lambda: None) -> None:
    """The index part of a commit: a segment for the batch, tier merges, training when due.

    ``vectors_ready()`` returns once the batch's raw vectors file is written and
    in ``new`` (the commit writes it in another thread); it is called before
    anything that may read raw vectors files.
    """
    m = store._manifest
    idx = new["index"]
    segments = list(store._index.segments)
    if len(vectors):
        template = load_template(store, idx)
        index = _adopt_codes(store, template, vectors)
        if index is None and fp16_batches(m):
            index, entry = _write_fp16_batch(store, vectors, tag, first_id, new_files)
        else:
            if index is None:
                index = build_segment(vectors, idx["factory"], m["metric"], template=template)
            entry = store._write_segment(index, tag, first_id, len(vectors), new_files)
        idx["segments"].append(entry)
        segments.append(Segment(entry, index))
        vectors_ready()
        segments = _tier_merge(store, new, segments, tag, new_files, template)
    vectors_ready()
    due = training_due(store, new, segments, tomb)
    if due:
        factory, auto = due
        settings = new["settings"]
        rebuild(store, new, segments, factory, tag, new_files, tomb,
                train_size=settings.get("train_size"), seed=int(settings.get("train_seed", 0)), progress=False)


def _write_fp16_batch(store: "Store", vectors: np.ndarray, tag: str, first_id: int,
                      new_files: list) -> tuple[faiss.Index, dict]:
    """The batch's Flat segment of a float16 store (the hot path of an exact store): (index, entry).

    ``vectors`` come float16 (the commit casts the staged parts into one
    array, ``_commit._staged_vectors``). From them the file's ``SQfp16``
    codes are built and written in this thread while a second builds the
    in-memory float32 Flat (FAISS and numpy release the GIL): what
    ``flat_fp16(build_segment(...))`` gives, in about half the time.
    """
    metric = METRICS[store._manifest["metric"]]
    half = np.ascontiguousarray(vectors, dtype=np.float16)  # the commit staged them as float16
    with ThreadPoolExecutor(1, thread_name_prefix="retrostore-flat") as pool:
        flat = pool.submit(fp16_flat, half, metric)
        entry = store._write_segment(None, tag, first_id, len(half), new_files, fp16_codes(half, metric))
        index = flat.result()
    store._segments_cache[entry["sha256"]] = index
    return index, entry


def _adopt_codes(store: "Store", template: faiss.Index | None, vectors: np.ndarray) -> faiss.Index | None:
    """The batch's segment from codes its shards encoded with this store's template, or None.

    A sharded build's shards encode their vectors with the stage-2 template
    (retrostore/_shards.py); the merge appends one code index per shard
    (``Store._pending_codes``). They are adopted only when every batch of the
    commit has them and they hold exactly its vectors; IVF codes merge with id
    offsets (the same lists, in the same order, as encoding here would give).
    """
    codes = store._pending_codes
    if template is None or not codes or any(c is None for c in codes) \
            or sum(int(c.ntotal) for c in codes) != len(vectors):
        return None
    if len(codes) == 1:
        return codes[0]
    firsts = np.cumsum([0] + [int(c.ntotal) for c in codes[:-1]])
    segs = [Segment({"first_id": int(f), "count": int(c.ntotal)}, c) for f, c in zip(firsts, codes)]
    return merge_segments(segs, lambda: faiss.clone_index(template),
                          lambda _segs: (np.arange(len(vectors), dtype=np.int64), vectors))


def _tier_merge(store: "Store", new: dict, segments: list[Segment], tag: str, new_files: list,
                template: faiss.Index | None) -> list[Segment]:
    idx = new["index"]
    run = 0  # trailing segments that can merge: IVF ones always, others without holes
    for seg in reversed(segments):
        if seg.holes and not is_ivf(seg.index):
            break
        run += 1
    n_merge = plan_merge([s.count for s in segments[len(segments) - run:]])
    if not n_merge:
        return segments
    loaded = segments[-n_merge:]
    dim, metric = idx["dim"], store._manifest["metric"]

    def make_empty():
        return faiss.clone_index(template) if template is not None else new_index(idx["factory"], dim, metric)

    merged = merge_segments(loaded, make_empty, lambda segs: _segments_vectors(store, new, segs))
    entry = store._write_segment(merged, tag + "m", loaded[0].first_id, int(merged.ntotal), new_files)
    if merged.ntotal != loaded[-1].end_id - loaded[0].first_id:
        entry["end_id"] = loaded[-1].end_id
    idx["segments"] = idx["segments"][:-n_merge] + [entry]
    return segments[:-n_merge] + [Segment(entry, merged)]


def _segments_vectors(store: "Store", new: dict, segs: list[Segment]) -> tuple[np.ndarray, np.ndarray]:
    """(ids relative to segs[0].first_id, vectors) of segments that FAISS cannot merge natively."""
    first = segs[0].first_id
    all_ids, all_vecs = [], []
    source = None
    for seg in segs:
        exact = segment_vectors(seg)
        if exact is not None:
            ids, vecs = exact
        else:
            inner = faiss.downcast_index(seg.index)
            ids = (faiss.vector_to_array(inner.id_map).astype(np.int64)
                   if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)) else np.arange(seg.count))
            source = source or VectorSource(store, new, segs, "merging segments")
            vecs = source.take(ids + seg.first_id)
        all_ids.append(ids + seg.first_id - first)
        all_vecs.append(vecs)
    return np.concatenate(all_ids), np.concatenate(all_vecs)


def training_due(store: "Store", new: dict, segments: list[Segment], tomb: Tombstones) -> tuple[str, bool] | None:
    """(factory, auto) when this commit should (re)train the index, else None.

    Counts live vectors (deleted ones not yet compacted away are not trained on).
    ``auto``: Flat until :data:`AUTO_TRAIN_MIN` vectors, then retrain each time
    the store grows :data:`RETRAIN_GROWTH`-fold. An explicit factory that needs
    training: Flat until the sample can train every stage well, then once.
    """
    idx = new["index"]
    target = idx.get("target", idx["factory"])
    n = sum(s.count for s in segments) - int(tomb.pending()[:, 2].sum())
    keep = bool(new["settings"]["keep_vectors"])
    can_read = (keep and new["vectors"]["files"]) or all(s.exact for s in segments)
    if target == "auto":
        trained = idx.get("trained")
        if not idx.get("template"):
            due = n >= AUTO_TRAIN_MIN
        else:
            due = bool(trained) and n >= RETRAIN_GROWTH * int(trained["vectors"])
        if due and not can_read:
            log.warning("the store has grown to %s vectors; retraining needs raw vectors (keep_vectors=False)", n)
            return None
        return (default_factory(n, idx["dim"], keep_vectors=keep, trained=True), True) if due else None
    if target == idx["factory"] or not can_read:
        return None
    size = min(n, int(new["settings"].get("train_size") or default_train_size(target, n, idx["dim"], new["metric"])))
    try:
        check_sample(target, size, idx["dim"], new["metric"])
    except IndexTrainingError:
        return None
    return target, False


def rebuild(store: "Store", new: dict, segments: list[Segment], factory: str, tag: str, new_files: list,
            tomb: Tombstones, *, train_size: int | None, seed: int, progress: bool) -> None:
    """Train ``factory`` (if it needs training) on a seeded sample and encode every live vector into one segment."""
    from ._store import INDEX_DIR

    idx = new["index"]
    dim, metric = idx["dim"], new["metric"]
    end = max((s.end_id for s in segments), default=int(new["next_chunk_id"]))
    source = VectorSource(store, new, segments, "reindex")
    if end and keeps_files(new) and not new["vectors"]["files"]:
        _write_all_vectors(store, new, source, end, tag, new_files)
    live = live_ids(end, tomb)
    probe = new_index(factory, dim, metric)
    t0 = time.perf_counter()
    template_entry, sample_n = None, 0
    template = None
    if not probe.is_trained:
        size = int(train_size or default_train_size(factory, len(live), dim, metric))
        size = min(size, len(live))
        check_sample(factory, size, dim, metric)
        sample = sample_ids(live, size, seed)
        sample_n = len(sample)
        template = train_template(factory, dim, metric, source.take(sample),
                                  describe=f" (seeded sample {seed} of {len(live):,} stored vectors)")
        path = store.path / INDEX_DIR / f"tpl-{tag}.faiss"
        new_files.append(path)
        size_b, sha = write_index(path, template)
        template_entry = {"path": f"{INDEX_DIR}/{path.name}", "size": size_b, "sha256": sha}
    holes = len(live) != end
    index = faiss.clone_index(template) if template is not None else probe
    if holes and not is_ivf(index):
        from ._index import _idmap

        index = _idmap(index)
    bar = progress_bar(len(live), f"encoding ({factory})", progress)
    try:
        for lo in range(0, len(live), _BATCH):
            ids = live[lo : lo + _BATCH]
            vecs = np.ascontiguousarray(source.take(ids), dtype=np.float32)
            if holes:
                index.add_with_ids(vecs, ids)
            else:
                index.add(vecs)
            bar.update(len(ids))
    finally:
        bar.close()
    entry = store._write_segment(index, tag + "r", 0, int(index.ntotal), new_files)
    if holes:
        entry["end_id"] = end
    keep = bool(new["settings"]["keep_vectors"])
    idx.update(factory=factory, template=template_entry, segments=[entry])
    idx["params"] = {**default_params(factory, keep_vectors=keep), **idx.get("param_overrides", {})}
    idx["trained"] = {"vectors": int(len(live)), "sample": int(sample_n), "seed": int(seed),
                      "seconds": round(time.perf_counter() - t0, 1), "version": int(new["version"]) + 1}
    log.info("index %s: %s vectors in %.1f s", factory, f"{len(live):,}", time.perf_counter() - t0)


def _write_all_vectors(store: "Store", new: dict, source: VectorSource, end: int, tag: str,
                       new_files: list) -> None:
    """Write the raw vectors of chunk ids ``[0, end)`` as one vectors file (zeros for ids not indexed).

    For a store that kept none because its Flat segments held them
    (:func:`retrostore._vectors.keeps_files`) and is reindexed to an index
    that needs them (re-ranking, retraining, recall measurement).
    """
    from ._store import VECTORS_DIR

    path = store.path / VECTORS_DIR / f"vec-{tag}a.npy"
    new_files.append(path)
    dtype = new["vectors"]["dtype"]
    parts = [source.take(np.arange(lo, min(end, lo + _BATCH), dtype=np.int64)).astype(dtype)
             for lo in range(0, end, _BATCH)]
    size, sha = write_vectors(path, parts, dtype)
    new["vectors"]["files"] = [{"path": f"{VECTORS_DIR}/{path.name}", "size": size, "sha256": sha,
                                "first_id": 0, "count": end}]


# -- reindex / compact -------------------------------------------------------
def _begin(store: "Store", what: str) -> tuple[dict, int, str]:
    store._check(write=True)
    if store._pending_chunks or store._pending_docs or store._pending_deletes:
        raise InvalidInputError(f"{what} needs a clean writer: commit() the appended or deleted documents first")
    m = store._manifest
    new = copy.deepcopy(m)
    version = m["version"] + 1
    return new, version, f"{version:08d}-{secrets.token_hex(4)}"


def _publish(store: "Store", new: dict, version: int, new_files: list, before=None) -> None:
    """Write ``new`` as the current manifest (through ``before(publish)`` when the
    LMDB purge must wrap it), then adopt it. New files are removed on failure
    unless the manifest naming them was already published."""
    from ._store import INDEX_DIR, VECTORS_DIR, _now

    new["version"] = version
    new["committed_at"] = _now()
    new["format_version"] = _manifest.FORMAT_VERSION
    new["counts"]["vectors"] = sum(e["count"] for e in new["index"]["segments"])
    published: list[bool] = []

    def publish(chain: str | None = None) -> None:
        if chain is not None:
            new["lmdb"]["chain"] = chain
        _manifest.write_manifest(store.path, new)
        published.append(True)

    try:
        _fileio.fsync_dir(store.path / INDEX_DIR)
        _fileio.fsync_dir(store.path / VECTORS_DIR)
        if before is None:
            publish()
        else:
            before(publish)
    except BaseException:
        if not published:
            for f in new_files:
                f.unlink(missing_ok=True)
            raise
        # Published, but the LMDB purge did not commit: the next writer finishes it
        # (retrostore._deletes.finish_purge); this handle adopts the new version.
        store._manifest = new
        store._load_segments()
        raise
    store._manifest = new
    store._load_segments()
    try:
        store._collect_garbage()
    except OSError:
        pass


def reindex(store: "Store", index: str | None = None, *, train_size: int | None = None, seed: int | None = None,
            params: dict | None = None, mmap: bool | None = None, progress: bool = True) -> int:
    """See :meth:`retrostore.Store.reindex`."""
    new, version, tag = _begin(store, "reindex")
    idx = new["index"]
    dim, metric = idx["dim"], new["metric"]
    target = index if index is not None else idx.get("target", idx["factory"])
    if params is not None:
        idx["param_overrides"] = check_params(params, "params")
    if train_size is not None and (isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1):
        raise InvalidInputError(f"train_size={train_size!r} must be an int >= 1")
    auto = target == "auto"
    n = sum(s.count for s in store._index.segments)
    keep = bool(new["settings"]["keep_vectors"])
    factory = default_factory(n, dim, keep_vectors=keep) if auto else target
    new_index(factory, dim, metric)  # refuse a bad factory string before any work
    if mmap is not None:
        new["settings"]["mmap"] = bool(mmap)
    if new["settings"].get("mmap"):
        check_mmap(factory, dim, metric)
    seed = int(new["settings"].get("train_seed", 0) if seed is None else seed)
    new["index"]["target"] = target  # before rebuild: whether the store must now keep vectors files
    new_files: list = []
    try:
        rebuild(store, new, list(store._index.segments), factory, tag, new_files, store._tombstones,
                train_size=train_size or new["settings"].get("train_size"), seed=seed, progress=progress)
    except BaseException:
        for f in new_files:
            f.unlink(missing_ok=True)
        raise
    _publish(store, new, version, new_files)
    return version


def install_template(store: "Store", template: bytes, factory: str, *, sample: int, seed: int,
                     seconds: float) -> int:
    """Commit a trained empty index of ``factory`` (its serialized bytes, ``template``) as the
    index of an empty store.

    Stage 2 of a sharded build (retrostore/_distributed.py): from the next commit
    on, batches are encoded by clones of the template, as in a store trained at a
    commit. Only for a store without vectors (a store with vectors is trained by
    :func:`reindex` or at a commit).

    Raises
    ------
    InvalidInputError
        The store already holds vectors or a template, or has staged changes.
    """
    from ._store import INDEX_DIR

    new, version, tag = _begin(store, "installing an index template")
    idx = new["index"]
    if any(s.count for s in store._index.segments) or idx.get("template"):
        raise InvalidInputError(f"{store.path}: an index template can only be installed in an empty, untrained "
                                "store; use reindex() to retrain a store that holds vectors")
    new_files: list = []
    path = store.path / INDEX_DIR / f"tpl-{tag}.faiss"
    new_files.append(path)
    try:
        index = faiss.deserialize_index(np.frombuffer(template, dtype=np.uint8))
        if index.ntotal or not index.is_trained:
            raise InvalidInputError(f"the template for {factory!r} must be a trained, empty index")
        size_b, sha = _fileio.write_durable(path, [template])
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    keep = bool(new["settings"]["keep_vectors"])
    idx.update(factory=factory, template={"path": f"{INDEX_DIR}/{path.name}", "size": size_b, "sha256": sha},
               segments=[])
    idx["params"] = {**default_params(factory, keep_vectors=keep), **idx.get("param_overrides", {})}
    idx["trained"] = {"vectors": 0, "sample": int(sample), "seed": int(seed), "seconds": round(seconds, 1),
                      "version": version}
    _publish(store, new, version, new_files)
    return version


def compact(store: "Store", *, progress: bool = True) -> int:
    """See :meth:`retrostore.Store.compact`."""
    from ._store import INDEX_DIR, VECTORS_DIR

    new, version, tag = _begin(store, "compact")
    m = store._manifest
    tomb: Tombstones = store._tombstones
    pending = tomb.pending()
    segments = list(store._index.segments)
    if len(segments) <= 1 and not len(pending):
        return m["version"]
    idx = new["index"]
    purge = np.sort(np.concatenate([np.arange(c, c + k, dtype=np.int64) for _, c, k, _ in pending])) \
        if len(pending) else np.zeros(0, np.int64)
    new_files: list = []
    try:
        template = load_template(store, idx)
        end = int(m["next_chunk_id"])

        def make_empty():
            return faiss.clone_index(template) if template is not None else new_index(idx["factory"], idx["dim"],
                                                                                      m["metric"])

        base = make_empty()
        if is_ivf(base):
            for seg in segments:
                if seg.count:
                    base.merge_from(owned_copy(seg.index), seg.first_id)
            if len(purge):
                base.remove_ids(faiss.IDSelectorBatch(purge))
            merged = base
        else:
            ids, vecs = _segments_vectors(store, new, segments) if segments else (np.zeros(0, np.int64), None)
            keep_rows = ~np.isin(ids, purge)
            merged = build_segment(vecs[keep_rows] if vecs is not None else np.zeros((0, idx["dim"]), np.float32),
                                   idx["factory"], m["metric"], template=template,
                                   local_ids=ids[keep_rows] if keep_rows.sum() != end else None)
        entry = store._write_segment(merged, tag + "c", 0, int(merged.ntotal), new_files)
        if merged.ntotal != end:
            entry["end_id"] = end
        idx["segments"] = [entry] if end else []
        if len(purge):
            files = []
            for e in new["vectors"]["files"]:
                lo, hi = e["first_id"], e["first_id"] + e["count"]
                hit = purge[(purge >= lo) & (purge < hi)]
                if not len(hit):
                    files.append(e)
                    continue
                arr = np.array(load_vectors(store.path, e, mmap=True))
                arr[hit - lo] = 0
                path = store.path / VECTORS_DIR / f"vec-{tag}-{lo}.npy"
                new_files.append(path)
                size, sha = write_vectors(path, arr, m["vectors"]["dtype"])
                files.append({**e, "path": f"{VECTORS_DIR}/{path.name}", "size": size, "sha256": sha})
            new["vectors"]["files"] = files
            rows = tomb.rows.copy()
            rows[rows[:, 3] == 0, 3] = version
            write_tombstones(store.path, new, Tombstones(rows), tag, new_files, INDEX_DIR)
    except BaseException:
        for f in new_files:
            f.unlink(missing_ok=True)
        raise
    if not len(purge):
        _publish(store, new, version, new_files)
        return version
    docs = [tuple(int(x) for x in r[:3]) for r in pending]
    _publish(store, new, version, new_files, before=lambda publish: store._table.purge(docs, publish, version))
    _drop_older_versions(store)
    return version


def _drop_older_versions(store: "Store") -> None:
    """After a purge, earlier versions still name files holding the purged data: retire them."""
    vdir = store.path / _manifest.VERSIONS_DIR
    for p in vdir.glob("manifest-*.json"):
        if p.name[9:21].isdigit() and int(p.name[9:21]) < store.version:
            p.unlink(missing_ok=True)
    _fileio.fsync_dir(vdir)
    try:
        store._collect_garbage()
    except OSError:
        pass


def check_index_arg(index: Any, dim: int, *, keep_vectors: bool, mmap: bool) -> tuple[str, str]:
    """(target, current factory) for ``create(index=...)``; validates the string.

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
    return index, index if probe.is_trained else "Flat"
