"""The custom resources, `Workspace` and `RAGEngine` (kaito.sh/v1beta1), as pydantic models.

These models are the single source of truth: manifests are parsed with them, and the CRD YAML
(`crds.py`) is generated from their JSON schema. Field names are upstream KAITO's (camelCase in
YAML, snake_case in Python). Pod templates and volume sources are kept as plain mappings, as the
upstream CRDs keep them schemaless; `schemas.py` checks them against the Kubernetes schemas.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from .meta import API_VERSION, GROUP

QUANTITY = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$"  # a Kubernetes Quantity

API_VERSIONS = (API_VERSION, f"{GROUP}/v1alpha1")  # v1alpha1 manifests (older upstream examples) read the same

# Annotations of a Workspace, upstream KAITO's names
RUNTIME_ANNOTATION = "kaito.sh/runtime"  # vllm (default) | transformers
ENABLE_LB = "kaito.sh/enablelb"  # "True": the Service is a LoadBalancer
BYPASS_RESOURCE_CHECKS = "kaito.sh/bypass-resource-checks"  # present: GPU memory shortfalls warn instead of refuse
PERFORMANCE_MODE = "kaito.sh/performance-mode"  # vLLM --performance-mode: balanced | interactivity | throughput
NODE_IMAGE_FAMILY = "kaito.sh/node-image-family"  # ubuntu | azurelinux: the OS image of provisioned nodes
USE_LOCAL_WEIGHTS = "kaito.sh/use-local-weights"  # "true": weights from the node's /opt/kaito/models/<preset>
DISABLE_BENCHMARK = "kaito.sh/disable-benchmark"  # upstream's post-load benchmark switch
MODEL_MIRROR_STORAGE_CLASS = "kaito.sh/model-mirror-storage-class"  # the StorageClass of its model's mirror
WEIGHTS_STORAGE_CLASS = "kaito.sh/weights-storage-class"  # each pod's weights on a claim of this class
MODEL_STREAMING = "kaito.sh/model-streaming"  # "disabled": no mirror, the per-pod download (upstream's opt-out)


class Spec(BaseModel):
    """camelCase in YAML, unknown fields are an error (a typo must not be silently dropped)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, exclude_defaults=False, mode="json")


Mapping = dict[str, Any]  # schemaless in the CRD (x-kubernetes-preserve-unknown-fields)


class ObjectMeta(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str = Field(min_length=1, max_length=253)
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class LabelSelectorRequirement(Spec):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] | None = None


class LabelSelector(Spec):
    match_labels: dict[str, str] | None = None
    match_expressions: list[LabelSelectorRequirement] | None = None


class PartitionSpec(Spec):
    mode: str = Field(description="mig (an NVIDIA MIG slice per pod) or accelerator (whole GPUs per pod).")
    profile: str | None = Field(None, description="mig: the MIG profile, e.g. 1g.10gb.")
    count: int | None = Field(None, ge=1, description="accelerator: GPUs per pod.")


class ResourceSpec(Spec):
    count: int | None = Field(None, ge=1, description="GPU nodes. Deprecated upstream: with the vLLM runtime the "
                              "estimator chooses the node count (status.targetNodeCount).")
    instance_type: str | None = Field(None, description="GPU node SKU, e.g. Standard_NC24ads_A100_v4.")
    label_selector: LabelSelector | None = Field(None, description="Labels the GPU nodes carry.")
    preferred_nodes: list[str] | None = Field(None, description="Existing nodes to use before provisioning new ones.")
    partition: PartitionSpec | None = Field(None, description="GPU partitioning (bring your own nodes only).")


class PresetOptions(Spec):
    model_access_secret: str | None = Field(None, description="Secret holding HF_TOKEN for gated models.")
    image: str | None = Field(None, description="Deprecated upstream (private model image); ignored.")
    image_pull_secrets: list[str] | None = None
    model_weights_pvc: str | None = Field(None, alias="modelWeightsPVC", description="An existing PVC to keep the "
                                          "downloaded weights on (instead of an emptyDir), so restarts skip the download.")
    model_weights_sub_path: str | None = Field(None, description="Sub-folder of modelWeightsPVC to use.")


class PresetSpec(Spec):
    name: str = Field(description="Catalogue preset name or the model's Hugging Face id.")
    access_mode: Literal["public", "private"] | None = Field(None, description="Deprecated upstream; ignored.")
    preset_options: PresetOptions | None = None


class DataSource(Spec):
    name: str | None = None
    urls: list[str] | None = None
    volume_source: Mapping | None = Field(None, alias="volumeSource")
    image: str | None = None
    image_pull_secrets: list[str] | None = None


class DataDestination(Spec):
    volume_source: Mapping | None = Field(None, alias="volumeSource")
    image: str | None = None
    image_push_secret: str | None = None


class AdapterSpec(Spec):
    source: DataSource | None = None
    strength: str | None = Field(None, description="Multiplier 0..1, a string as upstream.")

    @field_validator("strength", mode="before")
    @classmethod
    def _number_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


