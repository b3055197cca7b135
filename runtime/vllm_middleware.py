"""KAITO behaviour on top of vLLM's own OpenAI server, as one pure-ASGI middleware.

vLLM loads it through its public `--middleware` flag
(`--middleware kaito.runtime.vllm_middleware.KaitoMiddleware`), so it runs inside vLLM's API server
process, in front of vLLM's routes: no proxy, no second hop. It adds:

- API key (`KAITO_API_KEY`): every route but `/health` needs `Authorization: Bearer KEY`. vLLM's
  own `--api-key` guards only paths under /v1, /v2, /inference and /cohere, leaving /metrics,
  /tokenize, /detokenize, /version, /ping, /invocations, /server_load... open, and answers
  `{"error": "Unauthorized"}`; this middleware guards everything and answers an OpenAI-shaped 401.
- A request body limit (runtime/body_limit.py, `KAITO_MAX_REQUEST_BYTES`, by default from vLLM's
  max-model-len): a larger body is answered 413 before it is read whole, on every route.
- A 429 guard: the sequences of the generation requests in flight are counted (n per prompt);
  when more would wait than the engine can batch (kaito-serve's one rule, `engine_api.has_room`:
  in flight > max-num-seqs running + max-num-seqs waiting; `KAITO_MAX_WAITING` changes the second
  number) the request is answered 429 with `Retry-After` and an OpenAI-shaped error instead of
  queuing without bound. A request with more sequences than that capacity could never be admitted:
  it is a 400. max-num-seqs is read from the running engine's config (`app.state.vllm_config`), so
  vLLM's own default (128 on CPU, 256-1024 on GPUs) is honoured.
- kaito's text rule (runtime/protocol.text_problem): a generation request whose text holds a lone
  surrogate or a NUL character is a 400 naming where.
- OpenAI's context-window rule: prompt + max_tokens beyond max-model-len is a 400 naming both
  numbers (vLLM 0.32 silently lowers max_tokens instead). The prompt is counted by vLLM's own
  `/tokenize` route, called in process, and only when a cheap bound (request bytes + template
  slack + max_tokens) says the request might not fit; other requests pay a JSON parse.
- `kaito_requests_rejected_total{reason}` in vLLM's Prometheus registry (served at /metrics).
- OpenAI-shaped errors on routes whose errors vLLM leaves in FastAPI's `{"detail": ...}` shape
  (unknown paths, wrong methods). vLLM's own API errors are already
  `{"error": {"message", "type", "param", "code"}}` and pass untouched.
- A start-up hook: callbacks registered with `on_ready` run when the app's lifespan start-up
  completes, just before uvicorn accepts connections (kaito's loading responder stops there).

Per request the cost is a few dictionary look-ups, with a key one SHA-256 of the header
(`kaito.presets.auth`), and for a generation request one `json.loads` of its body (tens of
microseconds for a chat request).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from kaito.presets.auth import CHALLENGE, APIKey
from kaito.presets.contract import API_KEY_ENV, MAX_REQUEST_BYTES_ENV

from .body_limit import BodyTooLarge, declared_length, default_limit, limited, too_large_message
from .engine_api import has_room
from .protocol import text_problem

log = logging.getLogger("kaito.runtime.vllm")

# POST routes that start generation work in the engine: the ones the 429 guard counts.
GENERATION_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/messages",
        "/inference/v1/generate",
    }
)
OPEN_ROUTES = frozenset({"/health"})
TEMPLATE_SLACK = 1024  # tokens a chat template may add around the messages (roles, default system prompt)
CHAT_TOKENIZE_FIELDS = ("model", "messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
                        "chat_template", "chat_template_kwargs", "tools", "mm_processor_kwargs")
DEFAULT_MAX_NUM_SEQS = 128  # vLLM's CPU default for the API server; used only if the config is unreadable
CHALLENGE_HEADERS = [(name.lower().encode(), value.encode()) for name, value in CHALLENGE.items()]
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

_ready_callbacks: list[Callable[[], Any]] = []


def on_ready(callback: Callable[[], Any]) -> None:
    """Run `callback` (once) when the server's lifespan start-up completes."""
    _ready_callbacks.append(callback)


