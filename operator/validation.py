"""Validation of Workspaces and RAGEngines with upstream KAITO's rules and messages.

`validate(resource, old=None, lookup=...)` returns every problem found (empty list: valid); the
admission webhook (`admission_review`) and the CLI both call it. Sizing questions go to
`kaito.presets` (catalogue, SKU table, estimator, vLLM argument builder); nothing is re-derived here.
`lookup(kind, name)` returns the referenced ConfigMap (or None when it does not exist); without a
lookup, referenced ConfigMaps are not checked.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from kaito.presets import InferenceConfig, PresetError, build_vllm_command, get_model, get_sku
from kaito.presets.estimator import estimate
from pydantic import ValidationError

from .api import AdapterSpec, DataDestination, DataSource, RAGEngine, Resource, ResourceSpec, Workspace

MAX_ADAPTERS = 10
TUNING_METHODS = ("lora", "qlora")
RUNTIMES = ("vllm", "transformers")
INFERENCE_CONFIG_KEY = "inference_config.yaml"
TUNING_CONFIG_KEY = "training_config.yaml"
# upstream's default ConfigMaps (in its release namespace): kaito's built-in defaults stand for them
DEFAULT_TUNING_CONFIGS = {"lora-params-template": "lora", "qlora-params-template": "qlora"}
DEFAULT_INFERENCE_CONFIG = "inference-params-template"
METADATA_HOSTS = {"metadata.google.internal", "metadata.google", "instance-data.ec2.internal", "metadata.azure.com"}
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

Lookup = Callable[[str, str], "dict[str, Any] | None"]


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str
    warning: bool = False  # admitted, but the user is told (AdmissionReview `warnings`)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class ValidationFailed(ValueError):
    def __init__(self, resource: Resource, errors: list[FieldError]) -> None:
        self.errors = errors
        lines = "\n  ".join(str(e) for e in errors)
        super().__init__(f"{resource.kind} {resource.namespace}/{resource.name} is invalid:\n  {lines}")


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
        errs += _ragengine(resource)
        if old is not None and old.spec.compute and resource.spec.compute:  # type: ignore[attr-defined]
            errs += _resource_update(resource.spec.compute, old.spec.compute, "spec.compute")  # type: ignore[attr-defined]
    return errs


def check(resource: Resource, old: Resource | None = None, lookup: Lookup | None = None) -> list[FieldError]:
    """validate(), raising ValidationFailed with every error; returns the warnings."""
    found = validate(resource, old, lookup)
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
    if ws.runtime not in RUNTIMES:
        errs.append(FieldError("metadata.annotations[kaito.sh/runtime]",
                               f"unsupported runtime {ws.runtime!r}; choose one of: {', '.join(RUNTIMES)}"))
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
    if ws.inference is not None:
        errs += _inference(ws, sku, lookup)
    else:
        errs += _tuning(ws, lookup)
    return errs


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
    errs += _adapters(inf.adapters or [])
    if inf.template is not None:
        from .schemas import schema_errors

        errs += [FieldError("inference.template", m) for m in schema_errors(inf.template, "PodTemplateSpec")]
    if inf.preset is None:
        return errs
    try:
        preset = get_model(inf.preset.name)
    except PresetError as e:
        return errs + [FieldError("inference.preset.name", _unsupported(e).replace(
            "Unsupported preset", "Unsupported inference preset name"))]
    options = inf.preset.preset_options
    secret = options.model_access_secret if options else None
    if (options and options.image) or inf.preset.access_mode == "private":
        errs.append(FieldError("inference.preset.presetOptions.image", "private model images are deprecated upstream "
                               "and not used: kaito-serve downloads the weights from Hugging Face", warning=True))
    if preset.requires_token and not secret:  # a warning: the weights may come from a mirror or a cache
        errs.append(FieldError("inference.preset.presetOptions.modelAccessSecret",
                               f"{preset.name} is gated on Hugging Face: set a modelAccessSecret with HF_TOKEN key "
                               "under presetOptions, or the download will be refused", warning=True))
    if ws.runtime not in preset.runtimes and ws.runtime in RUNTIMES:
        errs.append(FieldError("metadata.annotations[kaito.sh/runtime]",
                               f"{preset.name} does not run on the {ws.runtime} runtime"))
    config, cfg_errs = inference_config(inf.config, lookup)
    errs += cfg_errs
    if sku is None:
        return errs
    context = config.vllm.get("max-model-len") if config else None
    try:
        est = estimate(preset, sku, node_count=ws.resource.count, context=context)  # type: ignore[arg-type]
    except PresetError as e:
        field = "inference.config" if context and "context" in str(e) or "KV space" in str(e) else "resource"
        return errs + [FieldError(field, str(e))]
    if est.node_count > 1 and ws.runtime == "transformers":
        errs.append(FieldError("metadata.annotations[kaito.sh/runtime]",
                               f"Multi-node distributed inference is not supported with Huggingface Transformers "
                               f"runtime: {preset.name} needs {est.node_count} nodes of {sku.name}"))
    if config is not None:
        try:
            build_vllm_command(preset, sku=sku, node_count=ws.resource.count, config=config)
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
    text = (cm.get("data") or {}).get(INFERENCE_CONFIG_KEY)
    if text is None:
        return None, [FieldError(where, f"ConfigMap {name!r} has no {INFERENCE_CONFIG_KEY} key")]
    try:
        return parse_inference_config(text), []
    except PresetError as e:
        return None, [FieldError(where, str(e))]


def parse_inference_config(text: str) -> InferenceConfig:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise PresetError(f"{INFERENCE_CONFIG_KEY} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise PresetError(f"{INFERENCE_CONFIG_KEY} must hold a mapping with a `vllm:` section")
    data.pop("max_probe_steps", None)  # upstream's own sizing knob: kaito's estimator sizes instead
    try:
        return InferenceConfig(**data)
    except ValidationError as e:
        err = e.errors()[0]
        raise PresetError(f"{INFERENCE_CONFIG_KEY}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def _adapters(adapters: list[AdapterSpec]) -> list[FieldError]:
    errs: list[FieldError] = []
    if len(adapters) > MAX_ADAPTERS:
        errs.append(FieldError("inference.adapters", f"Number of Adapters exceeds the maximum limit, maximum of "
                                                     f"{MAX_ADAPTERS} allowed"))
    seen: set[str] = set()
    for i, a in enumerate(adapters):
        where = f"inference.adapters[{i}]"
        src = a.source
        if src is None:
            errs.append(FieldError(where, "missing field: source"))
            continue
        if not src.name:
            errs.append(FieldError(f"{where}.source.name", "Name of Adapter field must be specified"))
        elif not DNS1123_SUBDOMAIN.match(src.name) or len(src.name) > 253:
            errs.append(FieldError(f"{where}.source.name", f"{src.name!r} must be a DNS-1123 subdomain (lowercase "
                                                           "letters, digits, '-' and '.')"))
        elif src.name in seen:
            errs.append(FieldError(f"{where}.source.name", f"Duplicate adapter source name found: {src.name}"))
        seen.add(src.name or "")
        if src.urls:
            errs.append(FieldError(f"{where}.source.urls", "URLs are not supported as adapter source"))
        if not src.image and src.volume_source is None:
            errs.append(FieldError(f"{where}.source", "Either Image or Volume must be specified for adapter source"))
        if src.image and src.volume_source is not None:
            errs.append(FieldError(f"{where}.source", "Image and Volume cannot both be specified for adapter source"))
        errs += _volume(src.volume_source, f"{where}.source.volumeSource")
        strength = a.strength if a.strength is not None else "1.0"
        try:
            value = float(strength)
        except ValueError:
            errs.append(FieldError(f"{where}.strength", f"Invalid strength value for Adapter '{src.name}': "
                                                        f"{strength!r} is not a number"))
            continue
        if not 0 <= value <= 1:
            errs.append(FieldError(f"{where}.strength", f"Strength value for Adapter '{src.name}' must be between 0 "
                                                        "and 1"))
    return errs


def _volume(volume: dict | None, where: str) -> list[FieldError]:
    if volume is None:
        return []
    from .schemas import schema_errors

    return [FieldError(where, m) for m in schema_errors(volume, "VolumeSource")]


def _tuning(ws: Workspace, lookup: Lookup | None) -> list[FieldError]:
    t = ws.tuning
    assert t is not None
    errs: list[FieldError] = []
    method = (t.method or "").lower()
    if method not in TUNING_METHODS:
        errs.append(FieldError("tuning.method", f"Unsupported tuning method {t.method!r}: use lora or qlora"))
    if ws.resource.count > 1:
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
        elif TUNING_CONFIG_KEY not in (cm.get("data") or {}):
            errs.append(FieldError("tuning.config", f"ConfigMap {t.config!r} has no {TUNING_CONFIG_KEY} key"))
        else:
            try:
                yaml.safe_load(cm["data"][TUNING_CONFIG_KEY])
            except yaml.YAMLError as e:
                errs.append(FieldError("tuning.config", f"{TUNING_CONFIG_KEY} is not valid YAML: {e}"))
    if t.input is None:
        errs.append(FieldError("tuning.input", "missing field: Input"))
    else:
        errs += _data_source(t.input, "tuning.input")
    if t.output is None:
        errs.append(FieldError("tuning.output", "missing field: Output"))
    else:
        errs += _data_destination(t.output, "tuning.output")
    return errs


def _data_source(src: DataSource, where: str) -> list[FieldError]:
    errs = []
    given = sum([bool(src.urls), bool(src.image), src.volume_source is not None])
    if given != 1:
        errs.append(FieldError(where, "Exactly one of URLs, Volume, or Image must be specified"))
    for url in src.urls or []:
        problem = url_problem(url)
        if problem:
            errs.append(FieldError(f"{where}.urls", f"{url}: {problem}"))
    if src.image:
        errs += _image(src.image, f"{where}.image")
    errs += _volume(src.volume_source, f"{where}.volumeSource")
    return errs


def _data_destination(dst: DataDestination, where: str) -> list[FieldError]:
    errs = []
    if bool(dst.image) + (dst.volume_source is not None) != 1:
        errs.append(FieldError(where, "Exactly one of Volume or Image must be specified"))
    if dst.image:
        errs += _image(dst.image, f"{where}.image")
        if not dst.image_push_secret:
            errs.append(FieldError(f"{where}.imagePushSecret", "Must specify imagePushSecret with destination image"))
    errs += _volume(dst.volume_source, f"{where}.volumeSource")
    return errs


IMAGE_REF = re.compile(r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
                       r"(?::[\w][\w.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$")


def _image(ref: str, where: str) -> list[FieldError]:
    if not IMAGE_REF.match(ref):
        return [FieldError(where, f"Unable to parse image reference {ref!r}")]
    return []


def url_problem(url: str) -> str | None:
    """Why a data-source URL is refused (upstream's rules), or None. Only http(s), and never a
    loopback, private, link-local or cloud-metadata address."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme.lower() not in ("http", "https"):
        return "data source URL must use HTTP or HTTPS"
    host = (parsed.hostname or "").lower()
    if not host:
        return "invalid data source URL"
    if host == "localhost" or host.endswith(".localhost") or host in METADATA_HOSTS:
        return "data source URL must not target a local or metadata endpoint"
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    if ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return "data source URL must not target a loopback, private, or link-local address"
    return None


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
    if new.metadata.annotations.get("kaito.sh/runtime") != old.metadata.annotations.get("kaito.sh/runtime"):
        errs.append(FieldError("metadata.annotations[kaito.sh/runtime]", "field is immutable"))
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


def _ragengine(rag: RAGEngine) -> list[FieldError]:
    spec = rag.spec
    errs: list[FieldError] = []
    if spec.compute is None:
        errs.append(FieldError("spec.compute", "Compute resource must be specified"))
    elif spec.compute.instance_type:
        try:
            get_sku(spec.compute.instance_type)
        except PresetError as e:
            errs.append(FieldError("spec.compute.instanceType", _unsupported(e)))
    if spec.storage and spec.storage.vector_db:
        errs.append(FieldError("spec.storage.vectorDB", "external vector databases are not supported: kaito-rag "
                                                        "keeps its FAISS index in the storage volume"))
    svc = spec.inference_service
    if svc is None:
        errs.append(FieldError("spec.inferenceService", "InferenceService must be specified"))
    else:
        if svc.url:
            parsed = urllib.parse.urlsplit(svc.url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                errs.append(FieldError("spec.inferenceService.url", f"URL input error: {svc.url!r} is not an "
                                                                    "http(s) URL"))
        if not svc.context_window_size or svc.context_window_size <= 0:
            errs.append(FieldError("spec.inferenceService.contextWindowSize", "ContextWindowSize must be a positive "
                                                                              "integer"))
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
            errs += _image(emb.local.image, "spec.embedding.local.image")
    if emb.remote is not None:
        parsed = urllib.parse.urlsplit(emb.remote.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            errs.append(FieldError("spec.embedding.remote.url", f"URL input error: {emb.remote.url!r} is not an "
                                                                "http(s) URL"))
    return errs


# --- admission webhook --------------------------------------------------------------------------


def admission_review(review: dict[str, Any], lookup: Lookup | None = None,
                     auto_provision: bool = True) -> dict[str, Any]:
    """An admission.k8s.io/v1 AdmissionReview request -> its response (allowed, or denied with
    every message). Pure: the HTTPS server around it lives with the controller."""
    from .manifests import ManifestError, parse

    request = review.get("request") or {}
    uid = request.get("uid", "")
    try:
        obj = parse(request.get("object") or {}, "request.object")
        old = parse(request["oldObject"], "request.oldObject") if request.get("oldObject") else None
        found = [] if request.get("operation") == "DELETE" else validate(obj, old, lookup, auto_provision)
    except ManifestError as e:
        found = [FieldError("", str(e))]
    errs = [str(e) for e in found if not e.warning]
    response: dict[str, Any] = {"uid": uid, "allowed": not errs}
    if errs:
        response["status"] = {"code": 422, "reason": "Invalid", "message": "; ".join(errs)}
    warnings = [str(e) for e in found if e.warning]
    if warnings:
        response["warnings"] = warnings
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
