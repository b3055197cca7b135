"""The Azure GPU provisioner: each Karpenter NodeClaim becomes Azure capacity, with the Azure SDK.

- AKS (`pool_kind: aks`, the default): one agent pool per NodeClaim (azure-mgmt-containerservice):
  VM size = the claim's instance type, count 1, OS disk = the claim's storage request, the claim's
  labels (plus `kaito.sh/nodeclaim`) and taints, mode User.
- Other clusters (`pool_kind: vmss`): one VM scale set of capacity 1 (azure-mgmt-compute) with
  the configured image and subnet; its cloud-init (`vmss_custom_data`, a template with `{labels}`,
  `{taints}` and `{name}`) joins the node to the cluster with the claim's labels and taints.
- The claim's `kaito.sh/node-image-family` annotation (from the Workspace's) is the agent pool's OS
  image (`osSKU`: Ubuntu or AzureLinux).

Capacity is created and deleted with the SDK's long-running-operation pollers; the SDK's retry policy
retries throttling (429, after its Retry-After), 5xx answers (a failed poll too) and connection errors.
Authentication is azure-identity's DefaultAzureCredential (workload identity in the cluster, or the
environment). The SKU list (`resource_skus.list`) says whether a size is offered in the region and how
many GPUs it has; an unknown or restricted size, a quota error (at the PUT, or when the accepted
operation fails), an error that outlasted the SDK's retries or any other cloud error is written to the
claim's `Launched` condition (reason = Azure's error code), and retried with backoff.

The claim's status follows the cloud and the cluster: Launched (the pool exists), Registered (a node
labelled `kaito.sh/nodeclaim=<claim>` joined: `status.nodeName`), Initialized (the node is Ready and
reports `nvidia.com/gpu` capacity), Ready. A finalizer deletes the pool before the claim goes.

Crash safety: the pool's name is derived from the claim's name (create-or-update is idempotent, so a
retry after a crash never makes a second pool); the finalizer is in place before any pool exists; a
garbage collector deletes pools tagged `kaito-nodeclaim` whose claim no longer exists (at start and
every `gc_interval` seconds); untagged pools and pools of existing claims are never touched.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any, Literal

import kopf
from pydantic import BaseModel, Field

from . import status as st
from .api import NODE_IMAGE_FAMILY
from .cluster import GPU, NODECLAIM, node_gpus, node_ready
from .kube import Kube

log = logging.getLogger("kaito.operator.azure")
TAG = "kaito-nodeclaim"  # Azure tag names cannot hold "/"
NODE_LABEL = "kaito.sh/nodeclaim"


class AzureSettings(BaseModel):
    """Where capacity goes. From the environment (`from_env`): AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP,
    AZURE_CLUSTER_NAME, AZURE_LOCATION, KAITO_AZURE_POOL_KIND, KAITO_AZURE_VMSS_IMAGE, ..."""

    subscription_id: str
    resource_group: str
    location: str
    cluster_name: str = Field("", description="the AKS cluster (pool_kind aks)")
    pool_kind: Literal["aks", "vmss"] = "aks"
    arm_url: str = "https://management.azure.com"
    vmss_image: str = Field("", description="image id or publisher:offer:sku:version (pool_kind vmss)")
    vmss_subnet_id: str = ""
    vmss_custom_data: str = Field("", description="cloud-init template: {name}, {labels}, {taints}")
    gc_interval: float = 300.0
    polling_interval: float = 30.0  # seconds between polls of a long-running operation
    retry_backoff: float = 0.8  # the SDK's retry_backoff_factor (its default): 0, 2x, 4x... seconds between tries

    @classmethod
    def from_env(cls) -> AzureSettings:
        env = os.environ
        values = {"subscription_id": env.get("AZURE_SUBSCRIPTION_ID", ""),
                  "resource_group": env.get("AZURE_RESOURCE_GROUP", ""), "location": env.get("AZURE_LOCATION", ""),
                  "cluster_name": env.get("AZURE_CLUSTER_NAME", "")}
        for field in ("pool_kind", "arm_url", "vmss_image", "vmss_subnet_id", "gc_interval", "polling_interval",
                      "retry_backoff"):
            if f"KAITO_AZURE_{field.upper()}" in env:
                values[field] = env[f"KAITO_AZURE_{field.upper()}"]
        if "KAITO_AZURE_VMSS_CUSTOM_DATA_FILE" in env:
            with open(env["KAITO_AZURE_VMSS_CUSTOM_DATA_FILE"]) as f:
                values["vmss_custom_data"] = f.read()
        missing = [k for k in ("subscription_id", "resource_group", "location") if not values[k]]
        if values.get("pool_kind", "aks") == "aks" and not values["cluster_name"]:
            missing.append("cluster_name")
        if missing:
            raise SystemExit("the Azure provisioner needs " + ", ".join(f"AZURE_{m.upper()}" for m in missing))
        return cls(**values)


class CloudError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


@contextmanager
def cloud_errors() -> Iterator[None]:
    """The SDK's errors, once its retry policy gave up, as CloudError: Azure's error code when it sent one."""
    from azure.core.exceptions import AzureError, HttpResponseError

    try:
        yield
    except HttpResponseError as e:
        code = getattr(e.error, "code", None) or e.reason or "CloudError"
        raise CloudError(code, getattr(e.error, "message", None) or str(e)) from None
    except AzureError as e:  # no answer: a refused connection, a timeout
        raise CloudError(type(e).__name__, str(e)) from None


def pool_name(claim: str) -> str:
    """AKS agent pool names: lower-case letters and digits, 12 at most, starting with a letter."""
    name = re.sub(r"[^a-z0-9]", "", claim.lower())
    return name[:12] if name[:1].isalpha() else ("k" + name)[:12]


def claim_facts(claim: dict) -> dict[str, Any]:
    spec = claim.get("spec") or {}
    size = next((r["values"][0] for r in spec.get("requirements") or []
                 if r.get("key") == "node.kubernetes.io/instance-type" and r.get("values")), None)
    if not size:
        raise CloudError("InvalidNodeClaim", "no node.kubernetes.io/instance-type requirement")
    storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "128Gi")
    m = re.fullmatch(r"(\d+)(Gi|G|Ti|T)?", str(storage))
    disk = int(m.group(1)) * (1024 if m and m.group(2) in ("Ti", "T") else 1) if m else 128
    labels = {k: v for k, v in (claim["metadata"].get("labels") or {}).items()
              if not k.startswith(("karpenter.sh/", "kubernetes.azure.com/"))}
    labels[NODE_LABEL] = claim["metadata"]["name"]
    taints = [f"{t['key']}={t.get('value', '')}:{t['effect']}" for t in spec.get("taints") or []]
    os_sku = (claim["metadata"].get("annotations") or {}).get(NODE_IMAGE_FAMILY)  # Ubuntu | AzureLinux
    return {"size": size, "disk": disk, "labels": labels, "taints": taints, "os_sku": os_sku}


class Azure:
    """The cloud side: SKUs, and create / delete / list of the pools this provisioner made."""

    def __init__(self, settings: AzureSettings, credential: Any = None) -> None:
        self.s = settings
        self._credential = credential
        self._skus: tuple[float, dict[str, dict]] | None = None
        self.kw: dict[str, Any] = {"polling_interval": settings.polling_interval}
        self.client_kw = {"base_url": settings.arm_url, "retry_backoff_factor": settings.retry_backoff}
        if settings.arm_url.startswith("http://"):  # a local ARM (tests): plain HTTP
            self.kw["enforce_https"] = False

    @cached_property
    def credential(self) -> Any:
        if self._credential is None:
            from azure.identity import DefaultAzureCredential

            self._credential = DefaultAzureCredential()
        return self._credential

    @cached_property
    def aks(self):
        from azure.mgmt.containerservice import ContainerServiceClient

        return ContainerServiceClient(self.credential, self.s.subscription_id, **self.client_kw)

    @cached_property
    def compute(self):
        from azure.mgmt.compute import ComputeManagementClient

        return ComputeManagementClient(self.credential, self.s.subscription_id, **self.client_kw)

    def _get_kw(self) -> dict[str, Any]:
        return {k: v for k, v in self.kw.items() if k == "enforce_https"}

    def skus(self) -> dict[str, dict]:
        """VM sizes offered in the location: name -> {gpus, vcpus, memory_gib, restricted} (cached 1 h)."""
        if self._skus and time.monotonic() - self._skus[0] < 3600:
            return self._skus[1]
        found = {}
        with cloud_errors():
            listed = [s for s in self.compute.resource_skus.list(filter=f"location eq '{self.s.location}'",
                                                                 **self._get_kw())
                      if s.resource_type == "virtualMachines"]
        for s in listed:
            caps = {c.name: c.value for c in s.capabilities or []}
            restricted = [getattr(r.reason_code, "value", r.reason_code) for r in s.restrictions or []
                          if r.type == "Location"]
            found[s.name] = {"gpus": int(caps.get("GPUs", 0) or 0), "vcpus": caps.get("vCPUs"),
                             "memory_gib": caps.get("MemoryGB"), "restricted": restricted[0] if restricted else None}
        self._skus = (time.monotonic(), found)
        return found

    def check_size(self, size: str) -> dict:
        info = self.skus().get(size)
        if info is None:
            raise CloudError("SKUNotAvailable", f"{size} is not offered in {self.s.location}")
        if info["restricted"]:
            raise CloudError("SKUNotAvailable", f"{size} is restricted in {self.s.location} ({info['restricted']})")
        if not info["gpus"]:
            raise CloudError("NotAGPUSize", f"{size} has no GPUs")
        return info

    def ensure(self, claim: dict) -> None:
        """Create (or update to the same) the claim's pool and wait for the operation."""
        facts = claim_facts(claim)
        self.check_size(facts["size"])
        name = pool_name(claim["metadata"]["name"])
        tags = {TAG: claim["metadata"]["name"]}
        with cloud_errors():
            if self.s.pool_kind == "aks":
                body = {"properties": {"vmSize": facts["size"], "count": 1, "osDiskSizeGB": facts["disk"],
                                       "mode": "User", "osType": "Linux", "nodeLabels": facts["labels"],
                                       "nodeTaints": facts["taints"], "tags": tags,
                                       **({"osSKU": facts["os_sku"]} if facts["os_sku"] else {})}}
                self.aks.agent_pools.begin_create_or_update(self.s.resource_group, self.s.cluster_name, name, body,
                                                            **self.kw).result()
            else:
                self.compute.virtual_machine_scale_sets.begin_create_or_update(
                    self.s.resource_group, name, self._vmss(name, facts, tags), **self.kw).result()

    def _vmss(self, name: str, facts: dict, tags: dict) -> dict:
        image: dict[str, str]
        if self.s.vmss_image.startswith("/"):
            image = {"id": self.s.vmss_image}
        else:
            publisher, offer, sku, version = (self.s.vmss_image or "Canonical:ubuntu-24_04-lts:server:latest").split(":")
            image = {"publisher": publisher, "offer": offer, "sku": sku, "version": version}
        data = self.s.vmss_custom_data.format(name=name, labels=",".join(f"{k}={v}" for k, v in facts["labels"].items()),
                                              taints=",".join(facts["taints"]))
        return {"location": self.s.location, "sku": {"name": facts["size"], "capacity": 1}, "tags": tags,
                "properties": {"upgradePolicy": {"mode": "Manual"}, "virtualMachineProfile": {
                    "storageProfile": {"imageReference": image,
                                       "osDisk": {"createOption": "FromImage", "diskSizeGB": facts["disk"]}},
                    "osProfile": {"computerNamePrefix": name, "adminUsername": "kaito",
                                  "customData": base64.b64encode(data.encode()).decode(),
                                  "linuxConfiguration": {"disablePasswordAuthentication": True}},
                    "networkProfile": {"networkInterfaceConfigurations": [{"name": "nic", "properties": {
                        "primary": True, "ipConfigurations": [{"name": "ip", "properties": {
                            "subnet": {"id": self.s.vmss_subnet_id}}}]}}]}}}}

    def delete(self, claim_name: str) -> None:
        self.delete_pool(pool_name(claim_name))

    def delete_pool(self, name: str) -> None:
        with cloud_errors():
            if self.s.pool_kind == "aks":
                self.aks.agent_pools.begin_delete(self.s.resource_group, self.s.cluster_name, name, **self.kw).result()
            else:
                self.compute.virtual_machine_scale_sets.begin_delete(self.s.resource_group, name, **self.kw).result()

    def pools(self) -> list[tuple[str, str]]:
        """The pools this provisioner made (tagged with their claim): (claim name, pool name)."""
        with cloud_errors():
            if self.s.pool_kind == "aks":
                items = self.aks.agent_pools.list(self.s.resource_group, self.s.cluster_name, **self._get_kw())
                return [(p.properties.tags[TAG], p.name) for p in items
                        if p.properties and (p.properties.tags or {}).get(TAG)]
            items = self.compute.virtual_machine_scale_sets.list(self.s.resource_group, **self._get_kw())
            return [(v.tags[TAG], v.name) for v in items if (v.tags or {}).get(TAG)]


