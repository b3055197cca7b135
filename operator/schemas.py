"""Checking objects against the official Kubernetes JSON schemas (shipped, offline, by the
`kubernetes-validate` package; strict variant: unknown fields are errors), reporting every error.

Karpenter's NodeClaim is not a Kubernetes API type, so it has no official schema there: its
Kubernetes-typed parts (metadata, taints, node selector requirements, resource quantities) are
checked against those types' schemas and the rest by `NodeClaimSpec` below.
kaito's own kinds are checked against the CRD schema generated from the pydantic models.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib.resources import files
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .api import QUANTITY

K8S_SCHEMA_VERSION = "1.37.0"  # the newest schema set kubernetes-validate 1.37 ships


def _dir():
    return files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_SCHEMA_VERSION}-local-strict"


@cache
def _schema(name: str) -> dict[str, Any]:
    return json.loads((_dir() / f"{name}.json").read_text())


@cache
def _registry():
    from referencing import Registry, Resource

    return Resource.from_contents(_schema("_definitions")) @ Registry()


def _errors(instance: Any, schema: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema, registry=_registry())
    out = []
    for err in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))):
        path = ".".join(str(p) for p in err.absolute_path)
        out.append(f"{path}: {err.message}" if path else err.message)
    return out


def schema_errors(instance: Any, type_name: str) -> list[str]:
    """Errors of `instance` as a Kubernetes core type: PodTemplateSpec, VolumeSource, Taint, ..."""
    if type_name == "VolumeSource":  # not a named type: a Volume without its name
        if not isinstance(instance, dict) or len(instance) != 1:
            return ["a volume source names exactly one kind of volume (e.g. persistentVolumeClaim, hostPath)"]
        return _errors({"name": "v", **instance}, _schema("volume-v1"))
    return _errors(instance, _schema(f"{type_name.lower()}-v1"))


def _file_name(api_version: str, kind: str) -> str:
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # apps/v1 -> apps-v1
    return f"{kind.lower()}-{group_version}"


def object_errors(obj: dict[str, Any]) -> list[str]:
    """Every schema error of a rendered object (empty: valid)."""
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    if api_version == "karpenter.sh/v1" and kind == "NodeClaim":
        return _nodeclaim_errors(obj)
    if api_version.startswith("kaito.sh/"):
        from .crds import resource_schema

        return _errors(obj, resource_schema(kind))
    name = _file_name(api_version, kind)
    if not (_dir() / f"{name}.json").is_file():
        return [f"no Kubernetes schema for {kind} {api_version}"]
    return _errors(obj, _schema(name))


class _Ref(BaseModel):
    model_config = ConfigDict(extra="forbid")
    group: str
    kind: str
    name: str




class _Requirement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=1)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[str] = Field(default_factory=list)
    min_values: int | None = Field(None, alias="minValues", ge=1)


class _Taint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=1)
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]


class NodeClaimSpec(BaseModel):
    """karpenter.sh/v1 NodeClaim spec fields (Karpenter's API reference)."""

    model_config = ConfigDict(extra="forbid")
    node_class_ref: _Ref = Field(alias="nodeClassRef")
    requirements: list[_Requirement] = Field(min_length=1)
    taints: list[_Taint] = Field(default_factory=list)
    startup_taints: list[_Taint] = Field(default_factory=list, alias="startupTaints")
    resources: dict[Literal["requests"], dict[str, Annotated[str, Field(pattern=QUANTITY)]]] = Field(
        default_factory=dict)
    expire_after: str | None = Field(None, alias="expireAfter")
    termination_grace_period: str | None = Field(None, alias="terminationGracePeriod")


def _nodeclaim_errors(obj: dict[str, Any]) -> list[str]:
    errs = []
    extra = set(obj) - {"apiVersion", "kind", "metadata", "spec", "status"}
    errs += [f"{k}: unknown field" for k in sorted(extra)]
    errs += [f"metadata.{e}" for e in _errors(obj.get("metadata", {}), _schema("objectmeta-meta-v1"))]
    if "namespace" in obj.get("metadata", {}):
        errs.append("metadata.namespace: NodeClaim is cluster-scoped")
    spec = obj.get("spec") or {}
    try:
        NodeClaimSpec.model_validate(spec)
    except ValidationError as e:
        errs += [f"spec.{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err['input']!r})" for err in e.errors()]
    for i, req in enumerate(spec.get("requirements", [])):
        core = {k: v for k, v in req.items() if k != "minValues"}
        errs += [f"spec.requirements[{i}].{e}" for e in schema_errors(core, "NodeSelectorRequirement")]
    for key in ("taints", "startupTaints"):
        for i, taint in enumerate(spec.get(key, [])):
            errs += [f"spec.{key}[{i}].{e}" for e in schema_errors(taint, "Taint")]
    return errs
