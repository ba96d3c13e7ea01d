"""Generate docs/api.md and docs/cli.md from the docstrings and click help.

Run after changing a public name, docstring, command or option:

    python docs/gen_reference.py

tests/test_docs.py fails when the committed files differ from what this
script writes, so the references never fall behind the code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import click

import retrostore

DOCS = Path(__file__).resolve().parent


def _cli_group():
    try:
        from retrostore.cli import cli
    except ModuleNotFoundError:  # source checkout without install

        spec = importlib.util.spec_from_file_location("retrostore.cli", DOCS.parent / "cli" / "__init__.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["retrostore.cli"] = mod
        spec.loader.exec_module(mod)
        cli = mod.cli
    return cli


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def class_members(cls: type) -> dict:
    """Attributes defined by ``cls`` and its retrostore base classes (Store's mixins), as
    ``vars`` would give them if everything were defined on ``cls``."""
    out: dict = {}
    for base in reversed(cls.__mro__):
        if base.__module__.startswith("retrostore"):
            out.update(vars(base))
    return out


#: Subpackages with public names of their own, listed after ``retrostore.__all__``.
SUBPACKAGES = ("retrostore.build", "retrostore.retro", "retrostore.serve")


def _entry(name: str, obj, level: str = "##") -> list[str]:
    """The reference entry of one public name: signature and docstring (a class's public methods too)."""
    short = name.rsplit(".", 1)[-1]
    out = [f"{level} {name}", ""]
    if inspect.isclass(obj):
        out += ["```python", f"class {short}{_signature(obj)}", "```", "", _doc(obj), ""]
        for attr, member in sorted(class_members(obj).items()):
            if attr.startswith("_") or not (callable(member) or isinstance(member, property)):
                continue
            target = member.fget if isinstance(member, property) else member
            if not target.__doc__:
                continue
            kind = "property" if isinstance(member, property) else "method"
            sig = "" if kind == "property" else _signature(member)
            out += [f"{level}# {name}.{attr}", "", "```python", f"{attr}{sig}", "```", "", _doc(target), ""]
    elif callable(obj):
        out += ["```python", f"{short}{_signature(obj)}", "```", "", _doc(obj), ""]
    else:
        out += ["```python", f"{short} = {obj!r}", "```", ""]
    return out


def _subpackage_markdown(modname: str) -> list[str]:
    mod = importlib.import_module(modname)
    out = [f"## {modname}", "", _doc(mod), ""]
    for name in mod.__all__:
        obj = getattr(mod, name)
        if getattr(retrostore, name, None) is obj:
            out += [f"`{modname}.{name}` is [`retrostore.{name}`](#{name.lower()}).", ""]
            continue
        out += _entry(f"{modname}.{name}", obj, "###")
    return out


def api_markdown() -> str:
    out = [
        "# Python API reference",
        "",
        "Generated from the docstrings by `python docs/gen_reference.py`; every name in",
        "`retrostore.__all__` is listed here, then those of the subpackages "
        + ", ".join(f"`{m}`" for m in SUBPACKAGES) + ".",
        "Shapes, dtypes, units and errors are in each entry.",
        "",
    ]
    names = [n for n in retrostore.__all__ if n != "__version__"]
    errors = [n for n in names if isinstance(getattr(retrostore, n), type)
              and issubclass(getattr(retrostore, n), BaseException)]
    others = [n for n in names if n not in errors]
    out += ["## Contents", ""]
    out += [f"- [`{n}`](#{n.lower()})" for n in others]
    out += ["- [Errors](#errors)"]
    out += [f"- [`{m}`](#{m.replace('.', '')})" for m in SUBPACKAGES] + [""]
    for name in others:
        out += _entry(name, getattr(retrostore, name))
    out += ["## Errors", "", "Every public failure raises a subclass of `RetrostoreError`; where a built-in",
            "exception has the same meaning the class inherits it too.", "",
            "| error | also a | raised when |", "| --- | --- | --- |"]
    for name in errors:
        cls = getattr(retrostore, name)
        builtins = [b.__name__ for b in cls.__mro__[1:] if b.__module__ == "builtins"
                    and b not in (Exception, BaseException, object)]
        doc = " ".join(_doc(cls).split())
        out.append(f"| <a id=\"{name.lower()}\"></a>`{name}` | {', '.join(builtins) or '-'} | {doc} |")
    out.append("")
    for modname in SUBPACKAGES:
        out += _subpackage_markdown(modname)
    return "\n".join(out).rstrip() + "\n"


def cli_markdown() -> str:
    cli = _cli_group()
    out = [
        "# Command-line reference",
        "",
        "Generated from the click help by `python docs/gen_reference.py`. Every command is also",
        "`python -m retrostore COMMAND`. Library errors print one line `Error: ...` and exit 1; usage errors "
        "(an unknown option, a bad option value, a STORE or input path that does not exist) print click's usage "
        "line and `Error: ...` and exit 2.",
        "",
    ]
    opts = dict(terminal_width=100, max_content_width=100, help_option_names=["-h", "--help"])
    ctx = click.Context(cli, info_name="retrostore", **opts)
    for name in sorted(cli.commands):
        cmd = cli.commands[name]
        sub = click.Context(cmd, info_name=name, parent=ctx, **opts)
        out += [f"## retrostore {name}", "", "```text", cmd.get_help(sub).rstrip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    (DOCS / "api.md").write_text(api_markdown())
    (DOCS / "cli.md").write_text(cli_markdown())
    print(f"wrote {DOCS / 'api.md'} and {DOCS / 'cli.md'}")


if __name__ == "__main__":
    main()
