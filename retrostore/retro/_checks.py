"""Argument checks shared by the retro/ modules (messages name value, limit and fix)."""

from __future__ import annotations

import contextlib
import os
import weakref
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import CorruptStoreError, InvalidInputError, WriterLockedError, check_int, is_int, shown
from ..storage.fileio import WriterLock
from ..storage.manifest import manifest_sha256

__all__ = ["check_eos_id", "check_exclude", "check_k_of", "check_ngram", "check_pad_id", "check_several_documents", "check_threshold",
           "output_lock", "store_pad_id", "settings"]


class Settings(NamedTuple):
    chunk_tokens: int
    pad_id: int
    vocab_size: int
    deletes: int
    identity: str  # the sha256 of the version's manifest: which store and version (retro.table.store_identity)
    metric: str  # "ip" or "l2" (the score of a missing neighbour: -inf or inf)
    deleted_chunks: int  # chunks of deleted documents in this version (purged or not)


_SETTINGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def settings(store) -> Settings:
    """The manifest values retro/ needs, cached per store handle and version.

    ``Store.manifest`` deep-copies the whole manifest (about 0.1-3 ms with many
    segments), too slow to read on every generation-time fetch.
    """
    version = store.version
    hit = _SETTINGS.get(store)
    if hit is not None and hit[0] == version:
        return hit[1]
    m = store.manifest
    s = Settings(int(m["chunk_tokens"]), int(m["tokenizer"]["pad_id"]), int(m["tokenizer"]["vocab_size"]),
                 int((m.get("deletes") or {}).get("documents", 0)), manifest_sha256(store.path, m), str(m["metric"]),
                 int((m.get("deletes") or {}).get("chunks", 0)))
    _SETTINGS[store] = (version, s)
    return s


def check_k_of(store, k: Any) -> int:
    """RETRO's neighbour count ``k`` for ``store``: an int in ``[1, max(1, len(store))]``.

    A window chunk has at most every chunk of the store as a neighbour: a larger k
    only writes -1 padding (helper-17: k = 100,000 on a 60-chunk store wrote
    6 million -1s; k = 10**9 ended in a MemoryError).
    """
    live = len(store) - settings(store).deleted_chunks  # (helper-29: deleted chunks counted as neighbours)
    if live <= 0:
        raise InvalidInputError(f"version {store.version} of the store has no live chunk ({len(store):,} "
                                f"chunk{'' if len(store) == 1 else 's'}, all of deleted documents, or none): nothing "
                                "to retrieve or train on; append documents and commit")
    return check_int("k", k, 1, live, fix=f"the store holds {live:,} live chunk{'' if live == 1 else 's'}; "
                     "RETRO uses k = 2")


def check_threshold(overlap_threshold: Any) -> float | None:
    """The leakage filters' ``overlap_threshold``: a share in (0, 1], or None (the 13-gram rules off)."""
    if overlap_threshold is not None and (isinstance(overlap_threshold, bool) or not isinstance(
            overlap_threshold, (int, float, np.floating)) or not 0 < overlap_threshold <= 1):
        raise InvalidInputError(f"overlap_threshold={shown(overlap_threshold)} must be a share in (0, 1] (RETRO: 0.5), "
                                "or None to turn the overlap filters off (--no-overlap-filter on the command line)")
    return None if overlap_threshold is None else float(overlap_threshold)


#: Whose documents a window slot's neighbours may not come from (``sequence_neighbors(exclude=...)``).
EXCLUDES = ("sequence", "chunk")


def check_eos_id(store: Any, eos: Any, pad: int) -> int:
    """A document-end token id: an int of the store's vocabulary, not the pad id (windows, neighbour tokens)."""
    vocab = int(store.manifest["tokenizer"]["vocab_size"])
    if not is_int(eos):  # (helper-28: 1.0 and True were called "outside the vocabulary")
        raise InvalidInputError(f"eos_id={shown(eos)} must be an int token id in [0, {vocab}) of the store's "
                                "tokenizer, or None for its document-end token")
    if not 0 <= eos < vocab:
        raise InvalidInputError(f"eos_id={shown(eos)} is outside the store's vocabulary [0, {vocab}); give a token id of "
                                "the store's tokenizer")
    if eos == pad:
        raise InvalidInputError(f"eos_id={eos} equals pad_id={pad}: the label at a document's end would be ignored "
                                "as padding; give another eos_id or pad_id")
    return int(eos)


