"""The committed version a handle serves, and moving a handle to a newer one.

A :class:`Version` is one committed manifest as loaded: its index segments
(checksummed before FAISS reads them), searched together as a
:class:`~retrostore.index.search.SegmentSet`, its tombstones and its raw
vectors. The :class:`Head` holds the version one handle serves and the caches
(index segments and the trained template, by checksum) that make loading the
next version cost only its new files.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from ..errors import CorruptStoreError
from ..index.factory import check_mmap
from ..index.params import RWLock
from ..index.search import SegmentSet
from ..index.source import VectorSource, stored_vectors
from ..storage import manifest as _manifest
from ..storage.fileio import git_lfs_pointer, regular_file
from ..storage.layout import LMDB_DIR, MANIFEST
from ..storage.segments import Segment, load_segment
from ..storage.tombstones import Tombstones
from ..storage.vectors import RawVectors

__all__ = ["Version", "Head"]

#: Attempts of a reader to load the newest version when a writer collects files meanwhile.
_ATTEMPTS = 5


class Version:
    """One committed version, as a handle serves it.

    Attributes
    ----------
    root : Path
        The store directory.
    manifest : dict
        The version's manifest body (shared: never modify it; copy to change).
    segments : list of Segment
        Its index segments, in chunk-id order (``index.segments``).
    index : SegmentSet
        The segments searched together, with the version's tombstones and raw vectors.
    tombstones : Tombstones
        Its deleted documents.
    mmap : bool
        Whether the segments are served memory-mapped.
    """

    def __init__(self, root: Path, manifest: dict, index: SegmentSet, tombstones: Tombstones, mmap: bool):
        self.root = root
        self.manifest = manifest
        self.index = index
        self.tombstones = tombstones
        self.mmap = mmap

    @property
    def segments(self) -> list[Segment]:
        """The segments searched: the manifest's, or (a read-only handle, once merged in memory)
        one segment that holds them all (:meth:`SegmentSet.merge_segments`)."""
        return self.index.segments

    @property
    def number(self) -> int:
        """The version number."""
        return int(self.manifest["version"])

    @property
    def n_chunks(self) -> int:
        """Committed chunk ids: ``[0, next_chunk_id)`` (purged ones are holes)."""
        return int(self.manifest["next_chunk_id"])

    @property
    def n_docs(self) -> int:
        """Committed document ids: ``[0, next_doc_id)``."""
        return int(self.manifest["next_doc_id"])

    def vector_source(self, what: str, manifest: dict | None = None) -> VectorSource:
        """Reads this version's stored vectors back (``what`` names the caller in errors)."""
        return VectorSource(self.root, manifest or self.manifest, self.segments, what,
                            raw=self.index.raw if manifest is None else None)

    def stored_vectors(self, first: int, end: int) -> np.ndarray:
        """Vectors of chunks ``[first, end)`` as indexed, shape (end - first, dim), float32
        (see :func:`retrostore.index.source.stored_vectors`)."""
        return stored_vectors(self.manifest, self.segments, self.index.raw, first, end)


def _weak_method(method: Callable) -> Callable:
    """``method`` of an object, called through a weak reference to it: the SegmentSet a Head
    builds keeps its callbacks, and a bound method would make Head -> Version -> SegmentSet ->
    Head a cycle, which kept a closed handle's index, mapped vector files and their descriptors
    until Python's cyclic garbage collector ran (helper-57: a server opening a handle per commit
    held 1,807 descriptors of the store after 650 commits, and ran out at ``ulimit -n 1024``).
    Called after the object is gone, it does nothing (returns None)."""
    ref = weakref.WeakMethod(method)

    def call(*args, **kwargs):
        bound = ref()
        return None if bound is None else bound(*args, **kwargs)

    return call


