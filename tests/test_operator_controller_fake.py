"""Conformance of the Kubernetes API fake (tests/kube_fake.py) with kube-apiserver, for what the
operator uses: each test pins one behaviour, through the real `kubernetes` client over HTTP."""

from __future__ import annotations

import time

import kube_fake
import pytest
from kube_fake import KubeFake, decode, label_match
from kube_sim import Cluster
from kubernetes import client, watch
from kubernetes.dynamic.exceptions import ApiException, ConflictError, NotFoundError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def fake():
    f = KubeFake().start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def cluster(fake) -> Cluster:
    c = Cluster(fake.url)
    c.install_crds()
    return c


@pytest.fixture
def core(cluster) -> client.CoreV1Api:
    return client.CoreV1Api(cluster.api)


def cm(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": {"a": "1"}}


def test_create_is_201_and_duplicates_are_409(cluster, core):
    obj, code, _ = core.create_namespaced_config_map_with_http_info("default", cm("c1"))
    assert code == 201
    assert obj.metadata.uid and obj.metadata.resource_version and obj.metadata.creation_timestamp
    with pytest.raises(client.ApiException) as e:
        core.create_namespaced_config_map("default", cm("c1"))
    assert e.value.status == 409 and '"reason":"AlreadyExists"' in e.value.body.replace(" ", "")
    with pytest.raises(client.ApiException) as e:
        core.read_namespaced_config_map("missing", "default")
    assert e.value.status == 404
    with pytest.raises(client.ApiException) as e:
        core.create_namespaced_config_map("default", {"metadata": {}})
    assert e.value.status == 422
    made = core.create_namespaced_config_map("default", {"metadata": {"generateName": "gen-"}})
    assert made.metadata.name.startswith("gen-") and len(made.metadata.name) > 4


def test_generated_names_are_drawn_again_while_taken(core, monkeypatch):
    """As the API server since 1.31: a generated name that is taken is drawn again, not answered 409. With
    3 letters (243 names) 40 creates of one prefix collide at least once in 29 of 30 runs."""
    monkeypatch.setattr(kube_fake, "NAME_ALPHABET", "bcd")
    names = {core.create_namespaced_config_map("default", {"metadata": {"generateName": "few-"}}).metadata.name
             for _ in range(40)}
    assert len(names) == 40 and all(n[4:] and set(n[4:]) <= set("bcd") for n in names)


def test_resource_version_conflicts_and_noop_writes(cluster, core):
    first = core.create_namespaced_config_map("default", cm("c2"))
    second = core.patch_namespaced_config_map("c2", "default", {"data": {"a": "2"}},
                                              _content_type="application/merge-patch+json")
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    stale = cm("c2")
    stale["metadata"]["resourceVersion"] = first.metadata.resource_version
    with pytest.raises(client.ApiException) as e:
        core.replace_namespaced_config_map("c2", "default", stale)
    assert e.value.status == 409 and "Conflict" in e.value.body
    same = core.patch_namespaced_config_map("c2", "default", {"data": {"a": "2"}},
                                            _content_type="application/merge-patch+json")
    assert same.metadata.resource_version == second.metadata.resource_version  # nothing changed, no new version
    fresh = cm("c2")
    fresh["metadata"]["resourceVersion"] = second.metadata.resource_version
    fresh["data"] = {"a": "3"}
    assert core.replace_namespaced_config_map("c2", "default", fresh).data == {"a": "3"}
    jp = core.patch_namespaced_config_map("c2", "default", [{"op": "replace", "path": "/data/a", "value": "4"}],
                                          _content_type="application/json-patch+json")
    assert jp.data == {"a": "4"}


def test_label_selectors(cluster, core):
    core.create_namespaced_config_map("default", cm("l1", app="x", tier="web"))
    core.create_namespaced_config_map("default", cm("l2", app="y"))
    core.create_namespaced_config_map("default", cm("l3"))

    def names(sel: str) -> set[str]:
        return {i.metadata.name for i in core.list_namespaced_config_map("default", label_selector=sel).items
                if i.metadata.name in ("l1", "l2", "l3")}

    assert names("app=x") == {"l1"}
    assert names("app!=x") == {"l2", "l3"}
    assert names("app in (x, y)") == {"l1", "l2"}
    assert names("app notin (x)") == {"l2", "l3"}
    assert names("app") == {"l1", "l2"}
    assert names("!app") == {"l3"}
    assert names("app=x,tier=web") == {"l1"}
    assert not label_match("app in (x),tier=db", {"app": "x", "tier": "web"})


def test_watch_from_a_resource_version_replays_and_streams(cluster, core, fake):
    start = core.create_namespaced_config_map("default", cm("w1", watch="yes")).metadata.resource_version
    core.patch_namespaced_config_map("w1", "default", {"data": {"a": "9"}})
    core.create_namespaced_config_map("default", cm("w2", watch="yes"))
    core.delete_namespaced_config_map("w1", "default")
    events = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(
        core.list_namespaced_config_map, "default", label_selector="watch=yes", resource_version=start,
        timeout_seconds=1)]
    assert events == [("MODIFIED", "w1"), ("ADDED", "w2"), ("DELETED", "w1")]
    listed = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(
        core.list_namespaced_config_map, "default", label_selector="watch=yes", timeout_seconds=1)]
    assert listed == [("ADDED", "w2")]  # no version: the current objects


