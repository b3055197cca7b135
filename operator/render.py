"""What a resource becomes: pure functions from a validated Workspace / RAGEngine to the Kubernetes
objects that run it. No cluster, no I/O: the same input always renders the same objects.

- inference Workspace -> StatefulSet (+ Service, headless Service) and Karpenter NodeClaims;
  a pod-template Workspace -> Deployment + Service
- tuning Workspace -> Job (+ ConfigMap with the method's default config when none is given), NodeClaim
- RAGEngine -> Deployment + Service (+ NodeClaim for its compute)

Sizing (node count, GPUs, disk, startup budget) comes from `kaito.presets.estimate`; the engine
flags from `kaito.presets.build_vllm_command`, which `kaito-serve` calls again in the pod with the
same inputs (preset, instance type, node count, inference_config.yaml), so the two never disagree.
What to run comes from the plans of plan.py, which the local runner shares.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml
from kaito.presets import (
    catalogue,
    get_sku,
)
from kaito.presets.contract import (
    ADAPTERS_DIR,
    CONFIG_DIR,
    DATA_DIR,
    DOCKER_CONFIG_ENV,
    EMBEDDING_DIR,
    GUARDRAILS_DIR,
    GUARDRAILS_POLICY_FILE,
    HF_HOME_ENV,
    HF_TOKEN_ENV,
    INFERENCE_CONFIG_FILE,
    INFERENCE_CONFIG_PATH,
    NODE_RANK_ENV,
    PORT,
    PUSH_SECRET_DIR,
    RESULTS_DIR,
    TUNING_CONFIG_FILE,
    TUNING_CONFIG_PATH,
    VECTOR_DB_DIR,
    WEIGHTS_DIR,
)
from kaito.presets.estimator import disk_gib

from . import parts
from .api import WEIGHTS_STORAGE_CLASS, RAGEngine, Resource, Workspace
from .mirror import MIRROR_LABEL, mirror_for
from .parts import RenderOptions
from .plan import InferencePlan, RAGPlan, TuningPlan, model_access_secret, plan_inference, plan_rag, plan_tuning
from .sizing import gpu_resource
from .validation import DEFAULT_INFERENCE_CONFIG, Lookup, check

# --- inference ----------------------------------------------------------------------------------


def render_inference(plan: InferencePlan, opts: RenderOptions) -> list[dict[str, Any]]:
    ws = plan.workspace
    name, n = ws.name, plan.node_count
    labels, selector = parts.labels(ws), parts.selector(ws)
    headless = f"{name}-headless"
    config_map = ws.inference.config if ws.inference else None
    if config_map == DEFAULT_INFERENCE_CONFIG and plan.config is None:  # upstream's default: kaito needs none
        config_map = None
    objects: list[dict[str, Any]] = []
    if plan.config is not None:  # kaito-serve reads the parsed config (upstream-only keys dropped), as rendered
        config_map = f"{name}-inference-config"
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": parts.meta(ws, config_map, labels),
                        "data": {INFERENCE_CONFIG_FILE: plan.config.to_yaml()}})
    leader = f"{name}-0.{headless}.{ws.namespace}.svc.cluster.local" if n > 1 else None
    serve = ["kaito-serve", *plan.serve_args(
        config_path=INFERENCE_CONFIG_PATH if config_map else None,
        adapters_dir=ADAPTERS_DIR if plan.adapters else None, leader=leader), "--port", str(PORT)]
    env = [{"name": HF_HOME_ENV, "value": WEIGHTS_DIR}]
    if secret := model_access_secret(ws):
        env.append(parts.secret_env(HF_TOKEN_ENV, secret, HF_TOKEN_ENV))
    mirror = mirror_for(plan, opts)
    if mirror:  # made by the controller when missing, shared by the model's Workspaces of the namespace
        objects.append(mirror)
    mounts, volumes, claim_templates = _weights(plan, mirror["metadata"]["name"] if mirror else None, opts)
    mirror_label = {MIRROR_LABEL: mirror["metadata"]["name"]} if mirror else {}  # its users, for its collection
    if config_map:
        mounts.append({"name": "config", "mountPath": CONFIG_DIR, "readOnly": True})
        volumes.append({"name": "config", "configMap": {"name": config_map}})
    init: list[dict[str, Any]] = []
    if not plan.local_weights and plan.preset.source is None:
        # the hub's weights fetched before kaito-serve starts (kaito.presets.weights: locked, verified,
        # resumed), so a long download is not counted against the startup probe; kaito-serve finds the copy.
        # On a mirror's claim: it waits for the mirror's download, then finds the copy complete
        init.append({"name": "weights", "image": opts.image("kaito-serve"),
                     "command": ["kaito-presets", "download", plan.preset.name if plan.in_catalogue
                                 else plan.preset.hf_id],
                     "env": list(env), "volumeMounts": [m for m in mounts if m["name"] == "weights"]})
    if plan.adapters:
        mounts.append({"name": "adapters", "mountPath": ADAPTERS_DIR})
        volumes.append({"name": "adapters", "emptyDir": {}})
    for a in plan.adapters:
        src = a.source
        assert src is not None and src.name
        if src.image:  # its files (upstream's layout: under /data) copied by kaito-serve's image
            init.append(parts.image_pull(f"adapter-{src.name}", src.image, opts.image("kaito-serve"),
                                         {"name": "adapters", "mountPath": ADAPTERS_DIR}, f"{ADAPTERS_DIR}/{src.name}",
                                         src.image_pull_secrets or [], volumes))
        else:
            vol = f"adapter-{src.name}"[:63]
            volumes.append({"name": vol, **(src.volume_source or {})})
            mounts.append({"name": vol, "mountPath": f"{ADAPTERS_DIR}/{src.name}", "readOnly": True})
    startup_failures = -(-plan.estimate.readiness_timeout_s // 10)
    container: dict[str, Any] = {
        "name": "kaito-serve",
        "image": opts.image("kaito-serve"),
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": env,
        "resources": parts.gpu_resources(plan.sku, gpu_resource(ws)),
        "volumeMounts": mounts,
        "command": serve,
        # a worker pod of a multi-node Workspace answers /health too (200 once it has joined the leader)
        "startupProbe": parts.http_probe("/health", 10, startup_failures),
        "livenessProbe": parts.http_probe("/health", 10, 3),
        "readinessProbe": parts.http_probe("/health", 5, 3),
    }
    if n > 1:  # vLLM's own multi-node mode: the same command in every pod, the rank from the pod's index
        container["ports"] += parts.MULTINODE_PORTS
        env.append({"name": NODE_RANK_ENV,
                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}})
        env.append({"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    pod_annotations = {}
    if plan.engine_args:
        # files shipped with the presets (chat templates) by their package path, not this host's path
        presets_dir = str(Path(catalogue.__file__).parent)
        args = [a.replace(presets_dir, "kaito.presets") for a in plan.engine_args]
        pod_annotations["kaito.sh/engine-args"] = shlex.join(args)
    affinity: dict[str, Any] = {}
    node_affinity = parts.node_affinity(ws.resource.label_selector)
    if node_affinity:
        affinity["nodeAffinity"] = node_affinity
    if n > 1:
        affinity["podAntiAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": selector}, "topologyKey": "kubernetes.io/hostname"}]}
    pod_spec: dict[str, Any] = {
        **({"initContainers": init} if init else {}),
        "containers": [container],
        "volumes": volumes,
        "tolerations": parts.TOLERATIONS,
        **({"affinity": affinity} if affinity else {}),
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": parts.meta(ws, name, {**labels, **mirror_label}),
        "spec": {
            "replicas": n,
            "serviceName": headless,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels, **({"annotations": pod_annotations} if pod_annotations
                                                             else {})},
                         "spec": pod_spec},
            # its pods' claims go with the Workspace, and with a scale-down
            **({"volumeClaimTemplates": claim_templates,
                "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete", "whenScaled": "Delete"}}
               if claim_templates else {}),
        },
    }
    leader_selector = {**selector, "apps.kubernetes.io/pod-index": "0"} if n > 1 else selector
    service = parts.service(ws, name, leader_selector, PORT)
    headless_ports = [{"name": p["name"], "port": p["containerPort"], "targetPort": p["containerPort"],
                       "protocol": "TCP"} for p in container["ports"]]
    headless_svc = {
        "apiVersion": "v1", "kind": "Service", "metadata": parts.meta(ws, headless, labels),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": selector,
                 "ports": headless_ports},
    }
    to_provision = 0 if ws.resource.partition else max(0, n - len(ws.resource.preferred_nodes or []))
    claims = parts.render_nodeclaims(ws, plan.sku, to_provision, plan.estimate.disk_gib, ws.resource.label_selector,
                                     opts)
    return [*claims, *objects, service, headless_svc, statefulset]


def _weights(plan: InferencePlan, mirror: str | None, opts: RenderOptions) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Where a serving pod keeps weights (its mounts, volumes and claim templates): the claim of the model's
    ModelMirror or the user's PVC (presetOptions.modelWeightsPVC), else a claim of its own when a weights
    StorageClass is given (kaito.sh/weights-storage-class, or the operator's), else an emptyDir sized for the
    download (every restart downloads again); and the node's folder of kaito.sh/use-local-weights (read-only)."""
    ws = plan.workspace
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "weights", "mountPath": WEIGHTS_DIR}]
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    claims: list[dict[str, Any]] = []
    preset = ws.inference.preset if ws.inference else None
    options = preset.preset_options if preset else None
    klass = ws.annotation(WEIGHTS_STORAGE_CLASS) or opts.weights_storage_class
    if mirror:
        volumes.append({"name": "weights", "persistentVolumeClaim": {"claimName": mirror}})
    elif options and options.model_weights_pvc:
        volumes.append({"name": "weights", "persistentVolumeClaim": {"claimName": options.model_weights_pvc}})
        if options.model_weights_sub_path:
            mounts[1]["subPath"] = options.model_weights_sub_path
    elif klass and not plan.local_weights and plan.preset.source is None:
        claims.append({"metadata": {"name": "weights"}, "spec": {
            "accessModes": ["ReadWriteOnce"], "storageClassName": klass,
            "resources": {"requests": {"storage": f"{plan.estimate.disk_gib}Gi"}}}})
    else:
        volumes.append({"name": "weights", "emptyDir": {"sizeLimit": f"{plan.estimate.disk_gib}Gi"}})
    if plan.local_weights:
        mounts.append({"name": "local-weights", "mountPath": plan.local_weights, "readOnly": True})
        volumes.append({"name": "local-weights", "hostPath": {"path": plan.local_weights, "type": "Directory"}})
    return mounts, volumes, claims


