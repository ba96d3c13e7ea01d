"""The index part of a new version: the batch's segment (a clone of the trained
template, codes a sharded build encoded, or a float16 Flat), tiered merges,
and (re)training when the policy says so; ``rebuild`` (used by ``reindex``
too) trains on a seeded sample and encodes every live vector.

Each function works on a :class:`~retrostore.store.commit.Commit`, writes only
new immutable files (listed in its ``new_files``, so a failed commit removes
them) and leaves publishing to the manifest write. See docs/index.md for the
policy and the on-disk entries.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import faiss
import numpy as np

from ..index.factory import new_index
from ..index.merge import build_segment, flat_fast_scan_run, merge_segments, plan_merge, segment_vectors
from ..index import policy
from ..index.source import VectorSource, live_ids
from ..index.training import check_sample, default_train_size, progress_bar, sample_ids, train_template
from ..errors import IndexTrainingError
from ..storage.faisstypes import METRICS, is_ivf, with_idmap
from ..storage.layout import template_name, vectors_name
from ..storage.segments import Segment, fp16_codes, fp16_flat, write_index
from ..storage.tombstones import Tombstones
from ..storage.vectors import keeps_files, write_store_vectors
from .commit import Commit

__all__ = ["commit_index", "fp16_batches", "rebuild", "training_due", "live_count", "refresh_params",
           "segments_vectors"]

log = logging.getLogger("retrostore")
_BATCH = 65536


def fp16_batches(manifest: dict) -> bool:
    """Whether a commit's batch becomes a float16 Flat segment (:func:`_write_fp16_batch`);
    the commit then stacks the batch's vectors as float16."""
    return manifest["index"]["factory"] == "Flat" and manifest["vectors"]["dtype"] == "float16"


def commit_index(c: Commit, vectors: np.ndarray, first_id: int, tomb: Tombstones, codes: list,
                 vectors_ready: Callable[[], None] = lambda: None,
                 encoded: Callable[[], faiss.Index | None] | None = None,
                 on_merge: Callable[[int], None] = lambda start: None) -> None:
    """The index part of a commit: a segment for the batch, tier merges, training when due.

    ``codes``: per appended part, its vectors encoded by the template, or None
    (:func:`_adopt_codes`); ``encoded()``: the batch's vectors encoded by the
    template while they were appended (:class:`~retrostore.store.encoding.BatchEncoder`;
    it waits for the encoder's thread), or None. ``vectors_ready()`` returns once the batch's raw
    vectors file is written and in ``c.new`` (the commit writes it in another
    thread); it is called before anything that may read raw vectors files.
    ``on_merge(start)`` is called before a tier merge of IVF or flat fast-scan segments
    (which reads no raw vectors) from id ``start`` on, so that their vectors files can merge meanwhile.
    """
    m = c.base.manifest
    idx = c.new["index"]
    segments = list(c.base.segments)
    if len(vectors):
        template = c.head.template(idx)
        index = _adopt_codes(template, codes, vectors)
        if index is None and encoded is not None and template is not None:
            c.stage = "encoding the batch"
            index = encoded()
            if index is not None and index.ntotal != len(vectors):
                index = None
            c.stage = "building the index segment"
        if index is None and fp16_batches(m):
            index, entry = _write_fp16_batch(c, vectors, first_id)
        else:
            if index is None:
                index = build_segment(vectors, idx["factory"], m["metric"], template=template)
            entry = c.write_segment(index, "", first_id, len(vectors))
        idx["segments"].append(entry)
        segments.append(Segment(entry, index))
        vectors_ready()
        segments = _tier_merge(c, segments, template, on_merge)
    vectors_ready()
    due = training_due(c.new, segments, tomb)
    if due:
        factory, auto = due
        settings = c.new["settings"]
        rebuild(c, segments, factory, tomb, train_size=settings.get("train_size"),
                seed=int(settings.get("train_seed", 0)), progress=False)
    else:
        refresh_params(c.new, live_count(c.new, segments, tomb))


