"""kaito.presets: the model catalogue, the GPU SKU table, GPU sizing and the vLLM argument builder.

Shared by every other component; import from here rather than from the modules.
"""

from .catalogue import (
    DEFAULT_MODEL,
    PresetError,
    chat_template_path,
    get_model,
    get_sku,
    hub_cache,
    models,
    preset_from_config,
    resolve_model,
    skus,
)
from .default_model import download, kaito_home, model_folder
from .estimator import Estimate, estimate, smallest_sku
from .hub import (
    GatedModelError,
    HubError,
    HubUnreachableError,
    MissingConfigError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
    check_runtime,
    describe,
)
from .schema import GPUSku, ModelPreset, VLLMDefaults
from .inference_config import InferenceConfig, TransformersConfig
from .vllm_args import VLLMCommand, build_vllm_command

__all__ = [
    "DEFAULT_MODEL",
    "Estimate",
    "GPUSku",
    "GatedModelError",
    "HubError",
    "HubUnreachableError",
    "InferenceConfig",
    "MissingConfigError",
    "ModelNotFoundError",
    "ModelPreset",
    "PresetError",
    "TransformersConfig",
    "UnsupportedArchitectureError",
    "VLLMCommand",
    "VLLMDefaults",
    "build_vllm_command",
    "chat_template_path",
    "check_runtime",
    "describe",
    "download",
    "estimate",
    "get_model",
    "get_sku",
    "hub_cache",
    "kaito_home",
    "model_folder",
    "models",
    "preset_from_config",
    "resolve_model",
    "skus",
    "smallest_sku",
]
