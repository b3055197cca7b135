"""`kaito-tune`: fine-tune a LoRA (or QLoRA) adapter that kaito-serve loads.

What a Workspace's tuning Job runs. The config (upstream KAITO's training_config.yaml), the data and
the model are all checked before the weights are loaded; a bad one ends the run with one message
and exit status 2. The output dir gets the adapter, the tokenizer with the chat template used, the
resolved config and metrics.json, then fine_tuning_completed.txt last. Killed runs resume from their
last checkpoint when the same command runs again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kaito.presets import DEFAULT_MODEL, PresetError, download, get_model, model_folder
from kaito.presets.hub import is_repo_id
from kaito.presets.oci import ImageError
from kaito.presets.cpu import available_cpus
from kaito.presets.contract import (ADAPTER_FILES, DATA_DIR, PORT, RESULTS_DIR, TUNE_METRICS_PORT_ENV, TUNING_CONFIG_PATH,
                                   TUNING_DONE_MARKER)
from kaito.presets.logs import setup_logging
from rich.console import Console
from rich.markup import escape

from .config import ConfigError, load_config
from .data import data_files, max_download_bytes, read_rows, split

DEFAULT_CONFIG = TUNING_CONFIG_PATH
DEFAULT_DATA = DATA_DIR
DEFAULT_OUTPUT = RESULTS_DIR
err = Console(stderr=True, soft_wrap=True, highlight=False)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kaito-tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", help=f"catalogue preset to tune (default {DEFAULT_MODEL} when no model is given)")
    model.add_argument("--model", help="model folder (or Hugging Face id in the local cache) to tune")
    p.add_argument("--method", choices=["lora", "qlora"], default="lora",
                   help="lora, or qlora: LoRA on a 4-bit (or 8-bit) bitsandbytes model (default %(default)s)")
    p.add_argument("--config", default=None,
                   help=f"training_config.yaml (default {DEFAULT_CONFIG} when it exists, else the method's defaults)")
    p.add_argument("--data", nargs="+", default=[DEFAULT_DATA], metavar="PATH_OR_URL",
                   help="data files, folders or http(s) URLs: .jsonl .json .csv .parquet (default %(default)s)")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="output root (default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get(TUNE_METRICS_PORT_ENV, PORT)),
                   help="Prometheus /metrics port while training, 0 for none (default %(default)s)")
    p.add_argument("--metrics-host", default="0.0.0.0")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="allow data URLs on private, loopback and link-local addresses")
    p.add_argument("--push", metavar="IMAGE",
                   help="push the adapter as an OCI image (/data/adapter_*, upstream's layout) when done, with the "
                        "credentials of $DOCKER_CONFIG/config.json (off by default)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    return p


def model_path(args: argparse.Namespace, configured: str | None) -> str:
    """The base model's folder: packaged weights materialised, a hub model downloaded (kaito.presets.weights:
    locked, verified, resumable), a folder as given."""
    if args.preset:
        preset = get_model(args.preset)
        if preset.source:
            return str(model_folder(preset.name, quiet=args.quiet))
        return str(download(preset.name))
    if args.model:
        if Path(args.model).expanduser().exists():
            return args.model
        if not is_repo_id(args.model):
            raise ConfigError(f"--model {args.model}: no such folder (a Hugging Face id has the form org/name)")
        return str(download(args.model))
    if configured:
        return configured
    return str(model_folder(DEFAULT_MODEL, quiet=args.quiet))


def push(out: Path, image: str) -> None:
    """The adapter as upstream KAITO's adapter image (/data/adapter_config.json, /data/adapter_model.safetensors),
    with the credentials of $DOCKER_CONFIG/config.json (a Workspace's imagePushSecret)."""
    from kaito.presets.oci import push as push_image

    push_image(out, ADAPTER_FILES, image)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # OpenMP threads that spin while they wait starve everything else on a shared CPU (a training step
    # measured 17 s instead of 1 s beside another busy process); set before torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", str(available_cpus()))  # the pod's CPU limit, not the node's cores
    setup_logging(verbose=args.verbose)
    say = (lambda msg: None) if args.quiet else (lambda msg: err.print(msg, markup=False))
    try:
        config_path = Path(args.config) if args.config else Path(DEFAULT_CONFIG)
        if not config_path.is_file():
            if args.config:
                raise ConfigError(f"--config {args.config}: no such file")
            config_path = None
        config = load_config(config_path, args.method, Path(args.output))
        out = Path(config.TrainingArguments.output_dir)

        if (out / TUNING_DONE_MARKER).is_file():
            say(f"kaito-tune: {out} already holds a finished adapter ({TUNING_DONE_MARKER}); remove that file to "
                "train again")
            return 0
        model = model_path(args, config.ModelConfig.pretrained_model_name_or_path)
        files = data_files(args.data, config.DatasetConfig, max_bytes=max_download_bytes(),
                           allow_private=args.allow_private_urls, progress=not args.quiet)
        rows = read_rows(files, config.DatasetConfig)
        train_rows, eval_rows = split(rows, config.DatasetConfig)
        from .train import Job, prepare, run

        tokenizer, targets = prepare(model, config, rows)
        say(f"kaito-tune: {args.method} on {model}: {len(train_rows)} training and {len(eval_rows)} evaluation rows "
            f"from {len(files)} file(s), LoRA on {targets}")
        job = Job(model_path=model, config=config, train_rows=train_rows, eval_rows=eval_rows,
                  metrics_port=args.metrics_port or None, metrics_host=args.metrics_host, progress=not args.quiet)
        metrics = run(job, tokenizer, targets)
        ev = "-" if metrics["eval_loss"] is None else f"{metrics['eval_loss']:.4f}"
        say(f"kaito-tune: done in {metrics['train_runtime_s']:.1f} s, {metrics['steps']} steps, train loss "
            f"{metrics['train_loss']:.4f}, eval loss {ev}, {metrics['tokens_per_second']:,.0f} tokens/s; adapter in {out}")
        if args.push:
            push(out, args.push)
            say(f"kaito-tune: pushed {args.push}")
        return 0
    except ImageError as e:  # the adapter is there; the push failed (registry, credentials)
        err.print(f"[red]error:[/red] {escape(str(e))}")
        return 1
    except (ConfigError, PresetError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
