"""Validation of Workspaces and RAGEngines with upstream KAITO's rules and messages.

`validate(resource, old=None, lookup=...)` returns every problem found (empty list: valid); the
admission webhook (webhook.py) and the CLI both call it. Sizing questions go to
`kaito.presets` (catalogue, SKU table, estimator, vLLM argument builder); nothing is re-derived here.
`lookup(kind, name)` returns the referenced ConfigMap (or None when it does not exist); without a
lookup, referenced ConfigMaps are not checked.
"""

from __future__ import annotations

from typing import Any

import yaml
from kaito.presets import InferenceConfig, PresetError, build_vllm_command, get_model, get_sku
from kaito.presets.catalogue import MIG_PROFILE
from kaito.presets.contract import GUARDRAILS_POLICY_FILE, INFERENCE_CONFIG_FILE, TUNING_CONFIG_FILE
from kaito.presets.hub import HubError, UnsupportedArchitectureError

from . import sizing, sources
from .api import (
    ENABLE_LB,
    MODEL_MIRROR_STORAGE_CLASS,
    MODEL_STREAMING,
    NODE_IMAGE_FAMILY,
    PERFORMANCE_MODE,
    RUNTIME_ANNOTATION,
    USE_LOCAL_WEIGHTS,
    WEIGHTS_STORAGE_CLASS,
    RAGEngine,
    Resource,
    ResourceSpec,
    Workspace,
)
from .problems import DNS1123_LABEL, DNS1123_SUBDOMAIN, FieldError, ValidationFailed

TUNING_METHODS = ("lora", "qlora")
RUNTIMES = ("vllm", "transformers")
PERFORMANCE_MODES = ("balanced", "interactivity", "throughput")
NODE_IMAGE_FAMILIES = {"ubuntu": "Ubuntu", "azurelinux": "AzureLinux"}  # lower-cased value -> AKS osSKU
# upstream's default ConfigMaps (in its release namespace): kaito's built-in defaults stand for them
DEFAULT_TUNING_CONFIGS = {"lora-params-template": "lora", "qlora-params-template": "qlora"}
DEFAULT_INFERENCE_CONFIG = "inference-params-template"

Lookup = sizing.Lookup
__all__ = ["FieldError", "Lookup", "ValidationFailed", "check", "inference_config", "validate"]


def validate(resource: Resource, old: Resource | None = None, lookup: Lookup | None = None,
             auto_provision: bool = True) -> list[FieldError]:
    """Every problem of `resource`. auto_provision=False (bring your own nodes): a Workspace may omit
    `instanceType` (the controller reads the GPUs from the nodes' NVIDIA labels)."""
    errs: list[FieldError] = []
    if not DNS1123_LABEL.match(resource.name) or len(resource.name) > 63:
        errs.append(FieldError("metadata.name", f"{resource.name!r} must be a DNS-1123 label: lowercase letters, "
                                                "digits and '-', starting and ending with a letter or digit, at most 63"))
    if isinstance(resource, Workspace):
        errs += _workspace(resource, lookup, auto_provision)
        if old is not None:
            errs += _workspace_update(resource, old)  # type: ignore[arg-type]
    elif isinstance(resource, RAGEngine):
        errs += _ragengine(resource, lookup)
        if old is not None and old.spec.compute and resource.spec.compute:  # type: ignore[attr-defined]
            errs += _resource_update(resource.spec.compute, old.spec.compute, "spec.compute")  # type: ignore[attr-defined]
    elif resource.kind == "InferenceSet":
        from .inferenceset import validate_set

        errs += validate_set(resource, old, lookup, auto_provision)  # type: ignore[arg-type]
    elif resource.kind == "ModelMirror":
        errs = [e for e in errs if e.field != "metadata.name"]  # a DNS-1123 subdomain, as any cluster object's
        if not DNS1123_SUBDOMAIN.match(resource.name):
            errs.append(FieldError("metadata.name", f"{resource.name!r} must be a DNS-1123 subdomain"))
        errs += validate_mirror(resource, old)  # type: ignore[arg-type]
    return errs


