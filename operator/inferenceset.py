"""InferenceSet (kaito.sh/v1beta1, upstream KAITO's): a set of identical inference Workspaces, scaled as
one by `kubectl scale`, an HPA or KEDA through the scale subresource.

- Replicas are Workspaces named `<set>-0`, `<set>-1`, ... built from `spec.template` (its labels and
  annotations, `resource.instanceType` / `partition`, `inference`) with `spec.labelSelector` as their node
  selector, the label `inferenceset.kaito.sh/created-by: <set>` and an owner reference to the set.
- Scaling up creates the missing indices; scaling down deletes the highest index first and waits until it
  is gone (its NodeClaims too) before the next.
- `spec.nodeCountLimit` caps replicas x nodes per replica, the node count each Workspace renders with
  (the estimator's, as `render` gives it); beyond it the set runs what fits and says so in
  `InferenceSetReady` (reason `NodeCountLimitExceeded`).
- Status: `replicas` (Workspaces present), `readyReplicas` (Workspaces Ready), `selector` (for the scale
  subresource), conditions `InferenceSetReady` and, while deleting, `InferenceSetDeleting`.
- `scaledobject.kaito.sh/auto-provision: "true"` makes a KEDA ScaledObject owned by the set, whose
  external trigger is kaito's scaler (scaler.py); `ScaledObjectReady` says whether it could be made.
- With the Gateway API Inference Extension on (`--gateway-api-inference-extension`), an InferencePool
  selecting the set's pods and its endpoint picker (Deployment, Service, ServiceAccount, Role).

This module holds what a set is made of, its validation and rendering (pure); the controller that keeps
a set's Workspaces, ScaledObject and gateway objects in place is inferenceset_controller.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from kaito.presets.contract import PORT, SCALER_PORT, WAITING_METRIC

from .api import (
    INFERENCESET_LABEL,
    SCALEDOBJECT_AUTO_PROVISION,
    SCALEDOBJECT_MANAGED_BY,
    SCALEDOBJECT_MAX_REPLICAS,
    SCALEDOBJECT_METRIC_NAME,
    SCALEDOBJECT_MIN_REPLICAS,
    SCALEDOBJECT_THRESHOLD,
    InferenceSet,
    Workspace,
)
from .manifests import ManifestError, Manifests, parse
from .meta import API_VERSION
from .render import RenderOptions
from .validation import FieldError, Lookup, ValidationFailed, validate

log = logging.getLogger("kaito.operator.inferenceset")
KIND = "InferenceSet"
MANAGER = "kaito-operator"  # the scaledobject.kaito.sh/managed-by of the ScaledObjects kaito makes

# KEDA
SCALEDOBJECT = ("keda.sh/v1alpha1", "ScaledObject")
POLLING_INTERVAL_S = 15  # KEDA asks the scaler this often (upstream's choice; KEDA's default is 30)
COOLDOWN_PERIOD_S = 300  # KEDA's default wait before scaling to zero, stated
SCRAPE_TIMEOUT = "3s"
# Gateway API Inference Extension
INFERENCEPOOL = ("inference.networking.k8s.io/v1", "InferencePool")
EPP_IMAGE = "mcr.microsoft.com/oss/v2/llm-d/llm-d-inference-scheduler:v0.7.1"  # upstream's endpoint picker
EPP_PORT, EPP_HEALTH_PORT, EPP_METRICS_PORT = 9002, 9003, 9090


@dataclass
class SetConfig:
    auto_provision: bool = True
    resync: float = 30.0
    render: RenderOptions = field(default_factory=RenderOptions)
    scaler_address: str | None = None  # host:port KEDA reaches kaito's external scaler at
    gateway: bool = False  # render an InferencePool and its endpoint picker per InferenceSet
    epp_image: str = EPP_IMAGE


# --- what a set is made of -------------------------------------------------------------------------------------


def index_of(iset_name: str, ws_name: str) -> int | None:
    """The replica index of a Workspace named `<set>-<index>`, else None."""
    prefix, _, index = ws_name.rpartition("-")
    return int(index) if prefix == iset_name and index.isdigit() else None


def _owner(iset: InferenceSet) -> list[dict[str, Any]]:
    uid = (iset.metadata.model_extra or {}).get("uid")
    return [{"apiVersion": iset.api_version, "kind": KIND, "name": iset.name, "uid": uid, "controller": True,
             "blockOwnerDeletion": True}] if uid else []


def _meta(iset: InferenceSet, name: str, **extra: Any) -> dict[str, Any]:
    meta = {"name": name, "namespace": iset.namespace, "labels": {
        INFERENCESET_LABEL: iset.name, "app.kubernetes.io/managed-by": "kaito", "app.kubernetes.io/name": name}}
    if owner := _owner(iset):
        meta["ownerReferences"] = owner
    return {**meta, **extra}


def workspace_doc(iset: InferenceSet, index: int) -> dict[str, Any]:
    """The Workspace of replica `index`: the template's metadata, resource and inference, the set's node
    label selector, the created-by label and an owner reference to the set."""
    tpl = iset.spec.template
    meta: dict[str, Any] = {"name": iset.workspace_name(index), "namespace": iset.namespace,
                            "labels": {**tpl.metadata.labels, INFERENCESET_LABEL: iset.name}}
    if tpl.metadata.annotations:
        meta["annotations"] = dict(tpl.metadata.annotations)
    if owner := _owner(iset):
        meta["ownerReferences"] = owner
    resource = {**tpl.resource.dump(), "labelSelector": iset.spec.label_selector.dump()}
    return {"apiVersion": API_VERSION, "kind": "Workspace", "metadata": meta, "resource": resource,
            "inference": tpl.inference.dump()}


def workspace(iset: InferenceSet, index: int = 0) -> Workspace:
    ws = parse(workspace_doc(iset, index), f"{KIND} {iset.namespace}/{iset.name}: spec.template")
    assert isinstance(ws, Workspace)
    return ws


# --- validation (the webhook and the CLI call it through validation.validate) -----------------------------------


def validate_set(iset: InferenceSet, old: InferenceSet | None = None, lookup: Lookup | None = None,
                 auto_provision: bool = True) -> list[FieldError]:
    """Upstream's InferenceSet rules: replicas non-negative, instanceType required with auto-provisioning,
    the partition immutable; and the Workspace each replica becomes, validated as a Workspace (its field
    paths under spec.template)."""
    errs: list[FieldError] = []
    spec = iset.spec
    if spec.replicas < 0:
        errs.append(FieldError("spec.replicas", f"invalid value: {spec.replicas}: must be non-negative"))
    if auto_provision and not spec.template.resource.instance_type:
        errs.append(FieldError("spec.template.resource.instanceType", "missing field(s)"))
    if old is not None and spec.template.resource.partition != old.spec.template.resource.partition:
        errs.append(FieldError("spec.template.resource.partition", "field is immutable"))
    try:
        child = workspace(iset)
    except ManifestError as e:
        return [*errs, FieldError("spec.template", str(e))]
    for e in validate(child, lookup=lookup, auto_provision=auto_provision):
        if e.field == "metadata.name" or (e.field == "resource.instanceType" and not auto_provision):
            continue  # the set's own name is checked as such; BYO sizes from the nodes
        where = e.field if e.field.startswith("metadata.") else f"spec.template.{e.field}".rstrip(".")
        errs.append(FieldError(where.replace("spec.template.resource.labelSelector", "spec.labelSelector"),
                               e.message, e.warning))
    return errs


# --- sizing, autoscaling, gateway ---------------------------------------------------------------------------------


def nodes_per_replica(iset: InferenceSet, lookup: Lookup | None, opts: RenderOptions) -> int:
    """The GPU nodes one replica gets: the node count its Workspace renders with (the estimator's for a
    preset); 1 when bring-your-own nodes leave the instance type to the nodes."""
    from .render import render

    ws = workspace(iset)
    if not ws.resource.instance_type:
        return 1
    objects = render(ws, lookup, opts)
    return next((o["spec"]["replicas"] for o in objects if o["kind"] in ("StatefulSet", "Deployment")), 1)


def allowed_replicas(iset: InferenceSet, per_replica: int) -> int:
    limit = iset.spec.node_count_limit
    return iset.spec.replicas if not limit else min(iset.spec.replicas, limit // max(per_replica, 1))


def autoscaling(iset: InferenceSet, per_replica: int, scaler_address: str | None) -> dict[str, Any] | str | None:
    """The KEDA ScaledObject the set's scaledobject.kaito.sh/* annotations ask for; a string saying why
    it cannot be made; None when autoscaling is off. Max replicas: nodeCountLimit // nodes per replica
    when the limit is set, else the max-replicas annotation; min replicas: the min-replicas annotation
    (default 1; 0 lets KEDA scale the set to zero when idle)."""
    notes = iset.metadata.annotations
    if notes.get(SCALEDOBJECT_AUTO_PROVISION, "").lower() != "true":
        return None
    try:
        threshold = int(notes.get(SCALEDOBJECT_THRESHOLD, ""))
        low = int(notes.get(SCALEDOBJECT_MIN_REPLICAS, "1"))
        limit = iset.spec.node_count_limit
        high = limit // max(per_replica, 1) if limit else int(notes.get(SCALEDOBJECT_MAX_REPLICAS, "1"))
    except ValueError:
        return (f"{SCALEDOBJECT_THRESHOLD} must be an integer, and {SCALEDOBJECT_MIN_REPLICAS} / "
                f"{SCALEDOBJECT_MAX_REPLICAS} whole numbers")
    if threshold < 1:
        return f"{SCALEDOBJECT_THRESHOLD} must be a positive integer, not {threshold}"
    if low < 0 or high < max(low, 1):
        return f"max-replicas ({high}) must be at least 1 and at least min-replicas ({low})"
    if not scaler_address:
        return "kaito's external scaler is not configured (kaito-operator run --scaler-port, --scaler-address)"
    metadata = {"scalerAddress": scaler_address, "inferenceSetName": iset.name,
                "inferenceSetNamespace": iset.namespace, "metricName": notes.get(SCALEDOBJECT_METRIC_NAME) or
                WAITING_METRIC, "threshold": str(threshold), "metricProtocol": "http", "metricPath": "/metrics",
                "scrapeTimeout": SCRAPE_TIMEOUT}

    def rules(window: int, period: int) -> dict[str, Any]:  # one replica per period, as upstream
        return {"stabilizationWindowSeconds": window, "selectPolicy": "Max",
                "policies": [{"type": "Pods", "value": 1, "periodSeconds": period}]}

    return {
        "apiVersion": SCALEDOBJECT[0], "kind": SCALEDOBJECT[1],
        "metadata": _meta(iset, iset.name, annotations={SCALEDOBJECT_MANAGED_BY: MANAGER}),
        "spec": {
            "scaleTargetRef": {"apiVersion": iset.api_version, "kind": KIND, "name": iset.name},
            "pollingInterval": POLLING_INTERVAL_S, "cooldownPeriod": COOLDOWN_PERIOD_S,
            "minReplicaCount": low, "maxReplicaCount": high,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {"scaleUp": rules(60, 300),
                                                                        "scaleDown": rules(300, 600)}}},
            "triggers": [{"type": "external", "name": "kaito-scaler", "metricType": "AverageValue",
                          "metadata": metadata}],
        },
    }


def gateway_objects(iset: InferenceSet, epp_image: str = EPP_IMAGE) -> list[dict[str, Any]]:
    """An InferencePool (inference.networking.k8s.io/v1) over the set's pods, and its endpoint picker:
    Deployment, Service (ext-proc gRPC 9002, metrics 9090), ServiceAccount and a Role to read the pods and
    the pool. Only vLLM presets: the picker reads vLLM's metrics."""
    ws = workspace(iset)
    if ws.runtime != "vllm" or ws.inference is None or ws.inference.preset is None:
        return []
    name, epp = iset.name, f"{iset.name}-epp"
    app = {"app": epp}
    pool = {"apiVersion": INFERENCEPOOL[0], "kind": INFERENCEPOOL[1], "metadata": _meta(iset, name),
            "spec": {"selector": {"matchLabels": {INFERENCESET_LABEL: name}}, "targetPorts": [{"number": PORT}],
                     "endpointPickerRef": {"name": epp, "port": {"number": EPP_PORT}, "failureMode": "FailClose"}}}
    read = ["get", "list", "watch"]
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(iset, epp), "rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": read},
        {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"], "verbs": read},
        {"apiGroups": ["inference.networking.x-k8s.io"], "resources": ["inferenceobjectives"], "verbs": read}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(iset, epp),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": epp},
               "subjects": [{"kind": "ServiceAccount", "name": epp, "namespace": iset.namespace}]}
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(iset, epp)}
    probe = {"grpc": {"port": EPP_HEALTH_PORT, "service": "inference-extension"}, "periodSeconds": 10}
    container = {
        "name": "epp", "image": epp_image, "imagePullPolicy": "IfNotPresent",
        "args": ["--pool-name", name, "--pool-namespace", iset.namespace, "--pool-group",
                 "inference.networking.k8s.io", "--grpc-port", str(EPP_PORT), "--grpc-health-port",
                 str(EPP_HEALTH_PORT), "--metrics-port", str(EPP_METRICS_PORT), "--zap-encoder", "json"],
        "ports": [{"name": "grpc", "containerPort": EPP_PORT},
                  {"name": "grpc-health", "containerPort": EPP_HEALTH_PORT},
                  {"name": "metrics", "containerPort": EPP_METRICS_PORT}],
        "readinessProbe": probe, "livenessProbe": {**probe, "initialDelaySeconds": 5},
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(iset, epp), "spec": {
        "replicas": 1, "selector": {"matchLabels": app},
        "template": {"metadata": {"labels": app}, "spec": {"serviceAccountName": epp, "containers": [container]}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(iset, epp), "spec": {
        "selector": app, "type": "ClusterIP", "ports": [
            {"name": "grpc-ext-proc", "port": EPP_PORT, "targetPort": EPP_PORT, "protocol": "TCP",
             "appProtocol": "http2"},
            {"name": "http-metrics", "port": EPP_METRICS_PORT, "targetPort": EPP_METRICS_PORT, "protocol": "TCP"}]}}
    return [pool, account, role, binding, deployment, service]


def render_set(iset: InferenceSet, lookup: Lookup | None = None, opts: RenderOptions | None = None,
               cfg: SetConfig | None = None) -> list[dict[str, Any]]:
    """What `kaito-operator render` shows for an InferenceSet: its Workspaces (as many as the node count
    limit allows), the ScaledObject its annotations ask for and, with the gateway on, its InferencePool."""
    cfg = cfg or SetConfig(render=opts or RenderOptions(), scaler_address=f"kaito-operator:{SCALER_PORT}")
    errs = [e for e in validate_set(iset, lookup=lookup, auto_provision=cfg.render.auto_provision) if not e.warning]
    if errs:
        raise ValidationFailed(iset, errs)
    per = nodes_per_replica(iset, lookup, cfg.render)
    objects = [workspace_doc(iset, i) for i in range(allowed_replicas(iset, per))]
    scaled = autoscaling(iset, per, cfg.scaler_address)
    if isinstance(scaled, str):
        raise ValidationFailed(iset, [FieldError("metadata.annotations", scaled)])
    return objects + ([scaled] if scaled else []) + (gateway_objects(iset, cfg.epp_image) if cfg.gateway else [])


def expand(manifests: Manifests) -> Manifests:
    """The manifests with each InferenceSet replaced by its replicas' Workspaces (the local runner runs
    those: one kaito-serve each)."""
    out = Manifests(objects=manifests.objects)
    for res in manifests.resources:
        out.resources += ([workspace(res, i) for i in range(res.spec.replicas)] if isinstance(res, InferenceSet)
                          else [res])
    return out
