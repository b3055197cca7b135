"""Every validation rule of Workspace and RAGEngine, with the message the user sees."""

from __future__ import annotations

import copy
import time

import pytest
from kaito.operator.manifests import ManifestError, loads, parse
from kaito.operator.sources import url_problem
from kaito.operator.validation import validate
from kaito.operator.webhook import admission_review

INFERENCE = {
    "apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "ws"},
    "resource": {"instanceType": "Standard_NC24ads_A100_v4", "labelSelector": {"matchLabels": {"apps": "x"}}},
    "inference": {"preset": {"name": "phi-4"}},
}
TUNING = {
    "apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "ws"},
    "resource": {"instanceType": "Standard_NC24ads_A100_v4", "labelSelector": {"matchLabels": {"apps": "x"}}},
    "tuning": {"preset": {"name": "phi-4"}, "method": "lora", "input": {"urls": ["https://example.com/d.jsonl"]},
               "output": {"volumeSource": {"persistentVolumeClaim": {"claimName": "out"}}}},
}
RAG = {
    "apiVersion": "kaito.sh/v1beta1", "kind": "RAGEngine", "metadata": {"name": "rag"},
    "spec": {"compute": {"instanceType": "Standard_NC6s_v3", "labelSelector": {"matchLabels": {"apps": "rag"}}},
             "embedding": {"local": {"modelID": "BAAI/bge-small-en-v1.5"}},
             "inferenceService": {"url": "http://ws/v1", "contextWindowSize": 4096}},
}
CONFIGMAPS = {
    "good": {"data": {"inference_config.yaml": "vllm:\n  max-model-len: 4096\n"}},
    "too-long": {"data": {"inference_config.yaml": "vllm:\n  max-model-len: 100000\n"}},
    "not-yaml": {"data": {"inference_config.yaml": "vllm: [unclosed\n"}},
    "owned-flag": {"data": {"inference_config.yaml": "vllm:\n  port: 8000\n"}},
    "wrong-key": {"data": {"config.yaml": "vllm: {}\n"}},
    "tune": {"data": {"training_config.yaml": "training_config: {}\n"}},
    "huge": {"data": {"inference_config.yaml": "vllm:\n  max-model-len: 131072\n"}},
}


def lookup(kind, name):
    return CONFIGMAPS.get(name) if kind == "ConfigMap" else None


def with_(base: dict, path: str, value) -> dict:
    """A copy of `base` with the dotted `path` set (value None: removed)."""
    doc = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return doc


def messages(doc: dict, old: dict | None = None, warnings: bool = False) -> list[str]:
    found = validate(parse(doc), parse(old) if old else None, lookup)
    return [str(e) for e in found if e.warning == warnings]


def test_valid_resources_pass():
    assert messages(INFERENCE) == []
    assert messages(TUNING) == []
    assert messages(RAG) == []
    assert messages(with_(INFERENCE, "inference.config", "good")) == []
    # upstream's optional RAGEngine parts: no compute (CPU), no LLM (retrieve-only), a Qdrant server
    assert messages(with_(with_(RAG, "spec.compute", None), "spec.inferenceService", None)) == []
    assert messages(with_(RAG, "spec.storage", {"vectorDB": {"engine": "qdrant", "url": "http://q"}})) == []


ADAPTER = {"source": {"name": "a1", "image": "registry.io/adapters/a1:0.1"}, "strength": "0.5"}