def validate_mirror(mm: Any, old: Any | None) -> list[FieldError]:
    """A ModelMirror, with upstream's rules: the spec is immutable; a Static one names no source or storage; a
    Managed one names both and a StorageClass (the schema checks the registry, the model and the size)."""
    spec = mm.spec
    if old is not None:
        return [] if spec == old.spec else [FieldError("spec", "ModelMirror spec is immutable; delete and recreate "
                                                               "to change")]
    if spec.mode == "Static":
        return [FieldError(f"spec.{f}", "must not be set for a Static mirror") for f in ("source", "storage")
                if getattr(spec, f) is not None]
    errs = [FieldError(f"spec.{f}", "missing field") for f in ("source", "storage") if getattr(spec, f) is None]
    if spec.storage is not None and not spec.storage.storage_class_name:  # its size: the schema's pattern
        errs.append(FieldError("spec.storage.storageClassName", "missing field"))
    return errs


def check(resource: Resource, old: Resource | None = None, lookup: Lookup | None = None,
          auto_provision: bool = True) -> list[FieldError]:
    """validate(), raising ValidationFailed with every error; returns the warnings."""
    found = validate(resource, old, lookup, auto_provision)
    errs = [e for e in found if not e.warning]
    if errs:
        raise ValidationFailed(resource, errs)
    return [e for e in found if e.warning]


# --- Workspace ----------------------------------------------------------------------------------


def _workspace(ws: Workspace, lookup: Lookup | None, auto_provision: bool = True) -> list[FieldError]:
    errs: list[FieldError] = []
    if ws.inference is None and ws.tuning is None:
        return [FieldError("", "Either Inference or Tuning must be specified, not neither")]
    if ws.inference is not None and ws.tuning is not None:
        return [FieldError("", "Either Inference or Tuning must be specified, but not both")]
    errs += _annotations(ws)
    errs += _label_selector(ws.resource)
    sku = None
    if not ws.resource.instance_type and not auto_provision:
        pass  # bring your own nodes: sized from the nodes the label selector finds
    elif not ws.resource.instance_type:
        errs.append(FieldError("resource.instanceType", "instanceType is required when node auto-provisioning is "
                                                        "enabled"))
    else:
        try:
            sku = get_sku(ws.resource.instance_type)
        except PresetError as e:
            errs.append(FieldError("resource.instanceType", _unsupported(e)))
    if ws.resource.partition is not None:
        errs += _partition(ws, auto_provision)
    if ws.inference is not None:
        errs += _inference(ws, sku, lookup)
    else:
        errs += _tuning(ws, lookup)
    return errs


def _annotations(ws: Workspace) -> list[FieldError]:
    errs = []

    def where(key: str) -> str:
        return f"metadata.annotations[{key}]"

    if ws.runtime not in RUNTIMES:
        errs.append(FieldError(where(RUNTIME_ANNOTATION),
                               f"unsupported runtime {ws.runtime!r}; choose one of: {', '.join(RUNTIMES)}"))
    mode = ws.annotation(PERFORMANCE_MODE)
    if mode is not None and mode not in PERFORMANCE_MODES:
        errs.append(FieldError(where(PERFORMANCE_MODE), f"{mode!r} is not a valid performance mode; choose one of: "
                                                        f"{', '.join(PERFORMANCE_MODES)}"))
    elif mode is not None and ws.runtime != "vllm":
        errs.append(FieldError(where(PERFORMANCE_MODE), "performance mode is only supported with the vLLM runtime"))
    local = ws.annotation(USE_LOCAL_WEIGHTS)
    if local is not None and local not in ("true", "false"):
        errs.append(FieldError(where(USE_LOCAL_WEIGHTS), f'{local!r} must be "true" or "false"'))
    family = ws.annotation(NODE_IMAGE_FAMILY)
    if family is not None and family.lower() not in NODE_IMAGE_FAMILIES:
        errs.append(FieldError(where(NODE_IMAGE_FAMILY), f"unsupported node image family {family!r}, supported "
                                                         f"values are {', '.join(NODE_IMAGE_FAMILIES)}"))
    lb = ws.annotation(ENABLE_LB)
    if lb is not None and lb not in ("True", "true", "False", "false"):
        errs.append(FieldError(where(ENABLE_LB), f'{lb!r} must be "True" or "False"'))
    for key in (MODEL_MIRROR_STORAGE_CLASS, WEIGHTS_STORAGE_CLASS):
        klass = ws.annotation(key)
        if klass is not None and (not DNS1123_SUBDOMAIN.match(klass) or len(klass) > 253):
            errs.append(FieldError(where(key), f"{klass!r} is not a StorageClass name (a DNS-1123 subdomain)"))
    return errs


