"""What a store remembers of its builds: the input files it holds the documents of.

Every build records, in the manifest's ``builds`` (published with each of its
commits), what it has committed of which input file, identified by the
file's sha256 (not its path or time: a moved or touched file is the same
input) and the sha256 of the bytes read from it (decompressed: the same
documents compressed another way, ``.jsonl.zst`` re-compressed as
``.jsonl.gz``, are the same input too), and the fields its documents were
read from. A plain build then
skips input files a finished build holds already, resumes a file an
interrupted one stopped in after its last committed document, and builds the
rest; adding the same documents again needs ``append=True`` (``--append``),
because a second copy of every document puts the answer into RETRO's
retrieval (Borgeaud et al. 2021, §4.4: leakage between training and
retrieval data). Sharded builds list their files in their own record
(:mod:`.sharded`), so each kind sees the other's.

A plain build's record of one input file::

    {"kind": "file", "rel": name, "size": bytes, "sha256": hex, "content_sha256": hex or None,
     "text_field": ..., "meta_field": ..., "copy": 0, "documents": committed so far,
     "first_doc_id": id of its first document, "done": bool}

(``content_sha256`` is absent from records written before it existed: :func:`content_of` then
takes the ``sha256`` of an uncompressed file, and a compressed one matches by its bytes only.)
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from ..text.inputs import COMPRESSED, input_digests, input_kind

__all__ = ["BUILDS", "file_digest", "content_of", "same_input", "fields_of", "Records"]

#: The manifest field holding the build records.
BUILDS = "builds"


def file_digest(path: Path, rel: str) -> dict:
    """``{"rel", "size", "sha256", "content_sha256"}`` of an input file: the sha256 of its bytes as
    stored, and of the bytes a build reads from it (decompressed; None when it cannot be read)."""
    size, sha, content = input_digests(path)
    return {"rel": rel, "size": size, "sha256": sha, "content_sha256": content}


def content_of(entry: dict) -> str | None:
    """The sha256 of the bytes a build reads from the input of a digest or record. A record
    written before ``content_sha256`` existed has it only when its file was not compressed (its
    own sha256 then); for a compressed one it is unknown (None)."""
    if "content_sha256" in entry:
        return entry["content_sha256"]
    return None if input_kind(entry.get("rel", "")) in COMPRESSED else entry.get("sha256")


def _one_document(entry: dict) -> bool:
    return input_kind(entry.get("rel", "")) == ".txt"


def same_input(a: dict, b: dict) -> bool:
    """Whether two digests (or records) name the same input: the same bytes, or the same
    decompressed bytes (:func:`content_of`), read the same way (a ``.txt`` file is one
    document, the same bytes as ``.jsonl`` are one per line: helper-22)."""
    if _one_document(a) != _one_document(b):
        return False
    if a.get("sha256") == b.get("sha256"):
        return True
    content = content_of(a)
    return content is not None and content == content_of(b)


def fields_of(rel: str, text_field: str, meta_field: str) -> tuple[str | None, str | None]:
    """The fields a record of input ``rel`` is matched by: ``(None, None)`` (any) for a ``.txt`` file,
    which is one document whatever they say (helper-17: --text-field re-added it)."""
    return (None, None) if input_kind(rel) == ".txt" else (text_field, meta_field)


class Records:
    """The build records of a manifest, as a build changes them (a copy: publish with a commit).

    Parameters
    ----------
    manifest : dict
        The store's current manifest body.
    """

    def __init__(self, manifest: dict):
        self.all: dict[str, dict] = copy.deepcopy(manifest.get(BUILDS, {}))

    @staticmethod
    def file_id(sha256: str, text_field: str, meta_field: str, copy_no: int) -> str:
        """The record id of one copy of one input file read with these fields."""
        key = json.dumps([sha256, text_field, meta_field, copy_no]).encode()
        return "file-" + hashlib.sha256(key).hexdigest()[:32]

    def copies(self, digest: dict, text_field: str, meta_field: str) -> list[tuple[str, dict]]:
        """The plain builds' records of this input (:func:`same_input`) and fields, by copy number.
        Fields ``None``: any fields (a ``.txt`` file is one document whatever they say, see :func:`fields_of`)."""
        out = [(rid, r) for rid, r in self.all.items() if r.get("kind") == "file" and same_input(digest, r)
               and (text_field is None or (r.get("text_field") == text_field and r.get("meta_field") == meta_field))]
        return sorted(out, key=lambda x: x[1].get("copy", 0))

    def sharded_with(self, digest: dict) -> list[tuple[str, dict]]:
        """Sharded builds' records that list this input (finished or not)."""
        return [(rid, r) for rid, r in self.all.items() if "shards" in r
                and any(same_input(digest, f) for f in r.get("files", []))]

    def holder(self, digest: dict, text_field: str, meta_field: str, *, exclude: str | None = None) -> str | None:
        """How the store holds this input's documents already, in words, or None (the record
        ``exclude`` left out: a build resuming itself)."""
        for rid, r in self.copies(digest, text_field, meta_field):
            first, n = r["first_doc_id"], r["documents"]
            ids = f"documents {first}..{first + n - 1}" if n else "no documents"
            state = "built" if r["done"] else "partly built"
            return f"{state} before as {r['rel']!r}{_how(digest, r)}, {ids}"
        for rid, r in self.sharded_with(digest):
            if rid == exclude:
                continue
            done = r["merged"] == r["shards"]
            how = next(_how(digest, f) for f in r.get("files", []) if same_input(digest, f))
            if done:
                return f"built by the sharded build {rid[:12]}{how}"
            return (f"being built by the sharded build {rid[:12]}{how}, {r['merged']} of its {r['shards']} shards "
                    "merged: finish it by running its own command again (the same inputs and --shards, "
                    "--engine local or ray)")
        return None

    def unfinished_sharded(self, digest: dict) -> bool:
        """Whether an unfinished sharded build lists this input."""
        return any(r["merged"] != r["shards"] for _, r in self.sharded_with(digest))

    def finished_holder(self, digest: dict, text_field: str, meta_field: str) -> str | None:
        """How finished builds hold this input's documents, in words (:meth:`holder`), or None
        when none holds it or an unfinished build does too (a plain build's open copy, a sharded
        build not fully merged, this very build's interrupted run among them): what a sharded
        build skips before planning, leaving every unfinished case to its check after planning."""
        copies = self.copies(digest, text_field, meta_field)
        sharded = self.sharded_with(digest)
        if any(not r["done"] for _, r in copies) or any(r["merged"] != r["shards"] for _, r in sharded):
            return None
        return self.holder(digest, text_field, meta_field) if copies or sharded else None

    def sharded_stopped_in_other_bytes(self, digest: dict, *, exclude: str | None = None) -> str | None:
        """The id of an unfinished sharded build (other than ``exclude``) that lists a file of this
        input's name but other content, or None: it merged documents of this file's earlier bytes
        (helper-24: building the new bytes then stored those documents twice, or mixed the two)."""
        for rid, r in self.all.items():
            if "shards" in r and rid != exclude and r.get("merged") != r.get("shards") and any(
                    f.get("rel") == digest["rel"] and not same_input(digest, f) for f in r.get("files", [])):
                return rid
        return None

    def same_name_other_bytes(self, digest: dict, run_shas: set[str]) -> tuple[str, dict] | None:
        """A plain build's record of a file of the same name, of bytes this run does not build, that
        committed documents; or None. An unfinished one first (perhaps this file before it was
        repaired: a truncated download completed, a bad line fixed), else the last finished one
        (perhaps this file before it grew, helper-38): the caller compares the documents."""
        found = [(rid, r) for rid, r in self.all.items()
                 if r.get("kind") == "file" and r.get("rel") == digest["rel"] and r.get("sha256") not in run_shas
                 and r.get("documents", 0) > 0]
        return min(found, key=lambda x: (bool(x[1].get("done")), -int(x[1]["first_doc_id"])), default=None)

    def to_build(self, digest: dict, text_field: str, meta_field: str, *, append: bool) -> tuple[str, dict] | None:
        """The record a plain build continues for this file: (id, record) to resume or start,
        or None when the store holds the file's documents already and ``append`` is False.

        A file is resumed when a copy of it is unfinished (with or without ``append``); with
        ``append`` and every copy finished, a new copy starts. A file a sharded build lists
        is never built again without ``append``.
        """
        sha = digest["sha256"]
        copies = self.copies(digest, text_field, meta_field)
        for _, r in copies:  # a record from before content digests learns this file's (published by the next commit)
            if "content_sha256" not in r and r.get("sha256") == sha:
                r["content_sha256"] = digest.get("content_sha256")
        open_ = [(rid, r) for rid, r in copies if not r["done"]]
        if open_:
            return open_[0]
        if (copies or self.sharded_with(digest)) and not append:
            return None
        n = len(copies)
        tf, mf = ("text", "meta") if text_field is None else (text_field, meta_field)
        rid = self.file_id(sha, tf, mf, n)
        return rid, {"kind": "file", "rel": digest["rel"], "size": digest["size"], "sha256": sha,
                     "content_sha256": digest.get("content_sha256"), "text_field": tf, "meta_field": mf,
                     "copy": n, "documents": 0, "first_doc_id": None, "done": False}


def _how(digest: dict, record: dict) -> str:
    """What to add to a message when only the bytes a build reads match (another file name, or the
    same documents compressed another way); nothing when the file's own bytes match."""
    return "" if digest.get("sha256") == record.get("sha256") else " (the same documents in another file or compression)"