def render_template_workspace(ws: Workspace, opts: RenderOptions) -> list[dict[str, Any]]:
    """inference.template: the user's pod, run as a Deployment behind a Service, on the GPU nodes."""
    assert ws.inference and ws.inference.template is not None and ws.resource.instance_type
    sku = get_sku(ws.resource.instance_type)
    labels, selector = parts.labels(ws), parts.selector(ws)
    template = yaml.safe_load(yaml.safe_dump(ws.inference.template))  # a copy
    meta = template.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **labels}
    spec = template.setdefault("spec", {})
    spec.setdefault("tolerations", []).extend(t for t in parts.TOLERATIONS if t not in spec["tolerations"])
    node_affinity = parts.node_affinity(ws.resource.label_selector)
    if node_affinity and "nodeAffinity" not in spec.get("affinity", {}):
        spec.setdefault("affinity", {})["nodeAffinity"] = node_affinity
    ports = [p for c in spec.get("containers", []) for p in c.get("ports", [])]
    target = ports[0]["containerPort"] if ports else PORT
    replicas = ws.resource.count or 1
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": parts.meta(ws, ws.name, labels),
        "spec": {"replicas": replicas, "selector": {"matchLabels": selector}, "template": template},
    }
    service = parts.service(ws, ws.name, selector, target)
    count = max(0, replicas - len(ws.resource.preferred_nodes or []))
    claims = parts.render_nodeclaims(ws, sku, count, parts.DEFAULT_DISK_GIB, ws.resource.label_selector, opts)
    return [*claims, service, deployment]


