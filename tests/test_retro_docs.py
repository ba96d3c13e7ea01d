"""docs/retro-training.md: every `retrostore ...` shell line and every Python block runs, in order."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "retro-training.md"


def test_retro_training_page_runs(tmp_path, monkeypatch):
    pytest.importorskip("retro_pytorch")
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the page's tiny model would only contend with onnxruntime
    ran_shell = ran_python = 0
    namespace = {"__name__": "__retro_training__"}
    try:
        for lang, code in re.findall(r"```(bash|python)\n(.*?)```", PAGE.read_text(), flags=re.S):
            if lang == "bash":
                for line in code.splitlines():
                    line = line.split("#")[0].strip()
                    if not line.startswith("retrostore "):
                        continue  # pip lines: the test environment is the install
                    argv = [sys.executable, "-m", "retrostore", *shlex.split(line)[1:]]
                    res = subprocess.run(argv, capture_output=True, text=True, timeout=600)
                    assert res.returncode == 0, f"{line}\n{res.stdout}\n{res.stderr}"
                    ran_shell += 1
            else:
                exec(compile(code, str(PAGE), "exec"), namespace)
                ran_python += 1
    finally:
        torch.set_num_threads(before)
    assert ran_shell == 3 and ran_python == 9
