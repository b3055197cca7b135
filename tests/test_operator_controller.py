"""`kaito-operator run` against the HTTP fake of the Kubernetes API (tests/kube_fake.py): the real
operator process (kopf + the `kubernetes` client) reconciles Workspaces and RAGEngines while the test
plays Karpenter, the kubelet and the workload controllers (tests/kube_sim.py)."""

from __future__ import annotations

import ssl
import subprocess
import time

import httpx
import pytest
import yaml
from helpers import REPO, free_port
from kaito.operator.webhook import admission_review
from kube_fake import KubeFake
from kube_sim import EXAMPLES, NC, WS, Cluster, Operator, example, inference, state, wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "tls.crt", d / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def env(tmp_path_factory, tls):
    """The fake API server with the CRDs, and one operator (metrics and webhook on)."""
    fake = KubeFake().start()
    cluster = Cluster(fake.url)
    cluster.install_crds()
    d = tmp_path_factory.mktemp("operator")
    kubeconfig = fake.kubeconfig(d / "kubeconfig")
    ports = {"metrics": free_port(), "webhook": free_port()}
    op = Operator(kubeconfig, "--resync", "1", "--metrics-port", str(ports["metrics"]), "--webhook-port",
                  str(ports["webhook"]), "--tls-cert", str(tls[0]), "--tls-key", str(tls[1]),
                  log_path=d / "operator.log").start()
    yield cluster, op, ports, fake
    op.kill()
    fake.stop()


def test_inference_workspace_to_ready(env):
    cluster, _, ports, fake = env
    cluster.create(inference("ws-ready"))
    claims = wait_for(lambda: cluster.list(NC, "NodeClaim", "kaito.sh/workspace=ws-ready"), 30, "NodeClaims")
    assert len(claims) == 1 and claims[0]["metadata"]["labels"]["apps"] == "ws-ready"
    ws = wait_for(lambda: (w := cluster.workspace("ws-ready")).get("status", {}).get("conditions") and w, 20, "status")
    assert ws["status"]["state"] == "Pending" and ws["status"]["targetNodeCount"] == 1
    assert cluster.condition(ws, "ResourceReady")["status"] == "False"
    assert cluster.condition(ws, "InferenceReady")["reason"] == "WaitingForNodes"
    assert kaito_finalizer(ws)
    assert not events_of(cluster, "ws-ready")  # five conditions waiting: no news yet
    sts = wait_for(lambda: cluster.get("apps/v1", "StatefulSet", "ws-ready"), 20, "StatefulSet")
    uid = ws["metadata"]["uid"]
    for kind, name in (("StatefulSet", "ws-ready"), ("Service", "ws-ready"), ("Service", "ws-ready-headless")):
        obj = cluster.get("apps/v1" if kind == "StatefulSet" else "v1", kind, name)
        assert obj["metadata"]["ownerReferences"][0]["uid"] == uid, kind
    assert sts["spec"]["template"]["spec"]["containers"][0]["command"][0] == "kaito-serve"

    cluster.karpenter("kaito.sh/workspace=ws-ready")  # nodes come, with GPUs
    wait_for(lambda: cluster.condition(cluster.workspace("ws-ready"), "ResourceReady").get("status") == "True", 20,
             "ResourceReady")
    assert state(cluster, "ws-ready") == "Pending"
    cluster.statefulset_ready("ws-ready")  # the pods report ready
    wait_for(lambda: state(cluster, "ws-ready") == "Ready", 20, "Ready", )
    ws = cluster.workspace("ws-ready")
    for t in ("NodeClaimReady", "ResourceReady", "InferenceReady", "WorkspaceSucceeded"):
        assert cluster.condition(ws, t)["status"] == "True", t
    assert ws["status"]["workerNodes"] == [f"aks-{claims[0]['metadata']['name']}-0"]
    assert {"NodeClaimsReady", "WorkspaceSucceeded"} <= {e["reason"] for e in events_of(cluster, "ws-ready")}
    sts = cluster.get("apps/v1", "StatefulSet", "ws-ready")
    assert sts["metadata"]["annotations"]["kaito.sh/rendered-hash"]
    assert [(m["manager"], m["operation"]) for m in sts["metadata"]["managedFields"]
            if not m.get("subresource")] == [("kaito", "Apply")]

    # steady state: resyncs (every second here) read the caches and write nothing: no request at all
    reconciled, requests, rv = reconciles(ports["metrics"]), fake.requests, fake.rv
    time.sleep(2.5)
    assert fake.requests == requests and fake.rv == rv
    assert reconciles(ports["metrics"]) >= reconciled + 2  # they did run
    # drift is put back
    cluster.r("apps/v1", "StatefulSet").patch(body={"spec": {"replicas": 7}}, name="ws-ready", namespace="default",
                                              content_type="application/merge-patch+json")
    wait_for(lambda: cluster.get("apps/v1", "StatefulSet", "ws-ready")["spec"]["replicas"] == 1, 20, "drift undone")
    cluster.delete("v1", "Service", "ws-ready-headless")
    wait_for(lambda: cluster.get("v1", "Service", "ws-ready-headless"), 20, "deleted Service re-created")


