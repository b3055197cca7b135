"""GPU sizing: how many GPUs and nodes a model needs on an instance type, and how to split it.

The arithmetic is upstream KAITO's, so users get the same node counts:

    usable per GPU   = GPU memory x 0.84
    fixed per GPU    = 2.3 GiB + context x KV bytes per token / GPUs per node
    weights per GPU  = (usable - fixed) / 1.05
    GPUs             = int(1.02 x weight size / weights per GPU) + 1
    nodes            = ceil(GPUs / GPUs per node)

KV bytes per token (ModelPreset.kv_bytes_per_token) count the layers with attention only (hybrids with
Mamba or linear-attention layers have fewer); MLA caches one latent a layer, kv_lora_rank +
qk_rope_head_dim values, instead of K and V for each KV head. Quantised models need no special case:
the weight size is the size of the files, which already reflects the quantisation.

Parallelism: data-parallel replicas when the model takes under half of one GPU and the node has
several; otherwise tensor-parallel across a node's GPUs and pipeline-parallel (Ray) across nodes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pydantic import BaseModel, Field

from .catalogue import PresetError, skus
from .schema import GPUSku, ModelPreset

GIB = 2**30
USABLE_FRACTION = 0.84
CUDA_OVERHEAD_GIB = 2.3
WEIGHT_OVERHEAD = 1.05
WEIGHT_SAFETY = 1.02
DEFAULT_CONTEXT = 2048
DISK_HEADROOM_GIB = 80


class Estimate(BaseModel):
    """What a model needs on one instance type."""

    model: str
    instance_type: str
    gpu_model: str
    gpus_per_node: int
    gpu_memory_per_gpu_gib: float
    context: int = Field(description="Context length the sizing reserved KV cache for.")
    kv_bytes_per_token: int
    usable_per_gpu_gib: float
    fixed_per_gpu_gib: float
    weight_capacity_per_gpu_gib: float
    gpus_required: int = Field(description="GPUs the weights need (the formula's answer).")
    node_count: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    max_model_len: int = Field(description="Longest context that fits the KV space left, capped at the model's limit.")
    disk_gib: int = Field(description="Disk per node: weights + 80 GiB.")
    readiness_timeout_s: int = Field(description="How long a pod may take to load the model.")

    @property
    def gpus_used_per_node(self) -> int:
        return self.tensor_parallel * self.data_parallel


def readiness_timeout_s(weight_size_gib: float) -> int:
    """15 min + 18 s per GiB of weights, clamped to 30..180 min."""
    return int(min(max(15 * 60 + 18 * weight_size_gib, 30 * 60), 180 * 60))


def disk_gib(weight_size_gib: float) -> int:
    return math.ceil(weight_size_gib + DISK_HEADROOM_GIB)


def _tensor_parallel(model: ModelPreset, gpus_per_node: int) -> int:
    """The largest TP size up to the node's GPUs that vLLM can shard this model's attention over.

    The query heads are split over the ranks, so TP must divide num_attention_heads. With GQA/MQA the
    KV heads are split too: TP must divide them, or be a multiple of them (each rank then holds a copy
    of one KV head). With MLA there are no KV heads to split: every head reads the same per-token
    latent, so each rank keeps the whole latent of the layers it runs and only the query heads
    constrain TP. The price is memory, not divisibility: the KV cache is held TP times (_kv_copies).
    """
    for tp in range(gpus_per_node, 0, -1):
        kv = model.num_key_value_heads
        if model.num_attention_heads % tp == 0 and (model.attention == "mla" or kv % tp == 0 or tp % kv == 0):
            return tp
    return 1


def _kv_copies(model: ModelPreset, tp: int) -> int:
    """How many times `tp` ranks hold each token's KV cache between them: MLA's latent on every rank; KV
    heads once, unless there are fewer heads than ranks and each is copied to tp / kv heads ranks."""
    return tp if model.attention == "mla" else max(1, tp // model.num_key_value_heads)


def _max_model_len(model: ModelPreset, sku: GPUSku, tp: int, pp: int) -> int:
    """KV tokens that fit on tp x pp GPUs holding one copy of the weights (one replica)."""
    usable = sku.gpu_memory_per_gpu_gib * USABLE_FRACTION
    kv_gib = tp * pp * (usable - CUDA_OVERHEAD_GIB) - model.weight_size_gib * WEIGHT_OVERHEAD
    tokens = int(kv_gib * GIB / (model.kv_bytes_per_token * _kv_copies(model, tp))) if kv_gib > 0 else 0
    return min(model.context_limit, tokens)


class DoesNotFit(PresetError):
    """The model cannot run on this instance type (at this count); `nodes` is the count the hint uses."""

    def __init__(self, reason: str, nodes: int = 1) -> None:
        super().__init__(reason)
        self.nodes = nodes


_memo: ContextVar[dict | None] = ContextVar("kaito_estimate_memo", default=None)


@contextmanager
def memo() -> Iterator[None]:
    """Within the block, estimate() works each question out once and repeats its answer (or error): the
    operator's reconcile of a Workspace asks the same one in validation, in the plan and for the vLLM flags."""
    token = _memo.set({})
    try:
        yield
    finally:
        _memo.reset(token)


