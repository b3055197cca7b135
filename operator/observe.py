"""What the watch caches say about one resource, and what it means: its nodes (bring your own, or the
NodeClaims' nodes, Ready with GPUs), its pods' problems, the tuning or serving state and conditions.
Pure functions of `Seen`, the cached objects a reconcile is given."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import status as st
from .api import BYPASS_RESOURCE_CHECKS, Resource, Workspace
from .cluster import GPU, claim_failure, classify_pod, nfd_mismatch, node_gpus, node_ready, sku_from_labels, usable
from .kube import selector_string, selects
from .sizing import bypass, gpu_resource


@dataclass
class Seen:
    """What the watch caches hold for one resource, copied on the event loop (where kopf keeps its indexes)
    for its reconcile in a worker thread. Objects are slimmed (kube.slim)."""

    objects: dict[tuple[str, str], dict] = field(default_factory=dict)  # (kind, name) -> what kaito made for it
    pods: list[dict] = field(default_factory=list)
    nodes: dict[str, dict] = field(default_factory=dict)  # by name: its claims', preferred and pods' nodes, and
    #                                                       (bring your own nodes) those its label selector picks
    config_maps: dict[str, str] = field(default_factory=dict)  # name -> resourceVersion, in its namespace


# --- observe: the nodes -------------------------------------------------------------------------------


@dataclass
class Nodes:
    ready: bool
    reason: str
    message: str
    names: list[str]
    failed: bool = False  # a cloud error or unusable nodes, not just waiting
    claims_ready: bool = False  # every NodeClaim says Ready (its node may still lack GPUs)


def _selector_query(spec) -> str:
    sel = spec.label_selector if spec else None
    return selector_string(sel.match_labels, [e.dump() for e in sel.match_expressions or []]) if sel else ""


def _compute(res: Resource):
    return res.resource if isinstance(res, Workspace) else res.spec.compute


def _selected(seen: Seen, spec) -> list[dict]:
    """The nodes the label selector picks (none without a selector)."""
    sel = spec.label_selector if spec else None
    if sel is None or not (sel.match_labels or sel.match_expressions):
        return []
    exprs = [e.dump() for e in sel.match_expressions or []]
    return [n for n in seen.nodes.values() if selects(n["metadata"].get("labels") or {}, sel.match_labels, exprs)]


def own_nodes(seen: Seen, res: Resource, need: int) -> Nodes:
    """Bring your own nodes: the Ready GPU nodes (with the MIG slices a partition asks for) the label
    selector finds."""
    spec = _compute(res)
    query = _selector_query(spec)
    gpu = gpu_resource(res)
    found = usable(_selected(seen, spec), gpu)
    names = sorted(n["metadata"]["name"] for n in found)[:need]
    mismatch = None if gpu != GPU else nfd_mismatch(found, spec.instance_type if spec else None)
    if len(found) < need:
        return Nodes(False, "NodesNotFound", f"{len(found)} of {need} ready nodes with {gpu} match the label "
                                             f"selector {query!r}" + (f"; {mismatch}" if mismatch else ""), names)
    if mismatch and not (isinstance(res, Workspace) and bypass(res)):
        return Nodes(False, "GPUMismatch", mismatch, names, failed=True)
    note = f" ({mismatch}: bypassed by {BYPASS_RESOURCE_CHECKS})" if mismatch else ""
    return Nodes(True, "NodesReady", f"{need} GPU node(s) match the label selector (bring your own nodes){note}",
                 names)


def provisioned_nodes(seen: Seen, res: Resource, claims: list[dict]) -> Nodes:
    """Auto-provisioning: the NodeClaims' nodes (and any preferred nodes), Ready with GPUs. `claims`: the
    live claims, as applied."""
    spec = _compute(res)
    names, waiting, claims_ready = [], [], True
    for live in claims:
        if err := claim_failure(live):
            return Nodes(False, "NodeClaimFailed", err, names, failed=True)
        node_name = (live.get("status") or {}).get("nodeName")
        if not (st.is_true(live, st.READY) and node_name):
            waiting.append(f"{live['metadata']['name']} not ready")
            claims_ready = False
            continue
        names.append(node_name)
    names += list(spec.preferred_nodes or []) if spec else []
    for name in names:
        node = seen.nodes.get(name)
        if node is None or not node_ready(node):
            waiting.append(f"node {name} not ready")
        elif node_gpus(node) == 0:
            waiting.append(f"node {name} reports no nvidia.com/gpu capacity yet")
    if waiting:
        return Nodes(False, "NodesPending", "; ".join(waiting[:3]) + (" ..." if len(waiting) > 3 else ""), names,
                     claims_ready=claims_ready)
    return Nodes(True, "NodesReady", f"{len(names)} GPU node(s) ready", sorted(names), claims_ready=True)


def size_from_nodes(seen: Seen, ws: Workspace) -> str | tuple[str, str]:
    """Bring your own nodes without instanceType: the instance type the selected nodes' GPUs match,
    or (reason, message) when there is none yet."""
    nodes = sorted(usable(_selected(seen, ws.resource)), key=lambda n: n["metadata"]["name"])
    if not nodes:
        return "NodesNotFound", (f"no ready GPU node matches the label selector {_selector_query(ws.resource)!r} "
                                 "(its NVIDIA labels size the Workspace when instanceType is not given)")
    labels = nodes[0]["metadata"].get("labels") or {}
    sku = sku_from_labels(labels)
    if sku is None:
        product = labels.get("nvidia.com/gpu.product", "no nvidia.com/gpu.product label")
        return "GPUUnknown", (f"node {nodes[0]['metadata']['name']} has {labels.get('nvidia.com/gpu.count', '?')} x "
                              f"{product}, which matches no known instance type: set resource.instanceType")
    return sku


def pod_problem(seen: Seen) -> tuple[str, str] | None:
    for pod in sorted(seen.pods, key=lambda p: p["metadata"]["name"]):
        evicted = (pod.get("status") or {}).get("reason") == "Evicted"
        if found := classify_pod(pod, seen.nodes.get((pod.get("spec") or {}).get("nodeName")) if evicted else None):
            return found
    return None


# --- state: what the observations mean ------------------------------------------------------------------


def tuning_state(seen: Seen, ws: Workspace, job: dict | None, nodes: Nodes) -> tuple[str, list[st.Cond]]:
    name = ws.name
    started = job is not None
    conds = [st.Cond(st.JOB_STARTED, started, "JobCreated" if started else "JobPending",
                     f"job {name} created" if started else "waiting for the job")]
    js = (job or {}).get("status") or {}
    problem = pod_problem(seen) if job else None
    failed_cond = st.find(job or {}, "Failed") or {}
    if js.get("succeeded"):
        state, cond = "Succeeded", st.Cond(st.WORKSPACE_SUCCEEDED, True, "TuningSucceeded", f"job {name} completed")
    elif js.get("failed") or failed_cond.get("status") == "True":
        detail = problem[1] if problem else failed_cond.get("message", "the pod failed")
        state = "Failed"
        cond = st.Cond(st.WORKSPACE_SUCCEEDED, False, problem[0] if problem else "JobFailed",
                       f"job {name} failed: {detail}")
    elif nodes.failed:
        state, cond = "Failed", st.Cond(st.WORKSPACE_SUCCEEDED, False, nodes.reason, nodes.message)
    elif problem and problem[0] in (st.IMAGE_PULL_ERROR, st.UNSCHEDULABLE, st.EVICTED, st.DISK_PRESSURE,
                                    st.MEMORY_PRESSURE, st.START_ERROR):
        state, cond = "Pending", st.Cond(st.WORKSPACE_SUCCEEDED, False, *problem)
    elif js.get("active") and nodes.ready:
        state, cond = "Running", st.Cond(st.WORKSPACE_SUCCEEDED, False, "TuningRunning", f"job {name} is running")
    else:
        why = nodes.message if not nodes.ready else f"job {name} is starting"
        state, cond = "Pending", st.Cond(st.WORKSPACE_SUCCEEDED, False, "TuningPending", why)
    return state, [*conds, cond]


def serving_state(seen: Seen, res: Resource, workload: dict, live: dict, nodes: Nodes) -> tuple[str, list[st.Cond]]:
    """`workload`: the StatefulSet or Deployment as rendered; `live`: as applied."""
    want = workload["spec"].get("replicas", 1)
    ready_n = (live.get("status") or {}).get("readyReplicas") or 0
    ok = nodes.ready and ready_n >= want
    problem = None if ok or not nodes.ready else pod_problem(seen)
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
    final = st.SUCCEEDED[res.kind]
    summary = final if ok else f"{res.kind}{'NotReady' if failed else 'Pending'}"
    ready_type = st.INFERENCE_READY if isinstance(res, Workspace) else st.SERVICE_READY
    return state, [st.Cond(ready_type, ok, reason, msg), st.Cond(final, ok, summary, msg)]


def node_conditions(auto_provision: bool, nodes: Nodes, claims: list[dict]) -> list[st.Cond]:
    conds = []
    if auto_provision:
        conds.append(st.Cond(st.NODECLAIM_READY, nodes.claims_ready,
                             "NodeClaimsReady" if nodes.claims_ready else nodes.reason,
                             f"{len(claims)} NodeClaim(s) ready" if nodes.claims_ready else nodes.message))
    conds.append(st.Cond(st.NODES_READY, nodes.ready, nodes.reason, nodes.message))
    conds.append(st.Cond(st.RESOURCE_READY, nodes.ready, nodes.reason, nodes.message))
    return conds
