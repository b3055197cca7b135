"""What a resource becomes: pure functions from a validated Workspace / RAGEngine to the Kubernetes
objects that run it. No cluster, no I/O: the same input always renders the same objects.

- inference Workspace -> StatefulSet (+ Service, headless Service) and Karpenter NodeClaims;
  a pod-template Workspace -> Deployment + Service
- tuning Workspace -> Job (+ ConfigMap with the method's default config when none is given), NodeClaim
- RAGEngine -> Deployment + Service (+ NodeClaim for its compute)

Sizing (node count, GPUs, disk, startup budget) comes from `kaito.presets.estimate`; the engine
flags from `kaito.presets.build_vllm_command`, which `kaito-serve` calls again in the pod with the
same inputs (preset, instance type, node count, inference_config.yaml), so the two never disagree.
The plans (`InferencePlan`, `TuningPlan`, `RAGPlan`) are shared with the local runner.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml
from kaito.presets import (Estimate, GPUSku, InferenceConfig, ModelPreset, build_vllm_command, catalogue, get_model,
                           get_sku)
from kaito.presets.estimator import disk_gib, estimate
from pydantic import BaseModel

from .api import AdapterSpec, DataDestination, DataSource, LabelSelector, RAGEngine, Resource, Workspace
from .validation import (
    DEFAULT_INFERENCE_CONFIG,
    DEFAULT_TUNING_CONFIGS,
    INFERENCE_CONFIG_KEY,
    TUNING_CONFIG_KEY,
    Lookup,
    check,
    inference_config,
)

PORT = 5000
RAY_PORT = 6379
CONFIG_DIR = "/mnt/config"
ADAPTERS_DIR = "/mnt/adapter"
DATA_DIR = "/mnt/data"
RESULTS_DIR = "/mnt/results"
WEIGHTS_DIR = "/workspace/weights"
VECTOR_DB_DIR = "/mnt/vector-db"
DEFAULT_DISK_GIB = 100  # node disk when no model is known (pod templates, RAGEngines)
GPU_TAINT = {"key": "sku", "value": "gpu", "effect": "NoSchedule"}
DEFAULTS_DIR = Path(__file__).parent / "tuning_defaults"

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
    pusher_image: str = "ghcr.io/oras-project/oras:v1.2.2"

    def image(self, component: str) -> str:
        return f"{self.image_registry}/{component}:{self.image_tag}"


NODE_CLASSES = {  # Karpenter node class per cloud
    "azure": {"group": "karpenter.azure.com", "kind": "AKSNodeClass", "name": "default"},
    "aws": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"},
}


# --- plans: what to run, shared by render and the local runner ----------------------------------


@dataclass
class InferencePlan:
    workspace: Workspace
    preset: ModelPreset
    sku: GPUSku
    estimate: Estimate
    runtime: str
    config: InferenceConfig | None
    engine_args: list[str]  # the vLLM flags build_vllm_command gives (vllm runtime)
    adapters: list[AdapterSpec] = field(default_factory=list)

    @property
    def node_count(self) -> int:
        return self.estimate.node_count

    def serve_args(self, *, config_path: str | None, adapters_dir: str | None, gpu: bool = True) -> list[str]:
        """kaito-serve's arguments (without host/port); gpu=False: size for the CPU instead of the SKU."""
        args = ["--preset", self.preset.name, "--backend", self.runtime if gpu else _cpu_backend(self.runtime)]
        if gpu:
            args += ["--instance-type", self.sku.name]
            if self.node_count > 1:
                args += ["--node-count", str(self.node_count)]
        if config_path:
            args += ["--config", config_path]
        if adapters_dir:
            args += ["--adapters-dir", adapters_dir]
        return args


def inference_config_text(config: InferenceConfig) -> str:
    """inference_config.yaml as kaito-serve reads it: the user's settings, defaults left out."""
    return yaml.safe_dump(config.model_dump(exclude_defaults=True), sort_keys=False)


