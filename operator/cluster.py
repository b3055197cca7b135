"""Reading the cluster: nodes (readiness, GPUs, NVIDIA feature-discovery labels), NodeClaims (cloud
errors) and pods (why one cannot run, in upstream's reason names). Pure functions over the objects
as the API returns them; the controller and the Azure provisioner share them.
"""

from __future__ import annotations

from kaito.presets import PresetError, get_sku
from kaito.presets.catalogue import skus

from . import status as st

GPU = "nvidia.com/gpu"
NODECLAIM = ("karpenter.sh/v1", "NodeClaim")

# NVIDIA feature discovery reports the usable GPU memory in MiB, the catalogue the advertised size
# (an "80 GB" H100 SXM shows 81559 MiB, a 16 GB T4 15360, a 24 GB A10 23028): this much below still matches.
GPU_MEMORY_TOLERANCE = 0.15


# --- nodes ---------------------------------------------------------------------------------------------


def node_ready(node: dict) -> bool:
    return st.is_true(node, "Ready")


def node_gpus(node: dict, resource: str = GPU) -> int:
    """The node's capacity of `resource`: nvidia.com/gpu, or a MIG slice's nvidia.com/mig-<profile>."""
    cap = (node.get("status") or {}).get("capacity") or {}
    try:
        return int(cap.get(resource, 0))
    except ValueError:
        return 0


def usable(nodes: list[dict], resource: str = GPU) -> list[dict]:
    """The Ready nodes that report GPUs (or the MIG slices `resource` names)."""
    return [n for n in nodes if node_ready(n) and node_gpus(n, resource) > 0]


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
    product = labels.get("nvidia.com/gpu.product", "").upper().replace("_", "-").split("-")
    try:
        count = int(labels.get("nvidia.com/gpu.count", "0"))
        per_gpu = int(labels["nvidia.com/gpu.memory"]) / 1024 if "nvidia.com/gpu.memory" in labels else None
    except ValueError:
        return None
    fits = [s for s in skus() if s.gpu_model.upper() in product and s.gpu_count == count]
    if per_gpu is not None:
        fits = [s for s in fits
                if abs(s.gpu_memory_per_gpu_gib - per_gpu) <= GPU_MEMORY_TOLERANCE * s.gpu_memory_per_gpu_gib]
        fits.sort(key=lambda s: abs(s.gpu_memory_per_gpu_gib - per_gpu))
    return fits[0].name if fits else None


# --- NodeClaims ----------------------------------------------------------------------------------------


def claim_failure(claim: dict) -> str | None:
    """A NodeClaim's cloud error (quota, SKU not available...), as the provisioner reported it."""
    c = st.find(claim, st.LAUNCHED)
    if c and c.get("status") == "False" and c.get("reason") not in (None, "", "Pending", "Launching", "NotLaunched"):
        return f"{claim['metadata']['name']}: {c.get('reason')}: {c.get('message', '')}".strip()
    return None


# --- pods ----------------------------------------------------------------------------------------------

_PULL = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")
_START = ("CreateContainerError", "CreateContainerConfigError", "RunContainerError", "StartError")


def classify_pod(pod: dict, node: dict | None = None) -> tuple[str, str] | None:
    """Why a pod cannot run, as (upstream's reason, message): image pulls, crash loops, OOM kills,
    containers that cannot start, evictions, node pressure and scheduling; None when nothing is wrong
    (yet). `node` is the pod's node, when known, for its pressure conditions."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        message = status.get("message", "")
        if node is not None and st.is_true(node, "DiskPressure") or "ephemeral-storage" in message:
            return st.DISK_PRESSURE, f"pod {name} was evicted: its node is low on disk. {message}".strip()
        if node is not None and st.is_true(node, "MemoryPressure"):
            return st.MEMORY_PRESSURE, f"pod {name} was evicted: its node is low on memory. {message}".strip()
        return st.EVICTED, f"pod {name} was evicted: {message}".strip()
    sched = st.find(pod, "PodScheduled")
    if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
        return st.UNSCHEDULABLE, f"pod {name} cannot be scheduled: {sched.get('message', '')}".strip()
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        c = cs.get("name")
        waiting = (cs.get("state") or {}).get("waiting") or {}
        terminated = (cs.get("state") or {}).get("terminated") or {}
        last = (cs.get("lastState") or {}).get("terminated") or {}
        if waiting.get("reason") in _PULL:
            image = cs.get("image", "its image")
            detail = waiting.get("message") or waiting["reason"]
            return st.IMAGE_PULL_ERROR, f"pod {name}: container {c} cannot pull {image}: {detail}"
        if waiting.get("reason") in _START:
            detail = waiting.get("message") or waiting["reason"]
            return st.START_ERROR, f"pod {name}: container {c} cannot start: {detail}"
        if terminated.get("reason") == "OOMKilled" or (waiting.get("reason") == "CrashLoopBackOff"
                                                       and last.get("reason") == "OOMKilled"):
            return st.OOM_KILLED, f"pod {name}: container {c} was killed for running out of memory (OOMKilled)"
        if waiting.get("reason") == "CrashLoopBackOff":
            code = f" (exit code {last['exitCode']})" if "exitCode" in last else ""
            return st.CRASH_LOOP, f"pod {name}: container {c} keeps crashing{code}"
        if terminated.get("exitCode", 0) != 0:
            why = f" ({terminated['reason']})" if terminated.get("reason") else ""
            return st.START_ERROR if terminated.get("reason") in _START else st.CONTAINER_FAILED, (
                f"pod {name}: container {c} exited with code {terminated['exitCode']}{why}")
    return None
