"""Neighbour tokens from chunk ids: RETRO's retrieval input without embedding anything.

Precomputed neighbours (``Store.precompute_neighbors``, ``retrostore
neighbors``, :func:`retrostore.retro.sequence_neighbors`) are chunk ids. A
RETRO model consumes tokens: for each query chunk, k neighbours of
``2 * T`` tokens, the neighbour chunk then its continuation, the next chunk
of the same document (Borgeaud et al. 2021, §2.3). :func:`neighbor_tokens`
turns ids of any shape ``(..., k)`` into exactly the arrays
``Store.neighbors`` returns for the same neighbours, reading each distinct
chunk once; :class:`NeighborFile` does it by row range over a memory-mapped
``.npy`` file, for data loaders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidInputError, StoreIOError, check_int
from ..storage.fileio import check_output_file, check_path
from ..store.reading import neighbor_id_array
from ._checks import check_eos_id, check_pad_id, settings
from .table import ChunkTable, check_table, mark_document_ends

if TYPE_CHECKING:
    from retrostore import Store

__all__ = ["NeighborTokens", "neighbor_tokens", "NeighborFile"]


@dataclass(frozen=True)
class NeighborTokens:
    """Neighbour and continuation tokens of chunk ids shaped ``(..., k)``.

    Attributes
    ----------
    tokens : ndarray, shape (..., k, 2 * T), int64
        Neighbour tokens (``[..., :T]``) then continuation tokens
        (``[..., T:]``: the next chunk of the same document), each part
        padded with ``pad_id`` where shorter or absent (document end, or
        chunk id -1).
    mask : ndarray, shape (..., k, 2 * T), bool
        True where ``tokens`` holds a real token.
    chunk_ids : ndarray, shape (..., k), int64
        The ids given (-1: no neighbour).
    doc_ids : ndarray, shape (..., k), int64
        Their documents; -1 with ``chunk_ids``.
    """

    tokens: np.ndarray
    mask: np.ndarray
    chunk_ids: np.ndarray
    doc_ids: np.ndarray


def _from_table(table: ChunkTable, ids: np.ndarray, pad: int, purged: np.ndarray,
                eos: int | None = None) -> NeighborTokens:
    t = table.chunk_tokens
    ids = np.where(ids >= 0, ids, -1)
    if ids.size:  # a deleted chunk is not served (Store's rule), nor one purged since the table was read
        ids = np.where(table.live[np.maximum(ids, 0)] & ~purged, ids, -1)
    safe = np.maximum(ids, 0)
    have = ids >= 0
    cont = np.where(have & table.next_in_doc[safe], safe + 1, -1)
    tokens = np.concatenate([table.padded(ids, pad), table.padded(cont, pad)], axis=-1)
    pos = np.arange(t)
    mask = np.concatenate([(pos < table.lengths[safe][..., None]) & have[..., None],
                           (pos < table.lengths[np.maximum(cont, 0)][..., None]) & (cont >= 0)[..., None]], axis=-1)
    if eos is not None:  # document mode: eos right after a neighbour or continuation that ends its document
        for part, chunk in ((slice(None, t), ids), (slice(t, None), cont)):
            mask[..., part][mark_document_ends(tokens[..., part], chunk[..., None], table, eos)] = True
    doc_ids = np.where(have, table.doc_ids[safe], -1)
    return NeighborTokens(tokens, mask, ids, doc_ids)


def _check_eos_table(store: "Store", eos_id: Any, table: ChunkTable | None, pad: int) -> int | None:
    if eos_id is None:
        return None
    if table is None:
        raise InvalidInputError("eos_id needs table= (retrostore.retro.chunk_table(store), or the windows' "
                                "seqs.table): whether a neighbour ends its document is read from it")
    return check_eos_id(store, eos_id, pad)


def neighbor_tokens(store: "Store", chunk_ids: Any, *, pad_id: int | None = None,
                    table: ChunkTable | None = None, eos_id: int | None = None) -> NeighborTokens:
    """Tokens, mask and documents of neighbour chunk ids, with continuations.

    ``Store.neighbor_tokens`` with the model's pad id, or read from an
    in-memory :func:`chunk_table` (about 13x faster per call, for many calls
    over one version). Nothing is embedded or searched.

    Parameters
    ----------
    store : Store
    chunk_ids : array-like of int, shape (..., k)
        Neighbour chunk ids of any leading shape: ``(N, k)`` from
        ``precompute_neighbors``, ``(n, C, k)`` from :func:`sequence_neighbors`
        or ``(B, C, k)``; -1 where there is no neighbour.
    pad_id : int, optional
        Token id put where there is no token. Default: the store's pad id
        (``store.manifest["tokenizer"]["pad_id"]``); give the model's
        ``pad_id`` if it differs (retro-pytorch masks ``tokens != pad_id``).
    table : ChunkTable, optional
        A :func:`chunk_table` of this store version: read from memory
        instead of the store.
    eos_id : int, optional
        Document mode's end mark (``Sequences.eos_id`` of windows cut with
        ``mode="document"``): a neighbour or continuation that ends its
        document with fewer than T tokens holds it right after them, as the
        windows, ``TrainingSet`` and the export's rows do. Needs ``table``.
        Default: none (packed mode).

    Returns
    -------
    NeighborTokens
        ``tokens`` / ``mask`` shaped ``chunk_ids.shape + (2 * T,)`` (int64,
        bool); ``chunk_ids`` / ``doc_ids`` shaped like ``chunk_ids`` (int64),
        -1 where there is no neighbour, also for a chunk whose document was
        deleted since the ids were computed (it is not served, as in
        ``Store.neighbor_tokens``).

    Raises
    ------
    InvalidInputError
        ``chunk_ids`` are not integers, have no dimension or hold an id
        outside ``[-1, len(store))``; ``pad_id`` or ``eos_id`` is outside the
        vocabulary; ``table`` is of another store version; ``eos_id`` without
        ``table``.
    """
    pad = check_pad_id(store, pad_id)
    eos = _check_eos_table(store, eos_id, table, pad)
    if table is None:  # Store.neighbor_tokens checks the ids (once: each check costs at generation time)
        nb = store.neighbor_tokens(chunk_ids)
        tokens = nb.tokens if pad == settings(store).pad_id else np.where(nb.mask, nb.tokens, pad)
        return NeighborTokens(tokens, nb.mask, nb.chunk_ids, nb.doc_ids)
    check_table(store, table)
    ids = neighbor_id_array(chunk_ids, len(store), table.chunk_tokens)  # the store's own check
    # Take-downs win over a table's snapshot: the documents ``compact`` purged since this handle's
    # version (which the store adopts, ``Store.neighbor_tokens`` does not serve them) are masked too.
    return _from_table(table, ids, pad, store.deleted_chunks(ids), eos)


class NeighborFile:
    """A precomputed neighbours ``.npy`` file read as tokens by row range.

    The file is memory-mapped (``np.load(path, mmap_mode="r")``): a data
    loader reading rows ``[start, stop)`` touches only those rows and the
    chunks they name. Works for ``Store.precompute_neighbors`` output
    (``(N, k)``, one row per stored chunk) and :func:`sequence_neighbors`
    output (``(n, C, k)``, one row per training sequence).

    Parameters
    ----------
    store : Store
        The store (and version) the neighbours were computed on.
    path : path-like
        The ``.npy`` file of int chunk ids, last axis k, -1 padded.
    pad_id : int, optional
        As in :func:`neighbor_tokens`.
    table : ChunkTable, optional
        As in :func:`neighbor_tokens`.
    eos_id : int, optional
        As in :func:`neighbor_tokens`: give the windows' ``eos_id`` (and their
        ``table``) for neighbours of document-mode windows.

    Attributes
    ----------
    ids : ndarray (memory-mapped), shape (rows, ..., k)
    shape : tuple of int

    Raises
    ------
    InvalidInputError
        The file is missing, not a ``.npy`` array of integers, or names a
        chunk id outside ``[-1, len(store))``.

    Notes
    -----
    In a data loader's forked worker processes (PyTorch's ``DataLoader`` with
    ``num_workers > 0`` on Linux), give ``table=``: the table is in memory and
    the mapped file is re-read, so the object works in the workers as it is.
    Without it, rows are read through ``store``, and a store handle opened
    before ``fork()`` raises :class:`~retrostore.ForkedStoreError` in the child
    (open the store in each worker instead).
    """

    def __init__(self, store: "Store", path: str | os.PathLike, *, pad_id: int | None = None,
                 table: ChunkTable | None = None, eos_id: int | None = None):
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(f"path={path!r} must be the path of a .npy file of neighbour ids")
        self.store = store
        self.path = Path(path)
        self.pad_id = check_pad_id(store, pad_id)
        if table is not None:
            check_table(store, table)
        self.table = table
        self.eos_id = _check_eos_table(store, eos_id, table, self.pad_id)
        try:
            self.ids = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{self.path}: not a readable .npy file of neighbour ids ({exc}); write it with "
                                    "Store.precompute_neighbors or retrostore.retro.sequence_neighbors") from None
        if self.ids.ndim < 2 or not np.issubdtype(self.ids.dtype, np.integer):
            raise InvalidInputError(f"{self.path} holds {self.ids.dtype} shaped {self.ids.shape}; expected integer "
                                    "chunk ids shaped (rows, ..., k)")
        self.shape = tuple(self.ids.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def tokens(self, start: int, stop: int | None = None) -> NeighborTokens:
        """Neighbour tokens of rows ``[start, stop)`` (one row when ``stop`` is None).

        Returns
        -------
        NeighborTokens
            ``tokens`` shaped ``(stop - start,) + shape[1:] + (2 * T,)``.

        Raises
        ------
        InvalidInputError
            ``start`` / ``stop`` are not ints in ``[0, len(file)]`` with
            ``start <= stop``.
        """
        n = len(self)
        if n == 0:
            raise InvalidInputError(f"{self.path} holds no row (shape {self.shape}); there is no row {start!r} to read")
        start = check_int("start", start, 0, n - 1 if stop is None else n)
        stop = start + 1 if stop is None else check_int("stop", stop, start, n, fix=f"rows are [0, {n})")
        return neighbor_tokens(self.store, np.asarray(self.ids[start:stop]), pad_id=self.pad_id, table=self.table,
                               eos_id=self.eos_id)

    def __getitem__(self, row: int) -> NeighborTokens:
        nt = self.tokens(row)
        return NeighborTokens(nt.tokens[0], nt.mask[0], nt.chunk_ids[0], nt.doc_ids[0])

    def write_tokens(self, path: str | os.PathLike, *, rows: int = 1024) -> tuple[Path, Path]:
        """Write every row's neighbour tokens to ``.npy`` files, ``rows`` rows at a time
        (what ``retrostore neighbors --tokens`` writes).

        Parameters
        ----------
        path : path-like
            Destination of the tokens: int32, shape ``self.shape + (2 * chunk_tokens,)``
            (neighbour then continuation, padded with ``pad_id``). Beside it, ``path``'s
            stem + ``.mask.npy``: bool, the same shape (True where a token is real).
            Both are refused inside a store (its next commit would delete them).
        rows : int, default 1024
            Rows read and written per step (memory: ``rows * k * 2T`` tokens).

        Returns
        -------
        (Path, Path)
            The tokens file and the mask file.

        Raises
        ------
        InvalidInputError
            ``path`` or the mask path is the ids file, inside a store, in a missing or
            unwritable directory, or a directory.
        StoreIOError
            Writing failed (a full disk): the message names the file.
        """
        rows = check_int("rows", rows, 1)
        tokens_path, mask = self.check_tokens_path(path, self.path)
        shape = self.shape + (2 * int(self.store.manifest["chunk_tokens"]),)
        try:
            toks = np.lib.format.open_memmap(tokens_path, mode="w+", dtype=np.int32, shape=shape)
            mk = np.lib.format.open_memmap(mask, mode="w+", dtype=bool, shape=shape)
            for start in range(0, len(self), rows):
                nt = self.tokens(start, min(len(self), start + rows))
                toks[start : start + len(nt.tokens)] = nt.tokens
                mk[start : start + len(nt.tokens)] = nt.mask
            toks.flush()
            mk.flush()
        except OSError as exc:
            raise StoreIOError(f"cannot write the neighbour tokens {tokens_path} / {mask}: {exc.strerror or exc}; "
                               "free space or give a path on another disk") from None
        return tokens_path, mask

    @staticmethod
    def mask_path(path: str | os.PathLike) -> Path:
        """The mask file :meth:`write_tokens` writes beside tokens file ``path``: its stem + ``.mask.npy``.

        Raises
        ------
        InvalidInputError
            ``path`` is not a str or os.PathLike path.
        """
        text = os.fspath(check_path("path", path, "a tokens file"))
        return Path((text[:-4] if text.endswith(".npy") else text) + ".mask.npy")

    @staticmethod
    def check_tokens_path(path: str | os.PathLike, ids: str | os.PathLike | None = None, *,
                          name: str = "path") -> tuple[Path, Path]:
        """Check ``path`` as :meth:`write_tokens`' destination before any work: the tokens file and
        its mask (:meth:`mask_path`) are files to write outside every store, two different files
        (symbolic and hard links followed), neither of them the ids file ``ids`` (which need not
        exist yet). ``name`` names ``path`` in the messages (``retrostore neighbors``: ``--tokens``).

        Returns
        -------
        (Path, Path)
            The tokens file and the mask file.

        Raises
        ------
        InvalidInputError
            Any of these does not hold (the message names the path and the fix).
        """
        tokens_path = check_output_file(path, name, suffix="")
        mask = check_output_file(NeighborFile.mask_path(tokens_path), f"{name}'s mask", suffix="")
        if _same_file(tokens_path, mask):
            raise InvalidInputError(f"{name}={str(path)!r} and its mask {str(mask)!r} are the same file (a link); "
                                    "give a path whose mask file is another one")
        if ids is not None:
            check_path("ids", ids, "the neighbour ids file")
            for p in (tokens_path, mask):
                if _same_file(p, Path(ids)):
                    raise InvalidInputError(f"{name}={str(path)!r} would overwrite the neighbour ids {str(ids)!r} "
                                            f"({str(p)!r} is that file); give another path")
        return tokens_path, mask


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path once links are resolved, or, both
    existing, the same inode (a hard link; helper-50: tokens written over the ids being read)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False