def check_exclude(exclude: Any) -> str:
    """``exclude``: one of :data:`EXCLUDES`."""
    if exclude not in EXCLUDES:
        raise InvalidInputError(f"exclude={exclude!r}; expected 'sequence' or 'chunk'")
    return exclude


def check_several_documents(store: Any, table: Any) -> None:
    """Refuse a version whose live chunks (``table``: its :class:`~retrostore.retro.table.ChunkTable`) are all in
    one document: RETRO excludes a chunk's own document (and a window's), so none could have a neighbour
    (helper-31: chunk neighbours all -1 and exit 0; helper-59: the same from ``sequence_neighbors`` and the
    export of a one-file ``.txt`` corpus)."""
    if len(np.unique(table.doc_ids[table.live])) < 2:
        raise InvalidInputError(f"version {store.version} of the store has its live chunks in one document: every "
                                "candidate is in the chunk's own document, which RETRO excludes; append other "
                                "documents (a .txt input is one document: split a book into several files or jsonl "
                                "lines), or use Store.precompute_neighbors (retrostore neighbors --include-same-doc) "
                                "for unfiltered neighbours")


def check_ngram(ngram: Any, chunk_tokens: int) -> int:
    """The leakage filters' n-gram length: an int in [1, chunk_tokens]."""
    if is_int(ngram) and ngram > chunk_tokens:  # (helper-28: it matched nothing, the filters silently off)
        raise InvalidInputError(f"ngram={shown(ngram)} is longer than a chunk ({chunk_tokens} tokens): no n-gram "
                                "would match and the overlap filters would be off; RETRO uses 13 (pass "
                                "overlap_threshold=None, or --no-overlap-filter, to turn the filters off on purpose)")
    return check_int("ngram", ngram, 1, chunk_tokens, fix="RETRO uses 13")


class OutputLock(WriterLock):
    """:class:`WriterLock` on ``OUT.lock``; :meth:`done` removes the file once the output is complete."""

    def __init__(self, path: str | os.PathLike) -> None:
        while True:
            super().__init__(path)
            try:  # the file locked is still the one at ``path``: not one a finished run removed (done)
                if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                    return
            except FileNotFoundError:
                pass
            self.release()  # (review: it was then held beside the holder of the new OUT.lock)

    def done(self) -> None:
        """Remove the lock file, still holding the lock (helper-41: every finished run left one behind).
        A process that opened the file before is refused by the held lock; one that locks it after the
        release finds it removed, and locks the path again (:meth:`__init__`)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def output_lock(out: Path, what: str) -> OutputLock:
    """Hold ``OUT.lock`` (kept beside ``out``) while writing ``out``: a second process writing the same
    output (two ranks of one job) is refused at once instead of sharing its partial files (helper-28:
    one finished with exit 0 and neighbour files of chunk 0, the other with a raw FileNotFoundError).

    Raises
    ------
    WriterLockedError
        Another process holds the lock.
    InvalidInputError
        The lock file cannot be created (a directory without write access).
    """
    lock = out.with_name(out.name + ".lock")
    try:
        return OutputLock(lock)
    except WriterLockedError:
        raise WriterLockedError(f"another process is writing {what} {str(out)!r} (it holds {str(lock)!r}); let it "
                                "finish (then run again to reuse its result), or write to another path") from None
    except CorruptStoreError as exc:  # (the store's lock wording: "remove it if no writer runs"; helper-42)
        why = getattr(exc.__cause__, "strerror", None) or exc.__cause__ or exc
        raise InvalidInputError(f"cannot write {what} {str(out)!r}: its lock file {str(lock)!r} cannot be opened "
                                f"({why}); write to a directory where you can create files") from None


def store_pad_id(store) -> int:
    return settings(store).pad_id


def check_pad_id(store, pad_id: Any) -> int:
    """``pad_id`` (default: the store's) checked against the store's vocabulary."""
    vocab = settings(store).vocab_size
    if pad_id is None:
        return store_pad_id(store)
    if not is_int(pad_id):
        raise InvalidInputError(f"pad_id={shown(pad_id)} must be an int token id in [0, {vocab}) (the model's pad_id), "
                                f"or None for the store's own ({store_pad_id(store)})")
    if not 0 <= pad_id < vocab:
        raise InvalidInputError(
            f"pad_id={shown(pad_id)} is outside the store's vocabulary [0, {vocab}); give the id of a token of the "
            "store's tokenizer (the model's pad_id), or leave it None for the store's own pad id "
            f"({store_pad_id(store)})")
    return int(pad_id)
