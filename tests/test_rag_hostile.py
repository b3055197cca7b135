"""kaito-rag against hostile input: what one client sends never breaks the service for anyone else, and
what it stores can always be listed and retrieved. The real server of conftest.rag_server (retrieve-only)
driven with httpx and http.client over 127.0.0.1; the crash test runs its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import RagServer
from kaito.ragservice.embedding import EmbeddingError, QueryBatcher

INDEX = "hostile"
DOCS = [{"doc_id": f"d{i}", "text": f"Fact {i}: the {colour} lighthouse keeper counted {i * 7} walruses.",
         "metadata": {"i": i}} for i, colour in enumerate(["red", "green", "blue", "amber", "violet", "teal"])]
DEEP = {}
_level = DEEP
for _ in range(256):
    _level["a"] = _level = {}


def auth(server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def rag(rag_server):
    with httpx.Client(base_url=rag_server.url, headers=auth(rag_server), timeout=120) as c:
        r = c.post("/index", json={"index_name": INDEX, "documents": DOCS})
        assert r.status_code == 200, r.text
        yield c


def post(client: httpx.Client, path: str, body) -> httpx.Response:
    """The body as ASCII JSON (a lone surrogate travels as `\\ud800`), as any JSON client may send it."""
    return client.post(path, content=json.dumps(body).encode())


def on_one_connection(server, requests: list[tuple[str, str, object]]) -> list[tuple[int, object]]:
    """Sends the requests one after another on one HTTP/1.1 connection and asserts that the server kept
    it open after every answer; returns each answer's status and JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.connect()
    sock, answers = conn.sock, []
    try:
        for method, path, body in requests:
            conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=auth(server))
            r = conn.getresponse()
            data = r.read()
            assert conn.sock is sock and r.getheader("connection") != "close", f"{method} {path}: connection closed"
            answers.append((r.status, json.loads(data)))
    finally:
        conn.close()
    return answers


def test_hostile_queries_fail_alone_among_good_ones(rag):
    """300 good queries and 10 hostile ones at once, queries being embedded in shared batches: every good
    one is answered, each hostile one gets its own 400."""
    hostile = ["lone \ud800 surrogate", "\udfff", "nul \x00 byte", "pair \ud83d then nothing", "\x00"] * 2
    queries = [(f"How many walruses did keeper {i % 6} count?", True) for i in range(300)]
    for n, q in enumerate(hostile):
        queries.insert(n * 30 + 7, (q, False))

    def ask(item):
        query, good = item
        return good, post(rag, "/retrieve", {"index_name": INDEX, "query": query, "max_node_count": 3})

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, queries))
    good = [r for ok, r in answers if ok]
    assert [r.status_code for r in good] == [200] * 300
    assert all(r.json()["count"] == 3 for r in good)
    bad = [r for ok, r in answers if not ok]
    assert [r.status_code for r in bad] == [400] * 10
    assert all(r.json()["detail"].startswith("query: text must") for r in bad), [r.text for r in bad]


def batched(fail, texts: list[str]) -> tuple[list, list[list[str]]]:
    """The texts embedded through a QueryBatcher whose embedder raises `fail(texts)` when that is not
    None; they queue while the worker is held, so they share a batch. (results, the embedder's calls)."""
    gate, calls = threading.Event(), []

    class Embedder:
        def embed(self, batch):
            gate.wait(10)
            calls.append(list(batch))
            if (error := fail(batch)) is not None:
                raise error
            return np.ones((len(batch), 2), dtype=np.float32)

    batcher = QueryBatcher(Embedder())

    async def main():
        first = asyncio.ensure_future(batcher.embed("first"))  # holds the worker while the others queue
        await asyncio.sleep(0.2)
        rest = [asyncio.ensure_future(batcher.embed(t)) for t in texts]
        await asyncio.sleep(0.2)
        gate.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    try:
        return asyncio.run(main())[1:], calls[1:]
    finally:
        batcher.close()


def test_a_query_that_breaks_its_batch_fails_alone():
    """In-process, with an embedder that raises for one text: the batch it shared is embedded again one
    text at a time, so the other queries of that batch get their vectors."""
    texts = ["poison" if i == 3 else f"good {i}" for i in range(8)]
    results, calls = batched(lambda b: ValueError("the tokenizer choked") if "poison" in b else None, texts)
    assert calls[0] == texts  # the eight shared one batch
    assert [i for i, r in enumerate(results) if isinstance(r, Exception)] == [3]
    assert all(r.shape == (2,) for i, r in enumerate(results) if i != 3)


