"""`retrostore verify STORE [--json]`: exit status 0 only when every check
holds, and one precise line per problem."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from retrostore.storage import manifest as _manifest
from retrostore.cli import cli

from test_corruption import targeted_positions


@pytest.fixture
def store(built_store, tmp_path):
    path = tmp_path / "s.rstore"
    shutil.copytree(built_store, path)
    return path


def _verify(path, *extra):
    result = CliRunner().invoke(cli, ["verify", str(path), *extra])
    return result.exit_code, result.stdout


def _flip(path, pos):
    b = bytearray(path.read_bytes())
    b[pos] ^= 0xFF
    path.write_bytes(bytes(b))


def test_intact_store(store):
    code, out = _verify(store)
    assert code == 0 and out.strip() == f"ok: {store} version 1 is intact"
    code, out = _verify(store, "--json")
    assert code == 0 and json.loads(out) == {"ok": True, "version": 1, "problems": []}
    code, out = _verify(store, "--retokenize")  # every document cut again: the same chunks
    assert code == 0 and out.strip() == (f"ok: {store} version 1 is intact (every document cut again: token ids "
                                         "and spans match)")


def test_each_problem_is_one_line(store):
    vec = next(p for p in (store / "vectors").iterdir() if not p.name.endswith(".sums.npy"))
    _flip(vec, 200)
    _flip(store / "tokenizer.json", 10)
    code, out = _verify(store)
    lines = out.strip().splitlines()
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith("tokenizer.json: checksum mismatch")
    assert lines[1].startswith(f"vectors/{vec.name}: checksum mismatch")
    code, out = _verify(store, "--json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and doc["version"] == 1 and doc["problems"] == lines


def test_damaged_lmdb_records(store):
    data = store / "chunks.lmdb" / "data.mdb"
    positions = targeted_positions(data.read_bytes())
    value = next(p for p, what in positions.items() if what == "chunks value byte")
    _flip(data, value)
    code, out = _verify(store)
    lines = out.strip().splitlines()
    assert code == 1 and lines and all(x.startswith("chunks.lmdb/data.mdb: ") for x in lines), lines
    assert any("record fails its checksum" in x for x in lines), lines


def test_damaged_lmdb_pointer_is_a_line_not_a_crash(store):
    """A node pointer whose damage makes LMDB read outside the file (SIGBUS in
    the byte-flip sweep) is reported from verify's child process."""
    data = store / "chunks.lmdb" / "data.mdb"
    positions = targeted_positions(data.read_bytes())
    _flip(data, next(p for p, what in positions.items() if what == "chunks leaf node pointer"))
    code, out = _verify(store, "--json")
    doc = json.loads(out)
    assert code == 1 and doc["problems"] and all(p.startswith("chunks.lmdb/data.mdb: ") for p in doc["problems"])


@pytest.mark.parametrize("damage", ["manifest", "index", "lmdb-truncated"])
def test_damage_found_at_open(store, damage):
    if damage == "manifest":
        _flip(store / "manifest.json", 30)
        name = "manifest.json"
    elif damage == "index":
        seg = next((store / "index").iterdir())
        _flip(seg, 100)
        name = f"index/{seg.name}"
    else:
        data = store / "chunks.lmdb" / "data.mdb"
        data.write_bytes(data.read_bytes()[:-4096])
        name = "chunks.lmdb/data.mdb"
    code, out = _verify(store)
    assert code == 1 and len(out.strip().splitlines()) == 1 and out.startswith(f"{name}: "), out
    code, out = _verify(store, "--json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and len(doc["problems"]) == 1 and doc["problems"][0].startswith(name)


def test_path_escaping_the_store(store):
    body = _manifest.read_manifest(store)
    body["vectors"]["files"][0]["path"] = "../../etc/passwd"
    (store / "manifest.json").write_bytes(_manifest.encode_manifest(body))
    code, out = _verify(store)
    assert code == 1 and "escapes the store directory" in out and len(out.strip().splitlines()) == 1


def test_not_a_store(tmp_path):
    code, _ = _verify(tmp_path / "missing")
    assert code == 2  # click: the path does not exist
    result = CliRunner().invoke(cli, ["verify", str(tmp_path)])
    assert result.exit_code == 1 and "not a retrostore store" in result.output


def test_every_damaged_file_is_reported_when_open_fails(store):
    """helper-33: a partial download was revealed one file per run (verify stopped where open
    stopped). Every file the manifest names is checked, and the fix is said once."""
    tok = store / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:100])
    seg = next(p for p in (store / "index").iterdir() if p.suffix == ".faiss")
    _flip(seg, 100)
    result = CliRunner().invoke(cli, ["verify", str(store)])
    lines = result.stdout.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 2, result.stdout
    assert {line.split(":")[0] for line in lines} == {"tokenizer.json", f"index/{seg.name}"}
    assert "copy or download it again" in result.stderr
    doc = json.loads(CliRunner().invoke(cli, ["verify", str(store), "--json"]).stdout)
    assert doc["ok"] is False and len(doc["problems"]) == 2


def test_a_damaged_retained_version_is_a_problem(store):
    """helper-33: a flipped byte in versions/manifest-*.json passed verify ("intact", exit 0) while
    open(version=V) then raised CorruptStoreError."""
    import retrostore

    with retrostore.open(store, mode="a") as st:  # a second version: the first is retained
        st.append(["one more document"])
        st.commit()
    old = store / "versions" / "manifest-000000000001.json"
    _flip(old, 40)
    code, out = _verify(store)
    assert code == 1 and out.startswith("versions/manifest-000000000001.json: ") and "open(version=1) fails" in out, out


def test_a_store_that_lost_its_manifest_says_how_to_get_it_back(store):
    """helper-36: 'not a retrostore store ... create one' for a store whose manifest.json was lost,
    and create then refused the directory: the newest retained copy brings it back."""
    import retrostore

    (store / "manifest.json").unlink()
    with pytest.raises(retrostore.NotAStoreError, match=r"holds a store's files .* the manifest was lost; copy its "
                                                         r"newest retained copy back \(cp .*versions/manifest-0+1\.json"):
        retrostore.open(store)
    newest = sorted((store / "versions").iterdir())[-1]
    shutil.copy(newest, store / "manifest.json")
    assert _verify(store)[0] == 0
