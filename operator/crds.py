"""CustomResourceDefinitions generated from the pydantic models in `api.py` (never written by hand).

The models' JSON schema is turned into a Kubernetes structural schema: references inlined,
optional fields as plain properties, `Any` mappings (pod templates, volume sources) marked
`x-kubernetes-preserve-unknown-fields` as upstream does, and `metadata` left to the API server.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import yaml

from .api import API_VERSIONS, KINDS, Resource
from .meta import GROUP, VERSION

DROP = {"title", "default"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:  # X | None  ->  X
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) == 1:
            return _structural({**options[0], **rest}, defs)
        if all("type" in o and o["type"] != "object" and o["type"] != "array" for o in options):
            return {**_structural(rest, defs), "x-kubernetes-int-or-string": True} if {
                o["type"] for o in options} == {"integer", "string"} else _structural({**rest, "type": "string"}, defs)
        raise ValueError(f"cannot express {node} in a structural schema")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROP or key == "$defs" or (key == "additionalProperties" and value is False):
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _structural(value, defs)
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = value
    if "const" in node and "type" not in out:
        out["type"] = "string"
    if "properties" in out and out.get("additionalProperties") is True:  # extra="allow": keep unknown fields
        del out["additionalProperties"]
        out["x-kubernetes-preserve-unknown-fields"] = True
    elif out.get("type") == "object" and "properties" not in out and "additionalProperties" in out:
        if out["additionalProperties"] == {} or out["additionalProperties"] is True:  # dict[str, Any]
            del out["additionalProperties"]
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


@cache
def _openapi(model: type[Resource]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    out = _structural(schema, schema.get("$defs", {}))
    out["properties"]["metadata"] = {"type": "object"}
    out["properties"]["apiVersion"] = {"type": "string"}
    out["properties"]["kind"] = {"type": "string"}
    out["required"] = [r for r in out.get("required", []) if r not in ("metadata", "apiVersion", "kind")]
    if not out["required"]:
        del out["required"]
    out.pop("description", None)
    out["description"] = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else model.__name__
    return out


def resource_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of a kaito kind (for checking objects against it)."""
    return _openapi(KINDS[kind])


def _condition_column(name: str) -> dict[str, str]:
    return {"name": name, "type": "string", "jsonPath": f'.status.conditions[?(@.type=="{name}")].status'}


