"""The OpenAI-compatible HTTP server of the transformers backend (FastAPI + uvicorn).

The server validates requests (runtime/protocol.py), renders the model's chat template, checks the
context window, and turns the engine's token stream (runtime/engine_api.py) into OpenAI responses:
incremental detokenisation, stop strings, `n` choices, logprobs, usage, server-sent events. The
model loads in the background after the port opens, so `/health` answers 503 until it is ready.

Hostile input breaks no one else: the body is limited (runtime/body_limit.py, 413 before it is read
whole); the prompt is tokenised in a worker thread, never on the event loop; a request's choices
are admitted and queued in the engine at once, so a 429 (with Retry-After) or a 400 comes before
any response starts; every error, a failure included, is an OpenAI error body with a status that
/openapi.json declares.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from kaito.presets.auth import CHALLENGE, APIKey
from kaito.presets.cpu import available_cpus
from kaito.presets.weights import metrics_collector

from .adapters import AdapterError, read_adapter, scan
from .body_limit import BodyLimit, BodyTooLarge, default_limit
from .engine_api import Engine, EngineBusy, SamplingParams, TokenEvent, UnknownAdapter, has_room
from .options import ServeOptions
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ErrorBody,
    ErrorResponse,
    LoadAdapterRequest,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    UnloadAdapterRequest,
    Usage,
    new_id,
    now,
)
from .text_stream import Piece, TextStream, merge

log = logging.getLogger(__name__)
OPEN_PATHS = {"/health"}

# Every error status the server answers, as /openapi.json declares it (with the OpenAI error body).
ERRORS = {
    400: "Invalid request: a field's type or value, text that is not valid Unicode, more than the context "
         "window, or more sequences than the server ever runs at once",
    401: "Missing or wrong API key (`Authorization: Bearer KEY`)",
    404: "No such model, adapter or route",
    413: "The request body is over the server's limit (--max-request-bytes)",
    429: "The engine's queue is full: retry after Retry-After seconds",
    500: "Generation failed",
    503: "The model is still loading, or failed to load",
}
ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "required": True, "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait", "required": True, "schema": {"type": "string"}}},
}
TEXT = {"text/plain": {"schema": {"type": "string"}}}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route answers."""
    return {c: {"model": ErrorResponse, "description": ERRORS[c], **({"headers": ERROR_HEADERS[c]}
                                                                     if c in ERROR_HEADERS else {})} for c in codes}