def test_watch_from_a_version_too_old_is_410(cluster, core, fake):
    core.create_namespaced_config_map("default", cm("old1"))
    fake.history_limit = 2
    try:
        for i in range(3):
            core.patch_namespaced_config_map("old1", "default", {"data": {"a": str(i + 10)}})
        with pytest.raises(client.ApiException) as e:
            for _ in watch.Watch().stream(core.list_namespaced_config_map, "default", resource_version="1",
                                          timeout_seconds=1):
                pass
        assert e.value.status == 410
    finally:
        fake.history_limit = 200_000


def test_dropped_watches_end(cluster, core, fake):
    """drop_watches() ends every watch, as an API server's restart does."""
    import threading

    seen: list[str] = []

    def follow() -> None:
        for e in watch.Watch().stream(core.list_namespaced_config_map, "default", label_selector="drop=yes",
                                      timeout_seconds=30):
            seen.append(e["object"].metadata.name)

    listener = threading.Thread(target=follow)
    listener.start()
    core.create_namespaced_config_map("default", cm("d1", drop="yes"))
    time.sleep(0.5)
    fake.call(fake.drop_watches)
    listener.join(5)
    assert not listener.is_alive() and seen == ["d1"]


def test_status_subresource_and_generation(cluster):
    ws = {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "s1", "namespace": "default"},
          "resource": {"instanceType": "Standard_NC24ads_A100_v4"}, "inference": {"preset": {"name": "phi-4"}},
          "status": {"state": "Ready"}}
    made = cluster.create(ws)
    assert "status" not in made and made["metadata"]["generation"] == 1  # status is not set on create
    r = cluster.r("kaito.sh/v1beta1", "Workspace")
    after = r.patch(body={"status": {"state": "X"}, "metadata": {"labels": {"a": "b"}}}, name="s1",
                    namespace="default", content_type="application/merge-patch+json").to_dict()
    assert "status" not in after and after["metadata"]["labels"] == {"a": "b"} and after["metadata"]["generation"] == 1
    st = r.status.patch(body={"status": {"state": "Pending"}, "resource": {"count": 5}}, name="s1",
                        namespace="default", content_type="application/merge-patch+json").to_dict()
    assert st["status"] == {"state": "Pending"} and "count" not in st["resource"] and st["metadata"]["generation"] == 1
    spec = r.patch(body={"resource": {"count": 2}}, name="s1", namespace="default",
                   content_type="application/merge-patch+json").to_dict()
    assert spec["metadata"]["generation"] == 2 and spec["status"] == {"state": "Pending"}


