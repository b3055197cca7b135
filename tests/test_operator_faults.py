"""`kaito-operator run` under API faults (tests/kube_faults.py), a shortened benchmarks/operator_faults.py:
two operators (provisioning, and bring-your-own nodes) started while 5% of their requests are answered 500
(and 2% 429), a fifth of their conditional writes (the status writes: few here) 409, their watches closed
every 3 s and a fifth of those resumed answered 410. Inference, tuning, multi-node and bring-your-own-nodes
Workspaces and RAGEngines reach their end state (every condition True, the Event of their success once, each
NodeClaim and workload once), stay there, and are deleted with their NodeClaims; the retries back off,
bounded; and the requests stay within twice those of the same run without faults. And an outage longer than
the client's retries, while the operator starts and while resources are deleted, costs seconds after it ends."""

from __future__ import annotations

import dataclasses
import time

import pytest
from kube_fake import Faults
from kube_sim import WS
from kube_faults import FAULTS, Side, mix, scenario, summary, until

pytestmark = pytest.mark.timeout(300)
FAULTY = dataclasses.replace(FAULTS, conflict_rate=0.2, throttle_rate=0.02, watch_lifetime=3, gone_rate=0.2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 20 Workspaces and 2 RAGEngines without faults, then with them (fresh fakes and operators each)."""
    clean = scenario(tmp_path_factory.mktemp("clean"), 20, Faults(), timeout=60)
    faulty = scenario(tmp_path_factory.mktemp("faulty"), 20, FAULTY, timeout=60)
    print(f"\nwithout faults: ready in {clean.ready_s:.1f} s, deleted in {clean.deleted_s:.1f} s, "
          f"{clean.requests} requests\nwith faults: ready in {faulty.ready_s:.1f} s, deleted in "
          f"{faulty.deleted_s:.1f} s, {faulty.requests} requests, injected {faulty.injected}, {summary(faulty.retries)}")
    return clean, faulty


def test_every_resource_reaches_its_end_state_and_goes(runs):
    """scenario() waited (60 s at most) for each resource's end state and for nothing left once deleted."""
    _, faulty = runs
    assert faulty.injected.get("500", 0) >= 10 and faulty.injected.get("409", 0) >= 1, faulty.injected
    assert faulty.injected.get("closed", 0) >= 10 and faulty.injected.get("410", 0) >= 1, faulty.injected
    assert faulty.quiet  # at the end state, nothing is written
    assert faulty.ready_s < 30 and faulty.deleted_s < 20, (faulty.ready_s, faulty.deleted_s)


def test_retries_back_off_bounded(runs):
    _, faulty = runs
    delays = faulty.retries
    assert len(delays) >= 10
    assert min(delays) >= 0.05, summary(delays)  # backed off, never at once
    assert max(delays) <= 10, summary(delays)  # bounded (at 5%, rarely more than two failures in a row)


def test_requests_within_twice_the_fault_free_run(runs):
    clean, faulty = runs
    assert faulty.requests <= 2 * clean.requests, (clean.requests, faulty.requests)


def test_an_outage_longer_than_the_retries(tmp_path):
    """Every request of the operator answered 500 for 15 s (past the client's retries, about 12 s) as it
    starts, and again while its resources are deleted: each time it carries on within seconds of the API's
    return (kopf.TemporaryError with a short jittered backoff, not kopf's 60 s for an unexpected error)."""
    down = Faults(error_rate=1)
    side = Side.start(tmp_path, "outage", down, "--resync", "5")
    try:
        side.docs = mix("outage", 4)[0]  # inference, tuning, multi-node, RAGEngine
        for doc in side.docs:
            side.cluster.create(doc)
        time.sleep(15)
        side.fake.inject(Faults())

        def waiting() -> list[str]:
            side.play()
            return side.problems()

        ready = until(waiting, 40, "not at their end state")
        side.fake.inject(down)
        for doc in side.docs:
            side.cluster.delete(WS, doc["kind"], doc["metadata"]["name"])
        time.sleep(15)
        side.fake.inject(Faults())
        deleted = until(side.leftovers, 40, "not deleted")
        print(f"\nafter an outage at the start: ready in {ready:.1f} s; after one during deletion: deleted in "
              f"{deleted:.1f} s")
        assert ready < 20 and deleted < 20, (ready, deleted)
    finally:
        side.stop()
