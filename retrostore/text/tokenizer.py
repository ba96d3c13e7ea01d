"""Tokenizer facts the chunker relies on: the padding id, whether a long text
may be tokenized in windows, and what a document must be (a ``str`` without
lone surrogates).
"""

from __future__ import annotations

import functools
import json
import operator
import re
import unicodedata
from typing import Any

import tokenizers

from ..errors import InvalidDocumentError, InvalidInputError, shown

__all__ = ["positive_int", "check_document", "pad_id", "windowing_is_exact", "isolated_cut", "PAD_TOKENS"]

_SURROGATE = re.compile("[\ud800-\udfff]")
# Normalizers that act on the ends of the input, so differ window by window.
_UNSAFE_NORMALIZERS = {"Prepend", "Strip"}
_SPLITTING_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "Split"}
#: Tokens taken as padding when the tokenizer's padding settings name none, in this order.
PAD_TOKENS = ("[PAD]", "<pad>", "<|endoftext|>")


def positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int >= 1, or raise InvalidInputError."""
    try:
        number = -1 if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = -1
    if number < 1:
        got = f"{type(value).__name__} {shown(value)}"
        raise InvalidInputError(f"{name} must be an integer >= 1, got {got}")
    return number


def check_document(text: Any, index: int | None) -> str:
    """Return ``text`` as a plain ``str``, or raise InvalidDocumentError."""
    where = "document" if index is None else f"document {index}"
    if not isinstance(text, str):
        hint = ", decode it first" if isinstance(text, (bytes, bytearray)) else ""
        raise InvalidDocumentError(f"{where} is a {type(text).__name__}, not a str{hint}")
    bad = None if text.isascii() else _SURROGATE.search(text)  # isascii is O(1) in CPython
    if bad is not None:
        raise InvalidDocumentError(
            f"{where} holds a lone surrogate {bad.group()!r} at character {bad.start()}, "
            "which is not valid Unicode; decode the source with errors='replace'"
        )
    return str(text)


def pad_id(tokenizer: tokenizers.Tokenizer, padding: dict[str, Any] | None) -> int | None:
    """The tokenizer's padding token id (the rule is under ``pad_id`` in
    :class:`retrostore.Chunker`), or None when it has none."""
    if padding is not None and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    found = (tokenizer.token_to_id(token) for token in PAD_TOKENS)
    return next((int(token_id) for token_id in found if token_id is not None), None)


def windowing_is_exact(tokenizer: tokenizers.Tokenizer) -> bool:
    """Whether cutting before a space that ends a word keeps one-shot results.

    True when the pre-tokenizer is one known to split there (BERT, Whitespace,
    regex ByteLevel, splitting Metaspace, or a ``Split`` regex, assumed to be
    of the GPT-2 / GPT-4 / Llama-3 kind that never matches across such a
    space), no normalizer acts on the ends of the input (``Prepend``,
    ``Strip``), and no added token holds whitespace or strips it on its right
    (nor, unless special, on its left).
    """
    pre, norm = tokenizer.pre_tokenizer, tokenizer.normalizer
    if pre is None or not _splits_at_spaces(json.loads(pre.__getstate__())):
        return False
    kinds = set(re.findall(r'"type":"(\w+)"', norm.__getstate__().decode())) if norm else set()
    if kinds & _UNSAFE_NORMALIZERS:
        return False
    added = tokenizer.get_added_tokens_decoder().values()
    # (an ordinary token that strips on its left takes the whitespace before it, across a cut: helper-20)
    return not any(a.rstrip or (a.lstrip and not a.special) or any(c.isspace() for c in a.content) for a in added)


def _isolated_class(cjk: bool) -> str:
    """A regex character class of characters that end a pre-token in BERT's pipeline: whitespace
    (tab, newline, carriage return and the Unicode space separators, which the normalizer turns
    into spaces; not the control characters it deletes), ASCII punctuation and the Unicode
    punctuation (category P*) of the general-punctuation, CJK-symbol and full-width blocks, each a
    pre-token of its own, and with ``cjk`` the CJK ideographs (which ``handle_chinese_chars``
    surrounds with spaces: the ranges of tokenizers' ``is_chinese_char``, less the one where its
    Extension E range differs from BERT's). A subset of them is enough: any is a cut point."""
    chars = ["\t", "\n", "\r", "\u2028", "\u2029"]
    chars += [chr(i) for i in range(0x80, 0x3001) if unicodedata.category(chr(i)) == "Zs"]
    chars += [c for c in map(chr, range(0x21, 0x7F)) if not c.isalnum()]
    for lo, hi in ((0x2010, 0x205E), (0x3001, 0x303F), (0xFF01, 0xFF65)):
        chars += [chr(i) for i in range(lo, hi + 1) if unicodedata.category(chr(i)).startswith("P")]
    ideographs = ("\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002b81f"
                  "\U0002b920-\U0002ceaf\U0002f800-\U0002fa1f") if cjk else ""
    return "[" + "".join(re.escape(c) for c in chars) + ideographs + "]"


@functools.cache
def _isolated(cjk: bool) -> re.Pattern:
    """The compiled class, built on first use (a scan of ~12,000 code points: not at import)."""
    return re.compile(_isolated_class(cjk))


def isolated_cut(tokenizer: tokenizers.Tokenizer) -> re.Pattern | None:
    """The characters before which a window may also be cut, keeping one-shot results; None if none.

    For BERT's pipeline (``BertNormalizer`` or none, then ``BertPreTokenizer``),
    which makes each punctuation character a pre-token of its own, and each CJK
    ideograph too when the normalizer's ``handle_chinese_chars`` is on, so no
    token spans a cut before one; when :func:`windowing_is_exact` holds and
    every added token is special (the chunker tokenizes special tokens as text;
    an ordinary added token such as ``"a-b"`` is matched before
    pre-tokenization and could span it). Text with no spaces (Chinese,
    minified code, base64) then needs no window the size of the whole
    document: a 3 MB Chinese document took 1.75 GB to tokenize in one piece.
    """
    if not windowing_is_exact(tokenizer):
        return None
    if json.loads(tokenizer.pre_tokenizer.__getstate__()).get("type") != "BertPreTokenizer":
        return None
    norm = json.loads(tokenizer.normalizer.__getstate__()) if tokenizer.normalizer is not None else {}
    if norm and norm.get("type") != "BertNormalizer":
        return None
    if not all(a.special for a in tokenizer.get_added_tokens_decoder().values()):
        return None
    return _isolated(bool(norm.get("handle_chinese_chars", False)))


def _splits_at_spaces(spec: dict[str, Any]) -> bool:
    """Whether a serialized pre-tokenizer splits before a word-ending space."""
    kind = spec.get("type")
    if kind == "Sequence":
        return any(_splits_at_spaces(p) for p in spec.get("pretokenizers", []))
    if kind == "ByteLevel":
        return bool(spec.get("use_regex", True))
    if kind == "Metaspace":
        return bool(spec.get("split", True))
    return kind in _SPLITTING_PRE_TOKENIZERS
