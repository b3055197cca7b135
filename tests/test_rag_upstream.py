"""RAGEngines as upstream KAITO writes them (tests/upstream/ragengine_*.yaml, our own manifests in its
format): retrieve-only and CPU-only, the phi-3 example, a persistent volume, guardrails from a ConfigMap,
a Qdrant server. What they render to, upstream's validation messages, and the local runner running
them as kaito-rag processes answering over HTTP."""

from __future__ import annotations

import copy

import httpx
import pytest
from kaito.operator.api import RAGEngine
from kaito.operator.manifests import load
from kaito.operator.render import render
from kaito.operator.validation import validate
from test_upstream_manifests import UPSTREAM, manifests


def rendered(name: str) -> list[dict]:
    m, lookup = manifests(name)
    return [o for r in m.resources for o in render(r, lookup)]


def kinds(objs: list[dict]) -> list[str]:
    return sorted(o["kind"] for o in objs)


def pod(objs: list[dict]) -> dict:
    return next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]


def env(objs: list[dict]) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod(objs)["containers"][0]["env"]}


def test_retrieve_only_runs_on_ordinary_nodes_with_cpu_embeddings():
    objs = rendered("ragengine_retrieve_only.yaml")
    assert kinds(objs) == ["Deployment", "Service"]  # no NodeClaim
    spec = pod(objs)
    assert "tolerations" not in spec and "affinity" not in spec
    assert "nvidia.com/gpu" not in str(spec["containers"][0].get("resources", {}))
    e = env(objs)
    assert "LLM_INFERENCE_URL" not in e and e["KAITO_RAG_EMBEDDING_DEVICE"] == "cpu"
    assert e["DEFAULT_VECTOR_DB_PERSIST_DIR"] == "/mnt/vector-db"


def test_a_gpu_sku_gets_a_node_the_gpu_and_cuda_embeddings():
    objs = rendered("ragengine_phi_3.yaml")
    assert kinds(objs) == ["Deployment", "NodeClaim", "Service"]
    spec = pod(objs)
    assert spec["tolerations"] and spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    e = env(objs)
    assert e["KAITO_RAG_EMBEDDING_DEVICE"] == "cuda"
    assert e["LLM_INFERENCE_URL"] == "http://workspace-phi-3-mini/v1/completions" and e["LLM_CONTEXT_WINDOW"] == "4000"


def test_the_store_lives_on_the_persistent_volume():
    objs = rendered("ragengine_with_pvc.yaml")
    spec = pod(objs)
    volume = next(v for v in spec["volumes"] if v["name"] == "vector-db")
    assert volume["persistentVolumeClaim"] == {"claimName": "pvc-ragengine-vector-db"}
    assert {"name": "vector-db", "mountPath": "/mnt/data"} in spec["containers"][0]["volumeMounts"]
    assert env(objs)["DEFAULT_VECTOR_DB_PERSIST_DIR"] == "/mnt/data/ragengine-with-storage"  # one folder each


def test_guardrails_mount_the_policy_configmap():
    objs = rendered("ragengine_guardrails.yaml")
    assert "ConfigMap" not in kinds(objs)  # the user's ConfigMap is used as it is
    spec = pod(objs)
    assert {"name": "guardrails-policy", "configMap": {"name": "ragengine-guardrails-policy"}} in spec["volumes"]
    assert {"name": "guardrails-policy", "mountPath": "/etc/ragengine/guardrails", "readOnly": True} in \
        spec["containers"][0]["volumeMounts"]
    e = env(objs)
    assert e["OUTPUT_GUARDRAILS_ENABLED"] == "true" and e["OUTPUT_GUARDRAILS_FAIL_OPEN"] == "false"
    assert e["OUTPUT_GUARDRAILS_POLICY_PATH"] == "/etc/ragengine/guardrails/guardrails.yaml"


