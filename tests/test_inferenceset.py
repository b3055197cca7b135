"""InferenceSet: validation and rendering, and the real operator process (`kaito-operator run`) against
the API-server fake (tests/kube_fake.py) while the test plays Karpenter and the workload controllers
(tests/kube_sim.py): replicas become Workspaces, the scale subresource scales them (highest index first
on the way down), nodeCountLimit caps them, the ScaledObject and InferencePool are made, deletion
leaves nothing."""

from __future__ import annotations

import copy
import time

import pytest
import yaml
from addon_schemas import errors as addon_errors
from addon_schemas import inferencepool_crd, keda_crd
from helpers import REPO, free_port
from kaito.operator.api import InferenceSet
from kaito.operator.inferenceset import SetConfig, render_set
from kaito.operator.manifests import parse
from kaito.operator.schemas import object_errors
from kaito.operator.validation import validate
from kube_fake import KubeFake
from kube_sim import NC, WS, Cluster, Operator, wait_for

pytestmark = pytest.mark.timeout(180)
LABEL = "inferenceset.kaito.sh/created-by"


def iset(name: str, replicas: int = 2, **spec) -> dict:
    """phi-4 on one A100 node per replica, autoscaled by KEDA on the waiting requests."""
    return {"apiVersion": WS, "kind": "InferenceSet",
            "metadata": {"name": name, "namespace": "default", "labels": {"team": "a"},
                         "annotations": {"scaledobject.kaito.sh/auto-provision": "true",
                                         "scaledobject.kaito.sh/threshold": "10",
                                         "scaledobject.kaito.sh/max-replicas": "4"}},
            "spec": {"replicas": replicas, "labelSelector": {"matchLabels": {"apps": name}},
                     "template": {"metadata": {"labels": {"tier": "gpu"}},
                                  "resource": {"instanceType": "Standard_NC24ads_A100_v4"},
                                  "inference": {"preset": {"name": "phi-4"}}}, **spec}}


def qwen_set(name: str, replicas: int, limit: int) -> dict:
    """qwen2.5-coder-32b: the estimator gives two nodes a replica."""
    ws = yaml.safe_load((REPO / "tests" / "upstream" / "workspace_qwen_2.5_coder_32b_instruct.yaml").read_text())
    doc = iset(name, replicas, nodeCountLimit=limit)
    doc["spec"]["template"]["resource"] = {"instanceType": ws["resource"]["instanceType"]}
    doc["spec"]["template"]["inference"] = ws["inference"]
    return doc


# --- no cluster -----------------------------------------------------------------------------------------------


def test_validation_messages():
    ok = parse(iset("good"))
    assert [e for e in validate(ok) if not e.warning] == []
    bad = iset("bad")
    del bad["spec"]["template"]["resource"]["instanceType"]
    bad["spec"]["template"]["inference"]["preset"]["name"] = "no-such-model"
    found = [str(e) for e in validate(parse(bad))]
    assert "spec.template.resource.instanceType: missing field(s)" in found
    assert any(f.startswith("spec.template.inference.preset") and "no-such-model" in f for f in found), found
    new = copy.deepcopy(iset("p"))
    new["spec"]["template"]["resource"]["partition"] = {"mode": "mig", "profile": "1g.10gb"}
    assert any(str(e) == "spec.template.resource.partition: field is immutable"
               for e in validate(parse(new), parse(iset("p")), auto_provision=False))
    with pytest.raises(Exception, match="greater than or equal to 0"):
        parse({**iset("neg"), "spec": {**iset("neg")["spec"], "replicas": -1}})


