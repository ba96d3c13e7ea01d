"""``python -m retrostore``: the command-line interface.

An install maps the project's ``cli/`` folder to ``retrostore.cli``. Run from a
source checkout, the local ``retrostore/`` folder shadows the install and has
no ``cli`` subpackage, so the front end is then loaded from ``../cli``.
"""

try:
    from retrostore.cli import main
except ModuleNotFoundError:  # source checkout: cli/ sits beside retrostore/
    import importlib.util
    import sys
    from pathlib import Path

    _dir = Path(__file__).resolve().parents[1] / "cli"
    _spec = importlib.util.spec_from_file_location("retrostore.cli", _dir / "__init__.py",
                                                   submodule_search_locations=[str(_dir)])
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["retrostore.cli"] = _mod
    _spec.loader.exec_module(_mod)
    main = _mod.main

if __name__ == "__main__":
    main()
