"""`kaito-operator run`: the cluster controller, on kopf and the `kubernetes` client.

One kopf daemon per Workspace / RAGEngine keeps it reconciled: it renders the resource (render.py,
pure), applies the objects idempotently (kube.Kube.apply: create, or patch what drifted; owner
references cascade deletion), reads NodeClaims, nodes, pods and the workload, and writes the
status (conditions, state, workerNodes, targetNodeCount). It runs again when the resource or an
object it owns changes (kopf event handlers poke the daemon), every `resync` seconds (drift), and
after a failure with exponential backoff. A finalizer deletes the resource's NodeClaims (and so
their cloud capacity) before the resource goes.

Without auto-provisioning (bring your own nodes) no NodeClaims are made: the nodes come from the
resource's label selector, and their GPUs from the NVIDIA feature-discovery labels.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from kaito.presets import PresetError, get_sku
from prometheus_client import Counter, Gauge, Histogram

from .api import Resource, Workspace
from .kube import Kube, selector_string
from .manifests import ManifestError, parse
from .meta import API_VERSION, GROUP, VERSION
from .render import RenderOptions, render
from .validation import ValidationFailed

log = logging.getLogger("kaito.operator")
FINALIZER = "kaito.sh/finalizer"
NODECLAIM = ("karpenter.sh/v1", "NodeClaim")
GPU = "nvidia.com/gpu"

RECONCILES = Counter("kaito_operator_reconciles_total", "Reconciles run", ["kind"])
ERRORS = Counter("kaito_operator_reconcile_errors_total", "Reconciles that failed", ["kind"])
DURATION = Histogram("kaito_operator_reconcile_duration_seconds", "Time of one reconcile", ["kind"])
BY_STATE = Gauge("kaito_operator_resources", "Workspaces and RAGEngines by state", ["kind", "state"])


@dataclass
class Config:
    auto_provision: bool = True  # False: bring your own nodes (found by the label selector)
    resync: float = 30.0  # seconds between reconciles of a resource nothing changed
    gc_interval: float = 300.0  # seconds between looks for orphaned NodeClaims
    render: RenderOptions = field(default_factory=RenderOptions)


# --- what the cluster says ----------------------------------------------------------------------


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cond(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)


def node_ready(node: dict) -> bool:
    c = _cond(node, "Ready")
    return bool(c and c.get("status") == "True")


def node_gpus(node: dict) -> int:
    cap = (node.get("status") or {}).get("capacity") or {}
    try:
        return int(cap.get(GPU, 0))
    except ValueError:
        return 0


def classify_pod(pod: dict) -> tuple[str, str] | None:
    """Why a pod cannot run: (reason, message) for image pulls, crash loops, OOM kills, scheduling,
    evictions and failed containers; None when nothing is wrong (yet)."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        return "Evicted", f"pod {name} was evicted: {status.get('message', '')}".strip()
    sched = _cond(pod, "PodScheduled")
    if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
        return "Unschedulable", f"pod {name} cannot be scheduled: {sched.get('message', '')}".strip()
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        c = cs.get("name")
        waiting = (cs.get("state") or {}).get("waiting") or {}
        terminated = (cs.get("state") or {}).get("terminated") or {}
        last = (cs.get("lastState") or {}).get("terminated") or {}
        if waiting.get("reason") in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName"):
            image = cs.get("image", "its image")
            return "ImagePullFailed", f"pod {name}: container {c} cannot pull {image}: {waiting.get('message') or waiting['reason']}"
        if terminated.get("reason") == "OOMKilled" or (waiting.get("reason") == "CrashLoopBackOff"
                                                       and last.get("reason") == "OOMKilled"):
            return "OOMKilled", f"pod {name}: container {c} was killed for running out of memory (OOMKilled)"
        if waiting.get("reason") == "CrashLoopBackOff":
            code = f" (exit code {last['exitCode']})" if "exitCode" in last else ""
            return "CrashLoopBackOff", f"pod {name}: container {c} keeps crashing{code}"
        if terminated.get("exitCode", 0) != 0:
            return "ContainerFailed", f"pod {name}: container {c} exited with code {terminated['exitCode']}" + (
                f" ({terminated['reason']})" if terminated.get("reason") else "")
    return None


