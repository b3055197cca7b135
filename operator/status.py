"""Status as upstream KAITO writes it: condition types, pod failure reasons, building and comparing
conditions, and writing a resource's status (only when it changed) with a Kubernetes Event on each
condition that changes. The controller, the Azure provisioner and the local runner all use this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .kube import Kube

log = logging.getLogger("kaito.operator")

# --- condition types ---------------------------------------------------------------------------------

NODECLAIM_READY = "NodeClaimReady"  # every NodeClaim of the resource is Ready
NODES_READY = "NodesReady"  # the nodes the workload needs are Ready and report their GPUs
RESOURCE_READY = "ResourceReady"  # the nodes and the objects kaito renders are in place
INFERENCE_READY = "InferenceReady"  # the inference pods answer
JOB_STARTED = "JobStarted"  # the tuning Job exists
WORKSPACE_SUCCEEDED = "WorkspaceSucceeded"  # the summary: serving, or tuning finished
WORKSPACE_DELETING = "WorkspaceDeleting"
SERVICE_READY = "ServiceReady"  # a RAGEngine's kaito-rag answers
RAGENGINE_SUCCEEDED = "RAGEngineSucceeded"
RAGENGINE_DELETING = "RAGEngineDeleting"
INFERENCESET_READY = "InferenceSetReady"  # every replica (Workspace) of an InferenceSet is ready
INFERENCESET_DELETING = "InferenceSetDeleting"
SCALEDOBJECT_READY = "ScaledObjectReady"  # kaito's: the KEDA ScaledObject an InferenceSet's annotations ask for
INFERENCEPOOL_READY = "InferencePoolReady"  # kaito's: the Gateway API Inference Extension objects could be made

SUCCEEDED = {"Workspace": WORKSPACE_SUCCEEDED, "RAGEngine": RAGENGINE_SUCCEEDED}
DELETING = {"Workspace": WORKSPACE_DELETING, "RAGEngine": RAGENGINE_DELETING}

# NodeClaim conditions (Karpenter's), written by the Azure provisioner
LAUNCHED, REGISTERED, INITIALIZED, READY = "Launched", "Registered", "Initialized", "Ready"

# --- why a pod cannot run (upstream's reasons) -------------------------------------------------------

IMAGE_PULL_ERROR = "ImagePullError"
CRASH_LOOP = "ContainerCrashLoopBackOff"
OOM_KILLED = "ContainerOOMKilled"
START_ERROR = "ContainerStartError"
EVICTED = "PodEvicted"
DISK_PRESSURE = "NodeDiskPressure"
MEMORY_PRESSURE = "NodeMemoryPressure"
UNSCHEDULABLE = "Unschedulable"
CONTAINER_FAILED = "ContainerFailed"  # kaito's: a container that ran and exited non-zero (a Job's pod)
# failures that waiting does not cure, as opposed to a pod still starting
POD_FAILURES = (IMAGE_PULL_ERROR, CRASH_LOOP, OOM_KILLED, START_ERROR, EVICTED, DISK_PRESSURE, MEMORY_PRESSURE,
                UNSCHEDULABLE, CONTAINER_FAILED)

MESSAGE_LIMIT = 256  # characters of a condition message, as upstream cuts them


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Cond:
    """One condition as a reconcile decides it; `ok` None is status Unknown."""

    type: str
    ok: bool | None
    reason: str
    message: str = ""

    @property
    def status(self) -> str:
        return "Unknown" if self.ok is None else ("True" if self.ok else "False")


def conditions(old: list[dict] | None, new: list[Cond], generation: int | None = None) -> list[dict]:
    """The conditions to write: lastTransitionTime is kept while a condition's status stays the same."""
    before = {c.get("type"): c for c in old or []}
    out = []
    for c in new:
        prev = before.get(c.type)
        since = prev.get("lastTransitionTime") if prev and prev.get("status") == c.status else None
        cond = {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message[:MESSAGE_LIMIT],
                "lastTransitionTime": since or now()}
        if generation is not None:
            cond["observedGeneration"] = generation
        out.append(cond)
    return out


def kept(status: dict, drop: str) -> list[Cond]:
    """A status's conditions as Conds, without the one of type `drop`."""
    return [Cond(c["type"], {"True": True, "False": False}.get(c.get("status")), c.get("reason", ""),
                 c.get("message", "")) for c in status.get("conditions") or [] if c.get("type") != drop]


def find(obj: dict, type_: str) -> dict | None:
    """The condition `type_` of an object's status (any kind: Workspace, Node, Pod, NodeClaim)."""
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)


def is_true(obj: dict, type_: str) -> bool:
    return (find(obj, type_) or {}).get("status") == "True"


def _essence(status: dict) -> dict:
    return {**status, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                     for c in status.get("conditions") or []]}


def changed(old: dict, new: dict) -> bool:
    """Whether writing `new` over `old` (a merge) changes anything but transition times."""
    return _essence({**old, **new}) != _essence(old)


def transitions(old: list[dict] | None, new: list[dict]) -> list[dict]:
    """The conditions of `new` whose status or reason differs from `old`'s."""
    before = {c.get("type"): (c.get("status"), c.get("reason")) for c in old or []}
    return [c for c in new if before.get(c["type"]) != (c["status"], c["reason"])]


def write(kube: Kube, api_version: str, kind: str, name: str, namespace: str | None, old: dict, new: dict,
          *, uid: str | None = None, resource_version: str | None = None, component: str = "kaito-operator") -> bool:
    """Merge `new` into the resource's status when it changes anything, and post a Kubernetes Event
    for each condition that changed (Warning when a condition turned False with a failure reason, or the
    resource is invalid; none for a condition that appears False or Unknown without one: waiting is no
    news).
    With `resource_version` (of the read `old` came from), a status computed from a stale read is
    refused by the API server (ConflictError) instead of overwriting a newer one. Returns whether the
    status was written."""
    if not changed(old, new):
        return False
    kube.patch_status(api_version, kind, name, namespace, new, resource_version)
    seen = {c.get("type") for c in old.get("conditions") or []}
    for cond in transitions(old.get("conditions"), new.get("conditions") or []):
        warning = cond["status"] == "False" and (cond["reason"] in POD_FAILURES + ("NodeClaimFailed", "Failed")
                                                 or cond["reason"] == f"Invalid{kind}")
        if cond["type"] not in seen and cond["status"] != "True" and not warning:
            continue
        event(kube, {"apiVersion": api_version, "kind": kind, "name": name, "namespace": namespace, "uid": uid},
              cond["reason"], f"{cond['type']} is {cond['status']}: {cond['message']}".rstrip(": "),
              warning=warning, component=component)
    return True


def event(kube: Kube, involved: dict[str, Any], reason: str, message: str, *, warning: bool = False,
          component: str = "kaito-operator") -> None:
    """Post a core/v1 Event about `involved` (best effort: an Event that cannot be written is no reason
    to fail a reconcile)."""
    ns = involved.get("namespace") or "default"
    stamp = now()
    body = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{involved['name']}.", "namespace": ns},
        "involvedObject": {k: v for k, v in involved.items() if v is not None},
        "reason": reason, "message": message[:1024], "type": "Warning" if warning else "Normal",
        "source": {"component": component}, "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }
    try:
        kube.create(body)
    except Exception as e:  # noqa: BLE001 - events are informational: said in the log, not retried
        log.warning("event not posted", extra={"object": f"{ns}/{involved['name']}", "reason": reason,
                                               "error": str(e)[:300]})