def _cpu_backend(runtime: str) -> str:
    return "transformers" if runtime == "transformers" else "auto"


def plan_inference(ws: Workspace, lookup: Lookup | None = None) -> InferencePlan:
    check(ws, lookup=lookup)
    inf = ws.inference
    assert inf is not None and inf.preset is not None and ws.resource.instance_type
    preset = get_model(inf.preset.name)
    sku = get_sku(ws.resource.instance_type)
    config, _ = inference_config(inf.config, lookup)
    context = config.vllm.get("max-model-len") if config else None
    est = estimate(preset, sku, node_count=ws.resource.count, context=context)  # type: ignore[arg-type]
    engine = []
    if ws.runtime == "vllm":
        engine = build_vllm_command(preset, sku=sku, node_count=ws.resource.count, config=config).argv()
    return InferencePlan(ws, preset, sku, est, ws.runtime, config, engine, list(inf.adapters or []))


@dataclass
class TuningPlan:
    workspace: Workspace
    preset: ModelPreset
    sku: GPUSku
    method: str
    config_text: str  # training_config.yaml: the user's ConfigMap, or the method's default
    config_map: str  # the ConfigMap mounted (the user's, or the rendered default)
    input: DataSource
    output: DataDestination
    default_config: bool  # config_map is rendered from kaito's default for the method

    def tune_args(self, *, config_path: str, data: list[str], output: str) -> list[str]:
        return ["--preset", self.preset.name, "--method", self.method, "--config", config_path,
                "--data", *data, "--output", output]


def default_tuning_config(method: str) -> str:
    return (DEFAULTS_DIR / f"{method}.yaml").read_text()


def plan_tuning(ws: Workspace, lookup: Lookup | None = None) -> TuningPlan:
    check(ws, lookup=lookup)
    t = ws.tuning
    assert t is not None and t.preset and t.input and t.output and ws.resource.instance_type
    method = (t.method or "").lower()
    cm = lookup("ConfigMap", t.config) if lookup and t.config else None
    if t.config and cm is None and t.config in DEFAULT_TUNING_CONFIGS:
        text, config_map, default = default_tuning_config(DEFAULT_TUNING_CONFIGS[t.config]), t.config, True
    elif t.config:
        text, config_map, default = ((cm or {}).get("data") or {}).get(TUNING_CONFIG_KEY, ""), t.config, False
    else:
        text, config_map, default = default_tuning_config(method), f"{ws.name}-tuning-config", True
    return TuningPlan(ws, get_model(t.preset.name), get_sku(ws.resource.instance_type), method, text, config_map,
                      t.input, t.output, default)


@dataclass
class RAGPlan:
    engine: RAGEngine
    sku: GPUSku | None
    env: dict[str, str]  # plain settings
    secret_env: dict[str, tuple[str, str]]  # env name -> (secret name, key)
    storage_dir: str


def plan_rag(rag: RAGEngine, lookup: Lookup | None = None) -> RAGPlan:
    """kaito-rag's settings, in the environment variables of its contract."""
    check(rag, lookup=lookup)
    spec = rag.spec
    env: dict[str, str] = {}
    secrets: dict[str, tuple[str, str]] = {}
    emb = spec.embedding
    assert emb is not None and spec.inference_service is not None
    if emb.remote:
        env["EMBEDDING_SOURCE_TYPE"] = "remote"
        env["REMOTE_EMBEDDING_URL"] = emb.remote.url
        if emb.remote.access_secret:
            secrets["REMOTE_EMBEDDING_ACCESS_SECRET"] = (emb.remote.access_secret, "REMOTE_EMBEDDING_ACCESS_SECRET")
    else:
        assert emb.local is not None
        env["EMBEDDING_SOURCE_TYPE"] = "local"
        env["LOCAL_EMBEDDING_MODEL_ID"] = emb.local.model_id or "/mnt/embedding"
        if emb.local.model_access_secret:
            secrets["HF_TOKEN"] = (emb.local.model_access_secret, "HF_TOKEN")
    svc = spec.inference_service
    if svc.url:
        env["LLM_INFERENCE_URL"] = svc.url
    if svc.access_secret:
        secrets["LLM_ACCESS_SECRET"] = (svc.access_secret, "LLM_ACCESS_SECRET")
    if svc.context_window_size:
        env["LLM_CONTEXT_WINDOW"] = str(svc.context_window_size)
    pvc = spec.storage.pvc if spec.storage else None
    storage_dir = (pvc.mount_path if pvc and pvc.mount_path else VECTOR_DB_DIR)
    env["DEFAULT_VECTOR_DB_PERSIST_DIR"] = storage_dir
    sku = get_sku(spec.compute.instance_type) if spec.compute and spec.compute.instance_type else None
    return RAGPlan(rag, sku, env, secrets, storage_dir)


