"""kaito-rag: real processes on 127.0.0.1 (the packaged MiniLM embedding model, FAISS, SQLite) driven over
HTTP with httpx and the openai SDK; `kaito-serve --backend transformers` on the default model is the LLM."""

import concurrent.futures
import json
import signal
import threading
import time

import httpx
import openai
import pytest

from helpers import RagServer, Server, run_cli

KEY = "rag-key"
LLM_KEY = "llm-key"
FACTS = {  # planted facts: (document, a question about it in other words)
    "vault": ("The vault of the Zorblax company opens with the password tangerine-42.",
              "What is the password for the Zorblax vault?"),
    "kelp": ("Kelp forests off the coast of Namibia grow up to thirty centimetres per day.",
             "How fast does kelp grow near Namibia?"),
    "scope": ("The Lumen-9 telescope was assembled in Reykjavik in the year 2031.",
              "Where was the Lumen-9 telescope built?"),
}
FILLER = [f"{topic} is a subject that many people find {adj}, and it has a long history of {thing}."
          for topic in ("Gardening", "Chess", "Baking bread", "Sailing", "Jazz music", "Pottery", "Cycling",
                        "Astronomy", "Knitting", "Beekeeping")
          for adj, thing in (("relaxing", "small improvements"), ("difficult", "famous competitions"),
                             ("rewarding", "regional traditions"))]
KEYWORD_DOC = "Ticket QZ-88123 was filed about the squeaky left hinge of the garden gate."
PYTHON = "\n".join(f"def handler_{i}(event):\n    \"\"\"Handle event number {i}.\"\"\"\n    total = event * {i}\n"
                   f"    return total + {i}\n" for i in range(40))


@pytest.fixture(scope="module")
def servers(default_model_dir, tmp_path_factory):
    """kaito-serve (the LLM, with a key) and kaito-rag configured through the environment, started together."""
    llm = Server("--backend", "transformers", "--adapters-dir", str(tmp_path_factory.mktemp("no-adapters")),
                 "--api-key", LLM_KEY)
    rag = RagServer("--api-key", KEY, env={
        "DEFAULT_VECTOR_DB_PERSIST_DIR": str(tmp_path_factory.mktemp("rag-storage")),
        "LLM_INFERENCE_URL": f"{llm.url}/v1/chat/completions", "LLM_ACCESS_SECRET": LLM_KEY,
        "KAITO_RAG_MAX_DOCUMENTS": "100", "KAITO_RAG_MAX_TEXT_CHARS": "200000", "KAITO_RAG_MAX_BODY_BYTES": "2000000"})
    try:
        rag.wait_ready(120)
        llm.wait_ready(300)
        yield rag, llm
    finally:
        rag.stop()
        llm.stop()


