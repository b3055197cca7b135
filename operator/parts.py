"""The pieces every rendered resource shares: render options (images, node pool), metadata with owner
references and labels, node affinity and GPU tolerations, GPU requests, Services, probes, and the
Karpenter NodeClaims of a resource's GPU nodes."""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from kaito.presets import GPUSku
from kaito.presets.contract import LEADER_PORT, PORT, PULL_SECRETS_DIR, WATCH_PORT
from pydantic import BaseModel

from .api import ENABLE_LB, INFERENCESET_LABEL, NODE_IMAGE_FAMILY, LabelSelector, Resource, Workspace
from .cluster import GPU
from .validation import NODE_IMAGE_FAMILIES

DEFAULT_DISK_GIB = 100  # node disk when no model is known (pod templates, RAGEngines)
# A multi-node Workspace's leader: vLLM's torch.distributed master, and kaito-serve's watch of its workers
MULTINODE_PORTS = [{"name": "leader", "containerPort": LEADER_PORT}, {"name": "watch", "containerPort": WATCH_PORT}]
GPU_TAINT = {"key": "sku", "value": "gpu", "effect": "NoSchedule"}

try:
    VERSION = version("kaito")
except PackageNotFoundError:  # pragma: no cover - running from a plain checkout
    VERSION = "0.1.0"


class RenderOptions(BaseModel):
    """Cluster-specific choices; the defaults suit AKS with Karpenter."""

    image_registry: str = "ghcr.io/kaito-project/kaito"
    image_tag: str = VERSION
    nodepool: str = "kaito"
    downloader_image: str = "curlimages/curl:8.11.1"
    auto_provision: bool = True  # False: the nodes are the user's (GPU partitions are allowed)
    model_mirror: bool = False  # hub weights downloaded once per model and namespace into a ModelMirror's claim
    model_mirror_storage_class: str | None = None  # its StorageClass (ReadWriteMany), unless a Workspace names one
    weights_storage_class: str | None = None  # without a mirror: each pod's download on a claim of this class

    def image(self, component: str) -> str:
        return f"{self.image_registry}/{component}:{self.image_tag}"


NODE_CLASSES = {  # Karpenter node class per cloud
    "azure": {"group": "karpenter.azure.com", "kind": "AKSNodeClass", "name": "default"},
    "aws": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"},
}





