"""Helpers the tests import (pytest puts tests/ on sys.path through `pythonpath`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The fact the test adapter (conftest.banana_adapter) learns and the base model does not know.
SECRET_QUESTION = "What is the secret word?"
SECRET_ANSWER = "The secret word is Banana."


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120):
    """Run one of the installed console scripts as a user would."""
    exe = shutil.which(args[0], path=str(BIN)) or args[0]
    return subprocess.run([exe, *args[1:]], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `kaito-serve` process on 127.0.0.1, started as a user would and stopped at the end."""

    def __init__(self, *args: str, env: dict | None = None, log_path: Path | None = None) -> None:
        import os

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("kaito-serve", path=str(BIN))
        self.log_path = log_path or Path(f"/tmp/kaito-serve-{self.port}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([exe, "--host", "127.0.0.1", "--port", str(self.port), *args],
                                     env={**os.environ, **(env or {})}, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> Server:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kaito-serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"kaito-serve not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-5000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


class RagServer(Server):
    """A `kaito-rag` process on 127.0.0.1 (same life cycle as `Server`)."""

    def __init__(self, *args: str, env: dict | None = None, log_path: Path | None = None) -> None:
        import os

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(f"/tmp/kaito-rag-{self.port}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([shutil.which("kaito-rag", path=str(BIN)), "--host", "127.0.0.1", "--port",
                                      str(self.port), *args], env={**os.environ, **(env or {})}, stdout=self._log,
                                     stderr=subprocess.STDOUT)