# --- the NodeClaim's status ---------------------------------------------------------------------


def claim_status(kube: Kube, claim: dict, launched: CloudError | bool, info: dict | None) -> dict:
    """Conditions Launched / Registered / Initialized / Ready from the cloud's answer and the node."""
    conds: list[st.Cond] = []
    if isinstance(launched, CloudError):
        conds.append(st.Cond(st.LAUNCHED, False, launched.reason, launched.message))
    else:
        conds.append(st.Cond(st.LAUNCHED, True, "Launched", "the cloud capacity exists"))
    node = None
    if launched is True:
        nodes = kube.list("v1", "Node", selector=f"{NODE_LABEL}={claim['metadata']['name']}")
        node = nodes[0] if nodes else None
    registered = node is not None
    conds.append(st.Cond(st.REGISTERED, registered, "Registered" if registered else "NotRegistered",
                         f"node {node['metadata']['name']} joined" if node else "waiting for the node to join"))
    initialized = bool(node and node_ready(node) and node_gpus(node) > 0)
    conds.append(st.Cond(st.INITIALIZED, initialized, "Initialized" if initialized else "NotInitialized",
                         f"{GPU}: {node_gpus(node)}" if initialized and node else
                         f"waiting for the node's {GPU} capacity"))
    ready = initialized and launched is True
    failed = isinstance(launched, CloudError)
    conds.append(st.Cond(st.READY, ready, "Ready" if ready else (launched.reason if failed else "NotReady"),
                         "" if ready else (launched.message if failed else "waiting for the node")))
    status: dict[str, Any] = {}
    if node:
        status["nodeName"] = node["metadata"]["name"]
    if info:
        status["capacity"] = {GPU: str(info["gpus"]), "cpu": str(info["vcpus"]), "memory": f"{info['memory_gib']}Gi"}
    status["conditions"] = st.conditions((claim.get("status") or {}).get("conditions"), conds)
    return status