def test_qdrant_server_and_the_default_policy():
    objs = rendered("ragengine_qdrant.yaml")
    e = env(objs)
    assert e["VECTOR_DB_TYPE"] == "qdrant" and e["VECTOR_DB_URL"] == "http://qdrant-svc:6333"
    assert e["VECTOR_DB_ACCESS_SECRET"] == {"secretKeyRef": {"name": "qdrant-api-key", "key": "VECTOR_DB_ACCESS_SECRET"}}
    policy = next(o for o in objs if o["kind"] == "ConfigMap")
    assert policy["metadata"]["name"] == "ragengine-qdrant-guardrails-policy"
    assert "type: secrets" in policy["data"]["guardrails.yaml"]
    assert {"name": "guardrails-policy", "configMap": {"name": "ragengine-qdrant-guardrails-policy"}} in pod(objs)["volumes"]
    from kaito.ragservice.config import Settings, from_env

    settings = Settings(**from_env({k: v if isinstance(v, str) else "from-a-secret" for k, v in e.items()}))
    assert settings.vector_db == "qdrant" and settings.vector_db_key == "from-a-secret"  # what kaito-rag reads back
    assert settings.guardrails_enabled and str(settings.guardrails_policy) == e["OUTPUT_GUARDRAILS_POLICY_PATH"]


def errors(rag: RAGEngine, lookup=None) -> list[str]:
    return [str(e) for e in validate(rag, lookup=lookup)]


def test_validation_follows_upstream():
    m, lookup = manifests("ragengine_guardrails.yaml")
    rag = next(r for r in m.resources if isinstance(r, RAGEngine))
    assert errors(rag, lookup) == []
    bad = copy.deepcopy(rag)
    bad.spec.inference_service.context_window_size = 0
    bad.spec.inference_service.url = "not a url"
    found = errors(bad, lookup)
    assert "spec.inferenceService.contextWindowSize: ContextWindowSize must be a positive integer" in found
    assert any("URL input error" in e for e in found)
    no_key = lambda kind, name: {"data": {"policy.yaml": ""}}  # noqa: E731
    assert errors(rag, no_key) == ["spec.guardrails.configMapRef.name: ConfigMap 'ragengine-guardrails-policy' has "
                                   "no guardrails.yaml key"]
    unknown = lambda kind, name: {"data": {"guardrails.yaml": "scanners: [{type: toxicity}]"}}  # noqa: E731
    warned = validate(rag, lookup=unknown)
    assert [w.warning for w in warned] == [True] and "unknown scanner type 'toxicity'" in str(warned[0])
    m, _ = manifests("ragengine_qdrant.yaml")
    db = m.resources[0]
    db.spec.storage.vector_db.engine = "milvus"
    assert errors(db) == ["spec.storage.vectorDB.engine: unsupported vector database engine 'milvus'; supported: "
                          "qdrant"]


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """The retrieve-only, phi-3, persistent-volume and guardrails RAGEngines applied with the local runner."""
    from kaito.operator.local import LocalRunner
    from kaito.operator.manifests import Manifests

    runner = LocalRunner(tmp_path_factory.mktemp("kaito-home"))
    names = ["ragengine_retrieve_only.yaml", "ragengine_phi_3.yaml", "ragengine_with_pvc.yaml",
             "ragengine_guardrails.yaml"]
    loaded = [load(UPSTREAM / n) for n in names]
    applied = Manifests([r for m in loaded for r in m.resources], [o for m in loaded for o in m.objects])
    try:
        lines = runner.apply(applied, cpu=True)
        assert all(" created (kaito-rag on http://127.0.0.1:" in line for line in lines), lines
        runner.wait(applied, 240)
        urls = {rec.name: rec.url for _, rec in runner.records()}
        yield urls
    finally:
        for r in applied.resources:
            runner.delete(r.kind, r.namespace, r.name)


def test_the_local_runner_runs_upstream_ragengines(running):
    assert set(running) == {"ragengine-retrieve-only", "ragengine-start", "ragengine-with-storage",
                            "ragengine-with-guardrails"}
    for url in running.values():
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    rag = httpx.Client(base_url=running["ragengine-retrieve-only"], timeout=120)
    r = rag.post("/index", json={"index_name": "docs", "documents": [
        {"text": "The Zorblax vault opens with the password tangerine-42."}, {"text": "Kelp grows fast."}]})
    assert r.status_code == 200, r.text
    hits = rag.post("/retrieve", json={"index_name": "docs", "query": "Zorblax vault password"}).json()["results"]
    assert "tangerine" in hits[0]["text"] and hits[0]["vector_score"] > hits[1]["vector_score"]
    for path, body in (("/query", {"index_name": "docs", "query": "password?"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = rag.post(path, json=body)
        assert r.status_code == 400 and "no inference service is configured" in r.json()["detail"], r.text
