"""The model catalogue and the GPU SKU table, loaded from the data files beside this module.

Models outside the catalogue are described from a local folder (its config.json and weight files),
from the local Hugging Face cache, or from facts given explicitly.
"""

from __future__ import annotations

import difflib
import json
import os
import re
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


@cache
def _names() -> dict[str, ModelPreset]:
    """Every name a preset answers to, lower-case: its name, its Hugging Face id and its aliases."""
    out: dict[str, ModelPreset] = {}
    for preset in _models().values():
        for key in (preset.name, preset.hf_id.lower(), *preset.aliases):
            if out.setdefault(key, preset) is not preset:
                raise PresetError(f"{key!r} names two presets: {out[key].name} and {preset.name}")
    return out


def get_model(name: str) -> ModelPreset:
    """A preset by its name, its Hugging Face id or an alias (upstream KAITO's manifests use all three),
    in any case, as upstream matches them."""
    found = _names().get(name.lower())
    if found is None:
        raise PresetError(f"unknown preset {name!r}.{_suggest(name, list(_models()))}")
    return found


# An NVIDIA MIG profile: <compute slices>g.<memory>gb, optionally +me (media extensions), e.g. 1g.10gb, 3g.40gb
MIG_PROFILE = re.compile(r"^([1-7])g\.(\d+)gb(\+me)?$")


def get_sku(name: str) -> GPUSku:
    """An instance type; names are matched case-insensitively, as Azure does. Two forms size a GPU
    partition (resource.partition of a Workspace on its own nodes): `mig-<profile>` is one NVIDIA MIG
    slice (e.g. mig-1g.10gb), and `<instance type>/<n>` is n of that instance type's GPUs."""
    key = name.lower()
    if key.startswith("mig-"):
        return mig_sku(key.removeprefix("mig-"))
    base, slash, gpus = key.partition("/")
    if slash:
        sku = get_sku(base)
        if not gpus.isdigit() or not 1 <= int(gpus) <= sku.gpu_count:
            raise PresetError(f"{name!r}: {sku.name} has {sku.gpu_count} GPUs; ask for 1 to {sku.gpu_count}")
        n = int(gpus)
        return sku.model_copy(update={"name": f"{sku.name}/{n}", "gpu_count": n,
                                      "gpu_memory_gib": sku.gpu_memory_per_gpu_gib * n})
    try:
        return _skus()[key]
    except KeyError:
        names = [s.name for s in _skus().values()]
        raise PresetError(
            f"unknown instance type {name!r}.{_suggest(name, names)} Run `kaito-presets skus` for the list."
        ) from None


def mig_sku(profile: str) -> GPUSku:
    """One MIG slice as a one-GPU instance type with the slice's memory. MIG runs on A100, A30, H100 and
    later (compute capability 8.0 and up: bf16)."""
    m = MIG_PROFILE.match(profile.lower())
    if m is None:
        raise PresetError(f"invalid MIG profile {profile!r}: expected <slices>g.<memory>gb, e.g. 1g.10gb or 3g.40gb")
    return GPUSku(name=f"mig-{profile.lower()}", cloud="azure", gpu_model=f"MIG {profile.lower()}", gpu_count=1,
                  gpu_memory_gib=float(m.group(2)), compute_capability="8.0", vcpus=1, memory_gib=float(m.group(2)))


def chat_template_path(preset: ModelPreset) -> Path | None:
    return CHAT_TEMPLATE_DIR / preset.vllm.chat_template if preset.vllm.chat_template else None


# --- models outside the catalogue -------------------------------------------------------------


