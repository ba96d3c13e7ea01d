"""The manifest: the single commit point of a store.

``manifest.json`` names one consistent version: settings, fingerprints, counts,
the id high-water marks and, for every file the version references, its size
and sha256. A copy of each committed manifest is kept in ``versions/`` while
that version is retained. The manifest carries a checksum of its own canonical
JSON, so a flipped byte is detected before anything else is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import JSON_TYPE_NAMES, CorruptStoreError, FormatVersionError, NotAStoreError
from .fileio import atomic_write, unreadable
from .layout import INDEX_DIR, LMDB_DIR, MANIFEST, VERSIONS_DIR, retained_versions, version_path

__all__ = [
    "FORMAT_VERSION",
    "MIN_READER_VERSION",
    "read_manifest",
    "write_manifest",
    "safe_path",
    "referenced_files",
    "check_schema",
    "write_current",
    "encode_manifest",
    "parse_manifest",
    "manifest_sha256",
    "manifest_bytes",
]

#: Format version written by this code; see docs/format.md. Version 2 adds the
#: index template/target/trained entries, segment ``end_id`` (holes after
#: deletes) and the ``deletes`` tombstone file; a store with deletes sets
#: ``min_reader_version`` 2 so that older readers cannot serve deleted chunks.
#: Version 3 adds the segment ``codec`` (below). Version 4 adds block checksums of raw vectors files
#: (``vectors.files[].sums``, storage/blocksums.py); readers of version 3 read such stores (they ignore
#: the sidecars), but a version-3 writer would collect the sidecars as garbage: writers refuse newer formats.
FORMAT_VERSION = 4
#: Oldest reader format version that can read what this code writes.
MIN_READER_VERSION = 1
#: Format 3 adds segments of codec ``fp16`` (Flat indexes stored as float16); a store holding
#: one sets ``min_reader_version`` 3, since an older reader would not read it back as Flat.
CODEC_READER_VERSION = 3
_REQUIRED = {
    "format_version": int,
    "min_reader_version": int,
    "version": int,
    "chunk_tokens": int,
    "metric": str,
    "tokenizer": dict,
    "embedder": dict,
    "index": dict,
    "vectors": dict,
    "lmdb": dict,
    "counts": dict,
    "next_chunk_id": int,
    "next_doc_id": int,
    "settings": dict,
    "created_at": str,
    "committed_at": str,
}


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def safe_path(root: Path, rel: Any, where: str) -> Path:
    """Resolve a manifest path, refusing anything that escapes the store.

    Raises
    ------
    CorruptStoreError
        For absolute paths, ``..`` components, or links leading outside.
    """
    if not isinstance(rel, str) or not rel:
        raise CorruptStoreError(f"{where}: file path {rel!r} in the manifest is not a relative path")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or "\\" in rel:
        raise CorruptStoreError(
            f"{where}: file path {rel!r} in the manifest escapes the store directory; "
            "a store may only reference files inside itself"
        )
    path = root / pure
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise CorruptStoreError(
            f"{where}: file path {rel!r} in the manifest resolves outside the store ({real})"
        )
    return path


def referenced_files(manifest: dict) -> list[dict]:
    """Every ``{"path", "size", "sha256"}`` entry a manifest references."""
    files = [manifest["tokenizer"]]
    files += manifest["index"].get("segments", [])
    files += manifest["vectors"].get("files", [])
    files += [e["sums"] for e in manifest["vectors"].get("files", []) if isinstance(e, dict) and "sums" in e]
    if manifest["index"].get("template"):
        files.append(manifest["index"]["template"])
    if (manifest.get("deletes") or {}).get("file"):
        files.append(manifest["deletes"]["file"])
    return files


_MAX_INT = 2**62  # ids, counts and sizes live in int64 arrays and LMDB's 8-byte keys


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v < _MAX_INT


def check_schema(body: dict, where: str) -> None:
    """Check a manifest body's fields, types and ranges.

    Raises
    ------
    CorruptStoreError
        Naming ``where`` and the first field that is missing or wrong.
    """
    for key, typ in _REQUIRED.items():
        if key not in body:
            raise CorruptStoreError(f"{where}: manifest lacks the field {key!r}")
        if not isinstance(body[key], typ) or (typ is int and isinstance(body[key], bool)):
            raise CorruptStoreError(
                f"{where}: manifest field {key!r} is {type(body[key]).__name__}, expected {typ.__name__}"
            )
    for key in ("version", "next_chunk_id", "next_doc_id", "format_version", "min_reader_version"):
        if not _is_int(body[key]):
            raise CorruptStoreError(f"{where}: manifest field {key!r} is {body[key]!r}, expected an int in [0, 2**62)")
    if not isinstance(body["index"].get("segments"), list) or not isinstance(body["vectors"].get("files"), list):
        raise CorruptStoreError(f"{where}: manifest lacks the lists index.segments and vectors.files")
    if not _is_int(body["index"].get("dim"), 1):
        raise CorruptStoreError(f"{where}: manifest field index.dim is {body['index'].get('dim')!r}, expected an int >= 1")
    if not _is_int(body["settings"].get("retain_versions"), 1):
        raise CorruptStoreError(f"{where}: manifest setting retain_versions is "
                                f"{body['settings'].get('retain_versions')!r}, expected an int >= 1")
    for name in ("documents", "chunks", "vectors"):
        if not _is_int(body["counts"].get(name)):
            raise CorruptStoreError(f"{where}: manifest count {name!r} is {body['counts'].get(name)!r}, expected an int >= 0")
    _check_tokens_and_chain(body, where)
    deletes = body.get("deletes")
    if deletes is not None:  # (helper-49: purged_chunks "x" in a re-signed manifest: a bare ValueError)
        bad = next((k for k in ("documents", "chunks", "purged_documents", "purged_chunks")
                    if isinstance(deletes, dict) and k in deletes and not _is_int(deletes[k])), None)
        if not isinstance(deletes, dict) or bad is not None:
            what = f"deletes.{bad} is {deletes[bad]!r}" if bad else f"deletes is {deletes!r}"
            raise CorruptStoreError(f"{where}: manifest field {what}, expected an int >= 0 (an object of counts); "
                                    "the manifest is damaged")
    for entry in referenced_files(body):
        if not isinstance(entry, dict) or not {"path", "size", "sha256"} <= set(entry):
            raise CorruptStoreError(f"{where}: file entry {entry!r} lacks path, size or sha256")
        sha = entry["sha256"]
        if (not isinstance(entry["path"], str) or not _is_int(entry["size"]) or not isinstance(sha, str)
                or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
            raise CorruptStoreError(f"{where}: file entry {entry!r} has a bad path, size or sha256")
    for entry in body["index"]["segments"] + body["vectors"]["files"]:
        if not _is_int(entry.get("first_id")) or not _is_int(entry.get("count")):
            raise CorruptStoreError(f"{where}: file entry {entry['path']!r} lacks an int first_id or count")
    for entry in body["vectors"]["files"]:
        if "sums" in entry and not _is_int(entry["sums"].get("rows_per_block"), 1):
            raise CorruptStoreError(f"{where}: the block checksums of {entry['path']!r} lack an int rows_per_block")


def committed_record_counts(body: dict) -> dict[str, int]:
    """The records a version's chunk table holds after ``compact``: ``{"chunks", "docs"}``, the ids
    below the high-water marks less those purged by deletes (what ``pack`` writes and ``unpack``
    accepts)."""
    deletes = body.get("deletes") or {}
    return {"chunks": body["next_chunk_id"] - int(deletes.get("purged_chunks", 0)),
            "docs": body["next_doc_id"] - int(deletes.get("purged_documents", 0))}


def _is_sha256(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


def _check_tokens_and_chain(body: dict, where: str) -> None:
    """The token layout and the LMDB commit chain (helper-48: a re-signed manifest with ``lmdb.chain``
    null or absent raised a TypeError / KeyError, ``token_dtype`` "x" a TypeError, and "<u4" in place of
    "<u2" verified intact while every chunk read back as 32 ids such as 132,515,792)."""
    tok, chain = body["tokenizer"], body["lmdb"].get("chain")
    vocab = tok.get("vocab_size")
    if not _is_int(vocab, 1):
        raise CorruptStoreError(f"{where}: manifest field tokenizer.vocab_size is {vocab!r}, expected an int >= 1")
    want = "<u2" if vocab <= 65536 else "<u4"  # as create writes it
    if tok.get("token_dtype") != want:
        raise CorruptStoreError(f"{where}: manifest field tokenizer.token_dtype is {tok.get('token_dtype')!r}, "
                                f"expected {want!r} for a vocabulary of {vocab:,} ids; the manifest is damaged")
    if not _is_sha256(chain):
        raise CorruptStoreError(f"{where}: manifest field lmdb.chain is {chain!r}, expected the sha256 (64 hex "
                                "digits) of the chunk table's commits; the manifest is damaged")


def parse_manifest(raw: bytes, where: str) -> dict:
    """Decode and check a manifest's bytes.

    Raises
    ------
    CorruptStoreError
        Not JSON, checksum mismatch, missing or mistyped fields.
    FormatVersionError
        Written by a newer, incompatible format.
    """
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, a 4,300-digit number
        what = "truncated (it does not end with its closing brace and newline)" if not raw.endswith(b"}\n") \
            else "not valid JSON (" + (str(exc) if isinstance(exc, json.JSONDecodeError) else type(exc).__name__) + ")"
        raise CorruptStoreError(f"{where}: manifest is {what}; the file is damaged") from None
    if not isinstance(doc, dict):
        name = JSON_TYPE_NAMES[type(doc)]
        kind = name if name == "null" else ("an " if name[0] in "aeiou" else "a ") + name
        raise CorruptStoreError(f"{where}: manifest is {kind} in JSON, not an object with 'body' and 'sha256'; "
                                "the file is damaged or not a retrostore manifest")
    if not raw.endswith(b"}\n"):
        raise CorruptStoreError(f"{where}: manifest is truncated (it does not end with its closing brace and newline); "
                                "the file is damaged")
    if "body" not in doc or "sha256" not in doc:
        raise CorruptStoreError(f"{where}: manifest lacks its 'body' and 'sha256' fields; the file is damaged")
    body = doc["body"]
    if not isinstance(body, dict):
        raise CorruptStoreError(f"{where}: manifest body is not an object")
    actual = hashlib.sha256(_canonical(body)).hexdigest()
    if actual != doc["sha256"]:
        raise CorruptStoreError(
            f"{where}: manifest checksum mismatch (recorded {str(doc['sha256'])[:16]}..., "
            f"actual {actual[:16]}...); the file is damaged"
        )
    reader = body.get("min_reader_version")
    if isinstance(reader, int) and reader > FORMAT_VERSION:
        raise FormatVersionError(
            f"{where}: the store has format_version {body.get('format_version')} and needs a reader of "
            f"format version >= {reader}; this retrostore reads format version {FORMAT_VERSION}. "
            "Upgrade retrostore (pip install -U retrostore)."
        )
    check_schema(body, where)
    return body


def manifest_stamp(path: str) -> tuple | None:
    """What changes when the ``manifest.json`` at ``path`` (a str: callers stat it per search) is
    replaced, as every commit and compaction does (written aside, renamed into place): its inode,
    mtime and size; None while it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def missing_manifest(root: Path) -> NotAStoreError:
    """The error for a directory without ``manifest.json``: not a store, or (helper-36) a store
    whose manifest was lost, which ``create`` then refuses as a non-empty directory: the message
    says how to get the manifest back."""
    held = [name for name in (LMDB_DIR, INDEX_DIR, VERSIONS_DIR) if (root / name).exists()]
    if not held:
        return NotAStoreError(f"{root} is not a retrostore store (no {MANIFEST}); create one with "
                              "retrostore.create() or `retrostore build`")
    newest = retained_versions(root)
    fix = (f"copy its newest retained copy back (cp {version_path(root, newest[-1])} {root / MANIFEST}), then run "
           "`retrostore verify`" if newest else "restore it from a backup, or copy or download the store again")
    return NotAStoreError(f"{root} holds a store's files ({', '.join(held)}) but no {MANIFEST}: the manifest was "
                          f"lost; {fix}")


