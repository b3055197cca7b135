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
    get_model,
    get_sku,
    model_folder,
    resolve_model,
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
    p.add_argument("--config", help="inference_config.yaml (`vllm:` / `transformers:` overrides)")
    p.add_argument("--adapters-dir", default=os.environ.get("KAITO_ADAPTERS_DIR", DEFAULT_ADAPTERS_DIR),
                   help="each sub-folder holding a LoRA adapter is served under its name (default %(default)s)")
    p.add_argument("--served-model-name", help="model name clients send (default: the preset name)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--api-key", default=os.environ.get("KAITO_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route but /health (env KAITO_API_KEY)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    return p


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
    if args.preset:
        preset = get_model(args.preset)
        model_path = args.model or (str(model_folder(preset.name)) if preset.source else preset.hf_id)
    elif args.model:
        preset = resolve_model(args.model)
        model_path = args.model
    else:
        preset = get_model(DEFAULT_MODEL)
        model_path = str(model_folder(DEFAULT_MODEL))
    backend, why = choose_backend(args.backend, preset.runtimes)
    err.print(f"kaito-serve: {preset.name} from {model_path} on the {backend} backend ({why})", markup=False)
    return ServeOptions(
        preset=preset,
        model_path=model_path,
        served_model_name=args.served_model_name or preset.name,
        backend=backend,
        sku=get_sku(args.instance_type) if args.instance_type else None,
        node_count=args.node_count,
        config=InferenceConfig.load(args.config) if args.config else InferenceConfig(),
        adapters_dir=Path(args.adapters_dir),
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
    )


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
