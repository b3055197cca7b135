"""The vLLM argument builder: computed flags, the user's overrides, and the errors."""

import json

import pytest
from helpers import run_cli
from kaito.presets import InferenceConfig, PresetError, build_vllm_command, get_model, get_sku, models
from kaito.presets.vllm_args import node_flags


def flags(model, sku=None, **kw):
    return build_vllm_command(get_model(model), sku=get_sku(sku) if sku else None, **kw).flags


def test_multi_node_pipeline_parallel_uses_vllms_own_multi_node_mode():
    f = flags("llama-3.3-70b-instruct", "Standard_NC24ads_A100_v4")
    assert f["model"] == "meta-llama/Llama-3.3-70B-Instruct"
    assert f["served-model-name"] == "llama-3.3-70b-instruct"
    assert (f["tensor-parallel-size"], f["pipeline-parallel-size"]) == (1, 3)
    assert (f["distributed-executor-backend"], f["nnodes"]) == ("mp", 3)
    assert f["tool-call-parser"] == "llama3_json" and f["enable-auto-tool-choice"] is True
    assert f["dtype"] == "bfloat16" and f["max-model-len"] == 131072


def test_single_node_tensor_parallel():
    f = flags("llama-3.3-70b-instruct", "Standard_NC96ads_A100_v4")
    assert (f["tensor-parallel-size"], f["pipeline-parallel-size"]) == (4, 1)
    assert "distributed-executor-backend" not in f and "data-parallel-size" not in f


def test_cpu_nodes_hold_one_pipeline_stage_each():
    f = flags("smollm2-135m-instruct", node_count=2)
    assert (f["pipeline-parallel-size"], f["distributed-executor-backend"], f["nnodes"]) == (2, "mp", 2)
    assert "nnodes" not in flags("smollm2-135m-instruct") and "pipeline-parallel-size" not in flags("smollm2-135m-instruct")


def test_each_node_adds_its_rank_and_the_leader():
    assert node_flags(0, "ws-0.ws-headless", 29500) == {"node-rank": 0, "master-addr": "ws-0.ws-headless",
                                                        "master-port": 29500, "headless": False}
    assert node_flags(2, "10.0.0.4", 1234)["headless"] is True


def test_data_parallel_and_reasoning_parser():
    f = flags("phi-4-mini-instruct", "Standard_ND96amsr_A100_v4")
    assert (f["tensor-parallel-size"], f["data-parallel-size"]) == (1, 8)
    assert flags("deepseek-r1-distill-llama-8b", "Standard_NC24ads_A100_v4")["reasoning-parser"] == "deepseek_r1"


def test_gpu_without_bf16_gets_fp16():
    assert flags("llama-3.1-8b-instruct", "Standard_NC12s_v3")["dtype"] == "float16"
    assert flags("gpt-oss-20b", "Standard_NC24ads_A100_v4")["dtype"] == "auto"


def test_max_model_len_fits_the_kv_space():
    # 2 x V100 16 GiB leave KV space for 53837 tokens of llama-3.1-8b, below its 131072 limit
    assert flags("llama-3.1-8b-instruct", "Standard_NC12s_v3")["max-model-len"] == 53837


def test_chat_template_for_models_without_one():
    f = flags("falcon-7b-instruct", "Standard_NC24ads_A100_v4")
    assert f["chat-template"].endswith("chat_templates/falcon-instruct.jinja")
    assert "chat-template" not in flags("phi-4", "Standard_NC24ads_A100_v4")


def test_per_model_flags():
    ministral = flags("ministral-3-8b-instruct", "Standard_NC24ads_A100_v4")
    assert [ministral[k] for k in ("tokenizer-mode", "config-format", "load-format")] == ["mistral"] * 3
    assert ministral["tool-call-parser"] == "mistral" and "chat-template" not in ministral
    assert "tokenizer-mode" not in flags("mistral-7b-instruct", "Standard_NC24ads_A100_v4")  # Hugging Face format
    qwen = flags("Qwen/Qwen3-8B-AWQ", "Standard_NV36ads_A10_v5")
    assert (qwen["tool-call-parser"], qwen["reasoning-parser"]) == ("hermes", "qwen3")
    oss = flags("gpt-oss-120b", "Standard_NC40ads_H100_v5")
    assert (oss["tool-call-parser"], oss["reasoning-parser"]) == ("openai", "openai_gptoss")
    kimi = flags("moonshotai/Kimi-K2.5", "Standard_ND96isr_H200_v5")
    assert kimi["trust-remote-code"] is True and kimi["tensor-parallel-size"] == 8
    assert "kv-cache-dtype" not in kimi
    llama = get_model("llama-3.1-8b-instruct")
    fp8 = llama.model_copy(update={"vllm": llama.vllm.model_copy(update={"kv_cache_dtype": "fp8"})})
    assert build_vllm_command(fp8, sku=get_sku("Standard_NC24ads_A100_v4")).flags["kv-cache-dtype"] == "fp8"


