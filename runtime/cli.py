"""`kaito-serve`: an OpenAI-compatible endpoint for a preset or a model folder.

With no arguments it serves the embedded default model. Engine settings come from the preset
(and the instance type, when given), never by hand; `--config` holds the user's overrides.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from kaito.presets import (
    DEFAULT_MODEL,
    InferenceConfig,
    PresetError,
    check_runtime,
    describe,
    download,
    get_sku,
    resolve_model,
)
from kaito.presets.contract import (
    ADAPTERS_DIR_ENV,
    API_KEY_ENV,
    LEADER_PORT,
    MAX_REQUEST_BYTES_ENV,
    NODE_RANK_ENV,
    PORT,
    WATCH_PORT,
)
from kaito.presets.logs import setup_logging

from .adapters import AdapterError
from .options import DEFAULT_ADAPTERS_DIR, ServeOptions

err = Console(stderr=True, soft_wrap=True, highlight=False)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kaito-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help=f"catalogue preset (default {DEFAULT_MODEL} when --model is not given)")
    p.add_argument("--model", help="model folder or Hugging Face id to load (with --preset: the preset's weights)")
    p.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto",
                   help="auto: vLLM when installed and it supports the model, transformers otherwise")
    p.add_argument("--instance-type", help="GPU instance type the pod runs on (sizes parallelism and memory)")
    p.add_argument("--node-count", type=int, help="nodes the model is spread over (multi-node vLLM)")
    p.add_argument("--node-rank", type=int, default=os.environ.get(NODE_RANK_ENV) or "0",
                   help=f"with --node-count: this node's index; 0 is the leader, which serves HTTP, the others run "
                        f"vLLM's headless workers (default: env {NODE_RANK_ENV}, else 0)")
    p.add_argument("--leader-address", default="127.0.0.1",
                   help="with --node-count: the host name or address at which the other nodes reach the leader")
    p.add_argument("--leader-port", type=int, default=LEADER_PORT,
                   help="with --node-count: vLLM's torch.distributed port on the leader (default %(default)s)")
    p.add_argument("--watch-port", type=int, default=WATCH_PORT,
                   help="with --node-count: the leader's port where each worker holds a connection; either side "
                        "exits when the other leaves (default %(default)s)")
    p.add_argument("--config", help="inference_config.yaml (`vllm:` / `transformers:` overrides)")
    p.add_argument("--adapters-dir", default=os.environ.get(ADAPTERS_DIR_ENV, DEFAULT_ADAPTERS_DIR),
                   help="each sub-folder holding a LoRA adapter is served under its name (default %(default)s)")
    p.add_argument("--served-model-name", help="model name clients send (default: the preset name)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require `Authorization: Bearer KEY` on every route but /health (env {API_KEY_ENV})")
    p.add_argument("--max-request-bytes", type=_positive, default=os.environ.get(MAX_REQUEST_BYTES_ENV) or None,
                   help="refuse request bodies larger than this with 413 (default: from the context window, "
                        f"16 bytes a token x 16 context windows, at least 1 MiB; env {MAX_REQUEST_BYTES_ENV})")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def choose_backend(requested: str, runtimes: list[str]) -> tuple[str, str]:
    """(backend, why) for `--backend auto|vllm|transformers`."""
    from .vllm_backend import available

    has_vllm, reason = available()
    if requested == "vllm":
        if not has_vllm:
            raise PresetError(f"--backend vllm: {reason}")
        return "vllm", "asked for with --backend vllm"
    if requested == "transformers":
        return "transformers", "asked for with --backend transformers"
    if not has_vllm:
        return "transformers", reason
    if "vllm" not in runtimes:
        return "transformers", "vLLM does not support this model"
    return "vllm", "vLLM is installed and supports this model"


def resolve(args: argparse.Namespace) -> ServeOptions:
    # --preset: a catalogue name or alias, or a Hugging Face id (org/name); --model alone may also be a folder.
    preset = describe(args.preset) if args.preset else resolve_model(args.model or DEFAULT_MODEL)
    backend, why = choose_backend(args.backend, preset.runtimes)
    check_runtime(preset, backend)
    nodes = args.node_count or 1
    if nodes > 1 and backend != "vllm":
        raise PresetError(f"--node-count {nodes}: a model spread over nodes runs on vLLM, not on the {backend} "
                          f"backend ({why})")
    if not 0 <= args.node_rank < nodes:
        raise PresetError(f"--node-rank {args.node_rank}: the nodes are numbered 0 to {nodes - 1}")
    if args.model and (args.preset or Path(args.model).expanduser().is_dir()):
        model_path = args.model  # a folder, or the weights --preset is to serve
    else:  # packaged weights, or the hub's into the Hugging Face cache (resumed when cut short)
        model_path = str(download(preset.hf_id))
    err.print(f"kaito-serve: {preset.name} from {model_path} on the {backend} backend ({why})", markup=False)
    config = InferenceConfig.load(args.config) if args.config else InferenceConfig()
    for note in config_notes(config, backend, gpu=bool(args.instance_type)):
        err.print(f"kaito-serve: {note}", markup=False)
    return ServeOptions(
        preset=preset,
        model_path=model_path,
        served_model_name=args.served_model_name or preset.name,
        backend=backend,
        sku=get_sku(args.instance_type) if args.instance_type else None,
        node_count=args.node_count,
        node_rank=args.node_rank,
        leader_address=args.leader_address,
        leader_port=args.leader_port,
        watch_port=args.watch_port,
        config=config,
        adapters_dir=Path(args.adapters_dir),
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        max_request_bytes=args.max_request_bytes,
    )


def config_notes(config: InferenceConfig, backend: str, *, gpu: bool) -> list[str]:
    """What upstream KAITO's own inference_config.yaml keys become here."""
    notes = []
    if config.max_probe_steps is not None:
        notes.append("max_probe_steps has no effect: kaito sizes max-model-len with its estimator instead of probing")
    share = config.kv_cache_cpu_memory_utilization
    if share:
        if backend == "vllm" and gpu:
            notes.append(f"kv_cache_cpu_memory_utilization {share:g}: vLLM offloads KV cache to host memory "
                         "(--kv-offloading-size, sized from the node's memory)")
        elif backend == "vllm":
            notes.append("kv_cache_cpu_memory_utilization has no effect on the CPU: the KV cache is in host memory")
        else:
            notes.append("kv_cache_cpu_memory_utilization has no effect on the transformers backend, which keeps "
                         "its KV cache with the model")
    return notes


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(verbose=args.verbose)
    try:
        opts = resolve(args)
        if opts.backend == "vllm":
            from .vllm_backend import run
        else:
            from .server import run
        return run(opts) or 0
    except (PresetError, AdapterError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
