"""`kaito-operator`: what Workspaces and RAGEngines become, and running them without a cluster.

  kaito-operator validate -f FILE                 check resources (upstream KAITO's rules)
  kaito-operator render -f FILE [-o yaml|json]    the Kubernetes objects they become (like `helm template`)
  kaito-operator crds                             the CustomResourceDefinitions
  kaito-operator webhook [--tls-cert C --tls-key K]   the validating admission webhook (POST /validate)
  kaito-operator run [--no-auto-provision] [--provisioner azure] [--leader-elect]   the cluster controller
  kaito-operator local apply -f FILE [--cpu [--nodes N]] [--wait]   run them on this machine
  kaito-operator local get [NAME] [-o yaml|json]  state and conditions, like `kubectl get`
  kaito-operator local logs NAME [-f] [--pod N]   the process output
  kaito-operator local delete (-f FILE | NAME)    stop and clean up
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import yaml
from kaito.presets import PresetError
from kaito.presets.logs import setup_logging
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import status as st
from .crds import crds_yaml
from .local import LocalError, LocalRunner
from .manifests import ManifestError, Manifests, dump_yaml, load
from .render import RenderOptions, render
from .validation import ValidationFailed, validate

err = Console(stderr=True, soft_wrap=True, highlight=False)
out = Console(soft_wrap=True, highlight=False, width=None if sys.stdout.isatty() else 200)


def _lookup(m: Manifests):
    return lambda kind, name: m.find(kind, name)


def _warn(m: Manifests, auto_provision: bool) -> None:
    for res in m.resources:
        for w in (e for e in validate(res, lookup=_lookup(m), auto_provision=auto_provision) if e.warning):
            err.print(f"[yellow]warning:[/yellow] {res.kind} {res.name}: {escape(str(w))}")


def _dump(objects: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(objects[0] if len(objects) == 1 else {"apiVersion": "v1", "kind": "List",
                                                                 "items": objects}, indent=2) + "\n"
    return dump_yaml(objects)


def cmd_validate(args: argparse.Namespace) -> int:
    m = load(args.filename)
    failed = 0
    for res in m.resources:
        found = validate(res, lookup=_lookup(m), auto_provision=args.auto_provision)
        errors = [e for e in found if not e.warning]
        for w in (e for e in found if e.warning):
            err.print(f"[yellow]warning:[/yellow] {res.kind} {res.name}: {escape(str(w))}")
        if errors:
            failed += 1
            err.print(f"[red]{res.kind} {res.namespace}/{res.name} is invalid:[/red]")
            for e in errors:
                err.print(f"  {escape(str(e))}")
        else:
            out.print(f"{res.kind.lower()}.kaito.sh/{res.name} valid")
    return 1 if failed else 0


def cmd_render(args: argparse.Namespace) -> int:
    m = load(args.filename)
    _warn(m, args.auto_provision)
    opts = RenderOptions(**({"image_registry": args.registry} if args.registry else {}),
                         **({"image_tag": args.tag} if args.tag else {}), auto_provision=args.auto_provision)
    objects = [obj for res in m.resources for obj in render(res, _lookup(m), opts)]
    sys.stdout.write(_dump(objects, args.output))
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    from .crds import nodeclaim_crd, write_chart_files

    if args.chart:
        for path in write_chart_files(args.chart):
            err.print(f"wrote {path}", markup=False)
    elif args.nodeclaim:
        sys.stdout.write(dump_yaml([nodeclaim_crd()]))
    else:
        sys.stdout.write(crds_yaml())
    return 0


def cmd_webhook(args: argparse.Namespace) -> int:
    from .webhook import serve

    if bool(args.tls_cert) != bool(args.tls_key):
        raise LocalError("give both --tls-cert and --tls-key (the API server calls webhooks over HTTPS)")
    err.print(f"kaito-operator: admission webhook on {'https' if args.tls_cert else 'http'}://{args.host}:{args.port}"
              "/validate", markup=False)
    serve(args.host, args.port, args.tls_cert, args.tls_key)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .manager import run

    return run(args)


def cmd_apply(args: argparse.Namespace) -> int:
    from .inferenceset import expand

    m = expand(load(args.filename))  # an InferenceSet runs as its replicas' Workspaces
    if not m.resources:
        raise ManifestError(f"{args.filename} holds no Workspace or RAGEngine")
    _warn(m, True)
    runner = LocalRunner()
    for line in runner.apply(m, cpu=args.cpu, nodes=args.nodes):
        out.print(escape(line))
    if args.wait:
        with err.status("waiting") as status:  # a spinner on a terminal, silent otherwise
            lines = runner.wait(m, args.timeout, lambda text: status.update(escape(text)))
        for line in lines:
            out.print(escape(line))
    return 0


def _age(started: float) -> str:
    s = int(time.time() - started)
    return f"{s}s" if s < 120 else (f"{s // 60}m" if s < 7200 else f"{s // 3600}h")


def cmd_get(args: argparse.Namespace) -> int:
    runner = LocalRunner()
    rows = runner.records()
    if args.name:
        rows = [runner.find(args.name, args.kind, args.namespace)]
    if args.output in ("yaml", "json"):
        objects = [runner.status_of(p, r) for p, r in rows]
        sys.stdout.write(_dump(objects, args.output) if objects else "")
        return 0
    if not rows:
        err.print("No local resources.")
        return 0
    table = Table("KIND", "NAME", "INSTANCE", "RESOURCEREADY", "INFERENCEREADY", "JOBSTARTED", "SUCCEEDED", "STATE",
                  "URL", "AGE", box=None, pad_edge=False)
    for folder, rec in rows:
        state, conds = runner.conditions(folder, rec)
        by = {c["type"]: c["status"] for c in conds}
        res = yaml.safe_load((folder / "resource.yaml").read_text())
        instance = (res.get("resource") or (res.get("spec") or {}).get("compute") or {}).get("instanceType", "")
        if rec.cpu:
            instance = f"{instance} (cpu)"
        ready = by.get(st.INFERENCE_READY, by.get(st.SERVICE_READY, ""))
        table.add_row(rec.kind, rec.name, instance, by.get(st.RESOURCE_READY, ""), ready, by.get(st.JOB_STARTED, ""),
                      by.get(st.SUCCEEDED[rec.kind], ""), state, rec.url or "", _age(rec.started))
    out.print(table)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    runner = LocalRunner()
    folder, record = runner.find(args.name, args.kind, args.namespace)
    pods = {0: record, **{w.rank: w for w in record.workers}}
    if args.pod not in pods:
        raise LocalError(f"{args.name} has {len(pods)} pod(s): --pod 0 to {len(pods) - 1}")
    pod = pods[args.pod]
    log = folder / (f"log-{args.pod}" if args.pod else "log")
    with open(log, "rb") as f:
        lines = f.read().decode(errors="replace").splitlines(keepends=True)
        sys.stdout.write("".join(lines[-args.tail:] if args.tail else lines))
        sys.stdout.flush()
        while args.follow and runner.alive(pod):
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            else:
                time.sleep(0.5)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    runner = LocalRunner()
    if args.filename:
        from .inferenceset import expand

        targets = [(r.kind, r.namespace, r.name) for r in expand(load(args.filename)).resources]
    elif args.name:
        _, rec = runner.find(args.name, args.kind, args.namespace)
        targets = [(rec.kind, rec.namespace, rec.name)]
    else:
        raise LocalError("give -f FILE or a NAME")
    for kind, ns, name in sorted(targets, key=lambda t: t[0] == "Workspace"):  # RAGEngines first
        out.print(escape(runner.delete(kind, ns, name)))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kaito-operator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    def own_nodes(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--no-auto-provision", dest="auto_provision", action="store_false",
                        help="as for an operator that uses your own GPU nodes (instanceType optional, partitions)")

    v = sub.add_parser("validate", help="check Workspaces / RAGEngines in a file")
    v.add_argument("-f", "--filename", required=True, help="manifest file (- for stdin)")
    own_nodes(v)
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("render", help="print the Kubernetes objects the resources become")
    r.add_argument("-f", "--filename", required=True, help="manifest file (- for stdin)")
    own_nodes(r)
    r.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    r.add_argument("--registry", help="image registry of kaito-serve/-tune/-rag (default ghcr.io/kaito-project/kaito)")
    r.add_argument("--tag", help="image tag (default: this kaito's version)")
    r.set_defaults(func=cmd_render)

    c = sub.add_parser("crds", help="print the CustomResourceDefinitions (YAML)")
    c.add_argument("--nodeclaim", action="store_true", help="Karpenter's NodeClaim CRD (for clusters without Karpenter)")
    c.add_argument("--chart", metavar="DIR", help="write the Helm chart's generated CRD files into DIR")
    c.set_defaults(func=cmd_crds)

    w = sub.add_parser("webhook", help="serve the validating admission webhook")
    w.add_argument("--host", default="0.0.0.0")
    w.add_argument("--port", type=int, default=9443)
    w.add_argument("--tls-cert", help="PEM certificate (HTTPS)")
    w.add_argument("--tls-key", help="PEM private key")
    w.set_defaults(func=cmd_webhook)

    o = sub.add_parser("run", help="the cluster controller (kopf): reconcile Workspaces and RAGEngines")
    o.add_argument("--no-auto-provision", dest="auto_provision", action="store_false",
                   default=os.environ.get("KAITO_AUTO_PROVISION", "true").lower() != "false",
                   help="bring your own GPU nodes (found by the label selector); no NodeClaims "
                        "(env KAITO_AUTO_PROVISION=false)")
    o.add_argument("--provisioner", choices=["none", "azure"], default=os.environ.get("KAITO_PROVISIONER", "none"),
                   help="turn NodeClaims into cloud capacity here (azure), or leave them to Karpenter (none)")
    o.add_argument("--resync", type=float, default=30.0, help="seconds between reconciles of an unchanged resource")
    o.add_argument("--workers", type=int, default=16,
                   help="resources reconciled at once (never one resource twice at once)")
    o.add_argument("-n", "--namespace", action="append", default=[],
                   help="watch only these namespaces (default: all)")
    o.add_argument("--leader-elect", action="store_true", help="one active replica, by a coordination.k8s.io Lease")
    o.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "kaito-system"))
    o.add_argument("--lease-name", default="kaito-operator")
    o.add_argument("--lease-duration", type=int, default=15, help="seconds a leader's Lease lasts unrenewed")
    o.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics on this port (0: off)")
    o.add_argument("--health-port", type=int, default=0, help="liveness /healthz on this port (0: off)")
    o.add_argument("--webhook-port", type=int, default=0, help="serve the validating webhook on this port (0: off)")
    o.add_argument("--tls-cert", help="the webhook's PEM certificate")
    o.add_argument("--tls-key", help="the webhook's PEM private key")
    o.add_argument("--registry", help="image registry of kaito-serve/-tune/-rag")
    o.add_argument("--tag", help="image tag (default: this kaito's version)")
    o.add_argument("--scaler-port", type=int, default=0,
                   help="serve KEDA's external scaler (gRPC) for InferenceSets on this port (0: off)")
    o.add_argument("--scaler-address", default=os.environ.get("KAITO_SCALER_ADDRESS"),
                   help="host:port KEDA reaches the scaler at, written into the ScaledObjects "
                        "(default with --scaler-port: 127.0.0.1:PORT; env KAITO_SCALER_ADDRESS)")
    o.add_argument("--gateway-api-inference-extension", dest="gateway", action="store_true",
                   help="an InferencePool and endpoint picker per InferenceSet (Gateway API Inference Extension)")
    o.add_argument("--epp-image", help="the endpoint picker's image (default: upstream KAITO's)")
    o.add_argument("--model-mirror", action="store_true",
                   help="download each hub model once per namespace into a ModelMirror's claim that its Workspaces "
                        "mount (upstream's ModelMirror feature gate); needs a StorageClass")
    o.add_argument("--model-mirror-storage-class", default=os.environ.get("KAITO_MODEL_MIRROR_STORAGE_CLASS"),
                   help="the mirrors' StorageClass (ReadWriteMany; a Workspace's "
                        "kaito.sh/model-mirror-storage-class overrides it)")
    o.add_argument("--model-mirror-idle", type=float, default=24 * 3600, metavar="SECONDS",
                   help="delete a mirror kaito made once no Workspace has used it this long (default: a day)")
    o.add_argument("--weights-storage-class", default=os.environ.get("KAITO_WEIGHTS_STORAGE_CLASS"),
                   help="without a mirror, each serving pod downloads onto a claim of its own of this StorageClass "
                        "(ReadWriteOnce), so a restart skips the download (a Workspace's "
                        "kaito.sh/weights-storage-class overrides it; default: an emptyDir)")
    o.set_defaults(func=cmd_run)

    local = sub.add_parser("local", help="run resources on this machine, without a cluster")
    lsub = local.add_subparsers(dest="local_command", required=True)
    a = lsub.add_parser("apply", help="start (or update) the resources in a file")
    a.add_argument("-f", "--filename", required=True)
    a.add_argument("--cpu", action="store_true", help="run on the CPU when the instance type's GPUs are missing")
    a.add_argument("--nodes", type=int, metavar="N",
                   help="with --cpu: spread an inference Workspace's model over N local pods (vLLM pipeline "
                        "parallel), as a cluster spreads a model too big for one node")
    a.add_argument("--wait", action="store_true", help="wait until ready (inference, RAG) or finished (tuning)")
    a.add_argument("--timeout", type=float, default=600, help="seconds --wait waits (default %(default)s)")
    a.set_defaults(func=cmd_apply)
    for name, func, help_ in (("get", cmd_get, "state and conditions"), ("logs", cmd_logs, "process output"),
                              ("delete", cmd_delete, "stop and clean up")):
        s = lsub.add_parser(name, help=help_)
        s.add_argument("name", nargs="?" if name != "logs" else None)
        s.add_argument("--kind", choices=["Workspace", "RAGEngine"])
        s.add_argument("-n", "--namespace")
        if name == "get":
            s.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")
        if name == "logs":
            s.add_argument("-f", "--follow", action="store_true")
            s.add_argument("--tail", type=int, default=0, help="last N lines")
            s.add_argument("--pod", type=int, default=0, help="a multi-node Workspace's pod (0: the leader)")
        if name == "delete":
            s.add_argument("-f", "--filename")
        s.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(verbose=args.verbose)
    try:
        return args.func(args)
    except (ManifestError, ValidationFailed, LocalError, PresetError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