def test_parsers_are_ones_vllm_has():
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    tools, reasoning = ToolParserManager.list_registered(), ReasoningParserManager.list_registered()
    for m in models():
        assert m.vllm.tool_call_parser in {None, *tools}, m.name
        assert m.vllm.reasoning_parser in {None, *reasoning}, m.name


def test_user_overrides_win_and_false_drops_a_flag():
    config = InferenceConfig(vllm={"max_model_len": 4096, "gpu-memory-utilization": 0.95, "enforce-eager": True,
                                   "enable-auto-tool-choice": False, "--swap-space": 4})
    cmd = build_vllm_command(get_model("phi-4"), sku=get_sku("Standard_NC24ads_A100_v4"), config=config)
    assert cmd.flags["max-model-len"] == 4096 and cmd.estimate.context == 4096
    argv = cmd.argv()
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.95"
    assert "--enforce-eager" in argv and "--enable-auto-tool-choice" not in argv
    assert argv[argv.index("--swap-space") + 1] == "4"


def test_cpu_flags_and_kv_cache_env():
    cmd = build_vllm_command(get_model("smollm2-135m-instruct"), model_path="/models/smol")
    assert cmd.flags["model"] == "/models/smol" and cmd.flags["dtype"] == "float32"
    assert cmd.flags["max-model-len"] == 8192 and "tensor-parallel-size" not in cmd.flags
    assert cmd.env == {"VLLM_CPU_KVCACHE_SPACE": "2"}  # 4 x 8192 tokens x 23040 B x 2 (fp32) = 1.4 GiB
    assert cmd.estimate is None


def test_errors():
    with pytest.raises(PresetError, match="max-model-len 8192 exceeds phi-3-mini-4k-instruct's context limit of 4096"):
        build_vllm_command(get_model("phi-3-mini-4k-instruct"), config=InferenceConfig(vllm={"max-model-len": 8192}))
    with pytest.raises(PresetError, match="count is 1"):
        build_vllm_command(get_model("llama-3.3-70b-instruct"), sku=get_sku("Standard_NC24ads_A100_v4"), node_count=1)
    with pytest.raises(ValueError, match="vllm.port is set by kaito-serve"):
        InferenceConfig(vllm={"port": 8000})
    with pytest.raises(ValueError, match="max-model-len must be a positive integer"):
        InferenceConfig(vllm={"max-model-len": "big"})


def test_inference_config_file(tmp_path):
    good = tmp_path / "inference_config.yaml"
    good.write_text("vllm:\n  cpu-offload-gb: 0\n  gpu-memory-utilization: 0.95\n  swap-space: 4\n  max-model-len: 4096\n")
    assert InferenceConfig.load(good).vllm["max-model-len"] == 4096
    cases = {
        "vllm: [1, 2\n": "not valid YAML",
        "- a\n- b\n": "must hold a mapping",
        "vllm: {}\nvlm: {}\n": "vlm: unknown key",
        "vllm:\n  max-model-len: -3\n": "positive integer",
    }
    for text, message in cases.items():
        good.write_text(text)
        with pytest.raises(PresetError, match=message):
            InferenceConfig.load(good)
    with pytest.raises(PresetError, match="cannot read inference config"):
        InferenceConfig.load(tmp_path / "missing.yaml")


def test_cli_vllm_args(tmp_path):
    cfg = tmp_path / "inference_config.yaml"
    cfg.write_text("vllm:\n  max-model-len: 4096\n")
    done = run_cli("kaito-presets", "vllm-args", "phi-4", "--instance-type", "Standard_NV36ads_A10_v5",
                   "--config", str(cfg), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["flags"]["pipeline-parallel-size"] == 2 and data["flags"]["max-model-len"] == 4096
    assert data["argv"][:2] == ["--model", "microsoft/phi-4"]
    line = run_cli("kaito-presets", "vllm-args", "smollm2-135m-instruct")
    assert line.returncode == 0 and line.stdout.startswith(
        "VLLM_CPU_KVCACHE_SPACE=2 python -m vllm.entrypoints.openai.api_server --model ")
