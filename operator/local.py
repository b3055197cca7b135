"""The local runner: a Workspace or RAGEngine run on this machine, without a cluster.

It takes the same plans as `render.py` (same validation, same sizing, same kaito-serve/kaito-tune
arguments and kaito-rag environment) and starts the entry points as local processes instead of
pods. Each resource gets a folder under `$KAITO_HOME/local/<namespace>/<kind>/<name>/` holding the
applied manifest, `record.json` (process id, port, URL), the log and, once the process ends, its
exit code; so `get`, `logs` and `delete` in a later command find what `apply` started.

Kubernetes-only inputs are refused with a clear message: images (adapters, data, output, embedding
model) cannot be pulled here and persistent volume claims do not exist; use `hostPath` volume
sources for local folders. A resource whose instance type needs GPUs this machine lacks is refused
unless `--cpu` asks to run it on the CPU.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock
from kaito.presets import kaito_home
from pydantic import BaseModel

from .api import Condition, RAGEngine, Resource, Workspace
from .manifests import Manifests, parse
from .render import (
    RESULTS_DIR,
    InferencePlan,
    RAGPlan,
    TuningPlan,
    inference_config_text,
    model_access_secret,
    plan_inference,
    plan_rag,
    plan_tuning,
)
from .validation import check

log = logging.getLogger(__name__)
BIN = Path(sys.executable).parent
COMPLETED_MARKER = "fine_tuning_completed.txt"
EXTRAS = {"kaito-serve": "hf", "kaito-tune": "tune", "kaito-rag": "rag"}


class LocalError(RuntimeError):
    """What the local runner cannot do, and what to do instead."""


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


def gpu_count() -> int:
    """GPUs nvidia-smi lists (0 without an NVIDIA driver)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # exited, not yet reaped
        return None
    return int(fields[19])


