"""The preset catalogue and SKU table: complete, consistent, and helpful on wrong names."""

import json
import shutil

import pytest
import yaml
from kaito.presets import (
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
from kaito.presets.schema import ModelPreset

UPSTREAM_PRESETS = [
    "falcon-7b", "falcon-7b-instruct", "falcon-40b", "falcon-40b-instruct",
    "phi-3-mini-4k-instruct", "phi-3-mini-128k-instruct", "phi-3-medium-4k-instruct", "phi-3-medium-128k-instruct",
    "phi-3.5-mini-instruct", "phi-4", "phi-4-mini-instruct", "mistral-7b", "mistral-7b-instruct",
    "llama-3.1-8b-instruct", "llama-3.3-70b-instruct", "qwen2.5-coder-7b-instruct", "qwen2.5-coder-32b-instruct",
    "deepseek-r1-distill-llama-8b", "deepseek-r1-distill-qwen-14b", "gemma-3-4b-it", "gemma-3-27b-it",
    "gpt-oss-20b", "gpt-oss-120b", "smollm2-135m-instruct",
]


def test_catalogue_covers_upstream_presets():
    names = {m.name for m in models()}
    assert set(UPSTREAM_PRESETS) <= names
    assert DEFAULT_MODEL == "smollm2-135m-instruct"


# Upstream KAITO's curated catalogue (presets/workspace/models/model_catalog.yaml, kaito-project/kaito@0a42eed),
# less the four entries this catalogue does not carry (NOT_CARRIED).
UPSTREAM_CATALOGUE = [
    "microsoft/phi-4", "microsoft/Phi-4-mini-instruct", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "microsoft/Phi-3-mini-4k-instruct",
    "microsoft/Phi-3-mini-128k-instruct", "microsoft/Phi-3-medium-4k-instruct", "microsoft/Phi-3-medium-128k-instruct",
    "microsoft/Phi-3.5-mini-instruct",
    "Qwen/Qwen2.5-Coder-7B-Instruct", "Qwen/Qwen2.5-Coder-32B-Instruct", "openai/gpt-oss-20b", "openai/gpt-oss-120b",
    "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.3-70B-Instruct", "mistralai/Mistral-7B-v0.3",
    "mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Ministral-3-3B-Instruct-2512",
    "mistralai/Ministral-3-8B-Instruct-2512", "mistralai/Ministral-3-14B-Instruct-2512", "google/gemma-3-4b-it",
    "google/gemma-3-27b-it", "deepseek-ai/DeepSeek-R1-0528", "deepseek-ai/DeepSeek-V3-0324",
    "mistralai/Mistral-Large-3-675B-Instruct-2512", "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16",
    "nvidia/Nemotron-Cascade-2-30B-A3B", "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",
    "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16", "nvidia/NVIDIA-Nemotron-Nano-9B-v2",
    "nvidia/NVIDIA-Nemotron-3-Nano-4B-BF16", "Qwen/Qwen3-8B-AWQ", "google/gemma-4-31B-it", "google/gemma-4-26B-A4B-it",
    "google/gemma-4-E4B-it", "google/gemma-4-E2B-it", "mistralai/Mistral-Small-4-119B-2603",
    "mistralai/Mistral-Small-4-119B-2603-NVFP4", "Qwen/Qwen3.5-2B", "Qwen/Qwen3.5-4B", "Qwen/Qwen3.5-9B",
    "Qwen/Qwen3.5-122B-A10B-GPTQ-Int4", "Qwen/Qwen3.5-122B-A10B", "Qwen/Qwen3.6-35B-A3B-FP8", "Qwen/Qwen3.6-35B-A3B",
    "Qwen/Qwen3.6-27B", "Qwen/Qwen3.5-397B-A17B-GPTQ-Int4", "moonshotai/Kimi-K2.5", "moonshotai/Kimi-K2.6",
    "MiniMaxAI/MiniMax-M2.7", "mistralai/Mistral-Medium-3.5-128B", "google/gemma-4-12B-it", "zai-org/GLM-5.2-FP8",
    "moonshotai/Kimi-K2.7-Code", "nvidia/NVIDIA-Nemotron-3-Ultra-550B-A55B-NVFP4", "deepseek-ai/DeepSeek-V3.2",
    "ibm-granite/granite-4.1-8b",
]
# Their attention is not one this schema describes: DeepSeek-V4 compresses its KV cache per layer type
# (4x and 128x, with a sliding window); Inkling keeps separate sliding-window KV heads and head sizes.
NOT_CARRIED = ["deepseek-ai/DeepSeek-V4-Flash-0731", "deepseek-ai/DeepSeek-V4-Pro", "thinkingmachines/Inkling-NVFP4",
               "thinkingmachines/Inkling-Small-NVFP4"]
# The legacy short names upstream still maps to Hugging Face ids (pkg/utils/plugin, LegacyBuiltinToCatalog).
LEGACY_NAMES = {
    "phi-4": "microsoft/phi-4", "phi-4-mini-instruct": "microsoft/phi-4-mini-instruct",
    "llama-3.1-8b-instruct": "meta-llama/llama-3.1-8b-instruct",
    "llama-3.3-70b-instruct": "meta-llama/llama-3.3-70b-instruct",
    "deepseek-r1-distill-llama-8b": "deepseek-ai/deepseek-r1-distill-llama-8b",
    "deepseek-r1-distill-qwen-14b": "deepseek-ai/deepseek-r1-distill-qwen-14b",
    "deepseek-r1-0528": "deepseek-ai/deepseek-r1-0528", "deepseek-v3-0324": "deepseek-ai/deepseek-v3-0324",
    "phi-3-mini-4k-instruct": "microsoft/phi-3-mini-4k-instruct",
    "phi-3-mini-128k-instruct": "microsoft/phi-3-mini-128k-instruct",
    "phi-3-medium-4k-instruct": "microsoft/phi-3-medium-4k-instruct",
    "phi-3-medium-128k-instruct": "microsoft/phi-3-medium-128k-instruct",
    "phi-3.5-mini-instruct": "microsoft/phi-3.5-mini-instruct",
    "qwen2.5-coder-7b-instruct": "qwen/qwen2.5-coder-7b-instruct",
    "qwen2.5-coder-32b-instruct": "qwen/qwen2.5-coder-32b-instruct",
    "gpt-oss-20b": "openai/gpt-oss-20b", "gpt-oss-120b": "openai/gpt-oss-120b",
    "gemma-3-4b-instruct": "google/gemma-3-4b-it", "gemma-3-27b-instruct": "google/gemma-3-27b-it",
    "mistral-7b": "mistralai/mistral-7b-v0.3", "mistral-7b-instruct": "mistralai/mistral-7b-instruct-v0.3",
    "ministral-3-3b-instruct": "mistralai/ministral-3-3b-instruct-2512",
    "ministral-3-8b-instruct": "mistralai/ministral-3-8b-instruct-2512",
    "ministral-3-14b-instruct": "mistralai/ministral-3-14b-instruct-2512",
    "mistral-large-3-675b-instruct": "mistralai/mistral-large-3-675b-instruct-2512",
}


@pytest.mark.parametrize("name", [m.name for m in models()])
def test_preset_is_consistent(name):
    m = get_model(name)
    assert m.num_attention_heads % m.num_key_value_heads == 0
    assert 0.1 < m.weight_size_gib < 1000
    # bytes a parameter: 2 unquantised; quantised at least the quantised width (embeddings, vision towers and
    # some layers stay in bf16), never more than 2
    ratio = m.weight_size_gib * 2**30 / (m.parameters_b * 1e9)
    assert (0.9 * m.quantization_bits / 8 if m.quantization else 1.8) < ratio < 2.2, ratio
    assert m.quantization is None or m.quantization_bits, "quantised presets give their bits"
    template = chat_template_path(m)
    assert template is None or template.is_file()
    assert "vllm" in m.runtimes


def test_every_upstream_id_and_legacy_name_resolves():
    assert len(models()) == len(UPSTREAM_CATALOGUE) + 5  # + falcon x 4 and the embedded default
    for hf_id in UPSTREAM_CATALOGUE:
        preset = get_model(hf_id)
        assert preset.hf_id == hf_id
        assert get_model(hf_id.lower()) is get_model(hf_id.upper()) is preset  # upstream ignores case
    for legacy, hf_id in LEGACY_NAMES.items():
        assert get_model(legacy).hf_id.lower() == hf_id, legacy
    assert get_model("GEMMA-3-27B-INSTRUCT").name == "gemma-3-27b-it"
    for hf_id in NOT_CARRIED:
        with pytest.raises(PresetError, match="unknown preset"):
            get_model(hf_id)


def test_transformers_runtime_only_where_auto_model_for_causal_lm_loads_it():
    """Multimodal and hybrid architectures run on transformers where AutoModelForCausalLM builds that very
    class; AWQ/GPTQ need gptqmodel and ModelOpt NVFP4 has no transformers loader, so those are vLLM only."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_lm = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    for m in models():
        loads = m.architecture in causal_lm and m.quantization not in ("awq", "gptq", "modelopt")
        assert ("transformers" in m.runtimes) == loads, m.name


def test_known_facts():
    llama = get_model("llama-3.3-70b-instruct")
    assert (llama.num_hidden_layers, llama.num_key_value_heads, llama.head_dim) == (80, 8, 128)
    assert llama.requires_token and llama.vllm.tool_call_parser == "llama3_json"
    assert get_model("falcon-7b").attention == "mqa"
    assert get_model("deepseek-r1-distill-qwen-14b").vllm.reasoning_parser == "deepseek_r1"
    assert get_model("gpt-oss-20b").quantization == "mxfp4"
    assert get_model("falcon-7b-instruct").vllm.chat_template == "falcon-instruct.jinja"
    v3 = get_model("deepseek-ai/DeepSeek-V3-0324")
    assert (v3.attention, v3.kv_lora_rank, v3.qk_rope_head_dim, v3.quantization_bits) == ("mla", 512, 64, 8)
    assert get_model("ministral-3-8b-instruct").vllm.mistral_format
    assert get_model("nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16").attention_layers == 6
    assert get_model("Qwen/Qwen3.6-27B").attention_layers == 16  # 48 Gated DeltaNet layers + 16 full attention


def test_kv_bytes_per_token():
    # MLA: one latent a layer, (kv_lora_rank 512 + qk_rope_head_dim 64) x 61 layers x 2 bytes
    assert get_model("deepseek-v3-0324").kv_bytes_per_token == (512 + 64) * 61 * 2 == 70272
    # hybrid: K and V of 2 KV heads x 128 in the 6 attention layers of 52, x 2 bytes
    assert get_model("nvidia-nemotron-3-nano-30b-a3b-bf16").kv_bytes_per_token == 6 * 2 * 2 * 128 * 2
    # GQA over every layer: 80 x (K and V) x 8 KV heads x 128 x 2 bytes
    llama = get_model("llama-3.3-70b-instruct")
    assert llama.kv_bytes_per_token == 80 * 2 * 8 * 128 * 2
    fp8 = llama.model_copy(update={"vllm": llama.vllm.model_copy(update={"kv_cache_dtype": "fp8"})})
    assert fp8.kv_bytes_per_token == llama.kv_bytes_per_token // 2


def test_preset_files_reject_unknown_keys_and_bad_heads():
    data = get_model("phi-4").model_dump()
    with pytest.raises(ValueError, match="colour"):
        ModelPreset(**data, colour="red")
    with pytest.raises(ValueError, match="not a multiple"):
        ModelPreset(**{**data, "num_key_value_heads": 7})
    with pytest.raises(ValueError, match="head counts say 'gqa'"):
        ModelPreset(**{**data, "attention": "mha"})
    with pytest.raises(ValueError, match="quantization_bits without a quantization"):
        ModelPreset(**{**data, "quantization_bits": 4})
    with pytest.raises(ValueError, match="pattern"):
        ModelPreset(**{**data, "aliases": ["Phi4"]})
    mla = get_model("deepseek-v3-0324").model_dump()
    for broken in ({"kv_lora_rank": None}, {"attention": "mha"}, {**data, "kv_lora_rank": 512}):
        with pytest.raises(ValueError, match="'mla' goes with both kv_lora_rank and qk_rope_head_dim"):
            ModelPreset(**{**mla, **broken})
    hybrid = get_model("nvidia-nemotron-3-nano-30b-a3b-bf16").model_dump()
    with pytest.raises(ValueError, match="attention_layers exceeds num_hidden_layers"):
        ModelPreset(**{**hybrid, "attention_layers": 53})


def test_a_name_of_two_presets_is_refused(monkeypatch):
    from kaito.presets import catalogue

    phi = get_model("phi-4")
    twin = phi.model_copy(update={"name": "phi-4-twin", "hf_id": "acme/phi-4-twin", "aliases": ["phi-4"]})
    monkeypatch.setattr(catalogue, "_models", lambda: {"phi-4": phi, "phi-4-twin": twin})
    catalogue._names.cache_clear()
    try:
        with pytest.raises(PresetError, match="'phi-4' names two presets: phi-4 and phi-4-twin"):
            catalogue._names()
    finally:
        catalogue._names.cache_clear()


def test_unknown_preset_suggests_close_names():
    with pytest.raises(PresetError, match="unknown preset 'phi-4-mini'.*phi-4-mini-instruct"):
        get_model("phi-4-mini")


def test_skus():
    table = {s.name: s for s in skus()}
    for name in ["Standard_NC24ads_A100_v4", "Standard_NC96ads_A100_v4", "Standard_NV36ads_A10_v5",
                 "Standard_ND96isr_H100_v5", "Standard_ND96isr_H200_v5", "Standard_NC40ads_H100_v5",
                 "Standard_ND96amsr_A100_v4", "Standard_NC4as_T4_v3", "g5.12xlarge", "p5.48xlarge"]:
        assert name in table
    a100 = table["Standard_NC96ads_A100_v4"]
    assert (a100.gpu_count, a100.gpu_memory_gib, a100.gpu_memory_per_gpu_gib, a100.gpu_model) == (4, 80 * 4, 80, "A100")
    assert a100.supports_bf16 and not table["Standard_NC6s_v3"].supports_bf16
    assert {s.cloud for s in skus()} == {"azure", "aws"}
    assert get_sku("standard_nc24ads_a100_v4").name == "Standard_NC24ads_A100_v4"  # Azure names ignore case
    with pytest.raises(PresetError, match="Did you mean: Standard_NC24ads_A100_v4"):
        get_sku("Standard_NC24ads_A100")


def test_model_from_local_folder_matches_catalogue(default_model_dir, tmp_path):
    described = resolve_model(str(default_model_dir))
    preset = get_model(DEFAULT_MODEL)
    for field in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "context_limit",
                  "attention", "architecture"):
        assert getattr(described, field) == getattr(preset, field), field
    assert abs(described.weight_size_gib - preset.weight_size_gib) < 0.01
    assert described.name == "smollm2-135m-instruct"


def test_model_from_hf_cache(default_model_dir, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--acme--Tiny-Chat" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.copy(default_model_dir / "config.json", snapshot)
    (snapshot / "model.safetensors").write_bytes(b"\0" * 2**20)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    m = resolve_model("acme/Tiny-Chat")
    assert (m.name, m.hf_id, m.num_hidden_layers) == ("tiny-chat", "acme/Tiny-Chat", 30)
    assert m.weight_size_gib == pytest.approx(1 / 1024)


def test_model_from_explicit_facts():
    config = {"architectures": ["MistralForCausalLM"], "num_hidden_layers": 40, "num_attention_heads": 32,
              "num_key_value_heads": 8, "hidden_size": 5120, "head_dim": 128, "max_position_embeddings": 131072,
              "model_type": "mistral", "torch_dtype": "bfloat16"}
    m = resolve_model("mistralai/Mistral-Nemo-Instruct-2407", weight_size_gib=22.8, config=config)
    assert (m.attention, m.kv_bytes_per_token, m.context_limit) == ("gqa", 40 * 2 * 8 * 128 * 2, 131072)
    nested = preset_from_config({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": {
        "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "max_position_embeddings": 131072, "hidden_size": 2560}}, name="g", hf_id="x/g", weight_size_gib=8)
    assert (nested.num_hidden_layers, nested.head_dim) == (34, 256)


def test_unknown_model_says_what_is_missing(tmp_path):
    with pytest.raises(PresetError, match="not a catalogue preset.*local folder with config.json"):
        resolve_model("acme/never-seen")
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1024)
    with pytest.raises(PresetError, match="lacks num_attention_heads, max_position_embeddings"):
        resolve_model(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(PresetError, match="no \\*.safetensors or \\*.bin weights"):
        resolve_model(str(tmp_path))


def test_preset_files_round_trip():
    from kaito.presets.catalogue import DATA_DIR

    for path in (DATA_DIR / "models").glob("*.yaml"):
        assert ModelPreset(**yaml.safe_load(path.read_text())) == get_model(path.stem)


def test_preset_by_hugging_face_id():
    """Upstream manifests name presets by name or by Hugging Face id; both find the same preset."""
    from kaito.presets import get_model

    assert get_model("microsoft/Phi-4-mini-instruct") is get_model("phi-4-mini-instruct")
    assert get_model("PHI-4-MINI-INSTRUCT").name == "phi-4-mini-instruct"
    with pytest.raises(PresetError, match="unknown preset 'microsoft/no-such-model'"):
        get_model("microsoft/no-such-model")
