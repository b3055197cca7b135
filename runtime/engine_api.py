"""The contract between the HTTP server and a generation engine (the transformers backend's engine).

The server validates requests, applies the chat template, tokenises, handles stop strings and `n`,
and turns engine events into OpenAI responses. The engine batches token generation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol


class EngineBusy(Exception):
    """More requests wait than the engine can batch: the server answers 429 with Retry-After."""

    def __init__(self, retry_after_s: float = 1.0) -> None:
        super().__init__(f"engine busy, retry after {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


class UnknownAdapter(Exception):
    """A request named an adapter that is not loaded."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # per-request generator: same seed + same prompt -> same text
    presence_penalty: float = 0.0  # OpenAI semantics, -2..2
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS ids
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob + top k
    adapter: str | None = None  # a loaded adapter's name; None = the base model


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = field(default=None)
    finish_reason: Literal["stop", "length"] | None = None  # set on the last event of a request


class Engine(Protocol):
    max_batch_size: int

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Stream the generated tokens. Raises EngineBusy at once when too many requests wait.
        Closing the iterator early (client gone, stop string hit) frees the request's slot."""
        ...

    def load_adapter(self, name: str, path: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def adapters(self) -> dict[str, str]:
        """Loaded adapters: name -> folder."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
