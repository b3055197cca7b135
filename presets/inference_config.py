"""`inference_config.yaml`: the one parser of the serving config, used by the operator's validation
and render and by `kaito-serve --config`, so what the webhook admits the server starts with.

The format is upstream KAITO's: engine flags under `vllm:`, plus upstream's top-level
`max_probe_steps` and `kv_cache_cpu_memory_utilization`; kaito adds `transformers:` for its
transformers backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .catalogue import PresetError
from .contract import INFERENCE_CONFIG_FILE
from .schema import FlagValue

# Flags the runtime owns; a user's `vllm:` map may not set them.
RUNTIME_OWNED = {"host", "port", "model", "served-model-name", "api-key",
                 "nnodes", "node-rank", "master-addr", "master-port", "headless"}  # multi-node: each pod's place


class TransformersConfig(BaseModel):
    """Settings of kaito-serve's transformers backend (`transformers:` in inference_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["bfloat16", "float16", "float32", "auto"] = Field(
        "auto", description="auto: the checkpoint's dtype on a GPU (float16 where the GPU lacks bfloat16), float32 "
        "on a CPU, where half-precision kernels give a row different numbers in different batches.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch_size: int = Field(16, ge=1, le=1024, description="Requests decoded together (continuous batching).")
    max_waiting: int | None = Field(None, ge=0, description="Queued requests beyond which new ones get 429 "
                                    "(default: max_batch_size).")
    max_model_len: int | None = Field(None, ge=16, description="Context window (default: the model's limit).")
    load_in_4bit: bool = Field(False, description="bitsandbytes nf4 weights (GPU only).")
    load_in_8bit: bool = Field(False, description="bitsandbytes int8 weights (GPU only).")

    @model_validator(mode="after")
    def _quantisation(self) -> TransformersConfig:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit exclude each other")
        if (self.load_in_4bit or self.load_in_8bit) and self.device == "cpu":
            raise ValueError(f"load_in_{'4' if self.load_in_4bit else '8'}bit needs a CUDA GPU (bitsandbytes "
                             "quantisation): with device cpu, load the model unquantised")
        return self


class InferenceConfig(BaseModel):
    """`inference_config.yaml`: engine flags under `vllm:`, settings of the transformers backend under
    `transformers:`, and upstream KAITO's two top-level keys."""

    model_config = ConfigDict(extra="forbid")

    vllm: dict[str, FlagValue] = Field(default_factory=dict, description="vLLM flag (without dashes) -> value.")
    transformers: TransformersConfig = Field(default_factory=TransformersConfig)
    max_probe_steps: int | None = Field(
        None, ge=0, description="Upstream's search for the longest context that fits the GPU. kaito computes "
        "max-model-len from the estimator instead, so this is accepted and has no effect.")
    kv_cache_cpu_memory_utilization: float | None = Field(
        None, ge=0, le=1, description="Share of the node's host memory that vLLM may use to offload KV cache "
        "(0 turns it off). On GPU nodes it becomes vLLM's `kv-offloading-size`; on the CPU and with the "
        "transformers backend the KV cache already lives in host memory, so it has no effect.")

    @field_validator("vllm", mode="before")
    @classmethod
    def _normalise(cls, flags: Any) -> Any:
        if not isinstance(flags, dict):
            return flags
        out = {str(k).lstrip("-").replace("_", "-"): v for k, v in flags.items()}
        owned = sorted(RUNTIME_OWNED & out.keys())
        if owned:
            raise ValueError(f"vllm.{owned[0]} is set by kaito-serve itself; use its command-line option instead")
        mml = out.get("max-model-len")
        if isinstance(mml, str) and mml.strip().isdigit():  # upstream's vllm map holds strings
            out["max-model-len"] = mml = int(mml.strip())
        if mml is not None and (isinstance(mml, bool) or not isinstance(mml, int) or mml <= 0):
            raise ValueError(f"vllm.max-model-len must be a positive integer, got {mml!r}")
        return out

    @property
    def max_model_len(self) -> int | None:
        value = self.vllm.get("max-model-len")
        return value if isinstance(value, int) else None

    def to_yaml(self) -> str:
        """The file as kaito-serve reads it: the settings given, defaults left out."""
        return yaml.safe_dump(self.model_dump(exclude_defaults=True), sort_keys=False)

    @classmethod
    def parse(cls, text: str, source: str = INFERENCE_CONFIG_FILE) -> InferenceConfig:
        """Parse the file's text; PresetError names `source` and the offending key."""
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise PresetError(f"{source} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise PresetError(f"{source} must hold a mapping with a `vllm:` section, not {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            raise PresetError(f"{source}: {where}: {msg}") from None

    @classmethod
    def load(cls, path: str | Path) -> InferenceConfig:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise PresetError(f"cannot read inference config {path}: {e.strerror}") from e
        return cls.parse(text, str(path))