def claim_failure(claim: dict) -> str | None:
    """A NodeClaim's cloud error (quota, SKU not available...), as the provisioner reported it."""
    c = _cond(claim, "Launched")
    if c and c.get("status") == "False" and c.get("reason") not in (None, "", "Pending", "Launching", "NotLaunched"):
        return f"{claim['metadata']['name']}: {c.get('reason')}: {c.get('message', '')}".strip()
    return None


# --- reconcile ----------------------------------------------------------------------------------


@dataclass
class Nodes:
    ready: bool
    reason: str
    message: str
    names: list[str]
    failed: bool = False  # a cloud error, not just waiting
    claims_ready: bool = False  # every NodeClaim says Ready (its node may still lack GPUs)


def nodes_status(kube: Kube, cfg: Config, res: Resource, claims: list[dict], need: int) -> Nodes:
    spec = res.resource if isinstance(res, Workspace) else res.spec.compute
    preferred = list(spec.preferred_nodes or []) if spec else []
    if not cfg.auto_provision:
        sel = spec.label_selector if spec else None
        query = selector_string(sel.match_labels, [e.dump() for e in sel.match_expressions or []]) if sel else ""
        found = kube.list("v1", "Node", selector=query) if query else []
        usable = [n for n in found if node_ready(n) and node_gpus(n) > 0]
        names = sorted(n["metadata"]["name"] for n in usable)[:need]
        msg = nfd_mismatch(usable, spec.instance_type if spec else None)
        if len(usable) < need:
            return Nodes(False, "NodesNotFound", f"{len(usable)} of {need} ready GPU nodes match the label selector "
                                                 f"{query!r}" + (f"; {msg}" if msg else ""), names)
        if msg:
            return Nodes(False, "GPUMismatch", msg, names, failed=True)
        return Nodes(True, "NodesReady", f"{need} GPU node(s) match the label selector (bring your own nodes)", names)
    names, waiting = [], []
    claims_ready = True
    for claim in claims:
        live = kube.get(*NODECLAIM, claim["metadata"]["name"])
        if live is None:
            waiting.append(f"{claim['metadata']['name']} not created")
            claims_ready = False
            continue
        if err := claim_failure(live):
            return Nodes(False, "NodeClaimFailed", err, names, failed=True)
        ready = _cond(live, "Ready")
        node_name = (live.get("status") or {}).get("nodeName")
        if not (ready and ready.get("status") == "True" and node_name):
            waiting.append(f"{live['metadata']['name']} not ready")
            claims_ready = False
            continue
        names.append(node_name)
    for name in preferred:
        names.append(name)
    for name in names:
        node = kube.get("v1", "Node", name)
        if node is None or not node_ready(node):
            waiting.append(f"node {name} not ready")
        elif node_gpus(node) == 0:
            waiting.append(f"node {name} reports no {GPU} capacity yet")
    if waiting:
        return Nodes(False, "NodesPending", "; ".join(waiting[:3]) + (" ..." if len(waiting) > 3 else ""), names,
                     claims_ready=claims_ready)
    return Nodes(True, "NodesReady", f"{len(names)} GPU node(s) ready", sorted(names), claims_ready=True)


# NVIDIA feature discovery reports the usable GPU memory in MiB, the catalogue the advertised size
# (an "80 GB" H100 SXM shows 81559 MiB, a 16 GB T4 15360, a 24 GB A10 23028): this much below still matches.
GPU_MEMORY_TOLERANCE = 0.15


def nfd_mismatch(nodes: list[dict], instance_type: str | None) -> str | None:
    """Bring-your-own nodes: the NVIDIA feature-discovery labels (gpu.count, gpu.memory in MiB) must give
    at least the GPUs and GPU memory of the instance type the resource was sized for."""
    if not instance_type:
        return None
    try:
        sku = get_sku(instance_type)
    except PresetError:
        return None
    for n in nodes:
        labels = n["metadata"].get("labels") or {}
        try:
            count = int(labels.get("nvidia.com/gpu.count", node_gpus(n)))
            mem_gib = int(labels["nvidia.com/gpu.memory"]) * count / 1024 if "nvidia.com/gpu.memory" in labels else None
        except ValueError:
            continue
        if count < sku.gpu_count or (mem_gib is not None and mem_gib < sku.gpu_memory_gib * (1 - GPU_MEMORY_TOLERANCE)):
            have = f"{count} x {labels.get('nvidia.com/gpu.product', 'GPU')}" + (
                f" ({mem_gib:.0f} GiB)" if mem_gib is not None else "")
            return (f"node {n['metadata']['name']} has {have}, less than {instance_type} "
                    f"({sku.gpu_count} x {sku.gpu_model}, {sku.gpu_memory_gib:.0f} GiB)")
    return None


