"""The contract between the operator and the workloads it runs: where things are mounted in a pod,
which port a workload listens on, which files mark what, and which environment variables carry
settings. `operator/render.py` writes these and `kaito-serve`, `kaito-tune` and `kaito-rag` read
them; both sides import them from here, so the two can never drift apart.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# --- ports ---------------------------------------------------------------------------------------

PORT = 5000  # kaito-serve, kaito-rag and kaito-tune's metrics listen here in a pod
# A multi-node Workspace (vLLM's own multi-node mode): the leader (pod 0) serves HTTP; its workers connect
LEADER_PORT = 29500  # to vLLM's torch.distributed master on the leader (vLLM's --master-port)
WATCH_PORT = 29501  # to the leader's kaito-serve, which holds one connection per worker and fails without one
SCALER_PORT = 10450  # kaito-operator run --scaler-port: the KEDA external scaler (gRPC), in the chart too

# --- mount paths inside pods -----------------------------------------------------------------------

CONFIG_DIR = "/mnt/config"  # the ConfigMap holding inference_config.yaml or training_config.yaml
ADAPTERS_DIR = "/mnt/adapter"  # one sub-folder per LoRA adapter, served under the folder's name
DATA_DIR = "/mnt/data"  # tuning input
RESULTS_DIR = "/mnt/results"  # tuning output (the adapter)
WEIGHTS_DIR = "/workspace/weights"  # HF_HOME of serving and tuning pods: downloaded weights
VECTOR_DB_DIR = "/mnt/vector-db"  # kaito-rag's store
GUARDRAILS_DIR = "/etc/ragengine/guardrails"  # a RAGEngine's guardrails policy ConfigMap (upstream's mount path)
EMBEDDING_DIR = "/mnt/embedding"  # an embedding model copied from an image
LOCAL_WEIGHTS_DIR = "/opt/kaito/models"  # kaito.sh/use-local-weights: <this>/<preset> on the node
PULL_SECRETS_DIR = "/mnt/pull-secrets"  # <this>/<secret>/config.json: an imagePullSecret kaito-presets pull reads
PUSH_SECRET_DIR = "/mnt/push-secret"  # config.json: the imagePushSecret, as DOCKER_CONFIG of kaito-tune --push

# --- files -----------------------------------------------------------------------------------------

INFERENCE_CONFIG_FILE = "inference_config.yaml"  # also the key in the Workspace's ConfigMap
TUNING_CONFIG_FILE = "training_config.yaml"
GUARDRAILS_POLICY_FILE = "guardrails.yaml"  # also the key in the guardrails policy ConfigMap
TUNING_DONE_MARKER = "fine_tuning_completed.txt"  # kaito-tune writes it last, in the output folder
# what an adapter image carries (under /data, upstream's layout), as kaito-tune --push writes it
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
INFERENCE_CONFIG_PATH = f"{CONFIG_DIR}/{INFERENCE_CONFIG_FILE}"
TUNING_CONFIG_PATH = f"{CONFIG_DIR}/{TUNING_CONFIG_FILE}"

# --- metrics --------------------------------------------------------------------------------------

# Requests queued for the batch: vLLM's name, which KEDA autoscaling of an InferenceSet reads by default;
# kaito-serve's transformers backend exports the same gauge under kaito's prefix (the scaler reads either).
WAITING_METRIC = "vllm:num_requests_waiting"
KAITO_WAITING_METRIC = "kaito:num_requests_waiting"

# --- environment -----------------------------------------------------------------------------------

HF_HOME_ENV = "HF_HOME"
HF_TOKEN_ENV = "HF_TOKEN"  # also the key of a modelAccessSecret
API_KEY_ENV = "KAITO_API_KEY"  # kaito-serve / kaito-rag --api-key
ADAPTERS_DIR_ENV = "KAITO_ADAPTERS_DIR"  # kaito-serve --adapters-dir
TUNE_METRICS_PORT_ENV = "KAITO_TUNE_METRICS_PORT"  # kaito-tune --metrics-port
NODE_RANK_ENV = "KAITO_NODE_RANK"  # kaito-serve --node-rank: a multi-node pod's index (0: the leader)
# registries (host or host:port, comma-separated) spoken to over plain HTTP by kaito's image pulls and
# pushes (kaito.presets.oci); loopback addresses always are
INSECURE_REGISTRIES_ENV = "KAITO_INSECURE_REGISTRIES"
DOCKER_CONFIG_ENV = "DOCKER_CONFIG"  # a folder holding config.json with registry credentials (Docker's variable)


class RAGEnvironment(BaseModel):
    """The environment of a RAGEngine pod (upstream KAITO's variable names): what render writes and
    what kaito-rag reads back (`ragservice/config.from_env`). Fields are kaito-rag's settings; the
    aliases are the variable names. Values are text, as environment variables are."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    embedding_source: Literal["local", "remote"] | None = Field(None, alias="EMBEDDING_SOURCE_TYPE")
    embedding_model: str | None = Field(None, alias="LOCAL_EMBEDDING_MODEL_ID")
    remote_embedding_url: str | None = Field(None, alias="REMOTE_EMBEDDING_URL")
    remote_embedding_key: str | None = Field(None, alias="REMOTE_EMBEDDING_ACCESS_SECRET")
    llm_url: str | None = Field(None, alias="LLM_INFERENCE_URL")
    llm_key: str | None = Field(None, alias="LLM_ACCESS_SECRET")
    context_window: str | None = Field(None, alias="LLM_CONTEXT_WINDOW")
    storage_dir: str | None = Field(None, alias="DEFAULT_VECTOR_DB_PERSIST_DIR")
    api_key: str | None = Field(None, alias=API_KEY_ENV)
    embedding_backend: str | None = Field(None, alias="KAITO_RAG_EMBEDDING_BACKEND")
    remote_embedding_protocol: str | None = Field(None, alias="KAITO_RAG_REMOTE_EMBEDDING_PROTOCOL")
    embedding_device: str | None = Field(None, alias="KAITO_RAG_EMBEDDING_DEVICE")
    vector_db: str | None = Field(None, alias="VECTOR_DB_TYPE")
    vector_db_url: str | None = Field(None, alias="VECTOR_DB_URL")
    vector_db_key: str | None = Field(None, alias="VECTOR_DB_ACCESS_SECRET")
    vector_index: str | None = Field(None, alias="KAITO_RAG_VECTOR_INDEX")
    rerank_batch_size: str | None = Field(None, alias="LLM_RERANKER_BATCH_SIZE")
    rerank_top_n: str | None = Field(None, alias="LLM_RERANKER_TOP_N")
    guardrails_enabled: str | None = Field(None, alias="OUTPUT_GUARDRAILS_ENABLED")
    guardrails_policy: str | None = Field(None, alias="OUTPUT_GUARDRAILS_POLICY_PATH")
    guardrails_fail_open: str | None = Field(None, alias="OUTPUT_GUARDRAILS_FAIL_OPEN")
    guardrails_hot_reload: str | None = Field(None, alias="OUTPUT_GUARDRAILS_HOT_RELOAD_ENABLED")
    guardrails_stream_holdback: str | None = Field(None, alias="OUTPUT_GUARDRAILS_STREAM_HOLDBACK_CHARS")

    @classmethod
    def var(cls, field: str) -> str:
        """The environment variable of a setting, e.g. var("llm_key") -> "LLM_ACCESS_SECRET"."""
        return cls.model_fields[field].alias or field

    def to_env(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.model_dump(by_alias=True, exclude_none=True).items()}

    @classmethod
    def from_env(cls, env: dict[str, str]) -> RAGEnvironment:
        found = {k: v for k, v in env.items() if v}
        for choice in ("EMBEDDING_SOURCE_TYPE", "VECTOR_DB_TYPE"):  # upstream's values, in any case
            if choice in found:
                found[choice] = found[choice].lower()
        return cls.model_validate(found)

# --- kaito-serve's request limits ------------------------------------------------------------------

MAX_REQUEST_BYTES_ENV = "KAITO_MAX_REQUEST_BYTES"  # kaito-serve --max-request-bytes (both backends)