# --- shared pieces ------------------------------------------------------------------------------


def _meta(resource: Resource, name: str, labels: dict[str, str], **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": resource.namespace, "labels": labels}
    uid = (resource.metadata.model_extra or {}).get("uid")
    if uid:  # owned by the resource, so deleting it deletes these (the controller sets uid)
        meta["ownerReferences"] = [{"apiVersion": resource.api_version, "kind": resource.kind, "name": resource.name,
                                    "uid": uid, "controller": True, "blockOwnerDeletion": True}]
    meta.update(extra)
    return meta


def _labels(resource: Resource) -> dict[str, str]:
    key = "kaito.sh/workspace" if isinstance(resource, Workspace) else "kaito.sh/ragengine"
    return {key: resource.name, "app.kubernetes.io/managed-by": "kaito", "app.kubernetes.io/name": resource.name}


def _selector(resource: Resource) -> dict[str, str]:
    key = "kaito.sh/workspace" if isinstance(resource, Workspace) else "kaito.sh/ragengine"
    return {key: resource.name}


def _node_affinity(selector: LabelSelector | None) -> dict[str, Any] | None:
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


def _gpu_resources(sku: GPUSku | None) -> dict[str, Any]:
    if sku is None:
        return {}
    gpus = str(sku.gpu_count)
    return {"requests": {"nvidia.com/gpu": gpus}, "limits": {"nvidia.com/gpu": gpus}}


def model_access_secret(ws: Workspace) -> str | None:
    """The Secret (key HF_TOKEN) that gives access to the workspace's gated preset, inference or tuning."""
    preset = ws.inference.preset if ws.inference else ws.tuning.preset if ws.tuning else None
    return preset.preset_options.model_access_secret if preset and preset.preset_options else None


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _http_probe(path: str, period: int, failures: int, delay: int = 0) -> dict[str, Any]:
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
    return [{
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodeClaim",
        "metadata": {"name": nodeclaim_name(resource, i), "labels": labels,
                     "annotations": {"karpenter.sh/do-not-disrupt": "true"}},
        "spec": {
            "nodeClassRef": NODE_CLASSES[sku.cloud],
            "requirements": requirements,
            "taints": [GPU_TAINT],
            "resources": {"requests": {"storage": f"{disk}Gi"}},
        },
    } for i in range(count)]


# --- inference ----------------------------------------------------------------------------------


def render_inference(plan: InferencePlan, opts: RenderOptions) -> list[dict[str, Any]]:
    ws = plan.workspace
    name, n = ws.name, plan.node_count
    labels, selector = _labels(ws), _selector(ws)
    headless = f"{name}-headless"
    config_map = ws.inference.config if ws.inference else None
    if config_map == DEFAULT_INFERENCE_CONFIG and plan.config is None:  # upstream's default: kaito needs none
        config_map = None
    objects: list[dict[str, Any]] = []
    if plan.config is not None:  # kaito-serve reads the parsed config (upstream-only keys dropped), as rendered
        config_map = f"{name}-inference-config"
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(ws, config_map, labels),
                        "data": {INFERENCE_CONFIG_KEY: inference_config_text(plan.config)}})
    serve = ["kaito-serve", *plan.serve_args(
        config_path=f"{CONFIG_DIR}/{INFERENCE_CONFIG_KEY}" if config_map else None,
        adapters_dir=ADAPTERS_DIR if plan.adapters else None), "--port", str(PORT)]
    env = [{"name": "HF_HOME", "value": WEIGHTS_DIR}]
    if secret := model_access_secret(ws):
        env.append(_secret_env("HF_TOKEN", secret, "HF_TOKEN"))
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "weights", "mountPath": WEIGHTS_DIR}]
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "weights", "emptyDir": {"sizeLimit": f"{plan.estimate.disk_gib}Gi"}},
    ]
    if config_map:
        mounts.append({"name": "config", "mountPath": CONFIG_DIR, "readOnly": True})
        volumes.append({"name": "config", "configMap": {"name": config_map}})
    init: list[dict[str, Any]] = []
    pull_secrets: list[str] = []
    if plan.adapters:
        mounts.append({"name": "adapters", "mountPath": ADAPTERS_DIR})
        volumes.append({"name": "adapters", "emptyDir": {}})
    for a in plan.adapters:
        src = a.source
        assert src is not None and src.name
        if src.image:  # upstream's convention: the adapter lies under /data in the image
            init.append({"name": f"adapter-{src.name}"[:63], "image": src.image,
                         "command": ["sh", "-c", (f"mkdir -p {ADAPTERS_DIR}/{src.name} && "
                                                 f"cp -r /data/. {ADAPTERS_DIR}/{src.name}/")],
                         "volumeMounts": [{"name": "adapters", "mountPath": ADAPTERS_DIR}]})
            pull_secrets += src.image_pull_secrets or []
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
        "resources": _gpu_resources(plan.sku),
        "volumeMounts": mounts,
    }
    if n == 1:
        container["command"] = serve
        container["startupProbe"] = _http_probe("/health", 10, startup_failures)
        container["livenessProbe"] = _http_probe("/health", 10, 3)
        container["readinessProbe"] = _http_probe("/health", 5, 3)
    else:  # leader (pod 0) runs the Ray head and kaito-serve; the other pods join as Ray workers
        leader = f"{name}-0.{headless}.{ws.namespace}.svc.cluster.local"
        script = (f'if [ "$POD_INDEX" = "0" ]; then ray start --head --port={RAY_PORT} && exec {shlex.join(serve)}; '
                  f"else exec ray start --address={leader}:{RAY_PORT} --block; fi")
        health = (f'if [ "$POD_INDEX" = "0" ]; then python3 -c "import urllib.request; '
                  f"urllib.request.urlopen('http://127.0.0.1:{PORT}/health', timeout=5)\"; "
                  f"else ray health-check --address {leader}:{RAY_PORT}; fi")
        container["command"] = ["/bin/sh", "-c", script]
        container["ports"].append({"name": "ray", "containerPort": RAY_PORT})
        env.append({"name": "POD_INDEX",
                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}})
        exec_probe = {"exec": {"command": ["/bin/sh", "-c", health]}, "timeoutSeconds": 10}
        container["startupProbe"] = {**exec_probe, "periodSeconds": 10, "failureThreshold": startup_failures}
        container["livenessProbe"] = {**exec_probe, "periodSeconds": 10, "failureThreshold": 3}
        container["readinessProbe"] = {**exec_probe, "periodSeconds": 5, "failureThreshold": 3}
    pod_annotations = {}
    if plan.engine_args:
        # files shipped with the presets (chat templates) by their package path, not this host's path
        presets_dir = str(Path(catalogue.__file__).parent)
        args = [a.replace(presets_dir, "kaito.presets") for a in plan.engine_args]
        pod_annotations["kaito.sh/engine-args"] = shlex.join(args)
    affinity: dict[str, Any] = {}
    node_affinity = _node_affinity(ws.resource.label_selector)
    if node_affinity:
        affinity["nodeAffinity"] = node_affinity
    if n > 1:
        affinity["podAntiAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": selector}, "topologyKey": "kubernetes.io/hostname"}]}
    pod_spec: dict[str, Any] = {
        **({"initContainers": init} if init else {}),
        "containers": [container],
        "volumes": volumes,
        "tolerations": TOLERATIONS,
        **({"affinity": affinity} if affinity else {}),
        **({"imagePullSecrets": [{"name": s} for s in dict.fromkeys(pull_secrets)]} if pull_secrets else {}),
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(ws, name, labels),
        "spec": {
            "replicas": n,
            "serviceName": headless,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels, **({"annotations": pod_annotations} if pod_annotations
                                                             else {})},
                         "spec": pod_spec},
        },
    }
    leader_selector = {**selector, "apps.kubernetes.io/pod-index": "0"} if n > 1 else selector
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(ws, name, labels),
        "spec": {"type": "ClusterIP", "selector": leader_selector,
                 "ports": [{"name": "http", "port": 80, "targetPort": PORT, "protocol": "TCP"}]},
    }
    headless_ports = [{"name": "http", "port": PORT, "targetPort": PORT, "protocol": "TCP"}]
    if n > 1:
        headless_ports.append({"name": "ray", "port": RAY_PORT, "targetPort": RAY_PORT, "protocol": "TCP"})
    headless_svc = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(ws, headless, labels),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": selector,
                 "ports": headless_ports},
    }
    to_provision = max(0, n - len(ws.resource.preferred_nodes or []))
    claims = render_nodeclaims(ws, plan.sku, to_provision, plan.estimate.disk_gib, ws.resource.label_selector, opts)
    return [*claims, *objects, service, headless_svc, statefulset]


