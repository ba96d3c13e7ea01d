"""Tests of retrostore.text.inputs: reading documents for ``retrostore build``."""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import pytest
import zstandard

from retrostore.text.inputs import (
    SUPPORTED_SUFFIXES,
    InputDocument,
    count_input_bytes,
    expand_inputs,
    iter_documents,
)
from retrostore.errors import (
    InputNotFoundError,
    InputReadError,
    InvalidDocumentError,
    InvalidInputError,
    InvalidMetadataError,
    RetrostoreError,
)

from conftest import SHARED  # noqa: E402

DATA = SHARED / "data"
CORPUS = DATA / "pydocs.jsonl.zst"


def _corpus_lines(n: int | None = None) -> list[bytes]:
    if not CORPUS.exists():
        pytest.skip(f"real corpus {CORPUS} not present")
    with open(CORPUS, "rb") as fh:
        reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True)
        lines = io.BufferedReader(reader).readlines()
    return lines if n is None else lines[:n]


@pytest.fixture(scope="module")
def first5() -> list[bytes]:
    return _corpus_lines(5)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def _jsonl(tmp_path: Path, name: str, *lines: str | bytes) -> Path:
    raw = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    return _write(tmp_path / name, raw)


# ---------------------------------------------------------------- real data


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "multiframe.jsonl.zst",
                                  "multimember.jsonl.gz"])
def test_formats_roundtrip_real_records(tmp_path, first5, kind):
    raw = b"".join(first5)
    half = b"".join(first5[:2]), b"".join(first5[2:])
    blob = {
        "jsonl": raw,
        "jsonl.gz": gzip.compress(raw),
        "jsonl.zst": _zst(raw),
        "multiframe.jsonl.zst": _zst(half[0]) + _zst(half[1]),
        "multimember.jsonl.gz": gzip.compress(half[0]) + gzip.compress(half[1]),
    }[kind]
    path = _write(tmp_path / f"docs.{kind}", blob)
    docs = list(iter_documents([path]))
    expected = [json.loads(line) for line in first5]
    assert [d.text for d in docs] == [e["text"] for e in expected]
    assert [d.metadata for d in docs] == [e["meta"] for e in expected]
    assert [d.source for d in docs] == [f"{path}:{i}" for i in range(1, 6)]
    assert all(isinstance(d, InputDocument) for d in docs)


def test_multiframe_zst_with_frame_boundary_inside_a_line(tmp_path, first5):
    raw = b"".join(first5)
    cut = len(first5[0]) + 100  # in the middle of the second record
    path = _write(tmp_path / "split.jsonl.zst", _zst(raw[:cut]) + _zst(raw[cut:]) + _zst(b""))
    assert [d.text for d in iter_documents([path])] == [json.loads(x)["text"] for x in first5]


def test_full_real_corpus(tmp_path):
    if not CORPUS.exists():
        pytest.skip(f"real corpus {CORPUS} not present")
    progress: list[int] = []
    docs = list(iter_documents([str(CORPUS)], on_progress=progress.append))
    assert len(docs) == 497
    assert all(isinstance(d.metadata, dict) and "source" in d.metadata for d in docs)
    assert all(d.text for d in docs)
    assert sum(progress) == count_input_bytes([CORPUS]) == CORPUS.stat().st_size
    assert all(n > 0 for n in progress)


# ---------------------------------------------------------------- .txt and directories


def test_txt_text_kept_exactly(tmp_path):
    texts = {
        "crlf.txt": "line one\r\nline two\r\n\r\n",
        "trailing.txt": "ends with newlines\n\n\n",
        "unicode.txt": "\ufeffBOM kept, héllo wörld, 日本語, emoji 🎉, \u2028 sep\rlone CR  ",
        "empty.txt": "",
    }
    for name, text in texts.items():
        _write(tmp_path / name, text.encode("utf-8"))
    for name, text in texts.items():
        (doc,) = iter_documents([tmp_path / name])
        assert doc == InputDocument(text, {"source": name}, str(tmp_path / name))
    if (DATA / "tinyshakespeare.txt").exists():
        (doc,) = iter_documents([DATA / "tinyshakespeare.txt"])
        assert doc.text == (DATA / "tinyshakespeare.txt").read_bytes().decode("utf-8")


