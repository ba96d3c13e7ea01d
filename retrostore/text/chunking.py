"""Tokenizer loading and document -> chunk splitting.

A document is tokenized once, with no special tokens and with truncation and
padding off, and cut into consecutive, non-overlapping chunks of
``chunk_tokens`` tokens (64 in RETRO, Borgeaud et al. 2021, section 2.3). The
last chunk of a document may be shorter; chunks never cross documents.

Each chunk carries a character span ``[start, end)`` of the original ``str``.
The spans tile the document: chunk 0 starts at 0, every later chunk at the
offset of its first token, each ends where the next starts and the last at
``len(text)``, so ``"".join(text[c.start:c.end] for c in chunks) == text``.

Documents longer than ``window_chars`` characters are tokenized in bounded
windows, with exactly the ids and offsets of a one-shot encode (except
inside a stretch of over a million characters with no place to cut), in
near-linear time and bounded memory (see :meth:`Chunker.encode`).
"""

from __future__ import annotations

import hashlib
import itertools
import operator
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from ..errors import InvalidInputError, is_int, shown
from .tokenizer import check_document as _check_document
from .tokenizer import isolated_cut as _isolated_cut
from .tokenizer import pad_id as _pad_id
from .tokenizer import positive_int as _positive_int
from .tokenizer import windowing_is_exact as _windowing_is_exact

__all__ = ["Chunk", "Chunker", "DEFAULT_CHUNK_TOKENS"]

DEFAULT_CHUNK_TOKENS = 64  # RETRO's chunk length (Borgeaud et al. 2021, section 2.3)

# Long documents are cut only before a space after a non-whitespace character
# (str.isspace, the widest definition). Not at other whitespace: BertNormalizer
# deletes \x0b, \x0c, \x1c-\x1f as control characters, and GPT-4 / Llama-3
# regexes glue newlines onto punctuation. Searched in the reversed window.
_REVERSED_CUT = re.compile(r" \S")
# Characters per encode_batch call: bounds the memory of Encoding objects.
_BATCH_CHARS = 4_000_000
#: A stretch with no cut point longer than this many characters (or 10 windows, if more) is cut
#: where the limit falls: tokenizing 20 MB of one "word" in one piece took 1.3 GB, of Thai
#: without spaces 4.5 GB (helper-38; the tokenizers library keeps ~65-225 bytes per character).
MAX_STRETCH_CHARS = 1_000_000
_CHUNK_FIELDS = operator.attrgetter("position", "start", "end", "token_ids")
_NDIM = operator.attrgetter("ndim")
_DTYPE_KIND = operator.attrgetter("dtype.kind")


@dataclass(frozen=True, eq=False)
class Chunk:
    """One chunk of one document.

    Attributes
    ----------
    position : int
        Index of the chunk within its document, from 0.
    token_ids : numpy.ndarray
        Token ids, shape ``(n,)``, dtype int64, ``1 <= n <= chunk_tokens``; a
        read-only view of the document's ids.
    start : int
        Character offset (a ``str`` index) where the chunk's span starts.
    end : int
        Character offset where the span ends (exclusive). A span is empty in
        the rare case of a chunk whose tokens all come from one character
        that the tokenizer split into several tokens (byte-level emoji).
    """

    position: int
    token_ids: np.ndarray
    start: int
    end: int

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Chunk):
            return NotImplemented
        same = (self.position, self.start, self.end) == (other.position, other.start, other.end)
        return same and np.array_equal(self.token_ids, other.token_ids)


