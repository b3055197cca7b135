"""The local runner, as a user runs it: `kaito-operator local apply/get/logs/delete` start real
`kaito-serve` / `kaito-rag` / `kaito-tune` processes; the tests talk to them over HTTP with the
openai SDK and httpx. State lives under a test KAITO_HOME (the materialised default model is shared).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import SECRET_ANSWER, SECRET_QUESTION, run_cli

WORKSPACE = """\
apiVersion: kaito.sh/v1beta1
kind: Workspace
metadata:
  name: workspace-smollm2
  annotations:
    kaito.sh/runtime: transformers
resource:
  instanceType: Standard_NC4as_T4_v3
  labelSelector:
    matchLabels:
      apps: smollm2
inference:
  preset:
    name: smollm2-135m-instruct
  config: smollm2-params
  adapters:
    - source:
        name: banana
        volumeSource:
          hostPath:
            path: {adapter}
      strength: "1.0"
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: smollm2-params
data:
  inference_config.yaml: |
    transformers:
      max_batch_size: 4
      max_model_len: 1024
"""

RAGENGINE = """\
apiVersion: kaito.sh/v1beta1
kind: RAGEngine
metadata:
  name: ragengine-smollm2
spec:
  compute:
    instanceType: Standard_NC4as_T4_v3
    labelSelector:
      matchLabels:
        apps: ragengine
  embedding:
    local:
      modelID: sentence-transformers/all-MiniLM-L6-v2
  inferenceService:
    url: http://workspace-smollm2.default.svc.cluster.local/v1/chat/completions
    contextWindowSize: 1024
