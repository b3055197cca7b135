"""What resources become: golden files per example manifest, every rendered object checked against
the official Kubernetes schemas, the CRDs, and the `kaito-operator` render/crds/validate commands.

Regenerate the golden files after an intended change: KAITO_UPDATE_GOLDEN=1 pytest tests/test_operator_render.py
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run_cli
from kaito.operator.crds import crds, resource_schema
from kaito.operator.manifests import dump_yaml, load, loads
from kaito.operator.parts import RenderOptions
from kaito.operator.render import render
from kaito.operator.schemas import object_errors
from kaito.presets import InferenceConfig, estimate, get_model, get_sku

EXAMPLES = sorted((REPO / "operator" / "examples").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden" / "operator"


def rendered(path: Path) -> list[dict]:
    m = load(path)
    return [obj for res in m.resources for obj in render(res, lambda kind, name: m.find(kind, name))]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def test_there_are_enough_examples():
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_golden(path):
    text = dump_yaml(rendered(path))
    golden = GOLDEN / f"{path.stem}.yaml"
    if os.environ.get("KAITO_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"no golden file {golden}: run with KAITO_UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"{path.name} renders differently from {golden.name}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_rendered_object_passes_the_kubernetes_schemas(path):
    objects = rendered(path)
    assert objects
    for obj in objects:
        assert object_errors(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_fit_the_generated_crd_schema(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc["kind"] in ("Workspace", "RAGEngine"):
            assert object_errors(doc) == []
        else:  # the ConfigMaps, Secrets and PVCs beside them are valid Kubernetes objects too
            assert doc["kind"] == "Secret" or object_errors(doc) == []


def test_schema_checks_catch_mistakes():
    objects = rendered(REPO / "operator" / "examples" / "kaito_workspace_phi_4.yaml")
    sts = copy.deepcopy(by_kind(objects, "StatefulSet")[0])
    sts["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000"
    sts["spec"]["replica"] = 1
    errors = object_errors(sts)
    assert any("containerPort: '5000' is not of type 'integer'" in e for e in errors), errors
    assert any("'replica' was unexpected" in e for e in errors), errors
    claim = copy.deepcopy(by_kind(objects, "NodeClaim")[0])
    claim["spec"]["taints"][0]["effect"] = "Sometimes"
    claim["spec"]["resources"]["requests"]["storage"] = "lots"
    errors = object_errors(claim)
    assert any("taints.0.effect" in e and "Sometimes" in e for e in errors), errors
    assert any("storage" in e for e in errors), errors
    bad_ws = {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "x"},
              "resource": {"count": "two"}}
    assert any("count" in e for e in object_errors(bad_ws))


def test_single_node_inference():
    objects = rendered(REPO / "operator" / "examples" / "kaito_workspace_phi_4.yaml")
    assert [o["kind"] for o in objects] == ["NodeClaim", "Service", "Service", "StatefulSet"]
    sts = by_kind(objects, "StatefulSet")[0]
    est = estimate(get_model("phi-4"), get_sku("Standard_NC24ads_A100_v4"))
    assert sts["spec"]["replicas"] == est.node_count == 1
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"][:4] == ["kaito-serve", "--preset", "phi-4", "--backend"]
    assert "--instance-type" in c["command"] and "Standard_NC24ads_A100_v4" in c["command"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= est.readiness_timeout_s
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"} in pod["tolerations"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "apps", "operator": "In", "values": ["phi-4"]}]}]
    svc, headless = by_kind(objects, "Service")
    assert svc["spec"]["ports"][0]["port"] == 80 and svc["spec"]["ports"][0]["targetPort"] == 5000
    assert headless["spec"]["clusterIP"] == "None"
    claim = by_kind(objects, "NodeClaim")[0]
    assert claim["spec"]["resources"]["requests"]["storage"] == f"{est.disk_gib}Gi"
    assert claim["metadata"]["labels"]["apps"] == "phi-4"


def test_multi_node_inference_uses_vllms_multi_node_mode_and_the_estimator():
    objects = rendered(REPO / "operator" / "examples" / "kaito_workspace_llama-3.3_70b_instruct.yaml")
    sts = by_kind(objects, "StatefulSet")[0]
    assert sts["spec"]["replicas"] == 2 and len(by_kind(objects, "NodeClaim")) == 2
    c = sts["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(c["command"])
    assert c["command"][0] == "kaito-serve" and "--node-count 2" in command  # the same command in every pod
    leader = "workspace-llama-3-3-70b-instruct-0.workspace-llama-3-3-70b-instruct-headless.default.svc.cluster.local"
    assert f"--leader-address {leader}" in command
    rank = next(e for e in c["env"] if e["name"] == "KAITO_NODE_RANK")
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"  # every pod answers /health, workers too
    assert {p["containerPort"] for p in c["ports"]} == {5000, 29500, 29501}
    headless = next(s for s in by_kind(objects, "Service") if s["spec"].get("clusterIP") == "None")
    assert {p["port"] for p in headless["spec"]["ports"]} == {5000, 29500, 29501}
    args = sts["spec"]["template"]["metadata"]["annotations"]["kaito.sh/engine-args"]
    assert "--pipeline-parallel-size 2" in args and "--distributed-executor-backend mp --nnodes 2" in args
    assert "--max-model-len 16384" in args  # from the ConfigMap
    svc = next(s for s in by_kind(objects, "Service") if "clusterIP" not in s["spec"])
    assert svc["spec"]["selector"]["apps.kubernetes.io/pod-index"] == "0"
    env = sts["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}} in env


def test_preferred_nodes_need_no_nodeclaim():
    doc = yaml.safe_load((REPO / "operator" / "examples" / "kaito_workspace_llama-3.3_70b_instruct.yaml").read_text()
                         .split("---\n")[-1])
    doc["resource"]["preferredNodes"] = ["gpu-node-1"]
    m = load(REPO / "operator" / "examples" / "kaito_workspace_llama-3.3_70b_instruct.yaml")
    objects = render(loads(yaml.safe_dump(doc)).resources[0], lambda kind, name: m.find(kind, name))
    assert len(by_kind(objects, "NodeClaim")) == 1 and by_kind(objects, "StatefulSet")[0]["spec"]["replicas"] == 2


def test_the_parsed_inference_config_is_what_kaito_serve_reads():
    objects = rendered(REPO / "operator" / "examples" / "kaito_workspace_custom_config.yaml")
    cm = by_kind(objects, "ConfigMap")[0]
    assert cm["metadata"]["name"] == "workspace-deepseek-r1-distill-qwen-14b-inference-config"
    text = cm["data"]["inference_config.yaml"]
    config = InferenceConfig.parse(text)  # the parser kaito-serve --config uses
    assert config.vllm["max-model-len"] == 131072 and config.max_probe_steps == 6  # upstream's key kept
    volumes = by_kind(objects, "StatefulSet")[0]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": cm["metadata"]["name"]}} in volumes


def test_adapters_are_mounted():
    objects = rendered(REPO / "operator" / "examples" / "kaito_workspace_falcon_7b_with_adapters.yaml")
    pod = by_kind(objects, "StatefulSet")[0]["spec"]["template"]["spec"]
    # the adapter image is read by kaito's own image, nothing in it runs; its pull secret goes to the puller
    weights, init = pod["initContainers"]  # the model's weights first, then the adapter
    assert weights["command"] == ["kaito-presets", "download", "falcon-7b"]
    assert init["image"] == pod["containers"][0]["image"] == RenderOptions().image("kaito-serve")
    assert init["command"] == ["kaito-presets", "pull", "myregistry.azurecr.io/adapters/falcon-7b-adapter:0.0.1",
                               "/mnt/adapter/falcon-7b-adapter", "--auth", "/mnt/pull-secrets/acr-pull/config.json"]
    assert {"name": "pull-secret-acr-pull", "mountPath": "/mnt/pull-secrets/acr-pull", "readOnly": True} in init[
        "volumeMounts"]
    assert {"name": "pull-secret-acr-pull", "secret": {"secretName": "acr-pull", "items": [
        {"key": ".dockerconfigjson", "path": "config.json"}]}} in pod["volumes"]
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/mnt/adapter", "/mnt/adapter/falcon-7b-support"} <= mounts
    assert "--adapters-dir" in pod["containers"][0]["command"]
    assert "imagePullSecrets" not in pod  # the kubelet pulls kaito's images only


def test_hub_weights_are_fetched_by_an_init_container(tmp_path):
    """The hub's weights come before kaito-serve starts (not counted against its startup probe), into the
    weights volume with the access token; not for weights on the node or in the image."""
    objects = rendered(REPO / "operator" / "examples" / "kaito_workspace_phi_4.yaml")
    pod = by_kind(objects, "StatefulSet")[0]["spec"]["template"]["spec"]
    weights = pod["initContainers"][0]
    assert weights["name"] == "weights" and weights["image"] == RenderOptions().image("kaito-serve")
    assert weights["command"] == ["kaito-presets", "download", "phi-4"]
    assert weights["volumeMounts"] == [{"name": "weights", "mountPath": "/workspace/weights"}]
    assert {"name": "HF_HOME", "value": "/workspace/weights"} in weights["env"]
    doc = yaml.safe_load((REPO / "operator" / "examples" / "kaito_workspace_phi_4.yaml").read_text())
    doc["metadata"]["annotations"] = {"kaito.sh/use-local-weights": "true"}
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(doc))
    assert "initContainers" not in by_kind(rendered(tmp_path / "local.yaml"), "StatefulSet")[0]["spec"]["template"][
        "spec"]


def test_a_weights_storage_class_gives_each_pod_a_claim_of_its_own(tmp_path):
    """With a weights StorageClass (the operator's, or the Workspace's annotation) a serving pod downloads onto
    a claim of its own (a restart finds the weights there) that goes with the Workspace; a ModelMirror, the
    user's PVC or weights on the node come first; without one, an emptyDir."""
    path = REPO / "operator" / "examples" / "kaito_workspace_phi_4.yaml"
    m = load(path)

    def statefulset(doc: dict, **opts) -> dict:
        res = loads(yaml.safe_dump(doc)).resources[0]
        return by_kind(render(res, lambda kind, name: m.find(kind, name), RenderOptions(**opts)), "StatefulSet")[0]

    doc = yaml.safe_load(path.read_text())
    sts = statefulset(doc, weights_storage_class="managed-csi-premium")
    claim = sts["spec"]["volumeClaimTemplates"][0]
    disk = estimate(get_model("phi-4"), get_sku("Standard_NC24ads_A100_v4")).disk_gib
    assert claim == {"metadata": {"name": "weights"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "storageClassName": "managed-csi-premium",
        "resources": {"requests": {"storage": f"{disk}Gi"}}}}
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Delete", "whenScaled": "Delete"}
    pod = sts["spec"]["template"]["spec"]
    assert "weights" not in {v["name"] for v in pod["volumes"]}  # the claim is the volume
    assert {"name": "weights", "mountPath": "/workspace/weights"} in pod["initContainers"][0]["volumeMounts"]
    assert object_errors(sts) == []
    doc["metadata"]["annotations"] = {"kaito.sh/weights-storage-class": "local-nvme"}
    assert statefulset(doc)["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "local-nvme"
    mirrored = statefulset(doc, model_mirror=True, model_mirror_storage_class="azurefile-csi")
    assert "volumeClaimTemplates" not in mirrored["spec"]
    doc["metadata"]["annotations"] = {"kaito.sh/use-local-weights": "true"}
    local = statefulset(doc, weights_storage_class="managed-csi")
    assert "volumeClaimTemplates" not in local["spec"] and "weights" in {
        v["name"] for v in local["spec"]["template"]["spec"]["volumes"]}
    plain = statefulset(yaml.safe_load(path.read_text()))
    assert "volumeClaimTemplates" not in plain["spec"]
    assert {"name": "weights", "emptyDir": {"sizeLimit": f"{disk}Gi"}} in plain["spec"]["template"]["spec"]["volumes"]


def test_embedding_model_image_is_pulled_by_kaito_rag(tmp_path):
    doc = yaml.safe_load((REPO / "operator" / "examples" / "kaito_ragengine_phi_3.yaml").read_text())
    doc["spec"]["embedding"]["local"] = {"image": "myregistry.azurecr.io/embeddings/bge:1", "imagePullSecret": "acr"}
    (tmp_path / "rag.yaml").write_text(yaml.safe_dump(doc))
    pod = by_kind(rendered(tmp_path / "rag.yaml"), "Deployment")[0]["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert init["image"] == pod["containers"][0]["image"] == RenderOptions().image("kaito-rag")
    assert init["command"] == ["kaito-presets", "pull", "myregistry.azurecr.io/embeddings/bge:1", "/mnt/embedding",
                               "--auth", "/mnt/pull-secrets/acr/config.json"]
    assert "imagePullSecrets" not in pod
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["LOCAL_EMBEDDING_MODEL_ID"] == "/mnt/embedding"


def test_tuning_jobs():
    objects = rendered(REPO / "operator" / "examples" / "kaito_workspace_tuning_phi_3.yaml")
    job = by_kind(objects, "Job")[0]
    pod = job["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["data-downloader"]
    tuner = pod["containers"][0]  # kaito-tune pushes the adapter itself, with the push secret as Docker config
    assert tuner["name"] == "kaito-tune" and tuner["command"][-2:] == ["--push", "myregistry.azurecr.io/adapters/tuned-adapter:0.0.1"]
    assert {"name": "DOCKER_CONFIG", "value": "/mnt/push-secret"} in tuner["env"]
    assert {"name": "push-secret", "mountPath": "/mnt/push-secret", "readOnly": True} in tuner["volumeMounts"]
    config = by_kind(objects, "ConfigMap")[0]
    assert "load_in_4bit: true" in config["data"]["training_config.yaml"]  # qlora default
    pvc = rendered(REPO / "operator" / "examples" / "kaito_workspace_tuning_phi_3_with_pvc_volume.yaml")
    pod = by_kind(pvc, "Job")[0]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "pvc-azurefile-input"
    assert volumes["results"]["persistentVolumeClaim"]["claimName"] == "pvc-azurefile-output"
    assert pod["containers"][0]["command"][:3] == ["kaito-tune", "--preset", "phi-3-mini-128k-instruct"]
    image = rendered(REPO / "operator" / "examples" / "kaito_workspace_tuning_falcon_7b_image.yaml")
    assert not by_kind(image, "ConfigMap")  # the user's ConfigMap is used
    pod = by_kind(image, "Job")[0]["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["image"] == RenderOptions().image("kaito-tune")
    assert pod["initContainers"][0]["command"][:4] == ["kaito-presets", "pull",
                                                       "myregistry.azurecr.io/datasets/dolly-15k:0.1.0", "/mnt/data"]
    assert {"name": "config", "configMap": {"name": "falcon-lora-params"}} in pod["volumes"]



def test_gated_tuning_preset_gets_the_token(tmp_path):
    from kaito.operator.plan import model_access_secret

    doc = yaml.safe_load((REPO / "operator" / "examples" / "kaito_workspace_tuning_phi_3.yaml").read_text())
    doc["tuning"]["preset"]["presetOptions"] = {"modelAccessSecret": "hf-token"}
    (tmp_path / "ws.yaml").write_text(yaml.safe_dump(doc))
    m = load(tmp_path / "ws.yaml")
    assert model_access_secret(m.resources[0]) == "hf-token"  # what the local runner reads too
    env = by_kind(rendered(tmp_path / "ws.yaml"), "Job")[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}} in env


def test_ragengine_environment():
    objects = rendered(REPO / "operator" / "examples" / "kaito_ragengine_remote_embedding.yaml")
    dep = by_kind(objects, "Deployment")[0]
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EMBEDDING_SOURCE_TYPE"]["value"] == "remote"
    assert env["REMOTE_EMBEDDING_URL"]["value"] == "https://api.openai.com/v1/embeddings"
    assert env["LLM_INFERENCE_URL"]["value"] == "http://workspace-phi-4/v1"
    assert env["LLM_CONTEXT_WINDOW"]["value"] == "16384"
    assert env["LLM_ACCESS_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "llm-key"
    assert env["DEFAULT_VECTOR_DB_PERSIST_DIR"]["value"] == "/mnt/index/ragengine-remote"  # the volume's <name> folder
    local = rendered(REPO / "operator" / "examples" / "kaito_ragengine_phi_3.yaml")
    env = {e["name"]: e for e in by_kind(local, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LOCAL_EMBEDDING_MODEL_ID"]["value"] == "BAAI/bge-small-en-v1.5"


def test_render_is_pure_and_owner_references_follow_the_uid():
    path = REPO / "operator" / "examples" / "kaito_workspace_phi_4.yaml"
    assert rendered(path) == rendered(path)
    doc = yaml.safe_load(path.read_text())
    doc["metadata"]["uid"] = "1234"
    objects = render(loads(yaml.safe_dump(doc)).resources[0])
    owned = [o for o in objects if o["kind"] != "NodeClaim"]
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == "1234" for o in owned)


def test_crds():
    for crd in crds():
        assert object_errors(crd) == []
    ws, rag, *_ = crds()  # the InferenceSet's: tests/test_inferenceset.py; the ModelMirror's: tests/test_model_mirror.py
    assert ws["spec"]["names"]["shortNames"] == ["wk", "wks"]
    v1beta1 = ws["spec"]["versions"][0]
    assert v1beta1["name"] == "v1beta1" and v1beta1["storage"] and v1beta1["subresources"] == {"status": {}}
    assert [c["name"] for c in v1beta1["additionalPrinterColumns"]] == [
        "Instance", "ResourceReady", "InferenceReady", "JobStarted", "WorkspaceSucceeded", "Age"]
    props = resource_schema("Workspace")["properties"]
    assert set(props) >= {"resource", "inference", "tuning", "status"}
    assert props["inference"]["properties"]["template"]["x-kubernetes-preserve-unknown-fields"] is True
    assert "$ref" not in json.dumps(ws) and "anyOf" not in json.dumps(ws)
    assert set(rag["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]) >= {
        "compute", "embedding", "inferenceService", "storage"}


def test_cli_render_crds_validate(tmp_path):
    path = REPO / "operator" / "examples" / "kaito_workspace_phi_4.yaml"
    done = run_cli("kaito-operator", "render", "-f", str(path))
    assert done.returncode == 0, done.stderr
    assert list(yaml.safe_load_all(done.stdout)) == rendered(path)
    as_json = run_cli("kaito-operator", "render", "-f", str(path), "-o", "json")
    assert json.loads(as_json.stdout)["kind"] == "List"
    done = run_cli("kaito-operator", "crds")
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(done.stdout)] == [
        "workspaces.kaito.sh", "ragengines.kaito.sh", "inferencesets.kaito.sh", "modelmirrors.kaito.sh"]
    assert run_cli("kaito-operator", "validate", "-f", str(path)).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("phi-4\n", "phi-5\n").replace("Standard_NC24ads_A100_v4",
                                                                           "Standard_NC24ads_A100_v9"))
    done = run_cli("kaito-operator", "validate", "-f", str(bad))
    assert done.returncode == 1
    assert "Unsupported inference preset name 'phi-5'" in done.stderr
    assert "Unsupported instance type 'Standard_NC24ads_A100_v9'" in done.stderr
    done = run_cli("kaito-operator", "render", "-f", str(bad))
    assert done.returncode == 1 and "is invalid" in done.stderr and not done.stdout
    done = run_cli("kaito-operator", "render", "-f", str(tmp_path / "missing.yaml"))
    assert done.returncode == 1 and "cannot read" in done.stderr