def estimate(model: ModelPreset, sku: GPUSku, *, context: int | None = None, node_count: int | None = None) -> Estimate:
    """Size `model` on `sku`. With `node_count` (the user's resource count), fail when that many
    nodes cannot hold the model. A model that does not fit gets an error naming the smallest
    instance type that holds it."""
    answers = _memo.get()
    if answers is None:
        return _estimate(model, sku, context, node_count)
    key = (model.name, model.hf_id, sku.name, context, node_count)
    if key not in answers:
        try:
            answers[key] = found = _estimate(model, sku, context, node_count)
            answers.setdefault(key[:-1] + (found.node_count,), found)  # its own node count, asked back
        except PresetError as e:
            answers[key] = e
    if isinstance(answers[key], PresetError):
        raise answers[key]
    return answers[key]


def _estimate(model: ModelPreset, sku: GPUSku, context: int | None, node_count: int | None) -> Estimate:
    ctx = context or DEFAULT_CONTEXT
    if ctx > model.context_limit:
        raise PresetError(f"context {ctx} exceeds {model.name}'s limit of {model.context_limit} tokens")
    try:
        return _size(model, sku, ctx, node_count)
    except DoesNotFit as e:
        raise DoesNotFit(f"{e} {_smallest_hint(model, ctx, e.nodes)}", e.nodes) from None


def _size(model: ModelPreset, sku: GPUSku, ctx: int, node_count: int | None) -> Estimate:
    gpn = sku.gpu_count
    per_gpu = sku.gpu_memory_per_gpu_gib
    usable = per_gpu * USABLE_FRACTION
    fixed = CUDA_OVERHEAD_GIB + ctx * model.kv_bytes_per_token / GIB / gpn
    capacity = (usable - fixed) / WEIGHT_OVERHEAD
    if capacity <= 0:
        raise DoesNotFit(
            f"{model.name} cannot run on {sku.name}: a {sku.gpu_model} has {per_gpu:g} GiB, of which {usable:.1f} are "
            f"usable and {fixed:.1f} go to the CUDA context and the KV cache of {ctx} tokens."
        )
    gpus = int(WEIGHT_SAFETY * model.weight_size_gib / capacity) + 1

    if gpn > 1 and model.weight_size_gib < per_gpu / 2:
        tp, pp, dp = 1, 1, gpn
    else:
        tp = _tensor_parallel(model, gpn)
        pp = math.ceil(gpus / tp)
        dp = 1
    nodes = pp
    if pp > model.num_hidden_layers:
        raise DoesNotFit(
            f"{model.name} would need {gpus} x {sku.gpu_model} {per_gpu:g} GiB in {pp} pipeline stages, more than its "
            f"{model.num_hidden_layers} layers."
        )
    if node_count is not None and node_count < nodes:
        raise DoesNotFit(
            f"not enough GPU memory: {model.name} ({model.weight_size_gib:g} GiB of weights) needs {nodes} nodes of "
            f"{sku.name} ({gpus} x {sku.gpu_model} {per_gpu:g} GiB), but the count is {node_count}.",
            node_count,
        )
    max_len = _max_model_len(model, sku, tp, pp)
    if max_len < ctx:
        raise DoesNotFit(
            f"{model.name} on {nodes} x {sku.name} leaves KV space for {max_len} tokens, less than the context {ctx}.",
            nodes,
        )
    return Estimate(
        model=model.name,
        instance_type=sku.name,
        gpu_model=sku.gpu_model,
        gpus_per_node=gpn,
        gpu_memory_per_gpu_gib=per_gpu,
        context=ctx,
        kv_bytes_per_token=model.kv_bytes_per_token,
        usable_per_gpu_gib=round(usable, 3),
        fixed_per_gpu_gib=round(fixed, 3),
        weight_capacity_per_gpu_gib=round(capacity, 3),
        gpus_required=gpus,
        node_count=nodes,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        data_parallel=dp,
        max_model_len=max_len,
        disk_gib=disk_gib(model.weight_size_gib),
        readiness_timeout_s=readiness_timeout_s(model.weight_size_gib),
    )


def smallest_sku(model: ModelPreset, *, context: int | None = None, nodes: int = 1, cloud: str | None = None) -> GPUSku | None:
    """The instance type with the least GPU memory on which the model fits in `nodes` nodes."""
    fitting = []
    for sku in skus():
        if cloud and sku.cloud != cloud:
            continue
        try:
            if _size(model, sku, context or DEFAULT_CONTEXT, nodes).node_count <= nodes:
                fitting.append(sku)
        except DoesNotFit:
            continue
    return min(fitting, key=lambda s: (s.gpu_memory_gib, s.gpu_count, s.name), default=None)


def _smallest_hint(model: ModelPreset, context: int, nodes: int) -> str:
    where = "one node" if nodes == 1 else f"{nodes} nodes"
    by_cloud = [s for s in (smallest_sku(model, context=context, nodes=nodes, cloud=c) for c in ("azure", "aws")) if s]
    if not by_cloud:
        return f"No known instance type holds it on {where}."
    names = " or ".join(f"{s.name} ({s.gpu_count} x {s.gpu_model}, {s.gpu_memory_gib:g} GiB)" for s in by_cloud)
    return f"The smallest instance type that holds it on {where}: {names}."
