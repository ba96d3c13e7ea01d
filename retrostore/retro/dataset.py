"""A map-style training set: windows of ``L + 1`` tokens with their neighbour tokens.

retrostore's own counterpart of retro-pytorch's ``RETRODataset``, for any pad
id and with no export step: ``TrainingSet(store, seqs, "knn.npy")[i]`` is
``(seq, retrieved)``, as ``RETRODataset`` returns over the export of the same
windows. It holds numpy arrays, so a ``torch.utils.data.DataLoader`` batches
it as it is (``default_collate`` turns the arrays into tensors).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidInputError, check_bool, check_int
from ..storage.fileio import sha256_file
from .sequences import Sequences, window_digest
from .table import check_table, store_identity
from .tokens import NeighborFile

if TYPE_CHECKING:
    from retrostore import Store

__all__ = ["TrainingSet"]


class TrainingSet:
    """Training windows and their precomputed neighbours, row by row.

    Parameters
    ----------
    store : Store
    seqs : Sequences
        From :func:`training_sequences`; their ``pad_id`` pads the neighbour
        tokens too.
    neighbors : path-like
        The ``.npy`` :func:`sequence_neighbors` wrote for ``seqs``: shape
        ``(len(seqs), C, k)``, with its summary ``KNN.summary.json`` beside it.
    verify : bool, default True
        Check with the summary that the file holds the neighbours of these
        windows of this store version, and is the file the summary was
        written for (its sha256: the file is read once). False: the shape
        only, for a file made otherwise.

    Raises
    ------
    InvalidInputError
        ``seqs`` not cut from ``store``; the neighbour file's shape does
        not fit them; or, with ``verify``, its summary is missing or names
        other windows, another store (version) or other file bytes.
    """

    def __init__(self, store: "Store", seqs: Sequences, neighbors: str | os.PathLike, *, verify: bool = True):
        verify = check_bool("verify", verify)
        if not isinstance(seqs, Sequences):
            raise InvalidInputError(f"seqs is {type(seqs).__name__}; pass the windows of "
                                    "retrostore.retro.training_sequences(store, seq_len)")
        check_table(store, seqs.table, "seqs' table (cut them again with training_sequences(store, ...))")
        self.seqs = seqs
        self.knn = NeighborFile(store, neighbors, pad_id=seqs.pad_id, table=seqs.table,
                                eos_id=seqs.eos_id if seqs.mode == "document" else None)
        n, c = seqs.chunk_ids.shape
        if self.knn.ids.ndim != 3 or self.knn.shape[:2] != (n, c):
            raise InvalidInputError(f"{neighbors} has shape {self.knn.shape}; these {n} windows of {c} chunks need "
                                    f"({n}, {c}, k): compute it with sequence_neighbors(store, seqs, ...)")
        # The same shape is not the same windows (helper-28: a file of another version, after a delete and
        # re-append, was taken: 51 of 1,208 neighbours from the window's own documents).
        if not verify:
            return
        summary = _summary(neighbors)
        if not summary:
            raise InvalidInputError(
                f"{neighbors} has no readable summary beside it ({_summary_path(neighbors)}, written by "
                "sequence_neighbors): nothing tells which windows and store it was computed for; compute it "
                "with sequence_neighbors(store, seqs, ...), or pass verify=False if you made it yourself")
        why = ("was computed for another store or store version (its summary names version "
               f"{summary.get('store_version')}; this is version {store.version})"
               if summary.get("store") != store_identity(store)  # (helper-29: same packed ids, another store)
               else "was computed for other windows" if summary.get("windows_sha") != window_digest(seqs)
               # (helper-31: an unfiltered file written over it, beside the old summary)
               else "has changed since its summary was written (another writer replaced it)"
               if summary.get("ids_sha256") != sha256_file(neighbors)[1] else None)
        if why:
            raise InvalidInputError(
                f"{neighbors} {why}: these windows' documents and copies would not be excluded; compute it again "
                "with sequence_neighbors(store, seqs, ...)")

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(seq, retrieved)``: int64 ``(L + 1,)`` and ``(C, k, 2 * T)``."""
        i = check_int("index", i, 0, len(self) - 1)
        seq, retrieved, _ = self.batch(i, i + 1)
        return seq[0], retrieved[0]

    def batch(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``[start, stop)``: ``seq (b, L + 1)``, ``retrieved (b, C, k, 2T)`` and its mask.

        In document mode a neighbour, or a continuation, that ends its document with fewer
        than T tokens holds ``eos_id`` right after them, as its window row does (and the
        export's row that ``RETRODataset`` reads)."""
        nt = self.knn.tokens(start, stop)  # (document mode: the knn file marks ends with the windows' eos_id)
        return self.seqs.tokens(start, stop), nt.tokens, nt.mask


def _summary_path(neighbors: str | os.PathLike) -> str:
    path = str(neighbors)
    return (path[:-4] if path.endswith(".npy") else path) + ".summary.json"


def _summary(neighbors: str | os.PathLike) -> dict:
    """``KNN.summary.json`` beside a neighbour file (``{}`` when absent or unreadable)."""
    path = _summary_path(neighbors)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