def error_body(status: int, message: str, *, param: str | None = None) -> bytes:
    """vLLM's error body: OpenAI's `{"error": {...}}` with the HTTP status as `code`."""
    err = {"message": message, "type": ERROR_TYPES.get(status, "Error"), "param": param, "code": status}
    return json.dumps({"error": err}).encode()


def _rejections():
    """The 429 counter, registered once in prometheus_client's default registry (vLLM's /metrics
    serves that registry when it runs a single API server process)."""
    from prometheus_client import REGISTRY, Counter

    name = "kaito_requests_rejected"
    try:
        return Counter(name, "Requests kaito-serve refused before they reached the engine.", ["reason"])
    except ValueError:  # already registered (module imported twice)
        return REGISTRY._names_to_collectors[name + "_total"]


REJECTED = _rejections()
REJECTED_BUSY = REJECTED.labels(reason="queue_full")
REJECTED_BUSY.inc(0)


async def _respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive) -> tuple[bytes, dict | None]:
    """The whole request body; and a non-body message met on the way (a disconnect), if any."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks), None


class _Replay:
    """`receive` for the app: the body already read, then the client's own messages (disconnects)."""

    __slots__ = ("body", "pending", "receive")

    def __init__(self, body: bytes, receive, tail: dict | None) -> None:
        self.body: bytes | None = body
        self.receive = receive
        self.pending = tail

    async def __call__(self):
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        if self.pending is not None:
            message, self.pending = self.pending, None
            return message
        return await self.receive()


def _bad_text(req: Any) -> tuple[str, str] | None:
    """A string in a request's JSON (keys included) that breaks kaito's text rule: (where, what is
    wrong). Iterative: JSON may nest deeper than Python's recursion limit."""
    todo = [("", req)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, str):
            if problem := text_problem(value):
                return where, problem
            continue
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            todo += [(where, key), (f"{where}.{key}" if where else str(key), item)]
    return None


def _sequences(req: dict | None) -> int:
    """Sequences a generation request puts in the engine: n per prompt."""
    if req is None:
        return 1
    n = req.get("n")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    prompt = req.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return n * max(1, prompts)


