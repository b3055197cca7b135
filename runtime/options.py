"""What `kaito-serve` was asked to do, resolved once: both backends read this."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kaito.presets import GPUSku, InferenceConfig, ModelPreset

DEFAULT_ADAPTERS_DIR = "/mnt/adapter"


class ServeOptions(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    preset: ModelPreset = Field(description="The model's preset (from the catalogue or described from its folder).")
    model_path: str = Field(description="Folder or Hugging Face id the engine loads.")
    served_model_name: str
    backend: Literal["vllm", "transformers"]
    sku: GPUSku | None = None
    node_count: int | None = None
    config: InferenceConfig = Field(default_factory=InferenceConfig)
    adapters_dir: Path = Path(DEFAULT_ADAPTERS_DIR)
    host: str = "0.0.0.0"
    port: int = 5000
    api_key: str | None = None