def read_manifest(root: Path, version: int | None = None) -> dict:
    """Read and check the current manifest, or a retained version's.

    Raises
    ------
    NotAStoreError
        No manifest (the path is not a store, or the version is not retained).
    CorruptStoreError, FormatVersionError
        See :func:`parse_manifest`.
    """
    path = root / MANIFEST if version is None else version_path(root, version)
    try:
        if os.path.exists(path) and not os.path.isfile(path):  # never read a FIFO (it would block)
            raise CorruptStoreError(f"{path.relative_to(root)}: is not a regular file; the store is damaged")
        raw = path.read_bytes()
    except FileNotFoundError:
        if version is not None:
            raise NotAStoreError(
                f"version {version} of {root} is not retained (no {path.relative_to(root)}); "
                "open without version= for the newest, or see Store.info()['retained_versions']"
            ) from None
        raise missing_manifest(root) from None
    except (NotADirectoryError, IsADirectoryError):
        raise NotAStoreError(f"{root} is not a retrostore store (not a directory with a {MANIFEST})") from None
    except OSError as exc:
        raise unreadable(os.fspath(path.relative_to(root)), exc) from exc
    return parse_manifest(raw, os.fspath(path.relative_to(root)) if version is not None else MANIFEST)


def encode_manifest(body: dict) -> bytes:
    """Serialise a manifest body with its checksum (pretty JSON, stable keys)."""
    doc = {"sha256": hashlib.sha256(_canonical(body)).hexdigest(), "body": body}
    return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()