class KaitoMiddleware:
    """Pure ASGI middleware; configured from the environment (`KAITO_API_KEY`, `KAITO_MAX_WAITING`,
    `KAITO_RETRY_AFTER_S`) because vLLM constructs it with the app only."""

    def __init__(self, app) -> None:
        self.app = app
        key = os.environ.get(API_KEY_ENV)
        self.api_key = APIKey(key) if key else None
        limit = os.environ.get(MAX_REQUEST_BYTES_ENV)
        self.max_request_bytes = int(limit) if limit else None  # None: from max-model-len at the first request
        waiting = os.environ.get("KAITO_MAX_WAITING")
        self.max_waiting = int(waiting) if waiting else None
        self.retry_after = str(max(1, round(float(os.environ.get("KAITO_RETRY_AFTER_S") or 1))))
        self.limits: tuple[int, int] | None = None  # (max-num-seqs, waiting sequences allowed)
        self.max_model_len: int | None = None
        self.in_flight = 0  # sequences (n x prompts) of the generation requests admitted and not finished

    # -- helpers ---------------------------------------------------------------------------------
    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                return self.api_key.accepts(value)
        return False

    def _limits(self, scope) -> tuple[int, int]:
        """The engine's batch (max-num-seqs) and the wait line allowed (max-num-seqs unless
        KAITO_MAX_WAITING is set)."""
        max_seqs = DEFAULT_MAX_NUM_SEQS
        app = scope.get("app")
        try:
            max_seqs = int(app.state.vllm_config.scheduler_config.max_num_seqs)
        except Exception:  # noqa: BLE001 - an app without vLLM's state: keep the default
            log.warning("kaito: cannot read max-num-seqs from the engine config; assuming %d", max_seqs)
        waiting = max(0, self.max_waiting if self.max_waiting is not None else max_seqs)
        self.limits = max_seqs, waiting
        log.info("kaito: admitting %d sequences at once (max-num-seqs %d + %d waiting)",
                 max_seqs + waiting, max_seqs, waiting)
        return self.limits

    async def _lifespan(self, scope, receive, send) -> None:
        async def send_and_signal(message) -> None:
            await send(message)
            if message.get("type") == "lifespan.startup.complete":
                while _ready_callbacks:
                    try:
                        _ready_callbacks.pop(0)()
                    except Exception:
                        log.exception("kaito: start-up hook failed")

        await self.app(scope, receive, send_and_signal)

    async def _generate(self, scope, receive, send, path: str) -> None:
        """A generation request: admission (429 guard) and the context-window check, then vLLM.
        vLLM shapes the errors of its generation routes itself: no send wrapper on the hot path."""
        try:
            body, tail = await _read_body(receive)
        except BodyTooLarge as e:
            return await _respond(send, 413, error_body(413, e.detail))
        try:
            req = json.loads(body) if body else None
        except (ValueError, RecursionError):
            req = None  # vLLM answers malformed JSON itself
        if not isinstance(req, dict):
            req = None
        bad = _bad_text(req) if req is not None else None
        if bad is not None:
            where, problem = bad
            return await _respond(send, 400, error_body(400, f"{where}: {problem}" if where else problem,
                                                        param=where or None))
        seqs = _sequences(req)
        max_seqs, max_waiting = self.limits or self._limits(scope)
        if not has_room(0, 0, max_seqs, max_waiting, seqs):  # not even on an idle server
            msg = (f"this request asks for {seqs} sequences (n x prompts); this server admits at most "
                   f"{max_seqs + max_waiting} at once (max-num-seqs {max_seqs} + {max_waiting} waiting)")
            return await _respond(send, 400, error_body(400, msg, param="n"))
        # vLLM's split of the sequences in flight into running and waiting is not visible here
        if not has_room(self.in_flight, 0, max_seqs, max_waiting, seqs):
            REJECTED_BUSY.inc()
            msg = (f"the server is busy: {self.in_flight} sequences are running or waiting, more than the engine "
                   f"can batch; retry after {self.retry_after} s")
            return await _respond(send, 429, error_body(429, msg), [(b"retry-after", self.retry_after.encode())])
        if req is not None:
            problem = await self._context_problem(scope, path, req, len(body))
            if problem is not None:
                return await _respond(send, 400, problem)
        self.in_flight += seqs
        try:
            return await self.app(scope, _Replay(body, receive, tail), send)
        finally:
            self.in_flight -= seqs

    async def _context_problem(self, scope, path: str, req: dict, body_len: int) -> bytes | None:
        """OpenAI's 400 when prompt + max_tokens exceed the context window (vLLM 0.32 silently caps
        max_tokens instead). The prompt is tokenized (through vLLM's own /tokenize route, in process)
        only when a cheap upper bound says it might not fit: a byte-level tokenizer never makes more
        tokens than the request has bytes, plus the chat template's own tokens."""
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return None
        max_tokens = req.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = req.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
            return None
        max_len = self._max_model_len(scope)
        if max_len is None or max_tokens > max_len or body_len + TEMPLATE_SLACK + max_tokens <= max_len:
            return None  # fits for sure, or vLLM rejects it itself (max_tokens > max_model_len)
        if path == "/v1/chat/completions":
            what = "messages"
            if not isinstance(req.get("messages"), list) or not req["messages"]:
                return None
            asks = [{k: req[k] for k in CHAT_TOKENIZE_FIELDS if k in req}]
            counts: list[int] = []
        else:
            what = "prompt"
            prompt = req.get("prompt")
            single_ids = isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt)
            if isinstance(prompt, str) or single_ids:
                prompts = [prompt]
            elif isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
                prompts = prompt
            else:
                return None
            asks = [{k: req[k] for k in ("model", "add_special_tokens") if k in req} | {"prompt": p}
                    for p in prompts if isinstance(p, str)]
            counts = [len(p) for p in prompts if isinstance(p, list)]
        for ask in asks:
            n = await self._count_tokens(scope, ask)
            if n is None:
                return None  # let vLLM answer (e.g. the prompt alone is too long)
            counts.append(n)
        if not counts or max(counts) + max_tokens <= max_len:
            return None
        used = max(counts)
        return error_body(
            400,
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{used + max_tokens} tokens ({used} in the {what}, {max_tokens} in the completion). "
            f"Please reduce the length of the {what} or completion.",
            param=what,
        )

    def _body_limit(self, scope) -> int:
        """KAITO_MAX_REQUEST_BYTES, else the default for vLLM's max-model-len (read once)."""
        if self.max_request_bytes is None:
            self.max_request_bytes = default_limit(self._max_model_len(scope) or 0)
            log.info("kaito: request bodies are limited to %d bytes", self.max_request_bytes)
        return self.max_request_bytes

    def _max_model_len(self, scope) -> int | None:
        if self.max_model_len is None:
            try:
                self.max_model_len = int(scope["app"].state.vllm_config.model_config.max_model_len)
            except Exception:  # noqa: BLE001 - an app without vLLM's state
                return None
        return self.max_model_len

    async def _count_tokens(self, scope, ask: dict) -> int | None:
        """Prompt tokens as vLLM counts them: an in-process request to its `/tokenize` route."""
        body = json.dumps(ask).encode()
        sub = {
            **scope,
            "path": "/tokenize",
            "raw_path": b"/tokenize",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
        sub.pop("route", None)
        sub.pop("endpoint", None)
        sub.pop("path_params", None)
        status, chunks, sent = 0, [], False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # no disconnect: the listener is cancelled when the route returns

        async def send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        try:
            await self.app(sub, receive, send)
            if status != 200:
                return None
            return int(json.loads(b"".join(chunks))["count"])
        except Exception:
            log.debug("kaito: token count failed", exc_info=True)
            return None

    # -- ASGI --------------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            return await self._lifespan(scope, receive, send)
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):]
        if path in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        method = scope.get("method")
        if self.api_key is not None and method != "OPTIONS" and not self._authorized(scope):
            if kind == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            body = error_body(401, "invalid or missing API key: send `Authorization: Bearer <key>`")
            return await _respond(send, 401, body, CHALLENGE_HEADERS)
        if kind == "http":
            limit = self._body_limit(scope)
            declared = declared_length(scope)
            if declared is not None and declared > limit:
                return await _respond(send, 413, error_body(413, too_large_message(limit)))
            receive = limited(receive, limit)  # past the limit: BodyTooLarge, which FastAPI answers 413
        if kind == "http" and method == "POST" and path in GENERATION_ROUTES:
            return await self._generate(scope, receive, send, path)
        if kind == "http":
            return await self.app(scope, receive, _ErrorShaper(send))
        return await self.app(scope, receive, send)


class _ErrorShaper:
    """Rewrites a JSON error body that is not OpenAI-shaped (FastAPI's `{"detail": ...}` on unknown
    paths and wrong methods) into `{"error": {...}}`. Success responses pass through unbuffered."""

    __slots__ = ("chunks", "send", "start")

    def __init__(self, send) -> None:
        self.send = send
        self.start: dict | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            status = message["status"]
            if status >= 400 and any(
                k == b"content-type" and v.startswith(b"application/json") for k, v in message.get("headers", ())
            ):
                self.start = message  # hold it until the body is complete
                return
            return await self.send(message)
        if self.start is None or message["type"] != "http.response.body":
            return await self.send(message)
        self.chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(self.chunks)
        start, self.start = self.start, None
        body = self._shape(start["status"], body)
        headers = [(k, v) for k, v in start.get("headers", ()) if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    @staticmethod
    def _shape(status: int, body: bytes) -> bytes:
        try:
            data = json.loads(body)
        except ValueError:
            return body
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return body
        detail = data.get("detail", data) if isinstance(data, dict) else data
        message = detail if isinstance(detail, str) else json.dumps(detail)
        return error_body(status, message)
