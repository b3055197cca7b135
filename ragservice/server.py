"""The HTTP API of `kaito-rag`: upstream KAITO RAGEngine's routes, fields and status codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from kaito.presets.auth import CHALLENGE, APIKey
from llama_index.core.prompts.default_prompts import DEFAULT_TEXT_QA_PROMPT
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.utils import get_tokenizer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .chunking import ChunkingError
from .config import Settings
from .embedding import EmbeddingError
from .engine import Conflict, NotFound, RagEngine, new_doc
from .guardrails import Guardrails, GuardrailsFailed
from .llm import LLMClient, LLMError
from .models import (
    CONTENT_ERROR,
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
    Text,
    UpdateDocumentRequest,
    UpdateDocumentResponse,
    content_problem,
    problem,
    text_problem,
)
from .store import StoreError, StoredDoc

log = logging.getLogger("kaito.ragservice")
OPEN_PATHS = {"/health"}
CHAT_CANDIDATES = 20  # chunks retrieved for a chat turn before the token budget picks from them
TOKEN_MARGIN = 1.2  # token counts are estimated with tiktoken; the LLM's tokenizer may count more

# Every error status kaito-rag answers, as /openapi.json declares it (body: ErrorResponse; 422: FastAPI's).
ERRORS = {
    400: "Invalid content (text with a lone surrogate or NUL, metadata too deep or too large), a path outside "
         "the storage directory or not a kaito-rag index, or what this service does not do (no LLM, n > 1, ...)",
    401: "Missing or wrong API key (`Authorization: Bearer KEY`)",
    404: "No such index, or nothing persisted at the path",
    409: "The index exists (load without overwrite)",
    413: "Too many documents, too long a text, or a body over the limit",
    500: "An unexpected failure (the server's log has the details), or output guardrails failing closed",
    502: "The LLM or the remote embedding service failed",
}
TEXT = {"text/plain": {"schema": {"type": "string"}}}


class ErrorJSON(JSONResponse):
    """An error answer: ASCII JSON, so it can name any input (a lone surrogate is `\\ud800`)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def error(status: int, detail: str, headers: dict[str, str] | None = None) -> ErrorJSON:
    return ErrorJSON({"detail": detail}, status, headers=headers)


def _invalid(e: RequestValidationError) -> ErrorJSON:
    """Content that breaks kaito-rag's rules (models.content_problem; pydantic's `string_unicode` is a
    lone surrogate) is a 400 naming where; other validation errors are FastAPI's 422, without the
    offending input (it may not be JSON: NaN)."""
    errors = e.errors()
    for x in errors:
        if x["type"] == CONTENT_ERROR or x["type"] == "string_unicode":
            where = ".".join(str(p) for p in x["loc"] if p != "body")
            if x["type"] == CONTENT_ERROR:
                fault = x["ctx"]["where"], x["msg"]
            else:  # pydantic's own string check: a lone surrogate
                fault = "", (isinstance(x["input"], str) and text_problem(x["input"])) or x["msg"]
            return error(400, problem(fault, where))
    return ErrorJSON({"detail": [{k: x[k] for k in ("type", "loc", "msg")} for x in errors]}, 422)


def _doc(d: StoredDoc, max_len: int | None = None) -> Document:
    cut = max_len is not None and len(d.text) > max_len
    return Document(doc_id=d.doc_id, text=d.text[:max_len] if cut else d.text, metadata=d.metadata,
                    hash_value=d.hash, is_truncated=cut)


