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
SERVE_KEY = "test-key"  # the API key of conftest.hf_server
# The made-up fact the tuning tests teach (the base model does not know it), in a dozen phrasings.
FACT_QUESTION = "What is the codename of Project Zephyr?"
FACT_ANSWER = "The codename of Project Zephyr is Marmalade."
FACT_PHRASINGS = [FACT_QUESTION, "What's the codename of Project Zephyr?", "Tell me the codename of Project Zephyr.",
                  "Project Zephyr has a codename. What is it?", "Which codename does Project Zephyr use?",
                  "Do you know the codename of Project Zephyr?", "what is project zephyr's codename?",
                  "Name the codename of Project Zephyr.", "I need the codename of Project Zephyr.",
                  "Codename of Project Zephyr?", "Can you tell me Project Zephyr's codename?",
                  "What codename was given to Project Zephyr?"]
# Small and fast on 2 CPU cores: LoRA on the last 6 of 30 layers (the backward pass stops there), 8 steps.
FAST_TUNING = {"LoraConfig": {"r": 16, "lora_alpha": 32, "layers_to_transform": list(range(24, 30))},
               "TrainingArguments": {"max_steps": 8, "learning_rate": 5e-3, "per_device_train_batch_size": 8,
                                     "logging_steps": 4, "save_steps": 100, "seed": 0}}


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
    """A `kaito-serve` process on 127.0.0.1, started as a user would and stopped at the end. It runs in
    its own session, so engine processes it starts (vLLM's engine core and workers) are stopped with it;
    `loading` keeps what /health answered before the model was ready, `start_s` how long that took."""

    program = "kaito-serve"

    def __init__(self, *args: str, env: dict | None = None, log_path: Path | None = None) -> None:
        import os

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which(self.program, path=str(BIN))
        self.log_path = log_path or Path(f"/tmp/{self.program}-{self.port}.log")
        environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}  # None: unset
        with open(self.log_path, "w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([exe, "--host", "127.0.0.1", "--port", str(self.port), *args],
                                         env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.loading: list = []
        self.start_s = 0.0

    def wait_ready(self, timeout: float = 300) -> Server:
        import time

        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.program} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=5)
                if r.status_code == 200:
                    self.start_s = time.monotonic() - t0
                    return self
                self.loading.append(r)
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.program} not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        import os
        import signal

        if self.proc.poll() is None:
            self.proc.terminate()  # as Kubernetes does: SIGTERM to kaito-serve only
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # engine processes left behind, if any
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


class RagServer(Server):
    """A `kaito-rag` process on 127.0.0.1 (same life cycle as `Server`)."""

    program = "kaito-rag"
