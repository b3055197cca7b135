"""What the transformers backend does differently on the CPU.

* On a CPU without native half-precision matmul (AVX2-only x86: no AVX-512 / AMX / ARM bf16) the
  model is computed in float32 even when bf16 is asked for (`compute_dtype`): there torch runs bf16
  GEMMs in a generic kernel at a flat ~8 GFLOP/s, so 16 rows cost 16 times one row and batching
  gains nothing, while float32 goes through MKL (a 576x1536 linear layer: 20 GFLOP/s for 1 row,
  60 GFLOP/s for 16). On such a CPU float32 is faster even for a single request.
* Grouped-query attention with a padding mask runs through torch's SDPA with `enable_gqa=True`
  (attention function "kaito_sdpa", `use_gqa_sdpa`); transformers' own SDPA path repeats the KV
  heads whenever there is a mask, a copy of the whole cache per layer per step (5x slower attention
  for 16 rows x 200 columns).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

ATTENTION = "kaito_sdpa"  # the name the GQA attention function is registered under


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo); empty when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_fast_matmul(dtype: Any) -> bool:
    """Whether torch's CPU matmul runs `dtype` ("auto" = the checkpoint's half dtype) through oneDNN's
    native or AVX-512 kernels (torch's mkldnn_bf16/fp16 device checks). Unknown CPU: assume yes."""
    flags = cpu_flags()
    if not flags:
        return True
    if dtype == torch.float16:
        return bool(flags & {"avx512_fp16", "amx_fp16"}) or {"fphp", "asimdhp"} <= flags
    return ({"avx512bw", "avx512vl", "avx512dq"} <= flags or bool(flags & {"avx512_bf16", "amx_bf16"})
            or "bf16" in flags)


def compute_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """The dtype to compute in on this CPU when `dtype` (a torch dtype or "auto") is asked for:
    float32 instead of a half dtype that this CPU has no fast matmul for."""
    if dtype == torch.float32 or has_fast_matmul(dtype):
        return dtype
    log.warning("this CPU has no fast half-precision matmul: computing in float32",
                extra={"dtype": str(dtype).removeprefix("torch.")})
    return torch.float32


def use_gqa_sdpa(model) -> None:
    """Switch a model on the CPU that uses transformers' "sdpa" attention to "kaito_sdpa"; a model
    that does not take custom attention functions keeps its own."""
    if model.config._attn_implementation != "sdpa":
        return
    try:
        _register()
        model.set_attn_implementation(ATTENTION)
    except Exception as e:  # noqa: BLE001 - a model that does not take custom attention functions
        log.info("keeping transformers' sdpa attention", extra={"reason": str(e)})


def _register() -> None:
    """transformers' SDPA path repeats the KV heads of grouped-query attention (a copy of the whole
    cache, every layer, every step) whenever there is an attention mask, i.e. whenever a batch has
    padding. On the CPU torch's SDPA takes the mask together with `enable_gqa=True` (5x faster for
    16 rows x 200 columns), so this variant does that and defers to transformers otherwise."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        if (
            getattr(module, "num_key_value_groups", 1) > 1
            and isinstance(attention_mask, torch.Tensor)
            and attention_mask.dtype == torch.bool
            and kwargs.get("position_bias") is None
            and key.shape[-1] == value.shape[-1]
            and query.device.type == "cpu"
            and not module.training
        ):
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True
            )
            return out.transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)

    AttentionInterface.register(ATTENTION, gqa_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
