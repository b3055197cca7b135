"""Each component's image installs one extra of pyproject.toml (Dockerfiles/, scripts/setup.sh EXTRA),
while the test environment installs them all: so a module a component imports but only another
extra brings works here and fails in the image. Every third-party module a component's code imports
(at the top or inside a function) must come from its own extra, directly or through the installed
packages' dependencies."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib import metadata

import pytest
from helpers import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# the folder, the extra its image installs (the GPU image's `gpu` needs vllm, which is not installed here)
COMPONENTS = {"ragservice": "rag", "tuning": "tune", "operator": "operator", "runtime": "cpu"}
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[([^\]]+)\])?")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extra: str) -> list[str]:
    """The extra's requirements with kaito's own extras (`kaito[hf]`) expanded, plus the base ones."""
    found = list(PYPROJECT["project"]["dependencies"])
    for req in EXTRAS[extra]:
        name, wanted = REQUIREMENT.match(req).groups()
        found += [r for e in wanted.split(",") for r in requirements(e)] if norm(name) == "kaito" else [req]
    return found


def distributions(reqs: list[str]) -> set[str]:
    """The installed distributions `reqs` pull in, with the extras they ask of each other."""
    todo = [REQUIREMENT.match(r).groups() for r in reqs]
    seen: set[tuple[str, str]] = set()
    while todo:
        name, wanted = todo.pop()
        for extra in ["", *(wanted or "").split(",")]:
            key = (norm(name), extra.strip())
            if key in seen:
                continue
            seen.add(key)
            try:
                needs = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue
            for need in needs:
                marker = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", need)
                if (marker.group(1) if marker else "") == key[1]:
                    todo.append(REQUIREMENT.match(need).groups())
    return {name for name, _ in seen}


def imported_modules(folder: str) -> set[str]:
    modules = set()
    for path in (REPO / folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    return modules


@pytest.mark.parametrize("folder", sorted(COMPONENTS))
def test_a_component_imports_only_what_its_extra_installs(folder):
    provided = distributions(requirements(COMPONENTS[folder]))
    owners = metadata.packages_distributions()
    missing = sorted(m for m in imported_modules(folder) - {"kaito"}
                     if m in owners and not {norm(d) for d in owners[m]} & provided)
    assert not missing, f"{folder} imports {missing}, which the `{COMPONENTS[folder]}` extra does not install"


def test_the_check_sees_a_module_an_extra_lacks():
    assert "faiss" in imported_modules("ragservice")
    assert "faiss-cpu" not in distributions(requirements("operator"))
    assert {"uvicorn", "faiss-cpu", "torch"} <= distributions(requirements("rag"))
