"""ModelMirror (operator/mirror.py): a hub model's weights downloaded once per namespace into a claim that every
Workspace of the model mounts. Rendering and validation without a cluster; then the operator against the
API-server fake, with the download Job played by running its own command against the fake Hub
(tests/hub_fake.py): one mirror for two Workspaces, its progress in its status and on /metrics through the pod
proxy, Ready when the Job succeeds, the Workspaces' pods then downloading nothing, and the mirror collected once
no Workspace uses it."""

from __future__ import annotations

import copy
import os
import subprocess

import httpx
import pytest
from helpers import BIN, free_port
from hub_fake import HubFake, files_of
from kaito.operator.api import MODEL_MIRROR_STORAGE_CLASS, MODEL_STREAMING, ModelMirror
from kaito.operator.manifests import ManifestError, parse
from kaito.operator.mirror import mirror_name, progress, render_mirror
from kaito.operator.parts import RenderOptions
from kaito.operator.render import render
from kaito.operator.validation import validate
from kube_fake import KubeFake
from kube_sim import WS, Cluster, Operator, example, inference, wait_for
from prometheus_client.parser import text_string_to_metric_families

PHI4 = "microsoft/phi-4"  # the hub repo of the phi-4 example Workspace (kube_sim.inference)
MIRRORS = RenderOptions(model_mirror=True, model_mirror_storage_class="azurefile-csi-premium")


def objects(doc: dict, opts: RenderOptions = MIRRORS) -> dict[str, dict]:
    return {o["kind"]: o for o in render(parse(doc), opts=opts)}


def weights_volume(statefulset: dict) -> dict:
    return next(v for v in statefulset["spec"]["template"]["spec"]["volumes"] if v["name"] == "weights")


def test_a_hub_models_workspaces_share_their_namespaces_mirror():
    a, b = objects(inference("a")), objects(inference("b"))
    mirror = a["ModelMirror"]
    assert mirror == b["ModelMirror"]  # the same object, whichever Workspace makes it
    assert mirror["metadata"]["name"] == mirror_name(PHI4, "default") and "namespace" not in mirror["metadata"]
    assert mirror["spec"] == {"mode": "Managed", "source": {"registry": "huggingface", "modelID": PHI4},
                              "storage": {"size": mirror["spec"]["storage"]["size"],
                                          "storageClassName": "azurefile-csi-premium"}, "jobNamespace": "default"}
    for objs in (a, b):
        sts = objs["StatefulSet"]
        assert weights_volume(sts) == {"name": "weights",
                                       "persistentVolumeClaim": {"claimName": mirror["metadata"]["name"]}}
        assert sts["metadata"]["labels"]["kaito.sh/modelmirror"] == mirror["metadata"]["name"]
        init = sts["spec"]["template"]["spec"]["initContainers"]
        assert [c["command"] for c in init] == [["kaito-presets", "download", "phi-4"]]  # waits, then verifies
    other = inference("c")
    other["metadata"]["namespace"] = "team-b"
    assert objects(other)["ModelMirror"]["metadata"]["name"] != mirror["metadata"]["name"]
    assert ModelMirror.model_validate(mirror).spec.storage.size.endswith("Gi")


def test_when_the_weights_come_from_elsewhere_there_is_no_mirror():
    off = objects(inference("a"), RenderOptions())
    assert "ModelMirror" not in off and weights_volume(off["StatefulSet"])["emptyDir"]
    assert "ModelMirror" not in objects(inference("a"), RenderOptions(model_mirror=True))  # no StorageClass
    named = inference("a")
    named["metadata"]["annotations"] = {MODEL_MIRROR_STORAGE_CLASS: "local-nvme"}
    assert objects(named, RenderOptions(model_mirror=True))["ModelMirror"]["spec"]["storage"][
        "storageClassName"] == "local-nvme"
    for opt_out in ({MODEL_STREAMING: "disabled"}, {"kaito.sh/use-local-weights": "true"}):
        doc = inference("a")
        doc["metadata"]["annotations"] = opt_out
        assert "ModelMirror" not in objects(doc)
    pvc = inference("a")
    pvc["inference"]["preset"]["presetOptions"] = {"modelWeightsPVC": "mine"}
    assert weights_volume(objects(pvc)["StatefulSet"])["persistentVolumeClaim"] == {"claimName": "mine"}
    packaged = example("kaito_workspace_phi_4.yaml")
    packaged["inference"]["preset"]["name"] = "smollm2-135m-instruct"  # weights from its package, in the image
    assert "ModelMirror" not in objects(packaged)