def register(registry: kopf.OperatorRegistry, settings: AzureSettings | None = None, credential: Any = None,
             kube_factory=Kube) -> None:
    """NodeClaim handlers: a daemon per claim (create capacity, follow it), a finalizer, the garbage collector."""
    settings = settings or AzureSettings.from_env()
    cloud = Azure(settings, credential)
    holder: list[Kube] = []

    def kube() -> Kube:
        if not holder:
            holder.append(kube_factory())
        return holder[0]

    def sync(name: str) -> float:
        """One pass for one claim; returns the seconds until the next."""
        k = kube()
        claim = k.get(*NODECLAIM, name)
        if claim is None or claim["metadata"].get("deletionTimestamp"):
            return 0
        launched_before = any(c.get("type") == "Launched" and c.get("status") == "True"
                              for c in (claim.get("status") or {}).get("conditions") or [])
        info = None
        try:
            info = cloud.check_size(claim_facts(claim)["size"])
            if not launched_before:
                cloud.ensure(claim)
            result: CloudError | bool = True
        except CloudError as e:
            log.warning("capacity failed", extra={"nodeclaim": name, "reason": e.reason, "error": e.message[:300]})
            result = e
        status = claim_status(k, claim, result, info)
        st.write(k, *NODECLAIM, name, None, claim.get("status") or {}, status, uid=claim["metadata"].get("uid"),
                 component="kaito-azure-provisioner")
        if isinstance(result, CloudError):
            return -1  # back off
        return 0 if status["conditions"][-1]["status"] == "True" else 2

    def ours(labels: kopf.Labels, **_: Any) -> bool:  # kaito's claims, not other Karpenter node pools'
        return "kaito.sh/workspace" in labels or "kaito.sh/ragengine" in labels

    @kopf.daemon("karpenter.sh", "v1", "nodeclaims", registry=registry, id="azure-capacity",
                 cancellation_timeout=5.0, when=ours)
    async def follow(body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any) -> None:
        name = body["metadata"]["name"]
        backoff = 5.0
        while not stopped:
            try:
                wait = await asyncio.to_thread(sync, name)
            except Exception as e:  # noqa: BLE001 - the API server or the cloud: retried
                log.warning("nodeclaim sync failed", extra={"nodeclaim": name, "error": str(e)[:300]})
                wait = -1
            if wait < 0:
                wait, backoff = backoff, min(backoff * 2, 300.0)
            else:
                backoff = 5.0
            if wait == 0:
                wait = 30.0  # ready: look again now and then
            await stopped.wait(wait)

    @kopf.on.event("", "v1", "nodes", registry=registry, id="azure-nodes")
    async def node_changed(body: kopf.Body, **_: Any) -> None:
        name = (body["metadata"].get("labels") or {}).get(NODE_LABEL)
        if name:
            await asyncio.to_thread(sync, name)

    @kopf.on.delete("karpenter.sh", "v1", "nodeclaims", registry=registry, id="azure-delete", when=ours)
    async def delete(body: kopf.Body, **_: Any) -> None:
        await asyncio.to_thread(cloud.delete, body["metadata"]["name"])

    async def collect() -> None:
        while True:
            try:
                removed = await asyncio.to_thread(garbage_collect, cloud, kube())
                if removed:
                    log.info("garbage-collected pools", extra={"pools": removed})
            except Exception as e:  # noqa: BLE001
                log.warning("garbage collection failed", extra={"error": str(e)[:300]})
            await asyncio.sleep(settings.gc_interval)

    @kopf.on.startup(registry=registry, id="azure-gc")
    async def start_gc(**_: Any) -> None:
        asyncio.get_running_loop().create_task(collect())


def garbage_collect(cloud: Azure, kube: Kube) -> list[str]:
    """Delete the pools whose NodeClaim no longer exists (a claim that cannot be read stops the round)."""
    removed = []
    for claim, pool in cloud.pools():
        if kube.get(*NODECLAIM, claim) is None:
            cloud.delete_pool(pool)
            removed.append(pool)
    return removed

