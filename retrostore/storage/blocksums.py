"""Block checksums of raw vectors files (format 4): integrity paid per block read.

A raw vectors file ``vectors/vec-<tag>.npy`` has a sidecar
``vectors/vec-<tag>.sums.npy``: a ``uint32`` ``.npy`` array holding the CRC-32
of each block of ``rows_per_block`` rows of the file's data (the last block may
be shorter; the ``.npy`` header is not part of any block). The manifest's entry
of the vectors file names the sidecar with its size, sha256 and
``rows_per_block`` (docs/format.md, "Raw vectors").

Readers check the sidecar's sha256 when they first use the file (its size is
about 1/4,000 of the vectors') and a block's CRC-32 the first time a query
reads a row of it, so a damaged row is never served and the first query after
``open`` costs what it reads, not the whole file (issue 19). CRC-32 detects
every error burst of up to 32 bits and other damage with probability
1 - 2^-32; the whole file's sha256 in the manifest, checked by ``verify``,
``pack`` and ``reindex``, is the guarantee against anything else.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np

from ..errors import CorruptStoreError
from .fileio import regular_file, sha256_file, unreadable, write_durable

__all__ = ["BLOCK_BYTES", "rows_per_block", "sums_name", "block_crcs", "CrcStream", "write_sums", "BlockChecker"]

#: Target bytes of one block: a few rows, so that checking a row costs about as much as reading it.
BLOCK_BYTES = 16 << 10


def rows_per_block(row_bytes: int) -> int:
    """Rows per block: the largest power of two whose rows fit in :data:`BLOCK_BYTES` (at least 1)."""
    rows = 1
    while rows * 2 * row_bytes <= BLOCK_BYTES:
        rows *= 2
    return rows


def sums_name(vectors_rel: str) -> str:
    """The sidecar's path of the vectors file ``vectors_rel`` (``....npy`` -> ``....sums.npy``)."""
    return vectors_rel[: -len(".npy")] + ".sums.npy"


def block_crcs(rows: np.ndarray, rpb: int) -> np.ndarray:
    """CRC-32 of each block of ``rpb`` rows of the C-contiguous array ``rows``, uint32."""
    view = memoryview(np.ascontiguousarray(rows)).cast("B")
    step = rpb * rows.shape[1] * rows.dtype.itemsize
    return np.array([zlib.crc32(view[i : i + step]) for i in range(0, len(view), step)], np.uint32)


class CrcStream:
    """CRC-32 of each block of ``block_bytes`` of a byte stream fed in pieces of any size."""

    def __init__(self, block_bytes: int):
        self.block = block_bytes
        self.crc = 0
        self.fill = 0
        self.crcs: list[int] = []

    def feed(self, view: memoryview) -> None:
        """Add the next bytes of the stream."""
        pos = 0
        while pos < len(view):
            take = min(self.block - self.fill, len(view) - pos)
            self.crc = zlib.crc32(view[pos : pos + take], self.crc)
            self.fill += take
            pos += take
            if self.fill == self.block:
                self.crcs.append(self.crc)
                self.crc = self.fill = 0

    def finish(self) -> np.ndarray:
        """The blocks' CRC-32s, the last (shorter) block included."""
        if self.fill:
            self.crcs.append(self.crc)
            self.crc = self.fill = 0
        return np.array(self.crcs, np.uint32)


def write_sums(path: Path, crcs: np.ndarray) -> tuple[int, str]:
    """Write the sidecar ``path`` (a uint32 ``.npy``), fsynced; its size and sha256."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(crcs, np.uint32), allow_pickle=False)
    return write_durable(path, [buf.getvalue()])


class BlockChecker:
    """Checks blocks of one vectors file against its sidecar, each block once.

    Parameters
    ----------
    root : Path
        The store directory.
    entry : dict
        The vectors file's manifest entry (with ``"sums"``).
    rows : ndarray, shape (count, dim)
        The file's rows (memory-mapped).

    Raises
    ------
    CorruptStoreError
        The sidecar is missing, damaged or of the wrong length.
    """

    def __init__(self, root: Path, entry: dict, rows: np.ndarray):
        sums = entry["sums"]
        rel = sums["path"]
        if regular_file(root / rel, rel) is None:
            raise CorruptStoreError(f"{rel}: block checksums of {entry['path']} are missing")
        try:
            size, sha = sha256_file(root / rel)
        except OSError as exc:  # (helper-34: a bare PermissionError)
            raise unreadable(rel, exc) from exc
        if (size, sha) != (sums["size"], sums["sha256"]):
            raise CorruptStoreError(f"{rel}: block checksum file differs from the manifest (size or sha256); "
                                    "it is damaged")
        try:
            self.crcs = np.load(root / rel, allow_pickle=False)
        except Exception as exc:  # numpy parses the header with ast: any error means damage
            raise CorruptStoreError(f"{rel}: not a readable .npy of block checksums ({exc})") from exc
        self.rpb = int(sums["rows_per_block"])
        n_blocks = -(-len(rows) // self.rpb) if self.rpb > 0 else -1
        if self.crcs.dtype != np.uint32 or self.crcs.shape != (n_blocks,):
            raise CorruptStoreError(f"{rel}: holds {self.crcs.shape} {self.crcs.dtype}, expected ({n_blocks},) "
                                    f"uint32 for {len(rows)} rows of {self.rpb}")
        self.rows = rows
        self.path = entry["path"]
        self.checked = np.zeros(n_blocks, bool)
        self._view: memoryview | None = None

    def unchecked(self, local_rows: np.ndarray) -> np.ndarray:
        """The not yet checked blocks holding ``local_rows`` (row numbers in the file), sorted."""
        blocks = np.unique(np.asarray(local_rows, np.int64) // self.rpb)
        return blocks[~self.checked[blocks]]

    def check(self, todo: np.ndarray) -> None:
        """Check blocks ``todo`` (from :meth:`unchecked`) and mark them checked.

        Raises
        ------
        CorruptStoreError
            A block's bytes differ from their checksum (naming the file and rows).
        """
        if not len(todo):
            return
        # One zlib call per block over a byte view of the mapping (no per-block numpy work:
        # a re-ranking query touches ~1,500 unchecked blocks of a large cold store).
        view, step = self._bytes()
        got = np.fromiter((zlib.crc32(view[b * step : (b + 1) * step]) for b in todo.tolist()), np.uint32, len(todo))
        bad = np.nonzero(got != self.crcs[todo])[0]
        if len(bad):
            lo = int(todo[bad[0]]) * self.rpb
            hi = min(lo + self.rpb, len(self.rows))
            raise CorruptStoreError(
                f"{self.path}: rows {lo}..{hi - 1} differ from their checksum (block {int(todo[bad[0]])}); the raw "
                "vectors file is damaged: run `retrostore verify`, and reindex from a good copy")
        self.checked[todo] = True

    def _bytes(self) -> tuple[memoryview, int]:
        """The rows as one byte view (a view of the mapping, not a copy) and the bytes per block."""
        if self._view is None:
            self._view = memoryview(np.ascontiguousarray(self.rows)).cast("B")
        return self._view, self.rpb * self.rows.shape[1] * self.rows.dtype.itemsize

    def check_all(self) -> list[int]:
        """Blocks whose bytes differ from their checksum (``verify``), reading the whole file."""
        bad = []
        for lo in range(0, len(self.rows), 65536):
            crcs = block_crcs(self.rows[lo : lo + 65536], self.rpb)
            first = lo // self.rpb
            bad += [first + int(i) for i in np.nonzero(crcs != self.crcs[first : first + len(crcs)])[0]]
        return bad