def sku_from_labels(labels: dict[str, str]) -> str | None:
    """The catalogue instance type whose GPUs match a node's NVIDIA feature-discovery labels
    (`nvidia.com/gpu.product` e.g. NVIDIA-A100-SXM4-80GB, `gpu.count`, `gpu.memory` in MiB)."""
    from kaito.presets import catalogue

    product = labels.get("nvidia.com/gpu.product", "").upper().replace("_", "-").split("-")
    try:
        count = int(labels.get("nvidia.com/gpu.count", "0"))
        per_gpu = int(labels["nvidia.com/gpu.memory"]) / 1024 if "nvidia.com/gpu.memory" in labels else None
    except ValueError:
        return None
    fits = [s for s in catalogue.skus() if s.gpu_model.upper() in product and s.gpu_count == count]
    if per_gpu is not None:
        fits = [s for s in fits
                if abs(s.gpu_memory_per_gpu_gib - per_gpu) <= GPU_MEMORY_TOLERANCE * s.gpu_memory_per_gpu_gib]
        fits.sort(key=lambda s: abs(s.gpu_memory_per_gpu_gib - per_gpu))
    return fits[0].name if fits else None


def size_from_nodes(kube: Kube, ws: Workspace) -> str | tuple[str, str]:
    """Bring your own nodes without instanceType: the instance type the selected nodes' GPUs match,
    or (reason, message) when there is none yet."""
    sel = ws.resource.label_selector
    query = selector_string(sel.match_labels, [e.dump() for e in sel.match_expressions or []]) if sel else ""
    nodes = [n for n in (kube.list("v1", "Node", selector=query) if query else []) if node_ready(n) and node_gpus(n)]
    if not nodes:
        return "NodesNotFound", (f"no ready GPU node matches the label selector {query!r} (its NVIDIA labels "
                                 "size the Workspace when instanceType is not given)")
    labels = nodes[0]["metadata"].get("labels") or {}
    sku = sku_from_labels(labels)
    if sku is None:
        product = labels.get("nvidia.com/gpu.product", "no nvidia.com/gpu.product label")
        return "GPUUnknown", (f"node {nodes[0]['metadata']['name']} has {labels.get('nvidia.com/gpu.count', '?')} x "
                              f"{product}, which matches no known instance type: set resource.instanceType")
    return sku


def pod_problem(kube: Kube, ns: str, selector: dict[str, str]) -> tuple[str, str] | None:
    for pod in kube.list("v1", "Pod", ns, selector_string(selector)):
        if found := classify_pod(pod):
            return found
    return None


def conditions(old: list[dict], new: list[tuple[str, bool, str, str]], generation: int | None) -> list[dict]:
    """Conditions with lastTransitionTime kept while the status stays the same."""
    before = {c["type"]: c for c in old or []}
    out = []
    for type_, ok, reason, message in new:
        status = "True" if ok else "False"
        prev = before.get(type_)
        since = prev["lastTransitionTime"] if prev and prev.get("status") == status and prev.get(
            "lastTransitionTime") else now()
        out.append({"type": type_, "status": status, "reason": reason, "message": message[:1000],
                    "lastTransitionTime": since, "observedGeneration": generation})
    return out


def _same(a: dict, b: dict) -> bool:
    def strip(s: dict) -> dict:
        return {**s, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                    for c in s.get("conditions") or []]}
    return strip(a) == strip(b)


