"""The Helm chart (operator/charts/kaito-operator), rendered and linted by Helm's own Go SDK
(helm-python-sdk, no helm binary): every object against the Kubernetes schemas, the CRDs as generated,
the container's arguments as `kaito-operator` parses them, and the RBAC rules against every request the
operator made while it ran Workspaces, a RAGEngine and the Azure provisioner against the fakes."""

from __future__ import annotations

import sys

import helm_python as helm  # the `chart` extra (helm-python-sdk) renders and lints the chart
import pytest
import yaml
from arm_fake import ArmFake
from helpers import REPO, free_port
from kaito.operator.cli import parser
from kaito.operator.crds import crds_yaml, nodeclaim_chart_template, nodeclaim_crd
from kaito.operator.schemas import object_errors
from kube_fake import KubeFake
from kube_sim import NC, Cluster, Operator, example, inference, state, wait_for

pytestmark = pytest.mark.timeout(120)
CHART = REPO / "operator" / "charts" / "kaito-operator"
AZURE = {"features": {"provisioner": "azure"},
         "azure": {"subscriptionId": "sub-1", "resourceGroup": "rg", "clusterName": "aks", "location": "eastus",
                   "workloadIdentity": {"clientId": "00000000-0000-0000-0000-000000000001"}}}


def render(values: dict | None = None) -> list[dict]:
    chart = helm.Chart.load(str(CHART))
    out = chart.render(values or {}, name="kaito", namespace="kaito-system", is_install=True)
    return [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc]


@pytest.mark.parametrize("values", [{}, AZURE, {"features": {"autoProvisioning": False}, "webhook": {"enabled": False},
                                               "leaderElection": {"enabled": False}}], ids=["default", "azure", "byo"])
