"""Errors raised by retrostore.

Every public failure raises a subclass of :class:`RetrostoreError`. Where a
built-in exception has the same meaning, the subclass also inherits it, so
``except FileNotFoundError`` or ``except ValueError`` keep working (the
pattern of ``zarr.errors``). Messages name the offending value, the limit and
the fix.
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = [
    "RetrostoreError",
    "NotAStoreError",
    "StoreExistsError",
    "OutputExistsError",
    "InvalidInputError",
    "InvalidDocumentError",
    "InvalidEmbeddingsError",
    "InvalidMetadataError",
    "EmbedderMismatchError",
    "ModelChecksumError",
    "CorruptStoreError",
    "FormatVersionError",
    "WriterLockedError",
    "ReadOnlyStoreError",
    "StoreClosedError",
    "ReadersFullError",
    "ForkedStoreError",
    "StoreReplacedError",
    "IndexTrainingError",
    "CommitError",
    "StoreIOError",
    "InputNotFoundError",
    "InputReadError",
    "ModelNotInstalledError",
    "UnsafeArchiveError",
    "NoRawVectorsError",
]


class RetrostoreError(Exception):
    """Base class of every error retrostore raises on purpose."""


class NotAStoreError(RetrostoreError, FileNotFoundError):
    """The path does not hold a retrostore store (no valid manifest)."""


class StoreExistsError(RetrostoreError, FileExistsError):
    """``create`` was asked to create a store where something already exists."""


class OutputExistsError(StoreExistsError):
    """An output that is not a store (an export directory, an archive) already exists and was not
    to be replaced (helper-59: an export folder was reported as a "StoreExistsError")."""


class InvalidInputError(RetrostoreError, ValueError):
    """An argument has the wrong type, shape, range or content."""


class InvalidDocumentError(InvalidInputError):
    """A document is not a ``str`` (or cannot be stored as one)."""


class InvalidEmbeddingsError(InvalidInputError):
    """Precomputed embeddings have the wrong shape, dimension or values."""


class InvalidMetadataError(InvalidInputError):
    """Document metadata cannot be stored and read back unchanged."""


class EmbedderMismatchError(RetrostoreError):
    """The embedder given does not match the one the store was built with."""


class ModelChecksumError(RetrostoreError):
    """A model file's sha256 differs from the pinned value."""


class CorruptStoreError(RetrostoreError):
    """A file of the store is damaged: wrong size, checksum or structure."""


class FormatVersionError(RetrostoreError):
    """The store was written by a newer, incompatible format version."""


class WriterLockedError(RetrostoreError, BlockingIOError):
    """Another writer holds the store's lock."""


class ReadOnlyStoreError(RetrostoreError, PermissionError):
    """A write was attempted on a store opened read-only."""


class StoreClosedError(RetrostoreError):
    """The store was used after ``close()``."""


class ReadersFullError(RetrostoreError):
    """LMDB's reader table is full: more read transactions are open at once, in all the processes
    using the store, than it has slots (254 for a store's ``lock.mdb``); the call can be retried once
    others finish."""


class ForkedStoreError(RetrostoreError):
    """A store handle opened in a parent process was used after ``fork()``."""


class StoreReplacedError(RetrostoreError):
    """The store directory was replaced since this handle opened it (another store unpacked or
    synced over it, a rebuild): its chunk table is another file. The handle keeps the version it
    serves, from the files it holds open; open the store again to read the new one."""


class IndexTrainingError(RetrostoreError):
    """An index cannot be trained with the data available."""


class StoreIOError(RetrostoreError, OSError):
    """Writing failed (disk full, I/O error): staging documents, a commit, an archive. ``errno``
    says why (``errno.ENOSPC`` for a full disk); what was committed is intact."""


class CommitError(StoreIOError):
    """A commit failed (disk full, I/O error); the previous version is intact."""


class InputNotFoundError(InvalidInputError, FileNotFoundError):
    """An input path given to ``build`` does not exist."""


class InputReadError(InvalidInputError):
    """An input file cannot be read: an I/O error or a truncated/corrupt stream."""


class ModelNotInstalledError(RetrostoreError, ImportError):
    """The package that provides a model is not installed."""


class UnsafeArchiveError(RetrostoreError):
    """An archive given to ``unpack`` was refused: path traversal, an absolute
    path, a link or device file, a name outside the store layout, a size
    limit, a member bigger than declared, or a manifest naming a file outside
    the store."""


class NoRawVectorsError(RetrostoreError):
    """An operation (``reindex``) needs raw vectors the store does not keep
    (dropped by ``pack --no-vectors``, or created with ``keep_vectors=False``)."""


def shown(value: object, spec: str = "") -> str:
    """``repr(value)`` for an error message, safe for any integer a user may pass.

    Python refuses to turn an int of more than 4,300 digits into text (a
    ``ValueError``, not the ``InvalidInputError`` the message was for), and a
    shorter huge one would fill the message: an int beyond 30 digits is named by
    its size instead. ``spec``: a format spec for other values (``","``), else ``repr``.
    """
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        digits = int(abs(value).bit_length() * 0.30103) + 1  # log10(2): no conversion to text
        return f"{'-' if value < 0 else ''}<an integer of about {digits:,} digits>"
    try:
        return format(value, spec) if spec else repr(value)
    except ValueError:  # a list or array holding such an int
        return f"<a {type(value).__name__} holding an integer of more than 4,300 digits>"


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer argument: a Python or numpy int, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_bool(name: str, value: Any, *, optional: bool = False) -> bool | None:
    """``value`` when it is a bool (or None, when ``optional``): a flag given as a string or a
    number ("no" is truthy) is refused, not taken as True (helper-37).

    Raises
    ------
    InvalidInputError
        Not a bool (``numpy.bool_`` counts as one).
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")):
        return bool(value)
    allowed = "True, False or None" if optional else "True or False"
    raise InvalidInputError(f"{name}={shown(value)} must be {allowed}")


def check_int(name: str, value: Any, lo: int, hi: int | None = None, fix: str = "") -> int:
    """``value`` as an int in ``[lo, hi]`` (``hi`` None: no upper limit), the one check of an
    integer argument (``name=value must be an int in [lo, hi]; fix``).

    Raises
    ------
    InvalidInputError
        Not an int (a bool, a float, a string) or outside the range; the message names a
        huge int by its size (:func:`shown`).
    """
    if not is_int(value) or value < lo or (hi is not None and value > hi):
        limit = f">= {_bound(lo)}" if hi is None else f"in [{_bound(lo)}, {_bound(hi)}]"
        raise InvalidInputError(f"{name}={shown(value)} must be an int {limit}" + (f"; {fix}" if fix else ""))
    return int(value)


def _bound(n: int) -> str:
    """A limit as a reader knows it: ``2**31``, ``2**63 - 1`` for the int32/int64 edges, else digits."""
    for e in (31, 32, 63, 64):
        if n in (2**e, 2**e - 1):
            return f"2**{e}" + (" - 1" if n == 2**e - 1 else "")
    return str(n)


#: Names of the types ``json.loads`` returns, for messages about JSON read from a file.
JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
                   float: "number", type(None): "null"}
