"""Every command in docs/ is run here (docs/index.md, "How the docs are tested").

Each page's `bash` and `python` blocks run in order as one bash session (`set -euo pipefail`) in a
scratch folder holding links to the repository's files, with a scratch KAITO_HOME (the default model
linked in, materialised once by the session fixture); ports 5000-5009 become free ports on 127.0.0.1.
`# file: NAME` blocks are written before the commands after them; `# needs: ...` blocks are the
ones this machine cannot run (cluster, Azure, Docker, GPU, model hub) and are only checked for
the marker. The page's output must hold the strings in EXPECT, so a command that prints the wrong
answer fails too. Also: docs/reference.md is what docs/gen_reference.py makes from the code, every
status reason the operator writes is explained in troubleshooting.md, and index.md lists every page.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, free_port

DOCS = REPO / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
COMMAND_LANGS = {"bash", "python"}
DATA_LANGS = {"yaml", "json", "text", ""}  # "": diagrams (architecture.md)
NEEDS = "# needs:"
FILE = "# file:"
PAGE_TIMEOUT = 420

# What each page's commands must print (beside exiting 0): the answers the docs promise.
EXPECT = {
    "quickstart.md": ["The capital of France is Paris.", '"object":"list"'],
    "upstream.md": ["workspace-qwen-2-5-coder-32b-instruct valid", "refused (exit status 1)"],
    "presets.md": ["hf_id: microsoft/phi-4", "hf_id: google/gemma-3-27b-it", '"node_count": 2', "does not fit (exit status 2)",
                   "--pipeline-parallel-size 2"],
    "serving.md": ["phi-4", "does not fit (exit status 2)", "Standard_NC40ads_H100_v5", "--max-model-len 1024", '"max_model_len":1024',
                   "without the key: HTTP 401"],
    "tuning.md": ["adapter_model.safetensors", "fine_tuning_completed.txt", "refused (exit status 2)",
                  "secret -> The secret word is Banana."],
    "local-runner.md": ["refused (exit status 1)", "Run with --cpu", "workspace-smollm2 condition met", "Ready",
                        "The capital of France is Paris.", "workspace.kaito.sh/workspace-smollm2 deleted"],
    "rag.md": ["hash_value", "documents indexed", "tangerine-42", "sources: ['The vault of the Zorblax",
               "handbook", "kaito-docs"],
    "aks.md": ["valid", "kind: StatefulSet", "kind: NodeClaim"],
    "inferenceset.md": ["inferenceset.kaito.sh/phi-4 valid", "name: phi-4-1", "maxReplicaCount: 2",
                        "workspace.kaito.sh/smollm2-1 condition met", "workspace.kaito.sh/smollm2-0 deleted"],
    "weights.md": ["smollm2-135m-instruct", "cannot be reached over http", "refused (exit status 2)"],
    "troubleshooting.md": ["refused (exit status 2)", "set by kaito-serve itself", "Did you mean: phi-4?", "valid"],
}


def blocks(page: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer((DOCS / page).read_text())]


def first_line(body: str) -> str:
    return body.lstrip("\n").split("\n", 1)[0].strip()


def script(page: str, ports: dict[str, int]) -> str:
    """The page's commands as one bash script; None when it has nothing to run."""
    parts = []
    for lang, body in blocks(page):
        head = first_line(body)
        if head.startswith(FILE):
            name = head[len(FILE):].strip()
            parts.append(f"cat > {shlex.quote(name)} <<'KAITO_DOC_EOF'\n{body}KAITO_DOC_EOF")
        elif lang in COMMAND_LANGS and not head.startswith(NEEDS):
            parts.append(body if lang == "bash" else f"python - <<'KAITO_DOC_EOF'\n{body}KAITO_DOC_EOF")
    if not any(lang in COMMAND_LANGS and not first_line(b).startswith(NEEDS) for lang, b in blocks(page)):
        return ""
    return re.sub(r"\b500[0-9]\b", lambda m: str(ports.get(m.group(0), m.group(0))),
                  "set -euo pipefail\n" + "\n".join(parts))


def test_every_block_is_run_or_marked():
    """A command block is `bash` or `python` (run, or marked `# needs: WHAT`); data blocks are yaml/json/text,
    and none of them hides a command line."""
    problems = []
    for page in PAGES:
        for lang, body in blocks(page):
            head = first_line(body)
            where = f"{page}: block starting {head!r}"
            if lang in COMMAND_LANGS:
                if head.startswith(NEEDS) and not head[len(NEEDS):].strip():
                    problems.append(f"{where}: say what it needs")
            elif lang in DATA_LANGS:
                if any(re.match(r"\s*(\$ |kaito-|curl |python |bash |kubectl |helm |az )", line)
                       for line in body.splitlines()):
                    problems.append(f"{where}: a command in a {lang} block (use a bash block)")
            else:
                problems.append(f"{where}: fence language {lang!r}: use bash/python (commands) or yaml/json/text")
    assert not problems, "\n".join(problems)
    assert sum(1 for p in PAGES for lang, b in blocks(p) if lang in COMMAND_LANGS and first_line(b).startswith(NEEDS))
    assert set(EXPECT) == {p for p in PAGES if script(p, {})}, "every page with commands has its EXPECT line"