class Chunker:
    """Split documents into fixed-size token chunks with a HF tokenizer.

    Parameters
    ----------
    tokenizer_path : str or os.PathLike
        Path of a Hugging Face ``tokenizer.json`` file.
    chunk_tokens : int, default 64
        Tokens per chunk; at least 1.
    window_chars : int, default 100_000
        Documents longer than this are tokenized in windows of about this
        many characters (see :meth:`encode`); at least 1.
    pad_id : int, optional
        The padding id to use instead of the tokenizer's (a store's
        ``create(pad_id=...)``); in ``[0, vocab_size)``.

    Attributes
    ----------
    tokenizer : tokenizers.Tokenizer
        The loaded tokenizer, truncation and padding turned off.
    chunk_tokens, window_chars : int
        As given.
    max_stretch : int
        The longest window (characters) when no cut point is found:
        ``max(1_000_000, 10 * window_chars)`` (see :meth:`encode`).
    path : pathlib.Path
        The tokenizer file.
    sha256 : str
        Hex sha256 of the tokenizer file's bytes.
    vocab_size : int
        Vocabulary size, added tokens included.
    pad_id : int
        Id of the padding token, by the first rule that applies: the
        ``pad_id`` given; the ``pad_id`` of the padding settings stored in
        the file; the id of the first of ``"[PAD]"``, ``"<pad>"``,
        ``"<|endoftext|>"`` in the vocabulary; 0, a real token, when the
        tokenizer has no padding token (``has_pad_token`` is then False).
    has_pad_token : bool
        Whether the tokenizer itself names a padding token (the rule above
        stopped before 0).

    Raises
    ------
    InvalidInputError
        If ``chunk_tokens`` or ``window_chars`` is not an integer >= 1, the
        file is missing, unreadable or not a valid ``tokenizer.json``, or
        ``pad_id`` is not an id of its vocabulary.
    """

    def __init__(
        self,
        tokenizer_path: str | os.PathLike[str],
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        window_chars: int = 100_000,
        pad_id: int | None = None,
    ) -> None:
        self.chunk_tokens = _positive_int("chunk_tokens", chunk_tokens)
        self.window_chars = _positive_int("window_chars", window_chars)
        self.max_stretch = max(MAX_STRETCH_CHARS, 10 * self.window_chars)
        if not isinstance(tokenizer_path, (str, os.PathLike)):
            kind = type(tokenizer_path).__name__
            raise InvalidInputError(f"tokenizer_path must be a str or os.PathLike, got {kind}")
        self.path = Path(tokenizer_path)
        hint = "pass the path of a Hugging Face tokenizer.json file"
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            why = exc.strerror or exc
            raise InvalidInputError(f"cannot read {str(self.path)!r} ({why}); {hint}") from exc
        try:
            tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception
            why = f"{str(self.path)!r} is not a valid tokenizer.json ({exc})"
            raise InvalidInputError(f"{why}; {hint}") from exc
        padding = tokenizer.padding
        tokenizer.no_truncation()
        tokenizer.no_padding()
        # A document's text is text: a literal "[PAD]" or "[SEP]" in it is tokenized as the characters it
        # is ("[", "pad", "]"), not as the special token (helper-17: id 0 mid-chunk, which RETRO
        # trainers mask as padding, and [SEP] refused by the export as an eos id inside a document).
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        found = _pad_id(tokenizer, padding)
        self.has_pad_token = found is not None
        self.pad_id = check_pad_id(pad_id, self.vocab_size) if pad_id is not None else (found or 0)
        self._windowed = _windowing_is_exact(tokenizer)
        self._isolated = _isolated_cut(tokenizer)  # a regex of other cut points, or None

    def __setstate__(self, state: dict) -> None:
        # A pickled tokenizers.Tokenizer comes back without encode_special_tokens (helper-18): a
        # Chunker sent to a spawned or Ray worker would tokenize "[SEP]" as the special token again.
        self.__dict__.update(state)
        self.tokenizer.encode_special_tokens = True

    @property
    def pad_token(self) -> str | None:
        """The token string of ``pad_id`` (None if the vocabulary has no such id)."""
        return self.tokenizer.id_to_token(self.pad_id)

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize one document, without special tokens.

        Text that spells a special token ("[PAD]", "[SEP]") is tokenized as the
        characters it is, never as that token (``encode_special_tokens``).

        A text longer than ``window_chars`` is encoded in windows: from ``s``,
        take ``text[s:s + window_chars]``, cut it at the start of its last
        whitespace run (an index ``w`` where ``text[w]`` is a space and
        ``text[w - 1]`` is not whitespace), doubling the window until such a
        cut exists or the text ends, and go on from ``s + w``. The
        pre-tokenizer splits there, so ids and offsets are exactly those of
        one encode of the whole text. With BERT's normalizer and
        pre-tokenizer and no ordinary added tokens, a window with no such
        space is cut before its last other whitespace (newline, tab, a
        Unicode space), punctuation or CJK character instead
        (:func:`retrostore.text.tokenizer.isolated_cut`: BERT always ends a
        word there), so text without spaces (Chinese,
        minified code, base64) is tokenized in bounded memory too: a 3 MB
        Chinese document took 1.75 GB in one piece, 0.59 GB in windows.
        A window grows to at most ``max(1_000_000, 10 * window_chars)``
        characters (``max_stretch``): a longer stretch without any cut
        point (one 200 MB "word", Thai without spaces) is cut there anyway
        (20 MB of one word took 1.3 GB in one piece, 0.28 GB so). The next
        window starts one character early and drops the tokens that begin
        in that character, so BERT's WordPiece still gives the one
        ``[UNK]`` of a word over 100 characters, as one encode would; a BPE
        tokenizer may lose the tokens that straddle such a cut. Spans still
        tile the document.
        Tokenizers for which that is not known
        (a pre-tokenizer other than BERT's, Whitespace, regex ByteLevel,
        splitting Metaspace or a Split regex; a normalizer acting on the
        ends of the input; added tokens holding whitespace) always encode in
        one piece.

        Parameters
        ----------
        text : str
            The document.

        Returns
        -------
        ids : numpy.ndarray
            Token ids, shape ``(n,)``, dtype int64.
        offsets : numpy.ndarray
            Shape ``(n, 2)``, dtype int64: each token's ``[start, end)``
            character offsets in ``text``.

        Raises
        ------
        InvalidDocumentError
            If ``text`` is not a ``str`` or holds lone surrogates.
        """
        return self._encode_all([_check_document(text, None)])[0]

    def chunk(self, text: str) -> list[Chunk]:
        """Split one document into chunks.

        Parameters
        ----------
        text : str
            The document.

        Returns
        -------
        list of chunks
            Consecutive chunks of ``chunk_tokens`` tokens (the last may be
            shorter) whose spans tile ``text``. Empty for an empty or
            whitespace-only document, or one that yields no tokens. Each has
            ``position`` (int, from 0), ``token_ids`` (read-only int64 array,
            shape ``(n,)``), ``start`` and ``end`` (character offsets of its
            span ``text[start:end]``). These are chunks of a document not yet
            stored (what :meth:`Store.append` takes back as ``chunks=``), not
            the stored :class:`Chunk` that ``get_chunks`` returns.

        Raises
        ------
        InvalidDocumentError
            If ``text`` is not a ``str`` or holds lone surrogates.
        """
        return self.chunk_many([_check_document(text, None)])[0]

    def chunk_many(self, texts: Sequence[str]) -> list[list[Chunk]]:
        """Split many documents into chunks, as :meth:`chunk` does each.

        Documents of up to ``window_chars`` characters are encoded together
        by ``encode_batch`` (parallel, in Rust); longer ones in windows.

        Parameters
        ----------
        texts : sequence of str
            The documents.

        Returns
        -------
        list of list of chunks
            The chunks of each document, in order (fields as in :meth:`chunk`).

        Raises
        ------
        InvalidInputError
            If ``texts`` is one ``str`` or ``bytes``, or not iterable.
        InvalidDocumentError
            If a document is not a ``str`` or holds lone surrogates; the
            message names its index. Nothing is encoded then.
        """
        expects = f"chunk_many expects a sequence of str, got {type(texts).__name__}"
        if isinstance(texts, (str, bytes)):
            raise InvalidInputError(f"{expects}; use chunk(), or wrap it in a list")
        try:
            docs = [_check_document(t, i) for i, t in enumerate(texts)]
        except TypeError as exc:
            raise InvalidInputError(expects) from exc
        keep = [i for i, t in enumerate(docs) if t and not t.isspace()]
        result: list[list[Chunk]] = [[] for _ in docs]
        for i, (ids, offsets) in zip(keep, self._encode_all([docs[i] for i in keep])):
            result[i] = self._split(len(docs[i]), ids, offsets)
        return result

    def check_chunks(self, texts: Sequence[str], chunks: Any) -> list[list[Chunk]]:
        """Check chunks made elsewhere as :meth:`chunk_many` would make them of ``texts``.

        For a caller that chunked documents already (to count or embed their
        chunks) and hands the chunks back instead of having them cut again.
        Checked: one list of chunks (as :meth:`chunk_many` returns) per text; positions ``0, 1, ...``;
        spans that tile their text; 1-D integer token ids in
        ``[0, vocab_size)``, ``chunk_tokens`` of them in every chunk but the
        last (1 to ``chunk_tokens`` there); no chunks for an empty or
        whitespace text; no lone surrogates. Not every text is tokenized
        again (that would cost what the caller saved): the shortest text with
        chunks is, and must give exactly its chunks, which catches chunks
        from another tokenizer; so is
        every text given no chunks that is not empty or whitespace (a text
        without a single token is rare). Chunks that tile but hold the
        wrong ids elsewhere (swapped between documents of equal length,
        edited) pass; ``Store.verify(retokenize=True)`` finds them.

        Parameters
        ----------
        texts : sequence of str
            The documents, already checked to be ``str``.
        chunks : sequence of sequence of chunks
            ``chunks[i]`` are the chunks of ``texts[i]``.

        Returns
        -------
        list of list of chunks
            ``chunks`` as lists.

        Raises
        ------
        InvalidInputError
            A check fails; the message names the document, the chunk and
            the rule, and says to pass ``chunk_many(texts)``.
        InvalidDocumentError
            A text holds a lone surrogate (as :meth:`chunk_many` says).
        """
        fix = "pass what this store's chunker makes: store.chunker.chunk_many(docs)"
        if isinstance(chunks, (str, bytes)) or not isinstance(chunks, Sequence):
            raise InvalidInputError(f"chunks is a {type(chunks).__name__}; {fix} (a list of lists of chunks)")
        if len(chunks) != len(texts):
            raise InvalidInputError(f"{len(chunks)} lists of chunks for {len(texts)} documents; {fix}")
        for i, text in enumerate(texts):
            _check_document(text, i)  # what chunk_many checks: lone surrogates
        k, out, with_chunks, recheck = self.chunk_tokens, [], [], []
        for i, (text, cs) in enumerate(zip(texts, chunks)):
            if isinstance(cs, (str, bytes)) or not isinstance(cs, Sequence):
                raise InvalidInputError(f"chunks[{i}] is a {type(cs).__name__}, not a list of chunks; {fix}")
            cs = list(cs)
            out.append(cs)
            where = f"chunks[{i}]"
            if not text or text.isspace():
                if cs:
                    raise InvalidInputError(f"{where}: document {i} is empty or whitespace, so it has no chunks; {fix}")
                continue
            if not cs:
                recheck.append(i)  # rare (a text without a single token): only chunk_many can say
                continue
            if set(map(type, cs)) != {Chunk}:  # map/set/zip run in C: ~1 us per chunk in all
                bad = next(j for j, c in enumerate(cs) if type(c) is not Chunk)
                kind = type(cs[bad])
                hint = " (one document's chunks: use store.chunker.chunk(doc))" if kind is list else ""
                raise InvalidInputError(
                    f"{where}[{bad}] is a {'retrostore' if kind.__module__ == 'retrostore.types' else kind.__module__}.{kind.__qualname__}, not a chunk "
                    f"made by Chunker.chunk_many{hint}; {fix}"
                )
            positions, starts, ends, ids = zip(*map(_CHUNK_FIELDS, cs))
            if set(map(type, positions + starts + ends)) != {int}:  # not bool, float or numpy ints
                raise InvalidInputError(f"{where}: positions and character offsets must be Python ints; {fix}")
            if positions != tuple(range(len(cs))) or starts[0] != 0 or ends[-1] != len(text) or \
                    starts[1:] != ends[:-1] or not all(map(operator.le, starts, ends)):
                raise InvalidInputError(
                    f"{where} do not tile document {i} ({len(text)} characters): positions must run 0, 1, ... and "
                    "spans [start, end) must follow each other from 0 to the document's length; "
                    f"{fix} for these very documents"
                )
            if set(map(type, ids)) != {np.ndarray} or set(map(_NDIM, ids)) != {1} or \
                    not set(map(_DTYPE_KIND, ids)) <= {"i", "u"}:
                raise InvalidInputError(f"{where}: every chunk's token_ids must be a 1-D numpy array of integers; {fix}")
            lengths = list(map(len, ids))
            if lengths[:-1].count(k) != len(cs) - 1 or not 1 <= lengths[-1] <= k:
                raise InvalidInputError(
                    f"{where}: every chunk must hold {k} token ids (the last 1 to {k}); "
                    f"were they cut with another chunk_tokens? {fix}"
                )
            flat = np.concatenate(ids)  # int64 with uint64 gives float64: exact for ids below 2**53
            if flat.min() < 0 or flat.max() >= self.vocab_size:
                raise InvalidInputError(
                    f"{where}: token ids must be in [0, {self.vocab_size}) (this tokenizer's vocabulary); {fix}"
                )
            with_chunks.append(i)
        if with_chunks:  # the shortest document cut again (a second one cost 2x the whole check)
            recheck.append(min(with_chunks, key=lambda i: len(texts[i])))
        for i, made in zip(recheck, self.chunk_many([texts[i] for i in recheck])):
            if made != out[i]:
                raise InvalidInputError(
                    f"chunks[{i}] are not what this store's chunker (tokenizer sha256 {self.sha256[:12]}..., "
                    f"{k} tokens per chunk) makes of document {i}; were they cut with another tokenizer? {fix}"
                )
        return out

    def decode(self, ids: Any, *, skip_special_tokens: bool = True) -> str:
        """Turn token ids back into text.

        Parameters
        ----------
        ids : array_like of int
            One-dimensional token ids, each in ``[0, vocab_size)``.
        skip_special_tokens : bool, default True
            Leave out special tokens, such as padding.

        Returns
        -------
        str
            The decoded text. It is normalized (an uncased tokenizer
            lowercases), so not always the original span.

        Raises
        ------
        InvalidInputError
            If ``ids`` is not one-dimensional, not integers, or out of range.
        """
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            got = f"shape {arr.shape} dtype {arr.dtype}"
            raise InvalidInputError(f"ids must be a 1-D array of integers, got {got}")
        bad = arr[(arr < 0) | (arr >= self.vocab_size)] if arr.size else arr
        if bad.size:
            raise InvalidInputError(f"token id {bad[0]} is outside [0, {self.vocab_size})")
        return self.tokenizer.decode(arr.tolist(), skip_special_tokens=skip_special_tokens)

    def _split(self, n_chars: int, ids: np.ndarray, offsets: np.ndarray) -> list[Chunk]:
        """Cut one document's tokens into chunks with tiling spans."""
        k = self.chunk_tokens
        starts = offsets[0 : len(ids) : k, 0].copy()
        if len(starts) == 0:
            return []
        starts[0] = 0  # offsets never decrease with known tokenizers; enforce it anyway
        bounds = np.append(np.minimum(np.maximum.accumulate(starts), n_chars), n_chars).tolist()
        ids.flags.writeable = False
        return [Chunk(p, ids[p * k : p * k + k], *bounds[p : p + 2]) for p in range(len(starts))]

    def _encode_all(self, docs: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Encode documents: long ones in windows, all pieces in batches."""
        # (document, window start, text). Windows after the first start one
        # character early and drop its tokens, so that their first real token
        # is not the encoding's first: ByteLevel post-processors with
        # add_prefix_space leave the first token's offsets untrimmed.
        pieces: list[tuple[int, int, str]] = []
        for d, text in enumerate(docs):
            cuts = [0, len(text)]
            if len(text) > self.window_chars and self._windowed:
                cuts = self._cuts(text)
            pieces += [(d, a, text[a - (a > 0) : b]) for a, b in zip(cuts, cuts[1:])]
        ids_of: list[list[np.ndarray]] = [[] for _ in docs]
        offsets_of: list[list[np.ndarray]] = [[] for _ in docs]
        start = 0
        while start < len(pieces):
            stop, size = start, 0
            while stop < len(pieces) and (stop == start or size < _BATCH_CHARS):
                size += len(pieces[stop][2])
                stop += 1
            texts = [text for _, _, text in pieces[start:stop]]
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
            for (d, a, _), enc in zip(pieces[start:stop], encodings):
                pairs = enc.offsets  # fromiter over the flattened pairs: ~2x np.array's speed on tuples
                offsets = np.fromiter(itertools.chain.from_iterable(pairs), np.int64, 2 * len(pairs)).reshape(-1, 2)
                offsets += a - (a > 0)
                context = offsets[:, 0] < a  # tokens of the context character
                skip = len(context) if context.all() else int(np.argmin(context))
                ids_of[d].append(np.array(enc.ids[skip:], dtype=np.int64))
                offsets_of[d].append(offsets[skip:])
            start = stop
        return [(np.concatenate(i), np.concatenate(o)) for i, o in zip(ids_of, offsets_of)]

    def _cuts(self, text: str) -> list[int]:
        """Window boundaries ``[0, w1, ..., len(text)]`` for a long text."""
        n, s, size, cuts = len(text), 0, self.window_chars, [0]
        while s + size < n:
            window = text[s : s + size]
            match = _REVERSED_CUT.search(window[::-1])
            if match is None and self._isolated is not None:  # no space: before a character BERT isolates
                match = self._isolated.search(window[:0:-1])  # the last one, never the window's first
            if match is None and size < self.max_stretch:  # no cut point: grow the window
                size = min(2 * size, self.max_stretch)
                continue
            if match is None:  # a stretch with no cut point at all: cut it anyway, memory stays bounded
                s = _hard_cut(text, s + size, s + 1)
                cuts.append(s)
                size = self.window_chars
                continue
            s += size - 1 - match.start()  # read forwards: a space after non-space, or that character
            cuts.append(s)
            size = self.window_chars
        cuts.append(n)
        return cuts


def _hard_cut(text: str, at: int, low: int) -> int:
    """A cut at or before ``at`` (not before ``low``) whose previous character a normalizer keeps:
    the next window drops the tokens that begin in that character, and a combining mark or a
    control character (stripped by BERT's normalizer) would leave them to begin after it."""
    for w in range(at, max(low, at - 1000) - 1, -1):
        ch = text[w - 1]
        if ch not in "\ufffd" and unicodedata.category(ch)[0] not in "MCZ":
            return w
    return at


def check_pad_id(pad_id: Any, vocab_size: int) -> int:
    """``pad_id`` as an int in ``[0, vocab_size)``.

    Raises
    ------
    InvalidInputError
        Not an int (bools refused) or outside the vocabulary.
    """
    if not is_int(pad_id) or not 0 <= pad_id < vocab_size:
        raise InvalidInputError(
            f"pad_id={shown(pad_id)} is not a token id of the tokenizer's vocabulary [0, {vocab_size}); give the id of "
            "a token that never occurs in your text (the padding of neighbour tokens, masked out by "
            "tokens != pad_id)"
        )
    return int(pad_id)
