"""Schemas of the add-ons' kinds an InferenceSet renders, for the tests: KEDA's ScaledObject
(keda.sh/v1alpha1, from KEDA's Go types apis/keda/v1alpha1/scaledobject_types.go and autoscaling/v2's
HPA behaviour) and the Gateway API Inference Extension's InferencePool (inference.networking.k8s.io/v1,
from its released api/v1 Go types: selector.matchLabels, one target port, endpointPickerRef with
port.number). Strict: a field the add-on does not know is an error. Also the add-ons' CRDs, so the
API-server fake serves the kinds (the fake does not check bodies against them)."""

from __future__ import annotations

from typing import Annotated, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]


class Meta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None


# --- KEDA ---------------------------------------------------------------------------------------------------


class ScaleTarget(Strict):
    name: str
    apiVersion: str | None = None
    kind: str | None = None
    envSourceContainerName: str | None = None


class HPAScalingPolicy(Strict):
    type: Literal["Pods", "Percent"]
    value: Annotated[int, Field(gt=0)]
    periodSeconds: Annotated[int, Field(gt=0, le=1800)]


class HPAScalingRules(Strict):
    stabilizationWindowSeconds: Annotated[int, Field(ge=0, le=3600)] | None = None
    selectPolicy: Literal["Max", "Min", "Disabled"] | None = None
    policies: list[HPAScalingPolicy] | None = None
    tolerance: str | float | None = None


class HPABehavior(Strict):
    scaleUp: HPAScalingRules | None = None
    scaleDown: HPAScalingRules | None = None


class HPAConfig(Strict):
    name: str | None = None
    behavior: HPABehavior | None = None


class ScalingModifiers(Strict):
    formula: str | None = None
    target: str | None = None
    activationTarget: str | None = None
    metricType: Literal["AverageValue", "Value", "Utilization"] | None = None


class AdvancedConfig(Strict):
    horizontalPodAutoscalerConfig: HPAConfig | None = None
    restoreToOriginalReplicaCount: bool | None = None
    scalingModifiers: ScalingModifiers | None = None


class AuthenticationRef(Strict):
    name: str
    kind: str | None = None


class ScaleTriggers(Strict):
    type: str
    name: str | None = None
    useCachedMetrics: bool | None = None
    metadata: dict[str, str]
    authenticationRef: AuthenticationRef | None = None
    metricType: Literal["AverageValue", "Value", "Utilization"] | None = None


class Fallback(Strict):
    failureThreshold: Int32
    replicas: Int32
    behavior: str | None = None


class ScaledObjectSpec(Strict):
    scaleTargetRef: ScaleTarget
    pollingInterval: Int32 | None = None
    initialCooldownPeriod: Int32 | None = None
    cooldownPeriod: Int32 | None = None
    idleReplicaCount: Int32 | None = None
    minReplicaCount: Int32 | None = None
    maxReplicaCount: Int32 | None = None
    advanced: AdvancedConfig | None = None
    triggers: list[ScaleTriggers]
    fallback: Fallback | None = None


class ScaledObject(Strict):
    apiVersion: Literal["keda.sh/v1alpha1"]
    kind: Literal["ScaledObject"]
    metadata: Meta
    spec: ScaledObjectSpec


# --- Gateway API Inference Extension -------------------------------------------------------------------------

LabelValue = Annotated[str, Field(max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")]
PortNumber = Annotated[int, Field(ge=1, le=65535)]


class LabelSelector(Strict):
    matchLabels: dict[str, LabelValue]


class Port(Strict):
    number: PortNumber


class EndpointPickerRef(Strict):
    group: Annotated[str, Field(max_length=253)] | None = None
    kind: Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")] | None = (
        None)
    name: Annotated[str, Field(min_length=1, max_length=253)]
    port: Port | None = None
    failureMode: Literal["FailOpen", "FailClose"] | None = None


class InferencePoolSpec(Strict):
    selector: LabelSelector
    targetPorts: Annotated[list[Port], Field(min_length=1, max_length=1)]
    endpointPickerRef: EndpointPickerRef


class InferencePool(Strict):
    apiVersion: Literal["inference.networking.k8s.io/v1"]
    kind: Literal["InferencePool"]
    metadata: Meta
    spec: InferencePoolSpec


SCHEMAS = {"ScaledObject": ScaledObject.model_json_schema(), "InferencePool": InferencePool.model_json_schema()}


def errors(obj: dict) -> list[str]:
    """Where `obj` breaks its add-on's schema (empty: it conforms)."""
    validator = jsonschema.Draft202012Validator(SCHEMAS[obj["kind"]])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def _crd(group: str, version: str, kind: str, plural: str) -> dict:
    schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
                     "versions": [{"name": version, "served": True, "storage": True, "subresources": {"status": {}},
                                   "schema": {"openAPIV3Schema": schema}}]}}


def keda_crd() -> dict:
    return _crd("keda.sh", "v1alpha1", "ScaledObject", "scaledobjects")


def inferencepool_crd() -> dict:
    return _crd("inference.networking.k8s.io", "v1", "InferencePool", "inferencepools")