def test_finalizers_hold_deletion(cluster, core):
    body = cm("f1")
    body["metadata"]["finalizers"] = ["example.com/hold"]
    core.create_namespaced_config_map("default", body)
    core.delete_namespaced_config_map("f1", "default")
    held = core.read_namespaced_config_map("f1", "default")
    assert held.metadata.deletion_timestamp is not None
    with pytest.raises(client.ApiException) as e:
        core.patch_namespaced_config_map("f1", "default", {"metadata": {"finalizers": ["example.com/hold", "x/y"]}})
    assert e.value.status == 422
    core.patch_namespaced_config_map("f1", "default", {"metadata": {"finalizers": None}},
                                     _content_type="application/merge-patch+json")
    with pytest.raises(client.ApiException) as e:
        core.read_namespaced_config_map("f1", "default")
    assert e.value.status == 404


def test_owner_references_cascade(cluster, core):
    owner = core.create_namespaced_config_map("default", cm("owner"))
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid, "controller": True}
    for name in ("dep1", "dep2"):
        body = cm(name)
        body["metadata"]["ownerReferences"] = [ref]
        core.create_namespaced_config_map("default", body)
    grand = cm("grand")
    dep1 = core.read_namespaced_config_map("dep1", "default")
    grand["metadata"]["ownerReferences"] = [{**ref, "name": "dep1", "uid": dep1.metadata.uid}]
    core.create_namespaced_config_map("default", grand)
    core.delete_namespaced_config_map("owner", "default")
    left = {i.metadata.name for i in core.list_namespaced_config_map("default").items}
    assert not {"owner", "dep1", "dep2", "grand"} & left
    owner = core.create_namespaced_config_map("default", cm("owner2"))
    body = cm("orphan")
    body["metadata"]["ownerReferences"] = [{**ref, "name": "owner2", "uid": owner.metadata.uid}]
    core.create_namespaced_config_map("default", body)
    core.delete_namespaced_config_map("owner2", "default", propagation_policy="Orphan")
    assert not core.read_namespaced_config_map("orphan", "default").metadata.owner_references


def test_discovery_and_custom_resources(cluster, fake):
    import httpx

    res = httpx.get(f"{fake.url}/apis/kaito.sh/v1beta1").json()
    names = {r["name"] for r in res["resources"]}
    assert {"workspaces", "workspaces/status", "ragengines", "ragengines/status"} <= names
    assert httpx.get(f"{fake.url}/apis/nothing.example/v1").status_code == 404
    assert httpx.get(f"{fake.url}/version").json()["major"] == "1"
    with pytest.raises(NotFoundError):
        cluster.r("kaito.sh/v1beta1", "Workspace").get(name="nope", namespace="default")
    nc = cluster.create({"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim", "metadata": {"name": "nc1"}})
    assert "namespace" not in nc["metadata"]  # cluster scoped
    with pytest.raises(ConflictError):
        cluster.create({"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim", "metadata": {"name": "nc1"}})


def test_scale_subresource(cluster, fake):
    """A CRD's scale subresource (the InferenceSet's, as kubectl scale and the HPA use it): GET gives an
    autoscaling/v1 Scale from the CRD's paths; PATCH and PUT set spec.replicas (a new generation); a
    negative count is 422; kinds without one answer 404."""
    import httpx

    names = {r["name"] for r in httpx.get(f"{fake.url}/apis/kaito.sh/v1beta1").json()["resources"]}
    assert "inferencesets/scale" in names and "workspaces/scale" not in names
    cluster.create({"apiVersion": "kaito.sh/v1beta1", "kind": "InferenceSet", "metadata": {"name": "sc1"},
                    "spec": {"replicas": 2, "labelSelector": {"matchLabels": {"a": "b"}},
                             "template": {"inference": {"preset": {"name": "phi-4"}}}}})
    cluster.patch_status("kaito.sh/v1beta1", "InferenceSet", "sc1", {"replicas": 2, "selector": "x=sc1"})
    scale = cluster.r("kaito.sh/v1beta1", "InferenceSet").scale
    got = scale.get(name="sc1", namespace="default").to_dict()
    assert got["kind"] == "Scale" and got["spec"] == {"replicas": 2}
    assert got["status"] == {"replicas": 2, "selector": "x=sc1"}
    before = cluster.get("kaito.sh/v1beta1", "InferenceSet", "sc1")["metadata"]["generation"]
    patched = scale.patch(body={"spec": {"replicas": 3}}, name="sc1", namespace="default",
                          content_type="application/merge-patch+json").to_dict()
    assert patched["spec"]["replicas"] == 3
    obj = cluster.get("kaito.sh/v1beta1", "InferenceSet", "sc1")
    assert obj["spec"]["replicas"] == 3 and obj["metadata"]["generation"] == before + 1
    got["spec"]["replicas"] = 1
    got["metadata"]["resourceVersion"] = obj["metadata"]["resourceVersion"]
    assert scale.replace(body=got, name="sc1", namespace="default").to_dict()["spec"]["replicas"] == 1
    with pytest.raises(ApiException) as e:
        scale.patch(body={"spec": {"replicas": -1}}, name="sc1", namespace="default",
                    content_type="application/merge-patch+json")
    assert e.value.status == 422
    assert httpx.get(f"{fake.url}/apis/kaito.sh/v1beta1/namespaces/default/workspaces/x/scale").status_code == 404