def test_a_failing_embedding_service_fails_its_batch_at_once():
    """An EmbeddingError (a remote service that failed after its retries) is not retried query by query."""
    results, calls = batched(lambda b: EmbeddingError("unreachable"), [f"q{i}" for i in range(8)])
    assert len(calls) == 1 and all(isinstance(r, EmbeddingError) for r in results)


@pytest.mark.parametrize("path, body, where", [
    ("/index", {"index_name": INDEX, "documents": [{"text": "fine"}, {"text": "bad \ud800"}]}, "documents.1.text"),
    ("/index", {"index_name": INDEX, "documents": [{"text": "nul \x00"}]}, "documents.0.text"),
    ("/index", {"index_name": INDEX, "documents": [{"doc_id": "x\x00", "text": "fine"}]}, "documents.0.doc_id"),
    ("/index", {"index_name": INDEX, "documents": [{"text": "fine", "metadata": {"k\udc00": 1}}]},
     "documents.0.metadata: a key"),
    ("/index", {"index_name": INDEX, "documents": [{"text": "fine", "metadata": {"a": [{"b": "\ud800"}]}}]},
     "documents.0.metadata.a.0.b"),
    ("/index", {"index_name": INDEX, "documents": [{"text": "fine", "metadata": DEEP}]},
     "documents.0.metadata.a.a.a"),
    ("/index", {"index_name": INDEX, "documents": [{"text": "fine", "metadata": {"big": "x" * 40_000}}]},
     "documents.0.metadata: 40011 bytes of JSON; the limit is 32768"),
    ("/indexes/hostile/documents", {"documents": [{"doc_id": "d1", "text": "\udbff"}]}, "documents.0.text"),
    ("/indexes/hostile/documents/delete", {"doc_ids": ["d1", "\ud800"]}, "doc_ids.1"),
    ("/retrieve", {"index_name": INDEX, "query": "walrus", "metadata_filter": {"i": "\x00"}}, "metadata_filter.i"),
    ("/query", {"index_name": INDEX, "query": "x", "llm_params": {"stop": ["\ud800"]}}, "llm_params.stop.0"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "user": "\x00"}, "user"),
], ids=["text-surrogate", "text-nul", "doc-id", "metadata-key", "metadata-value", "metadata-depth", "metadata-size",
        "update", "delete", "filter", "llm-params", "chat-message", "chat-extra"])
def test_bad_content_is_a_clear_400_and_changes_nothing(rag_server, rag, path, body, where):
    before = rag.get(f"/indexes/{INDEX}/documents", params={"limit": 100}).json()
    [(status, answer)] = on_one_connection(rag_server, [("POST", path, body)])
    assert status == 400 and answer["detail"].startswith(where), answer
    assert "\\u" in answer["detail"] or "JSON" in answer["detail"] or "bytes" in answer["detail"], answer
    assert rag.get(f"/indexes/{INDEX}/documents", params={"limit": 100}).json() == before


def test_nan_and_infinity_are_not_json_numbers(rag):
    r = rag.post("/index", content=b'{"index_name": "hostile", "documents": [{"text": "t", "metadata": {"x": NaN}}]}')
    assert r.status_code == 400 and r.json()["detail"] == "documents.0.metadata.x: nan is not a JSON number"
    r = rag.post("/retrieve", content=b'{"index_name": "hostile", "query": "t", "metadata_filter": {"x": Infinity}}')
    assert r.status_code == 400 and "inf is not a JSON number" in r.json()["detail"]
    r = rag.post("/index", content=b'{"index_name": "scratch", "documents": [{"text": "t"}], "x": NaN}')
    assert r.status_code == 200  # an unknown field is ignored, whatever it holds