PRINTER_COLUMNS = {
    "Workspace": [
        {"name": "Instance", "type": "string", "jsonPath": ".resource.instanceType"},
        _condition_column("ResourceReady"),
        _condition_column("InferenceReady"),
        _condition_column("JobStarted"),
        _condition_column("WorkspaceSucceeded"),
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    "RAGEngine": [
        {"name": "Instance", "type": "string", "jsonPath": ".spec.compute.instanceType"},
        _condition_column("ResourceReady"),
        _condition_column("ServiceReady"),
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    "ModelMirror": [
        {"name": "Model", "type": "string", "jsonPath": ".spec.source.modelID"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Downloaded", "type": "integer", "jsonPath": ".status.downloadedBytes"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    "InferenceSet": [
        {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
        {"name": "ReadyReplicas", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
}
NAMES = {
    "Workspace": {"kind": "Workspace", "listKind": "WorkspaceList", "plural": "workspaces", "singular": "workspace",
                  "shortNames": ["wk", "wks"], "categories": ["workspace"]},
    "RAGEngine": {"kind": "RAGEngine", "listKind": "RAGEngineList", "plural": "ragengines", "singular": "ragengine",
                  "shortNames": ["rag"], "categories": ["ragengine"]},
    "InferenceSet": {"kind": "InferenceSet", "listKind": "InferenceSetList", "plural": "inferencesets",
                     "singular": "inferenceset", "shortNames": ["is", "isets"], "categories": ["inferenceset"]},
    "ModelMirror": {"kind": "ModelMirror", "listKind": "ModelMirrorList", "plural": "modelmirrors",
                    "singular": "modelmirror", "categories": ["modelmirror"]},
}
CLUSTER_SCOPED = {"ModelMirror"}
ONLY_VERSION = {"ModelMirror": "v1alpha1"}  # as upstream serves it; the others: v1beta1 stored, v1alpha1 too
# The API server's defaults (pydantic's are dropped from the schema): the scale subresource reads spec.replicas
DEFAULTS = {"InferenceSet": {"replicas": 1, "updateStrategy": {"type": "RollingUpdate",
                                                               "rollingUpdate": {"maxUnavailable": 1}}}}
SUBRESOURCES = {"InferenceSet": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas",
                                                         "statusReplicasPath": ".status.replicas",
                                                         "labelSelectorPath": ".status.selector"}}}


def crd(kind: str) -> dict[str, Any]:
    names = NAMES[kind]
    schema = resource_schema(kind)
    if kind in DEFAULTS:
        schema = copy.deepcopy(schema)
        for name, value in DEFAULTS[kind].items():
            schema["properties"]["spec"]["properties"][name]["default"] = value
    versions = []
    stored = ONLY_VERSION.get(kind, VERSION)
    for api_version in API_VERSIONS:  # v1beta1 stored; v1alpha1 served with the same schema
        version = api_version.split("/")[1]
        if kind in ONLY_VERSION and version != stored:
            continue
        versions.append({
            "name": version,
            "served": True,
            "storage": version == stored,
            "schema": {"openAPIV3Schema": schema},
            "subresources": SUBRESOURCES.get(kind, {"status": {}}),
            "additionalPrinterColumns": PRINTER_COLUMNS[kind],
            **({} if version == stored else {"deprecated": True,
                                              "deprecationWarning": f"{GROUP}/{version} {kind} is deprecated; use "
                                                                    f"{GROUP}/{VERSION}"}),
        })
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{names['plural']}.{GROUP}"},
        "spec": {"group": GROUP, "names": names, "scope": "Cluster" if kind in CLUSTER_SCOPED else "Namespaced",
                 "versions": versions},
    }


def crds() -> list[dict[str, Any]]:
    return [crd(kind) for kind in NAMES]


def crds_yaml() -> str:
    return yaml.safe_dump_all(crds(), sort_keys=False, width=120)


def nodeclaim_crd() -> dict[str, Any]:
    """Karpenter's `karpenter.sh/v1` NodeClaim, for clusters without Karpenter (the Azure provisioner's
    case): the spec from `schemas.NodeClaimSpec` (the fields kaito writes and checks), the status kept
    as the provisioner writes it. Where Karpenter is installed, its own CRD is used instead."""
    from .schemas import NodeClaimSpec

    schema = NodeClaimSpec.model_json_schema(by_alias=True, mode="validation")
    spec = _structural(schema, schema.get("$defs", {}))
    spec.pop("description", None)
    spec.pop("title", None)
    resources = spec["properties"]["resources"]
    resources.pop("propertyNames", None)  # not allowed in a structural schema: `requests` only
    resources["properties"] = {"requests": resources.pop("additionalProperties")}
    openapi = {"type": "object", "required": ["spec"], "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
        "spec": spec, "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}
    columns = [
        {"name": "Type", "type": "string", "jsonPath": ".metadata.labels.node\\.kubernetes\\.io/instance-type"},
        {"name": "Node", "type": "string", "jsonPath": ".status.nodeName"},
        _condition_column("Ready"),
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "nodeclaims.karpenter.sh"},
        "spec": {"group": "karpenter.sh", "scope": "Cluster",
                 "names": {"kind": "NodeClaim", "listKind": "NodeClaimList", "plural": "nodeclaims",
                           "singular": "nodeclaim", "categories": ["karpenter"]},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": openapi},
                               "subresources": {"status": {}}, "additionalPrinterColumns": columns}]},
    }


def nodeclaim_chart_template() -> str:
    """operator/charts/kaito-operator/templates/nodeclaim-crd.yaml: the NodeClaim CRD behind a switch."""
    return ("# Generated by `kaito-operator crds --chart operator/charts/kaito-operator`: do not edit.\n"
            "{{- if .Values.features.installNodeClaimCRD }}\n"
            + yaml.safe_dump(nodeclaim_crd(), sort_keys=False, width=120) + "{{- end }}\n")


def write_chart_files(chart_dir: str) -> list[str]:
    """The generated files of the Helm chart: crds/kaito.sh.yaml and templates/nodeclaim-crd.yaml."""
    from pathlib import Path

    files = {Path(chart_dir) / "crds" / "kaito.sh.yaml": crds_yaml(),
             Path(chart_dir) / "templates" / "nodeclaim-crd.yaml": nodeclaim_chart_template()}
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return [str(p) for p in files]
