"""Tests of retrostore.text.chunking: tokenizer loading and document -> chunks."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from retrostore.text.chunking import Chunk, Chunker
from retrostore.errors import InvalidDocumentError, InvalidInputError, RetrostoreError

from conftest import SHARED  # noqa: E402  (RETROSTORE_SHARED or ../shared)
TOKENIZER = SHARED / "models" / "all-MiniLM-L6-v2" / "tokenizer.json"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"

# Characters that stress offsets and window cuts: accents, CJK, emoji (which
# the WordPiece vocabulary maps to [UNK]), a combining accent after a space,
# characters BertNormalizer deletes (\x01, \x0b, \x1c, zero-width space), and
# whitespace that is not a plain space (no-break and ideographic space).
ODD_WORDS = [
    "café", "NAÏVE", "Ærøskøbing", "日本語の文", "中文", "😀", "👍🏽", "İstanbul",
    "ﬁne", "Straße", "e\u0301", "\u0301", "x\x01", "\x01", "a\x0bb", "\x1c", "\u200b",
    "\u00a0", "\u3000", "«quoted»", "—", "...", "!!", "'s", "don't", "12345678",
]
SEPARATORS = [" ", " ", " ", "  ", "   ", "\t", " \t ", "\t\t", ", ", ". ", " - ", " \u00a0 "]
NEWLINES = ["\n", ".\n\n", " \r\n ", "!\n", "\n  ", ":\n"]
# Llama-3's pre-tokenizer regex; it glues newlines onto the punctuation before them.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.fixture(scope="module")
def chunker() -> Chunker:
    return Chunker(TOKENIZER)


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")


def train_bpe(pre_tokenizer: pre_tokenizers.PreTokenizer, path: Path) -> Path:
    """Train a byte-level BPE tokenizer on tinyshakespeare and save it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    # Like GPT-2's: add_prefix_space (default True) with trim_offsets.
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(SHAKESPEARE)], trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2-style byte-level BPE tokenizer."""
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    return train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), path)


@pytest.fixture(scope="module")
def llama3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer with Llama-3's Split pre-tokenizer."""
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.json"
    tok = Chunker(train_bpe(pre, path)).tokenizer
    # Its merges glue a newline onto punctuation, so a cut there would show.
    assert tok.encode("x.\n", add_special_tokens=False).tokens == ["x", ".Ċ"]
    return path


def generated_text(words: list[str], n_chars: int, seed: int, newlines: bool = False) -> str:
    """About ``n_chars`` characters of words and mixed separators; one line by default."""
    rng = random.Random(seed)
    separators = SEPARATORS + NEWLINES if newlines else SEPARATORS
    parts, size = [], 0
    while size < n_chars:
        word = rng.choice(ODD_WORDS) if rng.random() < 0.08 else rng.choice(words)
        part = word + rng.choice(separators)
        parts.append(part)
        size += len(part)
    return "".join(parts)


@pytest.fixture(scope="module")
def words(shakespeare: str) -> list[str]:
    return shakespeare.split()


def one_shot(chunker: Chunker, text: str) -> tuple[np.ndarray, np.ndarray]:
    enc = chunker.tokenizer.encode(text, add_special_tokens=False)
    return np.array(enc.ids, np.int64), np.array(enc.offsets, np.int64).reshape(-1, 2)


