"""Documentation: references cover every public name and command, and the quick start runs."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import retrostore

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _gen():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_api_reference_is_current_and_complete():
    gen = _gen()
    text = (DOCS / "api.md").read_text()
    assert text == gen.api_markdown(), "docs/api.md is stale: run python docs/gen_reference.py"
    for name in retrostore.__all__:
        if name == "__version__":
            continue
        assert f"## {name}" in text or f"`{name}`" in text, name


def test_cli_reference_is_current_and_complete():
    gen = _gen()
    text = (DOCS / "cli.md").read_text()
    assert text == gen.cli_markdown(), "docs/cli.md is stale: run python docs/gen_reference.py"
    cli = gen._cli_group()
    for name, cmd in cli.commands.items():
        assert f"## retrostore {name}" in text
        assert cmd.help, f"command {name} has no help text"
        for param in cmd.params:
            if param.param_type_name == "option":
                assert param.help, f"{name} {param.opts} has no help text"
                assert param.opts[0] in text


def test_every_public_name_has_a_docstring():
    gen = _gen()
    for name in retrostore.__all__:
        obj = getattr(retrostore, name)
        if callable(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"
            if inspect.isclass(obj) and not issubclass(obj, BaseException):
                for attr, member in gen.class_members(obj).items():
                    if attr.startswith("_"):
                        continue
                    target = member.fget if isinstance(member, property) else member
                    if callable(target):
                        assert inspect.getdoc(target), f"{name}.{attr} has no docstring"


def test_architecture_names_the_module_of_every_public_method():
    """docs/architecture.md: every public name and Store method has a row naming the module and
    the function or class that implements it, and that implementation is there."""
    import ast

    text = (DOCS / "architecture.md").read_text()
    rows = re.findall(r"^\| (`[^|]+`(?:[^|]*)) \| `(retrostore/[\w/]+\.py)` \| `([\w.]+)` \|$", text, flags=re.M)
    assert rows, "no implementation table in docs/architecture.md"
    named = {n.strip("`").removeprefix("retrostore.") for first, _, _ in rows for n in re.findall(r"`[^`]+`", first)}
    gen = _gen()
    errors = {n for n in retrostore.__all__ if isinstance(getattr(retrostore, n), type)
              and issubclass(getattr(retrostore, n), BaseException)}
    for name in retrostore.__all__:
        if name not in ("__version__",) and name not in errors - {"RetrostoreError"}:
            assert name in named, f"{name} has no row in docs/architecture.md"
    for attr, member in gen.class_members(retrostore.Store).items():
        if not attr.startswith("_") and (callable(member) or isinstance(member, property)):
            assert f"Store.{attr}" in named, f"Store.{attr} has no row in docs/architecture.md"
    for _, module, impl in rows:
        tree = ast.parse((ROOT / module).read_text())
        defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        owner, _, member = impl.partition(".")
        assert owner in defs, f"{module} defines no {owner}"
        if member:
            assert member in {n.name for n in defs[owner].body if isinstance(n, ast.FunctionDef)}, \
                f"{module}: {owner} has no {member}"


def test_docs_pages_exist():
    for page in ("quickstart", "concepts", "api", "cli", "format", "architecture"):
        assert (DOCS / f"{page}.md").stat().st_size > 500, page


def _blocks(markdown: str):
    return re.findall(r"```(bash|python)\n(.*?)```", markdown, flags=re.S)


def test_quickstart_code_blocks_run(tmp_path, monkeypatch):
    """Every `retrostore ...` shell line and every Python block of the quick start, in order."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    ran_shell = ran_python = 0
    env = dict(os.environ)
    for lang, code in _blocks((DOCS / "quickstart.md").read_text()):
        if lang == "bash":
            for line in code.splitlines():
                line = line.split("#")[0].strip()
                if not line.startswith("retrostore "):
                    continue  # venv and pip lines: the test environment is the install
                argv = [sys.executable, "-m", "retrostore", *shlex.split(line)[1:]]
                res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
                assert res.returncode == 0, f"{line}\n{res.stdout}\n{res.stderr}"
                ran_shell += 1
        else:
            exec(compile(code, "quickstart.md", "exec"), {"__name__": "__quickstart__"})
            ran_python += 1
    assert ran_shell >= 5 and ran_python >= 3


@pytest.mark.parametrize("page", ["README.md"])
def test_readme_first_screen_has_the_two_commands(page):
    head = "\n".join((ROOT / page).read_text().splitlines()[:25])
    assert "retrostore build demo.rstore examples/pydocs-sample.jsonl.zst" in head
    assert "pytest" in head
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pytest -q" in ci and 'pip install' in ci


def test_one_command_runs_every_benchmark():
    """DESIGN.md: one command runs the benchmarks (README). Every script in benchmarks/ is in
    ``run_all.py``'s suite or named there as needing an argument, and its short-run options exist."""
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = run_all  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(run_all)
    finally:
        del sys.modules["run_all"]
    helpers = {"run_all", "peers_data", "peers_report", "peers_systems", "peers_worker", "scale_data"}
    needing_an_argument = {"recall", "revisions"}
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_")} - helpers
    suite = {b.name for b in run_all.SUITE}
    assert scripts - needing_an_argument == suite, scripts ^ suite
    assert all(f"``{n}.py" in run_all.__doc__ for n in needing_an_argument)
    for b in run_all.SUITE:
        source = (ROOT / "benchmarks" / f"{b.name}.py").read_text()
        for arg in b.short + (b.record or []):
            if arg.startswith("--"):
                assert f'"{arg}"' in source, f"{b.name}.py has no option {arg}"
    assert "python benchmarks/run_all.py" in (ROOT / "README.md").read_text()
