"""The cluster around the operator, played by the tests over the fake API server (tests/kube_fake.py):
Karpenter and the kubelet (NodeClaims become Ready GPU nodes), the StatefulSet/Job controllers
(workload status), and the kubelet's pod status for failures. All through the real `kubernetes`
client over HTTP, as the components would write it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from kubernetes import client
from kubernetes.dynamic import DynamicClient

BIN = Path(sys.executable).parent
EXAMPLES = Path(__file__).resolve().parents[1] / "operator" / "examples"
WS = GROUP_VERSION = "kaito.sh/v1beta1"
NC = "karpenter.sh/v1"


def example(name: str, new_name: str | None = None) -> dict:
    """An example manifest of operator/examples, as v1beta1, renamed."""
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    doc["apiVersion"] = WS
    if new_name:
        doc["metadata"]["name"] = new_name
    return doc


def inference(name: str, selector: str | None = None) -> dict:
    """The phi-4 example Workspace (one A100 node) named `name`, its nodes labelled apps=<selector or name>."""
    doc = example("kaito_workspace_phi_4.yaml", name)
    doc["resource"]["labelSelector"]["matchLabels"] = {"apps": selector or name}
    return doc


def state(cluster: Cluster, name: str) -> str | None:
    return ((cluster.workspace(name) or {}).get("status") or {}).get("state")


def wait_for(fn, timeout: float = 30, what: str = "condition", every: float = 0.1):
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise TimeoutError(f"{what} not met after {timeout} s (last: {last!r})")


class Cluster:
    def __init__(self, url: str) -> None:
        cfg = client.Configuration()
        cfg.host = url
        cfg.api_key = {"authorization": "Bearer fake"}
        self.api = client.ApiClient(cfg)
        self._lock = threading.Lock()  # discovery is not thread-safe
        self._cache = os.path.join(tempfile.mkdtemp(prefix="kube-sim-"), "discovery.json")
        self.dyn = DynamicClient(self.api, cache_file=self._cache)

    def r(self, api_version: str, kind: str):
        with self._lock:
            return self.dyn.resources.get(api_version=api_version, kind=kind)

    def install_crds(self) -> None:
        from kaito.operator.crds import crds_yaml

        crd = self.r("apiextensions.k8s.io/v1", "CustomResourceDefinition")
        for doc in yaml.safe_load_all(crds_yaml()):
            crd.create(body=doc)
        with self._lock:  # discovery again: the new kinds
            self.dyn = DynamicClient(self.api, cache_file=self._cache)
            self.dyn.resources.invalidate_cache()

    def create(self, doc: dict) -> dict:
        res = self.r(doc["apiVersion"], doc["kind"])
        ns = doc["metadata"].get("namespace", "default") if res.namespaced else None
        return res.create(body=doc, namespace=ns).to_dict()

    def get(self, api_version: str, kind: str, name: str, ns: str | None = "default") -> dict | None:
        from kubernetes.dynamic.exceptions import NotFoundError

        res = self.r(api_version, kind)
        try:
            return res.get(name=name, namespace=ns if res.namespaced else None).to_dict()
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, selector: str | None = None, ns: str | None = None) -> list[dict]:
        return self.r(api_version, kind).get(namespace=ns, label_selector=selector).to_dict()["items"]

    def delete(self, api_version: str, kind: str, name: str, ns: str | None = "default") -> None:
        res = self.r(api_version, kind)
        res.delete(name=name, namespace=ns if res.namespaced else None)

    def patch_status(self, api_version: str, kind: str, name: str, status: dict, ns: str | None = "default") -> None:
        res = self.r(api_version, kind)
        res.status.patch(body={"status": status}, name=name, namespace=ns if res.namespaced else None,
                         content_type="application/merge-patch+json")

    def workspace(self, name: str, ns: str = "default") -> dict | None:
        return self.get(GROUP_VERSION, "Workspace", name, ns)

    def condition(self, obj: dict | None, type_: str) -> dict:
        return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), {})

    # --- the components the tests play ---------------------------------------------------------------

    def add_gpu_node(self, name: str, labels: dict[str, str], gpus: int = 1, ready: bool = True) -> None:
        self.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}})
        self.patch_status("v1", "Node", name, {
            "capacity": {"nvidia.com/gpu": str(gpus), "cpu": "24"},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "reason": "KubeletReady"}]},
            ns=None)

    def karpenter(self, selector: str | None = None) -> int:
        """NodeClaims without a node get one (with GPUs) and are marked Launched/Registered/Initialized/Ready."""
        done = 0
        for claim in self.list("karpenter.sh/v1", "NodeClaim", selector):
            if (claim.get("status") or {}).get("nodeName") or claim["metadata"].get("deletionTimestamp"):
                continue
            node = f"aks-{claim['metadata']['name']}-0"
            if self.get("v1", "Node", node, None) is None:
                self.add_gpu_node(node, {**claim["metadata"]["labels"], "kubernetes.io/hostname": node})
            conds = [{"type": t, "status": "True", "reason": t} for t in ("Launched", "Registered", "Initialized",
                                                                         "Ready")]
            self.patch_status("karpenter.sh/v1", "NodeClaim", claim["metadata"]["name"],
                              {"nodeName": node, "conditions": conds}, ns=None)
            done += 1
        return done

    def statefulset_ready(self, name: str, ns: str = "default") -> None:
        sts = self.get("apps/v1", "StatefulSet", name, ns)
        n = sts["spec"]["replicas"]
        self.patch_status("apps/v1", "StatefulSet", name, {"replicas": n, "readyReplicas": n}, ns)

    def pod(self, name: str, labels: dict[str, str], status: dict, ns: str = "default") -> None:
        self.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
                     "spec": {"containers": [{"name": "main", "image": "x"}]}})
        self.patch_status("v1", "Pod", name, status, ns)


class Operator:
    """`kaito-operator run` as a process, pointed at the fake through a kubeconfig."""

    def __init__(self, kubeconfig: str, *args: str, log_path: Path, exe: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.kubeconfig, self.args, self.log_path = kubeconfig, args, log_path
        self.exe = exe or [str(BIN / "kaito-operator")]
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Operator:
        env = {**os.environ, **self.env, "KUBECONFIG": self.kubeconfig}
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([*self.exe, "run", *self.args], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]
