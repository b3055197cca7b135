"""GPU sizing pinned to upstream KAITO's answers and to hand-checked parallelism choices.

Each hand check follows the formula in presets/estimator.py; the comments show the arithmetic.
"""

import pytest

from kaito.presets import PresetError, estimate, get_model, get_sku, models, skus, smallest_sku
from kaito.presets.estimator import DoesNotFit, disk_gib, readiness_timeout_s
from helpers import run_cli


def est(model, sku, **kw):
    return estimate(get_model(model), get_sku(sku), **kw)


@pytest.mark.parametrize("model,sku,nodes", [
    ("phi-4-mini-instruct", "Standard_NC24ads_A100_v4", 1),
    ("llama-3.3-70b-instruct", "Standard_NC24ads_A100_v4", 3),
    ("llama-3.3-70b-instruct", "Standard_NC96ads_A100_v4", 1),
    ("phi-4", "Standard_NV36ads_A10_v5", 2),
    ("qwen2.5-coder-32b-instruct", "Standard_NC24ads_A100_v4", 2),
    # upstream's gpt-oss examples: 120b on one H100 NVL, 20b on one A100
    ("gpt-oss-120b", "Standard_NC40ads_H100_v5", 1),
    ("gpt-oss-20b", "Standard_NC24ads_A100_v4", 1),
    # 641.3 GiB of FP8 weights: 11 x H100 80 GiB (two nodes of 8), or 6 x H200 141 GiB (one node)
    ("deepseek-v3-0324", "Standard_ND96isr_H100_v5", 2),
    ("deepseek-r1-0528", "Standard_ND96isr_H200_v5", 1),
    ("mistral-large-3-675b-instruct-2512", "Standard_ND96isr_H200_v5", 1),
    ("kimi-k2.5", "p5e.48xlarge", 1),
])
def test_upstream_node_counts(model, sku, nodes):
    assert est(model, sku).node_count == nodes


def test_gpt_oss_sizes_count_the_served_weights():
    """Upstream's modelFileSize for gpt-oss counts the repository's second copy under original/ too
    (121.54 GiB for 120b); with that size the same formula gives upstream's 3 A100 nodes, with the
    60.77 GiB vLLM loads it gives 2."""
    model, sku = get_model("gpt-oss-120b"), get_sku("Standard_NC24ads_A100_v4")
    assert estimate(model, sku).node_count == 2
    assert estimate(model.model_copy(update={"weight_size_gib": 121.54}), sku).node_count == 3


def test_mla_sizing_deepseek_v3():
    """MLA KV is small (70272 B a token) but every tensor-parallel rank holds all of it."""
    model = get_model("deepseek-v3-0324")
    e = est("deepseek-v3-0324", "Standard_ND96isr_H100_v5")
    # fixed 2.3 + 2048 x 70272 B / 8 GPUs = 2.317; (67.2 - 2.317) / 1.05 = 61.79; int(1.02 x 641.3 / 61.79) + 1 = 11
    assert (e.kv_bytes_per_token, e.fixed_per_gpu_gib, e.gpus_required) == (70272, 2.317, 11)
    # 128 heads split over the node's 8 GPUs (no KV heads to divide), 2 pipeline stages
    assert (e.tensor_parallel, e.pipeline_parallel, e.node_count) == (8, 2, 2)
    # KV space on 16 GPUs: 16 x (67.2 - 2.3) - 641.3 x 1.05 = 365.035 GiB, for latents held 8 times (TP 8):
    # 365.035 GiB / (70272 B x 8) = 697207 tokens; the model's limit is 163840
    assert e.max_model_len == 163840
    unbounded = estimate(model.model_copy(update={"context_limit": 10**7}), get_sku("Standard_ND96isr_H100_v5"))
    assert unbounded.max_model_len == 697207


