"""The model catalogue and the GPU SKU table, loaded from the data files beside this module.

Models outside the catalogue are described from a local folder (its config.json and weight files),
from the local Hugging Face cache, or from facts given explicitly.
"""

from __future__ import annotations

import difflib
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .schema import GPUSku, ModelPreset

DATA_DIR = Path(__file__).parent
CHAT_TEMPLATE_DIR = DATA_DIR / "chat_templates"
DEFAULT_MODEL = "smollm2-135m-instruct"


class PresetError(ValueError):
    """A model or SKU that cannot be found or described; the message says what to do."""


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=3, cutoff=0.5)
    by_lower = {c.lower(): c for c in choices}
    return f" Did you mean: {', '.join(by_lower[c] for c in close)}?" if close else ""


@cache
def _models() -> dict[str, ModelPreset]:
    out: dict[str, ModelPreset] = {}
    for path in sorted((DATA_DIR / "models").glob("*.yaml")):
        try:
            preset = ModelPreset(**yaml.safe_load(path.read_text()))
        except (ValidationError, TypeError) as e:
            raise PresetError(f"invalid preset file {path}: {e}") from e
        if preset.name != path.stem:
            raise PresetError(f"preset file {path} holds preset {preset.name!r}; name the file {preset.name}.yaml")
        out[preset.name] = preset
    return out


@cache
def _skus() -> dict[str, GPUSku]:
    data = yaml.safe_load((DATA_DIR / "gpus.yaml").read_text())
    return {s.name.lower(): s for s in (GPUSku(**item) for item in data["skus"])}


def models() -> list[ModelPreset]:
    return list(_models().values())


def skus() -> list[GPUSku]:
    return list(_skus().values())


def get_model(name: str) -> ModelPreset:
    """A preset by its name, or by its Hugging Face id (upstream KAITO's manifests use both)."""
    found = _models().get(name) or next(
        (m for m in _models().values() if name.lower() in (m.name, m.hf_id.lower())), None)
    if found is None:
        raise PresetError(f"unknown preset {name!r}.{_suggest(name, list(_models()))}")
    return found


def get_sku(name: str) -> GPUSku:
    """An instance type; names are matched case-insensitively, as Azure does."""
    try:
        return _skus()[name.lower()]
    except KeyError:
        names = [s.name for s in _skus().values()]
        raise PresetError(
            f"unknown instance type {name!r}.{_suggest(name, names)} Run `kaito-presets skus` for the list."
        ) from None


def chat_template_path(preset: ModelPreset) -> Path | None:
    return CHAT_TEMPLATE_DIR / preset.vllm.chat_template if preset.vllm.chat_template else None


# --- models outside the catalogue -------------------------------------------------------------


def _first(cfg: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return None


def preset_from_config(
    config: dict[str, Any], *, name: str, hf_id: str, weight_size_gib: float, parameters_b: float | None = None
) -> ModelPreset:
    """Describe a model from its Hugging Face config.json and the size of its weights."""
    text = config.get("text_config") or config  # multimodal configs nest the language model
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(text, "num_attention_heads", "n_head", "num_heads")
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    context = _first(text, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    missing = [k for k, v in {"num_hidden_layers": layers, "num_attention_heads": heads,
                              "max_position_embeddings": context}.items() if v is None]
    head_dim = _first(text, "head_dim") or (hidden // heads if hidden and heads else None)
    if head_dim is None:
        missing.append("head_dim or hidden_size")
    if missing:
        raise PresetError(f"config.json of {hf_id} lacks {', '.join(missing)}: cannot size the model")
    kv = _first(text, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if kv is None:
        kv = 1 if text.get("multi_query") else heads
    attention = "mha" if kv == heads else ("mqa" if kv == 1 else "gqa")
    archs = config.get("architectures") or ["AutoModelForCausalLM"]
    if parameters_b is None:  # 2 bytes a parameter is the common case; only used for display
        parameters_b = round(weight_size_gib * 2**30 / 2 / 1e9, 3)
    quant = (config.get("quantization_config") or {}).get("quant_method")
    return ModelPreset(
        name=name,
        hf_id=hf_id,
        family=str(config.get("model_type", "custom")),
        description=f"{hf_id} (described from its config.json)",
        parameters_b=parameters_b,
        weight_size_gib=weight_size_gib,
        weight_dtype=str(_first(config, "torch_dtype", "dtype") or text.get("torch_dtype") or "bfloat16"),
        quantization=quant,
        context_limit=int(context),
        num_hidden_layers=int(layers),
        num_attention_heads=int(heads),
        num_key_value_heads=int(kv),
        head_dim=int(head_dim),
        attention=attention,
        sliding_window=text.get("sliding_window"),
        architecture=archs[0],
    )


def weight_size_of(folder: Path) -> float:
    """GiB of the weight files in a model folder (safetensors preferred, else PyTorch .bin)."""
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    return sum(f.stat().st_size for f in files) / 2**30


def _hf_cache_snapshot(hf_id: str) -> Path | None:
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = hub.expanduser() / f"models--{hf_id.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return found[-1].parent if found else None


def resolve_model(ref: str, *, weight_size_gib: float | None = None, config: dict | None = None) -> ModelPreset:
    """A catalogue preset name, a local model folder, or a Hugging Face id known from the local cache
    or from `config` + `weight_size_gib` given explicitly."""
    if ref in _models():
        return _models()[ref]
    folder = Path(ref).expanduser()
    if not (folder / "config.json").is_file() and "/" in ref and not folder.exists():
        folder = _hf_cache_snapshot(ref) or folder
    if (folder / "config.json").is_file():
        size = weight_size_gib or weight_size_of(folder)
        if not size:
            raise PresetError(f"{folder} has config.json but no *.safetensors or *.bin weights; give the weight size")
        cfg = json.loads((folder / "config.json").read_text())
        return preset_from_config(cfg, name=_slug(Path(ref).name), hf_id=ref, weight_size_gib=size)
    if config is not None and weight_size_gib:
        return preset_from_config(config, name=_slug(Path(ref).name), hf_id=ref, weight_size_gib=weight_size_gib)
    raise PresetError(
        f"unknown model {ref!r}: not a catalogue preset, a local folder with config.json, or a model in the local "
        f"Hugging Face cache.{_suggest(ref, list(_models()))} Give a preset name (`kaito-presets list`), a folder "
        "holding config.json and the weights, or the model's config.json and weight size explicitly."
    )


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in ".-" else "-" for c in text.lower()).strip("-.")
    return out or "model"
