"""What `kaito-serve` was asked to do, resolved once: both backends read this."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kaito.presets import GPUSku, InferenceConfig, ModelPreset
from kaito.presets.contract import ADAPTERS_DIR, LEADER_PORT, PORT, WATCH_PORT

DEFAULT_ADAPTERS_DIR = ADAPTERS_DIR


class ServeOptions(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    preset: ModelPreset = Field(description="The model's preset (from the catalogue or described from its folder).")
    model_path: str = Field(description="Folder or Hugging Face id the engine loads.")
    served_model_name: str
    backend: Literal["vllm", "transformers"]
    sku: GPUSku | None = None
    node_count: int | None = None
    node_rank: int = Field(0, ge=0, description="This node's place when the model spans nodes (0: the leader, "
                           "which serves HTTP).")
    leader_address: str = Field("127.0.0.1", description="Where the other nodes reach the leader.")
    leader_port: int = LEADER_PORT
    watch_port: int = WATCH_PORT
    config: InferenceConfig = Field(default_factory=InferenceConfig)
    adapters_dir: Path = Path(DEFAULT_ADAPTERS_DIR)
    host: str = "0.0.0.0"
    port: int = PORT
    api_key: str | None = None
    max_request_bytes: int | None = Field(None, ge=1, description="Request body limit (None: from the context "
                                          "window, runtime/body_limit.default_limit).")
