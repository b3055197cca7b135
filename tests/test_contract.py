"""The contract between the operator and its workloads (presets/contract.py): what render writes into a
pod, each entry point reads back as the same settings. No model and no cluster: the objects are
rendered and the workloads' own argument parsers and settings models read them."""

from __future__ import annotations


import pytest
from helpers import REPO
from kaito.operator.manifests import load, loads
from kaito.operator.render import render
from kaito.presets import InferenceConfig, PresetError, contract
from kaito.ragservice.config import Settings, from_env
from kaito.runtime import cli as serve_cli
from kaito.tuning import cli as tune_cli

EXAMPLES = REPO / "operator" / "examples"


def rendered(path) -> tuple[list[dict], object]:
    m = load(path)
    objs = [o for r in m.resources for o in render(r, lambda kind, name: m.find(kind, name))]
    return objs, m


def container(objects: list[dict], kind: str, name: str | None = None) -> dict:
    obj = next(o for o in objects if o["kind"] == kind)
    spec = obj["spec"]["template"]["spec"]
    if name is None:
        return spec["containers"][0]
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def mounts(c: dict) -> set[str]:
    return {m["mountPath"] for m in c.get("volumeMounts", [])}


def test_rag_pod_environment_reads_back_as_kaito_rag_settings():
    objects, _ = rendered(EXAMPLES / "kaito_ragengine_phi_3.yaml")
    c = container(objects, "Deployment")
    plain = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    secret_vars = {e["name"] for e in c["env"] if "valueFrom" in e}
    settings = Settings(**from_env(plain))
    assert settings.llm_url == plain["LLM_INFERENCE_URL"]
    assert str(settings.storage_dir) in mounts(c)
    assert settings.embedding_source == "local"
    assert settings.port == int(c["command"][c["command"].index("--port") + 1]) == contract.PORT
    # every variable render sets, plain or from a Secret, is one kaito-rag reads
    known = {f.alias for f in contract.RAGEnvironment.model_fields.values()} | {contract.HF_TOKEN_ENV}
    assert set(plain) | secret_vars <= known


def test_rag_secrets_and_remote_embedding_read_back():
    objects, _ = rendered(EXAMPLES / "kaito_ragengine_remote_embedding.yaml")
    c = container(objects, "Deployment")
    env = {e["name"]: e.get("value", "from-secret") for e in c["env"]}
    settings = Settings(**from_env(env))
    assert settings.embedding_source == "remote"
    assert settings.remote_embedding_url == env["REMOTE_EMBEDDING_URL"]


def test_serving_command_reads_back_as_kaito_serve_options():
    objects, _ = rendered(EXAMPLES / "kaito_workspace_custom_config.yaml")
    c = container(objects, "StatefulSet")
    argv = c["command"]
    assert argv[0] == "kaito-serve"
    args = serve_cli.parser().parse_args(argv[1:])
    assert args.port == contract.PORT == c["ports"][0]["containerPort"]
    assert args.config == contract.INFERENCE_CONFIG_PATH and contract.CONFIG_DIR in mounts(c)
    configmap = next(o for o in objects if o["kind"] == "ConfigMap")
    config = InferenceConfig.parse(configmap["data"][contract.INFERENCE_CONFIG_FILE])  # what kaito-serve loads
    assert config.vllm  # the user's flags survive the trip
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env[contract.HF_HOME_ENV] == contract.WEIGHTS_DIR and contract.WEIGHTS_DIR in mounts(c)


def test_adapters_folder_is_where_kaito_serve_looks():
    objects, _ = rendered(EXAMPLES / "kaito_workspace_falcon_7b_with_adapters.yaml")
    c = container(objects, "StatefulSet")
    args = serve_cli.parser().parse_args(c["command"][1:])
    assert args.adapters_dir == contract.ADAPTERS_DIR
    assert any(m.startswith(contract.ADAPTERS_DIR) for m in mounts(c))
    assert serve_cli.parser().parse_args([]).adapters_dir == contract.ADAPTERS_DIR  # the default agrees


def test_init_containers_read_back_as_kaito_presets_arguments():
    """The weights and image-pull init containers: kaito-presets' own parser reads their commands; each
    --auth file and the destination lie in the volumes they mount; the weights go where kaito-serve looks."""
    from kaito.presets import cli as presets_cli

    objects, _ = rendered(EXAMPLES / "kaito_workspace_falcon_7b_with_adapters.yaml")
    serve = container(objects, "StatefulSet")
    weights = container(objects, "StatefulSet", "weights")
    args = presets_cli.parser().parse_args(weights["command"][1:])
    assert (args.command, args.name) == ("download", "falcon-7b") and mounts(weights) == {contract.WEIGHTS_DIR}
    assert {"name": contract.HF_HOME_ENV, "value": contract.WEIGHTS_DIR} in weights["env"] == [
        e for e in serve["env"] if e["name"] in (contract.HF_HOME_ENV, contract.HF_TOKEN_ENV)]
    pull = container(objects, "StatefulSet", "adapter-falcon-7b-adapter")
    args = presets_cli.parser().parse_args(pull["command"][1:])
    assert args.command == "pull" and args.dest.startswith(contract.ADAPTERS_DIR + "/")
    assert all(any(a.startswith(m + "/") for m in mounts(pull)) for a in [args.dest, *args.auth]) and args.auth
    tuning, _ = rendered(EXAMPLES / "kaito_workspace_tuning_falcon_7b_image.yaml")
    data = container(tuning, "Job", "data-extractor")
    args = presets_cli.parser().parse_args(data["command"][1:])
    assert args.dest == contract.DATA_DIR and contract.DATA_DIR in mounts(data)
    tune = container(tuning, "Job", "kaito-tune")
    assert tune_cli.parser().parse_args(tune["command"][1:]).push  # kaito-tune pushes, with DOCKER_CONFIG mounted
    docker = next(e["value"] for e in tune["env"] if e["name"] == contract.DOCKER_CONFIG_ENV)
    assert docker == contract.PUSH_SECRET_DIR in mounts(tune)


