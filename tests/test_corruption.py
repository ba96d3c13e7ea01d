"""Corruption of real store files: truncation and flipped bytes.

Each damaged file must give CorruptStoreError naming it (from open where a
cheap check can tell, else from verify), never a crash and never silently
wrong results. LMDB damage is applied and examined in a child process (the
``lmdb_sweep`` worker): a crash there is reported as a test failure naming
the byte position, not as a dead test run.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections import Counter
from pathlib import Path

import faiss
import numpy as np
import pytest

import retrostore
from retrostore import CorruptStoreError
from retrostore.storage import layout as _layout
from retrostore.storage import manifest as _manifest
from retrostore.storage import vectors as _vectors

import _workers


@pytest.fixture
def store(built_store, tmp_path) -> Path:
    path = tmp_path / "s.rstore"
    shutil.copytree(built_store, path)
    return path


def _flip(path: Path, pos: int, xor: int = 0xFF) -> bytes:
    raw = path.read_bytes()
    b = bytearray(raw)
    b[pos] ^= xor
    path.write_bytes(bytes(b))
    return raw


def _open_error(path: Path) -> str:
    with pytest.raises(CorruptStoreError) as info:
        retrostore.open(path).close()
    return str(info.value)


# -- manifest -------------------------------------------------------------
def test_manifest_every_flipped_byte_is_refused(store):
    """Every byte, flipped in its lowest bit and (every 7th) in all bits, is
    refused by the manifest reader open() calls first; every 25th through open()."""
    mpath = store / "manifest.json"
    raw = mpath.read_bytes()
    for pos in range(len(raw)):
        for xor in ((0x01, 0xFF) if pos % 7 == 0 else (0x01,)):
            b = bytearray(raw)
            b[pos] ^= xor
            with pytest.raises(CorruptStoreError, match="^manifest.json: "):
                _manifest.parse_manifest(bytes(b), "manifest.json")
            if pos % 25 == 0:
                mpath.write_bytes(bytes(b))
                assert _open_error(store).startswith("manifest.json: "), (pos, xor)
    mpath.write_bytes(raw)
    with retrostore.open(store) as st:
        assert st.verify() == []


@pytest.mark.parametrize("raw,kind", [(b"[]\n", "an array"), (b"42\n", "a number"), (b'"manifest"\n', "a string"),
                                      (b"null\n", "null"), (b"[{}]", "an array")])
def test_manifest_of_another_json_type_is_named(store, raw, kind):
    """A manifest replaced by JSON that is not an object is refused as such, not called truncated."""
    (store / "manifest.json").write_bytes(raw)
    msg = _open_error(store)
    assert msg.startswith(f"manifest.json: manifest is {kind} in JSON, not an object"), msg


@pytest.mark.parametrize("raw", [b"1" + b"0" * 5000, b"[1" + b"0" * 5000 + b"]\n", b"[" * 100_000, b"{" * 100_000,
                                 b'{"body": {"a": 1' + b"0" * 5000 + b'}, "sha256": "x"}\n'])
def test_manifest_json_python_cannot_read_is_damage(store, raw):
    """helper-20: a number of more than 4,300 digits or JSON nested 100,000 deep made open() raise a bare
    ValueError / RecursionError (and the CLI print a traceback): it is a damaged manifest."""
    (store / "manifest.json").write_bytes(raw)
    assert _open_error(store).startswith("manifest.json: manifest is ")


def test_manifest_truncation_is_refused(store):
    mpath = store / "manifest.json"
    raw = mpath.read_bytes()
    for n in (0, 1, 10, len(raw) // 2, len(raw) - 2, len(raw) - 1):
        mpath.write_bytes(raw[:n])
        msg = _open_error(store)
        assert msg.startswith("manifest.json:"), msg
    version_copy = _layout.version_path(store, 1)
    version_copy.write_bytes(raw[:-5])
    mpath.write_bytes(raw)
    with pytest.raises(CorruptStoreError, match="versions/manifest-000000000001.json"):
        retrostore.open(store, version=1)


# -- index segments -----------------------------------------------------------
def test_index_file_damage_is_caught_before_faiss_reads_it(store, monkeypatch):
    seg = next((store / "index").iterdir())
    rel = f"index/{seg.name}"
    raw = seg.read_bytes()
    calls = []
    real = faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda *a: calls.append(a[0]) or real(*a))
    for n in (0, 10, len(raw) // 2, len(raw) - 1):
        seg.write_bytes(raw[:n])
        msg = _open_error(store)
        assert msg.startswith(rel) and "bytes" in msg, msg
    step = max(1, len(raw) // 40)
    for pos in list(range(0, 48)) + list(range(48, len(raw), step)):
        b = bytearray(raw)
        b[pos] ^= 0xFF
        seg.write_bytes(bytes(b))
        msg = _open_error(store)
        assert msg.startswith(rel) and "checksum" in msg, (pos, msg)
    assert calls == []  # FAISS never saw a damaged file
    seg.write_bytes(raw)
    with retrostore.open(store) as st:
        assert len(calls) == 1 and st.verify() == []


# -- raw vectors ------------------------------------------------------------
def test_vectors_file_damage(store):
    vec = next(p for p in (store / "vectors").iterdir() if not p.name.endswith(".sums.npy"))
    rel = f"vectors/{vec.name}"
    raw = vec.read_bytes()
    for n in (0, 64, len(raw) - 1):
        vec.write_bytes(raw[:n])
        msg = _open_error(store)
        assert msg.startswith(rel), msg  # open's cheap size check
    for pos in (0, 8, 70, len(raw) // 2, len(raw) - 1):
        b = bytearray(raw)
        b[pos] ^= 0xFF
        vec.write_bytes(bytes(b))
        with retrostore.open(store) as st:  # a flipped byte keeps the size: verify finds it
            problems = st.verify()
            assert len(problems) == 1 and problems[0].startswith(rel) and "checksum" in problems[0], problems
            entry = st.manifest["vectors"]["files"][0]
            with pytest.raises(CorruptStoreError, match="checksum"):
                _vectors.load_vectors(store, entry, verify=True)  # how stored vectors are read
    vec.write_bytes(raw)


def test_damaged_raw_vectors_are_refused_before_reranking(tmp_path):
    """Same size, damaged bytes: re-ranking, eval and reindex refuse the file (they returned NaN
    scores, or trained on zeros, before); a header flip is a CorruptStoreError, not a TokenError."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    path = tmp_path / "s.rstore"
    with retrostore.create(path, index="IVF4,PQ8x4") as st:
        st.append([f"d{i}" for i in range(1000)], embeddings=x)
        st.commit()
    vec = next(p for p in (path / "vectors").iterdir() if not p.name.endswith(".sums.npy"))
    raw = vec.read_bytes()
    for pos, span in ((300, 200), (20, 1)):  # data bytes zeroed; a header byte flipped
        b = bytearray(raw)
        b[pos:pos + span] = bytes(v ^ 0xFF for v in b[pos:pos + span]) if span == 1 else b"\0" * span
        vec.write_bytes(bytes(b))
        with retrostore.open(path, mode="a") as st:
            for call in (lambda: st.search_vectors(x[:2], k=3), lambda: st.evaluate(queries=10),
                         lambda: st.reindex("IVF4,Flat", progress=False)):
                with pytest.raises(CorruptStoreError, match=f"vectors/{vec.name}"):
                    call()
    # A header that still parses but reads the intact rows wrongly (byte order, Fortran order, a
    # narrower shape): the block checksums cover rows only, so these served NaN scores before.
    for old, new in ((b"'<f2'", b"'>f2'"), (b"False", b"True "), (b"(1000, 384)", b"(1000, 383)")):
        assert old in raw[:128]
        vec.write_bytes(raw.replace(old, new, 1))
        with retrostore.open(path) as st:
            with pytest.raises(CorruptStoreError, match=f"vectors/{vec.name}: .*(header|dimensions)"):
                st.search_vectors(x[:2], k=3)
    # helper-22: a header length cut into its padding still parses and shifts every row; a store
    # without block checksums, opened with mmap=True, served those rows. The map must end at the file's end.
    hlen = int.from_bytes(raw[8:10], "little")
    vec.write_bytes(raw[:8] + (hlen - 2).to_bytes(2, "little") + raw[10:])
    entry = json.loads((path / "manifest.json").read_text())["body"]["vectors"]["files"][0]
    with pytest.raises(CorruptStoreError, match="header is damaged .*describes"):
        _vectors.load_vectors(path, entry)
    vec.write_bytes(raw)
    with retrostore.open(path) as st:
        assert st.verify() == [] and st.search_vectors(x[:2], k=1)[1][:, 0].tolist() == [0, 1]


