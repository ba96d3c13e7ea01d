"""Maintenance versions: ``reindex`` (retrain and rebuild the index from the
stored vectors), ``compact`` (merge segments, purge deleted documents from
every file) and installing a trained template (stage 2 of a sharded build).

Each prepares a :class:`~retrostore.store.commit.Commit` from a clean writer
and publishes it through the :class:`~retrostore.store.writer.Writer`.
"""

from __future__ import annotations

import faiss
import numpy as np

from ..errors import InvalidInputError, check_bool
from ..index.factory import check_mmap, check_small_batches, new_index
from ..index.merge import build_segment, is_fast_scan, merge_fast_scan, owned_copy
from ..index.params import check_params
from ..index.policy import default_factory
from ..index.training import check_seed, check_train_size
from ..storage.faisstypes import is_ivf
from ..storage.fileio import fsync_dir, write_durable
from ..storage.layout import VERSIONS_DIR, retained_versions, template_name, vectors_name, version_path
from ..storage.tombstones import Tombstones, write_tombstones
from ..storage.vectors import load_vectors, write_store_vectors
from .indexer import rebuild, refresh_params, segments_vectors
from .writer import Writer

__all__ = ["reindex", "compact", "install_template"]


def reindex(writer: Writer, index: str | None = None, *, train_size: int | None = None, seed: int | None = None,
            params: dict | None = None, mmap: bool | None = None, progress: bool = True) -> int:
    """See :meth:`retrostore.Store.reindex`."""
    mmap = check_bool("mmap", mmap, optional=True)
    c = writer.begin("reindex")
    new = c.new
    idx = new["index"]
    dim, metric = idx["dim"], new["metric"]
    target = index if index is not None else idx.get("target", idx["factory"])
    if params is not None:
        idx["param_overrides"] = check_params(params, "params")
    train_size = check_train_size(train_size)
    auto = target == "auto"
    n = sum(s.count for s in c.base.segments)
    keep = bool(new["settings"]["keep_vectors"])
    mapped = bool(new["settings"].get("mmap") if mmap is None else mmap)
    factory = default_factory(n, dim, keep_vectors=keep, mmap=mapped) if auto else target
    probe = new_index(factory, dim, metric)  # refuse a bad factory string before any work
    if probe.is_trained:
        check_small_batches(probe, factory)  # later commits add batches of any size
    if mmap is not None:
        new["settings"]["mmap"] = bool(mmap)
    if new["settings"].get("mmap"):
        check_mmap(factory, dim, metric)
    seed = check_seed(new["settings"].get("train_seed", 0) if seed is None else seed)
    new["index"]["target"] = target  # before rebuild: whether the store must now keep vectors files
    try:
        rebuild(c, list(c.base.segments), factory, c.base.tombstones,
                train_size=train_size or new["settings"].get("train_size"), seed=seed, progress=progress)
    except BaseException:
        c.remove_files()
        raise
    return writer.publish(c)


def install_template(writer: Writer, template: bytes, factory: str, *, sample: int, seed: int,
                     seconds: float) -> int:
    """Commit a trained empty index of ``factory`` (its serialized bytes, ``template``) as the
    index of an empty store.

    Stage 2 of a sharded build (retrostore/build/sharded.py): from the next commit
    on, batches are encoded by clones of the template, as in a store trained at a
    commit. Only for a store without vectors (a store with vectors is trained by
    :func:`reindex` or at a commit).

    Raises
    ------
    InvalidInputError
        The store already holds vectors or a template, or has staged changes.
    """
    c = writer.begin("installing an index template")
    new = c.new
    idx = new["index"]
    if any(s.count for s in c.base.segments) or idx.get("template"):
        raise InvalidInputError(f"{c.root}: an index template can only be installed in an empty, untrained "
                                "store; use reindex() to retrain a store that holds vectors")
    rel = template_name(c.tag)
    path = c.root / rel
    c.new_files.append(path)
    try:
        index = faiss.deserialize_index(np.frombuffer(template, dtype=np.uint8))
        if index.ntotal or not index.is_trained:
            raise InvalidInputError(f"the template for {factory!r} must be a trained, empty index")
        size_b, sha = write_durable(path, [template])
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    idx.update(factory=factory, template={"path": rel, "size": size_b, "sha256": sha, "faiss": faiss.__version__},
               segments=[])
    refresh_params(new, 0)  # an empty store
    idx["trained"] = {"vectors": 0, "sample": int(sample), "seed": int(seed), "seconds": round(seconds, 1),
                      "version": c.version}
    return writer.publish(c)


def compact(writer: Writer, *, progress: bool = True) -> int:
    """See :meth:`retrostore.Store.compact`."""
    c = writer.begin("compact")
    new, version, tag = c.new, c.version, c.tag
    m = c.base.manifest
    tomb = c.base.tombstones
    pending = tomb.pending()
    segments = list(c.base.segments)
    if len(segments) <= 1 and not len(pending):
        return m["version"]
    idx = new["index"]
    purge = np.sort(np.concatenate([np.arange(c, c + k, dtype=np.int64) for _, c, k, _ in pending])) \
        if len(pending) else np.zeros(0, np.int64)
    try:
        template = c.head.template(idx)
        end = int(m["next_chunk_id"])

        def make_empty():
            return faiss.clone_index(template) if template is not None else new_index(idx["factory"], idx["dim"],
                                                                                      m["metric"])

        base = make_empty()
        if is_fast_scan(base):  # FAISS's merge_from and remove_ids abort on fast-scan lists (merge_fast_scan)
            merge_fast_scan(base, [(seg.index, seg.first_id) for seg in segments if seg.count], drop=purge)
            merged = base
        elif is_ivf(base):
            for seg in segments:
                if seg.count:
                    base.merge_from(owned_copy(seg.index), seg.first_id)
            if len(purge):
                base.remove_ids(faiss.IDSelectorBatch(purge))
            merged = base
        else:
            ids, vecs = segments_vectors(c, segments) if segments else (np.zeros(0, np.int64), None)
            keep_rows = ~np.isin(ids, purge)
            merged = build_segment(vecs[keep_rows] if vecs is not None else np.zeros((0, idx["dim"]), np.float32),
                                   idx["factory"], m["metric"], template=template,
                                   local_ids=ids[keep_rows] if keep_rows.sum() != end else None)
        entry = c.write_segment(merged, "c", 0, int(merged.ntotal))
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
                arr = np.array(load_vectors(c.root, e, mmap=True, verify=True))
                arr[hit - lo] = 0
                fields = write_store_vectors(c.root, vectors_name(f"{tag}-{lo}"), arr, m["vectors"]["dtype"],
                                             c.new_files)
                files.append({**e, **fields})
            new["vectors"]["files"] = files
            rows = tomb.rows.copy()
            rows[rows[:, 3] == 0, 3] = version
            write_tombstones(c.root, new, Tombstones(rows), tag, c.new_files)
    except BaseException:
        c.remove_files()
        raise
    if not len(purge):
        return writer.publish(c)
    docs = [tuple(int(x) for x in r[:3]) for r in pending]
    writer.publish(c, before=lambda publish: writer.table.purge(docs, publish, version))
    _drop_older_versions(writer)
    return version


def _drop_older_versions(writer: Writer) -> None:
    """After a purge, earlier versions still name files holding the purged data: retire them."""
    current = writer.head.version.number
    for v in retained_versions(writer.root):
        if v < current:
            version_path(writer.root, v).unlink(missing_ok=True)
    fsync_dir(writer.root / VERSIONS_DIR)
    writer.collect_garbage()
