"""The servers a benchmark measures: a free port, start and wait for /health, stop. (Benchmarks are
scripts and do not import tests/; tests have tests/helpers.Server.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], port: int, log: Path, env: dict[str, str | None] | None = None,
          timeout: float = 600) -> subprocess.Popen:
    """Starts `argv` in its own session (output to `log`; `env` on top of this process's, None unsetting a
    variable) and returns once http://127.0.0.1:port/health answers 200."""
    environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    with log.open("w") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(argv, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{Path(argv[0]).name} exited with {proc.returncode}: see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc, 10)
    raise TimeoutError(f"{Path(argv[0]).name} not ready after {timeout:.0f} s: see {log}")


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to the server, then SIGKILL to its whole session (engine processes it started, if any)."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
