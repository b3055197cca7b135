"""presets.cpu.available_cpus: the affinity mask capped by the cgroup's CPU quota (v2 `cpu.max`, v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`, the least along the process's cgroup and its parents), on a
cgroup tree of the test's own; and the thread pools sized with it: kaito-serve's transformers backend
(torch), kaito-rag's embeddings (ONNX Runtime and torch) and kaito-tune (torch, OMP_NUM_THREADS)."""

from __future__ import annotations

import os

import pytest
from kaito.presets import cpu

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    """An empty cgroup tree under tmp_path, this process at its root, 8 CPUs in the affinity mask."""
    (tmp_path / "cgroup").write_text("0::/\n")
    monkeypatch.setattr(cpu, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(cpu, "PROC_CGROUP", tmp_path / "cgroup")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    return tmp_path


def write(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize("files, cpus", [
    ({}, 8),  # no cgroup files: the affinity mask
    ({"cpu.max": "max 100000\n"}, 8),
    ({"cpu.max": "250000 100000\n"}, 3),  # 2.5 CPUs: rounded up
    ({"cpu.max": "20000 100000\n"}, 1),
    ({"cpu.max": "1600000 100000\n"}, 8),  # more quota than CPUs in the mask
    ({"cpu.max": "not a quota\n"}, 8),
    ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),  # v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 8),
    ({"cgroup": "0::/kubepods/pod1/ctr\n", "kubepods/pod1/cpu.max": "400000 100000\n",  # the pod's limit
      "kubepods/pod1/ctr/cpu.max": "max 100000\n", "cpu.max": "max 100000\n"}, 4),
    ({"cgroup": "4:cpu,cpuacct:/kubepods/pod1\n0::/\n", "cpu,cpuacct/kubepods/pod1/cpu.cfs_quota_us": "300000\n",
      "cpu,cpuacct/kubepods/pod1/cpu.cfs_period_us": "100000\n"}, 3),
])
def test_available_cpus(cgroup, files, cpus):
    write(cgroup, files)
    assert cpu.available_cpus() == cpus
    assert cpu.available_cpus(cgroup) == cpus


@pytest.fixture
def torch_threads():
    import torch

    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


def test_components_size_their_thread_pools_by_the_quota(cgroup, torch_threads, default_model_dir, tmp_path,
                                                          monkeypatch):
    torch = torch_threads
    write(cgroup, {"cpu.max": "250000 100000\n"})  # 2.5 CPUs of the 8 in the mask: 3 threads

    from kaito.runtime.cli import parser, resolve
    from kaito.runtime.server import TransformersServer

    torch.set_num_threads(1)
    engine = TransformersServer(resolve(parser().parse_args(["--backend", "transformers"])))._default_engine()
    assert torch.get_num_threads() == 3
    del engine

    from kaito.ragservice.embedding import LocalEmbedding

    torch.set_num_threads(1)
    embedder = LocalEmbedding("all-MiniLM-L6-v2", backend="onnx")
    assert torch.get_num_threads() == 3
    assert embedder.onnx.session.get_session_options().intra_op_num_threads == 3

    from kaito.tuning import train
    from kaito.tuning.config import parse_config

    torch.set_num_threads(1)
    monkeypatch.setattr(train, "_device", lambda: "cpu")
    train.load_model(str(default_model_dir), parse_config(None, "lora", tmp_path / "out"), ["q_proj"])
    assert torch.get_num_threads() == 3

    from kaito.tuning.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "")
    monkeypatch.delenv("OMP_NUM_THREADS")  # restored (unset) afterwards
    main(["--method", "lora", "--config", str(tmp_path / "missing.yaml"), "--quiet"])
    assert os.environ["OMP_NUM_THREADS"] == "3"