def _exe(name: str) -> str:
    exe = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not exe:
        raise LocalError(f"{name} is not installed here: pip install 'kaito[{EXTRAS[name]}]'")
    return exe


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

    def apply(self, manifests: Manifests, *, cpu: bool = False) -> list[str]:
        """Start (or restart, when changed) every resource in `manifests`; workspaces first, so a
        RAGEngine can be pointed at them. Returns one line per resource, kubectl-style."""
        out = []
        for res in sorted(manifests.resources, key=lambda r: isinstance(r, RAGEngine)):
            with self._lock(res.kind, res.namespace, res.name):
                out.append(self._apply_one(res, manifests, cpu))
        return out

    def _lock(self, kind: str, namespace: str, name: str) -> FileLock:
        """One command at a time acts on a resource (two `apply`s must not start it twice)."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(locks / f"{namespace}.{kind.lower()}.{name}.lock"))

    def _apply_one(self, res: Resource, manifests: Manifests, cpu: bool) -> str:
        lookup = lambda kind, name: manifests.find(kind, name)
        folder = self.folder(res.kind, res.namespace, res.name)
        old = self._existing(folder)
        action = "created"
        if old is not None:
            old_res, record = old
            if record.spec_hash == _spec_hash(res) and self.phase(folder, record)[0] != "Failed":
                return f"{res.kind.lower()}.kaito.sh/{res.name} unchanged"
            check(res, old_res, lookup)  # immutable fields
            self._stop(folder, record)
            action = "configured"
        check(res, lookup=lookup)
        try:
            record = self._start(res, manifests, folder, cpu)
        except Exception:
            if not (folder / "record.json").is_file():  # refused before it started: leave nothing behind
                shutil.rmtree(folder, ignore_errors=True)
            raise
        where = f" on {record.url}" if record.url else ""
        return f"{res.kind.lower()}.kaito.sh/{res.name} {action} ({Path(record.command[0]).name}{where})"

    def _existing(self, folder: Path) -> tuple[Resource, Record] | None:
        try:
            record = Record.model_validate_json((folder / "record.json").read_text())
            resource = parse(yaml.safe_load((folder / "resource.yaml").read_text()))
        except (OSError, ValueError):
            return None
        return resource, record

    def _start(self, res: Resource, manifests: Manifests, folder: Path, cpu: bool) -> Record:
        lookup = lambda kind, name: manifests.find(kind, name)
        work = folder / "work"
        env = dict(os.environ)
        output_dir = None
        port: int | None = None
        if isinstance(res, Workspace) and res.tuning is not None:
            plan = plan_tuning(res, lookup)
            self._check_gpus(plan.sku, 1, cpu, res)
            work.mkdir(parents=True, exist_ok=True)
            command, output_dir = self._tuning_command(plan, work)
            env["KAITO_TUNE_METRICS_PORT"] = str(_free_port())  # its metrics endpoint, off the default 5000
            role = "tuning"
        elif isinstance(res, Workspace):
            if res.inference is not None and res.inference.template is not None:
                raise LocalError(f"workspace {res.name}: a pod template runs only in a cluster; the local runner "
                                 "runs presets")
            plan_i = plan_inference(res, lookup)
            if plan_i.node_count > 1 and not cpu:
                raise LocalError(f"workspace {res.name}: {plan_i.preset.name} needs {plan_i.node_count} nodes of "
                                 f"{plan_i.sku.name}; the local runner runs on one machine (--cpu runs it on the "
                                 "CPU, if it fits in memory)")
            self._check_gpus(plan_i.sku, plan_i.node_count, cpu, res)
            work.mkdir(parents=True, exist_ok=True)
            port = _free_port()
            command = self._serve_command(plan_i, work, cpu) + ["--host", "127.0.0.1", "--port", str(port)]
            role = "inference"
        else:
            assert isinstance(res, RAGEngine)
            plan_r = plan_rag(res, lookup)
            if plan_r.sku is not None:
                self._check_gpus(plan_r.sku, 1, cpu, res)
            work.mkdir(parents=True, exist_ok=True)
            port = _free_port()
            env.update(self._rag_env(plan_r, manifests, work))
            command = [_exe("kaito-rag"), "--host", "127.0.0.1", "--port", str(port)]
            role = "rag"
        if isinstance(res, Workspace) and (secret := model_access_secret(res)):  # gated presets
            env["HF_TOKEN"] = _secret_value(manifests, secret, "HF_TOKEN")
        (folder / "resource.yaml").write_text(yaml.safe_dump(res.dump(), sort_keys=False))
        (folder / "exit_code").unlink(missing_ok=True)
        # sh waits for the entry point and writes its exit code, so a later `get` can tell a crash
        # from a clean exit; the new session makes it a process group `delete` can stop as a whole
        wrapper = ["/bin/sh", "-c", '"$@"; echo $? > "$KAITO_EXIT_FILE"', "kaito-local", *command]
        env["KAITO_EXIT_FILE"] = str(folder / "exit_code")
        with open(folder / "log", "ab") as log_file:
            proc = subprocess.Popen(wrapper, cwd=work, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        record = Record(kind=res.kind, name=res.name, namespace=res.namespace, role=role, command=command,
                        pid=proc.pid, start_ticks=_start_ticks(proc.pid) or 0, port=port,
                        url=f"http://127.0.0.1:{port}" if port else None, started=time.time(), cpu=cpu,
                        spec_hash=_spec_hash(res), output_dir=output_dir)
        (folder / "record.json").write_text(record.model_dump_json(indent=2))
        log.info("started", extra={"kind": res.kind, "resource": f"{res.namespace}/{res.name}", "pid": proc.pid,
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

    def _serve_command(self, plan: InferencePlan, work: Path, cpu: bool) -> list[str]:
        config_path = None
        ws = plan.workspace
        if plan.config is not None:
            config_path = work / "inference_config.yaml"
            config_path.write_text(inference_config_text(plan.config))
        adapters_dir = None
        if plan.adapters:
            adapters_dir = work / "adapters"
            shutil.rmtree(adapters_dir, ignore_errors=True)
            adapters_dir.mkdir()
            for a in plan.adapters:
                assert a.source is not None and a.source.name
                path = _host_path(a.source.volume_source, f"workspace {ws.name}: adapter {a.source.name}",
                                  image=a.source.image)
                (adapters_dir / a.source.name).symlink_to(path, target_is_directory=True)
        return [_exe("kaito-serve"), *plan.serve_args(config_path=str(config_path) if config_path else None,
                                                      adapters_dir=str(adapters_dir) if adapters_dir else None,
                                                      gpu=not cpu)]

    def _tuning_command(self, plan: TuningPlan, work: Path) -> tuple[list[str], str]:
        name = plan.workspace.name
        data = list(plan.input.urls or []) or [_host_path(plan.input.volume_source, f"workspace {name}: tuning "
                                                          "input", image=plan.input.image)]
        output = _host_path(plan.output.volume_source, f"workspace {name}: tuning output", image=plan.output.image,
                            create=True)
        config = work / "training_config.yaml"
        config.write_text(_local_training_config(plan.config_text, output))
        return [_exe("kaito-tune"), *plan.tune_args(config_path=str(config), data=data, output=output)], output

    def _rag_env(self, plan: RAGPlan, manifests: Manifests, work: Path) -> dict[str, str]:
        rag = plan.engine
        local = rag.spec.embedding.local if rag.spec.embedding else None
        if local and local.image:
            raise LocalError(f"ragengine {rag.name}: the embedding model image {local.image} cannot be pulled here; "
                             "use embedding.local.modelID")
        env = dict(plan.env)
        for var, (secret, key) in plan.secret_env.items():
            env[var] = _secret_value(manifests, secret, key)
        if "LLM_INFERENCE_URL" in env:
            env["LLM_INFERENCE_URL"] = self.resolve_url(env["LLM_INFERENCE_URL"], rag.namespace)
        storage = work / "vector-db"
        storage.mkdir(exist_ok=True)
        env["DEFAULT_VECTOR_DB_PERSIST_DIR"] = str(storage)
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

    def alive(self, record: Record) -> bool:
        ticks = _start_ticks(record.pid)
        return ticks is not None and ticks == record.start_ticks

    def phase(self, folder: Path, record: Record) -> tuple[str, str]:
        """(state, why): Pending / Ready / Running / Succeeded / Failed."""
        exe = Path(record.command[0]).name
        if self.alive(record):
            if record.role == "tuning":
                return "Running", f"{exe} is running"
            try:
                import httpx

                ok = httpx.get(f"{record.url}/health", timeout=2).status_code == 200
            except Exception:  # noqa: BLE001 - not listening yet
                ok = False
            return ("Ready", f"{exe} answers on {record.url}") if ok else ("Pending", f"{exe} is starting")
        code_file = folder / "exit_code"
        code = code_file.read_text().strip() if code_file.is_file() else ""
        if record.role == "tuning" and code == "0":
            marker = Path(record.output_dir or "") / COMPLETED_MARKER
            if marker.is_file():
                return "Succeeded", f"{exe} finished; the adapter is in {record.output_dir}"
            return "Failed", f"{exe} exited 0 without writing {COMPLETED_MARKER}"
        if code:
            n = int(code)
            how = f"was killed by signal {n - 128}" if n > 128 else f"exited with code {n}"
        else:
            how = "was killed"
        return "Failed", f"{exe} {how}; see `kaito-operator local logs {record.name}`"

    def conditions(self, folder: Path, record: Record) -> tuple[str, list[Condition]]:
        state, why = self.phase(folder, record)
        where = "this machine's CPU" if record.cpu else "this machine's GPUs"
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.started))

        def cond(kind: str, ok: bool | None, reason: str, message: str) -> Condition:
            status = "Unknown" if ok is None else ("True" if ok else "False")
            return Condition(type=kind, status=status, reason=reason, message=message, last_transition_time=now)

        resource = cond("ResourceReady", True, "LocalMachine", f"runs on {where}")
        done = {"Ready": True, "Succeeded": True, "Failed": False}.get(state)
        reason = {"Ready": "ProcessReady", "Succeeded": "JobSucceeded", "Failed": "ProcessFailed",
                  "Pending": "ProcessStarting", "Running": "JobRunning"}[state]
        if record.role == "inference":
            conds = [resource, cond("InferenceReady", state == "Ready", reason, why),
                     cond("WorkspaceSucceeded", done, reason, why)]
        elif record.role == "tuning":
            conds = [resource, cond("JobStarted", True, "ProcessStarted", f"{Path(record.command[0]).name} started"),
                     cond("WorkspaceSucceeded", None if state == "Running" else done, reason, why)]
        else:
            conds = [resource, cond("ServiceReady", state == "Ready", reason, why),
                     cond("RAGEngineSucceeded", done, reason, why)]
        return state, conds

    def status_of(self, folder: Path, record: Record) -> dict[str, Any]:
        """The resource as applied, with a status as the controller would write it."""
        resource = yaml.safe_load((folder / "resource.yaml").read_text())
        state, conds = self.conditions(folder, record)
        resource["status"] = {"state": state, "conditions": [c.dump() for c in conds],
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
        if not self.alive(record):
            return
        log.info("stopping", extra={"resource": f"{record.namespace}/{record.name}", "pid": record.pid})
        try:
            os.killpg(record.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while self.alive(record) and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.alive(record):
            try:
                os.killpg(record.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

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


def _local_training_config(text: str, output: str) -> str:
    """The training config with the pod's output folder (upstream configs name /mnt/results) moved to
    the local output folder; anything else is kept as written."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        return text
    section = (data.get("training_config") if isinstance(data.get("training_config"), dict) else data)
    args = section.get("TrainingArguments") if isinstance(section, dict) else None
    out_dir = args.get("output_dir") if isinstance(args, dict) else None
    if not isinstance(out_dir, str) or not (out_dir == RESULTS_DIR or out_dir.startswith(RESULTS_DIR + "/")):
        return text
    args["output_dir"] = output + out_dir[len(RESULTS_DIR):]
    return yaml.safe_dump(data, sort_keys=False)