def _events_schema(chunk: type[BaseModel]) -> dict[str, Any]:
    """A server-sent event stream as OpenAPI 3.1 describes one (the schema is each event's): `data` is
    a JSON `chunk`, or an error when generation fails after the 200, and `[DONE]` last."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    data = {"anyOf": [{"const": "[DONE]"},
                      {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}


class Health(BaseModel):
    status: Literal["ok", "loading", "failed"]
    error: str | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


class Metrics:
    """Prometheus metrics, named like vLLM's (`kaito:` instead of `vllm:`) so dashboards carry over."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self.registry = r = CollectorRegistry()
        r.register(metrics_collector())  # the model's download, done before the server started
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.requests = Counter("kaito:requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.success = Counter("kaito:request_success", "Finished generations", ["finished_reason"], registry=r)
        self.rejected = Counter("kaito:requests_rejected", "Requests answered 429 (engine queue full)", registry=r)
        self.prompt_tokens = Counter("kaito:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("kaito:generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("kaito:time_to_first_token_seconds", "Time to first token", buckets=buckets, registry=r)
        self.e2e = Histogram("kaito:e2e_request_latency_seconds", "Request latency", buckets=buckets, registry=r)
        running = Gauge("kaito:num_requests_running", "Requests in the decoding batch", registry=r)
        waiting = Gauge("kaito:num_requests_waiting", "Requests queued for the batch", registry=r)
        running.set_function(lambda: (e := engine()) and e.num_running or 0)
        waiting.set_function(lambda: (e := engine()) and e.num_waiting or 0)


class TransformersServer:
    def __init__(self, opts: ServeOptions, engine_factory: Callable[[], Engine] | None = None) -> None:
        self.opts = opts
        self.settings = opts.config.transformers
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.tokenizer = None
        self.max_model_len = self.settings.max_model_len or opts.preset.context_limit
        self.max_request_bytes = opts.max_request_bytes or default_limit(self.max_model_len)
        self.engine_factory = engine_factory or self._default_engine
        self.metrics = Metrics(lambda: self.engine)
        self.app = self._build_app()
        self.on_load_failure: Callable[[], None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def _default_engine(self) -> Engine:
        import torch

        from .hf_engine import HFEngine

        torch.set_num_threads(available_cpus())  # torch's default counts the node's cores, not the pod's CPU limit
        return HFEngine(self.opts.model_path, self.settings.model_copy(update={"max_model_len": self.max_model_len}))

    async def _load(self) -> None:
        start = time.monotonic()
        try:
            engine = await asyncio.to_thread(self.engine_factory)
            await engine.start()
            for adapter in scan(self.opts.adapters_dir):
                await asyncio.to_thread(engine.load_adapter, adapter.name, str(adapter.path))
            self.tokenizer = engine.tokenizer
            self.max_model_len = engine.max_model_len
            self.engine = engine
            log.warning("model ready", extra={"model": self.opts.served_model_name, "seconds": round(
                time.monotonic() - start, 1), "adapters": sorted(engine.adapters())})
        except Exception as e:  # the pod must fail visibly, not serve 503 for ever
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("model failed to load", extra={"model": self.opts.model_path})
            if self.on_load_failure:
                self.on_load_failure()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI):
        task = asyncio.create_task(self._load())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            if self.engine is not None:
                await self.engine.stop()

    def _ready_engine(self) -> Engine:
        if self.engine is None:
            raise APIError(503, self.load_error or "the model is still loading", "service_unavailable")
        return self.engine

    # --- app ---------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="kaito-serve", version="1", lifespan=self._lifespan)
        api_key = APIKey(self.opts.api_key) if self.opts.api_key else None
        guard = (401,) if api_key else ()

        def too_large(message: str) -> APIError:
            return APIError(413, message, code="request_too_large")

        app.add_middleware(BodyLimit, limit=self.max_request_bytes,  # inside auth_and_metrics: counted there
                           refuse=lambda message: too_large(message).response())

        @app.middleware("http")
        async def auth_and_metrics(request: Request, call_next):
            route = request.url.path
            if api_key and route not in OPEN_PATHS and not api_key.accepts(request.headers.get("authorization")):
                response = APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                    code="invalid_api_key", headers=CHALLENGE).response()
            else:
                response = await call_next(request)
            self.metrics.requests.labels(route if route.startswith("/v1/") or route in OPEN_PATHS else "other",
                                         str(response.status_code)).inc()
            return response

        @app.exception_handler(APIError)
        async def api_error(_: Request, e: APIError):
            return e.response()

        @app.exception_handler(BodyTooLarge)
        async def body_too_large(_: Request, e: BodyTooLarge):
            return too_large(e.detail).response()

        @app.exception_handler(RequestValidationError)
        async def invalid(_: Request, e: RequestValidationError):
            return _invalid(e.errors()).response()

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_: Request, e: StarletteHTTPException):
            return APIError(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                            "invalid_request_error", headers=e.headers).response()

        @app.exception_handler(Exception)
        async def failed(_: Request, e: Exception):  # a bug: still an OpenAI error (uvicorn logs the traceback)
            return APIError(500, f"internal server error ({type(e).__name__}); the server's log has the details",
                            "server_error").response()

        @app.get("/health", response_model=Health, response_model_exclude_none=True,
                 responses={503: {"model": Health, "description": ERRORS[503]}})
        async def health():
            if self.engine is None:
                return JSONResponse({"status": "loading" if not self.load_error else "failed",
                                     "error": self.load_error}, status_code=503)
            return Health(status="ok")

        @app.get("/metrics", response_class=Response,
                 responses={200: {"description": "Prometheus text format", "content": TEXT}, **_errors(*guard)})
        async def metrics():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models", response_model=ModelList, responses=_errors(*guard, 503))
        async def list_models():
            engine = self._ready_engine()
            created = now()
            base = self.opts.served_model_name
            cards = [ModelCard(id=base, created=created, root=self.opts.model_path, max_model_len=self.max_model_len)]
            cards += [ModelCard(id=name, created=created, root=path, parent=base)
                      for name, path in sorted(engine.adapters().items())]
            return ModelList(data=cards)

        adapter_responses = {200: {"description": "What was done", "content": TEXT},
                             **_errors(400, *guard, 404, 413, 503)}

        @app.post("/v1/load_lora_adapter", response_class=Response, responses=adapter_responses)
        async def load_adapter(body: LoadAdapterRequest):
            engine = self._ready_engine()
            if body.lora_name == self.opts.served_model_name or body.lora_name in engine.adapters():
                raise APIError(400, f"an adapter or model named {body.lora_name!r} is already loaded", param="lora_name")
            try:
                adapter = read_adapter(body.lora_path, body.lora_name)
                await asyncio.to_thread(engine.load_adapter, adapter.name, str(adapter.path))
            except AdapterError as e:
                raise APIError(400, str(e), param="lora_path") from None
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter", response_class=Response, responses=adapter_responses)
        async def unload_adapter(body: UnloadAdapterRequest):
            engine = self._ready_engine()
            if body.lora_name not in engine.adapters():
                raise APIError(404, f"no adapter named {body.lora_name!r} is loaded", "not_found_error", "lora_name")
            await asyncio.to_thread(engine.unload_adapter, body.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

        generation = {200: {"content": {"text/event-stream": {}}}, **_errors(400, *guard, 404, 413, 429, 500, 503)}

        @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=generation)
        async def chat(body: ChatCompletionRequest, request: Request):
            return await self._chat(body, request)

        @app.post("/v1/completions", response_model=Completion, responses=generation)
        async def completions(body: CompletionRequest, request: Request):
            return await self._complete(body, request)

        def openapi() -> dict[str, Any]:
            """FastAPI's document, less the 422 it declares for every body (validation errors are 400s
            here), plus the streams' events and the bearer scheme when the server has an API key."""
            if app.openapi_schema is None:
                doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
                for path, operations in doc["paths"].items():
                    for operation in operations.values():
                        operation["responses"].pop("422", None)
                        if api_key and path not in OPEN_PATHS:
                            operation["security"] = [{"bearer": []}]
                schemas = doc["components"]["schemas"]
                for name in ("HTTPValidationError", "ValidationError"):
                    schemas.pop(name, None)
                for path, chunk in (("/v1/chat/completions", ChatCompletionChunk), ("/v1/completions", Completion)):
                    schema = chunk.model_json_schema(ref_template="#/components/schemas/{model}")
                    schemas.update(schema.pop("$defs", {}))
                    schemas[chunk.__name__] = schema
                    stream = doc["paths"][path]["post"]["responses"]["200"]["content"]
                    stream["text/event-stream"] = _events_schema(chunk)
                if api_key:
                    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                app.openapi_schema = doc
            return app.openapi_schema

        app.openapi = openapi
        return app

    # --- request handling ----------------------------------------------------------------------

    def _adapter_for(self, engine: Engine, model: str) -> str | None:
        if model == self.opts.served_model_name:
            return None
        if model in engine.adapters():
            return model
        raise _no_model(model)

    def _check_length(self, prompt_len: int, max_tokens: int | None, what: str) -> int:
        limit = self.max_model_len
        wanted = max_tokens if max_tokens is not None else max(limit - prompt_len, 0)
        if prompt_len + wanted > limit or wanted < 1:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{prompt_len + max(wanted, 1)} tokens ({prompt_len} in the {what}, {max(wanted, 1)} in "
                                f"the completion). Please reduce the length of the {what} or completion.",
                           param=what, code="context_length_exceeded")
        return wanted

    @staticmethod
    def _params(body, max_tokens: int, adapter: str | None, index: int, top_k: int | None) -> SamplingParams:
        seed = body.seed + index if body.seed is not None else None
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=body.top_p or 1.0, seed=seed, presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, logprobs=top_k, adapter=adapter)

    def _busy(self, message: str, retry_after_s: float) -> APIError:
        self.metrics.rejected.inc()
        return APIError(429, message, "rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": f"{max(1, round(retry_after_s))}"})

    async def _start(self, engine: Engine, jobs: list[tuple[list[int], SamplingParams]],
                     stops: list[str]) -> list[AsyncIterator[Piece]]:
        """Admit a request's choices and queue them all in the engine, with no await in between, so
        no other request takes their room meanwhile: the 429 (has_room) or the 400 (more sequences
        than the engine ever runs at once) is decided here, before any response starts."""
        n = len(jobs)
        if not has_room(0, 0, engine.max_batch_size, engine.max_waiting, n):
            raise APIError(400, f"this request asks for {n} sequences (n x prompts); this server runs at most "
                                f"{engine.max_batch_size + engine.max_waiting} at once (max_batch_size + max_waiting)",
                           param="n")
        if not engine.has_room(n):
            raise self._busy(f"the server is at capacity ({engine.num_running} running, {engine.num_waiting} "
                             "waiting); retry shortly", 1)
        streams: list[AsyncIterator[TokenEvent]] = []
        try:
            for prompt, params in jobs:
                streams.append(engine.generate(prompt, params))
        except BaseException as e:
            for s in streams:
                await s.aclose()
            if isinstance(e, EngineBusy):
                raise self._busy(str(e), e.retry_after_s) from None
            if isinstance(e, UnknownAdapter):
                raise _no_model(e) from None
            if isinstance(e, ValueError):
                raise APIError(400, str(e), param="prompt") from None
            raise
        return [self._choice(events, stops) for events in streams]

    async def _choice(self, events: AsyncIterator[TokenEvent], stops: list[str]) -> AsyncIterator[Piece]:
        """One choice: engine tokens -> text pieces (runtime/text_stream.py), engine errors -> API errors."""
        text = TextStream(self.tokenizer, stops)
        try:
            async for event in events:
                piece = text.add(event)
                if piece is not None:
                    yield piece
                    if piece.finish_reason:
                        return
        except UnknownAdapter as e:  # unloaded while the request ran
            raise _no_model(e) from None
        except Exception as e:  # the engine failed this request (and only it)
            raise APIError(500, str(e), "server_error") from None
        finally:
            await events.aclose()

    async def _reply(self, request: Request, reply: _Reply, prompt_tokens: int, choices: list[AsyncIterator[Piece]]):
        """Run the choices and answer: the whole response, or server-sent chunks as the pieces come."""
        started = time.monotonic()
        if reply.body.stream:
            return _sse(self._stream(reply, prompt_tokens, choices, started))
        pieces = await self._run(request, choices)
        self._record(prompt_tokens, pieces, started, None)
        return reply.whole([Piece.join(ps) for ps in pieces], _usage(prompt_tokens, pieces))

    async def _stream(self, reply: _Reply, prompt_tokens: int, choices: list[AsyncIterator[Piece]],
                      started: float) -> AsyncIterator[str]:
        for opening in reply.opening():
            yield opening
        first, pieces = None, [[] for _ in choices]
        async for i, piece in merge(choices):
            first = first or time.monotonic()
            pieces[i].append(piece)
            yield reply.chunk(i, piece)
        self._record(prompt_tokens, pieces, started, first)
        if reply.body.stream_options and reply.body.stream_options.include_usage:
            yield reply.usage(_usage(prompt_tokens, pieces))

    async def _run(self, request: Request, choices: list[AsyncIterator[Piece]]) -> list[list[Piece]]:
        """Run all choices to the end; stop early (freeing the engine's slots) if the client leaves or
        the server shuts down."""
        async def collect(it: AsyncIterator[Piece]) -> list[Piece]:
            return [p async for p in it]

        work = asyncio.gather(*(collect(c) for c in choices))
        watcher = asyncio.create_task(_wait_disconnect(request))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
        if work.cancelled():
            raise APIError(499, "client disconnected")
        return work.result()

    def _record(self, prompt_tokens: int, pieces: list[list[Piece]], started: float, first: float | None) -> None:
        m = self.metrics
        m.prompt_tokens.inc(prompt_tokens)
        m.generation_tokens.inc(sum(len(p.tokens) for ps in pieces for p in ps))
        for ps in pieces:
            if ps and ps[-1].finish_reason:
                m.success.labels(ps[-1].finish_reason).inc()
        if first is not None:
            m.ttft.observe(first - started)
        m.e2e.observe(time.monotonic() - started)

    # --- the two endpoints ---------------------------------------------------------------------

    async def _chat(self, body: ChatCompletionRequest, request: Request):
        engine = self._ready_engine()
        adapter = self._adapter_for(engine, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt_ids = await asyncio.to_thread(self._chat_prompt, messages)  # a long prompt stalls no one
        max_tokens = self._check_length(len(prompt_ids), body.max_new_tokens, "messages")
        top_k = (body.top_logprobs or 0) if body.logprobs else None
        jobs = [(prompt_ids, self._params(body, max_tokens, adapter, i, top_k)) for i in range(body.n)]
        choices = await self._start(engine, jobs, body.stop)
        return await self._reply(request, _ChatReply(body, self.tokenizer), len(prompt_ids), choices)

    def _chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template applied and tokenised (in a worker thread)."""
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # templates raise on role orders they do not support
            raise APIError(400, f"the model's chat template rejected the messages: {e}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompts(self, prompt) -> list[list[int]]:
        """The prompts as token ids (in a worker thread)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            ids = self.tokenizer(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
            out.append(ids)
        return out

    async def _complete(self, body: CompletionRequest, request: Request):
        engine = self._ready_engine()
        adapter = self._adapter_for(engine, body.model)
        prompts = await asyncio.to_thread(self._prompts, body.prompt)  # a long prompt stalls no one
        max_tokens = [self._check_length(len(p), body.max_tokens, "prompt") for p in prompts]
        jobs = [(p, self._params(body, mt, adapter, i, body.logprobs))
                for p, mt in zip(prompts, max_tokens) for i in range(body.n)]
        choices = await self._start(engine, jobs, body.stop)
        echo = [self.tokenizer.decode(p, skip_special_tokens=True) if body.echo else "" for p, _ in jobs]
        return await self._reply(request, _CompletionReply(body, self.tokenizer, echo), sum(len(p) for p in prompts),
                                 choices)


def _no_model(model: object) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", "not_found_error", "model", "model_not_found")


UNION_TAGS = {"str", "int", "float", "bool", "none"}  # pydantic's names of a union's members in an error's location


def _invalid(errors: list[dict[str, Any]]) -> APIError:
    """A request validation error as one clear 400. A union's members each report an error: the one
    that says most is a failed check of ours (a value error), else the member that got furthest in;
    its location is given without pydantic's member names (`prompt.list[str].1` -> `prompt.1`)."""
    err = max(errors, key=lambda e: (e.get("type") == "value_error", len(e.get("loc", ()))))
    if err.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    loc = [str(p) for p in err.get("loc", ()) if not (isinstance(p, str) and (p in UNION_TAGS or "[" in p or
                                                                             p == "body"))]
    where = ".".join(loc)
    msg = err["msg"].removeprefix("Value error, ")
    if not where and err.get("type") != "value_error":  # not an object at all (or not sent as JSON)
        msg = f"the request body must be a JSON object, sent with Content-Type: application/json ({msg})"
    return APIError(400, f"{where}: {msg}" if where else msg, param=where or None)


def _usage(prompt_tokens: int, pieces: list[list[Piece]]) -> Usage:
    completion = sum(len(p.tokens) for ps in pieces for p in ps)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


class _Reply:
    """One endpoint's answer shapes: the whole response (`whole`), or the server-sent chunks of a
    stream (`opening`, one `chunk` per piece, `usage`)."""

    id_prefix = ""

    def __init__(self, body, tokenizer) -> None:
        self.body, self.tokenizer = body, tokenizer
        self.id, self.created = new_id(self.id_prefix), now()

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def opening(self) -> list[str]:
        return []

    def chunk(self, index: int, piece: Piece) -> str:
        raise NotImplementedError

    def usage(self, usage: Usage) -> str:
        raise NotImplementedError

    def whole(self, choices: list[Piece], usage: Usage) -> Any:
        raise NotImplementedError


class _ChatReply(_Reply):
    id_prefix = "chatcmpl"

    def _chunk(self, choice: ChatChunkChoice | None = None, usage: Usage | None = None) -> str:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.body.model,
                                   choices=[choice] if choice else [], usage=usage).model_dump_json()

    def opening(self) -> list[str]:
        return [self._chunk(ChatChunkChoice(index=i, delta=Delta(role="assistant", content="")))
                for i in range(self.body.n)]

    def chunk(self, index: int, piece: Piece) -> str:
        return self._chunk(ChatChunkChoice(index=index, delta=Delta(content=piece.text or None),
                                           logprobs=self._logprobs(piece.tokens), finish_reason=piece.finish_reason))

    def usage(self, usage: Usage) -> str:
        return self._chunk(usage=usage)

    def whole(self, choices: list[Piece], usage: Usage) -> ChatCompletion:
        out = [ChatChoice(index=i, message=AssistantMessage(content=c.text), logprobs=self._logprobs(c.tokens),
                          finish_reason=c.finish_reason) for i, c in enumerate(choices)]
        return ChatCompletion(id=self.id, created=self.created, model=self.body.model, choices=out, usage=usage)

    def _logprobs(self, events: list[TokenEvent]) -> ChoiceLogprobs | None:
        if not self.body.logprobs:
            return None

        def top(tid: int, lp: float) -> TopLogprob:
            t = self.token_text(tid)
            return TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))

        return ChoiceLogprobs(content=[TokenLogprob(**top(e.token_id, e.logprob or 0.0).model_dump(),
                                                    top_logprobs=[top(t, lp) for t, lp in (e.top_logprobs or [])])
                                       for e in events])


