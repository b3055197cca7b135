"""The contract between the HTTP server and a generation engine (the transformers backend's engine).

The server validates requests, applies the chat template, tokenises, handles stop strings and `n`,
and turns engine events into OpenAI responses. The engine batches token generation.

`has_room` is the one admission rule behind every 429 of kaito-serve: the engine's own queue, the
transformers server's check of a request's `n` choices, and the vLLM middleware's guard. Asked of an
idle server (`has_room(0, 0, ...)`), it also says which requests could never be admitted: those are
a 400, not a 429.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


def has_room(running: int, waiting: int, max_batch_size: int, max_waiting: int, n: int = 1) -> bool:
    """Whether `n` new sequences are admitted next to `running` + `waiting` ones: the running batch
    plus `max_waiting` queued sequences is the capacity; beyond it the answer is 429."""
    return running + waiting + n <= max_batch_size + max_waiting


class EngineBusy(Exception):
    """More requests wait than the engine can batch: the server answers 429 with Retry-After."""

    def __init__(self, retry_after_s: float = 1.0) -> None:
        super().__init__(f"engine busy, retry after {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


class UnknownAdapter(Exception):
    """A request named an adapter that is not loaded."""


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated. Invalid values raise ValueError here, when it is made."""

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # per-request generator: same seed + same prompt -> same text
    presence_penalty: float = 0.0  # OpenAI semantics, -2..2
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS ids
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob + top k
    adapter: str | None = None  # a loaded adapter's name; None = the base model

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = field(default=None)
    finish_reason: Literal["stop", "length"] | None = None  # set on the last event of a request


class Engine(Protocol):
    tokenizer: Any  # the model's transformers tokenizer: chat template, encode, decode
    max_model_len: int  # the context window: prompt plus generated tokens
    max_batch_size: int  # sequences decoded together
    max_waiting: int  # sequences queued beyond the batch before new ones get 429

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    def has_room(self, n: int = 1) -> bool:
        """Whether `n` more sequences are admitted now (`has_room` over the numbers above)."""
        ...

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Stream the generated tokens. Raises EngineBusy at once when the engine has no room,
        UnknownAdapter for an adapter that is not loaded, ValueError for a prompt it cannot run.
        Closing the iterator early (client gone, stop string hit) frees the request's slot."""
        ...

    def load_adapter(self, name: str, path: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def adapters(self) -> dict[str, str]:
        """Loaded adapters: name -> folder."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
