"""kaito.presets: the model catalogue, the GPU SKU table, GPU sizing and the vLLM argument builder.

Shared by every other component; import from here rather than from the modules.
"""

from .catalogue import (
    DEFAULT_MODEL,
    PresetError,
    chat_template_path,
    get_model,
    get_sku,
    models,
    preset_from_config,
    resolve_model,
    skus,
)
from .default_model import kaito_home, model_folder
from .estimator import Estimate, estimate, smallest_sku
from .schema import GPUSku, ModelPreset, VLLMDefaults
from .vllm_args import InferenceConfig, TransformersConfig, VLLMCommand, build_vllm_command

__all__ = [
    "DEFAULT_MODEL",
    "Estimate",
    "GPUSku",
    "InferenceConfig",
    "ModelPreset",
    "PresetError",
    "TransformersConfig",
    "VLLMCommand",
    "VLLMDefaults",
    "build_vllm_command",
    "chat_template_path",
    "estimate",
    "get_model",
    "get_sku",
    "kaito_home",
    "model_folder",
    "models",
    "preset_from_config",
    "resolve_model",
    "skus",
    "smallest_sku",
]