def test_crd_has_scale_subresource_and_upstream_columns():
    from kaito.operator.crds import crd

    c = crd("InferenceSet")
    assert c["spec"]["names"]["shortNames"] == ["is", "isets"]
    assert [v["name"] for v in c["spec"]["versions"]] == ["v1beta1", "v1alpha1"]
    v = c["spec"]["versions"][0]
    assert v["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                                          "labelSelectorPath": ".status.selector"}
    assert [col["name"] for col in v["additionalPrinterColumns"]] == ["Replicas", "ReadyReplicas", "Age"]
    spec = v["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["replicas"] == {**spec["properties"]["replicas"], "default": 1, "minimum": 0}
    assert spec["properties"]["updateStrategy"]["x-kubernetes-preserve-unknown-fields"] is True
    assert set(spec["required"]) == {"template", "labelSelector"}
    assert object_errors(c) == []


def test_render_passes_the_addon_schemas():
    """Workspaces (Kubernetes-valid after their own render), a ScaledObject and the gateway objects, each
    against its schema: KEDA's and the Inference Extension's for theirs, Kubernetes 1.37's for the rest."""
    res = parse(qwen_set("q", replicas=3, limit=5))
    assert isinstance(res, InferenceSet)
    objects = render_set(res, cfg=SetConfig(scaler_address="kaito-operator.kaito-system.svc:10450", gateway=True))
    kinds = [o["kind"] for o in objects]
    assert kinds.count("Workspace") == 2  # 3 replicas x 2 nodes > 5 nodes: two fit
    scaled = next(o for o in objects if o["kind"] == "ScaledObject")
    assert scaled["spec"]["maxReplicaCount"] == 2 and scaled["spec"]["minReplicaCount"] == 1
    assert scaled["spec"]["triggers"][0]["metadata"]["scalerAddress"] == "kaito-operator.kaito-system.svc:10450"
    for obj in objects:
        if obj["kind"] in ("ScaledObject", "InferencePool"):
            assert addon_errors(obj) == [], obj["kind"]
        elif obj["kind"] != "Workspace":
            assert object_errors(obj) == [], (obj["kind"], object_errors(obj))
    assert addon_errors({**scaled, "spec": {**scaled["spec"], "triggerz": []}})  # the schema does catch mistakes
    pool = next(o for o in objects if o["kind"] == "InferencePool")
    assert pool["spec"]["selector"]["matchLabels"] == {LABEL: "q"}
    # a replica's pods carry the set's label (the pool and the scaler select them by it)
    from kaito.operator.render import render

    sts = next(o for o in render(parse(objects[0])) if o["kind"] == "StatefulSet")
    assert sts["spec"]["template"]["metadata"]["labels"][LABEL] == "q"


# --- the operator against the fake ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    fake = KubeFake().start()
    cluster = Cluster(fake.url)
    cluster.create(keda_crd())
    cluster.create(inferencepool_crd())
    cluster.install_crds()
    d = tmp_path_factory.mktemp("iset")
    op = Operator(fake.kubeconfig(d / "kubeconfig"), "--resync", "1", "--scaler-port", str(free_port()),
                  "--gateway-api-inference-extension", log_path=d / "operator.log").start()
    yield cluster, op
    op.kill()
    fake.stop()


def workspaces(cluster: Cluster, name: str) -> dict[str, dict]:
    return {w["metadata"]["name"]: w for w in cluster.list(WS, "Workspace", f"{LABEL}={name}")}


def make_ready(cluster: Cluster, ws_names) -> None:
    """Karpenter brings each replica's node, the StatefulSet controller its pod."""
    for n in ws_names:
        wait_for(lambda n=n: cluster.get("apps/v1", "StatefulSet", n), 30, f"StatefulSet {n}")
        cluster.karpenter(f"kaito.sh/workspace={n}")
        cluster.statefulset_ready(n)


def set_status(cluster: Cluster, name: str) -> dict:
    return (cluster.get(WS, "InferenceSet", name) or {}).get("status") or {}


def test_replicas_scale_and_delete(env):
    cluster, op = env
    cluster.create(iset("chat", replicas=2))
    found = wait_for(lambda: len(w := workspaces(cluster, "chat")) == 2 and w, 30, "two Workspaces")
    assert set(found) == {"chat-0", "chat-1"}
    owner = cluster.get(WS, "InferenceSet", "chat")
    for ws in found.values():
        assert ws["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
        assert ws["metadata"]["labels"] == {"tier": "gpu", LABEL: "chat"}
        assert ws["resource"]["labelSelector"] == {"matchLabels": {"apps": "chat"}}
    make_ready(cluster, found)
    wait_for(lambda: set_status(cluster, "chat").get("readyReplicas") == 2, 30, "two ready replicas")
    status = set_status(cluster, "chat")
    assert status["replicas"] == 2 and status["selector"] == f"{LABEL}=chat"
    ready = cluster.condition({"status": status}, "InferenceSetReady")
    assert ready["status"] == "True" and ready["reason"] == "inferencesetReady"
    scaled = cluster.get("keda.sh/v1alpha1", "ScaledObject", "chat")
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": WS, "kind": "InferenceSet", "name": "chat"}
    assert scaled["spec"]["maxReplicaCount"] == 4 and addon_errors(scaled) == []
    # the operator's own scaler answers at the address the trigger names
    import grpc
    from kaito.operator import externalscaler_pb2 as pb
    from kaito.operator import externalscaler_pb2_grpc as pb_grpc

    trigger = scaled["spec"]["triggers"][0]["metadata"]
    with grpc.insecure_channel(trigger["scalerAddress"]) as channel:
        ref = pb.ScaledObjectRef(name="chat", namespace="default", scalerMetadata=trigger)
        spec = pb_grpc.ExternalScalerStub(channel).GetMetricSpec(ref, timeout=10).metricSpecs[0]
    assert (spec.metricName, spec.targetSize) == ("vllm:num_requests_waiting", 10)
    assert cluster.condition({"status": status}, "ScaledObjectReady")["status"] == "True"
    pool = wait_for(lambda: cluster.get("inference.networking.k8s.io/v1", "InferencePool", "chat"), 20, "pool")
    assert addon_errors(pool) == [] and cluster.get("apps/v1", "Deployment", "chat-epp")

    # kubectl scale --replicas 3: through the scale subresource
    scale = cluster.r(WS, "InferenceSet").scale
    scale.patch(body={"spec": {"replicas": 3}}, name="chat", namespace="default",
                content_type="application/merge-patch+json")
    wait_for(lambda: "chat-2" in workspaces(cluster, "chat"), 30, "chat-2")
    make_ready(cluster, ["chat-2"])
    wait_for(lambda: set_status(cluster, "chat").get("readyReplicas") == 3, 30, "three ready")
    assert scale.get(name="chat", namespace="default").to_dict()["status"]["replicas"] == 3

    # down to 1: chat-2 goes first, and chat-1 only once chat-2 is gone
    cluster.r(WS, "Workspace").patch(body={"metadata": {"finalizers": ["test/hold"]}}, name="chat-2",
                                     namespace="default", content_type="application/merge-patch+json")
    scale.patch(body={"spec": {"replicas": 1}}, name="chat", namespace="default",
                content_type="application/merge-patch+json")
    wait_for(lambda: workspaces(cluster, "chat")["chat-2"]["metadata"].get("deletionTimestamp"), 30, "chat-2 deleting")
    time.sleep(2)
    assert not workspaces(cluster, "chat")["chat-1"]["metadata"].get("deletionTimestamp")
    cluster.r(WS, "Workspace").patch(body={"metadata": {"finalizers": None}}, name="chat-2", namespace="default",
                                     content_type="application/merge-patch+json")
    wait_for(lambda: set(workspaces(cluster, "chat")) == {"chat-0"}, 40, "only chat-0 left")
    wait_for(lambda: set_status(cluster, "chat").get("replicas") == 1, 20, "status.replicas 1")
    assert not cluster.list(NC, "NodeClaim", "kaito.sh/workspace in (chat-1,chat-2)")

    # deletion: InferenceSetDeleting while a replica holds it, then nothing is left
    cluster.r(WS, "Workspace").patch(body={"metadata": {"finalizers": ["test/hold"]}}, name="chat-0",
                                     namespace="default", content_type="application/merge-patch+json")
    cluster.delete(WS, "InferenceSet", "chat")
    wait_for(lambda: cluster.condition(cluster.get(WS, "InferenceSet", "chat"), "InferenceSetDeleting").get("status")
             == "True", 20, "InferenceSetDeleting")
    cluster.r(WS, "Workspace").patch(body={"metadata": {"finalizers": None}}, name="chat-0", namespace="default",
                                     content_type="application/merge-patch+json")
    wait_for(lambda: cluster.get(WS, "InferenceSet", "chat") is None, 40, "InferenceSet gone")
    assert not workspaces(cluster, "chat")
    for api, kind in (("apps/v1", "StatefulSet"), ("v1", "Service"), ("apps/v1", "Deployment"),
                      ("keda.sh/v1alpha1", "ScaledObject"), ("inference.networking.k8s.io/v1", "InferencePool")):
        left = [o["metadata"]["name"] for o in cluster.list(api, kind) if o["metadata"]["name"].startswith("chat")]
        assert not left, (kind, left)
    assert not [c for c in cluster.list(NC, "NodeClaim") if c["metadata"]["labels"].get(
        "kaito.sh/workspace", "").startswith("chat")]


def test_node_count_limit(env):
    """Two nodes a replica and nodeCountLimit 3: one replica runs, and the condition says why; raising
    the limit lets the second come."""
    cluster, _ = env
    cluster.create(qwen_set("big", replicas=2, limit=3))
    wait_for(lambda: set(workspaces(cluster, "big")) == {"big-0"}, 30, "one Workspace")
    cond = wait_for(lambda: (c := cluster.condition(cluster.get(WS, "InferenceSet", "big"), "InferenceSetReady"))
                    .get("reason") == "NodeCountLimitExceeded" and c, 20, "NodeCountLimitExceeded")
    assert cond["status"] == "False"
    assert cond["message"] == "2 replicas need 4 GPU nodes (2 each), more than nodeCountLimit 3: running 1"
    time.sleep(1.5)
    assert set(workspaces(cluster, "big")) == {"big-0"}
    assert cluster.get("keda.sh/v1alpha1", "ScaledObject", "big")["spec"]["maxReplicaCount"] == 1
    cluster.r(WS, "InferenceSet").patch(body={"spec": {"nodeCountLimit": 4}}, name="big", namespace="default",
                                        content_type="application/merge-patch+json")
    wait_for(lambda: set(workspaces(cluster, "big")) == {"big-0", "big-1"}, 30, "two Workspaces")
    cluster.delete(WS, "InferenceSet", "big")
    wait_for(lambda: cluster.get(WS, "InferenceSet", "big") is None and not workspaces(cluster, "big"), 40, "gone")


def test_invalid_set_and_autoscaling_are_reported(env):
    cluster, _ = env
    doc = iset("oops", replicas=1)
    doc["spec"]["template"]["inference"]["preset"]["name"] = "no-such-model"
    doc["metadata"]["annotations"]["scaledobject.kaito.sh/threshold"] = "many"
    cluster.create(doc)
    cond = wait_for(lambda: cluster.condition(cluster.get(WS, "InferenceSet", "oops"), "InferenceSetReady"), 20, "cond")
    assert cond["reason"] == "InvalidInferenceSet" and "no-such-model" in cond["message"]
    assert not workspaces(cluster, "oops")
    good = iset("auto", replicas=1)
    good["metadata"]["annotations"]["scaledobject.kaito.sh/threshold"] = "many"
    cluster.create(good)
    cond = wait_for(lambda: cluster.condition(cluster.get(WS, "InferenceSet", "auto"), "ScaledObjectReady"), 20, "so")
    assert cond["status"] == "False" and cond["reason"] == "InvalidAutoscaling" and "threshold" in cond["message"]
    assert cluster.get("keda.sh/v1alpha1", "ScaledObject", "auto") is None
    for name in ("oops", "auto"):
        cluster.delete(WS, "InferenceSet", name)