def test_tokenizer_damage(store, embedder):
    _flip(store / "tokenizer.json", 100)
    with retrostore.open(store, embedder=embedder) as st:
        problems = st.verify()
        assert len(problems) == 1 and problems[0].startswith("tokenizer.json"), problems
        with pytest.raises(CorruptStoreError, match="tokenizer.json"):
            st.chunker  # the store's own tokenizer is checked before use


def test_paths_escaping_the_store_are_refused(store, tmp_path):
    raw = json.loads((store / "manifest.json").read_text())
    body = raw["body"]
    outside = tmp_path / "outside.faiss"
    shutil.copy(store / body["index"]["segments"][0]["path"], outside)
    for bad in ("../outside.faiss", str(outside), "index/../../outside.faiss"):
        b = json.loads(json.dumps(body))
        b["index"]["segments"][0]["path"] = bad
        (store / "manifest.json").write_bytes(_manifest.encode_manifest(b))
        assert "escapes the store directory" in _open_error(store)
    os.symlink(outside, store / "index" / "link.faiss")
    b = json.loads(json.dumps(body))
    b["index"]["segments"][0]["path"] = "index/link.faiss"
    (store / "manifest.json").write_bytes(_manifest.encode_manifest(b))
    assert "resolves outside the store" in _open_error(store)


