"""Reading documents from input files for ``retrostore build STORE INPUT...``.

Inputs: ``.txt`` (one document per file), ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``
(streamed; one object per line, The Pile layout ``{"text": ..., "meta": {...}}``),
and directories of these.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

from ..errors import (
    InputNotFoundError,
    InputReadError,
    InvalidDocumentError,
    InvalidInputError,
    InvalidMetadataError,
    JSON_TYPE_NAMES,
)

__all__ = ["SUPPORTED_SUFFIXES", "COMPRESSED", "InputDocument", "count_input_bytes", "expand_inputs", "expand_named",
           "input_digests", "input_kind", "iter_documents", "read_file", "check_fields"]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst")
_CHUNK = 1 << 14  # compressed bytes fed per step: bounds memory on highly compressible input
_SUPPORTED = ", ".join(SUPPORTED_SUFFIXES)
PathArg = str | os.PathLike[str]


@dataclass(frozen=True)
class InputDocument:
    """One document read from an input file.

    Attributes
    ----------
    text : str
        The text exactly as stored (not stripped, no newline translation).
    metadata : dict or None
        JSON lines: the line's ``meta`` object (``None`` if absent or null). ``.txt``:
        ``{"source": path relative to the directory given, or the file's name}``.
    source : str
        ``"path:line"`` (1-based) for JSON lines, the path for ``.txt``; for messages.
    """

    text: str
    metadata: dict | None
    source: str


_log = logging.getLogger("retrostore")


def input_kind(name: str | os.PathLike[str]) -> str | None:
    """The supported suffix of an input file's name (``".jsonl.zst"``, ...), or None."""
    name = os.fspath(name).lower()
    return next((s for s in reversed(SUPPORTED_SUFFIXES) if name.endswith(s)), None)


#: Kinds read through a decompressor.
COMPRESSED = (".jsonl.gz", ".jsonl.zst")


def expand_named(inputs: Sequence[PathArg] | PathArg, *, warn: bool = True) -> list[tuple[Path, str]]:
    """``(path, name)`` of every input file, in reading order (see :func:`expand_inputs`).

    ``name`` is the file's path relative to the directory given, or its file
    name when the file itself was given (what ``build`` records as a ``.txt``
    document's source). With ``warn``, a warning names the files of a
    directory that were skipped.

    Raises
    ------
    InputNotFoundError, InvalidInputError
        As :func:`expand_inputs`.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise InvalidInputError(f"no input given; pass files or directories ({_SUPPORTED})")
    out: list[tuple[Path, str]] = []
    for item in items:
        root = Path(item)
        if root.is_dir():
            found: list[tuple[tuple[str, ...], Path]] = []
            skipped: list[str] = []
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for path in (Path(dirpath, f) for f in filenames if not f.startswith(".")):
                    kind, regular = input_kind(path), path.is_file()
                    if kind and not regular:  # an input's name, no readable file: never skipped in silence
                        raise _not_a_file(path, root)
                    if kind:
                        found.append((path.relative_to(root).parts, path))
                    elif regular:
                        skipped.append(path.name)
            if not found:
                seen = f"; it holds other files, e.g. {min(skipped)!r}" if skipped else ""
                raise InvalidInputError(
                    f"{root}: directory has no supported input files ({_SUPPORTED}){seen}; "
                    "rename or convert the files, or pass the files themselves")
            if skipped and warn:  # documented, but a user should learn that these files were not read
                _log.warning("%s: skipped %d file(s) without a supported suffix (%s), e.g. %s; rename or "
                             "convert them, or pass them directly to get an error", root, len(skipped), _SUPPORTED,
                             ", ".join(repr(n) for n in sorted(skipped)[:3]))
            out.extend((path, "/".join(parts)) for parts, path in sorted(found))
        elif str(root) == "-":  # helper-38: "-: no such file or directory"
            raise InvalidInputError("-: reading documents from standard input is not supported (a build reads "
                                    "each input twice: its digest, then its documents); write them to a file")
        elif not root.exists():
            raise InputNotFoundError(f"{root}: no such file or directory; check the input path")
        elif not root.is_file():  # helper-38: a FIFO blocked, then failed with "Illegal seek"
            raise InvalidInputError(f"{root}: not a regular file (a pipe or a device); a build reads each input "
                                    "twice (its digest, then its documents): write it to a file first")
        elif input_kind(root) is None:
            raise InvalidInputError(
                f"{root}: unsupported input file type; supported are {_SUPPORTED} "
                "(and directories of these); convert the file or rename it")
        else:
            out.append((root, root.name))
    return out


def _not_a_file(path: Path, root: Path) -> InputNotFoundError | InvalidInputError:
    """The error for an input name in a directory that is no regular file (a broken link, a FIFO)."""
    if path.is_symlink() and not path.exists():
        return InputNotFoundError(
            f"{path}: a broken symbolic link (to {os.readlink(path)!r}) in the input directory {root}; "
            "its documents cannot be read: fix the link or remove it")
    return InvalidInputError(f"{path}: not a regular file, in the input directory {root}; "
                             "move it out of the directory or pass the files themselves")


def expand_inputs(inputs: Sequence[PathArg]) -> list[Path]:
    """List the input files, in the order they will be read.

    Parameters
    ----------
    inputs : sequence of str or os.PathLike
        Files and directories, in the order given (a single path is accepted).
        Directories are walked recursively, sorted by relative path, keeping
        files with a ``SUPPORTED_SUFFIXES`` suffix (case-insensitive), skipping
        hidden files and directories and not following symlinked directories.
        Other files are skipped with a warning on the ``retrostore`` logger
        naming up to three of them.

    Returns
    -------
    list of pathlib.Path
        The files (a file given twice is listed twice).

    Raises
    ------
    InputNotFoundError
        A path does not exist, or a directory holds a broken symbolic link with
        an input's suffix (its documents would be lost in silence).
    InvalidInputError
        No inputs, an unsupported suffix, a directory without supported files,
        or an input's name in a directory that is no regular file (a FIFO).
    """
    return [path for path, _ in expand_named(inputs)]


def count_input_bytes(inputs: Sequence[PathArg]) -> int:
    """Total size on disk (compressed bytes) of all inputs, for a progress bar.

    Equals the sum of the values ``iter_documents`` passes to ``on_progress``.

    Raises
    ------
    InputNotFoundError, InvalidInputError
        As :func:`expand_inputs`.
    """
    return sum(path.stat().st_size for path, _ in expand_named(inputs, warn=False))


def _raw_chunks(path: Path, fh: IO[bytes]) -> Iterator[bytes]:
    """Yield the decompressed bytes of ``fh`` according to the suffix of ``path``."""
    kind = input_kind(path)
    if kind == ".jsonl.zst":
        data = fh.read(_CHUNK)
        while data:  # a decompressobj per frame, so that a truncated last frame is detected
            dobj = zstandard.ZstdDecompressor().decompressobj()
            while not dobj.eof:
                if not data:
                    raise EOFError("the zstd stream ends inside a frame")
                if out := dobj.decompress(data):
                    yield out
                data = dobj.unused_data if dobj.eof else fh.read(_CHUNK)
            data = data or fh.read(_CHUNK)
    else:
        src = gzip.GzipFile(fileobj=fh, mode="rb") if kind == ".jsonl.gz" else fh
        while data := src.read(_CHUNK):
            yield data


class _Hashed:
    """A binary file read through: its bytes and size are hashed as they are read."""

    def __init__(self, fh: IO[bytes]):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data


def input_digests(path: Path) -> tuple[int, str, str | None]:
    """Size, sha256 of the bytes, and sha256 of the bytes a build reads (decompressed for a ``.gz``
    or ``.zst`` file, so the same documents compressed another way are recognised:
    ``retrostore.build.records``), in one read of the file. The last is None when the file cannot
    be decompressed: the build's own read of it names the damage."""
    with open(path, "rb") as fh:
        raw = _Hashed(fh)
        if input_kind(path) not in COMPRESSED:
            while raw.read(1 << 20):
                pass
            return raw.size, raw.sha.hexdigest(), raw.sha.hexdigest()
        content = hashlib.sha256()
        try:
            for data in _raw_chunks(path, raw):
                content.update(data)
        except (zstandard.ZstdError, EOFError, zlib.error, OSError):  # incl. BadGzipFile
            content = None
        while raw.read(1 << 20):  # bytes the decompressor left (after damage): the file's sha256 covers them
            pass
        return raw.size, raw.sha.hexdigest(), None if content is None else content.hexdigest()


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Split a byte stream on ``b"\\n"`` only (the last line may lack it)."""
    pieces: list[bytes] = []
    for chunk in chunks:
        if b"\n" not in chunk:
            pieces.append(chunk)
            continue
        parts = chunk.split(b"\n")
        parts[0] = b"".join(pieces + [parts[0]])
        pieces = [parts.pop()]
        yield from parts
    if tail := b"".join(pieces):
        yield tail


_SURROGATE = re.compile("[\ud800-\udfff]")


def _decode(data: bytes, where: str, line_offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line_offset + data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise InvalidDocumentError(
            f"{where}:{line}: invalid UTF-8 ({e.reason} at byte {column} of the line); inputs "
            "must be UTF-8: re-encode the file, e.g. with `iconv -f LATIN1 -t UTF-8`") from e


def _parse_line(line: bytes, where: str, lineno: int, text_field: str,
                meta_field: str) -> InputDocument | None:
    if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]  # a UTF-8 byte-order mark before the first object
    s = _decode(line, where, lineno - 1)
    if not s.strip(" \t\r\n"):
        return None
    source, layout = f"{where}:{lineno}", 'one JSON object such as {"text": "...", "meta": {...}}'
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        msg = f"invalid JSON ({e.msg} at column {e.colno})"
        raise InvalidDocumentError(f"{source}: {msg}; each line must be {layout}") from e
    except ValueError:  # Python reads no number of more than 4,300 digits
        raise InvalidDocumentError(f"{source}: a number of more than 4,300 digits, which Python cannot read; "
                                   f"store it as a string; each line must be {layout}") from None
    except RecursionError:
        raise InvalidDocumentError(
            f"{source}: the JSON is nested too deeply to read; each line must be {layout}") from None
    if not isinstance(obj, dict):
        raise InvalidDocumentError(
            f"{source}: the line is a JSON {JSON_TYPE_NAMES[type(obj)]}; each line must be {layout}")
    if text_field not in obj:
        keys = ", ".join(repr(k) for k in list(obj)[:10]) or "none"
        raise InvalidDocumentError(
            f"{source}: the object has no {text_field!r} field (its keys: {keys}); "
            "pass --text-field NAME to read the text from another field")
    if not isinstance(text := obj[text_field], str):
        raise InvalidDocumentError(
            f"{source}: field {text_field!r} is a JSON {JSON_TYPE_NAMES[type(text)]}, not a string; fix "
            "the line, or pass --text-field NAME to read the text from another field")
    if not text.isascii() and (bad := _SURROGATE.search(text)):
        raise InvalidDocumentError(
            f"{source}: field {text_field!r} holds the lone surrogate escape \\u{ord(bad.group()):04x} "
            f"at character {bad.start()}, which is not text; fix the escape in the file")
    if (meta := obj.get(meta_field)) is not None and not isinstance(meta, dict):
        raise InvalidMetadataError(
            f"{source}: field {meta_field!r} is a JSON {JSON_TYPE_NAMES[type(meta)]}; it must be an "
            'object or null: wrap the value in an object, e.g. {"value": ...}')
    return InputDocument(text, meta, source)


def _docs(path: Path, rel: str, text_field: str,
          meta_field: str) -> Iterator[tuple[InputDocument, int]]:
    """Yield each document of one file with the file position after it."""
    where = str(path)
    with open(path, "rb") as fh:
        if input_kind(path) == ".txt":
            yield InputDocument(_decode(fh.read(), where), {"source": rel}, where), fh.tell()
            return
        for lineno, line in enumerate(_lines(_raw_chunks(path, fh)), 1):
            if (doc := _parse_line(line, where, lineno, text_field, meta_field)) is not None:
                yield doc, fh.tell()


def read_file(path: Path, rel: str, text_field: str, meta_field: str,
              on_progress: Callable[[int], None] | None) -> Iterator[InputDocument]:
    """The documents of one input file (``name`` from :func:`expand_named`), as
    :func:`iter_documents` reads them; ``on_progress`` as there.

    Raises
    ------
    InvalidDocumentError, InvalidMetadataError, InputReadError
        As :func:`iter_documents`, while iterating.
    """
    done, doc = 0, None
    with contextlib.closing(_docs(path, rel, text_field, meta_field)) as docs:
        while True:
            try:
                doc, pos = next(docs)
            except StopIteration:
                break
            except (zstandard.ZstdError, EOFError, zlib.error, OSError) as e:  # incl. BadGzipFile
                after = f" after line {doc.source.rsplit(':', 1)[1]}" if doc else ""
                raise InputReadError(
                    f"{path}: cannot read the file{after} ({e}); it is truncated, corrupt or "
                    "unreadable: re-create or re-download it") from e
            if on_progress is not None and pos > done:
                on_progress(pos - done)
                done = pos
            yield doc
    if on_progress is not None and (size := path.stat().st_size) > done:
        on_progress(size - done)


def check_fields(text_field: Any, meta_field: Any) -> None:
    """Check the JSON field names a build reads (``--text-field``, ``--meta-field``) before any input.

    Raises
    ------
    InvalidInputError
        An empty or non-string ``text_field``, or ``meta_field`` not a string or equal to it.
    """
    if not isinstance(text_field, str) or not text_field:
        raise InvalidInputError(f"text_field must be a non-empty string, got {text_field!r}")
    if not isinstance(meta_field, str) or meta_field == text_field:
        raise InvalidInputError(f"meta_field must be a string other than text_field "
                                f"({text_field!r}), got {meta_field!r}")


def iter_documents(inputs: Sequence[PathArg], *, text_field: str = "text", meta_field: str = "meta",
                   on_progress: Callable[[int], None] | None = None) -> Iterator[InputDocument]:
    """Read the documents of all inputs, in a deterministic order.

    Parameters
    ----------
    inputs : sequence of str or os.PathLike
        Files and directories, expanded as by :func:`expand_inputs`. They are
        checked when this function is called, before the first document.
    text_field : str, default "text"
        The field of each JSON-lines object that holds the document text.
    meta_field : str, default "meta"
        The field that holds the metadata object (optional; null allowed).
    on_progress : callable, optional
        Called with the number of input (compressed) bytes consumed since the
        previous call; the calls add up to :func:`count_input_bytes`.

    Returns
    -------
    Iterator of InputDocument
        Files in order; the lines of a JSON-lines file in order, blank lines
        skipped; a ``.txt`` file as one document, however empty.

    Raises
    ------
    InputNotFoundError, InvalidInputError
        As :func:`expand_inputs`, on the call; ``InvalidInputError`` also for
        an empty ``text_field`` or ``text_field == meta_field``.
    InvalidDocumentError
        While iterating: invalid UTF-8, invalid JSON, a line that is not an
        object, lacks ``text_field``, or whose ``text_field`` is not a string.
    InvalidMetadataError
        While iterating: ``meta_field`` is neither an object nor null.
    InputReadError
        While iterating: an I/O error, or a truncated or corrupt ``.gz``/``.zst`` stream.
    """
    check_fields(text_field, meta_field)
    files = expand_named(inputs)
    return (doc for path, rel in files
            for doc in read_file(path, rel, text_field, meta_field, on_progress))