def test_chart_renders_valid_objects(values):
    objects = render(values)
    kinds = sorted(o["kind"] for o in objects)
    assert {"ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"} <= set(kinds)
    for obj in objects:
        assert object_errors(obj) == [], (obj["kind"], object_errors(obj))
    dep = next(o for o in objects if o["kind"] == "Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    args = parser().parse_args(container["args"])  # what kaito-operator accepts
    assert args.provisioner == values.get("features", {}).get("provisioner", "none")
    assert args.auto_provision == values.get("features", {}).get("autoProvisioning", True)
    if values is AZURE:
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["AZURE_SUBSCRIPTION_ID"] == "sub-1" and env["AZURE_CLUSTER_NAME"] == "aks"
        assert dep["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"
        sa = next(o for o in objects if o["kind"] == "ServiceAccount")
        assert sa["metadata"]["annotations"]["azure.workload.identity/client-id"].startswith("0000")
    if values == {}:
        assert args.leader_elect and args.webhook_port == 9443 and "ValidatingWebhookConfiguration" in kinds


def test_chart_lints_and_ships_the_generated_crds():
    report = helm.lint(str(CHART), AZURE, strict=True)
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report
    regenerate = "regenerate: kaito-operator crds --chart operator/charts/kaito-operator"
    assert (CHART / "crds" / "kaito.sh.yaml").read_text() == crds_yaml(), regenerate
    assert (CHART / "templates" / "nodeclaim-crd.yaml").read_text() == nodeclaim_chart_template(), regenerate
    for crd in yaml.safe_load_all(crds_yaml()):
        assert object_errors(crd) == []


def test_chart_can_install_the_nodeclaim_crd(tmp_path):
    assert not [o for o in render(AZURE) if o["kind"] == "CustomResourceDefinition"]  # helm installs crds/ itself
    crd = next(o for o in render({**AZURE, "features": {"provisioner": "azure", "installNodeClaimCRD": True}})
               if o["kind"] == "CustomResourceDefinition")
    assert crd == nodeclaim_crd() and object_errors(crd) == []
    # a cluster without it: the CRD makes the kind served, and the claims kaito renders are accepted
    fake = KubeFake()
    fake.kinds = {k: v for k, v in fake.kinds.items() if v.kind != "NodeClaim"}
    fake.start()
    try:
        cluster = Cluster(fake.url)
        cluster.create(crd)
        cluster.install_crds()
        claim = next(o for o in render_workspace() if o["kind"] == "NodeClaim")
        assert cluster.create(claim)["metadata"]["name"] == claim["metadata"]["name"]
    finally:
        fake.stop()


def render_workspace() -> list[dict]:
    from kaito.operator.manifests import parse
    from kaito.operator.render import render as render_resource

    return render_resource(parse(inference("x")))


def test_azure_values_are_required():
    with pytest.raises(helm.HelmError, match=r"azure\.\w+(\.clientId)? is required"):
        render({"features": {"provisioner": "azure"}})


def allowed(rules: list[dict], verb: str, group: str, resource: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def test_rbac_allows_exactly_what_the_operator_does(tmp_path):
    """Run everything the operator does (Azure provisioner, leader election, inference, tuning, RAG,
    an autoscaled InferenceSet with the Gateway API Inference Extension, deletion) and check each request
    against the chart's ClusterRole and Role."""
    from addon_schemas import inferencepool_crd, keda_crd
    from azure_operator import StaticToken  # noqa: F401 - the launcher the Azure tests use
    from kaito.operator.mirror import mirror_name
    from test_inferenceset import iset

    fake, arm = KubeFake().start(), ArmFake().start()
    try:
        cluster = Cluster(fake.url)
        cluster.create(keda_crd())
        cluster.create(inferencepool_crd())
        cluster.install_crds()
        env = {"AZURE_SUBSCRIPTION_ID": "sub-1", "AZURE_RESOURCE_GROUP": "rg", "AZURE_CLUSTER_NAME": "aks",
               "AZURE_LOCATION": "eastus", "KAITO_AZURE_ARM_URL": arm.url, "KAITO_AZURE_POLLING_INTERVAL": "0.05"}
        op = Operator(fake.kubeconfig(tmp_path / "kubeconfig"), "--resync", "1", "--provisioner", "azure",
                      "--leader-elect", "--lease-namespace", "kaito-system", "--lease-duration", "3",
                      "--scaler-port", str(free_port()), "--gateway-api-inference-extension", "--model-mirror",
                      "--model-mirror-storage-class", "azurefile-csi", "--model-mirror-idle", "1",
                      log_path=tmp_path / "op.log", exe=[sys.executable, str(REPO / "tests" / "azure_operator.py")],
                      env=env).start()
        try:
            ws = inference("rbac-ws")  # weights per pod (the InferenceSet's come from a mirror)
            ws["metadata"]["annotations"] = {"kaito.sh/model-streaming": "disabled"}
            cluster.create(ws)
            tune = example("kaito_workspace_tuning_phi_3.yaml", "rbac-tune")
            cluster.create(tune)
            cluster.create(example("kaito_ragengine_phi_3.yaml", "rbac-rag"))
            cluster.create(iset("rbac-set", replicas=2))
            wait_for(lambda: len(arm.pools()) == 5, 40, "five agent pools")
            for claim in cluster.list(NC, "NodeClaim"):
                name = claim["metadata"]["name"]
                cluster.add_gpu_node(f"aks-{name}", {"kaito.sh/nodeclaim": name})
            cluster.statefulset_ready("rbac-ws")
            wait_for(lambda: state(cluster, "rbac-ws") == "Ready", 30, "Ready")
            mirror = mirror_name("microsoft/phi-4", "default")  # the InferenceSet's weights: its download runs
            wait_for(lambda: cluster.get("batch/v1", "Job", f"{mirror}-download"), 30, "the mirror's Job")
            cluster.pod(f"{mirror}-download-x", {"job-name": f"{mirror}-download"}, {"phase": "Running",
                                                                                  "podIP": "127.0.0.1"})
            wait_for(lambda: ("get", "", "pods/proxy") in fake.audit, 30, "its progress asked for")
            drifted = [("v1", "ConfigMap", "rbac-tune-tuning-config"), ("v1", "Service", "rbac-rag"),
                       ("apps/v1", "Deployment", "rbac-rag"), ("apps/v1", "StatefulSet", "rbac-ws"),
                       ("batch/v1", "Job", "rbac-tune"),
                       ("keda.sh/v1alpha1", "ScaledObject", "rbac-set"), ("v1", "ServiceAccount", "rbac-set-epp"),
                       ("rbac.authorization.k8s.io/v1", "Role", "rbac-set-epp"),
                       ("rbac.authorization.k8s.io/v1", "RoleBinding", "rbac-set-epp"),
                       ("inference.networking.k8s.io/v1", "InferencePool", "rbac-set")]
            for api, kind, name in drifted:  # someone edits what the operator owns: it is put back
                cluster.r(api, kind).patch(body={"metadata": {"labels": {"app.kubernetes.io/name": None}}}, name=name,
                                           namespace="default", content_type="application/merge-patch+json")
            for api, kind, name in drifted:
                wait_for(lambda a=api, k=kind, n=name: "app.kubernetes.io/name" in cluster.get(a, k, n)["metadata"][
                    "labels"], 20, f"{kind} {name} restored")
            cluster.r("kaito.sh/v1beta1", "Workspace").patch(  # an InferenceSet's replica edited: put back
                body={"metadata": {"labels": {"tier": None}}}, name="rbac-set-0", namespace="default",
                content_type="application/merge-patch+json")
            wait_for(lambda: "tier" in cluster.workspace("rbac-set-0")["metadata"]["labels"], 20, "replica restored")
            cluster.r("kaito.sh/v1beta1", "Workspace").patch(  # its weights onto claims: the StatefulSet made again
                body={"metadata": {"annotations": {"kaito.sh/weights-storage-class": "managed-csi"}}},
                name="rbac-ws", namespace="default", content_type="application/merge-patch+json")
            wait_for(lambda: cluster.get("apps/v1", "StatefulSet", "rbac-ws")["spec"].get("volumeClaimTemplates"), 20,
                     "claim templates")
            cluster.delete("kaito.sh/v1beta1", "Workspace", "rbac-ws")
            wait_for(lambda: cluster.workspace("rbac-ws") is None, 30, "deleted")
            sets = cluster.r("kaito.sh/v1beta1", "InferenceSet")  # scaled down, autoscaling off, deleted
            sets.scale.patch(body={"spec": {"replicas": 1}}, name="rbac-set", namespace="default",
                             content_type="application/merge-patch+json")
            sets.patch(body={"metadata": {"annotations": {"scaledobject.kaito.sh/auto-provision": None}}},
                       name="rbac-set", namespace="default", content_type="application/merge-patch+json")
            wait_for(lambda: cluster.get("keda.sh/v1alpha1", "ScaledObject", "rbac-set") is None, 30, "no ScaledObject")
            cluster.delete("kaito.sh/v1beta1", "InferenceSet", "rbac-set")
            wait_for(lambda: cluster.get("kaito.sh/v1beta1", "InferenceSet", "rbac-set") is None, 40, "set deleted")
            wait_for(lambda: not cluster.list("kaito.sh/v1alpha1", "ModelMirror"), 40, "unused mirrors deleted")
        finally:
            op.kill()
    finally:
        fake.stop()
        arm.stop()
    objects = render({**AZURE, "features": {**AZURE["features"], "gatewayAPIInferenceExtension": True},
                      "featureGates": {"ModelMirror": True}, "defaultModelMirrorStorageClass": "azurefile-csi"})
    cluster_rules = next(o for o in objects if o["kind"] == "ClusterRole")["rules"]
    lease_rules = next(o for o in objects if o["kind"] == "Role")["rules"]
    assert fake.audit, "nothing audited"
    missing = [a for a in sorted(fake.audit) if not allowed(cluster_rules + lease_rules, *a)]
    assert not missing, f"requests the chart's RBAC would forbid: {missing}"
    granted = {(v, g, r) for rule in cluster_rules for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    unused = {(v, g, r) for v, g, r in granted - fake.audit if v not in ("get", "list", "watch")}
    assert not unused, f"write permissions the operator never used: {sorted(unused)}"