def _partition(ws: Workspace, auto_provision: bool) -> list[FieldError]:
    """resource.partition, upstream's rules: bring your own nodes only; mig takes a profile, accelerator
    a count of whole GPUs; not for tuning."""
    part = ws.resource.partition
    assert part is not None
    if ws.tuning is not None:
        return [FieldError("resource.partition", "GPU partitioning is not supported for tuning workloads")]
    if auto_provision:
        return [FieldError("resource.partition", "GPU partitioning is only supported with BYO nodes "
                                                 "(disableNodeAutoProvisioning=true): run the operator with "
                                                 "--no-auto-provision")]
    if part.mode == sizing.MIG:
        if part.count is not None:
            return [FieldError("resource.partition.count", "count is only valid for accelerator mode")]
        if not part.profile or not MIG_PROFILE.match(part.profile.lower()):
            return [FieldError("resource.partition.profile", f"invalid MIG profile {part.profile!r}: expected "
                                                             "<slices>g.<memory>gb, e.g. 1g.10gb or 3g.40gb")]
        return []
    if part.mode == sizing.ACCELERATOR:
        errs = []
        if part.profile:
            errs.append(FieldError("resource.partition.profile", "profile is not valid for accelerator mode"))
        if part.count is None:
            errs.append(FieldError("resource.partition.count", "missing field: count (GPUs per pod)"))
        return errs
    return [FieldError("resource.partition.mode", f'unsupported partition mode {part.mode!r}, supported modes are '
                                                  '"mig" and "accelerator"')]


def _unsupported(e: PresetError) -> str:
    """get_model/get_sku messages ('unknown preset ...  Did you mean ...') in upstream's words."""
    return "Unsupported " + str(e).removeprefix("unknown ")


def _label_selector(r: ResourceSpec) -> list[FieldError]:
    sel = r.label_selector
    if sel is None or not (sel.match_labels or sel.match_expressions):
        return [FieldError("resource.labelSelector", "labelSelector is required: the labels the GPU nodes carry")]
    errs = []
    for e in sel.match_expressions or []:
        if e.operator in ("In", "NotIn") and not e.values:
            errs.append(FieldError("resource.labelSelector.matchExpressions", f"{e.key}: operator {e.operator} "
                                                                              "needs values"))
        if e.operator in ("Exists", "DoesNotExist") and e.values:
            errs.append(FieldError("resource.labelSelector.matchExpressions", f"{e.key}: operator {e.operator} "
                                                                              "takes no values"))
    return errs


