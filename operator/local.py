"""The local runner: a Workspace or RAGEngine run on this machine, without a cluster.

It takes the same plans as `render.py` (same validation, same sizing, same kaito-serve/kaito-tune
arguments and kaito-rag environment) and starts the entry points as local processes instead of
pods. Each resource gets a folder under `$KAITO_HOME/local/<namespace>/<kind>/<name>/` holding the
applied manifest, `record.json` (process id, port, URL), the log and, once the process ends, its
exit code; so `get`, `logs` and `delete` in a later command find what `apply` started.

Adapter, dataset and embedding model images are pulled as the pods' init containers pull them
(kaito.presets.oci, with the imagePullSecrets from the applied file) and a tuning output image is
pushed by kaito-tune --push with the imagePushSecret. Kubernetes-only inputs are refused with a clear
message: persistent volume claims do not exist (use `hostPath` volume sources for local folders).
A resource whose instance type needs GPUs this machine lacks is refused
unless `--cpu` asks to run it on the CPU.

A Workspace whose model is spread over nodes (or any model, with `--nodes N`) runs with `--cpu` as
one local "pod" per node: the StatefulSet pods' kaito-serve command, each with its rank in
NODE_RANK_ENV as the pod index gives it, its own port, the leader at 127.0.0.1, and its share of
this machine's CPUs (VLLM_CPU_OMP_THREADS_BIND, as a pod's CPU set); vLLM runs one pipeline stage in
each. Worker pod N logs to `log-N` and writes `exit_code-N`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
import urllib.parse
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock
from kaito.presets import kaito_home
from kaito.presets.contract import (
    DOCKER_CONFIG_ENV,
    GUARDRAILS_POLICY_FILE,
    HF_TOKEN_ENV,
    INFERENCE_CONFIG_FILE,
    NODE_RANK_ENV,
    TUNE_METRICS_PORT_ENV,
    TUNING_CONFIG_FILE,
    TUNING_DONE_MARKER,
    RAGEnvironment,
)
from pydantic import BaseModel

from . import status as st
from .api import RAGEngine, Resource, Workspace
from .local_pods import (
    LocalError,
    cpu_shares,
    docker_config,
    ended,
    exe,
    free_port,
    gpu_count,
    host_path,
    local_training_config,
    pull_image,
    secret_value,
    spawn,
    start_ticks,
)
from .manifests import Manifests, parse
from .plan import InferencePlan, RAGPlan, TuningPlan, model_access_secret, plan_inference, plan_rag, plan_tuning
from .validation import check

log = logging.getLogger(__name__)
class WorkerPod(BaseModel):
    """A worker pod (node rank 1 and up) of a Workspace spread over nodes: a kaito-serve process group."""

    rank: int
    command: list[str]
    pid: int
    start_ticks: int
    port: int


class Record(BaseModel):
    kind: str
    name: str
    namespace: str
    role: str  # inference | tuning | rag
    command: list[str]
    pid: int
    start_ticks: int  # /proc start time: a recycled pid is not mistaken for ours
    port: int | None = None
    url: str | None = None
    started: float
    cpu: bool
    spec_hash: str
    output_dir: str | None = None
    workers: list[WorkerPod] = []  # pod 0 (the leader) is pid/command/port above


def _spec_hash(resource: Resource) -> str:
    data = resource.dump()
    data.pop("status", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class LocalRunner:
    def __init__(self, home: Path | None = None) -> None:
        self.root = (home or kaito_home()) / "local"

    # --- state folders -----------------------------------------------------------------------

    def folder(self, kind: str, namespace: str, name: str) -> Path:
        return self.root / namespace / kind.lower() / name

    def records(self) -> list[tuple[Path, Record]]:
        out = []
        for path in sorted(self.root.glob("*/*/*/record.json")):
            try:
                out.append((path.parent, Record.model_validate_json(path.read_text())))
            except ValueError:
                continue
        return out

    def find(self, name: str, kind: str | None = None, namespace: str | None = None) -> tuple[Path, Record]:
        hits = [(p, r) for p, r in self.records() if r.name == name and (kind is None or r.kind.lower() ==
                kind.lower()) and (namespace is None or r.namespace == namespace)]
        if not hits:
            raise LocalError(f"no local resource named {name!r}; `kaito-operator local get` lists them")
        if len(hits) > 1:
            raise LocalError(f"{name!r} names several resources; give --kind and/or --namespace")
        return hits[0]

    # --- apply -------------------------------------------------------------------------------

    def apply(self, manifests: Manifests, *, cpu: bool = False, nodes: int | None = None) -> list[str]:
        """Start (or restart, when changed) every resource in `manifests`; workspaces first, so a
        RAGEngine can be pointed at them. `nodes` (with `cpu`): spread each inference Workspace's model
        over that many local pods, even one that fits on one node. Returns one line per resource,
        kubectl-style."""
        out = []
        for res in sorted(manifests.resources, key=lambda r: isinstance(r, RAGEngine)):
            with self._lock(res.kind, res.namespace, res.name):
                out.append(self._apply_one(res, manifests, cpu, nodes))
        return out

    def _lock(self, kind: str, namespace: str, name: str) -> FileLock:
        """One command at a time acts on a resource (two `apply`s must not start it twice)."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(locks / f"{namespace}.{kind.lower()}.{name}.lock"))

    def _apply_one(self, res: Resource, manifests: Manifests, cpu: bool, nodes: int | None = None) -> str:
        lookup = manifests.find
        folder = self.folder(res.kind, res.namespace, res.name)
        old = self._existing(folder)
        action = "created"
        if old is not None:
            old_res, record = old
            same_nodes = nodes is None or record.role != "inference" or len(record.workers) + 1 == nodes
            if record.spec_hash == _spec_hash(res) and same_nodes and self.phase(folder, record)[0] != "Failed":
                return f"{res.kind.lower()}.kaito.sh/{res.name} unchanged"
            check(res, old_res, lookup)  # immutable fields
            self._stop(folder, record)
            action = "configured"
        check(res, lookup=lookup)
        try:
            record = self._start(res, manifests, folder, cpu, nodes)
        except Exception:
            if not (folder / "record.json").is_file():  # refused before it started: leave nothing behind
                shutil.rmtree(folder, ignore_errors=True)
            raise
        where = f" on {record.url}" if record.url else ""
        pods = f", {len(record.workers) + 1} pods" if record.workers else ""
        return f"{res.kind.lower()}.kaito.sh/{res.name} {action} ({Path(record.command[0]).name}{where}{pods})"

    def _existing(self, folder: Path) -> tuple[Resource, Record] | None:
        try:
            record = Record.model_validate_json((folder / "record.json").read_text())
            resource = parse(yaml.safe_load((folder / "resource.yaml").read_text()))
        except (OSError, ValueError):
            return None
        return resource, record

    def _start(self, res: Resource, manifests: Manifests, folder: Path, cpu: bool, nodes: int | None = None
               ) -> Record:
        lookup = manifests.find
        work = folder / "work"
        env = dict(os.environ)
        output_dir = None
        port: int | None = None
        pods: list[tuple[list[str], dict[str, str], int]] = []  # worker pods: command, environment, port
        if isinstance(res, Workspace) and res.tuning is not None:
            plan = plan_tuning(res, lookup)
            self._check_gpus(plan.sku, 1, cpu, res)
            work.mkdir(parents=True, exist_ok=True)
            command, output_dir = self._tuning_command(plan, work, manifests)
            if plan.output.image:  # kaito-tune --push, with the push secret as its Docker config
                env[DOCKER_CONFIG_ENV] = str(docker_config(manifests, plan.output.image_push_secret or "",
                                                           work / "push-secret"))
            env[TUNE_METRICS_PORT_ENV] = str(free_port())  # its metrics endpoint, off the pod's port
            role = "tuning"
        elif isinstance(res, Workspace):
            if res.inference is not None and res.inference.template is not None:
                raise LocalError(f"workspace {res.name}: a pod template runs only in a cluster; the local runner "
                                 "runs presets")
            plan_i = plan_inference(res, lookup)
            if nodes:
                if not cpu:
                    raise LocalError("--nodes spreads the model over local pods on the CPU: add --cpu")
                plan_i = replace(plan_i, estimate=plan_i.estimate.model_copy(update={"node_count": nodes}))
            if plan_i.node_count > 1 and not cpu:
                raise LocalError(f"workspace {res.name}: {plan_i.preset.name} needs {plan_i.node_count} nodes of "
                                 f"{plan_i.sku.name}; the local runner runs on one machine (--cpu runs it on the "
                                 f"CPU as {plan_i.node_count} local pods, if it fits in memory)")
            self._check_gpus(plan_i.sku, plan_i.node_count, cpu, res)
            work.mkdir(parents=True, exist_ok=True)
            port = free_port()
            serve = self._serve_command(plan_i, work, cpu, manifests)
            command = serve + ["--host", "127.0.0.1", "--port", str(port)]
            if plan_i.node_count > 1:
                env.update(VLLM_HOST_IP="127.0.0.1")  # vLLM's own address, which the other pods connect to
                cpus = cpu_shares(plan_i.node_count)
                env["VLLM_CPU_OMP_THREADS_BIND"], env[NODE_RANK_ENV] = cpus[0], "0"
                for rank in range(1, plan_i.node_count):
                    pod_port = free_port()
                    pods.append((serve + ["--host", "127.0.0.1", "--port", str(pod_port)],
                                 {**env, "VLLM_CPU_OMP_THREADS_BIND": cpus[rank], NODE_RANK_ENV: str(rank)}, pod_port))
            role = "inference"
        else:
            assert isinstance(res, RAGEngine)
            plan_r = plan_rag(res, lookup)
            if plan_r.sku is not None:
                self._check_gpus(plan_r.sku, 1, cpu, res)
            work.mkdir(parents=True, exist_ok=True)
            port = free_port()
            env.update(self._rag_env(plan_r, manifests, work, cpu))
            command = [exe("kaito-rag"), "--host", "127.0.0.1", "--port", str(port)]
            role = "rag"
        if isinstance(res, Workspace) and (secret := model_access_secret(res)):  # gated presets
            env[HF_TOKEN_ENV] = secret_value(manifests, secret, HF_TOKEN_ENV)
        (folder / "resource.yaml").write_text(yaml.safe_dump(res.dump(), sort_keys=False))
        pid = spawn(command, env, work, folder, "")
        workers = [WorkerPod(rank=rank, command=cmd, pid=(p := spawn(cmd, pod_env, work, folder, f"-{rank}")),
                             start_ticks=start_ticks(p) or 0, port=pod_port)
                   for rank, (cmd, pod_env, pod_port) in enumerate(pods, start=1)]
        record = Record(kind=res.kind, name=res.name, namespace=res.namespace, role=role, command=command,
                        pid=pid, start_ticks=start_ticks(pid) or 0, port=port,
                        url=f"http://127.0.0.1:{port}" if port else None, started=time.time(), cpu=cpu,
                        spec_hash=_spec_hash(res), output_dir=output_dir, workers=workers)
        (folder / "record.json").write_text(record.model_dump_json(indent=2))
        log.info("started", extra={"kind": res.kind, "resource": f"{res.namespace}/{res.name}", "pid": pid,
                                   "url": record.url, "command": " ".join(command)})
        return record

    def _check_gpus(self, sku, nodes: int, cpu: bool, res: Resource) -> None:
        if cpu:
            return
        have = gpu_count()
        if have < sku.gpu_count:
            raise LocalError(
                f"{res.kind.lower()} {res.name}: instance type {sku.name} has {sku.gpu_count} x {sku.gpu_model} "
                f"({sku.gpu_memory_gib:g} GiB); this machine has {have} NVIDIA GPU(s). Run with --cpu to run it "
                "on the CPU instead.")

    def _serve_command(self, plan: InferencePlan, work: Path, cpu: bool, manifests: Manifests) -> list[str]:
        """kaito-serve's command as the StatefulSet's pods run it, with local paths, and (spread over nodes)
        the leader at 127.0.0.1 on ports free here."""
        config_path = None
        ws = plan.workspace
        if plan.config is not None:
            config_path = work / INFERENCE_CONFIG_FILE
            config_path.write_text(plan.config.to_yaml())
        adapters_dir = None
        if plan.adapters:
            adapters_dir = work / "adapters"
            shutil.rmtree(adapters_dir, ignore_errors=True)
            adapters_dir.mkdir()
            for a in plan.adapters:
                src = a.source
                assert src is not None and src.name
                what = f"workspace {ws.name}: adapter {src.name}"
                if src.image:  # the init container's pull
                    pull_image(manifests, src.image, adapters_dir / src.name, src.image_pull_secrets or [], what)
                else:
                    (adapters_dir / src.name).symlink_to(host_path(src.volume_source, what), target_is_directory=True)
        command = [exe("kaito-serve"), *plan.serve_args(config_path=str(config_path) if config_path else None,
                                                         adapters_dir=str(adapters_dir) if adapters_dir else None,
                                                         gpu=not cpu, leader="127.0.0.1")]
        if plan.node_count > 1:
            command += ["--leader-port", str(free_port()), "--watch-port", str(free_port())]
        return command

    def _tuning_command(self, plan: TuningPlan, work: Path, manifests: Manifests) -> tuple[list[str], str]:
        name = plan.workspace.name
        if plan.input.image:  # the init container's pull
            data = [pull_image(manifests, plan.input.image, work / "data", plan.input.image_pull_secrets or [],
                               f"workspace {name}: tuning input")]
        else:
            data = list(plan.input.urls or []) or [host_path(plan.input.volume_source, f"workspace {name}: tuning "
                                                              "input")]
        if plan.output.image:  # kept here, then pushed by kaito-tune --push
            output = str(work / "results")
            Path(output).mkdir(parents=True, exist_ok=True)
        else:
            output = host_path(plan.output.volume_source, f"workspace {name}: tuning output", create=True)
        config = work / TUNING_CONFIG_FILE
        config.write_text(local_training_config(plan.config_text, output))
        return [exe("kaito-tune"), *plan.tune_args(config_path=str(config), data=data, output=output)], output

    def _rag_env(self, plan: RAGPlan, manifests: Manifests, work: Path, cpu: bool = False) -> dict[str, str]:
        """The pod's environment, with local paths: the store in the work folder (a volume claim, too), the
        guardrails policy written from its ConfigMap, and secrets read from the manifests."""
        rag = plan.engine
        local = rag.spec.embedding.local if rag.spec.embedding else None
        env = dict(plan.env)
        if local and local.image:  # the init container's pull
            env[RAGEnvironment.var("embedding_model")] = pull_image(
                manifests, local.image, work / "embedding", [local.image_pull_secret] if local.image_pull_secret else [],
                f"ragengine {rag.name}: embedding model")
        for var, (secret, key) in plan.secret_env.items():
            env[var] = secret_value(manifests, secret, key)
        llm_url, storage_dir = RAGEnvironment.var("llm_url"), RAGEnvironment.var("storage_dir")
        if llm_url in env:
            env[llm_url] = self.resolve_url(env[llm_url], rag.namespace)
        storage = work / "vector-db"
        storage.mkdir(exist_ok=True)
        env[storage_dir] = str(storage)
        if cpu and RAGEnvironment.var("embedding_device") in env:
            env[RAGEnvironment.var("embedding_device")] = "cpu"
        if plan.guardrails_config_map:
            text = plan.guardrails_default
            if text is None:
                text = (manifests.configmap(plan.guardrails_config_map) or {}).get(GUARDRAILS_POLICY_FILE)
                if text is None:
                    raise LocalError(f"ragengine {rag.name}: ConfigMap {plan.guardrails_config_map} with a "
                                     f"{GUARDRAILS_POLICY_FILE} key is not in the applied manifests")
            policy = work / "guardrails" / GUARDRAILS_POLICY_FILE
            policy.parent.mkdir(exist_ok=True)
            policy.write_text(text)
            env[RAGEnvironment.var("guardrails_policy")] = str(policy)
        return env

    def resolve_url(self, url: str, namespace: str) -> str:
        """An in-cluster Service URL of a Workspace run here (`http://NAME[.NS[.svc[.cluster.local]]]/...`)
        -> the URL of its local kaito-serve; other URLs are kept."""
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").split(".")
        if not host or host[0] == "":
            return url
        name, ns = host[0], host[1] if len(host) > 1 and host[1] != "svc" else namespace
        if len(host) > 2 and host[2:] not in (["svc"], ["svc", "cluster", "local"]):
            return url
        for _, rec in self.records():
            if rec.kind == "Workspace" and rec.name == name and rec.namespace == ns and rec.url:
                return urllib.parse.urlunsplit(urllib.parse.urlsplit(rec.url)[:2] + parts[2:])
        return url

    # --- status ------------------------------------------------------------------------------

    def alive(self, record: Record | WorkerPod) -> bool:
        ticks = start_ticks(record.pid)
        return ticks is not None and ticks == record.start_ticks

    def phase(self, folder: Path, record: Record) -> tuple[str, str]:
        """(state, why): Pending / Ready / Running / Succeeded / Failed."""
        program = Path(record.command[0]).name
        gone = [w for w in record.workers if not self.alive(w)]
        if gone and self.alive(record):  # its leader exits too, once it notices
            return "Failed", f"worker pod {gone[0].rank} {ended(folder, f'-{gone[0].rank}')}"
        if self.alive(record):
            if record.role == "tuning":
                return "Running", f"{program} is running"
            try:
                import httpx

                ok = httpx.get(f"{record.url}/health", timeout=2).status_code == 200
            except Exception:  # noqa: BLE001 - not listening yet
                ok = False
            return ("Ready", f"{program} answers on {record.url}") if ok else ("Pending", f"{program} is starting")
        code_file = folder / "exit_code"
        code = code_file.read_text().strip() if code_file.is_file() else ""
        if record.role == "tuning" and code == "0":
            marker = Path(record.output_dir or "") / TUNING_DONE_MARKER
            if marker.is_file():
                return "Succeeded", f"{program} finished; the adapter is in {record.output_dir}"
            return "Failed", f"{program} exited 0 without writing {TUNING_DONE_MARKER}"
        return "Failed", f"{program} {ended(folder, '')}"

    def conditions(self, folder: Path, record: Record) -> tuple[str, list[dict]]:
        state, why = self.phase(folder, record)
        where = "this machine's CPU" if record.cpu else "this machine's GPUs"
        resource = st.Cond(st.RESOURCE_READY, True, "LocalMachine", f"runs on {where}")
        done = {"Ready": True, "Succeeded": True, "Failed": False}.get(state)
        reason = {"Ready": "ProcessReady", "Succeeded": "JobSucceeded", "Failed": "ProcessFailed",
                  "Pending": "ProcessStarting", "Running": "JobRunning"}[state]
        final = st.SUCCEEDED[record.kind]
        if record.role == "inference":
            conds = [st.Cond(st.INFERENCE_READY, state == "Ready", reason, why), st.Cond(final, done, reason, why)]
        elif record.role == "tuning":
            conds = [st.Cond(st.JOB_STARTED, True, "ProcessStarted", f"{Path(record.command[0]).name} started"),
                     st.Cond(final, None if state == "Running" else done, reason, why)]
        else:
            conds = [st.Cond(st.SERVICE_READY, state == "Ready", reason, why), st.Cond(final, done, reason, why)]
        out = st.conditions(None, [resource, *conds])
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.started))
        return state, [{**c, "lastTransitionTime": since} for c in out]

    def status_of(self, folder: Path, record: Record) -> dict[str, Any]:
        """The resource as applied, with a status as the controller would write it."""
        resource = yaml.safe_load((folder / "resource.yaml").read_text())
        state, conds = self.conditions(folder, record)
        resource["status"] = {"state": state, "conditions": conds,
                              **({"url": record.url} if record.url else {})}
        return resource

    def wait(self, manifests: Manifests, timeout: float, progress=None) -> list[str]:
        """Until each resource is Ready / Succeeded; a Failed one (or the timeout) is an error.
        `progress(text)` hears what is still awaited."""
        deadline = time.monotonic() + timeout
        pending = [(r.kind, r.namespace, r.name) for r in manifests.resources]
        while pending:
            for key in list(pending):
                folder = self.folder(*key)
                record = Record.model_validate_json((folder / "record.json").read_text())
                state, why = self.phase(folder, record)
                if state in ("Ready", "Succeeded"):
                    pending.remove(key)
                elif state == "Failed":
                    raise LocalError(f"{key[0].lower()} {key[2]} failed: {why}")
                elif progress:
                    progress(f"{key[0].lower()} {key[2]}: {why}")
            if pending and time.monotonic() > deadline:
                names = ", ".join(k[2] for k in pending)
                raise LocalError(f"not ready after {timeout:g} s: {names}")
            if pending:
                time.sleep(0.5)
        return [f"{r.kind.lower()}.kaito.sh/{r.name} condition met" for r in manifests.resources]

    # --- delete ------------------------------------------------------------------------------

    def _stop(self, folder: Path, record: Record, grace: float = 30) -> None:
        """SIGTERM to each pod's process group, SIGKILL to those still there after `grace` seconds."""
        pods = [p for p in (record, *record.workers) if self.alive(p)]
        if not pods:
            return
        log.info("stopping", extra={"resource": f"{record.namespace}/{record.name}", "pid": record.pid})
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in pods:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while any(self.alive(p) for p in pods) and time.monotonic() < deadline:
                time.sleep(0.2)
            pods = [p for p in pods if self.alive(p)]
            if not pods:
                return

    def delete(self, kind: str, namespace: str, name: str) -> str:
        with self._lock(kind, namespace, name):
            return self._delete(kind, namespace, name)

    def _delete(self, kind: str, namespace: str, name: str) -> str:
        folder = self.folder(kind, namespace, name)
        existing = self._existing(folder)
        if existing is None and not folder.exists():
            return f"{kind.lower()}.kaito.sh/{name} not found"
        if existing is not None:
            self._stop(folder, existing[1])
        shutil.rmtree(folder, ignore_errors=True)
        return f"{kind.lower()}.kaito.sh/{name} deleted"