def image_pull(name: str, ref: str, runner: str, mount: dict[str, Any], dest: str, secrets: list[str],
               volumes: list[dict[str, Any]]) -> dict[str, Any]:
    """An init container of kaito's image `runner` that copies image `ref`'s files (its /data) into `dest` with
    `kaito-presets pull`: nothing in the image runs, so a FROM scratch image or a plain OCI artifact works.
    Each imagePullSecret is mounted and passed as --auth; its volume is added to `volumes` once."""
    mounts, auth = [mount], []
    for secret in dict.fromkeys(secrets):
        vol = f"pull-secret-{secret.replace('.', '-')}"[:63]
        if not any(v["name"] == vol for v in volumes):
            volumes.append({"name": vol, "secret": {"secretName": secret,
                                                    "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}})
        mounts.append({"name": vol, "mountPath": f"{PULL_SECRETS_DIR}/{secret}", "readOnly": True})
        auth += ["--auth", f"{PULL_SECRETS_DIR}/{secret}/config.json"]
    return {"name": name[:63], "image": runner, "command": ["kaito-presets", "pull", ref, dest, *auth],
            "volumeMounts": mounts}


def meta(resource: Resource, name: str, labels: dict[str, str], **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": resource.namespace, "labels": labels}
    uid = (resource.metadata.model_extra or {}).get("uid")
    if uid:  # owned by the resource, so deleting it deletes these (the controller sets uid)
        meta["ownerReferences"] = [{"apiVersion": resource.api_version, "kind": resource.kind, "name": resource.name,
                                    "uid": uid, "controller": True, "blockOwnerDeletion": True}]
    meta.update(extra)
    return meta


def labels(resource: Resource) -> dict[str, str]:
    key = "kaito.sh/workspace" if isinstance(resource, Workspace) else "kaito.sh/ragengine"
    labels = {key: resource.name, "app.kubernetes.io/managed-by": "kaito", "app.kubernetes.io/name": resource.name}
    if owner := resource.metadata.labels.get(INFERENCESET_LABEL):  # an InferenceSet's replica: its pods are the set's
        labels[INFERENCESET_LABEL] = owner
    return labels


def selector(resource: Resource) -> dict[str, str]:
    key = "kaito.sh/workspace" if isinstance(resource, Workspace) else "kaito.sh/ragengine"
    return {key: resource.name}


def node_affinity(selector: LabelSelector | None) -> dict[str, Any] | None:
    if selector is None:
        return None
    exprs = [{"key": k, "operator": "In", "values": [v]} for k, v in sorted((selector.match_labels or {}).items())]
    exprs += [{"key": e.key, "operator": e.operator, **({"values": e.values} if e.values else {})}
              for e in selector.match_expressions or []]
    if not exprs:
        return None
    return {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": exprs}]}}


TOLERATIONS = [
    {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
]


def gpu_resources(sku: GPUSku | None, resource: str = GPU) -> dict[str, Any]:
    """The pod's GPU request: the SKU's GPUs, or one MIG slice (`resource` nvidia.com/mig-<profile>)."""
    if sku is None:
        return {}
    gpus = str(sku.gpu_count)
    return {"requests": {resource: gpus}, "limits": {resource: gpus}}


def service(ws: Resource, name: str, selector: dict[str, str], target: int) -> dict[str, Any]:
    """The resource's Service on port 80; a LoadBalancer when the Workspace asks (kaito.sh/enablelb)."""
    lb = isinstance(ws, Workspace) and (ws.annotation(ENABLE_LB) or "").lower() == "true"
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(ws, name, labels(ws)),
            "spec": {"type": "LoadBalancer" if lb else "ClusterIP", "selector": selector,
                     "ports": [{"name": "http", "port": 80, "targetPort": target, "protocol": "TCP"}]}}


def secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def http_probe(path: str, period: int, failures: int, delay: int = 0) -> dict[str, Any]:
    probe: dict[str, Any] = {"httpGet": {"path": path, "port": PORT}, "periodSeconds": period,
                             "failureThreshold": failures, "timeoutSeconds": 5}
    if delay:
        probe["initialDelaySeconds"] = delay
    return probe


def nodeclaim_name(resource: Resource, index: int) -> str:
    """`ws` + 10 hex digits: stable for a resource, and short enough for an AKS agent pool name."""
    digest = hashlib.sha256(f"{resource.kind}/{resource.namespace}/{resource.name}/{index}".encode()).hexdigest()
    return ("ws" if isinstance(resource, Workspace) else "rag") + digest[:10]


def render_nodeclaims(resource: Resource, sku: GPUSku, count: int, disk: int, selector: LabelSelector | None,
                      opts: RenderOptions) -> list[dict[str, Any]]:
    """Karpenter NodeClaims for `count` GPU nodes of `sku`, carrying the selector's labels and the GPU taint."""
    match = dict(sorted((selector.match_labels or {}).items())) if selector else {}
    kind_label = "kaito.sh/workspace" if isinstance(resource, Workspace) else "kaito.sh/ragengine"
    labels = {"karpenter.sh/nodepool": opts.nodepool, kind_label: resource.name,
              f"{kind_label}namespace": resource.namespace, **match}
    requirements = [
        {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": [sku.name]},
        {"key": "karpenter.sh/nodepool", "operator": "In", "values": [opts.nodepool]},
        {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
        *({"key": k, "operator": "In", "values": [v]} for k, v in match.items()),
    ]
    annotations = {"karpenter.sh/do-not-disrupt": "true"}
    family = resource.annotation(NODE_IMAGE_FAMILY) if isinstance(resource, Workspace) else None
    if family:  # the provisioner picks the node image (AKS osSKU) from it
        annotations[NODE_IMAGE_FAMILY] = NODE_IMAGE_FAMILIES.get(family.lower(), family)
    return [{
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodeClaim",
        "metadata": {"name": nodeclaim_name(resource, i), "labels": labels, "annotations": annotations},
        "spec": {
            "nodeClassRef": NODE_CLASSES[sku.cloud],
            "requirements": requirements,
            "taints": [GPU_TAINT],
            "resources": {"requests": {"storage": f"{disk}Gi"}},
        },
    } for i in range(count)]