def _write_fp16_batch(c: Commit, vectors: np.ndarray, first_id: int) -> tuple[faiss.Index, dict]:
    """The batch's Flat segment of a float16 store (the hot path of an exact store): (index, entry).

    ``vectors`` come float16 (the commit stacks the staged parts into one
    array, :meth:`retrostore.store.writer.Batch.stacked`). From them the
    file's ``SQfp16`` codes are built and written in this thread while a
    second builds the in-memory float32 Flat (FAISS and numpy release the
    GIL): what ``flat_fp16(build_segment(...))`` gives, in about half the time.
    """
    metric = METRICS[c.base.manifest["metric"]]
    half = np.ascontiguousarray(vectors, dtype=np.float16)  # the commit stacked them as float16
    with ThreadPoolExecutor(1, thread_name_prefix="retrostore-flat") as pool:
        flat = pool.submit(fp16_flat, half, metric)
        entry = c.write_segment(None, "", first_id, len(half), fp16_codes(half, metric))
        index = flat.result()
    c.head.remember(entry["sha256"], index)
    return index, entry


def _adopt_codes(template: faiss.Index | None, codes: list, vectors: np.ndarray) -> faiss.Index | None:
    """The batch's segment from codes its shards encoded with this store's template, or None.

    A sharded build's shards encode their vectors with the stage-2 template
    (retrostore/build/shards.py); the merge stages one code index per shard
    (``Batch.codes``). They are adopted only when every part of the batch has
    them and they hold exactly its vectors; IVF codes merge with id offsets
    (the same lists, in the same order, as encoding here would give).
    """
    if template is None or not codes or any(x is None for x in codes) \
            or sum(int(x.ntotal) for x in codes) != len(vectors):
        return None
    if len(codes) == 1:
        return codes[0]
    firsts = np.cumsum([0] + [int(x.ntotal) for x in codes[:-1]])
    segs = [Segment({"first_id": int(f), "count": int(x.ntotal)}, x) for f, x in zip(firsts, codes)]
    return merge_segments(segs, lambda: faiss.clone_index(template),
                          lambda _segs: (np.arange(len(vectors), dtype=np.int64), vectors))


def _tier_merge(c: Commit, segments: list[Segment], template: faiss.Index | None,
                on_merge: Callable[[int], None] = lambda start: None) -> list[Segment]:
    """Merge the newest segments when they fill a tier (:func:`retrostore.index.merge.plan_merge`);
    ``on_merge(first_id)`` first when they are IVF segments (merged list by list) or flat fast-scan
    ones (codes concatenated): no raw vectors read."""
    idx = c.new["index"]
    run = 0  # trailing segments that can merge: IVF ones always, others without holes
    for seg in reversed(segments):
        if seg.holes and not is_ivf(seg.index):
            break
        run += 1
    n_merge = plan_merge([s.count for s in segments[len(segments) - run:]])
    if not n_merge:
        return segments
    loaded = segments[-n_merge:]
    if all(is_ivf(seg.index) for seg in loaded) or flat_fast_scan_run(loaded):  # merge_segments reads no vectors
        on_merge(loaded[0].first_id)
    dim, metric = idx["dim"], c.base.manifest["metric"]

    def make_empty():
        return faiss.clone_index(template) if template is not None else new_index(idx["factory"], dim, metric)

    merged = merge_segments(loaded, make_empty, lambda segs: segments_vectors(c, segs))
    entry = c.write_segment(merged, "m", loaded[0].first_id, int(merged.ntotal))
    if merged.ntotal != loaded[-1].end_id - loaded[0].first_id:
        entry["end_id"] = loaded[-1].end_id
    idx["segments"] = idx["segments"][:-n_merge] + [entry]
    return segments[:-n_merge] + [Segment(entry, merged)]


def segments_vectors(c: Commit, segs: list[Segment]) -> tuple[np.ndarray, np.ndarray]:
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
            source = source or VectorSource(c.root, c.new, segs, "merging segments")
            vecs = source.take(ids + seg.first_id)
        all_ids.append(ids + seg.first_id - first)
        all_vecs.append(vecs)
    return np.concatenate(all_ids), np.concatenate(all_vecs)