def test_index_lists_every_page():
    index = (DOCS / "index.md").read_text()
    missing = [p for p in PAGES if p != "index.md" and f"({p})" not in index]
    assert not missing, f"docs/index.md does not link {missing}"


def test_reference_is_current():
    """docs/reference.md is generated from the parsers, the environment reads and the config models."""
    r = subprocess.run([sys.executable, str(DOCS / "gen_reference.py"), "--check"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    ref = (DOCS / "reference.md").read_text()
    for flag in ("--adapters-dir", "--method", "--no-auto-provision", "--instance-type", "KAITO_HOME",
                 "max_batch_size", "LoraConfig"):
        assert flag in ref


def test_reference_check_fails_when_stale(tmp_path, monkeypatch):
    """The staleness check itself can fail: a reference missing a line is reported."""
    sys.path.insert(0, str(DOCS))
    try:
        import gen_reference
    finally:
        sys.path.remove(str(DOCS))
    text = gen_reference.build()
    assert "`kaito-serve`" in text and "`kaito-operator local apply`" in text
    stale = tmp_path / "reference.md"
    stale.write_text(text.replace("--adapters-dir", "--adapter-dir"))
    monkeypatch.setattr(gen_reference, "OUT", stale)
    assert gen_reference.main(["--check"]) == 1
    stale.write_text(text)
    assert gen_reference.main(["--check"]) == 0


# Words in the operator's code that are Kubernetes/Azure vocabulary, not status reasons.
NOT_REASONS = {"Deployment", "FromImage", "Linux", "Location", "Manual", "MemoryGB", "Node", "NodeClaim", "RAGEngine",
               "Secret", "StatefulSet", "TrainingArguments", "True", "False", "Unknown", "User", "Workspace", "GPUs",
               "PodScheduled", "Launching", "NotLaunched", "DELETED", "Event", "Normal", "Warning", "Service",
               "ConfigMap", "ModelMirror", "Managed", "OnFailure", "PersistentVolumeClaim", "ReadWriteMany"}


def test_troubleshooting_explains_every_reason():
    page = (DOCS / "troubleshooting.md").read_text()
    words = set()
    for f in ("controller.py", "status.py", "cluster.py", "azure.py", "local.py", "mirror.py"):
        words |= set(re.findall(r'"([A-Z][A-Za-z]{3,})"', (REPO / "operator" / f).read_text()))
    missing = sorted(w for w in words - NOT_REASONS if f"`{w}`" not in page)
    assert not missing, f"docs/troubleshooting.md does not explain {missing}"


@pytest.fixture(scope="module")
def kaito_home(tmp_path_factory, default_model_dir):
    """A scratch KAITO_HOME whose models/ is the session's materialised default model."""
    home = tmp_path_factory.mktemp("kaito-home")
    (home / "models").symlink_to(default_model_dir.parent)
    return home


def workdir(tmp: Path) -> Path:
    for entry in REPO.iterdir():
        if entry.name not in (".git", ".venv") and not entry.name.startswith("."):
            (tmp / entry.name).symlink_to(entry)
    return tmp


def stop_local_resources(home: Path) -> None:
    """Processes a failed page left behind in the local runner (it starts them in their own groups)."""
    for record in (home / "local").rglob("record.json") if (home / "local").is_dir() else []:
        pid = json.loads(record.read_text()).get("pid")
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if script(p, {})])
def test_page_commands(page, kaito_home, tmp_path):
    ports = {str(p): free_port() for p in range(5000, 5010)}
    cwd = tmp_path / "work"
    cwd.mkdir()
    workdir(cwd)
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(kaito_home / "models")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAITO_", "VIRTUAL_ENV"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", KAITO_HOME=str(home), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", NO_COLOR="1", COLUMNS="200")
    text = script(page, ports)
    (cwd / "page.sh").write_text(text)
    proc = subprocess.Popen(["bash", "page.sh"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=PAGE_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{page}: commands not done after {PAGE_TIMEOUT} s:\n{out[-6000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # servers the page started in the background
        except ProcessLookupError:
            pass
        stop_local_resources(home)
    logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in cwd.glob("*.log"))
    assert proc.returncode == 0, f"{page}: exit {proc.returncode}\n{out[-6000:]}{logs}"
    missing = [s for s in EXPECT[page] if s not in out]
    assert not missing, f"{page}: the output lacks {missing}:\n{out[-6000:]}"
