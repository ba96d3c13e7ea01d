"""A new version in the making, and the files no version needs any more.

A :class:`Commit` is one version being prepared by the writer (a commit of its
staged batch, or a maintenance operation: reindex, compact, installing a
template): a copy of the current manifest being changed, the new files written
so far (removed again if the version is not published), and the stage it is
at (for error messages). Publishing is the manifest write
(:func:`retrostore.storage.manifest.write_manifest`), the one commit point
(docs/format.md, "Commit protocol and guarantees").

:func:`collect_garbage` drops manifests beyond ``retain_versions`` and files no
retained version references.
"""

from __future__ import annotations

import copy
import datetime as _dt
from pathlib import Path

import faiss

from ..errors import CommitError, RetrostoreError
from ..storage import manifest as _manifest
from ..storage.layout import INDEX_DIR, MANIFEST, TMP_PREFIX, VECTORS_DIR, retained_versions, version_path
from ..storage.segments import write_segment
from .version import Head, Version

__all__ = ["Commit", "collect_garbage", "now"]


def now() -> str:
    """The current UTC time as the manifest records it (ISO-8601, seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Commit:
    """One version being prepared from the version ``head`` serves.

    Parameters
    ----------
    root : Path
        The store directory.
    head : Head
        The writer's served version (the base), whose caches new segments join.
    tag : str
        Tag of the new files' names (``00000042``, or with a random suffix for
        maintenance, whose failed attempts must never collide).

    Attributes
    ----------
    base : Version
        The version this one is made from.
    new : dict
        The manifest body being prepared (a deep copy of the base's).
    version : int
        The new version number (base + 1).
    new_files : list of Path
        Files written for it; removed by :meth:`remove_files` if it is not published.
    stage : str
        What it is doing now, for error messages ("building the index segment").
    """

    def __init__(self, root: Path, head: Head, tag: str):
        self.root = root
        self.head = head
        self.base: Version = head.version
        self.new = copy.deepcopy(self.base.manifest)
        self.version = self.base.number + 1
        self.tag = tag
        self.new_files: list[Path] = []
        self.stage = "preparing"

    def write_segment(self, index: faiss.Index | None, suffix: str, first_id: int, count: int,
                      half: faiss.Index | None = None) -> dict:
        """Write ``index`` as the segment ``index/seg-<tag><suffix>.faiss`` (see
        :func:`retrostore.storage.segments.write_segment`); the built index is kept in
        the head's cache, so publishing does not read the file back. Returns its entry."""
        entry = write_segment(self.root, index, self.tag + suffix, first_id, count, self.new_files,
                              vector_dtype=self.base.manifest["vectors"]["dtype"], half=half)
        if index is not None:
            self.head.remember(entry["sha256"], index)
        return entry

    def finish_fields(self) -> None:
        """Set the fields every published version updates: number, time, format, vector count."""
        self.new["version"] = self.version
        self.new["committed_at"] = now()
        self.new["format_version"] = _manifest.FORMAT_VERSION
        self.new["counts"]["vectors"] = sum(e["count"] for e in self.new["index"]["segments"])

    def remove_files(self) -> None:
        """Remove the files written for this version (it will not be published)."""
        for f in self.new_files:
            try:
                f.unlink()
            except OSError:
                pass

    def _put_back(self) -> bool:
        """After a failure while publishing: whether the base version is current, its manifest put
        back when the new one had been renamed into place (a failed fsync of the directory)."""
        try:
            if (self.root / MANIFEST).read_bytes() == _manifest.encode_manifest(self.new):
                _manifest.write_current(self.root, self.base.manifest)
            return True
        except OSError:
            return False

    def abort(self, exc: BaseException, on_lost) -> None:
        """Undo a commit that failed while ``stage``, so that the base version stays current.

        If the failure came after ``manifest.json`` was renamed into place (its
        directory fsync failed), the base manifest is put back first. When that
        is impossible the new files are kept (the manifest on disk may name
        them), ``on_lost()`` closes the handle and CommitError says so.

        Raises
        ------
        CommitError
            Only when it is unknown which version is current.
        """
        publishing = self.stage == "publishing the manifest"
        if publishing and not self._put_back():
            on_lost()
            code = getattr(exc, "errno", None)
            raise CommitError(
                *([code] if code is not None else []),
                f"commit of version {self.version} failed while {self.stage} ({exc}) and the previous manifest "
                "could not be put back, so which version is current is unknown; this writer was closed. Open the "
                "store again: it opens at whichever version manifest.json names, and the next writer removes "
                "the rest.",
            ) from exc
        if publishing:
            self.new_files.append(version_path(self.root, self.version))
        self.remove_files()


def collect_garbage(root: Path, current: dict) -> None:
    """Drop manifests beyond ``retain_versions`` and files no retained version references.

    ``current`` is the manifest just published (or served by a writer that
    just opened); copies of versions newer than it (a failed commit's) go too.
    """
    keep = int(current["settings"]["retain_versions"])
    versions = retained_versions(root)
    cur = current["version"]
    retained = [v for v in versions if v <= cur][-keep:]
    referenced = set()
    for v in versions:
        p = version_path(root, v)
        if v not in retained or v > cur:
            p.unlink(missing_ok=True)
            continue
        try:
            body = _manifest.read_manifest(root, v)
        except RetrostoreError:
            continue
        referenced.update(e["path"] for e in _manifest.referenced_files(body))
    referenced.update(e["path"] for e in _manifest.referenced_files(current))
    for sub in (INDEX_DIR, VECTORS_DIR):
        for p in (root / sub).iterdir():
            if f"{sub}/{p.name}" not in referenced:
                p.unlink(missing_ok=True)
    vdir = version_path(root, 0).parent
    for p in list(root.glob(f"{TMP_PREFIX}*")) + list(vdir.glob(f"{TMP_PREFIX}*")):
        p.unlink(missing_ok=True)