def _node(h) -> NodeWithScore:
    return NodeWithScore(doc_id=h.doc_id, node_id=h.node_id, text=h.text, score=h.score, metadata=h.metadata,
                         vector_score=h.vector_score, text_score=h.text_score)


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
    route but /health, request counts and latencies by route template, and the 500 of a failure no
    handler answered: logged here and answered with the error shape, on a connection that stays open
    (raised further, uvicorn would close it). A failure after the response started ends the response."""

    def __init__(self, app, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.api_key = APIKey(api_key) if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = None

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"] not in OPEN_PATHS and \
                    not self.api_key.accepts(dict(scope["headers"]).get(b"authorization")):
                response = error(401, "invalid or missing API key (Authorization: Bearer KEY)", CHALLENGE)
                await response(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        except Exception as e:
            if status is not None:  # the response had started: it cannot become an error any more
                raise
            log.exception("request failed", extra={"path": scope["path"]})
            await error(500, f"internal server error ({type(e).__name__}); the server's log has the details")(
                scope, receive, send_status)
        finally:
            route = scope.get("route")
            label = route.path if route is not None else "other"
            self.metrics.requests.labels(label, scope["method"], str(status or 500)).inc()
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
            lambda: sum(s.chunk_count for s in rag.engine.indexes.values()) if rag.engine else 0)
        Gauge("rag_skipped_documents", "Documents whose stored rows their index skipped when it opened (invalid: "
              "the log says why)", registry=r).set_function(
            lambda: sum(len(s.skipped) for s in rag.engine.indexes.values()) if rag.engine else 0)


class RagService:
    def __init__(self, settings: Settings, engine: RagEngine | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.llm = LLMClient(settings.llm_base, settings.llm_key, settings.context_window) if settings.llm_base else None
        self.tokenizer = get_tokenizer()
        self.metrics = Metrics(self)
        self.guardrails = Guardrails(settings.guardrails_policy, self.metrics.registry, settings.guardrails_fail_open,
                                     settings.guardrails_hot_reload, settings.guardrails_stream_holdback) \
            if settings.guardrails_enabled else None  # a policy that cannot be read stops the start here
        self.app = self._build_app()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI):
        if self.engine is None:
            started = time.monotonic()
            self.engine = await asyncio.to_thread(RagEngine, self.settings)
            log.warning("rag service ready", extra={"indexes": len(self.engine.indexes),
                                                    "seconds": round(time.monotonic() - started, 1)})
        if self.guardrails:
            self.guardrails.start()
        try:
            yield
        finally:
            if self.guardrails:
                self.guardrails.stop()
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
        guard = (401,) if self.settings.api_key else ()

        def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
            """OpenAPI entries for the error statuses a route answers, the key's 401 and a failure's 500
            included (FastAPI adds the 422 of routes with parameters)."""
            challenge = {"WWW-Authenticate": {"description": "Bearer", "required": True, "schema": {"type": "string"}}}
            return {c: {"model": ErrorResponse, "description": ERRORS[c], **({"headers": challenge} if c == 401 else {})}
                    for c in sorted({*codes, *guard, 500})}

        @app.exception_handler(RequestValidationError)
        async def invalid(_: Request, e: RequestValidationError):
            return _invalid(e)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, e: StarletteHTTPException):
            headers = e.headers
            if e.status_code == 405:  # Starlette's Allow names one route's methods; a path may have several
                methods = {m for r in app.routes if r.matches(request.scope)[0] != Match.NONE
                           for m in getattr(r, "methods", None) or ()}
                headers = {"Allow": ", ".join(sorted(methods))}
            return error(e.status_code, str(e.detail), headers)

        @app.exception_handler(NotFound)
        async def not_found(_: Request, e: NotFound):
            return error(404, str(e))

        @app.exception_handler(Conflict)
        async def conflict(_: Request, e: Conflict):
            return error(409, str(e))

        @app.exception_handler(StoreError)
        @app.exception_handler(ChunkingError)
        async def bad_request(_: Request, e: Exception):
            return error(400, str(e))

        @app.exception_handler(LLMError)
        @app.exception_handler(EmbeddingError)
        async def upstream(_: Request, e: Exception):
            return error(502, str(e))

        @app.exception_handler(GuardrailsFailed)
        async def guardrails_failed(_: Request, e: GuardrailsFailed):
            return error(500, str(e))

        @app.get("/health", response_model=HealthStatus, responses={500: {"model": ErrorResponse,
                                                                          "description": ERRORS[500]}})
        async def health():
            return HealthStatus(status="Healthy")

        @app.get("/metrics", response_class=Response,
                 responses={200: {"description": "Prometheus text format", "content": TEXT}, **errors()})
        async def metrics():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.post("/index", response_model=list[Document], responses=errors(400, 413, 502), tags=["index"])
        async def index_documents(body: IndexRequest):
            self._limits(body.documents)
            docs = list({d.doc_id: d for d in reversed([new_doc(x.text, x.metadata, x.doc_id)
                                                        for x in body.documents])}.values())[::-1]
            stored = await asyncio.to_thread(engine().index, body.index_name, docs)
            return [_doc(d) for d in stored]

        @app.get("/indexes", response_model=list[str], responses=errors(), tags=["index"])
        async def list_indexes():
            return engine().names()

        @app.delete("/indexes/{index_name}", response_model=MessageResponse, responses=errors(404), tags=["index"])
        async def delete_index(index_name: str):
            await asyncio.to_thread(engine().delete_index, index_name)
            return MessageResponse(message=f"Successfully deleted index {index_name}.")

        @app.get("/indexes/{index_name}/documents", response_model=ListDocumentsResponse, responses=errors(400, 404),
                 tags=["index"])
        async def list_documents_in_index(index_name: str, limit: int = Query(10, ge=1, le=100),
                                          offset: int = Query(0, ge=0),
                                          max_text_length: int | None = Query(1000, ge=1),
                                          metadata_filter: Text | None = Query(None, description="a JSON object")):
            wanted = None
            if metadata_filter:
                try:
                    wanted = json.loads(metadata_filter)
                except (ValueError, RecursionError) as e:
                    raise HTTPException(400, f"metadata_filter is not valid JSON: {e}") from e
                if not isinstance(wanted, dict):
                    raise HTTPException(400, "metadata_filter must be a JSON object")
                if problem := content_problem(wanted):
                    raise HTTPException(400, f"metadata_filter: {problem}")
            store = engine().get(index_name)
            docs, total = await asyncio.to_thread(store.list, offset, limit, wanted)
            return ListDocumentsResponse(documents=[_doc(d, max_text_length) for d in docs], count=len(docs),
                                         total_items=total)

        @app.post("/indexes/{index_name}/documents", response_model=UpdateDocumentResponse,
                  responses=errors(400, 404, 413, 502), tags=["index"])
        async def update_documents_in_index(index_name: str, body: UpdateDocumentRequest):
            self._limits(body.documents)
            if any(not d.doc_id for d in body.documents):
                raise HTTPException(400, "every document to update needs its doc_id")
            docs = list({d.doc_id: new_doc(d.text, d.metadata, d.doc_id) for d in body.documents}.values())
            updated, unchanged, not_found = await asyncio.to_thread(engine().update, index_name, docs)
            return UpdateDocumentResponse(updated_documents=[_doc(d) for d in updated],
                                          unchanged_documents=[_doc(d) for d in unchanged],
                                          not_found_documents=[_doc(d) for d in not_found])

        @app.post("/indexes/{index_name}/documents/delete", response_model=DeleteDocumentResponse,
                  responses=errors(400, 404, 413), tags=["index"])
        async def delete_documents_in_index(index_name: str, body: DeleteDocumentRequest):
            if len(body.doc_ids) > self.settings.limits.max_doc_ids:
                raise HTTPException(413, f"{len(body.doc_ids)} ids in one request; the limit is "
                                         f"{self.settings.limits.max_doc_ids}")
            store = engine().get(index_name)
            deleted, missing = await asyncio.to_thread(store.delete, body.doc_ids)
            return DeleteDocumentResponse(deleted_doc_ids=deleted, not_found_doc_ids=missing)

        @app.post("/retrieve", response_model=RetrieveResponse, responses=errors(400, 404, 413, 502), tags=["query"])
        async def retrieve_index(body: RetrieveRequest):
            hits = await engine().retrieve(body.index_name, body.query, body.max_node_count, body.metadata_filter)
            return RetrieveResponse(query=body.query, results=[_node(h) for h in hits], count=len(hits))

        @app.post("/query", response_model=QueryResponse, responses=errors(400, 404, 413, 502), tags=["query"])
        async def query_index(body: QueryRequest):
            return await self._query(body)

        relayed = {"description": "The LLM's own answer, relayed unchanged (its status and body)",
                   "content": {"application/json": {}}}

        @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["chat"],
                  responses={200: {"content": {"text/event-stream": {}}}, **errors(400, 404, 413, 502),
                             "default": relayed})
        async def chat_completions(body: ChatRequest):
            return await self._chat(body)

        @app.post("/persist/{index_name}", response_model=MessageResponse, responses=errors(400, 404), tags=["index"])
        async def persist_index(index_name: str, path: Text | None = None):
            target = await asyncio.to_thread(engine().persist, index_name, path)
            return MessageResponse(message=f"Successfully persisted index {index_name} to {target}.")

        @app.post("/load/{index_name}", response_model=MessageResponse, responses=errors(400, 404, 409),
                  tags=["index"])
        async def load_index(index_name: str = Path(pattern=INDEX_NAME), path: Text | None = None,
                             overwrite: bool = False):
            source = await asyncio.to_thread(engine().load, index_name, path, overwrite)
            return MessageResponse(message=f"Successfully loaded index {index_name} from {source}.")

        def openapi() -> dict[str, Any]:
            """FastAPI's document plus the bearer scheme when the service has an API key."""
            if app.openapi_schema is None:
                doc = get_openapi(title=app.title, version=app.version, description=app.description,
                                  routes=app.routes)
                if guard:
                    for path, operations in doc["paths"].items():
                        for operation in operations.values():
                            if path not in OPEN_PATHS:
                                operation["security"] = [{"bearer": []}]
                    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                app.openapi_schema = doc
            return app.openapi_schema

        app.openapi = openapi
        return app

    # --- LLM routes ------------------------------------------------------------------------------

    def _need_llm(self) -> LLMClient:
        if self.llm is None:
            raise HTTPException(400, "no inference service is configured: this RAGEngine is retrieve-only "
                                     "(spec.inferenceService.url, LLM_INFERENCE_URL, --llm-url); use /retrieve")
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
        rerank = []
        if body.rerank_params:  # upstream's LLM rerank: the LLM ranks the retrieved nodes, top_n are kept
            from llama_index.core.postprocessor import LLMRerank

            judge = OpenAILike(model=li_llm.model, api_base=li_llm.api_base, api_key=li_llm.api_key, is_chat_model=True,
                               context_window=window, timeout=600, max_retries=0, temperature=0,
                               async_http_client=llm.client)  # the ranking answer gets no max_tokens cut
            rerank.append(LLMRerank(llm=judge, top_n=body.rerank_params.get("top_n", min(self.settings.rerank_top_n,
                                                                                          body.top_k)),
                                    choice_batch_size=body.rerank_params.get("choice_batch_size",
                                                                             self.settings.rerank_batch_size)))
        engine = RetrieverQueryEngine.from_args(_Retriever(self.engine, body.index_name, body.top_k), llm=li_llm,
                                                node_postprocessors=rerank)
        try:
            result = await engine.aquery(body.query)
        except (LLMError, NotFound):
            raise
        except Exception as e:  # the OpenAI client's errors: the LLM failed
            raise LLMError(f"the LLM at {llm.base_url} failed: {e}") from e
        if rerank and not result.source_nodes and self.engine.get(body.index_name).chunk_count:
            raise LLMError(f"the LLM at {llm.base_url} reranked no node: its answer to the rerank prompt named none "
                           "of the retrieved documents in the 'Doc: N, Relevance: M' lines LLMRerank reads (a model "
                           "that follows that format is needed; the query without rerank_params works)")
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
        if body.stream and self.guardrails and (whole := self.guardrails.policy.whole_response_scanners):
            raise HTTPException(400, f"stream is not supported with the output guardrails' {', '.join(whole)} "
                                     "scanner(s), which judge the whole answer; ask without stream")
        if body.index_name:
            self.engine.get(body.index_name)  # 404 before anything else
        llm = self._need_llm()
        payload = body.model_dump(exclude_unset=True, exclude={"index_name", "context_token_ratio"})
        model, window = await llm.info()
        payload.setdefault("model", model)
        if not body.index_name:
            return await self._passthrough(llm, payload)
        query = _text(user.get("content"))
        prompt_tokens = await asyncio.to_thread(  # a long prompt costs its own request the time, not the loop
            lambda: sum(self.tokens(_text(m.get("content"))) + 4 for m in body.messages))
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
        answer = await self._guard(r.json())
        answer["source_nodes"] = [_node(h).model_dump() for h in chosen]
        return JSONResponse(answer)

    async def _guard(self, answer: dict) -> dict:
        """The output guardrails applied to each assistant message with text content (in place)."""
        if self.guardrails is None:
            return answer
        for choice in answer.get("choices") or []:
            message = choice.get("message") or {}
            if message.get("role", "assistant") == "assistant" and isinstance(message.get("content"), str):
                out = await asyncio.to_thread(self.guardrails.check, message["content"])
                message["content"] = out.text
                if out.blocked:
                    choice["finish_reason"] = "content_filter"
        return answer

    async def _passthrough(self, llm: LLMClient, payload: dict[str, Any]):
        """The request goes to the LLM unchanged; its answer (stream or not) comes back unchanged."""
        upstream = await llm.open_stream(payload)
        if not payload.get("stream") or upstream.status_code != 200:
            content = await upstream.aread()
            await upstream.aclose()
            if self.guardrails and upstream.status_code == 200:
                return JSONResponse(await self._guard(json.loads(content)))
            return Response(content, upstream.status_code, media_type=upstream.headers.get("content-type"))
        if self.guardrails:
            return StreamingResponse(self._guarded_stream(upstream), media_type="text/event-stream")

        async def relay():
            try:
                async for piece in upstream.aiter_raw():
                    yield piece
            finally:
                await upstream.aclose()

        return StreamingResponse(relay(), media_type=upstream.headers.get("content-type", "text/event-stream"))

    async def _guarded_stream(self, upstream):
        """The LLM's server-sent events with the assistant text passed through the guardrails' window: each
        chunk carries the text released so far; a block or a length limit ends the stream there, with
        finish_reason content_filter or length."""
        guard = self.guardrails.stream()
        last, finished = None, False
        try:
            async for line in upstream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                choice = (chunk.get("choices") or [None])[0]
                if choice is None:  # usage and other chunks without a choice
                    yield f"data: {data}\n\n"
                    continue
                last, delta = chunk, choice.setdefault("delta", {})
                text = await asyncio.to_thread(guard.feed, delta["content"]) if delta.get("content") else ""
                if choice.get("finish_reason") or guard.done:
                    text += await asyncio.to_thread(guard.finish)
                    finished = True
                    if guard.done:
                        choice["finish_reason"] = "content_filter" if guard.blocked else "length"
                if text or delta.get("role") or choice.get("finish_reason") or set(delta) - {"content"}:
                    delta["content"] = text
                    yield f"data: {json.dumps(chunk)}\n\n"
                if guard.done:
                    break
            rest = "" if finished else await asyncio.to_thread(guard.finish)  # a stream with no finish chunk
            if rest and last is not None:
                last["choices"] = [{"index": 0, "delta": {"content": rest}, "finish_reason": None}]
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await upstream.aclose()


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
