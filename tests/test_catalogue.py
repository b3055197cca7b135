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


@pytest.mark.parametrize("name", UPSTREAM_PRESETS)
def test_preset_is_consistent(name):
    m = get_model(name)
    assert m.num_attention_heads % m.num_key_value_heads == 0
    assert m.kv_bytes_per_token == m.num_hidden_layers * 2 * m.num_key_value_heads * m.head_dim * 2
    assert 0.1 < m.weight_size_gib < 300
    # weights are 2 bytes a parameter unless quantised (gpt-oss ships mxfp4 experts)
    ratio = m.weight_size_gib * 2**30 / (m.parameters_b * 1e9)
    assert (0.4 < ratio < 1.2) if m.quantization else (1.8 < ratio < 2.2), ratio
    template = chat_template_path(m)
    assert template is None or template.is_file()
    assert {"vllm", "transformers"} >= set(m.runtimes)


def test_known_facts():
    llama = get_model("llama-3.3-70b-instruct")
    assert (llama.num_hidden_layers, llama.num_key_value_heads, llama.head_dim) == (80, 8, 128)
    assert llama.requires_token and llama.vllm.tool_call_parser == "llama3_json"
    assert get_model("falcon-7b").attention == "mqa"
    assert get_model("deepseek-r1-distill-qwen-14b").vllm.reasoning_parser == "deepseek_r1"
    assert get_model("gpt-oss-20b").quantization == "mxfp4"
    assert get_model("falcon-7b-instruct").vllm.chat_template == "falcon-instruct.jinja"


def test_preset_files_reject_unknown_keys_and_bad_heads():
    data = get_model("phi-4").model_dump()
    with pytest.raises(ValueError, match="colour"):
        ModelPreset(**data, colour="red")
    with pytest.raises(ValueError, match="not a multiple"):
        ModelPreset(**{**data, "num_key_value_heads": 7})
    with pytest.raises(ValueError, match="head counts say 'gqa'"):
        ModelPreset(**{**data, "attention": "mha"})


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
