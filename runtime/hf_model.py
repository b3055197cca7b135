"""Loading a transformers causal LM the way the engine runs it, and what the engine reads from it.

Device: "auto" is the GPU when torch sees one. Dtype: "auto" is the checkpoint's on a GPU and float32
on a CPU; an explicit dtype is used as asked, except on a CPU without fast half-precision matmul
(float32, see runtime/cpu.py) and on a GPU without bfloat16 (float16).
`load_in_4bit` / `load_in_8bit` are bitsandbytes quantisation, GPU only. The settings themselves
are validated by `TransformersConfig`; what is checked here is what only the machine can say.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kaito.presets import TransformersConfig

from . import cpu

log = logging.getLogger(__name__)


def load_model(model_path: str, cfg: TransformersConfig, *, cpu_half_fallback: bool = True):
    """The tokenizer and the model on the device and in the dtype `cfg` asks for (on the CPU, see
    runtime/cpu.py; on a GPU without bfloat16, float16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA GPU")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and device == "cpu":
        raise RuntimeError(
            f"load_in_{'4' if cfg.load_in_4bit else '8'}bit needs a CUDA GPU (bitsandbytes quantisation) and torch "
            "sees none: load the model unquantised (dtype bfloat16 or float32)"
        )
    dtype: Any = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    if device == "cpu" and dtype == "auto":
        # torch's bf16/fp16 CPU kernels give a row different numbers in different batch shapes (seen on
        # AVX-512 BF16): batching would change the text. float32 is batch-invariant, and on CPUs without
        # fast half-precision matmul also the fastest.
        dtype = torch.float32
    elif device == "cpu" and cpu_half_fallback:
        dtype = cpu.compute_dtype(dtype)
    if device == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bfloat16 support: computing in float16")
        dtype = torch.float16
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device == "cuda":
        kwargs["device_map"] = "auto"
    if cfg.load_in_4bit or cfg.load_in_8bit:
        from transformers import BitsAndBytesConfig

        compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                               bnb_4bit_use_double_quant=True)
            if cfg.load_in_4bit else BitsAndBytesConfig(load_in_8bit=True)
        )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.eval()
    model.requires_grad_(False)
    if device == "cpu":
        cpu.use_gqa_sdpa(model)
    return tokenizer, model


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """The end-of-sequence ids named by the generation config, the model config and the tokenizer."""
    eos: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        val = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(val, int):
            eos.add(val)
        elif isinstance(val, (list, tuple)):
            eos.update(int(v) for v in val)
    return frozenset(t for t in eos if t >= 0)


def text_config(model):
    """The config of the model's text decoder (the model's own config for a text-only model)."""
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def vocab_size(model) -> int:
    out = model.get_output_embeddings()
    return int(out.weight.shape[0]) if out is not None else int(text_config(model).vocab_size)


def context_window(model, max_model_len: int | None) -> int:
    """`max_model_len` when given, capped by the model's positions (2048 when it does not say)."""
    limit = int(getattr(text_config(model), "max_position_embeddings", None) or 2048)
    if max_model_len is not None and max_model_len > limit:
        log.warning("max_model_len is beyond the model's positions: using the model's",
                    extra={"max_model_len": max_model_len, "positions": limit})
    return min(max_model_len or limit, limit)