# --- server-side apply ---------------------------------------------------------------------------------------


def sts(name: str, **labels: str) -> dict:
    """A StatefulSet as kaito applies one: an adapter init container and a server container."""
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name, "namespace": "default",
                                                                         "labels": labels},
            "spec": {"replicas": 1, "template": {"spec": {"initContainers": [{"name": "adapter", "image": "a:1"}],
                                                          "containers": [{"name": "main", "image": "m:1"}]}}}}


def owned(obj: dict, manager: str, operation: str = "Apply", sub: str = "") -> set[tuple[str, ...]]:
    """The fields `manager` owns in an object, from its managedFields."""
    return next((decode(e["fieldsV1"]) for e in obj["metadata"].get("managedFields") or []
                 if (e["manager"], e["operation"], e.get("subresource", "")) == (manager, operation, sub)), set())


def apply(cluster, body: dict, manager: str = "kaito", force: bool = True) -> dict:
    res = cluster.r(body["apiVersion"], body["kind"])
    return res.server_side_apply(body=body, namespace=body["metadata"].get("namespace"), field_manager=manager,
                                 force_conflicts=force).to_dict()


def test_apply_creates_and_removes_what_is_no_longer_applied(cluster, fake):
    """An apply creates a missing object (authorized as a create too); applying it again changes nothing (no
    new resourceVersion); fields the manager stops applying go, unless another manager set them."""
    body = sts("ssa-1", app="x", tier="gpu")
    fake.audit.clear()
    cluster.api.configuration.api_key = {"authorization": f"Bearer {fake.audit_token}"}
    try:
        made = apply(cluster, body)
    finally:
        cluster.api.configuration.api_key = {"authorization": "Bearer fake"}
    assert {("patch", "apps", "statefulsets"), ("create", "apps", "statefulsets")} <= fake.audit
    assert made["metadata"]["uid"] and made["spec"]["replicas"] == 1
    assert {("spec", "replicas"), ("metadata", "labels", "tier"), ("spec", "template", "spec", "initContainers")} <= owned(
        made, "kaito")
    rv = fake.rv
    assert apply(cluster, body)["metadata"]["resourceVersion"] == made["metadata"]["resourceVersion"] and fake.rv == rv
    cluster.r("apps/v1", "StatefulSet").patch(body={"metadata": {"labels": {"extra": "kept"}}}, name="ssa-1",
                                              namespace="default", content_type="application/merge-patch+json")
    del body["spec"]["template"]["spec"]["initContainers"]  # e.g. a Workspace's adapters removed
    del body["metadata"]["labels"]["tier"]
    after = apply(cluster, body)
    assert "initContainers" not in after["spec"]["template"]["spec"]
    assert after["metadata"]["labels"] == {"app": "x", "extra": "kept"}  # the other manager's label stays
    assert ("spec", "template", "spec", "initContainers") not in owned(after, "kaito")
    with pytest.raises(ApiException) as e:
        cluster.r("apps/v1", "StatefulSet").server_side_apply(body=body, namespace="default")  # no fieldManager
    assert e.value.status == 422


