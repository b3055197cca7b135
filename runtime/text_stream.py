"""From engine tokens to a choice's text: incremental detokenisation, stop strings, and the pieces
of several choices interleaved as they come. No model needed, only its tokenizer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from .engine_api import TokenEvent


@dataclass
class Piece:
    """Text a choice produced since the last piece, the tokens behind it, and how it ended."""

    text: str
    tokens: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None

    @classmethod
    def join(cls, pieces: Sequence[Piece]) -> Piece:
        """A whole choice: its pieces' text and tokens, and how it ended ("stop" when it has no piece)."""
        return cls("".join(p.text for p in pieces), [t for p in pieces for t in p.tokens],
                   pieces[-1].finish_reason if pieces else "stop")


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


class TextStream:
    """One choice's text as its tokens come: `add` a token event, get the text that is safe to hand
    out. The first stop string ends the text (without the stop string); text that could still grow
    into a stop string is held back until it cannot."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.detok = Detokenizer(tokenizer)
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # the most a stop string's prefix spans
        self.pending = ""
        self.tokens: list[TokenEvent] = []

    def add(self, event: TokenEvent) -> Piece | None:
        """The piece this token completes, or None while all the text is held back. A piece with a
        finish_reason is the choice's last: a stop string was hit, or the engine finished."""
        self.pending += self.detok.add(event.token_id)
        self.tokens.append(event)
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return Piece(self.pending[:cut], self.tokens, "stop")
        if event.finish_reason:
            return Piece(self.pending, self.tokens, event.finish_reason)
        held = next((k for k in range(min(self.hold, len(self.pending)), 0, -1)
                     if any(s.startswith(self.pending[-k:]) for s in self.stops)), 0)
        safe = len(self.pending) - held
        if safe <= 0:
            return None
        piece = Piece(self.pending[:safe], self.tokens)
        self.pending, self.tokens = self.pending[safe:], []
        return piece


_DONE = object()


async def merge(iters: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """Interleave several choices' pieces as they come, as (choice index, piece). An error in one
    choice is raised here; closing the merge cancels the choices still running."""
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