def events_of(cluster: Cluster, name: str) -> list[dict]:
    return [e for e in cluster.list("v1", "Event", None) if e["involvedObject"]["name"] == name]


def reconciles(port: int) -> float:
    text = _get(f"http://127.0.0.1:{port}/metrics") or ""
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("kaito_operator_reconciles_total{"))


def unfit(doc: dict) -> dict:
    """phi-4 on one T4 with the transformers runtime: it needs three T4 nodes, which only vLLM spreads over."""
    doc["resource"]["instanceType"] = "Standard_NC4as_T4_v3"
    doc["metadata"]["annotations"] = {"kaito.sh/runtime": "transformers"}
    return doc


def kaito_finalizer(obj: dict) -> bool:
    return "kaito.sh/finalizer" in (obj["metadata"].get("finalizers") or [])


@pytest.mark.parametrize("status, reason, words", [
    ({"containerStatuses": [{"name": "kaito-serve", "image": "ghcr.io/x:1", "ready": False, "restartCount": 3,
                             "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                             "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]},
     "ContainerOOMKilled", "out of memory"),
    ({"containerStatuses": [{"name": "kaito-serve", "image": "ghcr.io/x:1", "ready": False, "restartCount": 0,
                             "state": {"waiting": {"reason": "ImagePullBackOff", "message": "pull access denied"}}}]},
     "ImagePullError", "pull access denied"),
    ({"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]},
     "Unschedulable", "Insufficient nvidia.com/gpu"),
    ({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."},
     "PodEvicted", "low on resource"),
    ({"containerStatuses": [{"name": "kaito-serve", "image": "ghcr.io/x:1", "ready": False, "restartCount": 5,
                             "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                             "lastState": {"terminated": {"reason": "Error", "exitCode": 1}}}]},
     "ContainerCrashLoopBackOff", "exit code 1"),
])
def test_pod_failures_are_named(env, status, reason, words):
    cluster, *_ = env
    name = f"ws-{reason.lower()}"
    cluster.create(inference(name))
    wait_for(lambda: cluster.karpenter(f"kaito.sh/workspace={name}"), 30, "NodeClaims")
    wait_for(lambda: cluster.get("apps/v1", "StatefulSet", name), 20, "StatefulSet")
    cluster.pod(f"{name}-0", {"kaito.sh/workspace": name, "app.kubernetes.io/managed-by": "kaito"}, status)
    wait_for(lambda: state(cluster, name) == "NotReady", 20, "NotReady")
    cond = cluster.condition(cluster.workspace(name), "InferenceReady")
    assert cond["status"] == "False" and cond["reason"] == reason and words in cond["message"]
    assert f"{name}-0" in cond["message"]


def test_a_cloud_error_is_named(env):
    cluster, *_ = env
    cluster.create(inference("ws-quota"))
    claim = wait_for(lambda: cluster.list(NC, "NodeClaim", "kaito.sh/workspace=ws-quota"), 30, "NodeClaim")[0]
    message = ("Operation could not be completed as it results in exceeding approved standardNCADSA100v4Family "
               "Cores quota")
    cluster.patch_status(NC, "NodeClaim", claim["metadata"]["name"], {"conditions": [
        {"type": "Launched", "status": "False", "reason": "QuotaExceeded", "message": message}]}, ns=None)
    wait_for(lambda: state(cluster, "ws-quota") == "NotReady", 20, "NotReady")
    cond = cluster.condition(cluster.workspace("ws-quota"), "NodeClaimReady")
    assert cond["status"] == "False" and cond["reason"] == "NodeClaimFailed"
    assert "QuotaExceeded" in cond["message"] and "Cores quota" in cond["message"]


def tuning(name: str) -> dict:
    doc = example("kaito_workspace_tuning_phi_3.yaml", name)
    doc["resource"]["labelSelector"]["matchLabels"] = {"app": name}
    return doc


def test_tuning_to_succeeded(env):
    cluster, *_ = env
    cluster.create(tuning("tune-ok"))
    wait_for(lambda: cluster.karpenter("kaito.sh/workspace=tune-ok"), 30, "NodeClaim")
    job = wait_for(lambda: cluster.get("batch/v1", "Job", "tune-ok"), 20, "Job")
    assert job["spec"]["backoffLimit"] == 0
    wait_for(lambda: cluster.condition(cluster.workspace("tune-ok"), "JobStarted").get("status") == "True", 20,
             "JobStarted")
    cluster.patch_status("batch/v1", "Job", "tune-ok", {"active": 1})
    wait_for(lambda: state(cluster, "tune-ok") == "Running", 20, "Running")
    cluster.patch_status("batch/v1", "Job", "tune-ok", {"active": None, "succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True"}]})
    wait_for(lambda: state(cluster, "tune-ok") == "Succeeded", 20, "Succeeded")
    assert cluster.condition(cluster.workspace("tune-ok"), "WorkspaceSucceeded")["status"] == "True"


def test_tuning_to_failed(env):
    cluster, *_ = env
    cluster.create(tuning("tune-bad"))
    wait_for(lambda: cluster.karpenter("kaito.sh/workspace=tune-bad"), 30, "NodeClaim")
    wait_for(lambda: cluster.get("batch/v1", "Job", "tune-bad"), 20, "Job")
    cluster.pod("tune-bad-x1", {"kaito.sh/workspace": "tune-bad", "app.kubernetes.io/managed-by": "kaito"},
                {"phase": "Failed", "containerStatuses": [{"name": "kaito-tune", "image": "x", "ready": False,
                                                           "restartCount": 0, "state": {"terminated": {
                                                               "reason": "OOMKilled", "exitCode": 137}}}]})
    cluster.patch_status("batch/v1", "Job", "tune-bad", {"failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]})
    wait_for(lambda: state(cluster, "tune-bad") == "Failed", 20, "Failed")
    cond = cluster.condition(cluster.workspace("tune-bad"), "WorkspaceSucceeded")
    assert cond["status"] == "False" and cond["reason"] == "ContainerOOMKilled" and "tune-bad-x1" in cond["message"]


def test_ragengine_to_ready(env):
    cluster, *_ = env
    cluster.create(example("kaito_ragengine_phi_3.yaml", "rag1"))
    wait_for(lambda: cluster.karpenter("kaito.sh/ragengine=rag1"), 30, "NodeClaim")
    dep = wait_for(lambda: cluster.get("apps/v1", "Deployment", "rag1"), 20, "Deployment")
    env_names = {e["name"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"LLM_INFERENCE_URL", "EMBEDDING_SOURCE_TYPE"} <= env_names
    cluster.patch_status("apps/v1", "Deployment", "rag1", {"replicas": 1, "readyReplicas": 1})

    def ready():
        rag = cluster.get(WS, "RAGEngine", "rag1")
        return cluster.condition(rag, "RAGEngineSucceeded").get("status") == "True" and rag

    rag = wait_for(ready, 20, "RAGEngine ready")
    assert cluster.condition(rag, "ServiceReady")["status"] == "True"


def test_multi_node_workspace_with_its_config(env):
    """Two nodes (llama-3.3-70b on 2 x Standard_NC48ads_A100_v4), its inference_config.yaml read from the
    cluster; a change of the user's ConfigMap reaches the rendered one at the next resync."""
    cluster, *_ = env
    docs = list(yaml.safe_load_all((EXAMPLES / "kaito_workspace_llama-3.3_70b_instruct.yaml").read_text()))
    cluster.create(docs[1])  # the ConfigMap (the Secret is only referenced by name)
    cluster.create(docs[2])
    name = docs[2]["metadata"]["name"]
    claims = wait_for(lambda: (c := cluster.list(NC, "NodeClaim", f"kaito.sh/workspace={name}")) and len(c) == 2
                      and c, 30, "two NodeClaims")
    assert len({c["metadata"]["name"] for c in claims}) == 2
    wait_for(lambda: (cluster.workspace(name).get("status") or {}).get("targetNodeCount") == 2, 20, "targetNodeCount")
    sts = wait_for(lambda: cluster.get("apps/v1", "StatefulSet", name), 20, "StatefulSet")
    assert sts["spec"]["replicas"] == 2
    rendered = cluster.get("v1", "ConfigMap", f"{name}-inference-config")
    assert "max-model-len: 16384" in rendered["data"]["inference_config.yaml"]
    cluster.r("v1", "ConfigMap").patch(body={"data": {"inference_config.yaml": "vllm:\n  max-model-len: 8192\n"}},
                                       name="llama-inference-params", namespace="default",
                                       content_type="application/merge-patch+json")
    wait_for(lambda: "max-model-len: 8192" in cluster.get("v1", "ConfigMap", f"{name}-inference-config")["data"][
        "inference_config.yaml"], 20, "config re-rendered")
    cluster.karpenter(f"kaito.sh/workspace={name}")
    cluster.statefulset_ready(name)
    wait_for(lambda: state(cluster, name) == "Ready", 20, "Ready")
    assert len(cluster.workspace(name)["status"]["workerNodes"]) == 2


def test_node_count_from_the_estimator_recorded_once(env):
    """An upstream v0.12 manifest without resource.count: the estimator's two nodes, recorded in
    status.targetNodeCount, which later reconciles keep."""
    cluster, *_ = env
    doc = yaml.safe_load((REPO / "tests" / "upstream" / "workspace_qwen_2.5_coder_32b_instruct.yaml").read_text())
    cluster.create(doc)
    name = doc["metadata"]["name"]
    wait_for(lambda: len(cluster.list(NC, "NodeClaim", f"kaito.sh/workspace={name}")) == 2, 30, "two NodeClaims")
    wait_for(lambda: (cluster.workspace(name).get("status") or {}).get("targetNodeCount") == 2, 20, "targetNodeCount")
    assert cluster.get("apps/v1", "StatefulSet", name)["spec"]["replicas"] == 2


def test_template_workspace_to_ready(env):
    cluster, *_ = env
    cluster.create(example("kaito_workspace_phi_3_template.yaml", "ws-template"))
    wait_for(lambda: cluster.karpenter("kaito.sh/workspace=ws-template"), 30, "NodeClaim")
    dep = wait_for(lambda: cluster.get("apps/v1", "Deployment", "ws-template"), 20, "Deployment")
    cluster.patch_status("apps/v1", "Deployment", "ws-template", {"replicas": dep["spec"]["replicas"],
                                                                 "readyReplicas": dep["spec"]["replicas"]})
    wait_for(lambda: state(cluster, "ws-template") == "Ready", 20, "Ready")


def test_adapters_removed_leave_no_init_container(env):
    """Server-side apply: what kaito no longer renders goes from the live object (a merge patch left the
    adapter's init container and volume behind)."""
    cluster, *_ = env
    cluster.create(example("kaito_workspace_falcon_7b_with_adapters.yaml", "ws-adapters"))
    sts = wait_for(lambda: cluster.get("apps/v1", "StatefulSet", "ws-adapters"), 30, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["weights", "adapter-falcon-7b-adapter"]
    assert {"adapters", "pull-secret-acr-pull"} <= {v["name"] for v in pod["volumes"]}
    cluster.r(WS, "Workspace").patch(body={"inference": {"adapters": None}}, name="ws-adapters", namespace="default",
                                     content_type="application/merge-patch+json")
    def pod_spec() -> dict:
        return cluster.get("apps/v1", "StatefulSet", "ws-adapters")["spec"]["template"]["spec"]

    wait_for(lambda: [c["name"] for c in pod_spec().get("initContainers", [])] == ["weights"], 20,
             "the adapter's init container removed")
    pod = pod_spec()
    assert not {"adapters", "adapter-falcon-7b-support", "pull-secret-acr-pull"} & {v["name"] for v in pod["volumes"]}


def test_invalid_workspace_is_reported(env):
    cluster, *_ = env
    doc = unfit(inference("ws-invalid"))
    cluster.create(doc)
    wait_for(lambda: state(cluster, "ws-invalid") == "NotReady", 20, "NotReady")
    cond = cluster.condition(cluster.workspace("ws-invalid"), "ResourceReady")
    assert cond["reason"] == "InvalidWorkspace" and "Multi-node distributed inference" in cond["message"]
    warned = [e["type"] for e in events_of(cluster, "ws-invalid") if e["reason"] == "InvalidWorkspace"]
    assert warned and set(warned) == {"Warning"}
    assert not cluster.list(NC, "NodeClaim", "kaito.sh/workspace=ws-invalid")


def test_deletion_cleans_up(env):
    cluster, *_ = env
    cluster.create(inference("ws-gone"))
    wait_for(lambda: cluster.karpenter("kaito.sh/workspace=ws-gone"), 30, "NodeClaims")
    wait_for(lambda: cluster.get("apps/v1", "StatefulSet", "ws-gone"), 20, "StatefulSet")
    # a cloud provisioner's finalizer on the claim: the Workspace must wait for it
    claim = cluster.list(NC, "NodeClaim", "kaito.sh/workspace=ws-gone")[0]["metadata"]["name"]
    cluster.r(NC, "NodeClaim").patch(body={"metadata": {"finalizers": ["test/cloud"]}}, name=claim,
                                     content_type="application/merge-patch+json")
    cluster.delete(WS, "Workspace", "ws-gone")
    wait_for(lambda: (cluster.get(NC, "NodeClaim", claim, None) or {}).get("metadata", {}).get("deletionTimestamp"),
             20, "NodeClaim deleted")
    time.sleep(1.5)
    assert cluster.workspace("ws-gone") is not None  # held by its finalizer while the claim goes
    assert cluster.condition(cluster.workspace("ws-gone"), "WorkspaceDeleting")["status"] == "True"
    cluster.r(NC, "NodeClaim").patch(body={"metadata": {"finalizers": None}}, name=claim,
                                     content_type="application/merge-patch+json")
    wait_for(lambda: cluster.workspace("ws-gone") is None, 20, "Workspace gone")
    for kind, api in (("StatefulSet", "apps/v1"), ("Service", "v1")):
        assert not cluster.list(api, kind, "kaito.sh/workspace=ws-gone"), kind


def test_metrics_and_webhook(env, tls):
    cluster, _, ports, _ = env
    text = wait_for(lambda: _get(f"http://127.0.0.1:{ports['metrics']}/metrics"), 20, "metrics")
    assert 'kaito_operator_reconciles_total{kind="Workspace"}' in text
    assert 'kaito_operator_resources{kind="Workspace",state="Ready"}' in text
    assert "kaito_operator_reconcile_duration_seconds_bucket" in text
    bad = unfit(inference("ws-hook"))
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": "u1", "operation": "CREATE", "object": bad}}
    url = f"https://127.0.0.1:{ports['webhook']}/validate"
    with httpx.Client(verify=ssl.create_default_context(cafile=str(tls[0]))) as c:
        answer = c.post(url, json=review, timeout=10).json()
        assert answer["response"]["allowed"] is False and "Multi-node" in answer["response"]["status"]["message"]
        # referenced ConfigMaps are read from the cluster, in the request's namespace
        good = inference("ws-hook-config")
        good["inference"]["config"] = "my-config"
        review["request"].update(object=good, namespace="default")
        answer = c.post(url, json=review, timeout=10).json()
        assert "ConfigMap 'my-config' not found" in answer["response"]["status"]["message"]
        cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "my-config", "namespace": "default"},
                        "data": {"inference_config.yaml": "vllm:\n  max-model-len: 4096\n"}})
        assert c.post(url, json=review, timeout=10).json()["response"]["allowed"] is True


def _get(url: str) -> str | None:
    try:
        r = httpx.get(url, timeout=2)
        return r.text if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


# --- separate operators ------------------------------------------------------------------------------


@pytest.fixture
def bare(tmp_path):
    fake = KubeFake().start()
    cluster = Cluster(fake.url)
    cluster.install_crds()
    kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig")
    ops: list[Operator] = []

    def start(*args: str) -> Operator:
        ops.append(Operator(kubeconfig, "--resync", "1", *args, log_path=tmp_path / f"op{len(ops)}.log").start())
        return ops[-1]

    yield cluster, start, fake
    for op in ops:
        op.kill()  # a graceful stop waits for every daemon; nothing to keep here
    fake.stop()


def test_bring_your_own_nodes(bare):
    cluster, start, _ = bare
    start("--no-auto-provision")
    cluster.create(inference("byo", selector="mine"))
    wait_for(lambda: cluster.get("apps/v1", "StatefulSet", "byo"), 30, "StatefulSet")
    wait_for(lambda: cluster.condition(cluster.workspace("byo"), "ResourceReady").get("reason") == "NodesNotFound",
             20, "NodesNotFound")
    assert not cluster.list(NC, "NodeClaim")
    assert cluster.condition(cluster.workspace("byo"), "NodeClaimReady") == {}
    # a node with too small GPUs (NVIDIA feature-discovery labels): named
    cluster.add_gpu_node("small", {"apps": "mine", "nvidia.com/gpu.product": "Tesla-T4", "nvidia.com/gpu.count": "1",
                                   "nvidia.com/gpu.memory": "15360"})
    wait_for(lambda: cluster.condition(cluster.workspace("byo"), "ResourceReady").get("reason") == "GPUMismatch",
             20, "GPUMismatch")
    assert "Tesla-T4" in cluster.condition(cluster.workspace("byo"), "ResourceReady")["message"]
    cluster.delete("v1", "Node", "small", None)
    cluster.add_gpu_node("big", {"apps": "mine", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
                                 "nvidia.com/gpu.count": "1", "nvidia.com/gpu.memory": "81920"})
    cluster.statefulset_ready("byo")
    wait_for(lambda: state(cluster, "byo") == "Ready", 20, "Ready")
    assert cluster.workspace("byo")["status"]["workerNodes"] == ["big"]

    # no instanceType: sized from the nodes' NVIDIA labels (admitted only without auto-provisioning)
    doc = inference("byo-sized", selector="sized")
    del doc["resource"]["instanceType"]
    review = {"request": {"uid": "u", "operation": "CREATE", "object": doc}}
    assert admission_review(review, auto_provision=False)["response"]["allowed"] is True
    assert "instanceType is required" in admission_review(review)["response"]["status"]["message"]
    cluster.create(doc)
    wait_for(lambda: cluster.condition(cluster.workspace("byo-sized"), "ResourceReady").get("reason")
             == "NodesNotFound", 20, "NodesNotFound")
    assert state(cluster, "byo-sized") == "Pending" and not cluster.get("apps/v1", "StatefulSet", "byo-sized")
    cluster.add_gpu_node("h100", {"apps": "sized", "nvidia.com/gpu.product": "NVIDIA-H100-NVL",
                                  "nvidia.com/gpu.count": "1", "nvidia.com/gpu.memory": "95830"})
    sts = wait_for(lambda: cluster.get("apps/v1", "StatefulSet", "byo-sized"), 20, "StatefulSet")
    command = sts["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--instance-type") + 1] == "Standard_NC40ads_H100_v5"
    cluster.statefulset_ready("byo-sized")
    wait_for(lambda: state(cluster, "byo-sized") == "Ready", 20, "Ready")


def test_killed_mid_reconcile_and_restarted(bare):
    cluster, start, _ = bare
    op = start()
    names = [f"crash-{i}" for i in range(30)]
    for n in names:
        cluster.create(inference(n))
    wait_for(lambda: len(cluster.list(NC, "NodeClaim")) >= 5, 30, "some NodeClaims")
    op.kill()  # mid-way: some Workspaces have objects, some not
    partial = len(cluster.list(NC, "NodeClaim"))
    op = start()
    wait_for(lambda: all(state(cluster, n) == "Pending" for n in names), 60, "all reconciled")
    claims = cluster.list(NC, "NodeClaim")
    assert len(claims) == len(names) >= partial
    assert len({c["metadata"]["labels"]["kaito.sh/workspace"] for c in claims}) == len(names)
    for kind, api, per in (("StatefulSet", "apps/v1", 1), ("Service", "v1", 2)):
        assert len(cluster.list(api, kind, "app.kubernetes.io/managed-by=kaito")) == per * len(names), kind
    # a Workspace whose finalizer is removed by hand while the operator is down: its NodeClaim is
    # collected at the next start
    op.kill()
    ws = cluster.r(WS, "Workspace")
    ws.patch(body={"metadata": {"finalizers": None}}, name="crash-0", namespace="default",
             content_type="application/merge-patch+json")
    cluster.delete(WS, "Workspace", "crash-0")
    assert len(cluster.list(NC, "NodeClaim", "kaito.sh/workspace=crash-0")) == 1
    start()
    wait_for(lambda: not cluster.list(NC, "NodeClaim", "kaito.sh/workspace=crash-0"), 30, "orphan collected")
    assert len(cluster.list(NC, "NodeClaim")) == len(names) - 1


def test_leader_election(bare, tls):
    cluster, start, _ = bare
    a = start("--leader-elect", "--lease-namespace", "default", "--lease-duration", "3")
    wait_for(lambda: cluster.get("coordination.k8s.io/v1", "Lease", "kaito-operator"), 30, "Lease")
    health, hook = free_port(), free_port()
    b = start("--leader-elect", "--lease-namespace", "default", "--lease-duration", "3", "--health-port", str(health),
              "--webhook-port", str(hook), "--tls-cert", str(tls[0]), "--tls-key", str(tls[1]))
    assert wait_for(lambda: _get(f"http://127.0.0.1:{health}/healthz"), 20, "follower's /healthz") == "ok\n"
    # the follower answers admission too: the webhook Service sends requests to every replica
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": "u2", "operation": "CREATE", "object": inference("follower-hook")}}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(tls[0]))) as c:
        answer = c.post(f"https://127.0.0.1:{hook}/validate", json=review, timeout=10).json()
    assert answer["response"]["allowed"] is True and answer["response"]["uid"] == "u2"
    cluster.create(inference("led-1"))
    wait_for(lambda: cluster.list(NC, "NodeClaim", "kaito.sh/workspace=led-1"), 30, "led-1 reconciled")
    holder = cluster.get("coordination.k8s.io/v1", "Lease", "kaito-operator")["spec"]["holderIdentity"]
    assert holder.endswith(str(a.proc.pid))
    time.sleep(1)
    assert "leading" not in b.log()
    a.kill()
    cluster.create(inference("led-2"))
    wait_for(lambda: cluster.list(NC, "NodeClaim", "kaito.sh/workspace=led-2"), 40, "led-2 reconciled by b")
    holder = cluster.get("coordination.k8s.io/v1", "Lease", "kaito-operator")["spec"]["holderIdentity"]
    assert holder.endswith(str(b.proc.pid))


def test_200_workspaces_reach_steady_state(bare):
    cluster, start, fake = bare
    start()
    names = [f"many-{i:03d}" for i in range(200)]
    t0 = time.monotonic()
    for n in names:
        cluster.create(inference(n, selector="many"))
    wait_for(lambda: len(cluster.list(NC, "NodeClaim")) == 200 and len(
        cluster.list("apps/v1", "StatefulSet")) == 200, 120, "200 Workspaces' objects", every=1)
    cluster.karpenter()
    for n in names:
        cluster.statefulset_ready(n)
    wait_for(lambda: all(w.get("status", {}).get("state") == "Ready" for w in cluster.list(WS, "Workspace")), 120,
             "200 Ready", every=1)
    elapsed = time.monotonic() - t0
    rv = fake.rv
    time.sleep(2)
    assert fake.rv == rv  # steady: resyncs write nothing
    print(f"200 Workspaces Ready in {elapsed:.1f} s")


def test_render_sizes_the_model_once_per_reconcile(monkeypatch):
    """Validation, the plan and the vLLM flags each ask the estimator; within a reconcile's memo it works the
    answer out once."""
    from kaito.operator.manifests import parse
    from kaito.operator.render import render
    from kaito.presets import estimator

    asked = []
    real = estimator._estimate
    monkeypatch.setattr(estimator, "_estimate", lambda *a: asked.append(a) or real(*a))
    ws = parse(inference("memo"))
    render(ws)
    assert len(asked) >= 3
    asked.clear()
    with estimator.memo():
        first = render(ws)
        assert render(ws) == first
    assert len(asked) == 1


def test_informer_resumes_and_lists_again():
    """kube.Informer: the listing, then the watch; a dropped watch resumes from its version; one whose version
    is gone from the API server's history (410) lists again, and what the new listing lacks is DELETED."""
    import asyncio
    import threading

    from kaito.operator.kube import Informer, Kube

    fake = KubeFake().start()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        cluster = Cluster(fake.url)
        seen: list[tuple[str, str]] = []

        def cm(name: str, app: str = "x") -> dict:
            return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default",
                                                                          "labels": {"app": app}}}

        cluster.create(cm("a"))
        cluster.create(cm("other", app="y"))
        informer = Informer(Kube(cluster.api), "v1", "ConfigMap", "app=x",
                            lambda type_, obj: seen.append((type_, obj["metadata"]["name"])), loop).start()
        wait_for(informer.listed.is_set, 10, "listed")
        cluster.create(cm("b"))
        wait_for(lambda: ("ADDED", "b") in seen, 10, "b watched")
        fake.call(fake.drop_watches)
        cluster.create(cm("c"))
        wait_for(lambda: ("ADDED", "c") in seen, 10, "c after the watch resumed")
        assert seen == [("ADDED", "a"), ("ADDED", "b"), ("ADDED", "c")]  # resumed: nothing again

        def expire() -> None:  # while nothing is watched: a goes, and the history forgets it
            fake.history_limit = 1
            fake.delete(fake.kinds[("", "v1", "configmaps")], ("/configmaps", "default", "a"))
            fake.update(fake.kinds[("", "v1", "configmaps")], ("/configmaps", "default", "other"),
                        {**cm("other", app="y"), "data": {"k": "v"}}, None, None)
            fake.drop_watches()

        fake.call(expire)
        wait_for(lambda: ("DELETED", "a") in seen, 10, "a gone across the new listing")
        fake.history_limit = 200_000
        cluster.create(cm("d"))
        wait_for(lambda: ("ADDED", "d") in seen, 10, "watched again")
        assert seen.count(("DELETED", "a")) == 1 and ("ADDED", "other") not in seen
        informer.stop()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        fake.stop()


def test_feature_discovery_memory_is_matched_with_tolerance():
    """NVIDIA feature discovery reports usable MiB, below the advertised size: real nodes of the asked type
    match, smaller GPUs do not."""
    from kaito.operator.cluster import nfd_mismatch, sku_from_labels

    def node(product, count, mib):
        labels = {"nvidia.com/gpu.product": product, "nvidia.com/gpu.count": str(count),
                  "nvidia.com/gpu.memory": str(mib)}
        return {"metadata": {"name": "n1", "labels": labels}, "status": {"capacity": {"nvidia.com/gpu": str(count)}}}

    for product, count, mib, sku in [("NVIDIA-H100-80GB-HBM3", 8, 81559, "Standard_ND96isr_H100_v5"),
                                     ("NVIDIA-A10", 1, 23028, "Standard_NV36ads_A10_v5"),
                                     ("Tesla-T4", 1, 15360, "Standard_NC4as_T4_v3")]:
        assert nfd_mismatch([node(product, count, mib)], sku) is None, product
        assert sku_from_labels(node(product, count, mib)["metadata"]["labels"]) is not None, product
    assert "less than Standard_NV36ads_A10_v5" in nfd_mismatch([node("Tesla-T4", 1, 15360)], "Standard_NV36ads_A10_v5")
    assert "less than Standard_ND96isr_H100_v5" in nfd_mismatch([node("NVIDIA-H100-80GB-HBM3", 4, 81559)],
                                                                "Standard_ND96isr_H100_v5")


def test_a_body_older_than_kaitos_status_write_gets_that_status():
    """Kube.latest: a watch that resumes may show a Workspace's earlier version after the echo of kaito's
    status write; the reconcile then starts from that write's status (not from none, which would post the
    Events of every condition again)."""
    from kaito.operator.kube import Kube

    fake = KubeFake().start()
    try:
        cluster = Cluster(fake.url)
        cluster.install_crds()
        before = cluster.create(inference("older"))
        kube = Kube(cluster.api)
        status = {"state": "Ready", "conditions": [{"type": "WorkspaceSucceeded", "status": "True"}]}
        kube.patch_status(WS, "Workspace", "older", "default", status, before["metadata"]["resourceVersion"])
        after = cluster.get(WS, "Workspace", "older")
        assert kube.echo(after) and not kube.echo(before)
        seen = kube.latest(before)
        assert seen["status"] == after["status"] == status
        assert seen["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"]
        assert kube.latest(after) is after
    finally:
        fake.stop()


def test_a_statefulset_whose_fixed_fields_changed_is_made_again_with_its_pods():
    """Kube.apply: a StatefulSet whose claim templates changed (a weights StorageClass given after it was made)
    is deleted with its pods orphaned and applied anew; its pods stay for the new one to adopt."""
    from kaito.operator.kube import Kube

    fake = KubeFake().start()
    try:
        cluster = Cluster(fake.url)
        kube = Kube(cluster.api)
        sts = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "w", "namespace": "default"},
               "spec": {"replicas": 1, "serviceName": "w-headless", "selector": {"matchLabels": {"app": "w"}},
                        "template": {"metadata": {"labels": {"app": "w"}}, "spec": {
                            "containers": [{"name": "s", "image": "s:1"}],
                            "volumes": [{"name": "weights", "emptyDir": {}}]}}}}
        old = kube.apply(sts)
        cluster.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": "w-0", "namespace": "default", "labels": {"app": "w"}, "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "w", "uid": old["metadata"]["uid"],
                 "controller": True}]}, "spec": {"containers": [{"name": "s", "image": "s:1"}]}})
        sts["spec"]["template"]["spec"]["volumes"] = []
        sts["spec"]["volumeClaimTemplates"] = [{"metadata": {"name": "weights"}, "spec": {
            "accessModes": ["ReadWriteOnce"], "storageClassName": "managed-csi",
            "resources": {"requests": {"storage": "64Gi"}}}}]
        new = kube.apply(sts)
        assert new["metadata"]["uid"] != old["metadata"]["uid"]
        live = cluster.get("apps/v1", "StatefulSet", "w")
        assert live["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "managed-csi"
        pod = cluster.get("v1", "Pod", "w-0")
        assert pod is not None and not pod["metadata"].get("ownerReferences")  # orphaned, not deleted
        assert kube.apply(sts)["metadata"]["uid"] == new["metadata"]["uid"]  # once
    finally:
        fake.stop()