# (document, substring of the one expected message)
CASES = {
    "neither inference nor tuning": (with_(INFERENCE, "inference", None),
                                     "Either Inference or Tuning must be specified, not neither"),
    "both inference and tuning": ({**INFERENCE, "tuning": TUNING["tuning"]},
                                  "Either Inference or Tuning must be specified, but not both"),
    "no preset nor template": (with_(INFERENCE, "inference.preset", None), "Preset or Template must be specified"),
    "preset and template": (with_(INFERENCE, "inference.template", {"spec": {"containers": [
        {"name": "c", "image": "x"}]}}), "Preset and Template cannot be set at the same time"),
    "bad template": (with_(with_(INFERENCE, "inference.preset", None), "inference.template",
                           {"spec": {"containers": [{"name": "c", "image": "x", "bogus": 1}]}}),
                     "inference.template: spec.containers.0: Additional properties are not allowed ('bogus'"),
    "unknown preset, with suggestions": (with_(INFERENCE, "inference.preset.name", "phi-5"),
                                         "Unsupported inference preset name 'phi-5'. Did you mean: phi-4"),
    "unknown instance type": (with_(INFERENCE, "resource.instanceType", "Standard_NC24ads_A100_v9"),
                              ("Unsupported instance type 'Standard_NC24ads_A100_v9'. Did you mean: "
                              "Standard_NC24ads_A100_v4")),
    "no instance type": (with_(INFERENCE, "resource.instanceType", None), "instanceType is required"),
    "no label selector": (with_(INFERENCE, "resource.labelSelector", None), "labelSelector is required"),
    "selector In without values": (with_(INFERENCE, "resource.labelSelector", {"matchExpressions": [
        {"key": "a", "operator": "In"}]}), "a: operator In needs values"),
    "transformers runtime on several nodes, smallest SKU named": (
        with_(with_(INFERENCE, "inference.preset.name", "llama-3.3-70b-instruct"),
              "metadata.annotations", {"kaito.sh/runtime": "transformers"}),
        "Multi-node distributed inference is not supported with Huggingface Transformers runtime: "
        "llama-3.3-70b-instruct needs 3 nodes of Standard_NC24ads_A100_v4; use the vLLM runtime (the default) or an "
        "instance type that holds it on one node, such as Standard_NC80adis_H100_v5"),
    "unknown runtime": (with_(INFERENCE, "metadata.annotations", {"kaito.sh/runtime": "tgi"}),
                        "unsupported runtime 'tgi'"),
    "bad name": (with_(INFERENCE, "metadata.name", "My_Workspace"), "must be a DNS-1123 label"),
    "too many adapters": (with_(INFERENCE, "inference.adapters", [
        {"source": {"name": f"a{i}", "image": f"registry.io/a:{i}"}} for i in range(11)]),
        "Number of Adapters exceeds the maximum limit, maximum of 10 allowed"),
    "duplicate adapter names": (with_(INFERENCE, "inference.adapters", [ADAPTER, ADAPTER]),
                                "Duplicate adapter source name found: a1"),
    "adapter with neither image nor volume": (with_(INFERENCE, "inference.adapters", [{"source": {"name": "a1"}}]),
                                              "Either Image or Volume must be specified for adapter source"),
    "adapter from URLs": (with_(INFERENCE, "inference.adapters", [{"source": {
        "name": "a1", "image": "registry.io/a:1", "urls": ["https://example.com/a"]}}]),
        "URLs are not supported as adapter source"),
    "adapter without name": (with_(INFERENCE, "inference.adapters", [{"source": {"image": "registry.io/a:1"}}]),
                             "Name of Adapter field must be specified"),
    "adapter strength above 1": (with_(INFERENCE, "inference.adapters", [{**ADAPTER, "strength": "1.5"}]),
                                 "Strength value for Adapter 'a1' must be between 0 and 1"),
    "adapter strength below 0": (with_(INFERENCE, "inference.adapters", [{**ADAPTER, "strength": -0.1}]),
                                 "Strength value for Adapter 'a1' must be between 0 and 1"),
    "adapter strength not a number": (with_(INFERENCE, "inference.adapters", [{**ADAPTER, "strength": "high"}]),
                                      "Invalid strength value for Adapter 'a1'"),
    "adapter volume not a volume": (with_(INFERENCE, "inference.adapters", [{"source": {
        "name": "a1", "volumeSource": {"persistentVolumeClaim": {"claim": "x"}}}}]),
        "'claimName' is a required property"),
    "inference config missing": (with_(INFERENCE, "inference.config", "nope"), "ConfigMap 'nope' not found"),
    "inference config key missing": (with_(INFERENCE, "inference.config", "wrong-key"),
                                     "has no inference_config.yaml key"),
    "inference config not YAML": (with_(INFERENCE, "inference.config", "not-yaml"),
                                  "inference_config.yaml is not valid YAML"),
    "inference config sets a runtime-owned flag": (with_(INFERENCE, "inference.config", "owned-flag"),
                                                   "vllm.port is set by kaito-serve itself"),
    "max-model-len over the model's limit": (with_(INFERENCE, "inference.config", "too-long"),
                                             "context 100000 exceeds phi-4's limit of 16384 tokens"),
    "max-model-len the GPUs cannot hold": (
        with_(with_(with_(INFERENCE, "inference.preset.name", "llama-3.1-8b-instruct"), "inference.config", "huge"),
              "resource.instanceType", "Standard_NC4as_T4_v3"),
        ("inference.config: llama-3.1-8b-instruct cannot run on Standard_NC4as_T4_v3: a T4 has 16 GiB, of which "
         "13.4 are usable and 18.3 go to the CUDA context and the KV cache of 131072 tokens")),
    "tuning method": (with_(TUNING, "tuning.method", "full"), "Unsupported tuning method 'full': use lora or qlora"),
    "tuning on several nodes": (with_(TUNING, "resource.count", 2),
                                "Tuning does not currently support multinode configurations"),
    "tuning preset missing": (with_(TUNING, "tuning.preset", None), "missing field: Preset"),
    "tuning preset unknown": (with_(TUNING, "tuning.preset.name", "phi-44"),
                              "Unsupported tuning preset name 'phi-44'"),
    "tuning method the preset lacks": (with_(TUNING, "tuning.preset.name", "gpt-oss-20b"),
                                       "gpt-oss-20b does not support lora tuning"),
    "tuning config missing": (with_(TUNING, "tuning.config", "nope"), "ConfigMap 'nope' not found"),
    "tuning input missing": (with_(TUNING, "tuning.input", None), "missing field: Input"),
    "tuning input with two sources": (with_(TUNING, "tuning.input.image", "registry.io/data:1"),
                                      "Exactly one of URLs, Volume, or Image must be specified"),
    "tuning input with no source": (with_(TUNING, "tuning.input", {"name": "x"}),
                                    "Exactly one of URLs, Volume, or Image must be specified"),
    "data URL not http": (with_(TUNING, "tuning.input.urls", ["ftp://example.com/d"]),
                          "data source URL must use HTTP or HTTPS"),
    "data URL loopback": (with_(TUNING, "tuning.input.urls", ["http://127.0.0.1:8000/d"]),
                          "must not target a loopback, private, or link-local address"),
    "data URL private": (with_(TUNING, "tuning.input.urls", ["http://10.1.2.3/d"]),
                         "must not target a loopback, private, or link-local address"),
    "data URL metadata": (with_(TUNING, "tuning.input.urls", ["http://169.254.169.254/latest/meta-data"]),
                          "must not target a loopback, private, or link-local address"),
    "data URL localhost": (with_(TUNING, "tuning.input.urls", ["http://localhost/d"]),
                           "must not target a local or metadata endpoint"),
    "bad image reference": (with_(TUNING, "tuning.input", {"image": "Not An Image"}), ("Unable to parse image "
                                                                                       "reference")),
    "output image without push secret": (with_(TUNING, "tuning.output", {"image": "registry.io/out:1"}),
                                         "Must specify imagePushSecret with destination image"),
    "output with two destinations": (with_(TUNING, "tuning.output.image", "registry.io/out:1"),
                                     "Exactly one of Volume or Image must be specified"),
    "output missing": (with_(TUNING, "tuning.output", None), "missing field: Output"),
    "rag unknown instance type": (with_(RAG, "spec.compute.instanceType", "Standard_X"), "Unsupported instance type"),
    "rag without embedding": (with_(RAG, "spec.embedding", None), "Embedding must be specified"),
    "rag with both embeddings": (with_(RAG, "spec.embedding.remote", {"url": "https://e.example.com"}),
                                 "Either remote embedding or local embedding must be specified, but not both"),
    "rag with no embedding kind": (with_(RAG, "spec.embedding", {}),
                                   "Either remote embedding or local embedding must be specified, not neither"),
    "rag local embedding with image and model": (with_(RAG, "spec.embedding.local.image", "registry.io/emb:1"),
                                                 "Either image or modelID must be specified, but not both"),
    "rag local embedding with neither": (with_(RAG, "spec.embedding.local", {}),
                                         "Either image or modelID must be specified, not neither"),
    "rag remote embedding URL": (with_(RAG, "spec.embedding", {"remote": {"url": "not a url"}}), "URL input error"),
    "rag inference URL": (with_(RAG, "spec.inferenceService.url", "ws:80"), "URL input error"),
    "rag context window": (with_(RAG, "spec.inferenceService.contextWindowSize", 0),
                           "ContextWindowSize must be a positive integer"),
    "rag vector DB engine": (with_(RAG, "spec.storage", {"vectorDB": {"engine": "milvus", "url": "http://q"}}),
                             "unsupported vector database engine 'milvus'; supported: qdrant"),
    "rag vector DB URL": (with_(RAG, "spec.storage", {"vectorDB": {"engine": "qdrant", "url": "q:6333"}}),
                          "URL input error"),
    "rag guardrails ConfigMap name": (with_(RAG, "spec.guardrails", {"enabled": True, "configMapRef": {"name": "Bad_Name"}}),
                                      "is not a valid ConfigMap name"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rule(case):
    doc, expected = CASES[case]
    found = messages(doc)
    assert any(expected in m for m in found), f"{case}: {found}"


IMMUTABLE = {
    "instanceType": (INFERENCE, "resource.instanceType", "Standard_NC48ads_A100_v4",
                     "resource.instanceType: instanceType cannot be changed once set"),
    "labelSelector": (INFERENCE, "resource.labelSelector", {"matchLabels": {"apps": "y"}},
                      "resource.labelSelector: field is immutable"),
    "count": (INFERENCE, "resource.count", 2, "resource.count: field is immutable"),
    "preset": (INFERENCE, "inference.preset.name", "phi-4-mini-instruct", "inference.preset: field is immutable"),
    "tuning preset": (TUNING, "tuning.preset.name", "phi-4-mini-instruct", "tuning.preset: Preset cannot be changed"),
    "tuning method": (TUNING, "tuning.method", "qlora", "tuning.method: Method cannot be changed"),
    "inference to tuning": (INFERENCE, "inference", None, "Inference field cannot be toggled once set"),
    "runtime": (INFERENCE, "metadata.annotations", {"kaito.sh/runtime": "transformers"},
                "metadata.annotations[kaito.sh/runtime]: field is immutable"),
    "rag compute": (RAG, "spec.compute.instanceType", "Standard_NC12s_v3", "instanceType cannot be changed"),
}


@pytest.mark.parametrize("case", list(IMMUTABLE))
def test_immutable_on_update(case):
    base, path, value, expected = IMMUTABLE[case]
    new = with_(base, path, value)
    if case == "inference to tuning":
        new = {**new, "tuning": TUNING["tuning"]}
    assert any(expected in m for m in messages(new, old=base)), messages(new, old=base)
    assert not [m for m in messages(base, old=base)]  # an unchanged update is fine


def test_changing_adapters_on_update_is_allowed():
    new = with_(INFERENCE, "inference.adapters", [ADAPTER])
    assert messages(new, old=INFERENCE) == []


def test_gated_model_without_token_is_a_warning():
    doc = with_(INFERENCE, "inference.preset.name", "mistral-7b-instruct")
    assert messages(doc) == []
    assert any("gated on Hugging Face" in m for m in messages(doc, warnings=True))


def test_private_model_image_is_a_warning():
    doc = with_(INFERENCE, "inference.preset", {"name": "phi-4", "accessMode": "private",
                                                "presetOptions": {"image": "registry.io/phi-4:0.1"}})
    assert messages(doc) == []
    assert any("private model images are deprecated upstream and not used" in m for m in messages(doc, warnings=True))


def test_preset_by_hugging_face_id_and_upstream_default_configs():
    assert messages(with_(INFERENCE, "inference.preset.name", "microsoft/phi-4")) == []
    assert messages(with_(TUNING, "tuning.config", "qlora-params-template")) == []
    assert messages(with_(TUNING, "tuning.config", "tune")) == []


def test_upstream_probe_steps_key_is_accepted():
    CONFIGMAPS["probe"] = {"data": {"inference_config.yaml": "max_probe_steps: 6\nvllm:\n  max-model-len: 8192\n"}}
    assert messages(with_(INFERENCE, "inference.config", "probe")) == []


def test_url_rules_accept_public_hosts():
    assert url_problem("https://huggingface.co/datasets/x/resolve/main/d.parquet?download=true") is None
    assert url_problem("http://8.8.8.8/data") is None
    assert url_problem("http://[::1]/d") is not None
    assert url_problem("http://[fe80::1]/d") is not None


def test_parse_errors_name_the_field():
    with pytest.raises(ManifestError, match=r"resource.instancType: unknown field"):
        loads("apiVersion: kaito.sh/v1beta1\nkind: Workspace\nmetadata: {name: ws}\nresource: {instancType: x}\n")
    with pytest.raises(ManifestError, match=r"apiVersion must be kaito.sh/v1beta1"):
        loads("apiVersion: kaito.sh/v2\nkind: Workspace\nmetadata: {name: ws}\n")
    with pytest.raises(ManifestError, match=r"resource.count: Input should be greater than or equal to 1"):
        loads("apiVersion: kaito.sh/v1beta1\nkind: Workspace\nmetadata: {name: ws}\nresource: {count: 0}\n")
    with pytest.raises(ManifestError, match=r"apiVersion: Field required"):
        loads("kind: Workspace\nmetadata: {name: ws}\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        loads("kind: [")


def test_admission_review_allows_denies_and_warns():
    def review(obj, old=None, op="CREATE"):
        req = {"uid": "u1", "operation": op, "object": obj, **({"oldObject": old} if old else {})}
        return admission_review({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req},
                                lookup)["response"]

    assert review(INFERENCE) == {"uid": "u1", "allowed": True}
    denied = review(with_(INFERENCE, "inference.preset.name", "phi-5"))
    assert not denied["allowed"] and denied["status"]["code"] == 422
    assert "Unsupported inference preset name 'phi-5'" in denied["status"]["message"]
    update = review(with_(INFERENCE, "resource.instanceType", "Standard_NC48ads_A100_v4"), INFERENCE, "UPDATE")
    assert not update["allowed"] and "cannot be changed" in update["status"]["message"]
    warned = review(with_(INFERENCE, "inference.preset.name", "mistral-7b-instruct"))
    assert warned["allowed"] and "gated" in warned["warnings"][0]
    garbage = review({"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "x"},
                      "resource": {"count": "many"}})
    assert not garbage["allowed"] and "resource.count" in garbage["status"]["message"]


def test_webhook_over_https(tmp_path):
    """`kaito-operator webhook` as the API server calls it: HTTPS, AdmissionReview in and out."""
    import ssl
    import subprocess

    import httpx
    from helpers import BIN, free_port

    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    port = free_port()
    proc = subprocess.Popen([str(BIN / "kaito-operator"), "webhook", "--host", "127.0.0.1", "--port", str(port),
                             "--tls-cert", str(cert), "--tls-key", str(key)], stderr=subprocess.PIPE)
    try:
        client = httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ssl.create_default_context(cafile=str(cert)),
                              timeout=10)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.get("/healthz")
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.2)

        def review(obj):
            body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "request": {"uid": "abc", "operation": "CREATE", "object": obj}}
            r = client.post("/validate", json=body)
            assert r.status_code == 200, r.text
            return r.json()["response"]

        assert review(INFERENCE) == {"uid": "abc", "allowed": True}
        denied = review(with_(TUNING, "tuning.input.urls", ["http://169.254.169.254/"]))
        assert denied["allowed"] is False
        assert "must not target a loopback, private, or link-local address" in denied["status"]["message"]
        assert client.post("/validate", content=b"{not json").status_code == 400
        assert client.post("/validate", json={"kind": "Pod"}).status_code == 400
    finally:
        proc.terminate()
        proc.wait(timeout=10)