def test_the_opt_out_is_fixed_at_creation_as_upstreams():
    old, new = parse(inference("a")), inference("a")
    new["metadata"]["annotations"] = {MODEL_STREAMING: "disabled"}
    assert [str(e) for e in validate(parse(new), old=old)] == [
        "metadata.annotations[kaito.sh/model-streaming]: field is immutable"]


def test_a_mirror_is_a_claim_and_a_download_job_it_owns():
    doc = objects(inference("a"))["ModelMirror"]
    doc["metadata"]["uid"] = "u-1"
    claim, job = render_mirror(ModelMirror.model_validate(doc), MIRRORS)
    name = doc["metadata"]["name"]
    assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"]["namespace"] == "default"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == \
        "azurefile-csi-premium"
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "u-1" == job["metadata"]["ownerReferences"][0]["uid"]
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == ["kaito-presets", "download", PHI4, "--metrics-port", "5000"]
    assert pod["volumes"] == [{"name": "weights", "persistentVolumeClaim": {"claimName": name}}]
    static = ModelMirror.model_validate({**doc, "spec": {"mode": "Static"}})
    assert render_mirror(static, MIRRORS) == []


def test_mirrors_are_checked_as_upstream_checks_them():
    base = {"apiVersion": "kaito.sh/v1alpha1", "kind": "ModelMirror", "metadata": {"name": "phi-4.default"},
            "spec": {"source": {"registry": "huggingface", "modelID": PHI4}, "storage": {"size": "30Gi",
                                                                                     "storageClassName": "x"}}}
    assert validate(parse(base)) == []
    doc = copy.deepcopy(base)
    del doc["spec"]["storage"]["storageClassName"]
    assert [e.field for e in validate(parse(doc))] == ["spec.storage.storageClassName"]
    doc["spec"] = {"mode": "Static", "source": base["spec"]["source"]}
    assert [str(e) for e in validate(parse(doc))] == ["spec.source: must not be set for a Static mirror"]
    assert [e.field for e in validate(parse({**base, "spec": {}}))] == ["spec.source", "spec.storage"]
    for bad in ({"registry": "modelscope", "modelID": PHI4}, {"registry": "huggingface"}):
        with pytest.raises(ManifestError):
            parse({**base, "spec": {**base["spec"], "source": bad}})
    with pytest.raises(ManifestError):
        parse({**base, "spec": {**base["spec"], "storage": {"size": "thirty gigs", "storageClassName": "x"}}})
    changed = copy.deepcopy(base)
    changed["spec"]["storage"]["size"] = "40Gi"
    assert [str(e) for e in validate(parse(changed), old=parse(base))] == [
        "spec: ModelMirror spec is immutable; delete and recreate to change"]


def test_progress_is_read_from_the_downloads_metrics():
    from kaito.presets import weights
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(weights.metrics_collector({"org/m": (1536, 4096)}))
    text = generate_latest(registry).decode()
    assert progress(text, "org/m") == (1536, 4096)
    assert progress(text, "org/other") is None and progress("", "org/m") is None


# --- the operator ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(default_model_dir):
    with HubFake() as fake:
        fake.publish(PHI4, files_of(default_model_dir, skip=("kaito_model.json",)))
        yield fake