def test_directory_walk_order_and_filtering(tmp_path, caplog):
    root = tmp_path / "corpus"
    for rel in ["b.txt", "a/z.jsonl", "a/y.txt", "a.txt", "c/d/e.jsonl.gz", "c/f.jsonl.zst",
                "README.md", "data.json", "x.json.zst", "notes.txt.gz", ".hidden.txt",
                ".git/objects.txt", "c/.cache/g.txt", "UPPER.TXT"]:
        data = b'{"text": "t"}\n' if "jsonl" in rel else rel.encode()
        if rel.endswith(".gz"):
            data = gzip.compress(data)
        elif rel.endswith(".zst"):
            data = _zst(data)
        _write(root / rel, data)
    single = _write(tmp_path / "single.txt", b"single")
    got = expand_inputs([single, root, str(single)])
    rels = [p.relative_to(tmp_path).as_posix() for p in got]
    assert rels == ["single.txt", "corpus/UPPER.TXT", "corpus/a/y.txt", "corpus/a/z.jsonl",
                    "corpus/a.txt", "corpus/b.txt", "corpus/c/d/e.jsonl.gz",
                    "corpus/c/f.jsonl.zst", "single.txt"]
    docs = list(iter_documents([root]))
    assert [d.metadata for d in docs] == [{"source": "UPPER.TXT"}, {"source": "a/y.txt"}, None,
                                          {"source": "a.txt"}, {"source": "b.txt"}, None, None]
    assert docs[1].text == "a/y.txt" and docs[1].source == str(root / "a" / "y.txt")
    assert expand_inputs(str(single)) == [single]  # a single path is accepted
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped and all("skipped 4 file(s)" in m and "'README.md', 'data.json', 'notes.txt.gz'" in m
                           for m in skipped), skipped
    assert count_input_bytes([root]) == sum(p.stat().st_size for p in expand_inputs([root]))


def test_directory_entries_with_an_input_name_that_cannot_be_read_are_refused(tmp_path):
    # A broken link named like an input was skipped in silence: its documents were never built.
    root = tmp_path / "corpus"
    _write(root / "a.jsonl", b'{"text": "t"}\n')
    (root / "b.jsonl").symlink_to(tmp_path / "moved-away.jsonl")
    with pytest.raises(InputNotFoundError, match=r"b\.jsonl: a broken symbolic link .*moved-away\.jsonl.*"
                                                 r"fix the link or remove it"):
        expand_inputs([root])
    (root / "b.jsonl").unlink()
    os.mkfifo(root / "c.txt")
    with pytest.raises(InvalidInputError, match=r"c\.txt: not a regular file"):
        expand_inputs([root])
    (root / "c.txt").unlink()
    (root / "README.md").symlink_to(tmp_path / "nowhere")  # not an input's name: skipped, as any README
    assert expand_inputs([root]) == [root / "a.jsonl"]


def test_jsonl_details(tmp_path):
    path = _jsonl(tmp_path, "d.jsonl",
                  b'\xef\xbb\xbf{"text": "bom line", "meta": null}',  # BOM before line 1
                  "", "   ",  # blank lines are skipped but counted
                  '{"text": "  spaced \\n\\n", "meta": {"k": [1, 2]}, "id": 7}\r')
    with open(path, "ab") as fh:
        fh.write(b'{"text": "no final newline \\u2028 sep"}')
    docs = list(iter_documents([path]))
    assert [(d.text, d.metadata, d.source) for d in docs] == [
        ("bom line", None, f"{path}:1"),
        ("  spaced \n\n", {"k": [1, 2]}, f"{path}:4"),
        ("no final newline \u2028 sep", None, f"{path}:5")]
    other = _jsonl(tmp_path, "other.jsonl", '{"body": "B", "info": {"x": 1}, "meta": 3}')
    (doc,) = iter_documents([other], text_field="body", meta_field="info")
    assert (doc.text, doc.metadata) == ("B", {"x": 1})
    _err(InvalidDocumentError, [other], r"other\.jsonl:1: .*no 'text' field.*--text-field")


def test_long_lines_across_chunks(tmp_path):
    texts = ["x" * 200_000, "é" * 50_000 + "\n", "raw \u2028 \x85 \r kept", "short"]
    raw = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()
    for name, blob in [("l.jsonl", raw), ("l.jsonl.zst", _zst(raw)), ("l.jsonl.gz", gzip.compress(raw))]:
        assert [d.text for d in iter_documents([_write(tmp_path / name, blob)])] == texts


# ---------------------------------------------------------------- errors


def _err(exc_type, inputs, match, **kw):
    with pytest.raises(exc_type, match=match) as info:
        list(iter_documents(inputs, **kw))
    assert isinstance(info.value, RetrostoreError)
    return info.value


def test_path_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InputNotFoundError, match="nope.jsonl: no such file"):
        iter_documents([missing])  # raised on the call, before iterating
    with pytest.raises(FileNotFoundError):
        expand_inputs([missing])
    with pytest.raises(InputNotFoundError):
        count_input_bytes([missing])
    bad = _write(tmp_path / "data.csv", b"a,b\n")
    e = _err(InvalidInputError, [bad], r"data\.csv: unsupported input file type")
    assert all(s in str(e) for s in SUPPORTED_SUFFIXES)
    (tmp_path / "empty").mkdir()
    _err(InvalidInputError, [tmp_path / "empty"], r"empty: directory has no supported input")
    _write(tmp_path / "other" / "x.csv", b"")
    _write(tmp_path / "other" / ".hidden.txt", b"")
    _err(InvalidInputError, [tmp_path / "other"], r"other: directory has no .*'x\.csv'")
    _err(InvalidInputError, [], "no input given")
    _err(InvalidInputError, [bad], "text_field", text_field="")
    _err(InvalidInputError, [bad], "meta_field", text_field="a", meta_field="a")


