"""This checkout's click front end, loaded from ``cli/`` as a package.

An editable install elsewhere may map ``retrostore.cli`` to another checkout; tests that must
run this one's commands load ``cli/`` by path, under a name of their own, as a package (its
commands live in sibling modules it imports relatively).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

CLI_DIR = Path(__file__).resolve().parents[1] / "cli"


def checkout_cli_module(name: str = "_checkout_cli"):
    """The module ``cli/__init__.py`` of this checkout, loaded (once per name) as package ``name``."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, CLI_DIR / "__init__.py",
                                                  submodule_search_locations=[str(CLI_DIR)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def checkout_cli():
    """This checkout's click group."""
    return checkout_cli_module().cli