def _first(cfg: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return None


def preset_from_config(
    config: dict[str, Any], *, name: str, hf_id: str, weight_size_gib: float, parameters_b: float | None = None,
    **fields: Any,
) -> ModelPreset:
    """Describe a model from its Hugging Face config.json (or Mistral's params.json) and the size of its
    weights; `fields` set further ModelPreset fields (e.g. runtimes, requires_token)."""
    text = config.get("text_config") or config  # multimodal configs nest the language model
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = _first(text, "num_attention_heads", "n_head", "num_heads", "n_heads")
    hidden = _first(text, "hidden_size", "n_embd", "d_model", "dim")
    context = _first(text, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                     "max_seq_len")
    missing = [k for k, v in {"num_hidden_layers": layers, "num_attention_heads": heads,
                              "max_position_embeddings": context}.items() if v is None]
    head_dim = _first(text, "head_dim") or (hidden // heads if hidden and heads else None)
    if head_dim is None:
        missing.append("head_dim or hidden_size")
    if missing:
        raise PresetError(f"config.json of {hf_id} lacks {', '.join(missing)}: cannot size the model")
    kv = _first(text, "num_key_value_heads", "num_kv_heads", "n_head_kv", "n_kv_heads")
    if kv is None:
        kv = 1 if text.get("multi_query") else heads
    mla = text.get("kv_lora_rank") and text.get("qk_rope_head_dim")  # DeepSeek's latent attention
    attention = "mla" if mla else "mha" if kv == heads else ("mqa" if kv == 1 else "gqa")
    archs = config.get("architectures") or ["AutoModelForCausalLM"]
    if parameters_b is None:  # 2 bytes a parameter is the common case; only used for display
        parameters_b = float(f"{weight_size_gib * 2**30 / 2 / 1e9:.4g}")
    quant = (config.get("quantization_config") or {}).get("quant_method")
    data = {
        "name": name,
        "hf_id": hf_id,
        "family": str(config.get("model_type", "custom")),
        "description": f"{hf_id} (described from its config.json)",
        "parameters_b": parameters_b,
        "weight_size_gib": weight_size_gib,
        "weight_dtype": str(_first(config, "torch_dtype", "dtype") or text.get("torch_dtype") or "bfloat16"),
        "quantization": quant,
        "context_limit": int(context),
        "num_hidden_layers": int(layers),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv),
        "head_dim": int(head_dim),
        "attention": attention,
        "kv_lora_rank": text["kv_lora_rank"] if mla else None,
        "qk_rope_head_dim": text["qk_rope_head_dim"] if mla else None,
        "attention_layers": _attention_layers(text, int(layers)),
        "sliding_window": text.get("sliding_window"),
        "architecture": archs[0],
        **fields,
    }
    try:
        return ModelPreset(**data)
    except ValidationError as e:
        raise PresetError(f"config.json of {hf_id} does not describe a model kaito can serve: {e}") from None


def _attention_layers(text: dict[str, Any], layers: int) -> int | None:
    """Hybrids: the layers with attention (the others, Mamba or linear attention, keep no KV cache), from
    Nemotron-H's hybrid_override_pattern ("*": attention) or transformers' layer_types; None: every layer."""
    if pattern := text.get("hybrid_override_pattern"):
        count = pattern.count("*")
    elif types := text.get("layer_types"):
        count = sum(1 for t in types if "attention" in t and "linear" not in t)
    else:
        return None
    return count if 0 < count < layers else None


def weight_files(files: dict[str, int]) -> dict[str, int]:
    """The weight files an engine loads, of a model's files (path -> size): the top-level safetensors
    (Mistral's consolidated*.safetensors only when there are no others, which they duplicate), else the
    top-level PyTorch .bin files. Sub-folders (original/ checkpoints) are not loaded."""
    top = {p: size for p, size in files.items() if "/" not in p}
    safetensors = {p: size for p, size in top.items() if p.endswith(".safetensors")}
    hf_format = {p: size for p, size in safetensors.items() if not p.startswith("consolidated")}
    return hf_format or safetensors or {p: size for p, size in top.items() if p.endswith(".bin")}


def weight_size_of(folder: Path) -> float:
    """GiB of the weight files in a model folder (see weight_files)."""
    files = {f.name: f.stat().st_size for f in folder.iterdir() if f.is_file()}
    return sum(weight_files(files).values()) / 2**30


def hub_cache() -> Path:
    """Where Hugging Face repositories are downloaded to and looked up in: $HF_HUB_CACHE, else $HF_HOME/hub,
    else $KAITO_HOME/huggingface/hub, so that kaito's downloads stay with its other state, at the same place
    on every run (pods set HF_HOME to their weights volume)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from .default_model import kaito_home

    return kaito_home() / "huggingface" / "hub"


def resolve_model(ref: str, *, weight_size_gib: float | None = None, config: dict | None = None) -> ModelPreset:
    """A catalogue preset (by name, Hugging Face id or alias), a local model folder, a model given by `config` +
    `weight_size_gib`, or a Hugging Face repo id (`org/name`): a complete copy in the local cache (hub_cache),
    else described from the hub (kaito.presets.hub). `weight_size_gib` overrides the size found."""
    try:
        return get_model(ref)
    except PresetError:
        pass
    folder = Path(ref).expanduser()
    if (folder / "config.json").is_file():
        size = weight_size_gib or weight_size_of(folder)
        if not size:
            raise PresetError(f"{folder} has config.json but no *.safetensors or *.bin weights; give the weight size")
        cfg = json.loads((folder / "config.json").read_text())
        return preset_from_config(cfg, name=_slug(folder.name), hf_id=ref, weight_size_gib=size)
    if config is not None and weight_size_gib:
        return preset_from_config(config, name=_slug(folder.name), hf_id=ref, weight_size_gib=weight_size_gib)
    unknown = f"unknown model {ref!r}: not a catalogue preset or a local folder with config.json"
    from .hub import HubUnreachableError, describe, is_repo_id

    if is_repo_id(ref) and not folder.exists():
        try:
            preset = describe(ref)
        except HubUnreachableError as e:
            raise HubUnreachableError(f"{unknown}.{_suggest(ref, list(_models()))} {e}") from None
        return preset.model_copy(update={"weight_size_gib": weight_size_gib}) if weight_size_gib else preset
    raise PresetError(
        f"{unknown}.{_suggest(ref, list(_models()))} Give a preset name (`kaito-presets list`), a Hugging Face id "
        "(org/name), a folder holding config.json and the weights, or the model's config.json and weight size "
        "explicitly."
    )


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in ".-" else "-" for c in text.lower()).strip("-.")
    return out or "model"