def test_a_statefulsets_fixed_fields_do_not_change(cluster):
    """Its replicas and pod template change; its claim templates (or service name) do not: 422, as the API
    server answers, whether applied or patched."""
    made = apply(cluster, sts("ssa-fixed"))
    body = sts("ssa-fixed")
    body["spec"]["replicas"] = 2
    body["spec"]["template"]["spec"]["containers"][0]["image"] = "m:2"
    assert apply(cluster, body)["spec"]["replicas"] == 2
    body["spec"]["volumeClaimTemplates"] = [{"metadata": {"name": "weights"}, "spec": {"accessModes": ["ReadWriteOnce"]}}]
    with pytest.raises(ApiException) as e:
        apply(cluster, body)
    assert e.value.status == 422 and "spec: Forbidden: updates to statefulset spec" in e.value.body
    with pytest.raises(ApiException) as e:
        cluster.r("apps/v1", "StatefulSet").patch(body={"spec": {"serviceName": "other"}}, name="ssa-fixed",
                                                  namespace="default", content_type="application/merge-patch+json")
    assert e.value.status == 422
    assert "volumeClaimTemplates" not in cluster.get("apps/v1", "StatefulSet", "ssa-fixed")["spec"]
    assert made["metadata"]["uid"] == cluster.get("apps/v1", "StatefulSet", "ssa-fixed")["metadata"]["uid"]


def test_apply_conflicts_with_another_manager_unless_forced(cluster):
    apply(cluster, sts("ssa-2"))
    theirs = sts("ssa-2")
    theirs["spec"]["replicas"] = 3
    with pytest.raises(ConflictError) as e:
        apply(cluster, theirs, manager="autoscaler", force=False)
    assert e.value.status == 409 and "kaito" in e.value.body and ".spec.replicas" in e.value.body
    same = sts("ssa-2")  # the same value is no conflict: both own it
    assert apply(cluster, same, manager="autoscaler", force=False)["spec"]["replicas"] == 1
    taken = apply(cluster, theirs, manager="autoscaler", force=True)
    assert taken["spec"]["replicas"] == 3
    assert ("spec", "replicas") in owned(taken, "autoscaler") and ("spec", "replicas") not in owned(taken, "kaito")
    back = apply(cluster, sts("ssa-2"))  # kaito forces it back
    assert back["spec"]["replicas"] == 1 and ("spec", "replicas") in owned(back, "kaito")


def test_other_writes_take_the_fields_they_change(cluster):
    """A merge patch (an Update) owns what it changes, taken from the applier; a removal takes a field from
    everyone; a status write is an entry of its own; a later apply that changes them back conflicts."""
    made = apply(cluster, sts("ssa-3", app="x"))
    res = cluster.r("apps/v1", "StatefulSet")
    edited = res.patch(body={"spec": {"replicas": 5}, "metadata": {"labels": {"app": None}}}, name="ssa-3",
                       namespace="default", content_type="application/merge-patch+json",
                       field_manager="kubectl-edit").to_dict()
    assert ("spec", "replicas") in owned(edited, "kubectl-edit", "Update")
    mine = owned(edited, "kaito")
    assert ("spec", "replicas") not in mine and ("metadata", "labels", "app") not in mine
    assert mine < owned(made, "kaito")  # what an operator compares to see that its object was edited
    status = res.status.patch(body={"status": {"readyReplicas": 1}}, name="ssa-3", namespace="default",
                              content_type="application/merge-patch+json").to_dict()
    assert owned(status, "OpenAPI-Generator", "Update", "status") == {("status", "readyReplicas")}
    assert owned(status, "kaito") == mine  # untouched by the status write
    with pytest.raises(ConflictError):
        apply(cluster, sts("ssa-3", app="x"), force=False)
    assert apply(cluster, sts("ssa-3", app="x"))["spec"]["replicas"] == 1
