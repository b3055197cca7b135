"""What to run for a resource, decided once: the preset, the instance type, the estimate, the engine
and entry-point arguments (`InferencePlan`, `TuningPlan`, `RAGPlan`). Both render.py (the Kubernetes
objects) and the local runner (local processes) start from these plans, so a Workspace runs the same
way in a cluster and on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kaito.presets import (
    Estimate,
    GPUSku,
    InferenceConfig,
    ModelPreset,
    PresetError,
    build_vllm_command,
    get_model,
    get_sku,
)
from kaito.presets.contract import (
    EMBEDDING_DIR,
    GUARDRAILS_DIR,
    GUARDRAILS_POLICY_FILE,
    HF_TOKEN_ENV,
    LOCAL_WEIGHTS_DIR,
    TUNING_CONFIG_FILE,
    VECTOR_DB_DIR,
    RAGEnvironment,
)

from . import sizing
from .api import PERFORMANCE_MODE, USE_LOCAL_WEIGHTS, AdapterSpec, DataDestination, DataSource, RAGEngine, Workspace
from .validation import DEFAULT_TUNING_CONFIGS, Lookup, check, inference_config

DEFAULTS_DIR = Path(__file__).parent / "tuning_defaults"


@dataclass
class InferencePlan:
    workspace: Workspace
    preset: ModelPreset
    sku: GPUSku  # what one pod gets: the instance type, or a partition of its GPUs
    estimate: Estimate
    runtime: str
    config: InferenceConfig | None
    engine_args: list[str]  # the vLLM flags build_vllm_command gives (vllm runtime)
    adapters: list[AdapterSpec] = field(default_factory=list)
    local_weights: str | None = None  # kaito.sh/use-local-weights: the node folder holding the weights

    @property
    def node_count(self) -> int:
        return self.estimate.node_count

    @property
    def in_catalogue(self) -> bool:
        return is_catalogue(self.preset)

    def serve_args(self, *, config_path: str | None, adapters_dir: str | None, gpu: bool = True,
                   leader: str | None = None) -> list[str]:
        """kaito-serve's arguments (without host/port); gpu=False: size for the CPU instead of the SKU. A
        catalogue preset is named by --preset; any other Hugging Face model by --model and served under its
        id; local weights are the --model folder. A model spread over nodes: every pod gets the same
        arguments, `leader` (the address of pod 0) among them, and its rank from its environment
        (NODE_RANK_ENV)."""
        if self.in_catalogue:
            args = ["--preset", self.preset.name] + (["--model", self.local_weights] if self.local_weights else [])
        else:
            args = ["--model", self.local_weights or self.preset.hf_id, "--served-model-name", self.preset.hf_id]
        args += ["--backend", self.runtime if gpu else _cpu_backend(self.runtime)]
        if gpu:
            args += ["--instance-type", self.sku.name]
        if self.node_count > 1:
            assert leader, "a model spread over nodes needs the leader's address"
            args += ["--node-count", str(self.node_count), "--leader-address", leader]
        if config_path:
            args += ["--config", config_path]
        if adapters_dir:
            args += ["--adapters-dir", adapters_dir]
        return args


def _cpu_backend(runtime: str) -> str:
    return "transformers" if runtime == "transformers" else "auto"


def plan_inference(ws: Workspace, lookup: Lookup | None = None, auto_provision: bool = True) -> InferencePlan:
    check(ws, lookup=lookup, auto_provision=auto_provision)
    inf = ws.inference
    assert inf is not None and inf.preset is not None and ws.resource.instance_type
    preset = sizing.model_for(inf.preset, ws.runtime, lookup)
    sku = sizing.partition_sku(ws, get_sku(ws.resource.instance_type))
    assert sku is not None
    config, _ = inference_config(inf.config, lookup)
    mode = ws.annotation(PERFORMANCE_MODE)
    if mode and (config is None or "performance-mode" not in config.vllm):  # the config file's word wins
        config = (config or InferenceConfig()).model_copy(update={"vllm": {**(config.vllm if config else {}),
                                                                           "performance-mode": mode}})
    est = sizing.size(ws, preset, sku, config)
    engine = []
    if ws.runtime == "vllm":
        engine = build_vllm_command(preset, sku=sku, node_count=est.node_count, config=config).argv()
    local = local_weights_dir(inf.preset.name) if ws.annotation(USE_LOCAL_WEIGHTS) == "true" else None
    return InferencePlan(ws, preset, sku, est, ws.runtime, config, engine, list(inf.adapters or []), local)


def local_weights_dir(preset_name: str) -> str:
    """kaito.sh/use-local-weights: the node folder of a preset's weights, /opt/kaito/models/<name> with the
    name lower-cased and "/" as "-" (as upstream names it)."""
    return f"{LOCAL_WEIGHTS_DIR}/{preset_name.lower().replace('/', '-')}"


def is_catalogue(preset: ModelPreset) -> bool:
    try:
        return get_model(preset.name) == preset
    except PresetError:
        return False


@dataclass
class TuningPlan:
    workspace: Workspace
    preset: ModelPreset
    sku: GPUSku
    method: str
    config_text: str  # training_config.yaml: the user's ConfigMap, or the method's default
    config_map: str  # the ConfigMap mounted (the user's, or the rendered default)
    input: DataSource
    output: DataDestination
    default_config: bool  # config_map is rendered from kaito's default for the method

    def tune_args(self, *, config_path: str, data: list[str], output: str) -> list[str]:
        """kaito-tune's arguments; with an output image, kaito-tune pushes the adapter itself when done."""
        return ["--preset", self.preset.name, "--method", self.method, "--config", config_path,
                "--data", *data, "--output", output, *(["--push", self.output.image] if self.output.image else [])]


