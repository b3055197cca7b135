"""The Azure GPU provisioner (operator/azure.py): the Azure SDK against a local ARM fake
(tests/arm_fake.py), and `kaito-operator run --provisioner azure` against the Kubernetes API fake."""

from __future__ import annotations

import base64
import sys
import time
from collections import Counter

import pytest
from arm_fake import ArmFake
from azure_operator import StaticToken
from helpers import REPO, free_port
from kaito.operator.azure import Azure, AzureSettings, CloudError, claim_facts, garbage_collect, pool_name
from kube_fake import KubeFake
from kube_sim import NC, Cluster, Operator, inference, state, wait_for

pytestmark = pytest.mark.timeout(120)
RG, AKS = "rg-kaito", "aks-kaito"
SUBNET = "/subscriptions/sub-1/resourceGroups/rg-net/providers/Microsoft.Network/virtualNetworks/vnet/subnets/nodes"
CUSTOM_DATA = "#cloud-config\n# join {name} with labels {labels} taints {taints}"


@pytest.fixture
def arm():
    a = ArmFake().start()
    yield a
    a.stop()


def settings(arm: ArmFake, **kw) -> AzureSettings:
    return AzureSettings(**{"subscription_id": "sub-1", "resource_group": RG, "cluster_name": AKS, "location": "eastus",
                            "arm_url": arm.url, "polling_interval": 0, "retry_backoff": 0.05, **kw})