def test_tuning_command_reads_back_as_kaito_tune_arguments():
    objects, _ = rendered(EXAMPLES / "kaito_workspace_tuning_phi_3.yaml")
    c = container(objects, "Job", "kaito-tune")
    args = tune_cli.parser().parse_args(c["command"][1:])
    assert args.config == contract.TUNING_CONFIG_PATH and contract.CONFIG_DIR in mounts(c)
    assert args.data == [contract.DATA_DIR] and contract.DATA_DIR in mounts(c)
    assert args.output == contract.RESULTS_DIR and contract.RESULTS_DIR in mounts(c)
    defaults = tune_cli.parser().parse_args([])
    assert (defaults.data, defaults.output, defaults.metrics_port) == ([contract.DATA_DIR], contract.RESULTS_DIR,
                                                                      contract.PORT)


def test_multinode_pods_start_the_same_kaito_serve(monkeypatch):
    objects, _ = rendered(EXAMPLES / "kaito_workspace_llama-3.3_70b_instruct.yaml")
    c = container(objects, "StatefulSet")
    assert c["command"][0] == "kaito-serve"
    assert {"name": contract.NODE_RANK_ENV, "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}} in c["env"]
    monkeypatch.setenv(contract.NODE_RANK_ENV, "1")  # pod 1, as the pod index gives it
    args = serve_cli.parser().parse_args(c["command"][1:])
    assert args.port == contract.PORT and args.node_count and args.node_count > 1 and args.node_rank == 1
    assert (args.leader_port, args.watch_port) == (contract.LEADER_PORT, contract.WATCH_PORT)
    assert {p["containerPort"] for p in c["ports"]} >= {contract.LEADER_PORT, contract.WATCH_PORT}


UPSTREAM_CONFIG = """\
max_probe_steps: 6
kv_cache_cpu_memory_utilization: 0.5
vllm:
  cpu-offload-gb: 0
  gpu-memory-utilization: 0.95
  swap-space: 4
  max-model-len: "4096"
"""


def test_one_inference_config_parser_for_webhook_render_and_server(tmp_path):
    """Upstream's chart default is admitted, rendered, and loaded by kaito-serve alike."""
    m = loads(f"""
apiVersion: v1
kind: ConfigMap
metadata: {{name: upstream-config}}
data:
  inference_config.yaml: |
{"".join("    " + line + chr(10) for line in UPSTREAM_CONFIG.splitlines())}
---
apiVersion: kaito.sh/v1beta1
kind: Workspace
metadata: {{name: phi-4}}
resource:
  instanceType: Standard_NC24ads_A100_v4
  labelSelector: {{matchLabels: {{apps: phi-4}}}}
inference:
  preset: {{name: phi-4}}
  config: upstream-config
""")
    objects = render(m.resources[0], lambda kind, name: m.find(kind, name))
    text = next(o for o in objects if o["kind"] == "ConfigMap")["data"][contract.INFERENCE_CONFIG_FILE]
    path = tmp_path / contract.INFERENCE_CONFIG_FILE
    path.write_text(text)
    loaded = InferenceConfig.load(path)  # what `kaito-serve --config` does
    assert loaded == InferenceConfig.parse(UPSTREAM_CONFIG)
    assert loaded.max_model_len == 4096 and loaded.max_probe_steps == 6
    assert loaded.kv_cache_cpu_memory_utilization == 0.5
    # what kaito-serve says these upstream keys become, per backend
    assert any("--kv-offloading-size" in n for n in serve_cli.config_notes(loaded, "vllm", gpu=True))
    assert any("no effect on the CPU" in n for n in serve_cli.config_notes(loaded, "vllm", gpu=False))
    assert any("no effect on the transformers" in n for n in serve_cli.config_notes(loaded, "transformers", gpu=True))


@pytest.mark.parametrize("text, message", [
    ("vllm: [1, 2]", "vllm"),
    ("vllm: {max-model-len: many}", "max-model-len must be a positive integer"),
    ("kv_cache_cpu_memory_utilization: 2", "kv_cache_cpu_memory_utilization"),
    ("vllm: {}\nmax_probe: 3", "max_probe: unknown key"),
    ("- a list", "must hold a mapping"),
    ("vllm: {port: 8000}", "set by kaito-serve itself"),
])
def test_inference_config_errors_name_the_key(text, message):
    with pytest.raises(PresetError, match=message):
        InferenceConfig.parse(text)
