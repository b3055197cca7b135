"""The OpenAI-compatible HTTP server of the transformers backend (FastAPI + uvicorn).

The server validates requests (runtime/protocol.py), renders the model's chat template, checks the
context window, and turns the engine's token stream (runtime/engine_api.py) into OpenAI responses:
incremental detokenisation, stop strings, `n` choices, logprobs, usage, server-sent events. The
model loads in the background after the port opens, so `/health` answers 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters import AdapterError, read_adapter, scan
from .engine_api import Engine, EngineBusy, SamplingParams, TokenEvent, UnknownAdapter
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

log = logging.getLogger(__name__)
OPEN_PATHS = {"/health"}


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


@dataclass
class Piece:
    """Text a choice produced since the last piece, the tokens behind it, and how it ended."""

    text: str
    tokens: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None


class Detokenizer:
    """Incremental detokenisation (prefix/read offsets, as TGI and vLLM do it): O(1) per token and
    never emits half a UTF-8 character."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class TransformersServer:
    def __init__(self, opts: ServeOptions, engine_factory: Callable[[], Engine] | None = None) -> None:
        self.opts = opts
        self.settings = opts.config.transformers
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.tokenizer = None
        self.max_model_len = self.settings.max_model_len or opts.preset.context_limit
        self.engine_factory = engine_factory or self._default_engine
        self.metrics = Metrics(lambda: self.engine)
        self.app = self._build_app()
        self.on_load_failure: Callable[[], None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def _default_engine(self) -> Engine:
        from .hf_engine import HFEngine

        s = self.settings
        return HFEngine(self.opts.model_path, dtype=s.dtype, device=s.device, max_batch_size=s.max_batch_size,
                        max_waiting=s.max_waiting, max_model_len=self.max_model_len, load_in_4bit=s.load_in_4bit,
                        load_in_8bit=s.load_in_8bit)

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
        app = FastAPI(title="kaito-serve", version="1", lifespan=self._lifespan,
                      responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})

        @app.middleware("http")
        async def auth_and_metrics(request: Request, call_next):
            route = request.url.path
            key = self.opts.api_key
            if key and route not in OPEN_PATHS and request.headers.get("authorization") != f"Bearer {key}":
                response = APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                    code="invalid_api_key").response()
            else:
                response = await call_next(request)
            self.metrics.requests.labels(route if route.startswith("/v1/") or route in OPEN_PATHS else "other",
                                         str(response.status_code)).inc()
            return response

        @app.exception_handler(APIError)
        async def api_error(_: Request, e: APIError):
            return e.response()

        @app.exception_handler(RequestValidationError)
        async def invalid(_: Request, e: RequestValidationError):
            err = e.errors()[0]
            if err.get("type") == "json_invalid":
                return APIError(400, f"malformed JSON: {err.get('ctx', {}).get('error', err['msg'])}").response()
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            where = ".".join(loc)
            msg = err["msg"].removeprefix("Value error, ")
            return APIError(400, f"{where}: {msg}" if where else msg, param=where or None).response()

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_: Request, e: StarletteHTTPException):
            return APIError(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                            "invalid_request_error").response()

        @app.get("/health")
        async def health():
            if self.engine is None:
                return JSONResponse({"status": "loading" if not self.load_error else "failed",
                                     "error": self.load_error}, status_code=503)
            return {"status": "ok"}

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models", response_model=ModelList)
        async def list_models():
            engine = self._ready_engine()
            created = now()
            base = self.opts.served_model_name
            cards = [ModelCard(id=base, created=created, root=self.opts.model_path, max_model_len=self.max_model_len)]
            cards += [ModelCard(id=name, created=created, root=path, parent=base)
                      for name, path in sorted(engine.adapters().items())]
            return ModelList(data=cards)

        @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
        async def load_adapter(body: LoadAdapterRequest):
            engine = self._ready_engine()
            if body.lora_name == self.opts.served_model_name or body.lora_name in engine.adapters():
                raise APIError(400, f"an adapter or model named {body.lora_name!r} is already loaded", param="lora_name")
            try:
                adapter = read_adapter(body.lora_path, body.lora_name)
                await asyncio.to_thread(engine.load_adapter, adapter.name, str(adapter.path))
            except AdapterError as e:
                raise APIError(400, str(e), param="lora_path") from None
            return f"Success: LoRA adapter '{body.lora_name}' added successfully."

        @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
        async def unload_adapter(body: UnloadAdapterRequest):
            engine = self._ready_engine()
            if body.lora_name not in engine.adapters():
                raise APIError(404, f"no adapter named {body.lora_name!r} is loaded", "not_found_error", "lora_name")
            await asyncio.to_thread(engine.unload_adapter, body.lora_name)
            return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

        @app.post("/v1/chat/completions", response_model=ChatCompletion,
                  responses={200: {"content": {"text/event-stream": {}}}})
        async def chat(body: ChatCompletionRequest, request: Request):
            return await self._chat(body, request)

        @app.post("/v1/completions", response_model=Completion,
                  responses={200: {"content": {"text/event-stream": {}}}})
        async def completions(body: CompletionRequest, request: Request):
            return await self._complete(body, request)

        return app

    # --- shared request handling ---------------------------------------------------------------

    def _adapter_for(self, engine: Engine, model: str) -> str | None:
        if model == self.opts.served_model_name:
            return None
        if model in engine.adapters():
            return model
        raise APIError(404, f"The model `{model}` does not exist.", "not_found_error", "model", "model_not_found")

    def _check_length(self, prompt_len: int, max_tokens: int | None, what: str) -> int:
        limit = self.max_model_len
        wanted = max_tokens if max_tokens is not None else max(limit - prompt_len, 0)
        if prompt_len + wanted > limit or wanted < 1:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{prompt_len + max(wanted, 1)} tokens ({prompt_len} in the {what}, {max(wanted, 1)} in "
                                f"the completion). Please reduce the length of the {what} or completion.",
                           param=what, code="context_length_exceeded")
        return wanted

    def _params(self, body, engine: Engine, max_tokens: int, adapter: str | None, index: int, top_k: int | None):
        seed = body.seed + index if body.seed is not None else None
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=body.top_p or 1.0, seed=seed, presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, logprobs=top_k, adapter=adapter)

    def _admit(self, engine: Engine, count: int) -> None:
        """429 before any work starts when the request's choices would overflow the running batch
        plus the waiting room (the engine applies the same rule to each request it queues)."""
        max_waiting = getattr(engine, "max_waiting", None)
        max_waiting = engine.max_batch_size if max_waiting is None else max_waiting
        if engine.num_running + engine.num_waiting + count > engine.max_batch_size + max_waiting:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is at capacity ({engine.num_running} running, {engine.num_waiting} "
                                "waiting); retry shortly", "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})

    async def _choice(self, engine: Engine, prompt_ids: list[int], params: SamplingParams,
                      stops: list[str]) -> AsyncIterator[Piece]:
        """One choice: engine tokens -> text pieces, with stop strings applied and held back while
        the text so far could still turn into one."""
        detok = Detokenizer(self.tokenizer)
        pending, pending_tokens = "", []
        hold = max((len(s) for s in stops), default=1) - 1
        gen = None
        try:
            gen = engine.generate(prompt_ids, params)
            async for event in gen:
                pending += detok.add(event.token_id)
                pending_tokens.append(event)
                if stops:
                    cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        yield Piece(pending[:cut], pending_tokens, "stop")
                        return
                if event.finish_reason:
                    yield Piece(pending, pending_tokens, event.finish_reason)
                    return
                # hold back the longest suffix that could still grow into a stop string
                held = next((k for k in range(min(hold, len(pending)), 0, -1)
                             if any(s.startswith(pending[-k:]) for s in stops)), 0)
                safe = len(pending) - held
                if safe > 0:
                    yield Piece(pending[:safe], pending_tokens)
                    pending, pending_tokens = pending[safe:], []
        except EngineBusy as e:
            self.metrics.rejected.inc()
            raise APIError(429, str(e), "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": f"{max(1, round(e.retry_after_s))}"}) from None
        except UnknownAdapter as e:
            raise APIError(404, f"The model `{e}` does not exist.", "not_found_error", "model",
                           "model_not_found") from None
        finally:
            if gen is not None:
                await gen.aclose()

    async def _run(self, request: Request, choices: list[AsyncIterator[Piece]]) -> list[list[Piece]]:
        """Run all choices to the end; stop early (freeing the engine's slots) if the client leaves."""
        async def collect(it: AsyncIterator[Piece]) -> list[Piece]:
            return [p async for p in it]

        work = asyncio.gather(*(collect(c) for c in choices))
        watcher = asyncio.create_task(_wait_disconnect(request))
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
            raise APIError(499, "client disconnected")
        watcher.cancel()
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

    # --- chat ----------------------------------------------------------------------------------

    async def _chat(self, body: ChatCompletionRequest, request: Request):
        engine = self._ready_engine()
        adapter = self._adapter_for(engine, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # templates raise on role orders they do not support
            raise APIError(400, f"the model's chat template rejected the messages: {e}", param="messages") from None
        prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        max_tokens = self._check_length(len(prompt_ids), body.max_new_tokens, "messages")
        top_k = (body.top_logprobs or 0) if body.logprobs else None
        self._admit(engine, body.n)
        choices = [self._choice(engine, prompt_ids, self._params(body, engine, max_tokens, adapter, i, top_k), body.stop)
                   for i in range(body.n)]
        rid, created, started = new_id("chatcmpl"), now(), time.monotonic()
        if body.stream:
            return _sse(self._chat_stream(body, rid, created, started, len(prompt_ids), choices))
        pieces = await self._run(request, choices)
        self._record(len(prompt_ids), pieces, started, None)
        out = [ChatChoice(index=i, message=AssistantMessage(content="".join(p.text for p in ps)),
                          logprobs=self._chat_logprobs([t for p in ps for t in p.tokens]) if top_k is not None else None,
                          finish_reason=ps[-1].finish_reason if ps else "stop")
               for i, ps in enumerate(pieces)]
        completion = sum(len(p.tokens) for ps in pieces for p in ps)
        return ChatCompletion(id=rid, created=created, model=body.model, choices=out,
                              usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion,
                                          total_tokens=len(prompt_ids) + completion))

    async def _chat_stream(self, body, rid, created, started, prompt_len, choices) -> AsyncIterator[str]:
        def chunk(choice: ChatChunkChoice | None = None, usage: Usage | None = None) -> str:
            c = ChatCompletionChunk(id=rid, created=created, model=body.model, choices=[choice] if choice else [],
                                    usage=usage)
            return c.model_dump_json()

        top = body.logprobs
        for i in range(body.n):
            yield chunk(ChatChunkChoice(index=i, delta=Delta(role="assistant", content="")))
        completion, first, all_pieces = 0, None, [[] for _ in choices]
        async for i, piece in _merge(choices):
            first = first or time.monotonic()
            completion += len(piece.tokens)
            all_pieces[i].append(piece)
            if piece.text or piece.finish_reason or (top and piece.tokens):
                yield chunk(ChatChunkChoice(index=i, delta=Delta(content=piece.text or None),
                                            logprobs=self._chat_logprobs(piece.tokens) if top else None,
                                            finish_reason=piece.finish_reason))
        self._record(prompt_len, all_pieces, started, first)
        if body.stream_options and body.stream_options.include_usage:
            yield chunk(usage=Usage(prompt_tokens=prompt_len, completion_tokens=completion,
                                    total_tokens=prompt_len + completion))

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_logprobs(self, events: list[TokenEvent]) -> ChoiceLogprobs:
        def top(tid: int, lp: float) -> TopLogprob:
            t = self._token_text(tid)
            return TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))

        content = [TokenLogprob(**top(e.token_id, e.logprob or 0.0).model_dump(),
                                top_logprobs=[top(t, lp) for t, lp in (e.top_logprobs or [])]) for e in events]
        return ChoiceLogprobs(content=content)

    # --- completions ---------------------------------------------------------------------------

    def _prompts(self, prompt) -> list[list[int]]:
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
        prompts = self._prompts(body.prompt)
        max_tokens = [self._check_length(len(p), body.max_tokens, "prompt") for p in prompts]
        self._admit(engine, body.n * len(prompts))
        jobs = [(p, self._params(body, engine, mt, adapter, i, body.logprobs))
                for p, mt in zip(prompts, max_tokens) for i in range(body.n)]
        choices = [self._choice(engine, p, params, body.stop) for p, params in jobs]
        prompt_tokens = sum(len(p) for p in prompts)
        echo = [self.tokenizer.decode(p, skip_special_tokens=True) if body.echo else "" for p, _ in jobs]
        rid, created, started = new_id("cmpl"), now(), time.monotonic()
        if body.stream:
            return _sse(self._complete_stream(body, rid, created, started, prompt_tokens, choices, echo))
        pieces = await self._run(request, choices)
        self._record(prompt_tokens, pieces, started, None)
        out = [CompletionChoice(index=i, text=echo[i] + "".join(p.text for p in ps),
                                logprobs=self._completion_logprobs([t for p in ps for t in p.tokens], len(echo[i]))
                                if body.logprobs is not None else None,
                                finish_reason=ps[-1].finish_reason if ps else "stop")
               for i, ps in enumerate(pieces)]
        completion = sum(len(p.tokens) for ps in pieces for p in ps)
        return Completion(id=rid, created=created, model=body.model, choices=out,
                          usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                                      total_tokens=prompt_tokens + completion))

    async def _complete_stream(self, body, rid, created, started, prompt_tokens, choices, echo) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return Completion(id=rid, created=created, model=body.model, choices=choices, usage=usage).model_dump_json()

        for i, text in enumerate(echo):
            if text:
                yield chunk([CompletionChoice(index=i, text=text, finish_reason=None)])
        completion, first, all_pieces = 0, None, [[] for _ in choices]
        async for i, piece in _merge(choices):
            first = first or time.monotonic()
            completion += len(piece.tokens)
            all_pieces[i].append(piece)
            if piece.text or piece.finish_reason:
                yield chunk([CompletionChoice(index=i, text=piece.text, finish_reason=piece.finish_reason,
                                              logprobs=self._completion_logprobs(piece.tokens, 0)
                                              if body.logprobs is not None else None)])
        self._record(prompt_tokens, all_pieces, started, first)
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                                  total_tokens=prompt_tokens + completion))

    def _completion_logprobs(self, events: list[TokenEvent], offset: int) -> CompletionLogprobs:
        tokens = [self._token_text(e.token_id) for e in events]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=[e.logprob for e in events], text_offset=offsets,
            top_logprobs=[{self._token_text(t): lp for t, lp in (e.top_logprobs or [])} for e in events])


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


_DONE = object()


async def _merge(iters: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """Interleave several choices' pieces as they come."""
    if len(iters) == 1:
        async for piece in iters[0]:
            yield 0, piece
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, it: AsyncIterator[Piece]) -> None:
        try:
            async for piece in it:
                await queue.put((i, piece))
            await queue.put((i, _DONE))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iters)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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