def _inference(ws: Workspace, sku, lookup: Lookup | None) -> list[FieldError]:
    inf = ws.inference
    assert inf is not None
    errs: list[FieldError] = []
    if inf.preset is None and inf.template is None:
        errs.append(FieldError("inference", "Preset or Template must be specified"))
    if inf.preset is not None and inf.template is not None:
        errs.append(FieldError("inference", "Preset and Template cannot be set at the same time"))
    errs += sources.adapters(inf.adapters or [])
    if inf.template is not None:
        from .schemas import schema_errors

        errs += [FieldError("inference.template", m) for m in schema_errors(inf.template, "PodTemplateSpec")]
    if inf.preset is None:
        return errs
    try:
        preset = sizing.model_for(inf.preset, ws.runtime, lookup)
    except UnsupportedArchitectureError as e:
        return errs + [FieldError(f"metadata.annotations[{RUNTIME_ANNOTATION}]", str(e))]
    except HubError as e:
        return errs + [FieldError("inference.preset.name", str(e))]
    except PresetError as e:
        return errs + [FieldError("inference.preset.name", _unsupported(e).replace(
            "Unsupported preset", "Unsupported inference preset name"))]
    options = inf.preset.preset_options
    secret = options.model_access_secret if options else None
    if (options and options.image) or inf.preset.access_mode == "private":
        errs.append(FieldError("inference.preset.presetOptions.image", "private model images are deprecated upstream "
                               "and not used: kaito-serve downloads the weights from Hugging Face", warning=True))
    if preset.requires_token and not secret and ws.annotation(USE_LOCAL_WEIGHTS) != "true":
        # a warning: the weights may come from a mirror or a cache
        errs.append(FieldError("inference.preset.presetOptions.modelAccessSecret",
                               f"{preset.name} is gated on Hugging Face: set a modelAccessSecret with HF_TOKEN key "
                               "under presetOptions, or the download will be refused", warning=True))
    config, cfg_errs = inference_config(inf.config, lookup)
    errs += cfg_errs
    try:
        sku = sizing.partition_sku(ws, sku)
    except PresetError:  # an invalid partition, reported by _partition
        return errs
    if sku is None:
        return errs
    try:
        est = sizing.size(ws, preset, sku, config)
    except PresetError as e:
        context = config.max_model_len if config else None
        field = "inference.config" if context and "context" in str(e) or "KV space" in str(e) else "resource"
        if ws.resource.partition is not None:
            field = "resource.partition"
        return errs + [FieldError(field, str(e))]
    if warning := sizing.count_warning(ws, est):
        errs.append(FieldError("resource.count", warning, warning=True))
    if config is not None:
        try:
            build_vllm_command(preset, sku=sku, node_count=est.node_count, config=config)
        except PresetError as e:
            errs.append(FieldError(f"inference.config ({inf.config})", str(e)))
    return errs


def inference_config(name: str | None, lookup: Lookup | None) -> tuple[InferenceConfig | None, list[FieldError]]:
    """The parsed inference_config.yaml of ConfigMap `name` (None when no config or no lookup)."""
    if not name or lookup is None:
        return None, []
    where = f"inference.config ({name})"
    cm = lookup("ConfigMap", name)
    if cm is None and name == DEFAULT_INFERENCE_CONFIG:
        return None, []
    if cm is None:
        return None, [FieldError(where, f"ConfigMap {name!r} not found in the Workspace's namespace")]
    text = (cm.get("data") or {}).get(INFERENCE_CONFIG_FILE)
    if text is None:
        return None, [FieldError(where, f"ConfigMap {name!r} has no {INFERENCE_CONFIG_FILE} key")]
    try:
        return InferenceConfig.parse(text), []
    except PresetError as e:
        return None, [FieldError(where, str(e))]