def test_every_preset_on_every_sku():
    """A node count, or an error that names the model and says why."""
    for model in models():
        fits = 0
        for sku in skus():
            try:
                e = estimate(model, sku)
            except DoesNotFit as err:
                assert model.name in str(err) and "instance type" in str(err)
                continue
            fits += 1
            assert e.node_count >= 1 and e.tensor_parallel * e.data_parallel <= sku.gpu_count
            assert e.tensor_parallel * e.pipeline_parallel >= e.gpus_required or e.data_parallel > 1
            assert 2048 <= e.max_model_len <= model.context_limit
        assert fits, f"{model.name} fits no instance type"


def test_upstream_parallelism_for_llama_70b():
    three = est("llama-3.3-70b-instruct", "Standard_NC24ads_A100_v4")
    assert (three.tensor_parallel, three.pipeline_parallel, three.data_parallel) == (1, 3, 1)
    one = est("llama-3.3-70b-instruct", "Standard_NC96ads_A100_v4")
    assert (one.tensor_parallel, one.pipeline_parallel, one.data_parallel) == (4, 1, 1)


# (model, sku, GPUs needed, nodes, TP, PP, DP)
HAND_CHECKED = [
    # 7.15 GiB < half of an 80 GiB A100 and the node has 8: one replica per GPU.
    ("phi-4-mini-instruct", "Standard_ND96amsr_A100_v4", 1, 1, 1, 1, 8),
    # fixed 2.3 + 2048*122880 B/2 = 2.417; (67.2-2.417)/1.05 = 61.70; int(1.02*77.93/61.70)+1 = 2 -> TP 2.
    ("falcon-40b-instruct", "Standard_NC48ads_A100_v4", 2, 1, 2, 1, 1),
    # 13.44 GiB > half an A10, so no DP; 1 GPU; TP stays 1 (71 heads do not split over 2).
    ("falcon-7b", "Standard_NV72ads_A10_v5", 1, 1, 1, 1, 1),
    # V100 16: (13.44-2.425)/1.05 = 10.49; int(1.02*14.96/10.49)+1 = 2 -> TP 2 on the 2-GPU node.
    ("llama-3.1-8b-instruct", "Standard_NC12s_v3", 2, 1, 2, 1, 1),
    # H100 NVL 94: (78.96-2.441)/1.05 = 72.88; int(1.02*60.77/72.88)+1 = 1.
    ("gpt-oss-120b", "Standard_NC40ads_H100_v5", 1, 1, 1, 1, 1),
    # A10 24: fixed 2.3 + 2048*507904 B = 3.269; (20.16-3.269)/1.05 = 16.09; int(1.02*51.1/16.09)+1 = 4 nodes.
    ("gemma-3-27b-it", "Standard_NV36ads_A10_v5", 4, 4, 1, 4, 1),
    # T4 16: (13.44-2.55)/1.05 = 10.37; int(1.02*13.5/10.37)+1 = 2 single-GPU nodes.
    ("mistral-7b-instruct", "Standard_NC4as_T4_v3", 2, 2, 1, 2, 1),
    # 4 x A10G: 2 GPUs needed, TP over all 4 (40 heads, 8 KV heads divide by 4).
    ("deepseek-r1-distill-qwen-14b", "g5.12xlarge", 2, 1, 4, 1, 1),
    # 8 x H200 141: (118.44-2.378)/1.05 = 110.5; int(1.02*131.42/110.5)+1 = 2; TP over the node's 8.
    ("llama-3.3-70b-instruct", "Standard_ND96isr_H200_v5", 2, 1, 8, 1, 1),
    # the embedded default on one A100.
    ("smollm2-135m-instruct", "Standard_NC24ads_A100_v4", 1, 1, 1, 1, 1),
]


@pytest.mark.parametrize("model,sku,gpus,nodes,tp,pp,dp", HAND_CHECKED)
def test_hand_checked_parallelism(model, sku, gpus, nodes, tp, pp, dp):
    e = est(model, sku)
    assert (e.gpus_required, e.node_count, e.tensor_parallel, e.pipeline_parallel, e.data_parallel) == (
        gpus, nodes, tp, pp, dp)