def check_chunks(chunker: Chunker, text: str, chunks: list[Chunk]) -> None:
    """Every documented property of a document's chunks."""
    ids, offsets = chunker.encode(text)
    k = chunker.chunk_tokens
    assert len(chunks) == -(-len(ids) // k)
    assert "".join(text[c.start : c.end] for c in chunks) == text
    for p, c in enumerate(chunks):
        assert c.position == p
        assert c.token_ids.dtype == np.int64 and c.token_ids.ndim == 1
        assert 1 <= len(c.token_ids) <= k
        assert len(c.token_ids) == k or p == len(chunks) - 1
        assert c.start == (0 if p == 0 else offsets[p * k, 0])
        assert c.end == (len(text) if p == len(chunks) - 1 else chunks[p + 1].start)
    if chunks:
        np.testing.assert_array_equal(np.concatenate([c.token_ids for c in chunks]), ids)


# -- loading ---------------------------------------------------------------


def test_attributes_of_the_default_tokenizer(chunker: Chunker) -> None:
    assert chunker.chunk_tokens == 64
    assert chunker.sha256 == hashlib.sha256(TOKENIZER.read_bytes()).hexdigest()
    assert chunker.vocab_size == 30522
    assert chunker.pad_id == 0
    # The shipped file truncates and pads at 128; both must be off.
    assert chunker.tokenizer.truncation is None
    assert chunker.tokenizer.padding is None


def test_special_token_strings_in_a_document_are_text(chunker: Chunker) -> None:
    """helper-17: "[PAD]" in a document became id 0 mid-chunk (masked as padding by RETRO trainers)
    and "[SEP]" id 102 (refused by the export as the eos id inside a document)."""
    text = "Tokens like [PAD], [CLS], [SEP], [MASK] and [UNK] appear in NLP code."
    ids, _ = chunker.encode(text)
    assert not set(ids.tolist()) & {0, 100, 101, 102, 103}
    tokens = [chunker.tokenizer.id_to_token(i) for i in ids.tolist()]
    assert tokens[3:6] == ["[", "pad", "]"] and tokens[7:10] == ["[", "cl", "##s"]
    (piece,) = chunker.chunk(text)
    assert (piece.start, piece.end) == (0, len(text)) and list(piece.token_ids) == ids.tolist()
    import pickle  # a Chunker sent to a spawned or Ray worker keeps the rule (helper-18: it was lost)
    assert pickle.loads(pickle.dumps(chunker)).encode(text)[0].tolist() == ids.tolist()


def test_pad_id_rules(tmp_path: Path, bpe_path: Path) -> None:
    spec = json.loads(TOKENIZER.read_text(encoding="utf-8"))
    spec["padding"]["pad_id"] = 7
    (tmp_path / "padded.json").write_text(json.dumps(spec), encoding="utf-8")
    assert Chunker(tmp_path / "padded.json").pad_id == 7
    spec["padding"] = None  # falls back to the id of "[PAD]"
    (tmp_path / "unpadded.json").write_text(json.dumps(spec), encoding="utf-8")
    assert Chunker(tmp_path / "unpadded.json").pad_id == 0
    bpe = Chunker(str(bpe_path))
    assert bpe.pad_id == bpe.tokenizer.token_to_id("<|endoftext|>")
    plain = Tokenizer(models.WordLevel({"a": 0, "b": 1, "?": 2}, unk_token="?"))
    plain.save(str(tmp_path / "plain.json"))
    assert Chunker(tmp_path / "plain.json").pad_id == 0


def test_long_documents_are_not_truncated(chunker: Chunker) -> None:
    text = "hello " * 1000
    chunks = chunker.chunk(text)
    assert sum(len(c.token_ids) for c in chunks) == 1000
    assert [len(c.token_ids) for c in chunks] == [64] * 15 + [40]


# -- splitting -------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " ", "\n", "  \t\r\n \u3000 \u00a0"])
def test_empty_and_whitespace_documents_have_no_chunks(chunker: Chunker, text: str) -> None:
    assert chunker.chunk(text) == []


def test_whitespace_only_is_empty_even_for_byte_level(bpe_path: Path) -> None:
    bpe = Chunker(bpe_path)
    assert len(bpe.encode("   \n\t")[0]) > 0  # byte-level BPE has tokens for spaces
    assert bpe.chunk("   \n\t") == []


def test_document_without_tokens_has_no_chunks(chunker: Chunker) -> None:
    # Control characters are deleted by BertNormalizer: no tokens, no error.
    assert chunker.chunk("\x00\x01\x02\ufffd") == []


def test_short_document(chunker: Chunker) -> None:
    text = "  Hello, world!\n"
    [chunk] = chunker.chunk(text)
    assert (chunk.position, chunk.start, chunk.end) == (0, 0, len(text))
    assert chunk.token_ids.tolist() == [7592, 1010, 2088, 999]  # no [CLS] / [SEP]
    assert chunker.decode(chunk.token_ids) == "hello, world!"


@pytest.mark.parametrize(("n_tokens", "sizes"), [
    (1, [1]), (63, [63]), (64, [64]), (65, [64, 1]), (128, [64, 64]), (129, [64, 64, 1]),
])
def test_exact_multiples_of_chunk_tokens(chunker: Chunker, n_tokens: int, sizes: list[int]) -> None:
    text = " ".join(["word"] * n_tokens)
    chunks = chunker.chunk(text)
    assert [len(c.token_ids) for c in chunks] == sizes
    check_chunks(chunker, text, chunks)


def test_other_chunk_sizes(shakespeare: str) -> None:
    text = shakespeare[:5000]
    for k in (1, 2, 7, 1000):
        c = Chunker(TOKENIZER, chunk_tokens=k)
        check_chunks(c, text, c.chunk(text))


def test_offsets_are_character_offsets_into_the_original(chunker: Chunker) -> None:
    text = "Café NAÏVE 日本 😀 👍🏽x İstanbul ﬁne"
    ids, offsets = chunker.encode(text)
    pieces = [text[a:b] for a, b in offsets]
    assert pieces == ["Café", "NAÏVE", "日", "本", "😀", "👍🏽x", "İstanbul", "ﬁ", "ne"]
    assert ids[4] == ids[5] == chunker.tokenizer.token_to_id("[UNK]")
    assert ids.dtype == offsets.dtype == np.int64 and offsets.shape == (len(ids), 2)
    one = Chunker(TOKENIZER, chunk_tokens=1)
    chunks = one.chunk(text)
    assert [text[c.start : c.end] for c in chunks] == [
        "Café ", "NAÏVE ", "日", "本 ", "😀 ", "👍🏽x ", "İstanbul ", "ﬁ", "ne",
    ]
    check_chunks(one, text, chunks)


def test_byte_level_spans_tile_multibyte_text(bpe_path: Path) -> None:
    # One emoji becomes several byte tokens sharing one character span.
    text = " 😀😀 👍🏽 café  日本語\t\tend \n"
    for k in (1, 2, 3, 64):
        bpe = Chunker(bpe_path, chunk_tokens=k)
        check_chunks(bpe, text, bpe.chunk(text))


def test_spans_tile_real_documents(chunker: Chunker, shakespeare: str) -> None:
    docs = [d for d in shakespeare.split("\n\n") if d.strip()]
    picked = docs[:40] + ["\n\n".join(docs[100:400]), "  " + docs[500] + " \n\n "]
    for k in (64, 5):
        c = chunker if k == 64 else Chunker(TOKENIZER, chunk_tokens=k)
        for text, chunks in zip(picked, c.chunk_many(picked)):
            check_chunks(c, text, chunks)


def test_chunks_are_immutable(chunker: Chunker) -> None:
    [chunk] = chunker.chunk("a short document")
    with pytest.raises(AttributeError):
        chunk.start = 3  # type: ignore[misc]
    with pytest.raises(ValueError):
        chunk.token_ids[0] = 1
    assert chunk == Chunk(0, chunk.token_ids.copy(), chunk.start, chunk.end)
    assert chunk != Chunk(0, chunk.token_ids[:1], chunk.start, chunk.end)


# -- long documents --------------------------------------------------------


@pytest.mark.parametrize("which", ["wordpiece", "bpe"])
def test_windows_give_one_shot_ids_and_offsets(
    which: str, words: list[str], bpe_path: Path
) -> None:
    path = TOKENIZER if which == "wordpiece" else bpe_path
    text = generated_text(words, 2_500_000, seed=1)
    # 150k characters without a plain space make a window grow.
    text += "\t".join(words[:25_000])[:150_000] + " tail," + generated_text(words, 5000, seed=2)
    assert "\n" not in text and "\r" not in text
    windowed = Chunker(path)
    assert windowed._windowed and len(windowed._cuts(text)) > 20
    ids, offsets = windowed.encode(text)
    want_ids, want_offsets = one_shot(windowed, text)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(offsets, want_offsets)


@pytest.mark.parametrize("which", ["wordpiece", "bpe", "llama3"])
def test_tiny_windows_give_one_shot_ids_and_offsets(
    which: str, words: list[str], bpe_path: Path, llama3_path: Path
) -> None:
    path = {"wordpiece": TOKENIZER, "bpe": bpe_path, "llama3": llama3_path}[which]
    for seed in range(3):
        body = generated_text(words, 20_000, seed=seed, newlines=seed > 0)
        text = "  " + body + "\t" + "x" * 300 + "  "
        for window in (1, 13, 200):
            c = Chunker(path, chunk_tokens=16, window_chars=window)
            ids, offsets = c.encode(text)
            want_ids, want_offsets = one_shot(c, text)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_array_equal(offsets, want_offsets)
            check_chunks(c, text, c.chunk(text))


def test_cut_points() -> None:
    c = Chunker(TOKENIZER, window_chars=4)
    text = "ab  cd\tef gh"
    cuts = c._cuts(text)
    assert cuts[0] == 0 and cuts[-1] == len(text)
    for w in cuts[1:-1]:
        assert text[w] == " " and not text[w - 1].isspace()
    assert c._cuts("x" * 50) == [0, 50]  # no cut point: one window
    assert c._cuts("abc") == [0, 3]


@pytest.mark.parametrize("which", ["wordpiece", "bpe"])
def test_a_stretch_with_no_cut_point_is_cut_at_max_stretch(which: str, bpe_path: Path) -> None:
    """helper-38: one 200 MB "word" (or Thai without spaces) was tokenized in one piece, 12.4 GB
    for one [UNK]. Windows now stop growing at max_stretch characters and are cut there; for
    WordPiece the ids are still those of one encode (a word over 100 characters is one [UNK]),
    and for every tokenizer the spans tile the document."""
    path = {"wordpiece": TOKENIZER, "bpe": bpe_path}[which]
    c = Chunker(path, chunk_tokens=16)
    assert c.max_stretch == 1_000_000
    text = "intro text " + "x" * 2_300_000 + "\u0e2a\u0e27\u0e31\u0e2a" * 200_000 + " outro"
    cuts = c._cuts(text)
    assert cuts[0] == 0 and cuts[-1] == len(text)
    assert max(b - a for a, b in zip(cuts, cuts[1:])) <= c.max_stretch
    ids, offsets = c.encode(text)
    if which == "wordpiece":
        want_ids, want_offsets = one_shot(c, text)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(offsets[:, 0], want_offsets[:, 0])
    assert (np.diff(offsets[:, 0]) >= 0).all()
    check_chunks(c, text, c.chunk(text))


def _spaceless_texts() -> dict[str, str]:
    """Documents without a plain space, as real corpora hold them (deterministic)."""
    rng = random.Random(0)
    pieces = ["ab", "cd", ",", ".", "(", ")", "\u00e9", "\u03a3", "\u03c2", "x\u0301", "\x01", "\u65e5\u672c",
              "\u3002", "\u300c", "\u300d", "\u2013", "\u2026", "1", "23", "\t", "\u00a0"]
    return {
        "base64": base64.b64encode(rng.randbytes(60_000)).decode(),
        "mixed": "".join(rng.choice(pieces) for _ in range(40_000)),
        "chinese": "".join(rng.choice("\u6f22\u5b57\u65e5\u672c\u8a9e\u4e2d\u6587\u3001\u3002\u300c\u300d\uff01\uff1fabc123")
                           for _ in range(60_000)),
        "greek": "\u039f\u0394\u039f\u03a3,\u039f\u0394\u039f\u03a3.\u0391\u03a3!\u03a3;" * 4000,
        "minified": '{"a":[1,2,{"b":"c"}],"dd":null,"e":"f\\u00e9"}' * 1500,
        "lines": "\n".join(rng.choice(["word", "Wort", "mot", "\u8a9e"]) for _ in range(20_000)),  # helper-20
        "ideographic spaces": "\u3000".join(rng.choice(["ab", "\u00e9t\u00e9", "x\u00a0y"]) for _ in range(20_000)),
        "extension c-f": "".join(chr(rng.choice([0x2A700, 0x2B740, 0x2B920, 0x2CEA0, 0x2F800]) + rng.randrange(16))
                                 for _ in range(20_000)),
    }


@pytest.mark.parametrize("window", [1, 7, 200, 10_000])
def test_spaceless_documents_are_cut_before_punctuation_and_cjk(window: int) -> None:
    """BERT isolates punctuation and CJK characters, so a document with no space is still
    tokenized in windows of about window_chars (a 3 MB Chinese document took 1.75 GB in one
    piece), with exactly the one-shot ids and offsets."""
    c = Chunker(TOKENIZER, chunk_tokens=16, window_chars=window)
    assert c._isolated is not None
    for name, text in _spaceless_texts().items():
        assert " " not in text
        cuts = c._cuts(text)
        assert max(b - a for a, b in zip(cuts, cuts[1:])) <= 2 * max(window, 256), name  # bounded windows
        ids, offsets = c.encode(text)
        want_ids, want_offsets = one_shot(c, text)
        np.testing.assert_array_equal(ids, want_ids, err_msg=name)
        np.testing.assert_array_equal(offsets, want_offsets, err_msg=name)
        if window == 200:
            check_chunks(c, text, c.chunk(text))


def test_only_bert_with_special_added_tokens_cuts_before_punctuation(tmp_path: Path, bpe_path: Path,
                                                                    llama3_path: Path) -> None:
    assert Chunker(bpe_path)._isolated is None and Chunker(llama3_path)._isolated is None
    assert Chunker(bpe_path)._cuts("ab,cd." * 50) == [0, 300]  # byte-level BPE: spaces only
    spec = json.loads(TOKENIZER.read_text(encoding="utf-8"))
    spec["added_tokens"].append({"id": 30522, "content": "a-b", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": True, "special": False})
    (tmp_path / "added.json").write_text(json.dumps(spec), encoding="utf-8")
    c = Chunker(tmp_path / "added.json", window_chars=3)
    assert c._windowed and c._isolated is None  # "a-b" is matched before pre-tokenization
    text = "a-b" * 20
    assert c._cuts(text) == [0, len(text)]
    np.testing.assert_array_equal(c.encode(text)[0], one_shot(c, text)[0])
    # Without handle_chinese_chars, BERT keeps a run of ideographs as one word: cut only at punctuation
    spec = json.loads(TOKENIZER.read_text(encoding="utf-8"))
    spec["normalizer"]["handle_chinese_chars"] = False
    (tmp_path / "no_cjk.json").write_text(json.dumps(spec), encoding="utf-8")
    c = Chunker(tmp_path / "no_cjk.json", window_chars=5)
    text = _spaceless_texts()["chinese"][:5000]
    cuts = c._cuts(text)
    assert len(cuts) > 10 and all(not "\u4e00" <= text[w] <= "\u9fff" for w in cuts[1:-1])
    ids, offsets = c.encode(text)
    want_ids, want_offsets = one_shot(c, text)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(offsets, want_offsets)


def test_a_left_stripping_added_token_turns_windowing_off(tmp_path: Path) -> None:
    """helper-20: an ordinary added token with lstrip took the space before it, across the cut there:
    "本 [sep]" lost the token in windows (present at 58aff34, in the space rule)."""
    spec = json.loads(TOKENIZER.read_text(encoding="utf-8"))
    spec["added_tokens"].append({"id": 30522, "content": "[sep]", "single_word": False, "lstrip": True,
                                 "rstrip": False, "normalized": True, "special": False})
    (tmp_path / "lstrip.json").write_text(json.dumps(spec), encoding="utf-8")
    c = Chunker(tmp_path / "lstrip.json", window_chars=1)
    assert not c._windowed
    text = "\u672c [sep] " * 50
    np.testing.assert_array_equal(c.encode(text)[0], one_shot(c, text)[0])


def test_unsafe_tokenizers_are_encoded_in_one_piece(tmp_path: Path, bpe_path: Path) -> None:
    spec = json.loads(bpe_path.read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = None
    (tmp_path / "no_pre.json").write_text(json.dumps(spec), encoding="utf-8")
    c = Chunker(tmp_path / "no_pre.json", window_chars=10)
    assert not c._windowed
    text = "a few words of text, " * 20
    np.testing.assert_array_equal(c.encode(text)[0], one_shot(c, text)[0])
    spec = json.loads(TOKENIZER.read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Strip",
                          "strip_left": True, "strip_right": True}, spec["normalizer"]]}
    (tmp_path / "strip.json").write_text(json.dumps(spec), encoding="utf-8")
    assert not Chunker(tmp_path / "strip.json")._windowed


def test_five_megabyte_single_line_document(chunker: Chunker, words: list[str]) -> None:
    text = generated_text(words, 5_000_000, seed=3)
    chunks = chunker.chunk(text)
    assert len(chunks) > 15_000
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    assert all(a.end == b.start for a, b in zip(chunks, chunks[1:]))


@pytest.mark.slow
def test_twenty_megabyte_single_line_document(chunker: Chunker, words: list[str]) -> None:
    text = generated_text(words, 20_000_000, seed=4)
    chunks = chunker.chunk(text)
    assert "".join(text[c.start : c.end] for c in chunks) == text


def test_chunk_many_equals_chunk(words: list[str], shakespeare: str) -> None:
    c = Chunker(TOKENIZER, chunk_tokens=32, window_chars=20_000)
    texts = [
        "", shakespeare[:3000], "   ", generated_text(words, 70_000, seed=5),
        "one", shakespeare[3000:50_000], "\x01", "日本語 😀",
    ]
    assert c.chunk_many(texts) == [c.chunk(t) for t in texts]
    assert c.chunk_many(tuple(texts[:2])) == [c.chunk(t) for t in texts[:2]]
    assert c.chunk_many([]) == []


# -- errors ----------------------------------------------------------------


def test_decode_checks_ids(chunker: Chunker) -> None:
    assert chunker.decode([]) == ""
    assert chunker.decode(np.array([0, 7592, 0])) == "hello"
    assert chunker.decode([0, 7592], skip_special_tokens=False) == "[PAD] hello"
    for bad in ([-1], [30522], [[7592]], [1.5]):
        with pytest.raises(InvalidInputError):
            chunker.decode(bad)


@pytest.mark.parametrize("bad", [b"bytes", 3, None, ["a list"]])
def test_non_str_document(chunker: Chunker, bad: object) -> None:
    with pytest.raises(InvalidDocumentError, match=type(bad).__name__):
        chunker.chunk(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidDocumentError, match=f"document 2 is a {type(bad).__name__}"):
        chunker.chunk_many(["fine", "also fine", bad])  # type: ignore[list-item]
    with pytest.raises(InvalidDocumentError):
        chunker.encode(bad)  # type: ignore[arg-type]


def test_lone_surrogate_document(chunker: Chunker) -> None:
    with pytest.raises(InvalidDocumentError, match="document 1 .*surrogate"):
        chunker.chunk_many(["ok", "broken \ud800 text"])


def test_chunk_many_needs_a_sequence(chunker: Chunker) -> None:
    for bad in ("a single str", b"bytes", 42):
        with pytest.raises(InvalidInputError, match="sequence of str"):
            chunker.chunk_many(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "64", None])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(InvalidInputError, match="chunk_tokens"):
        Chunker(TOKENIZER, chunk_tokens=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="window_chars"):
        Chunker(TOKENIZER, window_chars=bad)  # type: ignore[arg-type]


def test_bad_tokenizer_paths(tmp_path: Path) -> None:
    (tmp_path / "garbage.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "empty.json").write_text("{}", encoding="utf-8")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    for name in ("missing.json", "garbage.json", "empty.json", "binary.json", "."):
        path = tmp_path / name
        with pytest.raises(InvalidInputError, match="tokenizer.json") as info:
            Chunker(path)
        assert str(path) in str(info.value)
        assert isinstance(info.value, (RetrostoreError, ValueError))
    with pytest.raises(InvalidInputError, match="str or os.PathLike"):
        Chunker(42)  # type: ignore[arg-type]