def _tuning(ws: Workspace, lookup: Lookup | None) -> list[FieldError]:
    t = ws.tuning
    assert t is not None
    errs: list[FieldError] = []
    method = (t.method or "").lower()
    if method not in TUNING_METHODS:
        errs.append(FieldError("tuning.method", f"Unsupported tuning method {t.method!r}: use lora or qlora"))
    if (ws.resource.count or 1) > 1:
        errs.append(FieldError("resource.count", "Tuning does not currently support multinode configurations. "
                                                 "Please set the node count to 1."))
    if t.preset is None:
        errs.append(FieldError("tuning.preset", "missing field: Preset"))
    else:
        try:
            preset = get_model(t.preset.name)
            if method in TUNING_METHODS and method not in preset.tuning:
                supported = ", ".join(preset.tuning) or "none"
                errs.append(FieldError("tuning.method", f"{preset.name} does not support {method} tuning "
                                                        f"(supported: {supported})"))
        except PresetError as e:
            errs.append(FieldError("tuning.preset.name", _unsupported(e).replace(
                "Unsupported preset", "Unsupported tuning preset name")))
    if t.config and lookup is not None:
        cm = lookup("ConfigMap", t.config)
        if cm is None and t.config in DEFAULT_TUNING_CONFIGS:
            pass
        elif cm is None:
            errs.append(FieldError("tuning.config", f"ConfigMap {t.config!r} not found in the Workspace's namespace"))
        elif TUNING_CONFIG_FILE not in (cm.get("data") or {}):
            errs.append(FieldError("tuning.config", f"ConfigMap {t.config!r} has no {TUNING_CONFIG_FILE} key"))
        else:
            try:
                yaml.safe_load(cm["data"][TUNING_CONFIG_FILE])
            except yaml.YAMLError as e:
                errs.append(FieldError("tuning.config", f"{TUNING_CONFIG_FILE} is not valid YAML: {e}"))
    if t.input is None:
        errs.append(FieldError("tuning.input", "missing field: Input"))
    else:
        errs += sources.data_source(t.input, "tuning.input")
    if t.output is None:
        errs.append(FieldError("tuning.output", "missing field: Output"))
    else:
        errs += sources.data_destination(t.output, "tuning.output")
    return errs


def _workspace_update(new: Workspace, old: Workspace) -> list[FieldError]:
    errs = []
    if (old.inference is None) != (new.inference is None):
        errs.append(FieldError("inference", "Inference field cannot be toggled once set"))
    if (old.tuning is None) != (new.tuning is None):
        errs.append(FieldError("tuning", "Tuning field cannot be toggled once set"))
    errs += _resource_update(new.resource, old.resource, "resource")
    if new.inference and old.inference:
        if _dump(new.inference.preset) != _dump(old.inference.preset):
            errs.append(FieldError("inference.preset", "field is immutable"))
        if (new.inference.template is None) != (old.inference.template is None):
            errs.append(FieldError("inference.template", "field cannot be unset/set if it was set/unset"))
    if new.tuning and old.tuning:
        if _dump(new.tuning.preset) != _dump(old.tuning.preset):
            errs.append(FieldError("tuning.preset", "Preset cannot be changed"))
        if (new.tuning.method or "").lower() != (old.tuning.method or "").lower():
            errs.append(FieldError("tuning.method", "Method cannot be changed"))
    for key in (RUNTIME_ANNOTATION, MODEL_STREAMING):  # upstream's: fixed at creation
        if new.annotation(key) != old.annotation(key):
            errs.append(FieldError(f"metadata.annotations[{key}]", "field is immutable"))
    return errs


def _resource_update(new: ResourceSpec, old: ResourceSpec, where: str) -> list[FieldError]:
    errs = []
    if old.instance_type and new.instance_type != old.instance_type:
        errs.append(FieldError(f"{where}.instanceType", "instanceType cannot be changed once set"))
    if _dump(new.label_selector) != _dump(old.label_selector):
        errs.append(FieldError(f"{where}.labelSelector", "field is immutable"))
    if new.count != old.count:
        errs.append(FieldError(f"{where}.count", "field is immutable"))
    return errs


def _dump(model) -> Any:
    return None if model is None else model.dump()


# --- RAGEngine ----------------------------------------------------------------------------------