def test_types_are_strict_and_top_k_is_honoured(rag):
    for bad in ({"max_node_count": "2"}, {"max_node_count": True}, {"max_node_count": 2.5}, {"query": 5},
                {"max_node_count": 2, "top_k": 3}):
        r = rag.post("/retrieve", json={"index_name": INDEX, "query": "walrus", **bad})
        assert r.status_code == 422 and all(set(e) == {"type", "loc", "msg"} for e in r.json()["detail"]), (bad, r.text)
    assert rag.post("/retrieve", json={"index_name": INDEX, "query": "walrus", "top_k": 2}).json()["count"] == 2
    assert rag.post("/retrieve", json={"index_name": INDEX, "query": "x" * 100_001}).status_code == 422


def test_bad_paths_and_foreign_files_are_a_400(rag_server, rag):
    cases = [("/persist/hostile?path=a%00b", "query.path: text must not contain NUL"),
             ("/persist/hostile?path=" + "x" * 300, "is too long"),
             ("/load/other?path=" + "/".join(["y" * 200] * 21), "is too long"),
             ("/load/other?path=foreign", "is not a kaito-rag index: no such column: seq"),
             ("/persist/hostile?path=afile/below", "cannot persist to 'afile/below'")]
    root = storage_dir(rag_server)
    (root / "foreign").mkdir(exist_ok=True)
    with sqlite3.connect(root / "foreign" / "index.sqlite") as conn:  # someone else's database of that name
        conn.executescript("CREATE TABLE IF NOT EXISTS meta(key, value); CREATE TABLE IF NOT EXISTS chunks(x);"
                           "CREATE TABLE IF NOT EXISTS documents(x);")
    (root / "afile").write_text("not a folder")
    answers = on_one_connection(rag_server, [("POST", path, None) for path, _ in cases])
    for (path, needle), (status, answer) in zip(cases, answers):
        assert status == 400 and needle in answer["detail"], (path, answer)
    assert "other" not in rag.get("/indexes").json()
    odd = "snap?shot#1 %20"  # characters a SQLite URI would misread
    assert rag.post("/persist/hostile", params={"path": odd}).status_code == 200
    assert rag.post("/load/odd", params={"path": odd}).status_code == 200
    assert rag.get("/indexes/odd/documents").json()["total_items"] == len(DOCS)
    assert rag.delete("/indexes/odd").status_code == 200


def storage_dir(server) -> Path:
    return Path(server.proc.args[server.proc.args.index("--storage-dir") + 1])


def test_a_server_failure_is_an_honest_500_on_a_connection_that_stays_open(rag_server, rag):
    """The database of an index vanishes behind the server's back: its retrieve fails with a 500 in the
    error shape, and the same connection goes on being served."""
    assert rag.post("/index", json={"index_name": "vanish", "documents": DOCS[:1]}).status_code == 200
    folder = storage_dir(rag_server) / "indexes" / "vanish"
    shutil.rmtree(folder)
    try:
        (status, answer), (after, names) = on_one_connection(rag_server, [
            ("POST", "/retrieve", {"index_name": "vanish", "query": "walrus"}), ("GET", "/indexes", None)])
    finally:
        folder.mkdir()  # so that the index can be deleted
        assert rag.delete("/indexes/vanish").status_code == 200
    assert status == 500 and answer == {
        "detail": "internal server error (OperationalError); the server's log has the details"}
    assert after == 200 and "vanish" in names


def test_a_wrong_method_names_every_allowed_one(rag):
    r = rag.request("PUT", f"/indexes/{INDEX}/documents")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST" and r.json() == {
        "detail": "Method Not Allowed"}


def test_openapi_declares_every_status_and_content_type_served(rag):
    doc = rag.get("/openapi.json").json()
    ops = {(m.upper(), p): op for p, methods in doc["paths"].items() for m, op in methods.items()}

    def statuses(method, path):
        return set(ops[method, path]["responses"])

    assert set(ops["GET", "/metrics"]["responses"]["200"]["content"]) == {"text/plain"}
    chat = ops["POST", "/v1/chat/completions"]["responses"]
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"} and "default" in chat
    for method, path, expected in [
        ("POST", "/index", {"400", "413", "422", "502"}), ("POST", "/retrieve", {"400", "404", "413", "422", "502"}),
        ("POST", "/query", {"400", "404", "413", "422", "502"}), ("GET", "/indexes/{index_name}/documents",
                                                                  {"400", "404", "422"}),
        ("POST", "/persist/{index_name}", {"400", "404", "422"}), ("POST", "/load/{index_name}", {"400", "404", "409",
                                                                                              "422"})]:
        assert statuses(method, path) == {"200", "401", "500"} | expected, (method, path)
        assert ops[method, path]["security"] == [{"bearer": []}]
        assert ops[method, path]["responses"]["401"]["headers"]["WWW-Authenticate"]["required"]
    assert statuses("GET", "/health") == {"200", "500"} and "security" not in ops["GET", "/health"]
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}