def reconcile(kube: Kube, cfg: Config, kind: str, namespace: str, name: str) -> str | None:
    """Bring one resource to its rendered objects and write its status; returns its state."""
    body = kube.get(API_VERSION, kind, name, namespace)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    meta = body["metadata"]
    old_status = body.get("status") or {}
    generation = meta.get("generation")
    conds: list[tuple[str, bool, str, str]] = []
    status: dict[str, Any] = {}

    def lookup(k: str, n: str) -> dict | None:
        return kube.get("v1", k, n, namespace)

    try:
        res = parse({k: v for k, v in body.items() if k != "status"}, f"{kind} {namespace}/{name}")
        if isinstance(res, Workspace) and not res.resource.instance_type and not cfg.auto_provision:
            sized = size_from_nodes(kube, res)
            if isinstance(sized, tuple):  # no node to size from yet, or GPUs kaito does not know
                conds = [("ResourceReady", False, *sized), ("WorkspaceSucceeded", False, *sized)]
                status = {"state": "Pending" if sized[0] == "NodesNotFound" else "NotReady",
                          "conditions": conditions(old_status.get("conditions"), conds, generation)}
                _write(kube, kind, namespace, name, old_status, status)
                return status["state"]
            res.resource.instance_type = sized
        objects = render(res, lookup, cfg.render)
    except (ManifestError, ValidationFailed, PresetError) as e:
        reason = "InvalidWorkspace" if kind == "Workspace" else "InvalidRAGEngine"
        first = "ResourceReady"
        final = "WorkspaceSucceeded" if kind == "Workspace" else "RAGEngineSucceeded"
        conds = [(first, False, reason, str(e)), (final, False, reason, str(e))]
        status = {"conditions": conditions(old_status.get("conditions"), conds, generation)}
        if kind == "Workspace":
            status["state"] = "Failed" if body.get("tuning") else "NotReady"
        _write(kube, kind, namespace, name, old_status, status)
        return status.get("state", "Failed")
    claims = [o for o in objects if o["kind"] == "NodeClaim"]
    workload = [o for o in objects if o["kind"] != "NodeClaim"]
    if not cfg.auto_provision:
        claims = []
    for obj in claims + workload:
        kube.apply(obj, create_first=not old_status)  # no status yet: a new resource, its objects likely absent

    if isinstance(res, Workspace):
        need = _node_count(res, workload)
        if old_status.get("targetNodeCount") is None:
            status["targetNodeCount"] = need
    else:
        need = res.spec.compute.count if res.spec.compute else 1
    nodes = nodes_status(kube, cfg, res, claims, need)
    status["workerNodes"] = nodes.names
    if cfg.auto_provision:
        conds.append(("NodeClaimReady", nodes.claims_ready, "NodeClaimsReady" if nodes.claims_ready else nodes.reason,
                      f"{len(claims)} NodeClaim(s) ready" if nodes.claims_ready else nodes.message))
    conds.append(("ResourceReady", nodes.ready, nodes.reason, nodes.message))
    selector = {("kaito.sh/workspace" if kind == "Workspace" else "kaito.sh/ragengine"): name}
    state: str
    if isinstance(res, Workspace) and res.tuning is not None:
        job = kube.get("batch/v1", "Job", name, namespace)
        started = job is not None
        conds.append(("JobStarted", started, "JobCreated" if started else "JobPending",
                      f"job {name} created" if started else "waiting for the job"))
        js = (job or {}).get("status") or {}
        problem = pod_problem(kube, namespace, selector) if job else None
        if js.get("succeeded"):
            state, ok, reason, msg = "Succeeded", True, "TuningSucceeded", f"job {name} completed"
        elif js.get("failed") or (_cond(job or {}, "Failed") or {}).get("status") == "True":
            detail = problem[1] if problem else (_cond(job or {}, "Failed") or {}).get("message", "the pod failed")
            state, ok, reason = "Failed", False, problem[0] if problem else "JobFailed"
            msg = f"job {name} failed: {detail}"
        elif nodes.failed:
            state, ok, reason, msg = "Failed", False, nodes.reason, nodes.message
        elif problem and problem[0] in ("ImagePullFailed", "Unschedulable", "Evicted"):
            state, ok, reason, msg = "Pending", False, problem[0], problem[1]
        elif js.get("active") and nodes.ready:
            state, ok, reason, msg = "Running", False, "TuningRunning", f"job {name} is running"
        else:
            state, ok, reason, msg = "Pending", False, "TuningPending", nodes.message if not nodes.ready else \
                f"job {name} is starting"
        conds.append(("WorkspaceSucceeded", ok, reason, msg))
    else:
        wl = next(o for o in workload if o["kind"] in ("StatefulSet", "Deployment"))
        live = kube.get("apps/v1", wl["kind"], wl["metadata"]["name"], namespace) or {}
        want = wl["spec"].get("replicas", 1)
        ready_n = ((live.get("status") or {}).get("readyReplicas") or 0)
        ok = nodes.ready and ready_n >= want
        problem = None if ok or not nodes.ready else pod_problem(kube, namespace, selector)
        if ok:
            reason, msg = "Ready", f"{ready_n}/{want} pods ready"
        elif problem:
            reason, msg = problem
        elif not nodes.ready:
            reason, msg = "WaitingForNodes", nodes.message
        else:
            reason, msg = "PodsNotReady", f"{ready_n}/{want} pods ready"
        failed = bool(problem) or nodes.failed
        state = "Ready" if ok else ("NotReady" if failed else "Pending")
        if isinstance(res, Workspace):
            conds.append(("InferenceReady", ok, reason, msg))
            conds.append(("WorkspaceSucceeded", ok, "WorkspaceSucceeded" if ok else (
                "WorkspaceNotReady" if failed else "WorkspacePending"), msg))
        else:
            conds.append(("ServiceReady", ok, reason, msg))
            conds.append(("RAGEngineSucceeded", ok, "RAGEngineSucceeded" if ok else (
                "RAGEngineNotReady" if failed else "RAGEnginePending"), msg))
    if isinstance(res, Workspace):
        status["state"] = state
    status["conditions"] = conditions(old_status.get("conditions"), conds, generation)
    _write(kube, kind, namespace, name, old_status, status)
    return state


