"""The HTTP API of `kaito-rag`: upstream KAITO RAGEngine's routes, fields and status codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from llama_index.core.prompts.default_prompts import DEFAULT_TEXT_QA_PROMPT
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.utils import get_tokenizer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .chunking import ChunkingError
from .config import Settings
from .embedding import EmbeddingError
from .engine import Conflict, NotFound, RagEngine, new_doc
from .llm import LLMClient, LLMError
from .models import (
    INDEX_NAME,
    ChatCompletionResponse,
    ChatRequest,
    DeleteDocumentRequest,
    DeleteDocumentResponse,
    Document,
    ErrorResponse,
    HealthStatus,
    IndexRequest,
    ListDocumentsResponse,
    MessageResponse,
    NodeWithScore,
    QueryRequest,
    QueryResponse,
    RetrieveRequest,
    RetrieveResponse,
    UpdateDocumentRequest,
    UpdateDocumentResponse,
)
from .store import StoreError, StoredDoc

log = logging.getLogger("kaito.ragservice")
OPEN_PATHS = {"/health"}
CHAT_CANDIDATES = 20  # chunks retrieved for a chat turn before the token budget picks from them
TOKEN_MARGIN = 1.2  # token counts are estimated with tiktoken; the LLM's tokenizer may count more


def _doc(d: StoredDoc, max_len: int | None = None) -> Document:
    cut = max_len is not None and len(d.text) > max_len
    return Document(doc_id=d.doc_id, text=d.text[:max_len] if cut else d.text, metadata=d.metadata,
                    hash_value=d.hash, is_truncated=cut)


def _node(h) -> NodeWithScore:
    return NodeWithScore(doc_id=h.doc_id, node_id=h.node_id, text=h.text, score=h.score, metadata=h.metadata)


class BodyLimit:
    """ASGI middleware: request bodies over the limit get 413 before they are read into memory."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # a body without Content-Length: cut off while it arrives
                raise HTTPException(413, self.too_large)  # FastAPI answers it (other errors become 400)
            return message

        await self.app(scope, limited, send)

    @property
    def too_large(self) -> str:
        return f"request body larger than {self.max_bytes} bytes"

    async def _reject(self, send) -> None:
        body = json.dumps({"detail": self.too_large}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class AuthAndMetrics:
    """ASGI middleware (cheaper per request than Starlette's `@app.middleware`): the bearer key on every
    route but /health, and request counts and latencies by route template."""

    def __init__(self, app, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.key, self.metrics = app, api_key, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.expected and scope["path"] not in OPEN_PATHS and \
                    dict(scope["headers"]).get(b"authorization") != self.expected:
                response = JSONResponse({"detail": "invalid or missing API key (Authorization: Bearer KEY)"}, 401)
                await response(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            label = route.path if route is not None else "other"
            self.metrics.requests.labels(label, scope["method"], str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - started)


class Metrics:
    def __init__(self, rag: RagService) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("rag_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("rag_request_latency_seconds", "HTTP request latency by route", ["route"],
                                 buckets=(.005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        Gauge("rag_indexes", "Indexes loaded", registry=r).set_function(
            lambda: len(rag.engine.indexes) if rag.engine else 0)
        Gauge("rag_documents", "Documents in all indexes", registry=r).set_function(
            lambda: sum(len(s.docs) for s in rag.engine.indexes.values()) if rag.engine else 0)
        Gauge("rag_chunks", "Chunks (vectors) in all indexes", registry=r).set_function(
            lambda: sum(s.vectors.ntotal for s in rag.engine.indexes.values()) if rag.engine else 0)


class RagService:
    def __init__(self, settings: Settings, engine: RagEngine | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.llm = LLMClient(settings.llm_base, settings.llm_key, settings.context_window) if settings.llm_base else None
        self.tokenizer = get_tokenizer()
        self.metrics = Metrics(self)
        self.app = self._build_app()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI):
        if self.engine is None:
            started = time.monotonic()
            self.engine = await asyncio.to_thread(RagEngine, self.settings)
            log.warning("rag service ready", extra={"indexes": len(self.engine.indexes),
                                                    "seconds": round(time.monotonic() - started, 1)})
        try:
            yield
        finally:
            if self.llm:
                await self.llm.close()
            self.engine.close()

    def tokens(self, text: str) -> int:
        return int(len(self.tokenizer(text)) * TOKEN_MARGIN) + 1

    def _limits(self, docs: list[Document]) -> None:
        lim = self.settings.limits
        if len(docs) > lim.max_documents:
            raise HTTPException(413, f"{len(docs)} documents in one request; the limit is {lim.max_documents}")
        for d in docs:
            if len(d.text) > lim.max_text_chars:
                raise HTTPException(413, f"document {d.doc_id or d.text[:30]!r} has {len(d.text)} characters; "
                                         f"the limit is {lim.max_text_chars}")
            if not d.text.strip():
                raise HTTPException(400, "document text must not be empty")

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="kaito-rag", version="1", lifespan=self._lifespan,
                      description="KAITO RAGEngine API: index documents, retrieve, and chat with an LLM over them.")
        app.add_middleware(BodyLimit, max_bytes=self.settings.limits.max_body_bytes)
        app.add_middleware(AuthAndMetrics, api_key=self.settings.api_key, metrics=self.metrics)
        engine = lambda: self.engine  # noqa: E731  (set in the lifespan)

        @app.exception_handler(NotFound)
        async def not_found(_: Request, e: NotFound):
            return JSONResponse({"detail": str(e)}, 404)

        @app.exception_handler(Conflict)
        async def conflict(_: Request, e: Conflict):
            return JSONResponse({"detail": str(e)}, 409)

        @app.exception_handler(StoreError)
        @app.exception_handler(ChunkingError)
        async def bad_request(_: Request, e: Exception):
            return JSONResponse({"detail": str(e)}, 400)

        @app.exception_handler(LLMError)
        @app.exception_handler(EmbeddingError)
        async def upstream(_: Request, e: Exception):
            return JSONResponse({"detail": str(e)}, 502)

        errors = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}}

        @app.get("/health", response_model=HealthStatus)
        async def health():
            return HealthStatus(status="Healthy")

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.post("/index", response_model=list[Document], responses=errors, tags=["index"])
        async def index_documents(body: IndexRequest):
            self._limits(body.documents)
            docs = list({d.doc_id: d for d in reversed([new_doc(x.text, x.metadata, x.doc_id)
                                                        for x in body.documents])}.values())[::-1]
            stored = await asyncio.to_thread(engine().index, body.index_name, docs)
            return [_doc(d) for d in stored]

        @app.get("/indexes", response_model=list[str], tags=["index"])
        async def list_indexes():
            return engine().names()

        @app.delete("/indexes/{index_name}", response_model=MessageResponse, responses=errors, tags=["index"])
        async def delete_index(index_name: str):
            await asyncio.to_thread(engine().delete_index, index_name)
            return MessageResponse(message=f"Successfully deleted index {index_name}.")

        @app.get("/indexes/{index_name}/documents", response_model=ListDocumentsResponse, responses=errors,
                 tags=["index"])
        async def list_documents_in_index(index_name: str, limit: int = Query(10, ge=1, le=100),
                                          offset: int = Query(0, ge=0),
                                          max_text_length: int | None = Query(1000, ge=1),
                                          metadata_filter: str | None = Query(None, description="a JSON object")):
            wanted = None
            if metadata_filter:
                try:
                    wanted = json.loads(metadata_filter)
                except ValueError as e:
                    raise HTTPException(400, f"metadata_filter is not valid JSON: {e}") from e
                if not isinstance(wanted, dict):
                    raise HTTPException(400, "metadata_filter must be a JSON object")
            store = engine().get(index_name)
            docs, total = await asyncio.to_thread(store.list, offset, limit, wanted)
            return ListDocumentsResponse(documents=[_doc(d, max_text_length) for d in docs], count=len(docs),
                                         total_items=total)

        @app.post("/indexes/{index_name}/documents", response_model=UpdateDocumentResponse, responses=errors,
                  tags=["index"])
        async def update_documents_in_index(index_name: str, body: UpdateDocumentRequest):
            self._limits(body.documents)
            if any(not d.doc_id for d in body.documents):
                raise HTTPException(400, "every document to update needs its doc_id")
            docs = [new_doc(d.text, d.metadata, d.doc_id) for d in body.documents]
            updated, unchanged, not_found = await asyncio.to_thread(engine().update, index_name, docs)
            return UpdateDocumentResponse(updated_documents=[_doc(d) for d in updated],
                                          unchanged_documents=[_doc(d) for d in unchanged],
                                          not_found_documents=[_doc(d) for d in not_found])

        @app.post("/indexes/{index_name}/documents/delete", response_model=DeleteDocumentResponse, responses=errors,
                  tags=["index"])
        async def delete_documents_in_index(index_name: str, body: DeleteDocumentRequest):
            if len(body.doc_ids) > self.settings.limits.max_doc_ids:
                raise HTTPException(413, f"{len(body.doc_ids)} ids in one request; the limit is "
                                         f"{self.settings.limits.max_doc_ids}")
            store = engine().get(index_name)
            deleted, missing = await asyncio.to_thread(store.delete, body.doc_ids)
            return DeleteDocumentResponse(deleted_doc_ids=deleted, not_found_doc_ids=missing)

        @app.post("/retrieve", response_model=RetrieveResponse, responses=errors, tags=["query"])
        async def retrieve_index(body: RetrieveRequest):
            hits = await engine().retrieve(body.index_name, body.query, body.max_node_count, body.metadata_filter)
            return RetrieveResponse(query=body.query, results=[_node(h) for h in hits], count=len(hits))

        @app.post("/query", response_model=QueryResponse, responses=errors, tags=["query"])
        async def query_index(body: QueryRequest):
            return await self._query(body)

        @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=errors, tags=["chat"])
        async def chat_completions(body: ChatRequest):
            return await self._chat(body)

        @app.post("/persist/{index_name}", response_model=MessageResponse, responses=errors, tags=["index"])
        async def persist_index(index_name: str, path: str | None = None):
            target = await asyncio.to_thread(engine().persist, index_name, path)
            return MessageResponse(message=f"Successfully persisted index {index_name} to {target}.")

        @app.post("/load/{index_name}", response_model=MessageResponse, responses={**errors, 409: {"model": ErrorResponse}},
                  tags=["index"])
        async def load_index(index_name: str, path: str | None = None, overwrite: bool = False):
            import re

            if not re.match(INDEX_NAME, index_name):
                raise HTTPException(400, f"invalid index name {index_name!r}")
            source = await asyncio.to_thread(engine().load, index_name, path, overwrite)
            return MessageResponse(message=f"Successfully loaded index {index_name} from {source}.")

        return app

    # --- LLM routes ------------------------------------------------------------------------------

    def _need_llm(self) -> LLMClient:
        if self.llm is None:
            raise HTTPException(503, "no LLM is configured (LLM_INFERENCE_URL / --llm-url)")
        return self.llm

    async def _query(self, body: QueryRequest) -> QueryResponse:
        """Retrieval plus an answer, orchestrated by a LlamaIndex query engine over our retriever."""
        from llama_index.core.query_engine import RetrieverQueryEngine
        from llama_index.llms.openai_like import OpenAILike

        llm = self._need_llm()
        self.engine.get(body.index_name)
        model, window = await llm.info()
        params = dict(body.llm_params or {})
        known = {k: params.pop(k) for k in ("temperature", "max_tokens") if k in params}
        li_llm = OpenAILike(model=params.pop("model", model), api_base=f"{llm.base_url}/v1",
                            api_key=llm.api_key or "none", is_chat_model=True, context_window=window,
                            timeout=600, max_retries=0, additional_kwargs=params,
                            async_http_client=llm.client, **known)  # the service's connection pool
        engine = RetrieverQueryEngine.from_args(_Retriever(self.engine, body.index_name, body.top_k), llm=li_llm)
        try:
            result = await engine.aquery(body.query)
        except (LLMError, NotFound):
            raise
        except Exception as e:  # the OpenAI client's errors: the LLM failed
            raise LLMError(f"the LLM at {llm.base_url} failed: {e}") from e
        nodes = [NodeWithScore(doc_id=n.node.ref_doc_id or "", node_id=n.node.node_id, text=n.node.get_content(),
                               score=n.score or 0.0, metadata=n.node.metadata) for n in result.source_nodes]
        return QueryResponse(response=str(result.response or ""), source_nodes=nodes, metadata=result.metadata)

    async def _chat(self, body: ChatRequest):
        if body.n is not None and body.n > 1:
            raise HTTPException(400, "n > 1 is not supported")
        user = next((m for m in reversed(body.messages) if m.get("role") == "user"), None)
        if user is None:
            raise HTTPException(400, "the messages contain no user message")
        if body.stream and body.index_name:
            raise HTTPException(400, "stream is not supported together with index_name")
        if body.index_name:
            self.engine.get(body.index_name)  # 404 before anything else
        llm = self._need_llm()
        payload = body.model_dump(exclude_unset=True, exclude={"index_name", "context_token_ratio"})
        model, window = await llm.info()
        payload.setdefault("model", model)
        if not body.index_name:
            return await self._passthrough(llm, payload)
        query = _text(user.get("content"))
        prompt_tokens = sum(self.tokens(_text(m.get("content"))) + 4 for m in body.messages)
        reserved = body.max_tokens or body.max_completion_tokens or 0
        free = window - prompt_tokens - reserved
        if free <= 0:
            raise HTTPException(400, f"the prompt (about {prompt_tokens} tokens) plus max_tokens ({reserved}) does "
                                     f"not fit the LLM's context window of {window} tokens")
        budget = int(free * body.context_token_ratio)
        hits = await self.engine.retrieve(body.index_name, query, CHAT_CANDIDATES)
        chosen, used = [], 0
        for h in hits:
            cost = self.tokens(h.text) + 2
            if used + cost <= budget:
                chosen.append(h)
                used += cost
        if not chosen:
            return await self._passthrough(llm, payload)
        context = "\n\n".join(h.text for h in chosen)
        messages = [dict(m) for m in body.messages]
        last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
        messages[last]["content"] = DEFAULT_TEXT_QA_PROMPT.format(context_str=context, query_str=query)
        payload["messages"] = messages
        r = await llm.chat(payload)
        if r.status_code != 200:
            return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))
        answer = r.json()
        answer["source_nodes"] = [_node(h).model_dump() for h in chosen]
        return JSONResponse(answer)

    async def _passthrough(self, llm: LLMClient, payload: dict[str, Any]):
        """The request goes to the LLM unchanged; its answer (stream or not) comes back unchanged."""
        upstream = await llm.open_stream(payload)
        if not payload.get("stream") or upstream.status_code != 200:
            content = await upstream.aread()
            await upstream.aclose()
            return Response(content, upstream.status_code, media_type=upstream.headers.get("content-type"))

        async def relay():
            try:
                async for piece in upstream.aiter_raw():
                    yield piece
            finally:
                await upstream.aclose()

        return StreamingResponse(relay(), media_type=upstream.headers.get("content-type", "text/event-stream"))


def _text(content) -> str:
    """A message's text, whether `content` is a string or a list of OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


class _Retriever(BaseRetriever):
    """Our hybrid retrieval as a LlamaIndex retriever, for LlamaIndex query engines."""

    def __init__(self, engine: RagEngine, index_name: str, top_k: int) -> None:
        super().__init__()
        self.rag, self.index_name, self.top_k = engine, index_name, top_k

    def _retrieve(self, query_bundle):
        raise NotImplementedError("use the async API")

    async def _aretrieve(self, query_bundle):
        from llama_index.core.schema import NodeRelationship, NodeWithScore as LINode, RelatedNodeInfo, TextNode

        hits = await self.rag.retrieve(self.index_name, query_bundle.query_str, self.top_k)
        return [LINode(node=TextNode(id_=h.node_id, text=h.text, metadata=h.metadata,
                                     relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=h.doc_id)}),
                       score=h.score) for h in hits]


def create_app(settings: Settings, engine: RagEngine | None = None) -> FastAPI:
    return RagService(settings, engine).app