class InferenceSpec(Spec):
    preset: PresetSpec | None = None
    template: Mapping | None = Field(None, description="A PodTemplateSpec, instead of a preset.")
    config: str | None = Field(None, description="ConfigMap holding inference_config.yaml.")
    adapters: list[AdapterSpec] | None = None


class TuningSpec(Spec):
    preset: PresetSpec | None = None
    method: str | None = Field(None, description="lora or qlora.")
    config: str | None = Field(None, description="ConfigMap holding training_config.yaml.")
    input: DataSource | None = None
    output: DataDestination | None = None


class Condition(Spec):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class WorkspaceStatus(Spec):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    worker_nodes: list[str] | None = None
    state: str | None = None
    conditions: list[Condition] | None = None
    target_node_count: int | None = None


class Resource(Spec):
    api_version: str
    kind: str
    metadata: ObjectMeta

    @field_validator("api_version")
    @classmethod
    def _known_version(cls, v: str) -> str:
        if v not in API_VERSIONS:
            raise ValueError(f"apiVersion must be {API_VERSION} (or {API_VERSIONS[1]}), not {v!r}")
        return v

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace


class Workspace(Resource):
    kind: Literal["Workspace"] = "Workspace"
    resource: ResourceSpec = Field(default_factory=ResourceSpec)
    inference: InferenceSpec | None = None
    tuning: TuningSpec | None = None
    status: WorkspaceStatus | None = None

    @property
    def runtime(self) -> str:
        return self.metadata.annotations.get(RUNTIME_ANNOTATION, "vllm")

    def annotation(self, key: str) -> str | None:
        return self.metadata.annotations.get(key)


class PersistentVolumeConfig(Spec):
    persistent_volume_claim: str = Field(description="The PVC the vector store is kept on.")
    mount_path: str | None = Field(None, description="Where the volume is mounted (default /mnt/vector-db); the "
                                   "store is its <RAGEngine name> sub-folder, so RAGEngines can share a volume.")


class VectorDBConfig(Spec):
    engine: str = Field(description="The vector database: qdrant (a Qdrant server, with its own hybrid search).")
    url: str = Field(description="The database's URL, e.g. http://qdrant-svc:6333.")
    access_secret: str | None = Field(None, description="Secret whose key VECTOR_DB_ACCESS_SECRET holds the API key.")


class StorageSpec(Spec):
    persistent_volume: PersistentVolumeConfig | None = None
    vector_db: VectorDBConfig | None = Field(None, alias="vectorDB")
    # v1alpha1 kept these two at this level
    persistent_volume_claim: str | None = None
    mount_path: str | None = None

    @property
    def pvc(self) -> PersistentVolumeConfig | None:
        if self.persistent_volume:
            return self.persistent_volume
        if self.persistent_volume_claim:
            return PersistentVolumeConfig(persistent_volume_claim=self.persistent_volume_claim,
                                          mount_path=self.mount_path)
        return None


class RemoteEmbeddingSpec(Spec):
    url: str
    access_secret: str | None = None


class LocalEmbeddingSpec(Spec):
    image: str | None = None
    image_pull_secret: str | None = None
    model_id: str | None = Field(None, alias="modelID")
    model_access_secret: str | None = None


class EmbeddingSpec(Spec):
    remote: RemoteEmbeddingSpec | None = None
    local: LocalEmbeddingSpec | None = None


class InferenceServiceSpec(Spec):
    url: str | None = None
    access_secret: str | None = None
    context_window_size: int | None = None


class ConfigMapReference(Spec):
    name: str = Field(description="A ConfigMap in the RAGEngine's namespace.")


class GuardrailsSpec(Spec):
    enabled: bool = Field(False, description="Output guardrails on the chat completions' answers.")
    config_map_ref: ConfigMapReference | None = Field(None, description="The ConfigMap holding the guardrails.yaml "
                                                      "policy (default: a copy of kaito's default policy).")
    fail_open: bool | None = Field(None, description="When a scanner fails: true (default) returns the answer "
                                   "unscanned, false fails the request with 500.")


class RAGEngineSpec(Spec):
    compute: ResourceSpec | None = Field(None, description="GPU nodes for a local embedding model; without it the "
                                         "RAGEngine runs on ordinary nodes, embeddings on the CPU.")
    storage: StorageSpec | None = None
    embedding: EmbeddingSpec | None = None
    inference_service: InferenceServiceSpec | None = Field(None, description="The LLM; without a url the RAGEngine "
                                                           "is retrieve-only.")
    guardrails: GuardrailsSpec | None = None


class RAGEngineStatus(Spec):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    worker_nodes: list[str] | None = None
    conditions: list[Condition] | None = None


class RAGEngine(Resource):
    kind: Literal["RAGEngine"] = "RAGEngine"
    spec: RAGEngineSpec = Field(default_factory=RAGEngineSpec)
    status: RAGEngineStatus | None = None


KINDS: dict[str, type[Resource]] = {"Workspace": Workspace, "RAGEngine": RAGEngine}


# --- InferenceSet: a set of identical inference Workspaces, scaled as one (upstream KAITO's, beta since v0.11) ---

