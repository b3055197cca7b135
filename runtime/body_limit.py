"""The request body limit of kaito-serve, both backends: a body over the limit is answered 413 before
it is read whole.

A declared `Content-Length` over the limit is refused before a byte of the body is read; a chunked
body is counted as it arrives and refused at the first chunk past the limit. Either way the server
holds at most the limit plus one chunk of a refused body, and uvicorn discards the rest.

The default limit follows from the context window (`default_limit`): what a request can usefully
carry is at most a few context windows of prompt (a completions request may hold several prompts),
so anything much larger is refused instead of being parsed and tokenised.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BYTES_PER_TOKEN = 16  # JSON for one token, generously: a token is about 4 characters; `\uXXXX` escapes are 6 each
PROMPTS = 16  # context windows a request may carry (a completions request's list of prompts)
MIN_BYTES = 1 << 20  # the floor: small-context models still take any reasonable request


def default_limit(max_model_len: int) -> int:
    """The body limit for a model with this context window: 16 context windows of 16-byte tokens
    (2 MiB for an 8192-token context), and at least 1 MiB."""
    return max(MIN_BYTES, BYTES_PER_TOKEN * max_model_len * PROMPTS)


def too_large_message(limit: int) -> str:
    return (f"the request body is larger than this server's limit of {limit} bytes "
            "(kaito-serve --max-request-bytes)")


class BodyTooLarge(HTTPException):
    """Raised by a limited `receive` past the limit. An HTTPException, so FastAPI lets it through while
    it reads the body and the app's handler answers it (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, when it has a valid one."""
    value = Headers(scope=scope).get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def limited(receive: Receive, limit: int) -> Receive:
    """`receive` that counts the body's bytes and raises BodyTooLarge at the first chunk past `limit`."""
    seen = 0

    async def receive_limited() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return receive_limited


class BodyLimit:
    """Pure ASGI middleware: a request whose declared length is over `limit` is answered by
    `refuse(message)` (an ASGI app) at once; other bodies are read through `limited`, and the app
    answers the BodyTooLarge raised past the limit."""

    def __init__(self, app: ASGIApp, limit: int, refuse: Callable[[str], Callable[[Scope, Receive, Send],
                                                                                    Awaitable[None]]]) -> None:
        self.app, self.limit, self.refuse = app, limit, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = declared_length(scope)
        if declared is not None and declared > self.limit:
            return await self.refuse(too_large_message(self.limit))(scope, receive, send)
        await self.app(scope, limited(receive, self.limit), send)