def _node_count(ws: Workspace, workload: list[dict]) -> int:
    """The estimator's node count (the StatefulSet's replicas), the template's count, or 1 for tuning."""
    for o in workload:
        if o["kind"] in ("StatefulSet", "Deployment"):
            return o["spec"]["replicas"]
    return 1


def _write(kube: Kube, kind: str, ns: str, name: str, old: dict, new: dict) -> None:
    merged = {**old, **new}
    if _same(merged, old):
        return
    kube.patch_status(API_VERSION, kind, name, ns, new)


def cleanup(kube: Kube, kind: str, namespace: str, name: str) -> int:
    """Delete the resource's NodeClaims (cluster scoped, so not owned); returns how many remain."""
    label = "kaito.sh/workspace" if kind == "Workspace" else "kaito.sh/ragengine"
    remaining = kube.list(*NODECLAIM, selector=f"{label}={name},{label}namespace={namespace}")
    for claim in remaining:
        if not claim["metadata"].get("deletionTimestamp"):
            kube.delete(*NODECLAIM, claim["metadata"]["name"])
    return len(remaining)


def orphan_claims(kube: Kube) -> list[str]:
    """Delete kaito's NodeClaims whose Workspace / RAGEngine no longer exists (its finalizer removed by
    hand, or a crash between its cleanup and its deletion); returns their names."""
    gone = []
    for kind, label in (("Workspace", "kaito.sh/workspace"), ("RAGEngine", "kaito.sh/ragengine")):
        for claim in kube.list(*NODECLAIM, selector=label):
            labels = claim["metadata"].get("labels") or {}
            ns = labels.get(f"{label}namespace")
            if ns and not claim["metadata"].get("deletionTimestamp") and kube.get(API_VERSION, kind, labels[label],
                                                                                  ns) is None:
                kube.delete(*NODECLAIM, claim["metadata"]["name"])
                gone.append(claim["metadata"]["name"])
    return gone


# --- kopf wiring --------------------------------------------------------------------------------


