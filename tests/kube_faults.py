"""The operator under API faults, as tests/test_operator_faults.py and benchmarks/operator_faults.py run it:
the resources of every kind, the cluster played around the operator until they settle (tests/kube_sim.py),
their end state checked, and what the operator's requests did read from the fake's trace (kube_fake.Faults).

Two operators, each against its own fake: one provisions nodes (inference, tuning, multi-node Workspaces and
RAGEngines), one brings its own (`--no-auto-provision`: Workspaces on nodes a label selector finds)."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kube_fake import Faults, KubeFake
from kube_sim import NC, WS, Cluster, Operator, example, inference

REPO = Path(__file__).resolve().parents[1]
FAULTS = Faults(error_rate=0.05, conflict_rate=0.05, watch_lifetime=20, seed=1)  # what the issue asks to survive
KAITO = "app.kubernetes.io/managed-by=kaito"
A100 = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu.count": "1", "nvidia.com/gpu.memory": "81920"}


def multinode(name: str) -> dict:
    """An upstream v0.12 manifest without resource.count: the estimator's two A100 nodes."""
    doc = yaml.safe_load((REPO / "tests" / "upstream" / "workspace_qwen_2.5_coder_32b_instruct.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["resource"]["labelSelector"]["matchLabels"] = {"apps": name}
    return doc


def tuning(name: str) -> dict:
    doc = example("kaito_workspace_tuning_phi_3.yaml", name)
    doc["resource"]["labelSelector"]["matchLabels"] = {"app": name}
    return doc


def rag(name: str) -> dict:
    doc = example("kaito_ragengine_phi_3.yaml", name)
    doc["spec"]["compute"]["labelSelector"]["matchLabels"] = {"apps": name}
    return doc


def mix(prefix: str, n: int) -> tuple[list[dict], list[dict]]:
    """`n` Workspaces (one in ten tuning, multi-node and bring-your-own nodes each, at least one, the rest
    inference on one node) and one RAGEngine per ten: (for the provisioning operator, for the
    bring-your-own-nodes one)."""
    k = max(1, n // 10)
    auto = ([tuning(f"{prefix}-tune-{i}") for i in range(k)] + [multinode(f"{prefix}-multi-{i}") for i in range(k)]
            + [rag(f"{prefix}-rag-{i}") for i in range(k)]
            + [inference(f"{prefix}-inf-{i}") for i in range(n - 3 * k)])
    return auto, [inference(f"{prefix}-byo-{i}", selector=f"{prefix}-byo-{i}") for i in range(k)]


@dataclass
class Side:
    """One fake, its operator and the cluster the test plays around it."""

    fake: KubeFake
    cluster: Cluster
    operator: Operator
    docs: list[dict] = field(default_factory=list)
    ready: set[tuple[str, str]] = field(default_factory=set)  # what the play made ready already

    @classmethod
    def start(cls, folder: Path, name: str, faults: Faults, *args: str) -> Side:
        """A fake with kaito's CRDs, `faults` injected, then the operator (which meets them from its start)."""
        fake = KubeFake().start()
        cluster = Cluster(fake.url)
        cluster.install_crds()
        fake.inject(faults)
        op = Operator(fake.kubeconfig(folder / f"{name}.kubeconfig"), *args, log_path=folder / f"{name}.log").start()
        return cls(fake, cluster, op)

    def stop(self) -> None:
        self.operator.kill()
        self.fake.stop()

    @property
    def byo(self) -> bool:
        return "--no-auto-provision" in self.operator.args

    def play(self) -> None:
        """One round of Karpenter, the kubelet and the workload controllers: NodeClaims get GPU nodes (bring your
        own: each Workspace's selector a node), StatefulSets and Deployments report their pods ready, Jobs end."""
        c = self.cluster
        if self.byo:
            for doc in self.docs:
                node = f"node-{doc['metadata']['name']}"
                if ("Node", node) not in self.ready:
                    c.add_gpu_node(node, {**doc["resource"]["labelSelector"]["matchLabels"], **A100})
                    self.ready.add(("Node", node))
        else:
            c.karpenter()
        for api, kind in (("apps/v1", "StatefulSet"), ("apps/v1", "Deployment"), ("batch/v1", "Job")):
            for obj in c.list(api, kind, KAITO):
                name = obj["metadata"]["name"]
                if (kind, name) in self.ready:
                    continue
                if kind == "Job":
                    c.patch_status(api, kind, name, {"succeeded": 1, "conditions": [{"type": "Complete",
                                                                                    "status": "True"}]})
                else:
                    n = obj["spec"]["replicas"]
                    c.patch_status(api, kind, name, {"replicas": n, "readyReplicas": n})
                self.ready.add((kind, name))

    def problems(self) -> list[str]:
        """What keeps the resources from their end state (empty once there): every condition True for the
        resource's generation, the state Ready (tuning: Succeeded), the Event of its success posted once, the
        nodes it needs, and each object once."""
        c, out = self.cluster, []
        found = {(o["kind"], o["metadata"]["name"]): o for kind in ("Workspace", "RAGEngine")
                 for o in c.list(WS, kind)}
        claims = [cl["metadata"]["labels"] for cl in c.list(NC, "NodeClaim")]
        workloads = [(o["kind"], o["metadata"]["labels"]) for api, kind in (("apps/v1", "StatefulSet"), (
            "apps/v1", "Deployment"), ("batch/v1", "Job")) for o in c.list(api, kind, KAITO)]
        events = [(e["involvedObject"]["name"], e["message"].split(":")[0]) for e in c.list("v1", "Event")]
        for doc in self.docs:
            kind, name = doc["kind"], doc["metadata"]["name"]
            obj, label = found.get((kind, name)), f"kaito.sh/{kind.lower()}"
            status = (obj or {}).get("status") or {}
            conds = status.get("conditions") or []
            want = "Succeeded" if doc.get("tuning") else "Ready"
            if kind == "Workspace" and status.get("state") != want:
                out.append(f"{name}: state {status.get('state')}")
            wrong = [cd["type"] for cd in conds if cd["status"] != "True"
                     or cd.get("observedGeneration") != obj["metadata"]["generation"]]  # type: ignore[index]
            if not conds or wrong:
                out.append(f"{name}: conditions {wrong or 'none'}")
            if (n := events.count((name, f"{kind}Succeeded is True"))) != 1:
                out.append(f"{name}: {n} Events of its success")
            nodes = 0 if self.byo else status.get("targetNodeCount") or 1
            if (n := sum(1 for labels in claims if labels.get(label) == name)) != nodes:
                out.append(f"{name}: {n} NodeClaims for {nodes} nodes")
            if (n := sum(1 for _, labels in workloads if labels.get(label) == name)) != 1:
                out.append(f"{name}: {n} workloads")
        return out

    def leftovers(self) -> list[str]:
        """What is left of the resources once deleted (empty once all is gone)."""
        c = self.cluster
        return [f"{o['kind']} {o['metadata']['name']}" for api, kind in (
            (WS, "Workspace"), (WS, "RAGEngine"), (NC, "NodeClaim"), ("apps/v1", "StatefulSet"),
            ("apps/v1", "Deployment"), ("batch/v1", "Job")) for o in c.list(api, kind)]


@dataclass
class Run:
    ready_s: float  # from the first create to every resource at its end state
    deleted_s: float  # from deleting them all to nothing left of them (their NodeClaims and objects)
    requests: int  # the operators' requests from their start until all was deleted (each retry one more)
    injected: dict[str, int]
    retries: list[float]  # seconds from each injected 500/429 to the same request again
    quiet: bool  # nothing written for a while once at the end state


def until(check, timeout: float, what: str, every: float = 0.5) -> float:
    """Call `check` (a list of what is still wrong) until it is empty; the seconds it took."""
    t0 = time.monotonic()
    left = check()
    while left:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what} after {timeout} s: {left[:8]} ({len(left)} in all)")
        time.sleep(every)
        left = check()
    return time.monotonic() - t0


def scenario(folder: Path, n: int, faults: Faults, timeout: float = 120, resync: float = 5) -> Run:
    """Two operators started under `faults` (Faults() for none: their requests are traced all the same), `n`
    Workspaces of every kind and RAGEngines created at once (`mix`), the cluster played until they are at their end state,
    a few seconds of quiet, then all of them deleted until nothing is left."""
    auto, own = mix("r", n)
    folder.mkdir(parents=True, exist_ok=True)
    sides = [Side.start(folder, "auto", faults, "--resync", str(resync)),
             Side.start(folder, "byo", faults, "--resync", str(resync), "--no-auto-provision")]
    try:
        for side, docs in zip(sides, (auto, own), strict=True):
            for doc in docs:
                side.cluster.create(copy.deepcopy(doc))
            side.docs = docs

        def waiting() -> list[str]:
            for side in sides:
                side.play()
            return [p for side in sides for p in side.problems()]

        ready = until(waiting, timeout, "not at their end state")
        still = quiet(sides, 3)
        for side in sides:
            for doc in side.docs:
                side.cluster.delete(WS, doc["kind"], doc["metadata"]["name"])
        deleted = until(lambda: [p for side in sides for p in side.leftovers()], timeout, "not deleted")
        injected: dict[str, int] = {}
        for side in sides:
            for k, v in side.fake.injected.items():
                injected[k] = injected.get(k, 0) + v
        return Run(ready, deleted, sum(len(side.fake.trace) for side in sides), injected,
                   [d for side in sides for d in retry_delays(side.fake.trace)], still)
    finally:
        for side in sides:
            side.stop()


def retry_delays(trace: list[tuple[float, str, str, int]]) -> list[float]:
    """Seconds from each request answered 500 or 429 to the next request of the same method and URL (creates
    aside: the next POST to a collection is another object)."""
    out = []
    for i, (t, method, url, status) in enumerate(trace):
        if status in (500, 429) and method != "POST":
            again = next((t2 for t2, m2, u2, _ in trace[i + 1:] if (m2, u2) == (method, url)), None)
            if again is not None:
                out.append(again - t)
    return out


def quiet(sides: list[Side], seconds: float) -> bool:
    """Whether nothing is written for `seconds` (the operators' resyncs included)."""
    before = [side.fake.rv for side in sides]
    time.sleep(seconds)
    return [side.fake.rv for side in sides] == before


def summary(delays: list[float]) -> str:
    if not delays:
        return "no retries"
    return (f"{len(delays)} retries, {min(delays):.2f}-{max(delays):.2f} s, median {statistics.median(delays):.2f} s")
