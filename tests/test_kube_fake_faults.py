"""The faults the Kubernetes API fake (tests/kube_fake.py) injects on purpose: each test pins one, through the
real `kubernetes` client over HTTP (retrying nothing: urllib3 would retry a 429 by itself), and that they are
seeded, scoped to one client and changeable while the fake runs."""

from __future__ import annotations

import time

import pytest
from kube_fake import Faults, KubeFake
from kubernetes import client, watch

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def fake():
    f = KubeFake().start()
    yield f
    f.stop()


def api(fake: KubeFake, token: str) -> client.CoreV1Api:
    cfg = client.Configuration(host=fake.url, api_key={"authorization": f"Bearer {token}"})
    cfg.retries = False
    return client.CoreV1Api(client.ApiClient(cfg))


@pytest.fixture(scope="module")
def core(fake) -> client.CoreV1Api:
    return api(fake, "fake")


@pytest.fixture(autouse=True)
def clean(fake):
    yield
    fake.inject(None)


def cm(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"a": "1"}}


def statuses(core: client.CoreV1Api, n: int) -> list[int]:
    out = []
    for _ in range(n):
        try:
            core.list_namespaced_config_map("default")
            out.append(200)
        except client.ApiException as e:
            out.append(e.status)
    return out


def test_none_by_default(fake, core):
    assert fake.faults is None
    assert statuses(core, 50) == [200] * 50
    assert not fake.injected and not fake.trace


def test_500s_and_429s_at_their_rates(fake, core):
    fake.inject(Faults(error_rate=0.2, throttle_rate=0.1, seed=7, token="fake"))
    seen = statuses(core, 400)
    assert 50 <= seen.count(500) <= 110 and 20 <= seen.count(429) <= 65
    assert seen.count(200) == 400 - seen.count(500) - seen.count(429)
    assert fake.injected == {"500": seen.count(500), "429": seen.count(429)}
    assert [s for *_, s in fake.trace] == seen  # every request of the client traced, in order


def test_error_bodies_and_retry_after(fake, core):
    fake.inject(Faults(error_rate=1, token=None))
    with pytest.raises(client.ApiException) as e:
        core.read_namespace("default")
    assert e.value.status == 500 and '"reason": "InternalError"' in e.value.body
    fake.inject(Faults(throttle_rate=1, retry_after=3, token=None))
    with pytest.raises(client.ApiException) as e:
        core.create_namespaced_config_map("default", cm("throttled"))
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "3"
    assert '"retryAfterSeconds": 3' in e.value.body and '"reason": "TooManyRequests"' in e.value.body
    fake.inject(None)
    with pytest.raises(client.ApiException) as e:  # a fault answers in the server's place: nothing was written
        core.read_namespaced_config_map("throttled", "default")
    assert e.value.status == 404


def test_the_same_seed_the_same_faults(fake, core):
    runs = []
    for seed in (3, 3, 4):
        fake.inject(Faults(error_rate=0.3, seed=seed, token="fake"))
        runs.append(statuses(core, 60))
    assert runs[0] == runs[1] != runs[2]
    assert 500 in runs[0]


def test_only_the_faulted_client(fake, core):
    fake.inject(Faults(error_rate=1))  # the kubeconfig's token: the operator's requests
    assert statuses(core, 20) == [200] * 20
    assert not fake.injected and not fake.trace
    with pytest.raises(client.ApiException) as e:
        api(fake, "fake-token").list_namespaced_config_map("default")
    assert e.value.status == 500 and fake.injected["500"] == 1


def test_conflicts_on_writes_that_name_a_version(fake, core):
    made = core.create_namespaced_config_map("default", cm("guarded"))
    fake.inject(Faults(conflict_rate=1, token=None))
    stale = {**cm("guarded"), "data": {"a": "2"}}
    stale["metadata"]["resourceVersion"] = made.metadata.resource_version
    with pytest.raises(client.ApiException) as e:
        core.replace_namespaced_config_map("guarded", "default", stale)  # the version is current: injected
    assert e.value.status == 409 and '"reason": "Conflict"' in e.value.body
    with pytest.raises(client.ApiException) as e:
        core.patch_namespaced_config_map("guarded", "default", {"metadata": {"resourceVersion":
                                                                             made.metadata.resource_version}},
                                         _content_type="application/merge-patch+json")
    assert e.value.status == 409
    # writes without a precondition never conflict, creates and reads neither
    core.patch_namespaced_config_map("guarded", "default", {"data": {"a": "3"}},
                                     _content_type="application/merge-patch+json")
    core.create_namespaced_config_map("default", cm("guarded-2"))
    assert core.read_namespaced_config_map("guarded", "default").data == {"a": "3"}
    assert fake.injected == {"409": 2}


def test_latency(fake, core):
    fake.inject(Faults(latency=0.3, token=None))
    t0 = time.monotonic()
    core.list_namespaced_config_map("default")
    assert time.monotonic() - t0 >= 0.3
    fake.inject(None)  # changed while running
    t0 = time.monotonic()
    core.list_namespaced_config_map("default")
    assert time.monotonic() - t0 < 0.3


def test_watches_closed_after_their_lifetime(fake, core):
    fake.inject(Faults(watch_lifetime=1, token=None))
    t0 = time.monotonic()
    events = list(watch.Watch().stream(core.list_namespaced_config_map, "default", timeout_seconds=30,
                                       _request_timeout=20))
    assert 1 <= time.monotonic() - t0 < 5 and events  # the current objects as ADDED, then closed
    assert fake.injected["closed"] == 1
    fake.inject(Faults(watch_lifetime=60, token=None))  # the client's own timeout comes first: not counted
    list(watch.Watch().stream(core.list_namespaced_config_map, "default", timeout_seconds=1, _request_timeout=20))
    assert fake.injected["closed"] == 0


def test_410_when_a_watch_resumes_from_a_past_version(fake, core):
    first = core.create_namespaced_config_map("default", cm("versioned"))
    core.patch_namespaced_config_map("versioned", "default", {"data": {"a": "2"}},
                                     _content_type="application/merge-patch+json")
    fake.inject(Faults(gone_rate=1, token=None))
    with pytest.raises(client.ApiException) as e:  # the client raises the ERROR event's 410
        list(watch.Watch().stream(core.list_namespaced_config_map, "default", timeout_seconds=2,
                                  resource_version=first.metadata.resource_version))
    assert e.value.status == 410 and fake.injected["410"] == 1
    # from the newest version, or without one (the current objects), a watch is served
    latest = core.list_namespaced_config_map("default").metadata.resource_version
    assert list(watch.Watch().stream(core.list_namespaced_config_map, "default", timeout_seconds=1,
                                     resource_version=latest)) == []
    assert list(watch.Watch().stream(core.list_namespaced_config_map, "default", timeout_seconds=1))
    assert fake.injected["410"] == 1
