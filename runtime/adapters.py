"""LoRA adapter folders: each sub-folder of the adapters dir holding a PEFT adapter is served under
the folder's name. Shared by both backends."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")


class AdapterError(ValueError):
    """An adapter folder or name that cannot be served; the message says why."""


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    rank: int
    base_model: str | None


def read_adapter(path: str | Path, name: str | None = None) -> Adapter:
    path = Path(path)
    name = name or path.name
    if not NAME.match(name):
        raise AdapterError(f"adapter name {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"{path} is not a PEFT adapter folder: adapter_config.json is missing")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file} is not valid JSON: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: only LoRA adapters can be served, this one is {cfg.get('peft_type')}")
    if not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise AdapterError(f"{path} has no adapter_model.safetensors")
    return Adapter(name=name, path=path, rank=int(cfg.get("r", 8)), base_model=cfg.get("base_model_name_or_path"))


def scan(adapters_dir: str | Path) -> list[Adapter]:
    """The adapters in a folder; a sub-folder that is not an adapter is an error, not silently skipped."""
    root = Path(adapters_dir)
    if not root.is_dir():
        return []
    return [read_adapter(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