def training_due(new: dict, segments: list[Segment], tomb: Tombstones) -> tuple[str, bool] | None:
    """(factory, auto) when this commit should rebuild or train the index, else None.

    Counts live vectors (deleted ones not yet compacted away are not trained on).
    ``auto`` (:mod:`retrostore.index.policy`): exact Flat below ``EXACT_MAX``
    vectors, an HNSW graph (rebuilt from the stored vectors, nothing to train)
    until ``AUTO_TRAIN_MIN``, then the trained IVF index, trained once on a
    bounded sample: later growth never retrains in a commit (re-encoding every
    vector is what stalled ingest, issue 17); ``inspect`` says when a
    ``reindex`` would pick more lists. An explicit factory that needs
    training: Flat until the sample can train every stage well, then once.
    """
    idx = new["index"]
    target = idx.get("target", idx["factory"])
    n = live_count(new, segments, tomb)
    keep = bool(new["settings"]["keep_vectors"])
    can_read = (keep and new["vectors"]["files"]) or all(s.exact for s in segments)
    if target == "auto":
        if idx.get("template"):
            return None
        want = policy.default_factory(n, idx["dim"], keep_vectors=keep, mmap=bool(new["settings"].get("mmap")))
        if want == idx["factory"]:
            return None
        if not can_read:
            log.warning("the store has grown to %s vectors; retraining needs raw vectors (keep_vectors=False)", n)
            return None
        return want, True
    if target == idx["factory"] or not can_read:
        return None
    size = min(n, int(new["settings"].get("train_size") or default_train_size(target, n, idx["dim"], new["metric"])))
    try:
        check_sample(target, size, idx["dim"], new["metric"])
    except IndexTrainingError:
        return None
    return target, False


def live_count(new: dict, segments: list[Segment], tomb: Tombstones) -> int:
    """Live vectors of a version in the making (indexed minus deleted, not yet compacted)."""
    return sum(s.count for s in segments) - int(tomb.pending()[:, 2].sum())


def refresh_params(new: dict, n: int) -> None:
    """The default search parameters for a store of ``n`` vectors (``rerank`` follows the size),
    under the user's overrides, into ``new["index"]["params"]``."""
    idx = new["index"]
    keep = bool(new["settings"]["keep_vectors"])
    idx["params"] = {**policy.default_params(idx["factory"], keep_vectors=keep, n=n),
                     **idx.get("param_overrides", {})}


def rebuild(c: Commit, segments: list[Segment], factory: str, tomb: Tombstones, *, train_size: int | None,
            seed: int, progress: bool) -> None:
    """Train ``factory`` (if it needs training) on a seeded sample and encode every live vector into one segment."""
    new = c.new
    idx = new["index"]
    dim, metric = idx["dim"], new["metric"]
    end = max((s.end_id for s in segments), default=int(new["next_chunk_id"]))
    source = VectorSource(c.root, new, segments, "reindex")
    if end and keeps_files(new) and not new["vectors"]["files"]:
        _write_all_vectors(c, source, end)
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
        rel = template_name(c.tag)
        path = c.root / rel
        c.new_files.append(path)
        size_b, sha = write_index(path, template)
        template_entry = {"path": rel, "size": size_b, "sha256": sha, "faiss": faiss.__version__}
    holes = len(live) != end
    index = faiss.clone_index(template) if template is not None else probe
    if holes and not is_ivf(index):
        index = with_idmap(index)
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
    entry = c.write_segment(index, "r", 0, int(index.ntotal))
    if holes:
        entry["end_id"] = end
    idx.update(factory=factory, template=template_entry, segments=[entry])
    refresh_params(new, int(len(live)))
    idx["trained"] = {"vectors": int(len(live)), "sample": int(sample_n), "seed": int(seed),
                      "seconds": round(time.perf_counter() - t0, 1), "version": int(new["version"]) + 1}
    log.info("index %s: %s vectors in %.1f s", factory, f"{len(live):,}", time.perf_counter() - t0)


def _write_all_vectors(c: Commit, source: VectorSource, end: int) -> None:
    """Write the raw vectors of chunk ids ``[0, end)`` as one vectors file (zeros for ids not indexed).

    For a store that kept none because its Flat segments held them
    (:func:`retrostore.storage.vectors.keeps_files`) and is reindexed to an index
    that needs them (re-ranking, retraining, recall measurement).
    """
    dtype = c.new["vectors"]["dtype"]
    parts = [source.take(np.arange(lo, min(end, lo + _BATCH), dtype=np.int64)).astype(dtype)
             for lo in range(0, end, _BATCH)]
    fields = write_store_vectors(c.root, vectors_name(c.tag + "a"), parts, dtype, c.new_files)
    c.new["vectors"]["files"] = [{**fields, "first_id": 0, "count": end}]