def test_kill_9_during_writes_with_invalid_documents_stores_only_what_was_acknowledged(tmp_path):
    """Two writers send batches of six documents, every third batch with one invalid document (refused
    whole: 400); kill -9 in the middle. Meanwhile bad rows are written straight into the index's database
    (a document whose metadata is not JSON, a chunk of no document). After the restart: every
    acknowledged batch is back whole, nothing of a refused batch, the bad rows skipped and counted, and
    listing and retrieval answer; indexing the skipped id again replaces its row."""
    storage = tmp_path / "storage"
    invalid = [{"text": "bad \ud800 text"}, {"text": "deep", "metadata": DEEP}, {"doc_id": "nul\x00", "text": "x"},
               {"text": "big", "metadata": {"x": "y" * 40_000}}]
    acknowledged, refused, unexpected, stop = [], [], [], threading.Event()
    srv = RagServer("--storage-dir", str(storage), env={"LLM_INFERENCE_URL": None}).wait_ready(120)

    def writer(w: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for b in range(1000):
                docs = [{"doc_id": f"w{w}b{b}-{j}", "text": f"Writer {w} batch {b} line {j}. " * 12} for j in range(6)]
                if b % 3 == 2:
                    docs[b % 6] = invalid[b % len(invalid)]
                try:
                    r = c.post("/index", content=json.dumps({"index_name": "crash", "documents": docs}).encode(),
                               headers={"Content-Type": "application/json"})
                except httpx.HTTPError:
                    return
                {200: acknowledged, 400: refused}.get(r.status_code, unexpected).append(f"w{w}b{b}")
                if stop.is_set():
                    return

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while (len(acknowledged) < 6 or len(refused) < 3) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        srv.proc.send_signal(signal.SIGKILL)  # in the middle of a write
        srv.proc.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
    assert len(acknowledged) >= 6 and len(refused) >= 3 and not unexpected, (acknowledged, refused, unexpected)
    with sqlite3.connect(storage / "indexes" / "crash" / "index.sqlite") as conn:
        conn.execute("INSERT INTO documents(doc_id, text, metadata, hash) VALUES ('planted', 'x', '{not json', 'h')")
        conn.execute("INSERT INTO chunks(doc_id, node_id, text, vector) VALUES ('planted', 'n', 'x', ?)",
                     (np.ones(384, dtype=np.float32).tobytes(),))
        conn.execute("INSERT INTO chunks(doc_id, node_id, text, vector) VALUES ('nobody', 'n', 'x', x'00')")
    srv = RagServer("--storage-dir", str(storage), env={"LLM_INFERENCE_URL": None}).wait_ready(120)
    try:
        c = httpx.Client(base_url=srv.url, timeout=60)
        ids = []
        for offset in range(0, 10_000, 100):
            page = c.get("/indexes/crash/documents", params={"limit": 100, "offset": offset, "max_text_length": 5})
            assert page.status_code == 200, page.text
            ids += [d["doc_id"] for d in page.json()["documents"]]
            if len(ids) >= page.json()["total_items"]:
                break
        batches = {i.split("-")[0] for i in ids}
        assert set(acknowledged) <= batches and not batches & set(refused)
        assert len(ids) == 6 * len(batches) and "planted" not in ids  # no batch torn, the bad row skipped
        assert "rag_skipped_documents 1.0" in c.get("/metrics").text
        hits = c.post("/retrieve", json={"index_name": "crash", "query": "Writer 1 batch 0", "max_node_count": 50})
        assert hits.status_code == 200 and hits.json()["count"] == min(50, len(ids))
        again = c.post("/index", json={"index_name": "crash", "documents": [{"doc_id": "planted", "text": "Fixed."}]})
        assert again.status_code == 200 and again.json()[0]["text"] == "Fixed."
        assert "rag_skipped_documents 0.0" in c.get("/metrics").text
        assert "index opened without its invalid rows" in srv.log()
    finally:
        srv.stop()
