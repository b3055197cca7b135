"""operator/status.py and operator/cluster.py without a cluster: conditions as upstream writes them, and
the reading of nodes and pods (upstream's failure reasons, NVIDIA feature-discovery labels)."""

from __future__ import annotations

import pytest
from kaito.operator import status as st
from kaito.operator.cluster import classify_pod, nfd_mismatch, node_gpus, sku_from_labels, usable


def test_transition_time_is_kept_while_the_status_stays():
    old = st.conditions(None, [st.Cond(st.NODES_READY, False, "NodesPending", "waiting")], generation=1)
    old[0]["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    same = st.conditions(old, [st.Cond(st.NODES_READY, False, "NodesPending", "still waiting")], generation=2)
    assert same[0]["lastTransitionTime"] == "2020-01-01T00:00:00Z" and same[0]["observedGeneration"] == 2
    flipped = st.conditions(old, [st.Cond(st.NODES_READY, True, "NodesReady", "ready")])
    assert flipped[0]["lastTransitionTime"] != "2020-01-01T00:00:00Z" and flipped[0]["status"] == "True"
    assert st.conditions(None, [st.Cond("X", None, "Unknown")])[0]["status"] == "Unknown"


def test_messages_are_cut_to_upstreams_limit():
    cond = st.conditions(None, [st.Cond(st.INFERENCE_READY, False, "PodsNotReady", "x" * 1000)])[0]
    assert len(cond["message"]) == st.MESSAGE_LIMIT == 256


def test_changed_ignores_transition_times_and_transitions_name_what_moved():
    a = {"state": "Pending", "conditions": st.conditions(None, [st.Cond("A", False, "Wait", "m")])}
    b = {"state": "Pending", "conditions": [{**a["conditions"][0], "lastTransitionTime": "1999-01-01T00:00:00Z"}]}
    assert not st.changed(a, b)
    assert st.changed(a, {"state": "Ready"})
    c = st.conditions(a["conditions"], [st.Cond("A", True, "Done", "m"), st.Cond("B", False, "New", "n")])
    assert [x["type"] for x in st.transitions(a["conditions"], c)] == ["A", "B"]


class RecordingKube:
    """Records what status.write asks the API for (the HTTP path is covered by the controller tests)."""

    def __init__(self) -> None:
        self.patched: list[tuple] = []
        self.created: list[dict] = []

    def patch_status(self, *args) -> None:
        self.patched.append(args)

    def create(self, obj: dict) -> dict:
        self.created.append(obj)
        return obj


def test_write_patches_only_changes_and_posts_an_event_per_transition():
    kube = RecordingKube()
    old = {"conditions": st.conditions(None, [st.Cond(st.INFERENCE_READY, False, "PodsNotReady", "0/1")])}
    new = {"conditions": st.conditions(old["conditions"], [st.Cond(st.INFERENCE_READY, False, st.OOM_KILLED,
                                                                      "pod ws-0 was OOMKilled")])}
    assert st.write(kube, "kaito.sh/v1beta1", "Workspace", "ws", "ns", old, new, uid="u1", resource_version="7")
    assert kube.patched[0][-1] == "7"  # the status is only written over the version it was computed from
    event = kube.created[0]
    assert (event["reason"], event["type"], event["involvedObject"]["uid"]) == (st.OOM_KILLED, "Warning", "u1")
    assert not st.write(kube, "kaito.sh/v1beta1", "Workspace", "ws", "ns", new, new)
    assert len(kube.patched) == 1 and len(kube.created) == 1


def pod(status: dict, name: str = "ws-0") -> dict:
    return {"metadata": {"name": name}, "status": status}


def container(state: dict, last: dict | None = None) -> dict:
    return {"containerStatuses": [{"name": "kaito-serve", "image": "img:1", "state": state,
                                   **({"lastState": last} if last else {})}]}


@pytest.mark.parametrize("status, node, reason", [
    (container({"waiting": {"reason": "ErrImagePull", "message": "not found"}}), None, st.IMAGE_PULL_ERROR),
    (container({"waiting": {"reason": "InvalidImageName"}}), None, st.IMAGE_PULL_ERROR),
    (container({"waiting": {"reason": "CrashLoopBackOff"}}, {"terminated": {"reason": "Error", "exitCode": 1}}),
     None, st.CRASH_LOOP),
    (container({"waiting": {"reason": "CrashLoopBackOff"}}, {"terminated": {"reason": "OOMKilled"}}), None,
     st.OOM_KILLED),
    (container({"terminated": {"reason": "OOMKilled", "exitCode": 137}}), None, st.OOM_KILLED),
    (container({"waiting": {"reason": "CreateContainerConfigError", "message": "secret hf not found"}}), None,
     st.START_ERROR),
    (container({"terminated": {"reason": "Error", "exitCode": 2}}), None, st.CONTAINER_FAILED),
    ({"reason": "Evicted", "message": "The node was low on resource: memory."}, None, st.EVICTED),
    ({"reason": "Evicted", "message": "low on resource: ephemeral-storage."}, None, st.DISK_PRESSURE),
    ({"reason": "Evicted", "message": "evicted"}, {"status": {"conditions": [{"type": "MemoryPressure",
                                                                              "status": "True"}]}},
     st.MEMORY_PRESSURE),
    ({"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": "0/3 nodes: Insufficient nvidia.com/gpu"}]}, None, st.UNSCHEDULABLE),
])
def test_pod_failures_get_upstreams_reasons(status, node, reason):
    found = classify_pod(pod(status), node)
    assert found is not None and found[0] == reason and "ws-0" in found[1]
    assert reason in st.POD_FAILURES


def test_a_healthy_or_starting_pod_has_no_problem():
    assert classify_pod(pod(container({"running": {}}))) is None
    assert classify_pod(pod(container({"waiting": {"reason": "ContainerCreating"}}))) is None


def node(capacity: dict, ready: bool = True, labels: dict | None = None) -> dict:
    return {"metadata": {"name": "n1", "labels": labels or {}},
            "status": {"capacity": capacity, "conditions": [{"type": "Ready", "status": str(ready)}]}}


def test_gpu_capacity_and_mig_slices():
    gpu, mig = node({"nvidia.com/gpu": "2"}), node({"nvidia.com/mig-1g.10gb": "7"})
    assert node_gpus(gpu) == 2 and node_gpus(mig) == 0 and node_gpus(mig, "nvidia.com/mig-1g.10gb") == 7
    assert usable([gpu, mig]) == [gpu] and usable([gpu, mig], "nvidia.com/mig-1g.10gb") == [mig]
    assert usable([node({"nvidia.com/gpu": "1"}, ready=False)]) == []


def test_feature_discovery_labels_size_own_nodes():
    labels = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu.count": "8",
              "nvidia.com/gpu.memory": "81920"}
    assert sku_from_labels(labels) is not None
    small = node({"nvidia.com/gpu": "1"}, labels={"nvidia.com/gpu.product": "Tesla-T4", "nvidia.com/gpu.count": "1",
                                                  "nvidia.com/gpu.memory": "15360"})
    assert "less than Standard_NC24ads_A100_v4" in nfd_mismatch([small], "Standard_NC24ads_A100_v4")
