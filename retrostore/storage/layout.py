"""Names and paths of a store's files (docs/format.md, "Layout").

Every file name the format defines is here, so that the layers above never
spell one out. ``storage/lmdbscan.py`` repeats ``LMDB_DIR`` and ``GENESIS``:
it runs as a script in a child process and imports nothing from the package.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "MANIFEST", "VERSIONS_DIR", "INDEX_DIR", "VECTORS_DIR", "TOKENIZER", "LOCK", "LMDB_DIR", "DATA_MDB",
    "TMP_PREFIX", "GENESIS", "STORE_DIRS", "version_path", "version_tag", "segment_name", "template_name",
    "vectors_name", "tombstone_name", "retained_versions",
]

#: The current manifest: the single commit point.
MANIFEST = "manifest.json"
#: Retained copies of committed manifests, ``manifest-<version:012d>.json``.
VERSIONS_DIR = "versions"
#: Index segment files, trained templates and tombstone files.
INDEX_DIR = "index"
#: Raw vectors files (``.npy``).
VECTORS_DIR = "vectors"
#: The chunking tokenizer, so that the store describes itself.
TOKENIZER = "tokenizer.json"
#: The one-writer lock file (``flock``).
LOCK = "LOCK"
#: The LMDB environment directory and its data file.
LMDB_DIR = "chunks.lmdb"
DATA_MDB = f"{LMDB_DIR}/data.mdb"
#: Prefix of every temporary file or directory; writers remove leftovers.
TMP_PREFIX = ".tmp-"
#: Seed of the LMDB content hash chain (sha256 of it is the chain before any commit).
GENESIS = "retrostore"
#: The store's subdirectories, in name order.
STORE_DIRS = (LMDB_DIR, INDEX_DIR, VECTORS_DIR, VERSIONS_DIR)


def version_path(root: Path, version: int) -> Path:
    """Path of the retained copy of manifest ``version``."""
    return root / VERSIONS_DIR / f"manifest-{version:012d}.json"


def retained_versions(root: Path) -> list[int]:
    """Version numbers of the manifest copies in ``versions/``, sorted."""
    names = (re.fullmatch(r"manifest-(\d{12,})\.json", p.name) for p in (root / VERSIONS_DIR).glob("manifest-*.json"))
    return sorted(int(m.group(1)) for m in names if m)  # (a name of 31 digits was read as its first 12)


def version_tag(version: int) -> str:
    """The tag in the names of the files a commit of ``version`` writes (``00000042``)."""
    return f"{version:08d}"


def segment_name(tag: str) -> str:
    """``index/seg-<tag>.faiss``: an index segment."""
    return f"{INDEX_DIR}/seg-{tag}.faiss"


def template_name(tag: str) -> str:
    """``index/tpl-<tag>.faiss``: a trained, empty index (the template of later segments)."""
    return f"{INDEX_DIR}/tpl-{tag}.faiss"


def tombstone_name(tag: str) -> str:
    """``index/del-<tag>.npy``: the deleted documents of a version."""
    return f"{INDEX_DIR}/del-{tag}.npy"


def vectors_name(tag: str) -> str:
    """``vectors/vec-<tag>.npy``: a raw vectors file."""
    return f"{VECTORS_DIR}/vec-{tag}.npy"