def default_tuning_config(method: str) -> str:
    return (DEFAULTS_DIR / f"{method}.yaml").read_text()


def plan_tuning(ws: Workspace, lookup: Lookup | None = None) -> TuningPlan:
    check(ws, lookup=lookup)
    t = ws.tuning
    assert t is not None and t.preset and t.input and t.output and ws.resource.instance_type
    method = (t.method or "").lower()
    cm = lookup("ConfigMap", t.config) if lookup and t.config else None
    if t.config and cm is None and t.config in DEFAULT_TUNING_CONFIGS:
        text, config_map, default = default_tuning_config(DEFAULT_TUNING_CONFIGS[t.config]), t.config, True
    elif t.config:
        text, config_map, default = ((cm or {}).get("data") or {}).get(TUNING_CONFIG_FILE, ""), t.config, False
    else:
        text, config_map, default = default_tuning_config(method), f"{ws.name}-tuning-config", True
    return TuningPlan(ws, get_model(t.preset.name), get_sku(ws.resource.instance_type), method, text, config_map,
                      t.input, t.output, default)


@dataclass
class RAGPlan:
    engine: RAGEngine
    sku: GPUSku | None
    env: dict[str, str]  # plain settings
    secret_env: dict[str, tuple[str, str]]  # env name -> (secret name, key)
    storage_dir: str
    guardrails_config_map: str | None = None  # the policy ConfigMap mounted at GUARDRAILS_DIR
    guardrails_default: str | None = None  # its guardrails.yaml when kaito renders the default policy


def default_guardrails_policy() -> str:
    """kaito-rag's default guardrails.yaml (credentials, secrets, personal data; redact)."""
    import kaito.ragservice  # the package's data file: nothing of the service is imported

    return (Path(kaito.ragservice.__file__).parent / "default_guardrails.yaml").read_text()


def plan_rag(rag: RAGEngine, lookup: Lookup | None = None) -> RAGPlan:
    """kaito-rag's settings, in the environment variables of its contract (presets.contract.RAGEnvironment).
    Secrets are referenced by the variable's own name as their key, as upstream does."""
    check(rag, lookup=lookup)
    spec = rag.spec
    settings = RAGEnvironment()
    secrets: dict[str, tuple[str, str]] = {}

    def secret(field: str, name: str) -> None:
        var = RAGEnvironment.var(field)
        secrets[var] = (name, var)

    emb = spec.embedding
    assert emb is not None
    sku = get_sku(spec.compute.instance_type) if spec.compute and spec.compute.instance_type else None
    if emb.remote:
        settings.embedding_source, settings.remote_embedding_url = "remote", emb.remote.url
        if emb.remote.access_secret:
            secret("remote_embedding_key", emb.remote.access_secret)
    else:
        assert emb.local is not None
        settings.embedding_source, settings.embedding_model = "local", emb.local.model_id or EMBEDDING_DIR
        settings.embedding_device = "cuda" if sku and sku.gpu_count else "cpu"
        if emb.local.model_access_secret:
            secrets[HF_TOKEN_ENV] = (emb.local.model_access_secret, HF_TOKEN_ENV)
    svc = spec.inference_service
    if svc and svc.url:  # without one: retrieve-only
        settings.llm_url = svc.url
        if svc.access_secret:
            secret("llm_key", svc.access_secret)
    if svc and svc.context_window_size:
        settings.context_window = str(svc.context_window_size)
    pvc = spec.storage.pvc if spec.storage else None
    # on a volume: the RAGEngine's own sub-folder (upstream's layout), so RAGEngines can share a volume
    storage_dir = f"{(pvc.mount_path or VECTOR_DB_DIR).rstrip('/')}/{rag.name}" if pvc else VECTOR_DB_DIR
    settings.storage_dir = storage_dir
    db = spec.storage.vector_db if spec.storage else None
    if db:
        settings.vector_db, settings.vector_db_url = db.engine.lower(), db.url
        if db.access_secret:
            secret("vector_db_key", db.access_secret)
    guard = spec.guardrails
    config_map = default_policy = None
    if guard and guard.enabled:
        settings.guardrails_enabled = "true"
        settings.guardrails_policy = f"{GUARDRAILS_DIR}/{GUARDRAILS_POLICY_FILE}"
        if guard.fail_open is False:
            settings.guardrails_fail_open = "false"
        if guard.config_map_ref:
            config_map = guard.config_map_ref.name
        else:
            config_map, default_policy = f"{rag.name}-guardrails-policy", default_guardrails_policy()
    env = settings.to_env()
    return RAGPlan(rag, sku, env, secrets, storage_dir, config_map, default_policy)


def model_access_secret(ws: Workspace) -> str | None:
    """The Secret (key HF_TOKEN) that gives access to the workspace's gated preset, inference or tuning."""
    preset = ws.inference.preset if ws.inference else ws.tuning.preset if ws.tuning else None
    return preset.preset_options.model_access_secret if preset and preset.preset_options else None