def test_memory_numbers_and_derived_limits():
    e = est("llama-3.1-8b-instruct", "Standard_NC12s_v3")
    assert e.usable_per_gpu_gib == pytest.approx(16 * 0.84)
    assert e.fixed_per_gpu_gib == pytest.approx(2.3 + 2048 * 131072 / 2**30 / 2, abs=1e-3)
    # KV left on 2 GPUs: 2*(13.44-2.3) - 14.96*1.05 = 6.572 GiB / 128 KiB a token
    assert e.max_model_len == 53837
    assert e.disk_gib == 95  # ceil(14.96 + 80)
    assert est("llama-3.3-70b-instruct", "Standard_NC24ads_A100_v4").readiness_timeout_s == 900 + int(18 * 131.42)
    assert readiness_timeout_s(0.25) == 30 * 60 and readiness_timeout_s(1000) == 180 * 60
    assert disk_gib(0.25) == 81


def test_context_changes_the_sizing():
    short = est("phi-3-mini-128k-instruct", "Standard_NV36ads_A10_v5")
    longer = est("phi-3-mini-128k-instruct", "Standard_NV36ads_A10_v5", context=16384)
    assert longer.fixed_per_gpu_gib > short.fixed_per_gpu_gib and longer.context == 16384
    with pytest.raises(PresetError, match="exceeds phi-3-mini-4k-instruct's limit of 4096"):
        est("phi-3-mini-4k-instruct", "Standard_NV36ads_A10_v5", context=8192)


def test_too_small_gpu_names_the_smallest_sku_that_fits():
    with pytest.raises(PresetError) as err:
        est("phi-3-mini-128k-instruct", "Standard_NC4as_T4_v3", context=131072)
    msg = str(err.value)
    assert "cannot run on Standard_NC4as_T4_v3" in msg
    assert "smallest instance type that holds it on one node: Standard_NC24ads_A100_v4" in msg
    with pytest.raises(PresetError, match="more than its 80 layers.*Standard_NC80adis_H100_v5"):
        est("llama-3.3-70b-instruct", "Standard_NV6ads_A10_v5")


def test_count_below_what_the_model_needs():
    with pytest.raises(PresetError, match="needs 3 nodes of Standard_NC24ads_A100_v4.*count is 2.*on 2 nodes"):
        est("llama-3.3-70b-instruct", "Standard_NC24ads_A100_v4", node_count=2)
    assert est("llama-3.3-70b-instruct", "Standard_NC24ads_A100_v4", node_count=3).node_count == 3


def test_smallest_sku():
    assert smallest_sku(get_model("llama-3.3-70b-instruct"), cloud="azure").name == "Standard_NC80adis_H100_v5"
    assert smallest_sku(get_model("smollm2-135m-instruct"), cloud="azure").gpu_memory_gib <= 4


def test_cli_estimate_json_and_table():
    done = run_cli("kaito-presets", "estimate", "llama-3.3-70b-instruct", "--instance-type",
                   "Standard_NC24ads_A100_v4", "--json")
    assert done.returncode == 0, done.stderr
    import json

    data = json.loads(done.stdout)
    assert (data["node_count"], data["pipeline_parallel"], data["tensor_parallel"]) == (3, 3, 1)
    table = run_cli("kaito-presets", "estimate", "phi-4", "--instance-type", "Standard_NV36ads_A10_v5")
    assert table.returncode == 0 and "tensor 1, pipeline 2, data 1" in table.stdout
    bad = run_cli("kaito-presets", "estimate", "phi4", "--instance-type", "Standard_NV36ads_A10_v5")
    assert bad.returncode == 2 and "Did you mean: phi-4" in bad.stderr
    nofit = run_cli("kaito-presets", "estimate", "llama-3.3-70b-instruct", "--instance-type",
                    "Standard_NC24ads_A100_v4", "--count", "1")
    assert nofit.returncode == 2 and "not enough GPU memory" in nofit.stderr and "Traceback" not in nofit.stderr
    deepseek = run_cli("kaito-presets", "estimate", "deepseek-v3-0324", "--instance-type", "Standard_ND96isr_H100_v5")
    assert deepseek.returncode == 0 and "tensor 8, pipeline 2, data 1" in deepseek.stdout, deepseek.stderr
    listed = run_cli("kaito-presets", "list", "--json")
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == len(models())