def _ragengine(rag: RAGEngine, lookup: Lookup | None = None) -> list[FieldError]:
    """Upstream's rules: compute and inferenceService are optional (no compute: ordinary nodes, CPU
    embeddings; no inference URL: retrieve-only); vectorDB is a Qdrant server; guardrails name a ConfigMap
    holding guardrails.yaml, whose policy is checked when the lookup finds it."""
    spec = rag.spec
    errs: list[FieldError] = []
    if spec.compute is not None and spec.compute.instance_type:
        try:
            get_sku(spec.compute.instance_type)
        except PresetError as e:
            errs.append(FieldError("spec.compute.instanceType", _unsupported(e)))
    if spec.compute is not None and spec.compute.label_selector is not None:
        errs += [FieldError(e.field.replace("resource.", "spec.compute."), e.message)
                 for e in _label_selector(spec.compute)]
    db = spec.storage.vector_db if spec.storage else None
    if db is not None:
        if db.engine.lower() != "qdrant":
            errs.append(FieldError("spec.storage.vectorDB.engine", f"unsupported vector database engine "
                                                                   f"{db.engine!r}; supported: qdrant"))
        errs += sources.http_url(db.url, "spec.storage.vectorDB.url")
    svc = spec.inference_service
    if svc is not None:
        if svc.url:
            errs += sources.http_url(svc.url, "spec.inferenceService.url")
        if not svc.context_window_size or svc.context_window_size <= 0:
            errs.append(FieldError("spec.inferenceService.contextWindowSize", "ContextWindowSize must be a positive "
                                                                              "integer"))
    errs += _guardrails(rag, lookup)
    emb = spec.embedding
    if emb is None:
        return errs + [FieldError("spec.embedding", "Embedding must be specified")]
    if emb.local is None and emb.remote is None:
        errs.append(FieldError("spec.embedding", "Either remote embedding or local embedding must be specified, not "
                                                 "neither"))
    if emb.local is not None and emb.remote is not None:
        errs.append(FieldError("spec.embedding", "Either remote embedding or local embedding must be specified, but "
                                                 "not both"))
    if emb.local is not None:
        if not emb.local.image and not emb.local.model_id:
            errs.append(FieldError("spec.embedding.local", "Either image or modelID must be specified, not neither"))
        if emb.local.image and emb.local.model_id:
            errs.append(FieldError("spec.embedding.local", "Either image or modelID must be specified, but not both"))
        if emb.local.image:
            errs += sources.image(emb.local.image, "spec.embedding.local.image")
    if emb.remote is not None:
        errs += sources.http_url(emb.remote.url, "spec.embedding.remote.url")
    return errs


def _guardrails(rag: RAGEngine, lookup: Lookup | None) -> list[FieldError]:
    """The policy ConfigMap's name, and, when the lookup finds it, its guardrails.yaml: a file kaito-rag
    cannot read is an error, entries it would skip are warnings."""
    g = rag.spec.guardrails
    if g is None or not g.enabled or g.config_map_ref is None:
        return []
    name, where = g.config_map_ref.name, "spec.guardrails.configMapRef.name"
    if not DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
        return [FieldError(where, f"{name!r} is not a valid ConfigMap name")]
    cm = lookup("ConfigMap", name) if lookup else None
    if cm is None:
        return []  # checked when the pod mounts it: the ConfigMap may be applied after the RAGEngine
    text = (cm.get("data") or {}).get(GUARDRAILS_POLICY_FILE)
    if text is None:
        return [FieldError(where, f"ConfigMap {name!r} has no {GUARDRAILS_POLICY_FILE} key")]
    from kaito.ragservice.guardrails import PolicyError, parse_policy  # pydantic and PyYAML only

    try:
        policy = parse_policy(text, f"ConfigMap {name} {GUARDRAILS_POLICY_FILE}", load_encodings=False)
    except PolicyError as e:
        return [FieldError(where, str(e))]
    return [FieldError(where, f"{problem} (the entry is skipped)", warning=True) for _, problem in policy.problems]