# --- tuning -------------------------------------------------------------------------------------


def _url_file(url: str, index: int) -> str:
    import urllib.parse

    base = Path(urllib.parse.urlsplit(url).path).name or "data"
    return f"{index:02d}-{base}"


def render_tuning(plan: TuningPlan, opts: RenderOptions) -> list[dict[str, Any]]:
    ws = plan.workspace
    labels = parts.labels(ws)
    objects: list[dict[str, Any]] = []
    if plan.default_config:
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": parts.meta(ws, plan.config_map, labels),
                        "data": {TUNING_CONFIG_FILE: plan.config_text}})
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "config", "configMap": {"name": plan.config_map}},
        {"name": "data", **(plan.input.volume_source or {"emptyDir": {}})},
        {"name": "results", **(plan.output.volume_source or {"emptyDir": {}})},
    ]
    init: list[dict[str, Any]] = []
    if plan.input.urls:
        script = " && ".join(f"curl -fsSL --retry 3 -o {DATA_DIR}/{_url_file(u, i)} {shlex.quote(u)}"
                             for i, u in enumerate(plan.input.urls))
        init.append({"name": "data-downloader", "image": opts.downloader_image, "command": ["sh", "-c", script],
                     "volumeMounts": [{"name": "data", "mountPath": DATA_DIR}]})
    elif plan.input.image:  # its files (upstream's layout: under /data) copied by kaito-tune's image
        init.append(parts.image_pull("data-extractor", plan.input.image, opts.image("kaito-tune"),
                                     {"name": "data", "mountPath": DATA_DIR}, DATA_DIR,
                                     plan.input.image_pull_secrets or [], volumes))
    env = [{"name": HF_HOME_ENV, "value": WEIGHTS_DIR}]
    if secret := model_access_secret(ws):
        env.append(parts.secret_env(HF_TOKEN_ENV, secret, HF_TOKEN_ENV))
    volumes.append({"name": "weights", "emptyDir": {}})
    tuner = {
        "name": "kaito-tune",
        "image": opts.image("kaito-tune"),
        "command": ["kaito-tune", *plan.tune_args(config_path=TUNING_CONFIG_PATH, data=[DATA_DIR],
                                                  output=RESULTS_DIR)],
        "env": env,
        "resources": parts.gpu_resources(plan.sku),
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "data", "mountPath": DATA_DIR},
            {"name": "results", "mountPath": RESULTS_DIR},
            {"name": "weights", "mountPath": WEIGHTS_DIR},
        ],
    }
    if plan.output.image:  # kaito-tune --push, with the push secret as its Docker config
        env.append({"name": DOCKER_CONFIG_ENV, "value": PUSH_SECRET_DIR})
        tuner["volumeMounts"].append({"name": "push-secret", "mountPath": PUSH_SECRET_DIR, "readOnly": True})
        volumes.append({"name": "push-secret", "secret": {"secretName": plan.output.image_push_secret,
                                                          "items": [{"key": ".dockerconfigjson",
                                                                     "path": "config.json"}]}})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        **({"initContainers": init} if init else {}),
        "containers": [tuner],
        "volumes": volumes,
        "tolerations": parts.TOLERATIONS,
        **({"affinity": {"nodeAffinity": a}} if (a := parts.node_affinity(ws.resource.label_selector)) else {}),
    }
    objects.append({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": parts.meta(ws, ws.name, labels),
        "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": pod_spec}},
    })
    claims = parts.render_nodeclaims(ws, plan.sku, 1 - min(1, len(ws.resource.preferred_nodes or [])),
                               disk_gib(plan.preset.weight_size_gib), ws.resource.label_selector, opts)
    return [*claims, *objects]