def write_manifest(root: Path, body: dict) -> None:
    """Publish ``body`` as the current version: the one commit point.

    The retained copy in ``versions/`` is written (durably) first, then
    ``manifest.json`` is atomically replaced (temporary file, fsync, rename,
    fsync of the directory).

    Raises
    ------
    OSError
        From any write, fsync or rename; the previous manifest stays current.
    """
    if any("codec" in e for e in body["index"]["segments"]):
        body["min_reader_version"] = max(int(body["min_reader_version"]), CODEC_READER_VERSION)
    raw = encode_manifest(body)
    atomic_write(version_path(root, body["version"]), [raw])
    atomic_write(root / MANIFEST, [raw])


def write_current(root: Path, body: dict) -> None:
    """Atomically replace ``manifest.json`` alone (used to put the previous
    manifest back when a commit fails after its rename).

    Raises
    ------
    OSError
        From any write, fsync or rename.
    """
    atomic_write(root / MANIFEST, [encode_manifest(body)])


def manifest_sha256(root: str | os.PathLike, body: dict) -> str:
    """sha256 of the ``manifest.json`` bytes of version ``body`` (as ``sha256sum`` shows).

    The retained copy ``versions/manifest-V.json`` or ``manifest.json`` is
    hashed when it holds this very body; a store whose files have moved on
    falls back to the canonical encoding, which is what retrostore writes.
    """
    return hashlib.sha256(manifest_bytes(Path(root), body)).hexdigest()


def manifest_bytes(root: Path, body: dict) -> bytes:
    """The stored bytes of the manifest of version ``body`` (its canonical encoding if no file holds it)."""
    want = hashlib.sha256(_canonical(body)).hexdigest()
    for path in (version_path(root, body["version"]), root / MANIFEST):
        try:
            raw = path.read_bytes()
            if json.loads(raw).get("sha256") == want:
                return raw
        except (OSError, ValueError, AttributeError):
            continue
    return encode_manifest(body)
