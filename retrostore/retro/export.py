"""Export a store as the files retro-pytorch 0.3.9's ``RETRODataset`` reads.

retro-pytorch (lucidrains, PyPI ``retro-pytorch==0.3.9``) reads three raw
``int32`` memory maps (``np.memmap``, no header, C order; ``data.py``)::

    train.chunks.dat      (num_chunks + C, T + 1)  one row per chunk: its T
                          tokens padded with 0 (in document mode eos_id
                          right after a document's text), then one extra
                          column: the
                          first token of the next chunk of the same document,
                          or eos_id where the chunk ends its document
                          (0 in a padding row)
    train.chunks.knn.dat  (num_chunks + C, k)      each chunk's k neighbours
                          as row numbers of train.chunks.dat, -1 for none
    train.seq.dat         (num_sequences,)         the first row of each
                          training window

For window ``i`` starting at row ``s``, ``RETRODataset[i]`` returns ``seq``:
rows ``s .. s+C-1``' T tokens, then the last row's extra column (``L + 1``
tokens; everything after the first ``eos_id`` set to 0), and ``retrieved``
``(C, k, 2T)``: each neighbour row's T tokens, then the next row's T tokens
unless the neighbour row holds ``eos_id`` (document end: zeros), all 0 where
the neighbour is -1. It pads with 0 whatever ``pad_id`` it is given, and
``RETRO`` masks ``retrieved != pad_id`` and ignores label ``pad_id`` in the
loss: the export therefore pads with 0, and refuses a store where token 0 is
real text unless asked.

Here rows are the windows of :func:`training_sequences` laid end to end (a
window's empty slots are all-0 rows), followed by the C all-0 rows
``RETRODataset`` expects past ``num_chunks``; ``train.seq.dat`` is
``0, C, 2C, ...``. With ``eos_id`` never inside a chunk's text,
``RETRODataset`` then yields exactly :class:`TrainingSet`'s ``(seq,
retrieved)`` for every row, pad id 0; in document mode both carry ``eos_id``
after each document's text, in the windows and in the neighbours that end
their document (:func:`~retrostore.retro.table.mark_document_ends`).

Beside them: ``train.doc_ids.dat`` (int32 ``(num_chunks + C,)``, each row's
document, -1 for padding rows; retro-pytorch's own preprocessing writes it),
``rows.npy`` (int64, each row's retrostore chunk id, -1 for padding),
``seq_knn.npy`` (the windows' neighbours as retrostore chunk ids,
``(num_sequences, C, k)``, readable with :class:`NeighborFile`),
``retro_pytorch.json`` (the ``RETRODataset`` keyword arguments, memmap paths
relative to it) and ``export.json`` (provenance, the ``RETRO(...)`` settings
that fit the vocabulary, and the neighbour summary).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import warnings
from glob import escape as glob_escape
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidInputError, OutputExistsError, StoreIOError, check_bool
from ..storage.fileio import check_outside_store, writable_dir
from ._checks import check_exclude, check_k_of, check_ngram, check_several_documents, check_threshold, output_lock
from .leakage import DEFAULT_NGRAM, DEFAULT_OVERLAP_THRESHOLD
from .sequences import MODES, sequence_neighbors, training_sequences
from .table import chunk_table

if TYPE_CHECKING:
    from retrostore import Store

__all__ = ["export_retro_pytorch", "retro_dataset_kwargs", "FILES"]

#: File names, as retro-pytorch's own preprocessing names them (``TrainingWrapper`` defaults).
FILES = {"chunks": "train.chunks.dat", "knn": "train.chunks.knn.dat", "seqs": "train.seq.dat",
         "doc_ids": "train.doc_ids.dat"}
KWARGS_FILE = "retro_pytorch.json"
INFO_FILE = "export.json"


#: Where an earlier export is renamed while a new one replaces it (``OUT`` + this + 8 random characters).
ASIDE = ".replaced-"
#: The files an export writes beside retro-pytorch's (``export.json``'s ``files``).
_FILES_ALL = {**FILES, "rows": "rows.npy", "seq_knn": "seq_knn.npy", "kwargs": KWARGS_FILE}
#: The names an export writes in its directory (each a plain file).
_OURS = frozenset({*_FILES_ALL.values(), "seq_knn.summary.json", INFO_FILE})


def _partial(out: Path) -> Path:
    """Where the export is assembled: ``OUT.partial`` beside ``out``."""
    return out.with_name(out.name + ".partial")


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # (not POSIX, or no such directory: checked after this)
        return 255


def _foreign(out: Path) -> list[str]:
    """What ``out`` holds that an export does not write: other names, and directories under an export's name
    (helper-60: a user's directory named ``train.seq.dat`` was removed with its contents)."""
    return sorted(p.name for p in out.iterdir()  # (helper-61: a FIFO under an export's name is not ours either)
                  if p.name not in _OURS or not (p.is_symlink() or p.is_file()))


def _check_only_export_files(out: Path) -> None:
    """Refuse to replace an export directory that holds anything an export does not write (helper-59:
    ``--force`` removed a file the user had put there, without a word)."""
    others = _foreign(out)
    if others:
        shown_names = ", ".join(map(repr, others[:5])) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise OutputExistsError(f"{out} holds {shown_names}, which an export does not write: force replaces the "
                                "whole directory, so it is not replaced; move them out of it, or give another "
                                "directory")


def _replace(work: Path, out: Path) -> None:
    """Put the finished export ``work`` at ``out``. An earlier export there is first renamed aside and checked
    again, so a file put into it while this export ran is never removed (helper-60); then only the names an
    export writes are removed from it."""
    try:
        if not out.exists():
            os.replace(work, out)
            return
        mode = stat.S_IMODE(out.stat().st_mode)  # (helper-61: a private export came back world-readable)
        aside = Path(tempfile.mkdtemp(prefix=f"{out.name}{ASIDE}", dir=out.parent))
        try:
            os.replace(out, aside)  # (onto the new empty directory: a rename, never a copy)
        except OSError:
            aside.rmdir()
            raise
    except OSError as exc:  # (helper-61: an immutable or mounted OUT was a traceback after all the work)
        raise StoreIOError(f"the export is finished in {work}, but {out} cannot be replaced: {exc.strerror or exc}; "
                           f"replace {out} with it yourself (mv), or export to another directory") from None
    try:
        _check_only_export_files(aside)
    except OutputExistsError:
        os.replace(aside, out)  # (back as it was; the new export stays in OUT.partial)
        try:
            _check_only_export_files(out)  # (raises, naming out)
        except OutputExistsError as exc:
            raise OutputExistsError(f"{exc} (the new export is kept in {work})") from None
        raise
    os.replace(work, out)
    os.chmod(out, mode)
    for name in _OURS:
        p = aside / name
        if p.is_symlink() or p.is_file():
            p.unlink()
    try:
        aside.rmdir()
    except OSError:  # something was put there in the last instant: kept, and said
        raise OutputExistsError(f"the export is written to {out}; files put into the earlier export while it was "
                                f"replaced are kept in {aside}") from None


def _write_memmap(path: Path, arr: np.ndarray) -> None:
    """Raw little-endian int32, no header: what ``np.memmap(path, dtype=np.int32, shape=...)`` reads."""
    with open(path, "wb") as fh:
        fh.write(np.ascontiguousarray(arr, dtype="<i4").tobytes())
        fh.flush()
        os.fsync(fh.fileno())


def export_retro_pytorch(store: "Store", out_dir: str | os.PathLike, *, seq_len: int, k: int = 2,
                         mode: str = "packed", eos_id: int | None = None, exclude: str = "sequence",
                         overlap_threshold: float | None = DEFAULT_OVERLAP_THRESHOLD, ngram: int = DEFAULT_NGRAM,
                         allow_pad_collision: bool = False, force: bool = False, progress: bool = False) -> dict:
    """Write the training windows and their neighbours for retro-pytorch's ``RETRODataset``.

    Parameters
    ----------
    store : Store
    out_dir : path-like
        Directory to create (see the module docstring for its files). It
        is assembled in ``OUT.partial`` beside it (kept on failure: running
        again resumes the neighbour search) and renamed into place.
    seq_len : int
        L: ``RETRODataset(seq_len=...)`` and ``RETRO(max_seq_len=...)``; a
        multiple of ``chunk_tokens``.
    k : int, default 2
        Neighbours per chunk (``num_neighbors``).
    mode : {"packed", "document"}, default "packed"
        As in :func:`training_sequences`.
    eos_id : int, optional
        Document-end marker (default: :func:`default_eos_id`, ``[SEP]`` =
        102 for the default tokenizer, retro-pytorch's own ``EOS_ID``). It
        must never occur inside a chunk.
    exclude, overlap_threshold, ngram
        As in :func:`sequence_neighbors`.
    allow_pad_collision : bool, default False
        Export although token id 0 occurs in the chunks (a tokenizer whose id
        0 is real text, e.g. ``!`` in GPT-2 BPE): retro-pytorch would mask
        those tokens as padding.
    force : bool, default False
        Replace an existing export at ``out_dir`` (only a directory holding
        ``retro_pytorch.json`` is replaced).
    progress : bool, default False

    Returns
    -------
    dict
        ``export.json``'s content: ``retro_dataset`` (the kwargs, paths
        relative), ``retro_model`` (``num_tokens``, ``chunk_size``,
        ``max_seq_len``, ``pad_id`` for ``RETRO(...)``), ``store``,
        ``mode``, ``rows``, ``neighbors`` (the :func:`sequence_neighbors`
        summary) and ``files``.

    Raises
    ------
    OutputExistsError
        ``out_dir`` exists and ``force`` is False, or it exists and is not an
        export, or it holds files an export does not write (``force``
        replaces the whole directory).
    InvalidInputError
        Bad ``seq_len`` / ``k`` / ``mode`` / ``eos_id``; ``eos_id`` occurs in
        a chunk; token 0 occurs in a chunk (without ``allow_pad_collision``);
        more rows than int32 holds; a store version without a live chunk, or
        whose live chunks are all in one document; ``out_dir`` a file, a
        symlink loop, or a name too long for ``OUT.replaced-*`` beside it.
    WriterLockedError
        Another process is exporting to ``out_dir`` (it holds ``OUT.lock``,
        a file beside ``out_dir``, removed when the export completes).
    StoreIOError
        The finished export (in ``OUT.partial``) cannot be renamed into
        place (``out_dir`` immutable, or a mount point).

    Warns
    -----
    RuntimeWarning
        An ``OUT.replaced-*`` directory is there: an earlier export that an
        interrupted replacement left (the export before it).
    """
    k = check_k_of(store, k)
    # The neighbours' own arguments, before anything is written (helper-29: a refused ngram left
    # OUT.partial and OUT.lock behind).
    overlap_threshold = check_threshold(overlap_threshold)
    ngram = check_ngram(ngram, int(store.manifest["chunk_tokens"]))
    exclude = check_exclude(exclude)
    if mode not in MODES:
        raise InvalidInputError(f"mode={mode!r}; expected one of {MODES}")
    force = check_bool("force", force)
    allow_pad_collision = check_bool("allow_pad_collision", allow_pad_collision)
    progress = check_bool("progress", progress)
    if not isinstance(out_dir, (str, os.PathLike)):
        raise InvalidInputError(f"out_dir={out_dir!r} must be a path")
    try:
        out = Path(out_dir).resolve()  # "." and ".." have no name to put ".partial" beside (helper-17: a ValueError)
    except (RuntimeError, OSError) as exc:  # (helper-60: a symlink loop was a RuntimeError traceback)
        raise InvalidInputError(f"out_dir={str(out_dir)!r} cannot be resolved ({exc}); give another path") from None
    if out.exists() and not out.is_dir():  # (helper-60: "pass force=True", which never replaces a file)
        raise InvalidInputError(f"out_dir={str(out)!r} is a file; an export is a directory: give another path")
    limit = _name_max(out.parent)
    if len(out.name) + len(ASIDE) + 8 > limit:  # (helper-61: --force could never replace such a name)
        raise InvalidInputError(f"out_dir's name is {len(out.name)} characters; the export needs {len(ASIDE) + 8} more "
                                f"beside it ({out.name}{ASIDE}xxxxxxxx) within this file system's {limit}: give a "
                                "shorter name")
    for left in sorted(out.parent.glob(glob_escape(out.name) + ASIDE + "*")):  # (helper-61: never explained)
        warnings.warn(f"{left} is an earlier export of {out.name} left by an export that was interrupted while "
                      f"replacing it; remove it once {out} is as you want", RuntimeWarning, stacklevel=2)
    work = _partial(out)
    if work.is_symlink() or (work.exists() and not work.is_dir()):  # (helper-60: a FileExistsError traceback,
        # or the export written into the directory a link named)
        raise InvalidInputError(f"{work} (where the export is assembled) is a file or a link; remove it, or give "
                                "another out_dir")
    if out.exists():
        if not force:
            raise OutputExistsError(f"{out} exists; pass force=True (retrostore export --force) to replace it, or "
                                   "give another directory")
        if not (out / KWARGS_FILE).is_file():
            raise OutputExistsError(f"{out} exists and holds no {KWARGS_FILE}: it is not an export, so it is not "
                                    "replaced even with force; remove it yourself or give another directory")
        _check_only_export_files(out)
    check_outside_store(out, "out_dir")
    if not out.parent.is_dir():
        why = "is a file" if out.parent.exists() else "does not exist"
        raise InvalidInputError(f"out_dir={str(out)!r}: {str(out.parent)!r} {why}; give a path in a directory")
    writable_dir(out.parent, f"out_dir={str(out)!r}")
    table = chunk_table(store)
    seqs = training_sequences(store, seq_len, mode=mode, pad_id=0, eos_id=eos_id, table=table)
    if len(seqs) == 0:  # (helper-28: an IndexError and a .partial left behind, or "0 windows" and exit 0)
        raise InvalidInputError(f"version {store.version} of the store has no live chunk ({len(store):,} chunks, of "
                                "deleted or empty documents): nothing to train on; append documents and commit")
    check_several_documents(store, table)
    real = np.arange(table.chunk_tokens) < table.lengths[:, None]
    n_eos = int(((table.tokens == seqs.eos_id) & real).sum())
    if n_eos:
        first = int(np.flatnonzero(((table.tokens == seqs.eos_id) & real).any(1))[0])
        raise InvalidInputError(
            f"eos_id={seqs.eos_id} occurs {n_eos} times inside chunks (first in chunk {first}); retro-pytorch "
            "treats it as a document end there (dropping that neighbour's continuation and zeroing the rest of the "
            "sequence): pass an eos_id that never occurs in the text")
    n_zero = int(((table.tokens == 0) & real).sum())
    if n_zero and not allow_pad_collision:
        name = store.chunker.tokenizer.id_to_token(0)
        raise InvalidInputError(
            f"token id 0 ({name!r}) occurs {n_zero} times in the store's chunks, but retro-pytorch's RETRODataset "
            "pads with 0 and RETRO(pad_id=0) masks every 0 as padding, so those tokens would be hidden from the "
            "model; use a chunk tokenizer whose id 0 is its pad token (BERT's [PAD]), train with "
            "retrostore.retro.TrainingSet (any pad id) instead, or pass allow_pad_collision=True")
    n, c = seqs.chunk_ids.shape
    rows = np.concatenate([seqs.chunk_ids.ravel(), np.full(c, -1, np.int64)])
    if len(rows) >= 2 ** 31:
        raise InvalidInputError(f"{len(rows)} rows do not fit retro-pytorch's int32 row numbers")
    lock = output_lock(out, "the export")
    try:
        summary = _export(store, out, table, seqs, k, exclude, overlap_threshold, ngram, progress, rows, n_zero, force)
        lock.done()
        return summary
    finally:
        lock.release()


def _export(store, out: Path, table, seqs, k: int, exclude, overlap_threshold, ngram, progress, rows: np.ndarray,
            n_zero: int, force: bool) -> dict:
    if out.exists() and not force:  # again, under the lock (helper-29: an export that finished meanwhile was replaced)
        raise OutputExistsError(f"{out} exists (another export finished it meanwhile); pass force=True (retrostore "
                               "export --force) to replace it, or give another directory")
    n, c = seqs.chunk_ids.shape
    seq_len, mode = seqs.seq_len, seqs.mode
    work = _partial(out)
    work.mkdir(exist_ok=True)
    for name in _OURS:  # a leftover OUT.partial (a killed run) is reused; what it holds under our names is
        p = work / name  # replaced, never written through (helper-61: a link there overwrote a file outside)
        if p.is_symlink():
            p.unlink()
        elif p.exists() and not p.is_file():
            raise InvalidInputError(f"{p} is not a file; remove {work} (an earlier export's unfinished copy) and "
                                    "export again")
    summary = sequence_neighbors(store, seqs, work / _FILES_ALL["seq_knn"], k=k, exclude=exclude,
                                 overlap_threshold=overlap_threshold, ngram=ngram, progress=progress)
    seq_knn = np.load(work / _FILES_ALL["seq_knn"], allow_pickle=False)
    row_of = np.full(len(store), -1, np.int64)
    have = rows >= 0
    row_of[rows[have]] = np.flatnonzero(have)
    # Chunk rows: the windows' T-token slots (padded with 0; in document mode eos_id after each document's
    # text, Sequences.tokens), then the continuation's first token or the document-end marker.
    safe = np.maximum(rows, 0)
    extra = np.where(table.next_in_doc[safe], table.tokens[np.minimum(safe + 1, len(table) - 1), 0], seqs.eos_id)
    body = np.zeros((len(rows), table.chunk_tokens), np.int64)
    for start, window in seqs.batches(4096):
        body[start * c : (start + len(window)) * c] = window[:, :seq_len].reshape(-1, table.chunk_tokens)
    chunks = np.concatenate([body, np.where(have, extra, 0)[:, None]], axis=1)
    knn = np.full((len(rows), k), -1, np.int64)
    flat = seq_knn.reshape(n * c, k)
    knn[: n * c] = np.where(flat >= 0, row_of[np.maximum(flat, 0)], -1)
    _write_memmap(work / FILES["chunks"], chunks)
    _write_memmap(work / FILES["knn"], knn)
    _write_memmap(work / FILES["seqs"], np.arange(n, dtype=np.int64) * c)
    _write_memmap(work / FILES["doc_ids"], np.where(have, table.doc_ids[safe], -1))
    np.save(work / _FILES_ALL["rows"], rows)
    kwargs = {"num_chunks": n * c, "chunk_size": table.chunk_tokens, "seq_len": int(seq_len), "num_sequences": n,
              "num_neighbors": k, "chunk_memmap_path": FILES["chunks"], "chunk_nn_memmap_path": FILES["knn"],
              "seq_memmap_path": FILES["seqs"], "pad_id": 0, "eos_id": seqs.eos_id}
    info = {
        "format": "retro-pytorch 0.3.9 RETRODataset",
        "retro_dataset": kwargs,
        "retro_model": {"num_tokens": int(store.manifest["tokenizer"]["vocab_size"]),
                        "chunk_size": table.chunk_tokens, "max_seq_len": int(seq_len), "pad_id": 0},
        "store": {"path": store.info()["path"], "version": store.version,
                  "tokenizer_sha256": store.manifest["tokenizer"]["sha256"],
                  "store_pad_id": int(store.manifest["tokenizer"]["pad_id"])},
        "mode": mode, "rows": len(rows), "pad_collisions": n_zero,
        "neighbors": summary,
        "files": dict(_FILES_ALL),
    }
    (work / KWARGS_FILE).write_text(json.dumps(kwargs, indent=1) + "\n")
    (work / INFO_FILE).write_text(json.dumps(info, indent=1, default=str) + "\n")
    for p in [*work.glob("seq_knn.candidates-*"), work / "seq_knn.npy.lock"]:
        p.unlink(missing_ok=True)  # (the neighbours' lock: this export's own lock keeps others out)
    _replace(work, out)
    return info


def retro_dataset_kwargs(path: str | os.PathLike) -> dict:
    """``RETRODataset`` keyword arguments of an export, memmap paths made absolute.

    Parameters
    ----------
    path : path-like
        The export directory or its ``retro_pytorch.json``.

    Returns
    -------
    dict
        ``RETRODataset(**retro_dataset_kwargs(path))`` opens the export
        from any working directory.

    Raises
    ------
    InvalidInputError
        No readable ``retro_pytorch.json`` there.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(f"path={path!r} must be the path of an export directory or of its {KWARGS_FILE}")
    p = Path(path)
    if p.is_dir():
        p = p / KWARGS_FILE
    keys = ("chunk_memmap_path", "chunk_nn_memmap_path", "seq_memmap_path")
    try:
        kwargs = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        kwargs = exc
    if not isinstance(kwargs, dict) or not all(isinstance(kwargs.get(key), str) for key in keys):
        why = kwargs if isinstance(kwargs, Exception) else f"it lacks one of {', '.join(keys)}"
        raise InvalidInputError(f"{p}: not a readable {KWARGS_FILE} ({why}); write it with "
                                "retrostore.retro.export_retro_pytorch or `retrostore export`") from None
    for key in keys:
        kwargs[key] = str((p.parent / kwargs[key]).resolve())
    return kwargs