def register(registry: kopf.OperatorRegistry, cfg: Config, kube_factory=Kube) -> None:
    """The controller's handlers, in `registry` (kopf.run(registry=...))."""
    pokes: dict[tuple[str, str, str], asyncio.Event] = {}
    generations: dict[tuple[str, str, str], Any] = {}
    selectors: dict[tuple[str, str, str], tuple[dict, list]] = {}
    states: dict[tuple[str, str, str], str] = {}
    kube_holder: list[Kube] = []

    def kube() -> Kube:
        if not kube_holder:
            kube_holder.append(kube_factory())
        return kube_holder[0]

    def poke(key: tuple[str, str, str]) -> None:
        if key in pokes:
            pokes[key].set()

    def count_states() -> None:
        BY_STATE.clear()
        for (kind, _, _), state in states.items():
            BY_STATE.labels(kind, state).inc()

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.posting.enabled = False
        settings.watching.server_timeout = 300
        settings.networking.request_timeout = 60
        await asyncio.to_thread(kube)  # discovery once, before the handlers run
        asyncio.get_running_loop().create_task(collect())

    async def collect() -> None:
        while True:
            try:
                if gone := await asyncio.to_thread(orphan_claims, kube()):
                    log.info("deleted orphaned NodeClaims", extra={"nodeclaims": gone})
            except Exception as e:  # noqa: BLE001 - tried again later
                log.warning("orphaned NodeClaims not collected", extra={"error": str(e)[:300]})
            await asyncio.sleep(cfg.gc_interval)

    async def keep_reconciled(body: kopf.Body, stopped: kopf.DaemonStopped, logger: Any, **_: Any) -> None:
        kind, ns, name = body["kind"], body["metadata"]["namespace"], body["metadata"]["name"]
        key = (kind, ns, name)
        event = pokes.setdefault(key, asyncio.Event())
        backoff = 1.0
        try:
            while not stopped:
                event.clear()
                generations[key] = body["metadata"].get("generation")
                sel = (body.get("resource") if kind == "Workspace" else (body.get("spec") or {}).get("compute")) or {}
                selectors[key] = ((sel.get("labelSelector") or {}).get("matchLabels") or {},
                                  (sel.get("labelSelector") or {}).get("matchExpressions") or [])
                t0 = time.perf_counter()
                RECONCILES.labels(kind).inc()
                try:
                    state = await asyncio.to_thread(reconcile, kube(), cfg, kind, ns, name)
                    if state:
                        states[key] = state
                        count_states()
                    wait, backoff = cfg.resync, 1.0
                except Exception as e:  # noqa: BLE001 - any failure is retried with backoff
                    ERRORS.labels(kind).inc()
                    log.warning("reconcile failed", extra={"kind": kind, "resource": f"{ns}/{name}",
                                                           "error": str(e)[:500]})
                    wait, backoff = backoff, min(backoff * 2, 300.0)
                finally:
                    DURATION.labels(kind).observe(time.perf_counter() - t0)
                waiter = asyncio.ensure_future(event.wait())
                stopper = asyncio.ensure_future(stopped.wait())
                await asyncio.wait([waiter, stopper], timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
        finally:
            pokes.pop(key, None)
            states.pop(key, None)
            selectors.pop(key, None)
            count_states()

    async def on_change(body: kopf.Body, **_: Any) -> None:
        key = (body["kind"], body["metadata"]["namespace"], body["metadata"]["name"])
        if body["metadata"].get("generation") != generations.get(key):
            poke(key)

    async def on_owned(body: kopf.Body, **_: Any) -> None:
        labels = body["metadata"].get("labels") or {}
        for kind, label in (("Workspace", "kaito.sh/workspace"), ("RAGEngine", "kaito.sh/ragengine")):
            if label in labels:
                ns = body["metadata"].get("namespace") or labels.get(f"{label}namespace", "")
                poke((kind, ns, labels[label]))

    async def on_node(body: kopf.Body, **_: Any) -> None:
        await on_owned(body)
        labels = body["metadata"].get("labels") or {}
        for key, (match, exprs) in list(selectors.items()):
            if (match or exprs) and all(labels.get(k) == v for k, v in match.items()):
                poke(key)

    async def on_delete(body: kopf.Body, **_: Any) -> None:
        kind, ns, name = body["kind"], body["metadata"]["namespace"], body["metadata"]["name"]
        for _ in range(150):  # a reconcile still running could make a claim after the cleanup: let it end
            if (kind, ns, name) not in pokes:
                break
            await asyncio.sleep(0.1)
        left = await asyncio.to_thread(cleanup, kube(), kind, ns, name)
        if left:
            raise kopf.TemporaryError(f"waiting for {left} NodeClaim(s) to go", delay=2)

    for plural in ("workspaces", "ragengines"):
        kopf.daemon(GROUP, VERSION, plural, registry=registry, id=f"reconcile-{plural}",
                    cancellation_timeout=10.0)(keep_reconciled)
        kopf.on.event(GROUP, VERSION, plural, registry=registry, id=f"changed-{plural}")(on_change)
        kopf.on.delete(GROUP, VERSION, plural, registry=registry, id=f"cleanup-{plural}")(on_delete)
    owned = {"app.kubernetes.io/managed-by": "kaito"}
    for group_version, plural in (("v1", "pods"), ("v1", "services"), ("v1", "configmaps"), ("apps/v1", "statefulsets"),
                                  ("apps/v1", "deployments"), ("batch/v1", "jobs")):
        group, _, version = group_version.rpartition("/")
        kopf.on.event(group, version, plural, registry=registry, labels=owned,
                      id=f"owned-{plural}")(on_owned)
    kopf.on.event("karpenter.sh", "v1", "nodeclaims", registry=registry, id="owned-nodeclaims")(on_owned)
    kopf.on.event("", "v1", "nodes", registry=registry, id="nodes")(on_node)
