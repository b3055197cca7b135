"""Reading manifests: a YAML file (several documents) becomes parsed kaito resources plus the plain
Kubernetes objects beside them (ConfigMaps and Secrets the resources refer to, PVCs, ...)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .api import KINDS, RAGEngine, Resource, Workspace


class ManifestError(ValueError):
    """A manifest that cannot be read or parsed; the message names the document and field."""


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse(doc: dict[str, Any], source: str = "manifest") -> Resource:
    """One Workspace or RAGEngine document -> its model; errors name the field (camelCase, as written)."""
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: a document must be a mapping, not {type(doc).__name__}")
    kind = doc.get("kind")
    model = KINDS.get(kind)
    if model is None:
        raise ManifestError(f"{source}: kind {kind!r} is not a kaito resource (Workspace or RAGEngine)")
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        name = (doc.get("metadata") or {}).get("name", "?")
        lines = []
        for err in e.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
                if err["loc"] == ("spec",) and kind == "Workspace":
                    msg += ": a Workspace has no spec; resource, inference and tuning are top-level fields"
            lines.append(f"{_where(err['loc'])}: {msg}")
        raise ManifestError(f"{source}: {kind} {name!r} is invalid:\n  " + "\n  ".join(lines)) from None


@dataclass
class Manifests:
    resources: list[Resource] = field(default_factory=list)
    objects: list[dict[str, Any]] = field(default_factory=list)  # everything else, as written

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        for obj in self.objects:
            if obj.get("kind") == kind and (obj.get("metadata") or {}).get("name") == name:
                return obj
        return None

    def configmap(self, name: str) -> dict[str, str] | None:
        obj = self.find("ConfigMap", name)
        return None if obj is None else dict(obj.get("data") or {})

    @property
    def workspaces(self) -> list[Workspace]:
        return [r for r in self.resources if isinstance(r, Workspace)]

    @property
    def ragengines(self) -> list[RAGEngine]:
        return [r for r in self.resources if isinstance(r, RAGEngine)]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (configs, scripts) as literal blocks, no anchors: readable output."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(objects: list[dict[str, Any]]) -> str:
    """Objects as a multi-document YAML stream, keys in their rendered order."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=120)


def loads(text: str, source: str = "manifest") -> Manifests:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ManifestError(f"{source} is not valid YAML: {e}") from None
    out = Manifests()
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") in KINDS:
            out.resources.append(parse(doc, source))
        elif isinstance(doc, dict) and doc.get("kind") == "List":
            sub = loads(yaml.safe_dump_all(doc.get("items") or []), source)
            out.resources += sub.resources
            out.objects += sub.objects
        elif isinstance(doc, dict) and "kind" in doc:
            out.objects.append(doc)
        else:
            raise ManifestError(f"{source}: every document needs `kind` and `apiVersion`")
    return out


def load(path: str | Path) -> Manifests:
    """A manifest file, or `-` for standard input."""
    if str(path) == "-":
        return loads(sys.stdin.read(), "stdin")
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror}") from None
    return loads(text, str(path))