def render_template_workspace(ws: Workspace, opts: RenderOptions) -> list[dict[str, Any]]:
    """inference.template: the user's pod, run as a Deployment behind a Service, on the GPU nodes."""
    assert ws.inference and ws.inference.template is not None and ws.resource.instance_type
    sku = get_sku(ws.resource.instance_type)
    labels, selector = _labels(ws), _selector(ws)
    template = yaml.safe_load(yaml.safe_dump(ws.inference.template))  # a copy
    meta = template.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **labels}
    spec = template.setdefault("spec", {})
    spec.setdefault("tolerations", []).extend(t for t in TOLERATIONS if t not in spec["tolerations"])
    node_affinity = _node_affinity(ws.resource.label_selector)
    if node_affinity and "nodeAffinity" not in spec.get("affinity", {}):
        spec.setdefault("affinity", {})["nodeAffinity"] = node_affinity
    ports = [p for c in spec.get("containers", []) for p in c.get("ports", [])]
    target = ports[0]["containerPort"] if ports else PORT
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(ws, ws.name, labels),
        "spec": {"replicas": ws.resource.count, "selector": {"matchLabels": selector}, "template": template},
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(ws, ws.name, labels),
        "spec": {"type": "ClusterIP", "selector": selector,
                 "ports": [{"name": "http", "port": 80, "targetPort": target, "protocol": "TCP"}]},
    }
    count = max(0, ws.resource.count - len(ws.resource.preferred_nodes or []))
    claims = render_nodeclaims(ws, sku, count, DEFAULT_DISK_GIB, ws.resource.label_selector, opts)
    return [*claims, service, deployment]


