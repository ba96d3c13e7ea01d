"""Helpers for the serve tests: a real `retrostore serve` subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A running server: its URL, process and log (stderr and stdout together)."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path) -> None:
        self.proc, self.url, self.log_path = proc, url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start(store, *args: str, timeout_s: float = 90.0, port: int | None = None) -> Server:
    """Start `python -m retrostore serve STORE --port P ARGS...` and wait until /healthz answers."""
    for attempt in range(3):
        p = port or free_port()
        log_path = Path(tempfile.mkstemp(prefix="retrostore-serve-", suffix=".log")[1])
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "retrostore", "serve", str(store), "--port", str(p), *args],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://{HOST}:{p}"
        server = Server(proc, url, log_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        text = server.log()
        stop(server)
        if "address already in use" in text.lower() and port is None and attempt < 2:
            continue  # the free port was taken meanwhile: try another
        raise AssertionError(f"the server did not come up (exit {proc.returncode}):\n{text}")
    raise AssertionError("no free port")


def stop(server: Server, timeout_s: float = 30.0) -> int:
    """SIGTERM the server's process group; returns its exit status."""
    proc = server.proc
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


@contextlib.contextmanager
def serving(store, *args: str, **kwargs):
    server = start(store, *args, **kwargs)
    try:
        yield server
    finally:
        status = stop(server)
        log = server.log()
        server.log_path.unlink(missing_ok=True)
    # on SIGTERM the server finishes what it was doing and exits normally
    assert status == 0, f"the server exited with {status}:\n{log[-3000:]}"