class _CompletionReply(_Reply):
    id_prefix = "cmpl"

    def __init__(self, body: CompletionRequest, tokenizer, echo: list[str]) -> None:
        super().__init__(body, tokenizer)
        self.echo = echo  # per choice: the prompt's text when the request asks for an echo, else ""

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return Completion(id=self.id, created=self.created, model=self.body.model, choices=choices,
                          usage=usage).model_dump_json()

    def opening(self) -> list[str]:
        return [self._chunk([CompletionChoice(index=i, text=text, finish_reason=None)])
                for i, text in enumerate(self.echo) if text]

    def chunk(self, index: int, piece: Piece) -> str:
        return self._chunk([CompletionChoice(index=index, text=piece.text, finish_reason=piece.finish_reason,
                                             logprobs=self._logprobs(piece.tokens, 0))])

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage)

    def whole(self, choices: list[Piece], usage: Usage) -> Completion:
        out = [CompletionChoice(index=i, text=self.echo[i] + c.text, finish_reason=c.finish_reason,
                                logprobs=self._logprobs(c.tokens, len(self.echo[i]))) for i, c in enumerate(choices)]
        return Completion(id=self.id, created=self.created, model=self.body.model, choices=out, usage=usage)

    def _logprobs(self, events: list[TokenEvent], offset: int) -> CompletionLogprobs | None:
        if self.body.logprobs is None:
            return None
        tokens = [self.token_text(e.token_id) for e in events]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=[e.logprob for e in events], text_offset=offsets,
            top_logprobs=[{self.token_text(t): lp for t, lp in (e.top_logprobs or [])} for e in events])


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events ending with `data: [DONE]`. Admission errors (429, unknown model) are raised
    before the stream starts; an error after the 200 went out is reported in-band, as OpenAI does."""

    async def body() -> AsyncIterator[str]:
        try:
            async for e in events:
                yield f"data: {e}\n\n"
        except APIError as e:
            error = ErrorResponse(error=ErrorBody(message=e.message, type=e.type, code=e.code))
            yield f"data: {error.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(opts: ServeOptions, engine_factory: Callable[[], Engine] | None = None) -> FastAPI:
    return TransformersServer(opts, engine_factory).app


def run(opts: ServeOptions) -> int:
    server_obj = TransformersServer(opts)
    config = uvicorn.Config(server_obj.app, host=opts.host, port=opts.port, log_level="warning",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    def fail() -> None:
        server.should_exit = True

    server_obj.on_load_failure = fail
    server.run()
    return 1 if server_obj.load_error else 0