# --- tuning -------------------------------------------------------------------------------------


def _url_file(url: str, index: int) -> str:
    import urllib.parse

    base = Path(urllib.parse.urlsplit(url).path).name or "data"
    return f"{index:02d}-{base}"


def render_tuning(plan: TuningPlan, opts: RenderOptions) -> list[dict[str, Any]]:
    ws = plan.workspace
    labels = _labels(ws)
    objects: list[dict[str, Any]] = []
    if plan.default_config:
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(ws, plan.config_map, labels),
                        "data": {TUNING_CONFIG_KEY: plan.config_text}})
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "config", "configMap": {"name": plan.config_map}},
        {"name": "data", **(plan.input.volume_source or {"emptyDir": {}})},
        {"name": "results", **(plan.output.volume_source or {"emptyDir": {}})},
    ]
    init: list[dict[str, Any]] = []
    pull_secrets = list(plan.input.image_pull_secrets or [])
    if plan.input.urls:
        script = " && ".join(f"curl -fsSL --retry 3 -o {DATA_DIR}/{_url_file(u, i)} {shlex.quote(u)}"
                             for i, u in enumerate(plan.input.urls))
        init.append({"name": "data-downloader", "image": opts.downloader_image, "command": ["sh", "-c", script],
                     "volumeMounts": [{"name": "data", "mountPath": DATA_DIR}]})
    elif plan.input.image:  # upstream's convention: the data lies under /data in the image
        init.append({"name": "data-extractor", "image": plan.input.image,
                     "command": ["sh", "-c", f"cp -r /data/. {DATA_DIR}/"],
                     "volumeMounts": [{"name": "data", "mountPath": DATA_DIR}]})
    env = [{"name": "HF_HOME", "value": WEIGHTS_DIR}]
    if secret := model_access_secret(ws):
        env.append(_secret_env("HF_TOKEN", secret, "HF_TOKEN"))
    volumes.append({"name": "weights", "emptyDir": {}})
    tuner = {
        "name": "kaito-tune",
        "image": opts.image("kaito-tune"),
        "command": ["kaito-tune", *plan.tune_args(config_path=f"{CONFIG_DIR}/{TUNING_CONFIG_KEY}", data=[DATA_DIR],
                                                  output=RESULTS_DIR)],
        "env": env,
        "resources": _gpu_resources(plan.sku),
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "data", "mountPath": DATA_DIR},
            {"name": "results", "mountPath": RESULTS_DIR},
            {"name": "weights", "mountPath": WEIGHTS_DIR},
        ],
    }
    if plan.output.image:
        # kaito-tune runs to completion first (an init container), then the adapter folder is pushed
        init.append(tuner)
        volumes.append({"name": "push-secret", "secret": {"secretName": plan.output.image_push_secret,
                                                          "items": [{"key": ".dockerconfigjson",
                                                                     "path": "config.json"}]}})
        containers = [{
            "name": "pusher", "image": opts.pusher_image, "workingDir": RESULTS_DIR,
            "command": ["oras", "push", plan.output.image, "--artifact-type", "application/vnd.kaito.adapter.v1",
                        "."],
            "env": [{"name": "DOCKER_CONFIG", "value": "/mnt/push-secret"}],
            "volumeMounts": [{"name": "results", "mountPath": RESULTS_DIR, "readOnly": True},
                             {"name": "push-secret", "mountPath": "/mnt/push-secret", "readOnly": True}],
        }]
    else:
        containers = [tuner]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        **({"initContainers": init} if init else {}),
        "containers": containers,
        "volumes": volumes,
        "tolerations": TOLERATIONS,
        **({"affinity": {"nodeAffinity": a}} if (a := _node_affinity(ws.resource.label_selector)) else {}),
        **({"imagePullSecrets": [{"name": s} for s in pull_secrets]} if pull_secrets else {}),
    }
    objects.append({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(ws, ws.name, labels),
        "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": pod_spec}},
    })
    claims = render_nodeclaims(ws, plan.sku, 1 - min(1, len(ws.resource.preferred_nodes or [])),
                               disk_gib(plan.preset.weight_size_gib), ws.resource.label_selector, opts)
    return [*claims, *objects]