def claim(name: str = "ws0123456789", size: str = "Standard_NC24ads_A100_v4") -> dict:
    return {"apiVersion": NC, "kind": "NodeClaim",
            "metadata": {"name": name, "labels": {"karpenter.sh/nodepool": "kaito", "kaito.sh/workspace": "w",
                                                   "apps": "phi"}},
            "spec": {"requirements": [{"key": "node.kubernetes.io/instance-type", "operator": "In", "values": [size]}],
                     "taints": [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
                     "resources": {"requests": {"storage": "300Gi"}}}}


def test_sdk_agent_pools_against_arm(arm):
    cloud = Azure(settings(arm), StaticToken())
    skus = cloud.skus()
    assert skus["Standard_NC24ads_A100_v4"]["gpus"] == 1 and skus["Standard_NC48ads_A100_v4"]["gpus"] == 2
    with pytest.raises(CloudError, match="SKUNotAvailable: Standard_ND96_fake is not offered in eastus"):
        cloud.check_size("Standard_ND96_fake")
    with pytest.raises(CloudError, match="NotAGPUSize"):
        cloud.check_size("Standard_D4s_v5")
    arm.polls = 3  # the poller really polls
    cloud.ensure(claim())
    cloud.ensure(claim())  # a retry (after a crash): the same pool, updated
    pools = arm.pools()
    assert len(pools) == 1 and len(arm.puts) == 2 and len(set(arm.puts)) == 1
    props = pools[0]["properties"]
    assert props["vmSize"] == "Standard_NC24ads_A100_v4" and props["count"] == 1 and props["osDiskSizeGB"] == 300
    assert props["nodeTaints"] == ["sku=gpu:NoSchedule"] and props["mode"] == "User"
    assert props["nodeLabels"] == {"kaito.sh/workspace": "w", "apps": "phi", "kaito.sh/nodeclaim": "ws0123456789"}
    assert props["provisioningState"] == "Succeeded" and props["tags"] == {"kaito-nodeclaim": "ws0123456789"}
    assert cloud.pools() == [("ws0123456789", "ws0123456789")]
    cloud.delete("ws0123456789")
    assert arm.pools() == []
    cloud.delete("ws0123456789")  # gone already: fine
    assert pool_name("rag0123456789") == "rag012345678" and claim_facts(claim("x"))["disk"] == 300
    assert "osSKU" not in props
    azure_linux = claim("ws9876543210")
    azure_linux["metadata"]["annotations"] = {"kaito.sh/node-image-family": "AzureLinux"}  # from the Workspace's
    cloud.ensure(azure_linux)
    assert arm.pools()[0]["properties"]["osSKU"] == "AzureLinux"


def test_sdk_quota_and_restricted_sizes(arm):
    cloud = Azure(settings(arm), StaticToken())
    arm.quota["Standard_NC24ads_A100_v4"] = "standardNCADSA100v4Family"
    with pytest.raises(CloudError) as e:
        cloud.ensure(claim())
    assert e.value.reason == "QuotaExceeded" and "standardNCADSA100v4Family Cores quota" in e.value.message
    arm.restrict("Standard_NC6s_v3")
    cloud._skus = None
    with pytest.raises(CloudError, match="restricted in eastus .NotAvailableForSubscription"):
        cloud.ensure(claim(size="Standard_NC6s_v3"))
    assert arm.pools() == []


def test_sdk_scale_sets(arm):
    cloud = Azure(settings(arm, pool_kind="vmss", vmss_subnet_id=SUBNET, vmss_custom_data=CUSTOM_DATA), StaticToken())
    cloud.ensure(claim("ws-vmss-1"))
    vmss = arm.resources[arm.puts[0]]
    assert vmss["sku"] == {"name": "Standard_NC24ads_A100_v4", "capacity": 1}
    assert vmss["type"] == "Microsoft.Compute/virtualMachineScaleSets" and vmss["name"] == "wsvmss1"
    profile = vmss["properties"]["virtualMachineProfile"]
    assert profile["storageProfile"]["osDisk"]["diskSizeGB"] == 300
    # the node joins with the claim's labels (not Karpenter's own) and taints, on the configured subnet
    assert base64.b64decode(profile["osProfile"]["customData"]).decode() == (
        "#cloud-config\n# join wsvmss1 with labels kaito.sh/workspace=w,apps=phi,kaito.sh/nodeclaim=ws-vmss-1 "
        "taints sku=gpu:NoSchedule")
    nic = profile["networkProfile"]["networkInterfaceConfigurations"][0]["properties"]
    assert [ip["properties"]["subnet"]["id"] for ip in nic["ipConfigurations"]] == [SUBNET] and nic["primary"]
    assert cloud.pools() == [("ws-vmss-1", "wsvmss1")]


def test_sdk_faults_mid_operation(arm):
    """ARM failing while the SDK creates pools: a 500 on a poll and 429s are retried by the SDK (after
    their Retry-After); an error that outlasts the SDK's retries, ARM out of reach and a quota error after
    the PUT was accepted are CloudErrors; a retry updates the same pool, never makes a second one."""
    cloud = Azure(settings(arm), StaticToken())
    arm.polls, arm.poll_errors = 2, 2
    cloud.ensure(claim("ws00000poll5"))
    assert arm.faults["500 poll"] == 2
    arm.throttle, arm.retry_after = 2, 1
    t0 = time.monotonic()
    cloud.ensure(claim("ws0000thrott"))
    assert arm.faults["429"] == 2 and time.monotonic() - t0 >= 2  # each retry waited its Retry-After
    arm.poll_errors = 1000
    with pytest.raises(CloudError) as e:
        cloud.ensure(claim("ws000000down"))
    assert e.value.reason == "InternalServerError" and arm.faults["500 poll"] > 3
    arm.poll_errors = 0
    with pytest.raises(CloudError) as e:
        Azure(settings(arm, arm_url=f"http://127.0.0.1:{free_port()}"), StaticToken()).check_size("Standard_NC6s_v3")
    assert e.value.reason == "ServiceRequestError"
    arm.late_quota["Standard_NC24ads_A100_v4"] = "standardNCADSA100v4Family"
    with pytest.raises(CloudError) as e:
        cloud.ensure(claim("ws000000late"))
    assert e.value.reason == "QuotaExceeded" and "standardNCADSA100v4Family Cores quota" in e.value.message
    assert {p["name"]: p["properties"]["provisioningState"] for p in arm.pools()}["ws000000late"] == "Failed"
    del arm.late_quota["Standard_NC24ads_A100_v4"]  # quota raised: the retry updates the failed pool
    cloud.ensure(claim("ws000000late"))
    cloud.ensure(claim("ws000000down"))
    pools = {p["properties"]["tags"]["kaito-nodeclaim"]: p for p in arm.pools()}
    assert len(arm.pools()) == len(pools) == 4  # one pool per claim
    assert {n: p["properties"]["provisioningState"] for n, p in pools.items()} == dict.fromkeys(
        ("ws00000poll5", "ws0000thrott", "ws000000down", "ws000000late"), "Succeeded")
    assert sorted(Counter(arm.puts).values()) == [1, 1, 2, 2]


class Claims:
    """NodeClaims as the provisioner reads them (Kube.get); `fail` raises as an API server error would."""

    def __init__(self, claims: dict[str, dict], fail: bool = False) -> None:
        self.claims, self.fail = claims, fail

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict | None:
        assert (api_version, kind) == (NC, "NodeClaim")
        if self.fail:
            raise RuntimeError("the API server answered 500")
        return self.claims.get(name)


@pytest.mark.parametrize("kind", ["aks", "vmss"])
def test_garbage_collection_deletes_exactly_the_orphans(arm, kind):
    cloud = Azure(settings(arm, pool_kind=kind, vmss_subnet_id=SUBNET, vmss_custom_data=CUSTOM_DATA), StaticToken())
    live, orphans = ["ws00000live1", "ws00000live2", "ws00000dying"], ["ws000orphan1", "ws000orphan2"]
    for name in live + orphans:
        cloud.ensure(claim(name))
    if kind == "aks":  # the cluster's own pool, not kaito's
        cloud.aks.agent_pools.begin_create_or_update(RG, AKS, "nodepool1", {"properties": {
            "vmSize": "Standard_D4s_v5", "count": 3, "mode": "System"}}, **cloud.kw).result()
    else:
        cloud.compute.virtual_machine_scale_sets.begin_create_or_update(RG, "nodepool1", {
            "location": "eastus", "sku": {"name": "Standard_D4s_v5", "capacity": 3}}, **cloud.kw).result()
    claims = {name: claim(name) for name in live}
    claims["ws00000dying"]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"  # its finalizer's to delete

    def names() -> set[str]:
        return {r["name"] for r in list(arm.resources.values())}

    with pytest.raises(RuntimeError):  # a claim that cannot be read is never taken for a deleted one
        garbage_collect(cloud, Claims(claims, fail=True))
    assert names() == {*live, *orphans, "nodepool1"}
    assert sorted(garbage_collect(cloud, Claims(claims))) == orphans
    assert names() == {*live, "nodepool1"} and not [p for p in arm.pools() if p["properties"].get(
        "provisioningState") == "Deleting"]
    assert garbage_collect(cloud, Claims(claims)) == [] and names() == {*live, "nodepool1"}


# --- the operator with the provisioner ----------------------------------------------------------------


@pytest.fixture
def azure_env(tmp_path, arm):
    fake = KubeFake().start()
    cluster = Cluster(fake.url)
    cluster.install_crds()
    kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig")
    env = {"AZURE_SUBSCRIPTION_ID": "sub-1", "AZURE_RESOURCE_GROUP": RG, "AZURE_CLUSTER_NAME": AKS,
           "AZURE_LOCATION": "eastus", "KAITO_AZURE_ARM_URL": arm.url, "KAITO_AZURE_POLLING_INTERVAL": "0.05",
           "KAITO_AZURE_GC_INTERVAL": "1"}
    ops: list[Operator] = []

    def start() -> Operator:
        ops.append(Operator(kubeconfig, "--resync", "1", "--provisioner", "azure", log_path=tmp_path / f"op{len(ops)}.log",
                            exe=[sys.executable, str(REPO / "tests" / "azure_operator.py")], env=env).start())
        return ops[-1]

    yield cluster, start, arm
    for op in ops:
        op.kill()
    fake.stop()


def aks_node(cluster: Cluster, claim_name: str) -> None:
    """AKS's part: the pool's VM joins the cluster with the pool's labels and its GPUs."""
    cluster.add_gpu_node(f"aks-{claim_name}-vmss000000", {"kaito.sh/nodeclaim": claim_name,
                                                          "kubernetes.azure.com/agentpool": claim_name})


def test_workspace_on_azure_from_create_to_delete(azure_env):
    cluster, start, arm = azure_env
    arm.throttle, arm.poll_errors, arm.polls = 2, 2, 3  # ARM throttles, then fails polls: retried
    start()
    cluster.create(inference("az-ws"))
    pool = wait_for(lambda: [p for p in arm.pools() if p["properties"]["provisioningState"] == "Succeeded"], 30,
                    "agent pool")[0]
    claim_name = pool["properties"]["tags"]["kaito-nodeclaim"]
    nc = wait_for(lambda: cluster.condition(cluster.get(NC, "NodeClaim", claim_name, None), "Launched").get(
        "status") == "True" and cluster.get(NC, "NodeClaim", claim_name, None), 20, "Launched")
    assert nc["status"]["capacity"]["nvidia.com/gpu"] == "1"
    assert cluster.condition(nc, "Registered")["status"] == "False"
    aks_node(cluster, claim_name)
    wait_for(lambda: cluster.condition(cluster.get(NC, "NodeClaim", claim_name, None), "Ready").get("status")
             == "True", 20, "NodeClaim Ready")
    assert cluster.get(NC, "NodeClaim", claim_name, None)["status"]["nodeName"] == f"aks-{claim_name}-vmss000000"
    cluster.statefulset_ready("az-ws")
    wait_for(lambda: state(cluster, "az-ws") == "Ready", 20, "Workspace Ready")
    cluster.delete("kaito.sh/v1beta1", "Workspace", "az-ws")
    wait_for(lambda: cluster.workspace("az-ws") is None, 30, "Workspace gone")
    assert arm.pools() == [] and cluster.get(NC, "NodeClaim", claim_name, None) is None
    assert arm.faults == {"429": 2, "500 poll": 2} and len(set(arm.puts)) == 1


@pytest.mark.parametrize("when", ["at the PUT", "after the PUT was accepted"])
def test_quota_error_in_workspace_status_then_retried(azure_env, when):
    cluster, start, arm = azure_env
    quota = arm.quota if when == "at the PUT" else arm.late_quota
    quota["Standard_NC24ads_A100_v4"] = "standardNCADSA100v4Family"
    start()
    cluster.create(inference("az-quota"))
    wait_for(lambda: state(cluster, "az-quota") == "NotReady", 30, "NotReady")
    cond = cluster.condition(cluster.workspace("az-quota"), "NodeClaimReady")
    assert cond["reason"] == "NodeClaimFailed" and "QuotaExceeded" in cond["message"]
    assert "standardNCADSA100v4Family Cores quota" in cond["message"]
    assert [p["properties"]["provisioningState"] for p in arm.pools()] == ([] if quota is arm.quota else ["Failed"])
    del quota["Standard_NC24ads_A100_v4"]  # quota raised: the provisioner retries (backoff)
    wait_for(lambda: [p for p in arm.pools() if p["properties"]["provisioningState"] == "Succeeded"], 30,
             "pool after the quota was raised")
    wait_for(lambda: state(cluster, "az-quota") == "Pending", 20, "Pending again")
    assert len(arm.pools()) == 1 and len(set(arm.puts)) == 1  # the same pool, retried


def test_sku_not_in_region_is_named(azure_env):
    cluster, start, arm = azure_env
    arm.restrict("Standard_NC24ads_A100_v4")
    start()
    cluster.create(inference("az-sku"))
    wait_for(lambda: state(cluster, "az-sku") == "NotReady", 30, "NotReady")
    msg = cluster.condition(cluster.workspace("az-sku"), "NodeClaimReady")["message"]
    assert "SKUNotAvailable" in msg and "restricted in eastus" in msg


def test_crash_and_restart_leave_no_leak_and_no_double(azure_env):
    cluster, start, arm = azure_env
    arm.polls = 1_000_000  # the create operation never ends while the first operator lives
    op = start()
    cluster.create(claim("ws00000crash"))
    wait_for(lambda: arm.puts, 30, "PUT sent")
    time.sleep(0.3)
    op.kill()  # killed while polling the long-running operation
    arm.polls = 1
    for op_ in arm.operations.values():
        op_["left"] = 1
    # while it is down: its claim is deleted (held by the finalizer), and a pool is left from a claim
    # that no longer exists (as if a crash had come between the claim's deletion and the pool's)
    Azure(settings(arm), StaticToken()).ensure(claim("ws0000leaked"))
    cluster.create(claim("ws0000second"))
    cluster.delete(NC, "NodeClaim", "ws00000crash", None)
    assert cluster.get(NC, "NodeClaim", "ws00000crash", None)["metadata"]["deletionTimestamp"]
    start()
    wait_for(lambda: cluster.get(NC, "NodeClaim", "ws00000crash", None) is None, 30, "claim gone")
    wait_for(lambda: {p["name"] for p in arm.pools()} == {"ws0000second"}, 30, "only the live claim's pool")
    assert len([k for k in arm.puts if k.endswith("/ws0000second")]) == 1