class Head:
    """The version one handle serves, and the caches that make loading the next one cheap.

    Parameters
    ----------
    root : Path
        The store directory.
    mmap_arg : bool or None
        ``open(mmap=...)``: serve segments memory-mapped, or None for the
        manifest's ``mmap`` setting.
    merge : bool
        Merge IVF fast-scan segments in memory at the first search (read-only handles:
        :meth:`SegmentSet.merge_segments`).

    Attributes
    ----------
    version : Version
        The version served (set by :meth:`load`).
    """

    def __init__(self, root: Path, *, mmap_arg: bool | None, merge: bool = False):
        self.root = root
        self.mmap_arg = mmap_arg
        self.merge = merge
        self.version: Version | None = None
        self._segments: dict[str, faiss.Index] = {}  # sha256 -> loaded index, of the version served
        self._template: tuple[str, faiss.Index] | None = None
        self._raw: dict = {}  # sha256 -> a mapped raw vectors file (RawVectors' cache)
        #: One lock for every version's SegmentSet: they share the FAISS objects of common segments.
        self._search_lock = RWLock()

    def release(self) -> None:
        """Drop what the served version holds (index, mapped raw vectors, cached segments and
        template): the handle closed. Its number and manifest stay readable (``Store.version``,
        ``repr``); searching it is refused before it gets here (``Store._check``). A closed handle
        that its caller still refers to (``with retrostore.open(...) as st:`` keeps ``st``) held
        its mapped vector files and their descriptors (helper-57)."""
        self._segments, self._raw, self._template = {}, {}, None
        if self.version is not None:
            self.version.index = None

    def mmap(self, manifest: dict) -> bool:
        """Whether segments of ``manifest`` are served memory-mapped (``open(mmap=)`` over the setting)."""
        return bool(manifest["settings"].get("mmap", False) if self.mmap_arg is None else self.mmap_arg)

    def remember(self, sha256: str, index: faiss.Index) -> None:
        """Keep an index the writer just built and wrote (file checksum ``sha256``), so that
        loading the version that names it does not read the file back."""
        self._segments[sha256] = index

    def template(self, idx: dict) -> faiss.Index | None:
        """The trained empty index of a manifest's ``index`` entry (cached by checksum), or None."""
        entry = idx.get("template")
        if not entry:
            return None
        if self._template is None or self._template[0] != entry["sha256"]:
            _manifest.safe_path(self.root, entry["path"], MANIFEST)
            self._template = (entry["sha256"], load_segment(self.root, entry).index)
        return self._template[1]

    def load(self, manifest: dict) -> Version:
        """Serve ``manifest``: check its files, load its segments, tombstones and raw vectors.

        Every referenced file is checked cheaply (its path stays inside the
        store, its size is the manifest's); index segments are checksummed
        before FAISS reads them (unless cached). The caches then keep only
        what this version uses.

        Raises
        ------
        CorruptStoreError
            A file is missing, of the wrong size or checksum, or not what the manifest says.
        """
        m = manifest
        _manifest.safe_path(self.root, LMDB_DIR, MANIFEST)
        for entry in _manifest.referenced_files(m):
            path = _manifest.safe_path(self.root, entry["path"], MANIFEST)
            st = regular_file(path, entry["path"])
            if st is None:
                raise CorruptStoreError(f"{entry['path']}: missing (referenced by the manifest)")
            size = st.st_size
            if size != entry["size"]:
                raise CorruptStoreError(
                    f"{entry['path']}: {size} bytes, the manifest says {entry['size']}; "
                    f"{git_lfs_pointer(path) or 'the file is damaged'}"
                )
        mmap = self.mmap(m)
        cache: dict[str, faiss.Index] = {}
        entries = m["index"]["segments"]
        segs = self._merged_prefix(entries)
        for entry in entries[len(segs[0].entry["merged_from"]) if segs else 0:]:
            # Cached by content, but each entry gets its own Segment: two segments
            # can be byte-identical (the same vectors committed twice) while
            # covering different chunk ids.
            index = self._segments.get(entry["sha256"])
            seg = Segment(entry, index) if index is not None else load_segment(
                self.root, entry, mmap=mmap, flat=m["index"]["factory"] == "Flat")
            cache[entry["sha256"]] = seg.index
            segs.append(seg)
        tomb = Tombstones.load(self.root, m)
        files = m["vectors"]["files"]
        raw = None
        if m["settings"]["keep_vectors"] and files:
            kept = {e["sha256"] for e in files}
            self._raw = {sha: f for sha, f in self._raw.items() if sha in kept}
            raw = RawVectors(self.root, files, m["index"]["dim"], verify=not mmap, cache=self._raw)
            raw.open_all()  # mapped now: a reader keeps them after a writer's GC (compact retires older versions)
        if segs and mmap:
            check_mmap(m["index"]["factory"], m["index"]["dim"], m["metric"])
        merge = self.merge and not mmap and m["index"].get("template") is not None
        index = SegmentSet(segs, m["metric"], m["index"]["dim"], params=m["index"]["params"],
                           deleted=tomb.chunks, raw=raw,
                           make_empty=self._empty_index(m["index"]) if merge else None,
                           on_merged=_weak_method(self._forget_merged), lock=self._search_lock)
        self._segments = cache
        self.version = Version(self.root, m, index, tomb, mmap)
        return self.version

    def _merged_prefix(self, entries: list[dict]) -> list[Segment]:
        """``[merged]`` when the served version's segments were merged in memory
        (:meth:`SegmentSet.merge_segments`) and ``entries`` begin with those very
        segments (a newer version of the same index): the next version reuses the merged
        index instead of reading them again. Else []."""
        if self.version is None or len(self.version.segments) != 1:
            return []
        merged = self.version.segments[0]
        shas = merged.entry.get("merged_from")
        if not shas or len(entries) < len(shas):
            return []
        head = entries[: len(shas)]
        if ([e["sha256"] for e in head] != shas or head[0]["first_id"] != merged.first_id
                or max(int(e.get("end_id", e["first_id"] + e["count"])) for e in head) != merged.end_id):
            return []
        return [merged]

    def _empty_index(self, idx: dict):
        """A function returning a clone of the manifest's trained template (:meth:`template`),
        called by the in-memory merge: opening never reads the template for a merge that may
        not happen. It refers to this head weakly (see :func:`_weak_method`)."""
        template = _weak_method(self.template)
        return lambda: faiss.clone_index(template(idx))

    def _forget_merged(self, segset: SegmentSet, shas: list[str]) -> None:
        """After an in-memory merge: the cache drops the merged segments (memory), if still served."""
        if self.version is not None and self.version.index is segset:
            for sha in shas:
                self._segments.pop(sha, None)

    def load_newest(self, manifest: dict, *, follow: bool) -> Version:
        """:meth:`load` ``manifest``; with ``follow`` (a reader), when a file is gone because a
        writer committed and collected garbage meanwhile, load the newer manifest instead.

        Raises
        ------
        CorruptStoreError
            A file is damaged, or still missing after the manifest stopped changing.
        """
        for attempt in range(_ATTEMPTS):
            try:
                return self.load(manifest)
            except CorruptStoreError:
                if not follow or attempt == _ATTEMPTS - 1:
                    raise
                newer = _manifest.read_manifest(self.root)
                if newer["version"] == manifest["version"]:
                    raise
                manifest = newer
        raise AssertionError("unreachable")

    def refresh(self, holds: Callable[[dict], bool] | None = None) -> Version:
        """Move to the newest committed version (a reader's ``Store.refresh``).

        ``holds(manifest)``: whether the chunk table this handle reads holds that manifest's
        commits; a manifest it does not hold (a store being copied over this one, manifest first)
        is not taken, before or after its files are loaded: the version stays.

        Raises
        ------
        CorruptStoreError
            The new manifest or a file it references is damaged.
        """
        for attempt in range(_ATTEMPTS):
            m = _manifest.read_manifest(self.root)
            if m["version"] == self.version.number or (holds is not None and not holds(m)):
                return self.version
            before = self.version
            try:
                self.load(m)
                if holds is not None and not holds(m):  # (replaced while its files were loaded)
                    self.version = before
                return self.version
            except CorruptStoreError:
                # A writer may have garbage-collected files of a version that was
                # current when we read the manifest; read it again.
                if attempt == _ATTEMPTS - 1:
                    raise
        return self.version