# --- RAGEngine ----------------------------------------------------------------------------------


def render_rag(plan: RAGPlan, opts: RenderOptions) -> list[dict[str, Any]]:
    rag = plan.engine
    labels, selector = _labels(rag), _selector(rag)
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in plan.env.items()]
    env += [_secret_env(k, s, key) for k, (s, key) in plan.secret_env.items()]
    pvc = rag.spec.storage.pvc if rag.spec.storage else None
    volumes: list[dict[str, Any]] = [
        {"name": "vector-db", **({"persistentVolumeClaim": {"claimName": pvc.persistent_volume_claim}} if pvc
                                 else {"emptyDir": {}})}]
    mounts = [{"name": "vector-db", "mountPath": plan.storage_dir}]
    init = []
    local = rag.spec.embedding.local if rag.spec.embedding else None
    if local and local.image:
        volumes.append({"name": "embedding", "emptyDir": {}})
        mounts.append({"name": "embedding", "mountPath": "/mnt/embedding"})
        init.append({"name": "embedding-model", "image": local.image, "command": ["sh", "-c", ("cp -r /data/. "
                                                                                              "/mnt/embedding/")],
                     "volumeMounts": [{"name": "embedding", "mountPath": "/mnt/embedding"}]})
    container = {
        "name": "kaito-rag",
        "image": opts.image("kaito-rag"),
        "command": ["kaito-rag", "--host", "0.0.0.0", "--port", str(PORT)],
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": env,
        "resources": _gpu_resources(plan.sku),
        "volumeMounts": mounts,
        "startupProbe": _http_probe("/health", 10, 60),
        "livenessProbe": _http_probe("/health", 10, 3),
        "readinessProbe": _http_probe("/health", 5, 3),
    }
    pod_spec: dict[str, Any] = {
        **({"initContainers": init} if init else {}),
        "containers": [container],
        "volumes": volumes,
        **({"tolerations": TOLERATIONS} if plan.sku else {}),
    }
    compute = rag.spec.compute
    affinity = _node_affinity(compute.label_selector) if compute else None
    if affinity:
        pod_spec["affinity"] = {"nodeAffinity": affinity}
    if local and local.image_pull_secret:
        pod_spec["imagePullSecrets"] = [{"name": local.image_pull_secret}]
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(rag, rag.name, labels),
        "spec": {"replicas": 1, "selector": {"matchLabels": selector},
                 "strategy": {"type": "Recreate"},  # one writer of the vector store at a time
                 "template": {"metadata": {"labels": labels}, "spec": pod_spec}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(rag, rag.name, labels),
        "spec": {"type": "ClusterIP", "selector": selector,
                 "ports": [{"name": "http", "port": 80, "targetPort": PORT, "protocol": "TCP"}]},
    }
    claims = []
    if plan.sku and compute:
        count = max(0, compute.count - len(compute.preferred_nodes or []))
        claims = render_nodeclaims(rag, plan.sku, count, DEFAULT_DISK_GIB, compute.label_selector, opts)
    return [*claims, service, deployment]


# --- entry point --------------------------------------------------------------------------------


def render(resource: Resource, lookup: Lookup | None = None, opts: RenderOptions | None = None) -> list[dict]:
    """Validate `resource` (ValidationFailed when invalid) and return the objects it becomes (plain
    data: no object shared between two places)."""
    return json.loads(json.dumps(_render(resource, lookup, opts or RenderOptions())))


def _render(resource: Resource, lookup: Lookup | None, opts: RenderOptions) -> list[dict]:
    if isinstance(resource, RAGEngine):
        return render_rag(plan_rag(resource, lookup), opts)
    assert isinstance(resource, Workspace)
    if resource.tuning is not None:
        return render_tuning(plan_tuning(resource, lookup), opts)
    if resource.inference is not None and resource.inference.template is not None:
        check(resource, lookup=lookup)
        return render_template_workspace(resource, opts)
    return render_inference(plan_inference(resource, lookup), opts)