INFERENCESET_LABEL = "inferenceset.kaito.sh/created-by"  # on each Workspace (and its pods): the InferenceSet's name
# KEDA autoscaling of an InferenceSet (upstream's keda-kaito-scaler annotations)
SCALEDOBJECT_AUTO_PROVISION = "scaledobject.kaito.sh/auto-provision"  # "true": kaito makes and owns a ScaledObject
SCALEDOBJECT_MIN_REPLICAS = "scaledobject.kaito.sh/min-replicas"  # default 1; 0 scales to zero when idle
SCALEDOBJECT_MAX_REPLICAS = "scaledobject.kaito.sh/max-replicas"  # used when spec.nodeCountLimit is not set
SCALEDOBJECT_METRIC_NAME = "scaledobject.kaito.sh/metricName"  # default vllm:num_requests_waiting
SCALEDOBJECT_THRESHOLD = "scaledobject.kaito.sh/threshold"  # the metric's target per replica
SCALEDOBJECT_MANAGED_BY = "scaledobject.kaito.sh/managed-by"  # on the ScaledObjects kaito makes


class TemplateMeta(BaseModel):
    """The Workspaces' metadata (labels, annotations such as kaito.sh/runtime); schemaless upstream."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class InferenceSetResourceSpec(Spec):
    instance_type: str | None = Field(None, description="GPU node SKU of each replica, e.g. Standard_NC24ads_A100_v4.")
    partition: PartitionSpec | None = Field(None, description="GPU partitioning of each replica (bring your own "
                                                              "nodes only); immutable.")


class InferenceSetTemplate(Spec):
    metadata: TemplateMeta = Field(default_factory=TemplateMeta)
    resource: InferenceSetResourceSpec = Field(default_factory=InferenceSetResourceSpec)
    inference: InferenceSpec


class InferenceSetSpec(Spec):
    template: InferenceSetTemplate = Field(description="What each replica (a Workspace) runs.")
    replicas: int = Field(1, ge=0, description="Workspaces to run (the scale subresource's spec.replicas).")
    node_count_limit: int | None = Field(None, ge=0, description="Most GPU nodes the InferenceSet may use in all: "
                                         "replicas x the nodes each replica needs. Unset or 0: no limit.")
    label_selector: LabelSelector = Field(description="The nodes' labels, as each Workspace's resource.labelSelector.")
    update_strategy: Mapping | None = Field(None, description="How Workspaces are replaced (a StatefulSet "
                                            "updateStrategy); schemaless, as upstream.")


class InferenceSetStatus(Spec):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    replicas: int | None = None
    ready_replicas: int | None = None
    selector: str | None = None
    conditions: list[Condition] | None = None


class InferenceSet(Resource):
    """A set of identical inference Workspaces, scaled as one (kubectl scale, KEDA)."""

    kind: Literal["InferenceSet"] = "InferenceSet"
    spec: InferenceSetSpec
    status: InferenceSetStatus | None = None

    def workspace_name(self, index: int) -> str:
        return f"{self.name}-{index}"


KINDS["InferenceSet"] = InferenceSet


# --- ModelMirror ----------------------------------------------------------------------------------------------


class ObjectReference(Spec):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str = Field(min_length=1)
    namespace: str | None = None


class ModelMirrorSource(Spec):
    registry: Literal["huggingface"] = Field(description="Where the weights come from (huggingface).")
    model_id: str = Field(alias="modelID", min_length=1, description="The model's repository, e.g. "
                          "microsoft/Phi-4-mini-instruct.")
    access_secret: ObjectReference | None = Field(None, description="A Secret holding HF_TOKEN, for gated models.")


class ModelMirrorStorage(Spec):
    size: str = Field(pattern=QUANTITY, description="The PersistentVolumeClaim's size, e.g. 20Gi.")
    storage_class_name: str | None = Field(None, description="The StorageClass of the claim (ReadWriteMany: "
                                           "every pod of the model's Workspaces mounts it).")


class ModelMirrorSpec(Spec):
    mode: Literal["Managed", "Static"] = Field("Managed", description="Managed: kaito downloads the weights into "
                                              "a claim; Static: they are already in storage of your own.")
    source: ModelMirrorSource | None = None
    storage: ModelMirrorStorage | None = None
    job_namespace: str | None = Field(None, description="The namespace of the claim and the download Job.")


class ModelMirrorStatus(Spec):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    phase: Literal["Pending", "Ready"] | None = None
    model_path: str | None = None
    conditions: list[Condition] | None = None
    failure_message: str | None = None
    last_download_time: str | None = None
    downloaded_bytes: int | None = None
    total_bytes: int | None = None
    unused_since: str | None = None


class ModelMirror(Resource):
    """A model's weights downloaded once into a claim that every Workspace of the model mounts (cluster scoped)."""

    kind: Literal["ModelMirror"] = "ModelMirror"
    spec: ModelMirrorSpec = Field(default_factory=ModelMirrorSpec)
    status: ModelMirrorStatus | None = None


KINDS["ModelMirror"] = ModelMirror