def run_job(command: list[str], claim: str, hub: HubFake, metrics_port: int | None = None) -> subprocess.Popen:
    """A container's command, run here as its pod would: HF_HOME on the claim, the Hub the fake."""
    argv = [str(BIN / command[0]), *command[1:]]
    if metrics_port is not None:
        argv[argv.index("--metrics-port") + 1] = str(metrics_port)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN",
                                                            "HF_HUB_CACHE")}
    env.update(HF_HOME=claim, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_PROGRESS_BARS="1")
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(360)
def test_one_download_for_two_workspaces_its_progress_and_its_end(tmp_path, hub):
    fake = KubeFake().start()
    metrics = free_port()
    op = None
    try:
        cluster = Cluster(fake.url)
        cluster.install_crds()
        op = Operator(fake.kubeconfig(tmp_path / "kubeconfig"), "--model-mirror", "--model-mirror-storage-class",
                      "azurefile-csi-premium", "--model-mirror-idle", "2", "--resync", "2", "--metrics-port",
                      str(metrics), log_path=tmp_path / "operator.log").start()
        for name in ("a", "b"):
            cluster.create(inference(name))
        name = mirror_name(PHI4, "default")
        mirrors = wait_for(lambda: cluster.list("kaito.sh/v1alpha1", "ModelMirror"), 60, "a ModelMirror")
        assert [m["metadata"]["name"] for m in mirrors] == [name]
        job = wait_for(lambda: cluster.get("batch/v1", "Job", f"{name}-download"), 30, "the download Job")
        assert cluster.get("v1", "PersistentVolumeClaim", name)["spec"]["accessModes"] == ["ReadWriteMany"]
        sets = wait_for(lambda: len(found := [s for s in (cluster.get("apps/v1", "StatefulSet", n) for n in "ab")
                                              if s]) == 2 and found, 30, "both StatefulSets", every=0.5)
        assert {weights_volume(s)["persistentVolumeClaim"]["claimName"] for s in sets} == {name}

        # the Job's pod: its own command, run here, held halfway through the weights
        claim = str(tmp_path / "claim")
        weights = hub.repos[PHI4].files["model.safetensors"]
        hub.held.clear()
        hub.hold[(PHI4, "model.safetensors")] = weights.size // 2
        port = free_port()
        download = run_job(job["spec"]["template"]["spec"]["containers"][0]["command"], claim, hub, port)
        cluster.pod(f"{name}-download-x1", {"job-name": f"{name}-download"}, {"phase": "Running",
                                                                              "podIP": "127.0.0.1"})
        fake.proxies[("default", f"{name}-download-x1")] = f"127.0.0.1:{port}"
        assert hub.held.wait(60), "the weights were never asked for"

        def halfway():
            st = cluster.get("kaito.sh/v1alpha1", "ModelMirror", name, None).get("status") or {}
            return st if 0 < (st.get("downloadedBytes") or 0) < (st.get("totalBytes") or 0) else None

        st = wait_for(halfway, 30, "the download's progress in the mirror's status", every=0.5)
        assert st["phase"] == "Pending" and st["totalBytes"] >= weights.size
        assert st["conditions"][0]["reason"] == "Downloading"
        scraped = {(s.name, s.labels.get("mirror")): s.value for f in text_string_to_metric_families(
            httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text) for s in f.samples}
        assert scraped[("kaito_model_mirror_size_bytes", name)] == st["totalBytes"]
        assert 0 < scraped[("kaito_model_mirror_downloaded_bytes", name)] < st["totalBytes"]
        hub.release.set()
        assert download.wait(120) == 0, download.stderr.read()
        cluster.patch_status("batch/v1", "Job", f"{name}-download", {"succeeded": 1})
        ready = wait_for(lambda: (m := cluster.get("kaito.sh/v1alpha1", "ModelMirror", name, None)).get(
            "status", {}).get("phase") == "Ready" and m, 30, "the mirror Ready", every=0.5)
        assert ready["status"]["downloadedBytes"] == ready["status"]["totalBytes"] == st["totalBytes"]
        assert ready["status"]["lastDownloadTime"]

        # each Workspace's pod (and each restart of one): its weights init container finds the copy complete
        before = {p: hub.downloads(PHI4, p) for p in hub.repos[PHI4].files}
        for sts in sets + sets[:1]:
            init = sts["spec"]["template"]["spec"]["initContainers"][0]
            done = run_job(init["command"], claim, hub)
            assert done.wait(120) == 0, done.stderr.read()
        assert {p: hub.downloads(PHI4, p) for p in hub.repos[PHI4].files} == before  # nothing fetched again

        # unused (the Workspaces and so their StatefulSets gone) for longer than --model-mirror-idle: collected
        for n in "ab":
            cluster.delete(WS, "Workspace", n)
        try:
            wait_for(lambda: not cluster.list("kaito.sh/v1alpha1", "ModelMirror"), 120, "the unused mirror deleted",
                     every=0.5)
        except (AssertionError, TimeoutError):
            left = [m.get("status") for m in cluster.list("kaito.sh/v1alpha1", "ModelMirror")]
            print("mirrors:", left, "workspaces:", [w["metadata"]["name"] for w in cluster.list(WS, "Workspace")],
                  "statefulsets:", [s["metadata"]["name"] for s in cluster.list("apps/v1", "StatefulSet")])
            raise
        wait_for(lambda: cluster.get("batch/v1", "Job", f"{name}-download") is None, 10, "its Job gone with it")
    except Exception:
        if op:
            print(op.log())
        raise
    finally:
        hub.release.set()
        if op:
            op.stop()
        fake.stop()


def test_the_crd_is_cluster_scoped_and_served_as_upstream_serves_it():
    from kaito.operator.crds import crd
    from kaito.operator.schemas import object_errors

    mm = crd("ModelMirror")
    assert object_errors(mm) == []
    assert mm["spec"]["scope"] == "Cluster" and [v["name"] for v in mm["spec"]["versions"]] == ["v1alpha1"]
    assert mm["spec"]["versions"][0]["storage"] and mm["spec"]["versions"][0]["subresources"] == {"status": {}}