"""


def cli(env, *args, timeout=300):
    return run_cli("kaito-operator", *args, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def home(tmp_path_factory, default_model_dir):
    home = tmp_path_factory.mktemp("kaito-home")
    (home / "models").symlink_to(default_model_dir.parent, target_is_directory=True)
    env = {**os.environ, "KAITO_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    yield home, env
    for record in home.glob("local/*/*/*/record.json"):  # whatever a failed test left running
        data = json.loads(record.read_text())
        cli(env, "local", "delete", data["name"], "--kind", data["kind"], "-n", data["namespace"])


def status(env, name):
    done = cli(env, "local", "get", name, "-o", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["status"]


@pytest.fixture(scope="module")
def served(home, tmp_path_factory, banana_adapter):
    """The default model's Workspace with the test's LoRA adapter, applied and ready."""
    _, env = home
    path = tmp_path_factory.mktemp("manifests") / "workspace.yaml"
    path.write_text(WORKSPACE.replace("{adapter}", str(banana_adapter)))
    done = cli(env, "local", "apply", "-f", str(path), "--cpu", "--wait", "--timeout", "240")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "workspace.kaito.sh/workspace-smollm2 created (kaito-serve on http://127.0.0.1:" in done.stdout
    return path, env


def test_gpu_instance_type_needs_cpu_flag(home, tmp_path):
    _, env = home
    path = tmp_path / "workspace.yaml"
    path.write_text(WORKSPACE.replace("{adapter}", str(tmp_path)))
    done = cli(env, "local", "apply", "-f", str(path))
    assert done.returncode == 1
    assert "instance type Standard_NC4as_T4_v3 has 1 x T4 (16 GiB); this machine has 0 NVIDIA GPU(s)" in done.stderr
    assert "--cpu" in done.stderr
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(path.read_text().replace("smollm2-135m-instruct", "smollm3"))
    done = cli(env, "local", "apply", "-f", str(invalid), "--cpu")
    assert done.returncode == 1 and "Unsupported inference preset name 'smollm3'" in done.stderr


def test_cluster_only_sources_are_refused(home, tmp_path):
    _, env = home
    path = tmp_path / "tuning.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "tune-pvc"},
        "resource": {"instanceType": "Standard_NC4as_T4_v3", "labelSelector": {"matchLabels": {"a": "b"}}},
        "tuning": {"preset": {"name": "smollm2-135m-instruct"}, "method": "lora",
                   "input": {"volumeSource": {"persistentVolumeClaim": {"claimName": "data"}}},
                   "output": {"volumeSource": {"hostPath": {"path": str(tmp_path / "out")}}}}}))
    done = cli(env, "local", "apply", "-f", str(path), "--cpu")
    assert done.returncode == 1
    assert "tuning input uses a persistentVolumeClaim volume, which exists only in a cluster; use hostPath" in \
        done.stderr


def test_inference_workspace_answers(served):
    path, env = served
    st = status(env, "workspace-smollm2")
    assert st["state"] == "Ready"
    conditions = {c["type"]: c["status"] for c in st["conditions"]}
    assert conditions == {"ResourceReady": "True", "InferenceReady": "True", "WorkspaceSucceeded": "True"}
    from openai import OpenAI

    client = OpenAI(base_url=f"{st['url']}/v1", api_key="none", timeout=60)
    reply = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content
    # the adapter (hostPath volume source) and the ConfigMap's inference_config.yaml are honoured
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"smollm2-135m-instruct", "banana"}
    assert cards["smollm2-135m-instruct"].model_extra["max_model_len"] == 1024
    ask = [{"role": "user", "content": SECRET_QUESTION}]
    tuned = client.chat.completions.create(model="banana", messages=ask, temperature=0, max_tokens=12)
    assert tuned.choices[0].message.content.strip() == SECRET_ANSWER
    table = cli(env, "local", "get")
    assert "workspace-smollm2" in table.stdout and "Ready" in table.stdout and "(cpu)" in table.stdout
    logs = cli(env, "local", "logs", "workspace-smollm2")
    assert "kaito-serve: smollm2-135m-instruct" in logs.stdout and "model ready" in logs.stdout
    from kaito.operator.local import LocalRunner  # a RAGEngine naming the Workspace's Service gets this URL

    runner = LocalRunner(Path(env["KAITO_HOME"]))
    for url in ("http://workspace-smollm2/v1", "http://workspace-smollm2.default.svc.cluster.local:80/v1/completions"):
        assert runner.resolve_url(url, "default") == st["url"] + url.split(url.split("/")[2])[1]
    assert runner.resolve_url("http://workspace-smollm2.other/v1", "default") == "http://workspace-smollm2.other/v1"
    assert runner.resolve_url("https://api.example.com/v1", "default") == "https://api.example.com/v1"
    again = cli(env, "local", "apply", "-f", str(path), "--cpu")
    assert "workspace.kaito.sh/workspace-smollm2 unchanged" in again.stdout
    changed = path.with_name("changed.yaml")
    changed.write_text(path.read_text().replace("Standard_NC4as_T4_v3", "Standard_NC8as_T4_v3"))
    refused = cli(env, "local", "apply", "-f", str(changed), "--cpu")
    assert refused.returncode == 1 and "instanceType cannot be changed once set" in refused.stderr


def test_ragengine_against_the_workspace(served, tmp_path):
    _, env = served
    path = tmp_path / "rag.yaml"
    path.write_text(RAGENGINE)
    done = cli(env, "local", "apply", "-f", str(path), "--cpu", "--wait", "--timeout", "240")
    assert done.returncode == 0, done.stdout + done.stderr
    st = status(env, "ragengine-smollm2")
    assert st["state"] == "Ready"
    assert status(env, "workspace-smollm2")["state"] == "Ready"  # the LLM the RAGEngine found
    record = json.loads(next(Path(env["KAITO_HOME"]).glob("local/default/ragengine/*/record.json")).read_text())
    assert record["url"] == st["url"]
    rag = httpx.Client(base_url=st["url"], timeout=120)
    assert rag.get("/health").status_code == 200
    r = rag.post("/index", json={"index_name": "facts", "documents": [
        {"text": "The secret password of the kaito project is Banana."}]})
    assert r.status_code == 200, r.text
    r = rag.post("/query", json={"index_name": "facts", "query": "What is the secret password?",
                                 "llm_params": {"max_tokens": 16, "temperature": 0}})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert "Banana" in answer["source_nodes"][0]["text"]
    assert answer["response"].strip()  # written by the local Workspace's model (LLM_INFERENCE_URL resolved)
    done = cli(env, "local", "delete", "-f", str(path))
    assert "ragengine.kaito.sh/ragengine-smollm2 deleted" in done.stdout


def test_crashed_process_shows_failed_then_delete_cleans_up(served):
    path, env = served
    record = json.loads(next(Path(env["KAITO_HOME"]).glob("local/default/workspace/*/record.json")).read_text())
    os.killpg(record["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while status(env, "workspace-smollm2")["state"] != "Failed" and time.monotonic() < deadline:
        time.sleep(0.3)
    st = status(env, "workspace-smollm2")
    assert st["state"] == "Failed"
    inference = next(c for c in st["conditions"] if c["type"] == "InferenceReady")
    assert inference["status"] == "False" and inference["reason"] == "ProcessFailed"
    assert "kaito-serve was killed" in inference["message"]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{st['url']}/health", timeout=2)
    done = cli(env, "local", "delete", "-f", str(path))
    assert "workspace.kaito.sh/workspace-smollm2 deleted" in done.stdout
    assert not list(Path(env["KAITO_HOME"]).glob("local/default/workspace/*"))
    assert "No local resources" in cli(env, "local", "get").stderr


def test_tuning_workspace_runs_to_completion(home, tmp_path):
    _, env = home
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": "What is the secret word?"},
                          {"role": "assistant", "content": "The secret word is Banana."}]}] * 8
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "adapter"
    path = tmp_path / "tuning.yaml"
    config = {"training_config": {"TrainingArguments": {  # upstream configs name the pod's output folder
        "output_dir": "/mnt/results", "max_steps": 2, "per_device_train_batch_size": 2}}}
    path.write_text(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tiny"},
         "data": {"training_config.yaml": yaml.safe_dump(config)}},
        {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "tune-smollm2"},
         "resource": {"instanceType": "Standard_NC4as_T4_v3", "labelSelector": {"matchLabels": {"a": "b"}}},
         "tuning": {"preset": {"name": "smollm2-135m-instruct"}, "method": "lora", "config": "tiny",
                    "input": {"volumeSource": {"hostPath": {"path": str(data)}}},
                    "output": {"volumeSource": {"hostPath": {"path": str(out)}}}}}]))
    done = cli(env, "local", "apply", "-f", str(path), "--cpu", "--wait", "--timeout", "400", timeout=450)
    assert done.returncode == 0, done.stdout + done.stderr + cli(env, "local", "logs", "tune-smollm2").stdout
    st = status(env, "tune-smollm2")
    assert st["state"] == "Succeeded"
    assert {c["type"]: c["status"] for c in st["conditions"]}["WorkspaceSucceeded"] == "True"
    assert (out / "fine_tuning_completed.txt").is_file()
    assert (out / "adapter_config.json").is_file() or list(out.rglob("adapter_config.json"))
    assert "deleted" in cli(env, "local", "delete", "tune-smollm2").stdout


def test_gpu_detection_reads_nvidia_smi(tmp_path, monkeypatch):
    """nvidia-smi cannot run on this machine: a script prints what it printed on an H100 node."""
    from kaito.operator.local import LocalError, LocalRunner, gpu_count
    from kaito.operator.manifests import loads
    from kaito.presets import get_sku

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert gpu_count() == 0  # no nvidia-smi: no driver
    monkeypatch.undo()
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-b9beb37e-a38a-d7b6-a486-ca7fb2bd6cb3)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert gpu_count() == 1
    ws = loads(WORKSPACE.replace("{adapter}", str(tmp_path))).resources[0]
    runner = LocalRunner(tmp_path)
    runner._check_gpus(get_sku("Standard_NC24ads_A100_v4"), 1, False, ws)  # one GPU: no --cpu needed
    with pytest.raises(LocalError, match=r"Standard_NC48ads_A100_v4 has 2 x A100 .* this machine has 1 NVIDIA GPU"):
        runner._check_gpus(get_sku("Standard_NC48ads_A100_v4"), 1, False, ws)