# -- LMDB -------------------------------------------------------------------
def _u16(b, o):
    return struct.unpack_from("<H", b, o)[0]


def _u64(b, o):
    return struct.unpack_from("<Q", b, o)[0]


def lmdb_layout(data: bytes) -> dict:
    """Page numbers of an LMDB 0.9 file by role: the current and older meta
    page, the main root, and each named table's branch and leaf pages."""
    psize = struct.unpack_from("<I", data, 40)[0]
    metas = sorted(((_u64(data, off + 144), off // psize) for off in (0, psize)), reverse=True)
    cur = metas[0][1] * psize
    out = {"psize": psize, "meta": metas[0][1], "old_meta": metas[1][1], "main": _u64(data, cur + 128),
           "need": (_u64(data, cur + 136) + 1) * psize}

    def nodes(pgno):
        page = data[pgno * psize : (pgno + 1) * psize]
        for i in range((_u16(page, 12) - 16) // 2):
            ptr = _u16(page, 16 + 2 * i)
            lo, hi, flags, ksize = struct.unpack_from("<HHHH", page, ptr)
            yield ptr, lo | hi << 16 | flags << 32, flags, page[ptr + 8 : ptr + 8 + ksize], ptr + 8 + ksize

    def walk(pgno, name):
        flags = _u16(data, pgno * psize + 10)
        if flags & 0x01:
            out.setdefault(f"{name}_branch", []).append(pgno)
            for _ptr, child, *_ in nodes(pgno):
                walk(child, name)
        else:
            out.setdefault(f"{name}_leaf", []).append(pgno)

    for _ptr, _x, flags, key, dpos in nodes(out["main"]):
        if flags & 0x02:  # F_SUBDATA: a named table's MDB_db record
            walk(_u64(data, out["main"] * psize + dpos + 40), key.decode())
    return out


def targeted_positions(data: bytes) -> dict[int, str]:
    """Byte positions with known roles: meta fields, page headers, node
    pointers and sizes (where LMDB can read outside the file), keys, values."""
    lay = lmdb_layout(data)
    ps = lay["psize"]
    pos = {}
    meta, old = lay["meta"] * ps, lay["old_meta"] * ps
    for off, what in ((16, "magic"), (40, "page size"), (128, "main root"), (136, "last page")):
        pos[meta + off] = f"meta {what}"
    pos[old + 151] = "older meta txnid (LMDB then reads the older snapshot)"
    main = lay["main"] * ps
    pos[main + 10], pos[main + 17] = "main root flags", "main root node pointer"
    for table in ("chunks", "docs", "commits"):
        p = lay[f"{table}_leaf"][0] * ps
        ptr = _u16(data, p + 16)
        ksize = _u16(data, p + ptr + 6)
        pos.update({p + 10: f"{table} leaf flags", p + 12: f"{table} leaf lower", p + 17: f"{table} leaf node pointer",
                    p + ptr + 1: f"{table} node data size", p + ptr + 3: f"{table} node data size (high)",
                    p + ptr + 8 + ksize - 1: f"{table} key byte", p + ptr + 8 + ksize + 5: f"{table} value byte"})
    if lay.get("chunks_branch"):
        p = lay["chunks_branch"][0] * ps
        ptr = _u16(data, p + 16 + 2)
        ksize = _u16(data, p + ptr + 6)
        pos.update({p + 10: "chunks branch flags", p + 19: "chunks branch node pointer",
                    p + ptr: "chunks branch child page",
                    p + ptr + 8 + ksize - 1: "chunks branch separator key (lookups go astray, iteration does not)"})
    return pos


def run_lmdb_sweep(workers, store: Path, positions: list[int], xor: int, isolate: bool, timeout_s: float) -> dict:
    """Run the sweep worker over ``positions``, restarting it after a crash.

    Returns {position: outcome}; a crash is recorded as ``CRASH:<phase>:<exitcode>``.
    """
    data = store / "chunks.lmdb" / "data.mdb"
    original = store.parent / "data.mdb.orig"
    shutil.copy(data, original)
    results: dict[int, str] = {}
    todo = list(positions)
    run = 0
    while todo:
        out = store.parent / f"sweep-{run}.txt"
        run += 1
        proc = workers.Process(target=_workers.lmdb_sweep,
                               args=(str(store), str(original), todo, xor, isolate, str(out)))
        proc.start()
        proc.join(timeout_s)
        if proc.is_alive():
            proc.kill()
            proc.join()
        phase = None
        for line in (out.read_text().splitlines() if out.exists() else []):
            kind, p, rest = line.split(" ", 2)
            if kind == "P":
                phase = (int(p), rest)
            else:
                results[int(p)] = rest
                phase = None
        if phase is not None:
            results[phase[0]] = f"CRASH:{phase[1]}:{proc.exitcode}"
        done = set(results)
        if proc.exitcode == 0 and not phase:
            todo = [p for p in todo if p not in done]
            assert not todo, f"the sweep skipped positions {todo[:10]}"
            break
        if not done & set(todo):
            raise AssertionError(f"the sweep worker died before its first position ({proc.exitcode})")
        todo = [p for p in todo if p not in done]
    shutil.copy(original, data)
    return results


def test_lmdb_truncation_is_refused_at_open(store):
    data = store / "chunks.lmdb" / "data.mdb"
    raw = data.read_bytes()
    lay = lmdb_layout(raw)
    assert len(raw) == lay["need"]
    for n in sorted({0, 100, lay["psize"], 2 * lay["psize"], len(raw) // 2, len(raw) - lay["psize"], len(raw) - 1}):
        data.write_bytes(raw[:n])
        msg = _open_error(store)
        assert msg.startswith("chunks.lmdb/data.mdb:"), (n, msg)
    data.write_bytes(raw)


def test_lmdb_flipped_bytes_never_crash_or_mislead(store, workers):
    """Flipped bytes at the roles that matter: every outcome is a refusal at
    open, a problem from verify (in its child process, so even LMDB's crash on
    a damaged node pointer is a line), or an intact store; never a crash of
    the caller, never different results with a clean verify, and never a read
    refused after a clean verify."""
    positions = targeted_positions((store / "chunks.lmdb" / "data.mdb").read_bytes())
    results = run_lmdb_sweep(workers, store, sorted(positions), 0xFF, isolate=True, timeout_s=300)
    bad = {f"{p} ({positions[p]})": r for p, r in results.items() if r not in ("open", "verify", "intact")}
    assert bad == {}  # not even "read": whatever a read would refuse, verify finds first
    seen = Counter(results.values())
    assert seen["open"] >= 4 and seen["verify"] >= 6, seen
    with retrostore.open(store) as st:
        assert st.verify() == []


@pytest.mark.slow
def test_lmdb_byte_sweep(store, workers):
    """Every byte of each page's header and node-pointer area and every 3rd
    byte elsewhere, flipped: LMDB scanned in the sweep process itself (so a
    crash there shows where verify's child would have died); such positions
    are then re-checked with the real, isolated Store.verify()."""
    data = store / "chunks.lmdb" / "data.mdb"
    raw = data.read_bytes()
    ps = lmdb_layout(raw)["psize"]
    positions = [p for p in range(len(raw)) if p % ps < 64 or p % 3 == 0]
    t0 = time.perf_counter()
    results = run_lmdb_sweep(workers, store, positions, 0xFF, isolate=False, timeout_s=3600)
    crashed_in_scan = sorted(p for p, r in results.items() if r.startswith("CRASH:verify"))
    for p in crashed_in_scan:
        _flip(data, p)
        try:
            with retrostore.open(store) as st:
                problems = st.verify()
        finally:
            data.write_bytes(raw)
        assert problems and all(x.startswith("chunks.lmdb/data.mdb:") for x in problems), (p, problems)
        results[p] = "verify (crash in child)"
    summary = dict(Counter(r.split(":")[0] if r.startswith("OTHER") else r for r in results.values()),
                   positions=len(positions), file_bytes=len(raw), seconds=round(time.perf_counter() - t0, 1))
    print("\nLMDB byte sweep:", json.dumps(summary))
    if os.environ.get("RETROSTORE_SWEEP_REPORT"):
        Path(os.environ["RETROSTORE_SWEEP_REPORT"]).write_text(json.dumps(summary, indent=1) + "\n")
    bad = {p: r for p, r in results.items() if r not in ("open", "verify", "intact", "read", "verify (crash in child)")}
    assert bad == {}
    assert summary.get("intact", 0) > len(positions) // 10  # free space and unused bytes: the sweep is real


def test_resigned_manifest_with_huge_counters_is_refused(store):
    """A hostile (validly checksummed) manifest with ids beyond int64: CorruptStoreError, not OverflowError."""
    m = _manifest.read_manifest(store)
    for key in ("next_chunk_id", "next_doc_id", "version"):
        body = dict(m, **{key: 10**30})
        _manifest.write_manifest(store, body)
        assert _open_error(store).startswith("manifest.json: manifest field " + repr(key))
    _manifest.write_manifest(store, m)
    with retrostore.open(store) as st:
        hostile = store / "versions" / f"manifest-{10**30:012d}.json"  # (write_manifest kept a copy of each)
        assert [p for p in st.verify() if p.startswith(f"versions/{hostile.name}: manifest field 'version'")]
        hostile.unlink()
        assert st.verify() == []


def test_files_the_os_refuses_to_read_name_the_file_and_the_fix(store, monkeypatch):
    """helper-33 (a store downloaded with lost permissions, read by a user without them): open and
    verify ended in a bare PermissionError traceback for the manifest, an index segment and
    data.mdb. Each is a CorruptStoreError naming the file and the fix. (The OS refusal is
    simulated: tests may run as root, whom permission bits do not stop.)"""
    import builtins

    from retrostore.storage import lmdbfile, segments

    def refuse(name):
        real = builtins.open

        def fake_open(file, *args, **kwargs):
            if os.fspath(file).endswith(name):
                raise PermissionError(13, "Permission denied", os.fspath(file))
            return real(file, *args, **kwargs)
        return fake_open

    fix = r"cannot be read \(Permission denied\); give the user running this read access"
    with monkeypatch.context() as m:  # the manifest (Path.read_bytes opens it with io.open)
        m.setattr("io.open", refuse("manifest.json"))
        with pytest.raises(CorruptStoreError, match="manifest.json: " + fix):
            retrostore.open(store)
    with monkeypatch.context() as m:
        m.setattr(segments, "sha256_file", lambda p: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
        with pytest.raises(CorruptStoreError, match=r"index/seg-\d+\.faiss: " + fix):
            retrostore.open(store)
    with monkeypatch.context() as m:
        m.setattr(lmdbfile, "open", refuse("data.mdb"), raising=False)
        with pytest.raises(CorruptStoreError, match="data.mdb: " + fix):
            retrostore.open(store)
    retrostore.open(store).close()  # and the store itself is fine