@pytest.fixture(scope="module")
def rag(servers):
    with httpx.Client(base_url=servers[0].url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def facts(rag):
    docs = [{"text": text, "metadata": {"kind": "fact", "name": name}} for name, (text, _) in FACTS.items()]
    docs += [{"text": t, "metadata": {"kind": "filler", "n": i}} for i, t in enumerate(FILLER)]
    docs.append({"text": KEYWORD_DOC, "doc_id": "ticket", "metadata": {"kind": "ticket"}})
    r = rag.post("/index", json={"index_name": "facts", "documents": docs})
    assert r.status_code == 200, r.text
    return r.json()


def retrieve(rag, query, index="facts", **kw):
    r = rag.post("/retrieve", json={"index_name": index, "query": query, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_health_is_open_and_everything_else_needs_the_key(servers):
    url = servers[0].url
    assert httpx.get(f"{url}/health").json()["status"] == "Healthy"
    assert httpx.get(f"{url}/indexes").status_code == 401
    assert httpx.get(f"{url}/indexes", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{url}/retrieve", json={"index_name": "facts", "query": "x"}).status_code == 401


def test_index_returns_stored_documents_and_ignores_repeats(rag, facts):
    first = facts[0]
    assert first["text"] == FACTS["vault"][0] and first["metadata"] == {"kind": "fact", "name": "vault"}
    assert first["doc_id"] == first["hash_value"] and len(first["hash_value"]) == 64 and not first["is_truncated"]
    assert facts[-1]["doc_id"] == "ticket"
    total = rag.get("/indexes/facts/documents").json()["total_items"]
    assert total == len(FACTS) + len(FILLER) + 1
    again = rag.post("/index", json={"index_name": "facts", "documents": [{"text": FACTS["vault"][0]}]})
    assert again.status_code == 200 and again.json()[0]["doc_id"] == first["doc_id"]
    assert rag.get("/indexes/facts/documents").json()["total_items"] == total
    assert "facts" in rag.get("/indexes").json()


def test_list_documents_pages_truncates_and_filters(rag, facts):
    page = rag.get("/indexes/facts/documents", params={"limit": 5, "offset": 2, "max_text_length": 20}).json()
    assert page["count"] == 5 and page["total_items"] == len(facts)
    assert [d["doc_id"] for d in page["documents"]] == [d["doc_id"] for d in facts[2:7]]
    assert all(len(d["text"]) <= 20 and d["is_truncated"] for d in page["documents"])
    full = rag.get("/indexes/facts/documents", params={"limit": 1, "max_text_length": 10_000}).json()
    assert full["documents"][0]["text"] == FACTS["vault"][0] and not full["documents"][0]["is_truncated"]
    only = rag.get("/indexes/facts/documents", params={"metadata_filter": json.dumps({"kind": "fact", "name": "kelp"})})
    assert [d["text"] for d in only.json()["documents"]] == [FACTS["kelp"][0]] and only.json()["total_items"] == 1
    typed = rag.get("/indexes/facts/documents", params={"metadata_filter": json.dumps({"n": "3"})}).json()
    assert typed["total_items"] == 0  # exact match: the number 3 is not the string "3"
    assert rag.get("/indexes/facts/documents", params={"metadata_filter": "{not json"}).status_code == 400
    assert rag.get("/indexes/facts/documents", params={"limit": 0}).status_code == 422
    assert rag.get("/indexes/facts/documents", params={"limit": 101}).status_code == 422
    assert rag.get("/indexes/nope/documents").status_code == 404


def test_planted_facts_come_back_first(rag, facts):
    for name, (text, question) in FACTS.items():
        body = retrieve(rag, question, max_node_count=3)
        assert body["query"] == question and body["count"] == 3
        top = body["results"][0]
        assert top["text"] == text and top["metadata"]["name"] == name, (question, body["results"])
        scores = [r["score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True) and scores[0] > scores[1]
        assert top["doc_id"] and top["node_id"]


def test_keyword_only_match_is_found(rag, facts):
    body = retrieve(rag, "QZ-88123", max_node_count=3)
    assert body["results"][0]["doc_id"] == "ticket"


def test_retrieve_filters_and_bounds(rag, facts):
    body = retrieve(rag, FACTS["vault"][1], max_node_count=5, metadata_filter={"kind": "filler"})
    assert body["count"] == 5 and all(r["metadata"]["kind"] == "filler" for r in body["results"])
    assert retrieve(rag, "anything", metadata_filter={"kind": "missing"})["count"] == 0
    assert retrieve(rag, "gardening", max_node_count=300)["count"] == len(facts)
    for bad in (0, 301):
        assert rag.post("/retrieve", json={"index_name": "facts", "query": "x", "max_node_count": bad}).status_code == 422
    assert rag.post("/retrieve", json={"index_name": "nope", "query": "x"}).status_code == 404


def test_update_and_delete_really_change_the_vectors(rag):
    docs = [{"doc_id": "a", "text": "The office cat is called Marmalade.", "metadata": {"v": 1}},
            {"doc_id": "b", "text": "The office plant is a fern.", "metadata": {"v": 1}}]
    assert rag.post("/index", json={"index_name": "mutable", "documents": docs}).status_code == 200
    r = rag.post("/indexes/mutable/documents", json={"documents": [
        {"doc_id": "a", "text": "The office cat is called Biscuit.", "metadata": {"v": 2}},
        {"doc_id": "b", "text": "The office plant is a fern.", "metadata": {"v": 1}},
        {"doc_id": "zz", "text": "ghost", "metadata": {}}]}).json()
    assert [d["doc_id"] for d in r["updated_documents"]] == ["a"]
    assert [d["doc_id"] for d in r["unchanged_documents"]] == ["b"]
    assert [d["doc_id"] for d in r["not_found_documents"]] == ["zz"]
    hits = retrieve(rag, "What is the office cat called?", index="mutable", max_node_count=10)["results"]
    assert [h["text"] for h in hits if "cat" in h["text"]] == ["The office cat is called Biscuit."]
    assert hits[0]["metadata"] == {"v": 2} and len(hits) == 2  # the old chunk's vector is gone
    r = rag.post("/indexes/mutable/documents/delete", json={"doc_ids": ["b", "nope"]}).json()
    assert r == {"deleted_doc_ids": ["b"], "not_found_doc_ids": ["nope"]}
    hits = retrieve(rag, "office plant fern", index="mutable", max_node_count=10)["results"]
    assert [h["doc_id"] for h in hits] == ["a"]
    assert rag.post("/indexes/nope/documents/delete", json={"doc_ids": ["a"]}).status_code == 404
    assert rag.post("/indexes/nope/documents", json={"documents": [{"doc_id": "a", "text": "x"}]}).status_code == 404


def test_code_is_split_along_functions(rag):
    r = rag.post("/index", json={"index_name": "code", "documents": [
        {"text": PYTHON, "doc_id": "handlers.py", "metadata": {"split_type": "code", "language": "python"}}]})
    assert r.status_code == 200, r.text
    hits = retrieve(rag, "handler_17", index="code", max_node_count=50)["results"]
    assert len(hits) > 1  # several chunks
    assert all(h["text"].startswith("def handler_") for h in hits)  # each starts at a function boundary
    assert "def handler_17(event)" in hits[0]["text"]
    bad = rag.post("/index", json={"index_name": "code", "documents": [
        {"text": "x := 1", "metadata": {"split_type": "code", "language": "cobol"}}]})
    assert bad.status_code == 400 and "python" in bad.json()["detail"] and "cobol" in bad.json()["detail"]


def test_index_lifecycle_persist_and_load(rag, servers, facts):
    assert rag.post("/persist/facts").status_code == 200
    assert rag.post("/persist/facts", params={"path": "backups/facts"}).status_code == 200
    assert rag.post("/load/restored", params={"path": "backups/facts"}).status_code == 200
    assert rag.get("/indexes/restored/documents").json()["total_items"] == len(facts)
    assert retrieve(rag, FACTS["kelp"][1], index="restored")["results"][0]["text"] == FACTS["kelp"][0]
    assert rag.post("/load/restored", params={"path": "backups/facts"}).status_code == 409
    assert rag.post("/load/restored", params={"path": "backups/facts", "overwrite": "true"}).status_code == 200
    assert rag.post("/load/other", params={"path": "backups/missing"}).status_code == 404
    assert rag.post("/load/facts").status_code == 409  # default path: snapshots/facts
    for escape in ("../outside", "/etc", "backups/../../x", "indexes/facts"):
        assert rag.post("/load/x", params={"path": escape}).status_code == 400, escape
        assert rag.post("/persist/facts", params={"path": escape}).status_code == 400, escape
    assert rag.post("/persist/nope").status_code == 404
    assert rag.delete("/indexes/restored").json() == {"message": "Successfully deleted index restored."}
    assert "restored" not in rag.get("/indexes").json()
    assert rag.delete("/indexes/restored").status_code == 404


def test_size_limits(rag):
    many = [{"text": f"doc {i}"} for i in range(101)]
    assert rag.post("/index", json={"index_name": "big", "documents": many}).status_code == 413
    assert rag.post("/index", json={"index_name": "big", "documents": [{"text": "x" * 200_001}]}).status_code == 413
    assert rag.post("/index", json={"index_name": "big", "documents": [{"text": "y" * 2_100_000}]}).status_code == 413
    assert rag.post("/index", json={"index_name": "big", "documents": [{"text": "  "}]}).status_code == 400
    assert rag.post("/index", json={"index_name": "../evil", "documents": [{"text": "x"}]}).status_code == 422

    def chunked():  # no Content-Length: the limit (2 MB here) applies while the body arrives
        yield b'{"index_name": "big", "documents": [{"text": "'
        for _ in range(30):
            yield b"z" * 100_000
        yield b'"}]}'

    r = rag.post("/index", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than 2000000 bytes" in r.json()["detail"], r.text
    assert "big" not in rag.get("/indexes").json()


def test_concurrent_writers_lose_nothing(rag):
    def write(i):
        return rag.post("/index", json={"index_name": "busy", "documents": [
            {"text": f"Writer {i} note {j}: the number is {i * 100 + j}."} for j in range(5)]}).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert set(pool.map(write, range(16))) == {200}
    assert rag.get("/indexes/busy/documents").json()["total_items"] == 80
    assert retrieve(rag, "Writer 7 note 3", index="busy")["count"] == 5


def test_openapi_and_metrics(rag):
    schemas = rag.get("/openapi.json").json()["components"]["schemas"]
    for name in ("IndexRequest", "Document", "ListDocumentsResponse", "UpdateDocumentRequest", "UpdateDocumentResponse",
                 "DeleteDocumentRequest", "DeleteDocumentResponse", "RetrieveRequest", "RetrieveResponse",
                 "NodeWithScore", "QueryRequest", "QueryResponse", "ChatRequest", "ChatCompletionResponse",
                 "HealthStatus"):
        assert name in schemas, name
    paths = rag.get("/openapi.json").json()["paths"]
    assert {"/index", "/indexes", "/indexes/{index_name}", "/indexes/{index_name}/documents",
            "/indexes/{index_name}/documents/delete", "/retrieve", "/query", "/v1/chat/completions",
            "/persist/{index_name}", "/load/{index_name}", "/health", "/metrics"} <= set(paths)
    text = rag.get("/metrics").text
    assert 'rag_requests_total{method="POST",route="/index",status="200"}' in text and "rag_chunks" in text


# --- with the LLM --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=f"{servers[0].url}/v1", api_key=KEY, max_retries=0, timeout=180)


def test_chat_with_an_index_answers_from_the_retrieved_fact(client, facts):
    r = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=30,
                                       messages=[{"role": "user", "content": FACTS["vault"][1]}],
                                       extra_body={"index_name": "facts", "context_token_ratio": 0.5})
    assert r.object == "chat.completion" and "tangerine" in r.choices[0].message.content.lower()
    sources = r.model_extra["source_nodes"]
    assert sources and sources[0]["text"] == FACTS["vault"][0] and sources[0]["doc_id"]


def test_chat_without_an_index_passes_through(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0, max_tokens=20)
    assert "Paris" in r.choices[0].message.content and "source_nodes" not in (r.model_extra or {})
    stream = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0,
                                            max_tokens=20, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 3 and "Paris" in "".join(pieces)


def test_chat_errors(rag, facts):
    def chat(**kw):
        body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], **kw}
        return rag.post("/v1/chat/completions", json=body)

    assert chat(n=2).status_code == 400
    assert chat(index_name="facts", stream=True).status_code == 400
    assert chat(messages=[{"role": "system", "content": "be brief"}]).status_code == 400
    assert chat(index_name="nope").status_code == 404
    assert chat(context_token_ratio=0.9).status_code == 422
    huge = "word " * 40_000
    r = chat(index_name="facts", messages=[{"role": "user", "content": huge}])
    assert r.status_code == 400 and "context window" in r.json()["detail"]


def test_query_answers_with_source_nodes(rag, facts):
    r = rag.post("/query", json={"index_name": "facts", "query": FACTS["scope"][1], "top_k": 2,
                                 "llm_params": {"temperature": 0, "max_tokens": 30}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "reykjavik" in body["response"].lower()
    assert body["source_nodes"][0]["text"] == FACTS["scope"][0] and len(body["source_nodes"]) == 2
    assert rag.post("/query", json={"index_name": "nope", "query": "x"}).status_code == 404


def test_query_rerank_asks_the_llm_and_says_when_its_answer_is_unusable(rag, facts):
    """rerank_params: upstream's LLM rerank (LlamaIndex LLMRerank) asks the LLM to rank the retrieved nodes
    ('Doc: N, Relevance: M' lines). The 135M default model does not write that format (it names a document
    by its text), so kaito-rag answers 502 saying so instead of an answer with no sources; a model that
    follows the format keeps top_n nodes (not runnable here)."""
    body = {"index_name": "facts", "query": FACTS["kelp"][1], "top_k": 4, "llm_params": {"temperature": 0, "max_tokens": 30}}
    r = rag.post("/query", json={**body, "rerank_params": {"top_n": 2, "choice_batch_size": 4}})
    assert r.status_code == 502 and "reranked no node" in r.json()["detail"] and "Doc: N, Relevance: M" in r.text
    assert rag.post("/query", json=body).status_code == 200
    bad = rag.post("/query", json={"index_name": "facts", "query": "x", "top_k": 2, "rerank_params": {"top_n": 3}})
    assert bad.status_code == 422 and "cannot exceed 'top_k'" in bad.text


def test_retrieve_reports_vector_and_keyword_scores(rag, facts):
    top = retrieve(rag, "QZ-88123 squeaky hinge", max_node_count=3)["results"][0]
    assert top["doc_id"] == "ticket" and top["text_score"] > 0 and 0 < top["vector_score"] <= 1


# --- output guardrails, through the chat route with kaito-serve as the LLM -------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def guarded(servers, tmp_path_factory):
    """A second kaito-rag on the same LLM with output guardrails; `policy(text)` swaps its policy file in (as
    a ConfigMap update does) and waits until the running server has loaded it."""
    llm = servers[1]
    folder = tmp_path_factory.mktemp("guardrails")
    path = folder / "guardrails.yaml"
    path.write_text("scanners: []\n")
    srv = RagServer(env={"DEFAULT_VECTOR_DB_PERSIST_DIR": str(tmp_path_factory.mktemp("guarded-storage")),
                         "LLM_INFERENCE_URL": llm.url, "LLM_ACCESS_SECRET": LLM_KEY,
                         "OUTPUT_GUARDRAILS_ENABLED": "true", "OUTPUT_GUARDRAILS_POLICY_PATH": str(path),
                         "OUTPUT_GUARDRAILS_STREAM_HOLDBACK_CHARS": "24"})
    srv.wait_ready(120)
    client = httpx.Client(base_url=srv.url, timeout=180)

    def loaded() -> str:
        return next((line for line in client.get("/metrics").text.splitlines()
                     if line.startswith("guardrails_policy_loaded_timestamp_seconds ")), "")

    def policy(text: str) -> None:
        before = loaded()
        tmp = folder / ".new"
        tmp.write_text(text)
        tmp.replace(path)
        deadline = time.monotonic() + 10
        while loaded() == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert loaded() != before, "the policy was not reloaded"

    try:
        yield client, policy
    finally:
        srv.stop()


def chat(client, messages=QUESTION, **kw):
    r = client.post("/v1/chat/completions", json={"model": "smollm2-135m-instruct", "messages": messages,
                                                   "temperature": 0, "max_tokens": 24, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.fixture(scope="module")
def plain(guarded):
    """The LLM's own answer (an empty policy changes nothing)."""
    client, policy = guarded
    policy("scanners: []\n")
    answer = chat(client)["message"]["content"]
    assert "Paris" in answer and "France" in answer, answer
    return answer


def test_guardrails_regex_and_ban_substrings_redact_or_block(guarded, plain):
    client, policy = guarded
    policy("scanners: [{type: regex, patterns: ['Paris']}]")
    assert chat(client)["message"]["content"] == plain.replace("Paris", "[REDACTED]", 1)
    policy("blockMessage: Not for you.\nscanners: [{type: ban_substrings, substrings: [france], action: block}]")
    choice = chat(client)
    assert choice["message"]["content"] == "Not for you." and choice["finish_reason"] == "content_filter"
    policy("scanners: [{type: ban_substrings, substrings: [France]}, {type: regex, patterns: ['Paris'], "
           "action: block}]")
    assert chat(client)["message"]["content"] == "The model output was blocked by output guardrails."


def test_guardrails_json_reading_time_and_token_limit(guarded, plain):
    client, policy = guarded
    policy("scanners: [{type: json, required_elements: 1}]")  # no JSON in the answer: nothing to redact with
    assert chat(client)["finish_reason"] == "content_filter"
    policy("scanners: [{type: reading_time, max_time: 0.01, truncate: true}]")  # 2 words at 200 a minute
    assert chat(client)["message"]["content"] == " ".join(plain.split()[:2])
    policy("scanners: [{type: token_limit, limit: 3}]")
    import tiktoken

    from kaito.ragservice.guardrails import _offline_tiktoken

    _offline_tiktoken()
    enc = tiktoken.get_encoding("cl100k_base")
    assert chat(client)["message"]["content"] == enc.decode(enc.encode(plain)[:3])


ECHO = [m for u, a in (("Echo: the cat sat on the mat", "the cat sat on the mat"), ("Echo: blue sky 42", "blue sky 42"),
                       ("Echo: id QX-12 at noon", "id QX-12 at noon"))
        for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]


def test_guardrails_secrets_sensitive_and_invisible_text(guarded):
    """The model echoes a line (three examples first: the 135M model copies then) holding a cloud key, an
    e-mail address and a zero-width space; each scanner redacts its part."""
    client, policy = guarded
    policy("scanners: []\n")
    echoed = chat(client, ECHO + [{"role": "user", "content": f"Echo: {SECRET_LINE}"}], max_tokens=48)
    assert "AKIAIOSFODNN7EXAMPLE" in echoed["message"]["content"] and "\u200b" in echoed["message"]["content"]
    policy("scanners: [{type: secrets}, {type: sensitive}, {type: invisible_text}]")
    content = chat(client, ECHO + [{"role": "user", "content": f"Echo: {SECRET_LINE}"}], max_tokens=48)["message"]["content"]
    assert "AKIAIOSFODNN7EXAMPLE" not in content and "ops@zorblax.com" not in content, content
    assert "******" in content and "<EMAIL>" in content and "\u200b" not in content, content
    metrics = client.get("/metrics").text
    for scanner in ("secrets", "sensitive", "invisible_text"):
        assert f'output_guardrails_actions_total{{action="redact",scanner="{scanner}"}}' in metrics


SECRET_LINE = "Key AKIAIOSFODNN7EXAMPLE, mail ops@zorblax.com, zero\u200bwidth."


def test_guardrails_scan_streams_and_refuse_whole_answer_scanners(guarded, plain):
    client, policy = guarded
    policy("scanners: [{type: regex, patterns: ['Paris'], match_type: all}]")
    oai = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="none", max_retries=0, timeout=180)
    stream = oai.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, temperature=0,
                                         max_tokens=24, stream=True)
    chunks = [c.choices[0] for c in stream if c.choices]
    text = "".join(c.delta.content or "" for c in chunks)
    assert text == plain.replace("Paris", "[REDACTED]") and len(chunks) > 2 and chunks[-1].finish_reason
    policy("scanners: [{type: json}]")
    r = client.post("/v1/chat/completions", json={"messages": QUESTION, "stream": True, "max_tokens": 8})
    assert r.status_code == 400 and "json" in r.json()["detail"]


def test_guardrails_policy_change_needs_no_restart(guarded, plain):
    client, policy = guarded
    policy("scanners: [{type: regex, patterns: ['Paris']}]")
    assert "[REDACTED]" in chat(client)["message"]["content"]
    policy("scanners: [{type: regex, patterns: ['France']}]")
    content = chat(client)["message"]["content"]
    assert "Paris" in content and "France" not in content
    assert 'guardrails_policy_reload_total{result="success"}' in client.get("/metrics").text


def test_cli_help_and_bad_configuration():
    done = run_cli("kaito-rag", "--help")
    assert done.returncode == 0 and "--remote-embedding-url" in done.stdout and "LLM_INFERENCE_URL" in done.stdout
    import os

    env = {**os.environ, "EMBEDDING_SOURCE_TYPE": "remote"}
    env.pop("REMOTE_EMBEDDING_URL", None)
    done = run_cli("kaito-rag", env=env)
    assert done.returncode == 2 and "REMOTE_EMBEDDING_URL" in done.stderr
    done = run_cli("kaito-rag", env={**os.environ, "LLM_CONTEXT_WINDOW": "lots"})
    assert done.returncode == 2 and "context_window" in done.stderr


# --- durability ----------------------------------------------------------------------------------------

def test_acknowledged_writes_survive_kill_9(tmp_path):
    """Without an LLM (400 for chat), index, update and delete; kill -9; a restart on the same storage
    brings back exactly the acknowledged documents, searchable."""
    storage = str(tmp_path / "storage")
    acknowledged, stop, thread = [], threading.Event(), None
    srv = RagServer("--storage-dir", storage).wait_ready(120)
    try:
        c = httpx.Client(base_url=srv.url, timeout=60)
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "no inference service is configured" in r.json()["detail"]
        docs = [{"doc_id": f"d{i}", "text": f"Crash test document {i} mentions the colour {c_}.", "metadata": {"i": i}}
                for i, c_ in enumerate(["red", "green", "blue", "amber", "violet"])]
        assert c.post("/index", json={"index_name": "durable", "documents": docs}).status_code == 200
        assert c.post("/index", json={"index_name": "second", "documents": docs[:1]}).status_code == 200
        assert c.post("/indexes/durable/documents", json={"documents": [
            {"doc_id": "d1", "text": "Crash test document 1 now mentions the colour teal.", "metadata": {"i": 1}}
        ]}).json()["updated_documents"]
        assert c.post("/indexes/durable/documents/delete", json={"doc_ids": ["d3"]}).json()["deleted_doc_ids"] == ["d3"]
        assert c.delete("/indexes/second").status_code == 200
        before = c.get("/indexes/durable/documents", params={"limit": 100}).json()

        def writer():  # keeps writing until the kill, recording what was acknowledged
            with httpx.Client(base_url=srv.url, timeout=60) as w:
                for batch in range(1000):
                    if stop.is_set():
                        return
                    try:
                        r = w.post("/index", json={"index_name": "inflight", "documents": [
                            {"doc_id": f"b{batch}-{j}", "text": f"Batch {batch} line {j} " * 20} for j in range(8)]})
                    except httpx.HTTPError:
                        return
                    if r.status_code == 200:
                        acknowledged.append(batch)

        thread = threading.Thread(target=writer)
        thread.start()
        deadline = time.monotonic() + 30
        while len(acknowledged) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        srv.proc.send_signal(signal.SIGKILL)  # in the middle of a write
        srv.proc.wait(10)
        stop.set()
        if thread:
            thread.join(30)
    assert len(acknowledged) >= 3
    srv = RagServer("--storage-dir", storage).wait_ready(120)
    try:
        c = httpx.Client(base_url=srv.url, timeout=60)
        assert c.get("/indexes").json() == ["durable", "inflight"]
        after = c.get("/indexes/durable/documents", params={"limit": 100}).json()
        assert after == before and after["total_items"] == 4
        hits = c.post("/retrieve", json={"index_name": "durable", "query": "teal", "max_node_count": 10}).json()
        assert hits["results"][0]["doc_id"] == "d1" and hits["count"] == 4
        stored = c.get("/indexes/inflight/documents", params={"limit": 100, "max_text_length": 5}).json()
        batches = {d["doc_id"].split("-")[0] for d in stored["documents"]}
        assert {f"b{b}" for b in acknowledged} <= batches  # every acknowledged batch is back
        assert stored["total_items"] == 8 * len(batches)  # and no batch is torn
    finally:
        srv.stop()