@pytest.mark.parametrize("line, exc, match", [
    ('{"text": "ok"', InvalidDocumentError, r"invalid JSON \(Expecting .* column"),
    ("not json", InvalidDocumentError, "invalid JSON"),
    ('["text", "a list"]', InvalidDocumentError, "is a JSON array; each line must be one JSON"),
    ('{"content": "x", "id": 1}', InvalidDocumentError,
     r"no 'text' field \(its keys: 'content', 'id'\).*--text-field"),
    ('{"text": null}', InvalidDocumentError, "'text' is a JSON null, not a string.*--text-field"),
    ('{"text": ["a"]}', InvalidDocumentError, "'text' is a JSON array, not a string"),
    ('{"text": "a", "meta": [1]}', InvalidMetadataError,
     "'meta' is a JSON array; it must be an object or null"),
    ('{"text": "a", "meta": "src"}', InvalidMetadataError, "'meta' is a JSON string"),
    (b'{"text": "caf\xe9"}', InvalidDocumentError,
     r"invalid UTF-8 \(invalid continuation byte at byte 14 of the line"),
    ('{"text": "a", "meta": {"n": 1' + "0" * 5000 + "}}", InvalidDocumentError,
     "a number of more than 4,300 digits.*store it as a string"),  # helper-20: a traceback
])
def test_line_errors_name_file_and_line(tmp_path, line, exc, match):
    good = '{"text": "fine", "meta": {"a": 1}}'
    packers = [("bad.jsonl", lambda b: b), ("bad.jsonl.zst", _zst), ("bad.jsonl.gz", gzip.compress)]
    for name, pack in packers:
        raw = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n"
                       for x in [good, "", line, good])
        path = _write(tmp_path / name, pack(raw))
        seen = []
        with pytest.raises(exc, match=match) as info:
            for doc in iter_documents([path]):
                seen.append(doc.text)
        assert seen == ["fine"]
        assert str(info.value).startswith(f"{path}:3: ")


def test_invalid_utf8_line_number_deep_in_file_and_txt(tmp_path):
    lines = [f'{{"text": "{"é" * 3000} {i}"}}' for i in range(40)]
    raw = "\n".join(lines).encode() + b"\n" + b'{"text": "\xff"}\n'
    path = _write(tmp_path / "deep.jsonl.zst", _zst(raw))
    _err(InvalidDocumentError, [path], r"deep\.jsonl\.zst:41: invalid UTF-8 .*at byte 11 of the line.*iconv")
    txt = _write(tmp_path / "latin1.txt", "first\nsecond caf\xe9\n".encode("latin-1"))
    _err(InvalidDocumentError, [txt], r"latin1\.txt:2: invalid UTF-8 .* at byte 11 ")


def test_corrupt_and_truncated_streams(tmp_path, first5):
    raw = b"".join(first5)
    zst, gz = _zst(raw), gzip.compress(raw)
    cases = {
        "trunc.jsonl.zst": zst[: len(zst) // 2],
        "trunc2.jsonl.zst": _zst(raw) + _zst(raw)[:-3],
        "garbage.jsonl.zst": b"this is not zstd at all",
        "tail.jsonl.zst": zst + b"trailing garbage",
        "corrupt.jsonl.zst": zst[:20] + bytes(64) + zst[84:],
        "trunc.jsonl.gz": gz[: len(gz) // 2],
        "garbage.jsonl.gz": b"this is not gzip at all",
        "corrupt.jsonl.gz": gz[:20] + bytes(64) + gz[84:],
    }
    for name, blob in cases.items():
        path = _write(tmp_path / name, blob)
        e = _err(InputReadError, [path], f"{name}: cannot read the file.*truncated, corrupt")
        assert isinstance(e, InvalidInputError)
        assert e.__cause__ is not None
    e = _err(InputReadError, [tmp_path / "trunc2.jsonl.zst"], "after line 5")


def test_errors_surface_only_after_earlier_documents(tmp_path):
    good = _jsonl(tmp_path, "a.jsonl", '{"text": "one"}')
    bad = _write(tmp_path / "b.jsonl.gz", b"\x1f\x8b broken")
    it = iter_documents([good, bad])
    assert next(it).text == "one"
    with pytest.raises(InputReadError, match=r"b\.jsonl\.gz"):
        next(it)


def test_progress_callback_errors_are_not_read_errors(tmp_path, first5):
    path = _write(tmp_path / "p.jsonl.zst", _zst(b"".join(first5)))

    def boom(n: int) -> None:
        raise BrokenPipeError("progress bar gone")

    with pytest.raises(BrokenPipeError):
        list(iter_documents([path], on_progress=boom))
    it = iter_documents([path, path])
    next(it)
    it.close()  # stopping early closes the file without error