# --- RAGEngine ----------------------------------------------------------------------------------


def render_rag(plan: RAGPlan, opts: RenderOptions) -> list[dict[str, Any]]:
    rag = plan.engine
    labels, selector = parts.labels(rag), parts.selector(rag)
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in plan.env.items()]
    env += [parts.secret_env(k, s, key) for k, (s, key) in plan.secret_env.items()]
    pvc = rag.spec.storage.pvc if rag.spec.storage else None
    volumes: list[dict[str, Any]] = [
        {"name": "vector-db", **({"persistentVolumeClaim": {"claimName": pvc.persistent_volume_claim}} if pvc
                                 else {"emptyDir": {}})}]
    # a volume is mounted whole; the store is the RAGEngine's sub-folder of it (plan.storage_dir)
    mounts = [{"name": "vector-db", "mountPath": (pvc.mount_path or VECTOR_DB_DIR) if pvc else plan.storage_dir}]
    policy_objects = []
    if plan.guardrails_config_map:  # the guardrails policy, a file kaito-rag reloads when the ConfigMap changes
        volumes.append({"name": "guardrails-policy", "configMap": {"name": plan.guardrails_config_map}})
        mounts.append({"name": "guardrails-policy", "mountPath": GUARDRAILS_DIR, "readOnly": True})
        if plan.guardrails_default is not None:
            policy_objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                                   "metadata": parts.meta(rag, plan.guardrails_config_map, labels),
                                   "data": {GUARDRAILS_POLICY_FILE: plan.guardrails_default}})
    init = []
    local = rag.spec.embedding.local if rag.spec.embedding else None
    if local and local.image:
        volumes.append({"name": "embedding", "emptyDir": {}})
        mounts.append({"name": "embedding", "mountPath": EMBEDDING_DIR})
        init.append(parts.image_pull("embedding-model", local.image, opts.image("kaito-rag"),
                                     {"name": "embedding", "mountPath": EMBEDDING_DIR}, EMBEDDING_DIR,
                                     [local.image_pull_secret] if local.image_pull_secret else [], volumes))
    container = {
        "name": "kaito-rag",
        "image": opts.image("kaito-rag"),
        "command": ["kaito-rag", "--host", "0.0.0.0", "--port", str(PORT)],
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": env,
        "resources": parts.gpu_resources(plan.sku),
        "volumeMounts": mounts,
        "startupProbe": parts.http_probe("/health", 10, 60),
        "livenessProbe": parts.http_probe("/health", 10, 3),
        "readinessProbe": parts.http_probe("/health", 5, 3),
    }
    pod_spec: dict[str, Any] = {
        **({"initContainers": init} if init else {}),
        "containers": [container],
        "volumes": volumes,
        **({"tolerations": parts.TOLERATIONS} if plan.sku else {}),
    }
    compute = rag.spec.compute
    affinity = parts.node_affinity(compute.label_selector) if compute else None
    if affinity:
        pod_spec["affinity"] = {"nodeAffinity": affinity}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": parts.meta(rag, rag.name, labels),
        "spec": {"replicas": 1, "selector": {"matchLabels": selector},
                 "strategy": {"type": "Recreate"},  # one writer of the vector store at a time
                 "template": {"metadata": {"labels": labels}, "spec": pod_spec}},
    }
    service = parts.service(rag, rag.name, selector, PORT)
    claims = []
    if plan.sku and compute:
        count = max(0, (compute.count or 1) - len(compute.preferred_nodes or []))
        claims = parts.render_nodeclaims(rag, plan.sku, count, parts.DEFAULT_DISK_GIB, compute.label_selector, opts)
    return [*claims, *policy_objects, service, deployment]


# --- entry point --------------------------------------------------------------------------------


def render(resource: Resource, lookup: Lookup | None = None, opts: RenderOptions | None = None) -> list[dict]:
    """Validate `resource` (ValidationFailed when invalid) and return the objects it becomes (plain
    data: no object shared between two places)."""
    return json.loads(json.dumps(_render(resource, lookup, opts or RenderOptions())))


def _render(resource: Resource, lookup: Lookup | None, opts: RenderOptions) -> list[dict]:
    if resource.kind == "InferenceSet":
        from .inferenceset import render_set

        return render_set(resource, lookup, opts)  # type: ignore[arg-type]
    if isinstance(resource, RAGEngine):
        return render_rag(plan_rag(resource, lookup), opts)
    assert isinstance(resource, Workspace)
    if resource.tuning is not None:
        return render_tuning(plan_tuning(resource, lookup), opts)
    if resource.inference is not None and resource.inference.template is not None:
        check(resource, lookup=lookup)
        return render_template_workspace(resource, opts)
    return render_inference(plan_inference(resource, lookup, opts.auto_provision), opts)
