"""What an inference Workspace needs, decided the same way by validation (the webhook), render and the
controller: which model (a catalogue preset, a legacy name, or any Hugging Face repo read with the
Workspace's token), on which GPUs (the instance type, or a partition of the nodes' GPUs), and on how
many nodes.

Node count, as upstream KAITO v0.12 decides it: with the vLLM runtime the estimator chooses it
(`resource.count` is deprecated and only warned about), and the choice is recorded once in
`status.targetNodeCount`; a recorded count is kept as long as the model fits in it. The transformers
runtime runs on one node.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from kaito.presets import (
    Estimate,
    GPUSku,
    InferenceConfig,
    ModelPreset,
    PresetError,
    estimate,
    get_model,
    get_sku,
    smallest_sku,
)
from kaito.presets.contract import HF_TOKEN_ENV
from kaito.presets.hub import HubError, describe, is_repo_id

from .api import BYPASS_RESOURCE_CHECKS, PresetSpec, Resource, Workspace
from .cluster import GPU

Lookup = Callable[[str, str], "dict[str, Any] | None"]

MIG, ACCELERATOR = "mig", "accelerator"


def secret_value(lookup: Lookup | None, name: str | None, key: str) -> str | None:
    """A Secret's value (data is base64, stringData plain) through the lookup; None without either."""
    secret = lookup("Secret", name) if lookup and name else None
    if not secret:
        return None
    if key in (secret.get("stringData") or {}):
        return str(secret["stringData"][key])
    try:
        raw = (secret.get("data") or {}).get(key)
        return base64.b64decode(raw, validate=True).decode() if raw else None
    except (binascii.Error, UnicodeDecodeError):
        raise HubError(f"Secret {name!r}: data.{key} is not base64-encoded text") from None


def model_for(spec: PresetSpec, runtime: str, lookup: Lookup | None = None) -> ModelPreset:
    """The model a preset spec names: a catalogue preset by name, Hugging Face id or legacy name, or any
    Hugging Face repo (`org/name`) described from the hub, with the HF_TOKEN of the modelAccessSecret."""
    runtime_ = runtime if runtime in ("vllm", "transformers") else None
    try:
        return describe(get_model(spec.name).name, runtime=runtime_)  # the catalogue needs no token
    except PresetError:
        if not is_repo_id(spec.name):
            raise
    secret = spec.preset_options.model_access_secret if spec.preset_options else None
    return describe(spec.name, secret_value(lookup, secret, HF_TOKEN_ENV), runtime=runtime_)


def partition_sku(ws: Workspace, node_sku: GPUSku | None) -> GPUSku | None:
    """The GPUs one pod gets under resource.partition: a MIG slice, or `count` of the nodes' GPUs."""
    part = ws.resource.partition
    if part is None:
        return node_sku
    if part.mode == MIG and part.profile:
        return get_sku(f"mig-{part.profile}")
    if part.mode == ACCELERATOR and node_sku is not None and part.count:
        return get_sku(f"{node_sku.name.split('/')[0]}/{part.count}")
    return node_sku


def gpu_resource(res: Resource) -> str:
    """The extended resource a pod requests: nvidia.com/gpu, or nvidia.com/mig-<profile> for a MIG slice."""
    part = res.resource.partition if isinstance(res, Workspace) else None
    return f"nvidia.com/mig-{part.profile.lower()}" if part and part.mode == MIG and part.profile else GPU


def bypass(ws: Workspace) -> bool:
    return BYPASS_RESOURCE_CHECKS in ws.metadata.annotations


def size(ws: Workspace, preset: ModelPreset, sku: GPUSku, config: InferenceConfig | None) -> Estimate:
    """The estimate a Workspace renders with; PresetError when the model cannot run so."""
    context = config.max_model_len if config else None
    if ws.runtime == "transformers":
        est = estimate(preset, sku, context=context)
        if est.node_count > 1:
            bigger = smallest_sku(preset, context=context, cloud=sku.cloud)
            raise PresetError(
                f"Multi-node distributed inference is not supported with Huggingface Transformers runtime: "
                f"{preset.name} needs {est.node_count} nodes of {sku.name}; use the vLLM runtime (the default)"
                + (f" or an instance type that holds it on one node, such as {bigger.name}" if bigger else ""))
        return est
    recorded = ws.status.target_node_count if ws.status else None
    est = estimate(preset, sku, context=context, node_count=recorded)
    if ws.resource.partition is not None and est.node_count > 1:
        raise PresetError(
            f"Model {preset.name} ({preset.weight_size_gib:g} GiB of weights) needs {est.gpus_required} x {sku.gpu_model} "
            f"({sku.gpu_memory_per_gpu_gib:g} GiB each) with the CUDA context and KV cache, more than the partition a "
            "pod gets: choose a larger MIG profile or more accelerator GPUs")
    return est


def count_warning(ws: Workspace, est: Estimate) -> str | None:
    """resource.count is deprecated with the vLLM runtime: say what the estimator chose instead."""
    count = ws.resource.count
    if count is None or ws.runtime != "vllm" or count == est.node_count:
        return None
    return (f"count is deprecated: with the vLLM runtime the estimator chooses the node count, {est.node_count} "
            f"for {est.model} on {est.instance_type} (status.targetNodeCount), not {count}")
