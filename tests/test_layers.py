"""The package layout: imports run one way, lowest layer first (docs/architecture.md).

Parsed from the source, so the rule holds without anyone policing it:

* a module imports only from its own subpackage or from layers listed before
  it in :data:`LAYERS` (never upward, never sideways into another subpackage
  of the same rank);
* no module of the package imports anything inside a function, except the
  optional dependencies in :data:`LAZY_OK` (imported where they are used, so
  that the package works without them);
* the package's modules have no import cycle at all;
* the click front end (``cli/``) imports only the public API;
* every subpackage is listed in ``pyproject.toml`` (a plain ``pip install``
  would leave it out otherwise).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "retrostore"

#: The layers, lowest first. A module of layer i may import layers 0..i-1 and its own subpackage.
LAYERS = [
    {"errors", "types"},
    {"storage", "threads"},
    {"text"},
    {"index"},
    {"store"},
    {"retro"},
    {"ship"},
    {"build"},
    {"serve"},
    {"__init__"},  # the public API: retrostore.__all__
    {"cli"},       # the click front end (cli/, installed as retrostore.cli)
    {"__main__"},  # python -m retrostore
]
#: Optional dependencies a module may import inside the function that needs them.
#: (urllib: the client's proxy lookup, whose import costs `import retrostore` ~9 ms. onnxruntime, a
#: required dependency: once imported, a forked child that exits normally hangs; see text/embed.py _ort.)
LAZY_OK = {"ray", "torch", "retro_pytorch", "uvicorn", "starlette", "httpx", "urllib3", "urllib", "playwright",
           "onnxruntime"}
#: What the CLI may import from the package: the public API.
CLI_OK = {"retrostore", "retrostore.errors", "retrostore.build", "retrostore.retro", "retrostore.serve"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1 and parts[:-1] != ["retrostore"]:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _unit(module: str) -> str:
    """The layer unit of a module: its top-level subpackage or module under retrostore."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _rank(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"retrostore.{unit} is in no layer: add it to LAYERS and docs/architecture.md")


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The absolute module names an ``ImportFrom`` pulls in."""
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if not base.startswith("retrostore"):
        return [base]
    mods = _modules()
    # "from . import x" / "from .store import create" may name submodules
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]


def _imports(module: str, path: Path, *, top_only: bool) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of a module."""
    tree = ast.parse(path.read_text())
    inside: set[int] = set()
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(f) if n is not f)
    out = []
    for node in ast.walk(tree):
        nested = id(node) in inside
        if top_only and nested:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, nested) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += [(m, node.lineno, nested) for m in _resolve(module, path, node)]
    return out


def test_every_module_is_in_a_layer_and_imports_only_below():
    bad = []
    for module, path in _modules().items():
        rank, unit = _rank(_unit(module)), _unit(module)
        for target, line, _ in _imports(module, path, top_only=False):
            if not target.startswith("retrostore.") or target == module:
                continue
            t_unit = _unit(target)
            if t_unit == unit and unit not in ("errors", "types"):
                continue
            if _rank(t_unit) >= rank:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} "
                           f"(layer {_rank(t_unit)}, not below {unit}'s {rank})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_imports_inside_functions_but_optional_dependencies():
    bad = []
    for module, path in _modules().items():
        for target, line, nested in _imports(module, path, top_only=False):
            if nested and target.split(".")[0] not in LAZY_OK:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    assert not bad, "move these imports to the top of the module:\n" + "\n".join(bad)


def test_no_import_cycles():
    mods = _modules()
    graph = {m: {t for t, _, _ in _imports(m, p, top_only=True) if t in mods and t != m} for m, p in mods.items()}
    # a package's __init__ is imported before its modules: an edge module -> its own package is no cycle
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_cli_uses_the_public_api_only():
    bad = []
    for path in sorted((ROOT / "cli").rglob("*.py")):
        for target, line, _ in _imports("cli", path, top_only=False):
            if target.startswith("retrostore") and target not in CLI_OK:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "the CLI calls the public API only:\n" + "\n".join(bad)


def test_every_subpackage_is_installed():
    text = (ROOT / "pyproject.toml").read_text()  # tomllib is 3.11+; requires-python admits 3.10
    block = re.search(r"^packages = \[(.*?)\]", text, flags=re.S | re.M).group(1)
    listed = set(re.findall(r'"([\w.]+)"', block))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in PKG.rglob("__init__.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_the_layering_test_sees_a_violation():
    """The checks themselves: an upward import at the top and one inside a function are both seen."""
    src = "from ..store.store import Store\n\n\ndef f():\n    from ..index import policy\n"
    path = PKG / "storage" / "example.py"
    found = [(t, nested) for t, _, nested in _imports_of_source("retrostore.storage.example", path, src)]
    assert found == [("retrostore.store.store", False), ("retrostore.index.policy", True)]
    assert all(_rank(_unit(t)) > _rank("storage") for t, _ in found)


def _imports_of_source(module: str, path: Path, src: str) -> list[tuple[str, int, bool]]:
    tree = ast.parse(src)
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f) if n is not f}
    return [(m, node.lineno, id(node) in inside) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            for m in _resolve(module, path, node)]


def test_no_source_file_is_ignored_by_git():
    """A .gitignore pattern must never hide a module (``build/`` once hid retrostore/build/'s new files)."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--others", "--ignored", "--exclude-standard",
                          "retrostore", "cli", "tests", "docs", "benchmarks", "examples"],
                         capture_output=True, text=True, check=True).stdout.split()
    hidden = [p for p in out if not any(part.startswith((".", "__pycache__")) for part in p.split("/"))
              and not p.endswith(".pyc")]  # caches of tools (.ruff_cache, __pycache__) are ignored on purpose
    assert not hidden, f"ignored by .gitignore, so never committed: {hidden}"
