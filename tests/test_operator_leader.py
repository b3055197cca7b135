"""Leader election under a partition: two `kaito-operator run --leader-elect` processes against the
Kubernetes API fake, the leader's Lease requests refused (500) or never answered while its other
requests still reach the API server. The old leader must stop before its Lease expires and exit, the
follower must take over, and nothing the old leader writes may land once the new leader has the Lease.

Each process has a token of its own in its kubeconfig: the fake's intercept hook records every
request that landed with the token that sent it, in the order the fake applied them."""

from __future__ import annotations

import asyncio
import time

import pytest
import yaml
from aiohttp import web
from kube_fake import KubeFake
from kube_sim import NC, Cluster, Operator, inference, wait_for

pytestmark = pytest.mark.timeout(120)
LEASE = "coordination.k8s.io/v1"
DURATION = 3  # seconds: the leader must be gone 2 s after its last renewal sent, the follower waits 3


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    fake = KubeFake().start()
    cluster = Cluster(fake.url)
    cluster.install_crds()
    yield fake, cluster, tmp_path_factory.mktemp("leader")
    fake.intercept = None
    fake.stop()


class Partition:
    """The fake's intercept: `cut`'s Lease requests answered 500 after 0.8 s (`error`) or never (`drop`); every
    other request served and, once served, recorded as (token, method, path, status)."""

    def __init__(self, mode: str) -> None:
        self.mode, self.cut, self.seen = mode, None, []

    async def __call__(self, request: web.Request, handler) -> web.StreamResponse:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token == self.cut and "/leases" in request.path:
            # a black hole (the client gives up, or hangs), or etcd's slow error
            await asyncio.sleep(3600 if self.mode == "drop" else 0.8)
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500,
                                      "reason": "InternalError", "message": "etcdserver: request timed out"},
                                     status=500)
        response = await handler(request)
        self.seen.append((token, request.method, request.path, response.status))
        return response


def kubeconfig(fake: KubeFake, path, token: str) -> str:
    fake.kubeconfig(path)
    cfg = yaml.safe_load(path.read_text())
    cfg["users"][0]["user"]["token"] = token
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("mode", ["error", "drop"])
def test_partitioned_leader_stops_before_the_follower_leads(api, mode):
    fake, cluster, d = api
    fake.intercept = part = Partition(mode)
    lease = f"kaito-{mode}"

    def start(token: str) -> Operator:
        return Operator(kubeconfig(fake, d / f"{mode}-{token}.kubeconfig", token), "--resync", "1",
                        "--leader-elect", "--lease-namespace", "default", "--lease-name", lease,
                        "--lease-duration", str(DURATION), log_path=d / f"{mode}-{token}.log").start()

    def holder() -> str:
        return ((cluster.get(LEASE, "Lease", lease) or {}).get("spec") or {}).get("holderIdentity") or ""

    a = start("op-a")
    b = None
    try:
        wait_for(lambda: holder().endswith(f"-{a.proc.pid}"), 30, "a leads")
        b = start("op-b")
        wait_for(lambda: any(t == "op-b" and "/leases/" in p for t, _, p, _ in list(part.seen)), 30, "b follows")
        cluster.create(inference(f"{mode}-0"))
        wait_for(lambda: cluster.list(NC, "NodeClaim", f"kaito.sh/workspace={mode}-0"), 30, "a reconciles")

        part.cut = "op-a"  # from now on a cannot renew; its other requests still land
        names, t0, led = [f"{mode}-0"], time.monotonic(), None
        while led is None or time.monotonic() - led < 2:  # work for both, before and after the takeover
            assert time.monotonic() - t0 < 30, "b never took the Lease"
            names.append(f"{mode}-{len(names)}")
            cluster.create(inference(names[-1]))
            if led is None and holder().endswith(f"-{b.proc.pid}"):
                led = time.monotonic()
            time.sleep(0.25)
        for name in names:  # the follower took over: every Workspace reconciled
            wait_for(lambda: cluster.list(NC, "NodeClaim", f"kaito.sh/workspace={name}"), 30, f"{name} reconciled")

        seen = list(part.seen)
        takeover = next(i for i, (t, m, p, code) in enumerate(seen)
                        if t == "op-b" and "/leases" in p and m in ("PUT", "POST") and code < 300)
        late = [(m, p) for t, m, p, code in seen[takeover:] if t == "op-a" and m != "GET" and code < 300]
        assert not late, f"the old leader wrote after the new one took the Lease: {late[:5]}"
        assert a.proc.wait(5) == 1 and "leader election lost" in a.log()
    finally:
        part.cut = None
        for op in (a, b):
            if op:
                op.kill()
