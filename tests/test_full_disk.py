"""A real full disk: a small tmpfs filled up, with a real store on it (helper-37).

LMDB maps its lock file, and a write through a mapping of a file whose blocks cannot be
allocated kills the process with SIGBUS; LMDB reports a short write of ``data.mdb`` as EIO.
Each case runs in a child process, so that a crash is seen as one (its signal) instead of
ending the test run. Needs root (``mount -t tmpfs``); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import retrostore

MIB = 1 << 20


@pytest.fixture
def tmpfs(tmp_path):
    """A 24 MiB tmpfs at ``tmp_path / "disk"``, unmounted at the end."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt, leave: int) -> None:
    """Fill the file system but ``leave`` bytes."""
    st = os.statvfs(mnt)
    with open(mnt / "filler", "wb") as f:
        f.write(bytes(max(0, st.f_bavail * st.f_frsize - leave)))


def _run(code: str) -> dict:
    """Run ``code`` (which prints one JSON line) in a child; its result, or how it died."""
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    if res.returncode < 0:
        return {"signal": -res.returncode, "stderr": res.stderr[-2000:]}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert lines, res.stdout + res.stderr
    return json.loads(lines[-1])


CHILD = """
import json, sys
import numpy as np
import retrostore
def attempt(fn):
    try:
        out = fn()
        print(json.dumps({"ok": True, "out": out}))
    except Exception as exc:
        print(json.dumps({"ok": False, "type": type(exc).__name__, "errno": getattr(exc, "errno", None),
                          "retrostore": isinstance(exc, retrostore.RetrostoreError), "msg": str(exc)}))
"""


def _store(path, small_docs, n_docs: int = 8) -> list[str]:
    rng = np.random.default_rng(0)
    texts = [d["text"] for d in small_docs[:n_docs]]
    with retrostore.create(path) as st:
        n = sum(len(c) for c in st.chunker.chunk_many(texts))
        v = rng.standard_normal((n, 384)).astype(np.float32)
        st.append(texts, embeddings=v / np.linalg.norm(v, axis=1, keepdims=True))
        st.commit()
        st.delete([1])
        st.commit()
    return texts


def test_opening_a_copied_store_on_a_full_disk(tmp_path, tmpfs, small_docs):
    """A store copied without its lock file, opened on a full disk: a StoreIOError naming the lock
    file, not SIGBUS (every open, inspect and verify died so); once space is freed it opens."""
    _store(tmp_path / "s", small_docs)
    shutil.copytree(tmp_path / "s", tmpfs / "s")
    (tmpfs / "s" / "chunks.lmdb" / "lock.mdb").unlink(missing_ok=True)
    _fill(tmpfs, 0)
    out = _run(CHILD + f"attempt(lambda: retrostore.open({str(tmpfs / 's')!r}).version)")
    assert out.get("signal") is None, out
    assert not out["ok"] and out["type"] == "StoreIOError" and out["errno"] == 28, out
    assert "lock.mdb" in out["msg"] and "free space" in out["msg"], out
    (tmpfs / "filler").unlink()
    with retrostore.open(tmpfs / "s") as st:
        assert st.version == 2 and st.verify() == []


@pytest.mark.parametrize("leave", [4 * 1024, 16 * 1024, 64 * 1024, 256 * 1024])
def test_append_and_compact_on_a_nearly_full_disk(tmp_path, tmpfs, small_docs, leave):
    """Appending (LMDB's short write is EIO) and compacting on a nearly full disk: a StoreIOError
    (a RetrostoreError), never a bare lmdb.Error or OSError; the committed version is intact and
    both work once space is freed."""
    path = tmpfs / "s"
    texts = _store(path, small_docs)
    with retrostore.open(path) as st:  # lock.mdb exists from here on
        before = len(st)
    _fill(tmpfs, leave)
    more = [d["text"] for d in small_docs[8:20]] * 4
    out = _run(CHILD + f"""
st = retrostore.open({str(path)!r}, mode="a")
def append_commit():
    n = sum(len(c) for c in st.chunker.chunk_many({more!r}))
    st.append({more!r}, embeddings=np.ones((n, 384), np.float32) / np.sqrt(384))
    return st.commit()
attempt(append_commit)
""")
    assert out.get("signal") is None, out
    assert not out["ok"] or leave > 4096, out  # 4 KiB free: the records cannot be written
    if not out["ok"]:
        assert out["retrostore"] and out["type"] in ("StoreIOError", "CommitError"), out
        assert out["errno"] in (5, 28) and ("free space" in out["msg"] or "full" in out["msg"]), out
    out = _run(CHILD + f"""
st = retrostore.open({str(path)!r}, mode="a")
attempt(lambda: st.compact(progress=False))
""")
    assert out.get("signal") is None, out
    if not out["ok"]:
        assert out["retrostore"] and out["type"] in ("StoreIOError", "CommitError"), out
    (tmpfs / "filler").unlink()
    with retrostore.open(path, mode="a") as st:
        assert st.verify() == []
        assert len(st) >= before
        assert st.get_document(0).text == texts[0]
        st.compact(progress=False)
        assert st.info()["deletes"]["purged_documents"] == 1


def test_unpack_on_a_full_disk_is_a_store_io_error(tmp_path, tmpfs, small_docs):
    """Unpacking onto a full disk: a StoreIOError naming the errno's fix, nothing left behind
    (helper-48: a bare OSError, "[Errno 28] No space left on device", no file, no fix)."""
    _store(tmp_path / "s", small_docs)
    with retrostore.open(tmp_path / "s", mode="a") as st:
        st.compact()  # (purges the deleted document: pack refuses to ship it)
    retrostore.pack(tmp_path / "s", tmp_path / "a.tar")
    _fill(tmpfs, 64 * 1024)
    out = _run(CHILD + f"attempt(lambda: str(retrostore.unpack({str(tmp_path / 'a.tar')!r}, "
                       f"{str(tmpfs / 'u')!r}).path))")
    assert out.get("signal") is None, out
    assert not out["ok"] and out["type"] == "StoreIOError" and out["retrostore"] and out["errno"] == 28, out
    assert "free space and unpack again" in out["msg"] and "Nothing was left" in out["msg"], out
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler"]
    (tmpfs / "filler").unlink()
    with retrostore.open(retrostore.unpack(tmp_path / "a.tar", tmpfs / "u").path) as st:
        assert st.verify() == []