def _host_path(volume: dict | None, what: str, *, image: str | None = None, create: bool = False) -> str:
    if image:
        raise LocalError(f"{what} comes from image {image}: the local runner cannot pull or push images; use a "
                         "hostPath volumeSource (a local folder) instead")
    if not volume or "hostPath" not in volume:
        kind = next(iter(volume), "nothing") if volume else "nothing"
        raise LocalError(f"{what} uses a {kind} volume, which exists only in a cluster; use hostPath (a local "
                         "folder) with the local runner")
    path = Path(volume["hostPath"]["path"]).expanduser()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    elif not path.exists():
        raise LocalError(f"{what}: {path} does not exist")
    return str(path)


def _secret_value(manifests: Manifests, name: str, key: str) -> str:
    secret = manifests.find("Secret", name)
    if secret is None:
        raise LocalError(f"Secret {name!r} is not in the applied file: the local runner reads Secrets from it")
    if key in (secret.get("stringData") or {}):
        return str(secret["stringData"][key])
    if key in (secret.get("data") or {}):
        try:
            return base64.b64decode(secret["data"][key], validate=True).decode()
        except ValueError:
            raise LocalError(f"Secret {name!r}: data.{key} is not base64") from None
    raise LocalError(f"Secret {name!r} has no {key} key")

