"""The transformers backend's generation engine: continuous batching over a Hugging Face causal LM.

Design choice: our own step loop, not `transformers.generation.continuous_batching`
----------------------------------------------------------------------------------
transformers 5.19 ships a continuous-batching manager (`model.init_continuous_batching()`, paged
attention). We measured it first on the development machine (2 shared CPU cores, AVX2, no GPU),
SmolLM2-135M-Instruct, greedy, 64 new tokens, short chat prompts, tokens/s:

                                             1 at a time   8 concurrent   16 concurrent
    transformers CB, bf16, default config    0.8           -              -   (init > 40 s: it sizes
                                                                                  its tensors for the RAM)
    transformers CB, bf16, tuned [1]         0.6           8.7            15.2
    transformers CB, float32, tuned [1]      1.8           4.4            18.9
    model.generate, float32, one at a time   14.6
    this engine, float32                     15.2          45.3           60.6

    [1] num_blocks=64, page_size=64, max_batch_tokens=256, max_requests_per_batch=16

On the CPU its SDPA path with dense masks over the token budget is slower at 16 concurrent
requests than plain `generate` is for one. It also cannot do what `SamplingParams` asks per
request: its per-request logits processors are temperature, top-k and top-p only; the seed is one
per manager; logprobs are the chosen token's only (no top-k alternatives); there are no presence /
frequency penalties, no extra stop ids per request and no per-request LoRA adapter. Per-request
temperature/top-p did work (with `per_request_processors=True`).

So the engine runs its own loop over the model's `forward`:

* One background thread owns the model and the batch. Each iteration it (1) drops cancelled rows,
  (2) admits waiting requests while the batch has room and prefills them together (left-padded,
  `logits_to_keep=1`), samples their first token and merges their KV rows into the running batch,
  (3) runs one decode step for every running row, samples a token per row and drops finished rows.
  Requests that arrive while others decode join at the next iteration; nothing waits for a batch
  to drain.
* The KV cache (runtime/kv_cache.py) holds the whole batch in one buffer per layer, left-padded; a
  decode step writes one column in place. The attention mask and the position ids follow from each
  row's first column and the length, so the model sees exactly what a padded `generate` batch sees.
* Sampling (runtime/sampler.py) is per row, vectorised over the rows that need it: greedy, temperature,
  top-p, a seed per request, presence/frequency penalties, logprobs with top-k alternatives.
* LoRA adapters are PEFT adapters injected into the model (`PeftModel`); a batch that holds rows
  of several adapters (or the base model) runs as one forward with peft's `adapter_names=[...]`
  per row. The first `load_adapter` wraps the model, unloading the last one unwraps it.
* A request that fails breaks no other: requests are validated before they join a batch
  (`_validate`), and a batch step that still raises is narrowed down. A failed prefill is retried
  one request at a time; a failed decode step is undone (`BatchCache.rewind`, seeded generators
  rewound) and each row's step is tried alone on a copy of its cache. Rows that fail alone get the
  error, the others go on with the tokens they would have had; a step that fails only as a whole
  batch (every row passes alone) fails every row.
* Events go to the asyncio side through `loop.call_soon_threadsafe` (one callback per event loop
  per step) into a per-request `asyncio.Queue`; the event loop never waits on the model.
* The model is loaded by runtime/hf_model.py. On the CPU (runtime/cpu.py) a half dtype without
  fast matmul on this CPU is computed in float32, and grouped-query attention with a padding mask
  runs through torch's SDPA with `enable_gqa=True`.

Measured with benchmarks/engine_batching.py on the same machine (shared with other jobs, load
average about 3; best of 3 interleaved rounds; 64 new tokens, greedy; every request generated all
64 tokens), tokens/s and ratio to one-request-at-a-time `model.generate`:

    torch threads            generate fp32   generate bf16   engine 1    engine 8     engine 16
    2 (torch's default)      14.6            10.4            15.2 1.0x   45.3 3.1x    60.6 4.2x (5.8x bf16)
    1                        15.4            14.7            16.3 1.1x   58.5 3.8x    82.9 5.4x (5.6x bf16)

Almost all of the time is the model's forward (the loop's own work -- masks, sampling, events,
cache merges -- is about 1%); at 16 concurrent, prefilling the prompts is about a fifth of the run
(no prefix caching: every chat prompt recomputes the same system prompt).

Batch invariance: in float32 a row gets the same tokens alone as in any batch (tests/test_hf_engine.py
checks it). In bfloat16 on the CPU it does not: torch's bf16 matmul and SDPA kernels give a row
slightly different numbers depending on the batch's size and padding (seen on an AVX-512 BF16 CPU,
where bf16 is not replaced by float32), enough to change greedy text and seeded samples.

Not supported: models whose cache is not a plain attention KV cache (Mamba / linear-attention
hybrids), encoder-decoder models, beam search. Sliding-window layers keep their full history
(correct, not memory-saving).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kaito.presets import TransformersConfig

from . import engine_api
from .engine_api import EngineBusy, SamplingParams, TokenEvent, UnknownAdapter
from .hf_model import context_window, eos_token_ids, load_model, text_config, vocab_size
from .kv_cache import CAPACITY_CHUNK, BatchCache
from .sampler import BatchSampling, Sampled, Sampler, seeded_generator

log = logging.getLogger(__name__)

_BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
RETRY_AFTER_S = 1.0  # what a 429 asks the client to wait


# --------------------------------------------------------------------------------------------- requests


class _AdapterGone(Exception):
    """A row's adapter was unloaded between the check and the forward."""


def _unloaded(req: _Request) -> UnknownAdapter:
    return UnknownAdapter(f"adapter {req.params.adapter!r} was unloaded")


@dataclass(eq=False)
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    max_new: int  # max_tokens, capped by max_model_len
    stop_ids: frozenset[int]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    generator: torch.Generator | None = None
    counts: dict[int, int] = field(default_factory=dict)  # generated token -> count (penalties)
    n_generated: int = 0
    state: str = "waiting"  # waiting | running | done
    cancelled: bool = False
    last_token: int = 0


class _RequestStream:
    """What `generate` returns: an async iterator of TokenEvent. Closing it (aclose, garbage
    collection) or cancelling the task that waits on it removes the request from the engine."""

    def __init__(self, engine: HFEngine, req: _Request) -> None:
        self._engine, self._req, self._done = engine, req, False

    def __aiter__(self) -> _RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._req.queue.get()
        except BaseException:  # cancelled while waiting: the client is gone
            self._close()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._engine._cancel(self._req)

    async def aclose(self) -> None:
        self._close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # the interpreter may be shutting down
            self._close()


def _generator_states(reqs: list[_Request]) -> list[tuple[torch.Generator, torch.Tensor]]:
    """The seeded requests' generator states, to rewind a step that failed."""
    return [(r.generator, r.generator.get_state()) for r in reqs if r.generator is not None]


def _restore(states: list[tuple[torch.Generator, torch.Tensor]]) -> None:
    for generator, state in states:
        generator.set_state(state)


# --------------------------------------------------------------------------------------------- the engine


class HFEngine:
    """Continuous-batching generation engine over a transformers causal LM (see the module docstring).

    `cfg` is the user's `transformers:` settings, validated by the config model. The keyword-only
    knobs are not user settings: `max_prefill_tokens` bounds the padded tokens of one prefill (the
    batch's longest prompt times its rows); `cpu_half_fallback` computes in float32 on a CPU without
    fast half-precision matmul."""

    def __init__(self, model_path: str, cfg: TransformersConfig, *, max_prefill_tokens: int = 4096,
                 cpu_half_fallback: bool = True) -> None:
        self.max_batch_size = cfg.max_batch_size
        self.max_waiting = cfg.max_batch_size if cfg.max_waiting is None else cfg.max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.model_path = str(model_path)
        self.tokenizer, self.model = load_model(self.model_path, cfg, cpu_half_fallback=cpu_half_fallback)
        self.device = self.model.get_input_embeddings().weight.device
        self.dtype = self.model.get_input_embeddings().weight.dtype
        self.vocab_size = vocab_size(self.model)
        self.max_model_len = context_window(self.model, cfg.max_model_len)
        self.eos_token_ids = eos_token_ids(self.model, self.tokenizer)
        self._num_layers = int(text_config(self.model).num_hidden_layers)
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else (min(self.eos_token_ids) if self.eos_token_ids else 0)
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters

        # adapters: guarded by _model_lock together with every forward
        self._model_lock = threading.Lock()
        self._peft = None  # PeftModel once an adapter is loaded
        self._adapters: dict[str, str] = {}

        # shared between the caller threads and the loop thread
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._n_running = 0  # rows admitted and neither finished nor cancelled
        self._cancel_pending = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)

        # owned by the loop thread
        self._rows: list[_Request] = []
        self._cache: BatchCache | None = None
        self._start: torch.Tensor | None = None  # [B] first column of each row
        self._last: torch.Tensor | None = None  # [B] last sampled token of each row
        self._batch: BatchSampling | None = None  # the rows' sampling parameters, while the rows stay
        self._sampler = Sampler(self.device)

        # counters (for metrics)
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.steps_total = 0

    # ----------------------------------------------------------------------------------------- API

    @property
    def num_running(self) -> int:
        return self._n_running

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_room(self, n: int = 1) -> bool:
        return engine_api.has_room(self.num_running, self.num_waiting, self.max_batch_size, self.max_waiting, n)

    def adapters(self) -> dict[str, str]:
        return dict(self._adapters)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Queue a request and return the stream of its tokens. Raises EngineBusy at once when the
        engine has no room (`has_room`), UnknownAdapter for an adapter that is not loaded and
        ValueError for a prompt the engine cannot run (empty, too long, token ids out of range)."""
        prompt = [int(t) for t in prompt_ids]
        self._validate(prompt, params)
        req = _Request(
            id=next(self._ids), prompt=prompt, params=params,
            max_new=min(params.max_tokens, self.max_model_len - len(prompt)),
            stop_ids=self.eos_token_ids | frozenset(params.stop_token_ids), loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(), generator=seeded_generator(params, self.device),
        )
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopping")
            if not self.has_room():
                raise EngineBusy(RETRY_AFTER_S)
            self._waiting.append(req)
            self._ensure_thread()
            self._cond.notify()
        return _RequestStream(self, req)

    def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter folder under `name` (waits for the current step to finish)."""
        from .adapters import read_adapter

        info = read_adapter(path, name)  # validates the folder and the name; AdapterError says why
        path = str(info.path)
        with self._model_lock:
            if name in self._adapters:
                if self._adapters[name] == path:
                    return
                raise ValueError(f"an adapter named {name!r} is already loaded from {self._adapters[name]}")
            if name == _BASE:
                raise ValueError(f"{_BASE!r} is reserved")
            try:
                from peft import PeftModel
            except ImportError as e:  # pragma: no cover - depends on the install
                raise RuntimeError("serving LoRA adapters needs peft: pip install 'kaito[hf]'") from e
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False)
                self._peft.eval()
            else:
                self._peft.load_adapter(path, adapter_name=name, is_trainable=False)
            self._adapters[name] = path

    def unload_adapter(self, name: str) -> None:
        """Unload an adapter; requests still using it fail with UnknownAdapter."""
        with self._model_lock:
            if name not in self._adapters:
                raise UnknownAdapter(f"adapter {name!r} is not loaded")
            del self._adapters[name]
            if not self._adapters:
                self.model = self._peft.unload()  # removes the LoRA layers, gives back the base model
                self._peft = None
            else:
                self._peft.delete_adapter(name)
        with self._cond:  # fail waiting requests for it now; running ones at the next step
            for req in [r for r in self._waiting if r.params.adapter == name]:
                self._waiting.remove(req)
                req.state = "done"
                self._post([(req, _unloaded(req))])
            self._cancel_pending = True
            self._cond.notify()

    async def start(self) -> None:
        with self._cond:
            self._stopping = False
            self._ensure_thread()

    async def stop(self) -> None:
        """Stop the loop; requests still waiting or running fail with RuntimeError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)
        with self._cond:
            self._thread = None
            self._stopping = False

    # ----------------------------------------------------------------------------------------- helpers

    def _validate(self, prompt: list[int], p: SamplingParams) -> None:
        """The checks that need the model; SamplingParams checked its own values."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; this model's context (max_model_len) is "
                f"{self.max_model_len}, which must leave room for at least one new token"
            )
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if p.logprobs is not None and p.logprobs > self.vocab_size:
            raise ValueError(f"logprobs must be at most the vocabulary's size ({self.vocab_size})")
        if p.adapter is not None and p.adapter not in self._adapters:
            raise UnknownAdapter(f"adapter {p.adapter!r} is not loaded")

    def _ensure_thread(self) -> None:  # with self._cond held
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="kaito-hf-engine", daemon=True)
            self._thread.start()

    def _cancel(self, req: _Request) -> None:
        """Called from any thread when the consumer goes away."""
        with self._cond:
            if req.state == "done" or req.cancelled:
                return
            req.cancelled = True
            if req.state == "waiting":
                try:
                    self._waiting.remove(req)
                except ValueError:
                    pass
                req.state = "done"
            elif req.state == "running":
                self._n_running -= 1
                self._cancel_pending = True
                self._cond.notify()

    @staticmethod
    def _deliver(items: list[tuple[_Request, Any]]) -> None:
        for req, ev in items:
            req.queue.put_nowait(ev)

    def _post(self, items: list[tuple[_Request, Any]]) -> None:
        """Hand events (TokenEvent or an exception) to the requests' event loops."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for req, ev in items:
            by_loop.setdefault(req.loop, []).append((req, ev))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # that event loop is closed: nobody listens any more
                for req, _ in batch:
                    req.cancelled = True

    def _finish(self, req: _Request, error: BaseException | None = None) -> list:
        """Mark a request done (loop thread); returns the error item to post, if any."""
        with self._cond:
            if req.state == "running" and not req.cancelled:
                self._n_running -= 1
            req.state = "done"
        return [(req, error)] if error is not None else []

    # ----------------------------------------------------------------------------------------- the loop

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not (self._stopping or self._waiting or self._rows or self._cancel_pending):
                            self._cond.wait()
                        if self._stopping:
                            break
                        self._cancel_pending = False
                    try:
                        self._iteration()
                    except Exception as e:  # a bug in the bookkeeping: fail everything rather than hang
                        log.exception("engine loop error")
                        self._fail_rows(e)
        finally:
            items = []
            with self._cond:
                waiting = list(self._waiting)
                self._waiting.clear()
            for req in waiting + self._rows:
                items += self._finish(req, RuntimeError("the engine stopped"))
            self._post(items)
            self._rows, self._cache, self._batch = [], None, None

    @staticmethod
    def _failure(error: BaseException) -> RuntimeError:
        """One exception object per request (they are raised in different tasks)."""
        err = RuntimeError(f"generation failed: {type(error).__name__}: {error}")
        err.__cause__ = error
        return err

    def _fail_rows(self, error: BaseException) -> None:
        items = []
        for req in self._rows:
            items += self._finish(req, self._failure(error))
        self._post(items)
        self._rows, self._cache, self._start, self._last, self._batch = [], None, None, None, None

    def _iteration(self) -> None:
        # 1. rows whose consumer went away, or whose adapter was unloaded
        self._drop([r for r in self._rows if r.cancelled or self._adapter_gone(r)])
        # 2. admit waiting requests
        if len(self._rows) < self.max_batch_size and self._waiting:
            self._prefill()
        # 3. one decode step for every running row
        if self._rows:
            self._decode()

    def _take_waiting(self) -> list[_Request]:
        taken: list[_Request] = []
        longest = 0
        with self._cond:
            while self._waiting and len(self._rows) + len(taken) < self.max_batch_size:
                req = self._waiting[0]
                n = max(longest, len(req.prompt))
                if taken and n * (len(taken) + 1) > self.max_prefill_tokens:
                    break
                self._waiting.popleft()
                longest = n
                req.state = "running"
                self._n_running += 1
                taken.append(req)
        return taken

    def _prefill(self) -> None:
        """Admit the requests taken from the queue (those of an adapter unloaded meanwhile fail)."""
        reqs = self._take_waiting()
        gone = [r for r in reqs if self._adapter_gone(r)]
        self._post([item for r in gone for item in self._finish(r, _unloaded(r))])
        reqs = [r for r in reqs if r not in gone]
        if reqs:
            self._join(reqs)

    def _join(self, reqs: list[_Request]) -> None:
        """Prefill `reqs` together, sample their first tokens and merge them into the running batch.
        When the step raises, each request is prefilled alone, so only one that fails alone gets the
        error and the others run as if nothing had happened (their seeded generators rewound)."""
        states = _generator_states(reqs)
        try:
            cache, start, sampled = self._prefill_step(reqs)
        except _AdapterGone:
            self._requeue(reqs)
            return
        except Exception as e:
            _restore(states)
            if len(reqs) > 1:
                log.warning("prefill of %d requests failed (%s: %s); prefilling each alone", len(reqs),
                            type(e).__name__, e)
                for r in reqs:
                    self._join([r])
                return
            log.exception("prefill failed")
            self._post(self._finish(reqs[0], self._failure(e)))
            return
        self.prompt_tokens_total += sum(len(r.prompt) for r in reqs)
        keep = self._emit(reqs, sampled, [])
        if not keep:
            return
        if len(keep) < len(reqs):  # some finished with their first token (max_tokens=1, EOS)
            sel = torch.tensor([i for i, r in enumerate(reqs) if r in keep], device=self.device)
            start = start.index_select(0, sel)
            first = int(start.min())  # columns no kept row needs
            cache.select(sel, first, 0)
            start = start - first
            reqs = keep
        last = torch.tensor([r.last_token for r in reqs], dtype=torch.long, device=self.device)
        if not self._rows:
            self._cache, self._start, self._last = cache, start, last
            self._rows = list(reqs)
        else:
            shift_old, shift_new = self._cache.merge(cache, CAPACITY_CHUNK)
            self._start = torch.cat([self._start + shift_old, start + shift_new])
            self._last = torch.cat([self._last, last])
            self._rows = self._rows + list(reqs)
        self._batch = None

    def _prefill_step(self, reqs: list[_Request]) -> tuple[BatchCache, torch.Tensor, Sampled]:
        """The prompts' forward (left-padded) and their first tokens; changes nothing in the engine."""
        n = max(len(r.prompt) for r in reqs)
        ids = torch.full((len(reqs), n), self._pad_id, dtype=torch.long)
        start = torch.empty(len(reqs), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, n - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
            start[i] = n - len(r.prompt)
        ids, start = ids.to(self.device), start.to(self.device)
        cols = torch.arange(n, device=self.device)
        mask = cols[None, :] >= start[:, None]
        pos = (cols[None, :] - start[:, None]).clamp_(min=0)
        cache = BatchCache(self._num_layers)
        logits = self._forward(ids, mask, pos, cache, reqs)
        return cache, start, self._sample(logits, reqs, self._sampling(reqs))

    def _requeue(self, reqs: list[_Request]) -> None:
        """An adapter was unloaded under a prefill: fail its requests, queue the others again."""
        gone = [r for r in reqs if self._adapter_gone(r)]
        self._post([item for r in gone for item in self._finish(r, _unloaded(r))])
        with self._cond:
            for r in reversed([r for r in reqs if r not in gone]):
                if r.cancelled:
                    r.state = "done"
                else:
                    r.state = "waiting"
                    self._n_running -= 1
                    self._waiting.appendleft(r)

    def _decode_step(self, rows: list[_Request], cache: BatchCache, start: torch.Tensor, last: torch.Tensor,
                     batch: BatchSampling) -> Sampled:
        """One token for each of `rows`: a forward that writes one column into `cache`, then sampling."""
        length = cache.length
        cols = torch.arange(length + 1, device=self.device)
        mask = cols[None, :] >= start[:, None]
        pos = (length - start)[:, None]
        logits = self._forward(last[:, None], mask, pos, cache, rows)
        return self._sample(logits, rows, batch)

    def _decode(self) -> None:
        rows, length = self._rows, self._cache.length
        states = _generator_states(rows)
        try:
            if self._batch is None:
                self._batch = self._sampling(rows)
            sampled = self._decode_step(rows, self._cache, self._start, self._last, self._batch)
        except _AdapterGone:
            self._drop([r for r in rows if self._adapter_gone(r)])
            return
        except Exception as e:
            self._cache.rewind(length)
            _restore(states)
            self._isolate(e)
            return
        self.steps_total += 1
        self._last = sampled.tokens
        items: list = []
        keep = self._emit(rows, sampled, items)
        if len(keep) < len(rows):
            self._drop([r for r in rows if r not in keep], already_done=True)

    def _isolate(self, error: Exception) -> None:
        """A decode step failed (and was undone): run each row's step alone, on a copy of its cache, to
        find the rows that fail it. They get the error and leave the batch; the others decode on at
        the next iteration. When every row passes alone, the batch as a whole failed: all get it."""
        rows = self._rows
        culprits: list[tuple[_Request, Exception]] = []
        if len(rows) > 1:
            log.warning("decode step of %d rows failed (%s: %s); trying each row alone", len(rows),
                        type(error).__name__, error)
            for i, r in enumerate(rows):
                states = _generator_states([r])
                first = int(self._start[i])
                try:
                    self._decode_step([r], self._cache.subset(self._start.new_tensor([i]), first, 1),
                                      self._start[i:i + 1] - first, self._last[i:i + 1], self._sampling([r]))
                except _AdapterGone:
                    pass  # dropped at the next iteration
                except Exception as e:
                    culprits.append((r, e))
                finally:
                    _restore(states)
        if not culprits:
            log.error("decode step failed", exc_info=error)
            self._fail_rows(error)
            return
        for r, e in culprits:
            log.error("decode step failed for request %d", r.id, exc_info=e)
        self._post([item for r, e in culprits for item in self._finish(r, self._failure(e))])
        self._drop([r for r, _ in culprits], already_done=True)

    def _drop(self, gone: list[_Request], already_done: bool = False) -> None:
        """Remove rows from the batch (finished, cancelled or failed)."""
        if not gone:
            return
        if not already_done:
            items = []
            for r in gone:
                err = None if r.cancelled else _unloaded(r)
                items += self._finish(r, err)
            self._post(items)
        gone_set = set(map(id, gone))
        idx = [i for i, r in enumerate(self._rows) if id(r) not in gone_set]
        self._rows = [self._rows[i] for i in idx]
        self._batch = None
        if not idx:
            self._cache, self._start, self._last = None, None, None
            return
        sel = torch.tensor(idx, device=self.device)
        start = self._start.index_select(0, sel)
        first = int(start.min())
        self._cache.select(sel, first, CAPACITY_CHUNK)
        self._start = start - first
        self._last = self._last.index_select(0, sel)

    def _adapter_gone(self, req: _Request) -> bool:
        return req.params.adapter is not None and req.params.adapter not in self._adapters

    def _forward(self, ids, mask, pos, cache, rows) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                  "past_key_values": cache, "use_cache": True}
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with self._model_lock:  # an adapter unloaded since the rows were checked: no forward
            if any(self._adapter_gone(r) for r in rows):
                raise _AdapterGone
            if self._peft is not None:
                kwargs["adapter_names"] = [r.params.adapter or _BASE for r in rows]
                out = self._peft(**kwargs)
            else:
                out = self.model(**kwargs)
        return out.logits[:, -1, :].to(self.device)  # device_map may put lm_head on another GPU

    def _sampling(self, rows: list[_Request]) -> BatchSampling:
        return BatchSampling.build([r.params for r in rows], [r.generator for r in rows], self.device)

    def _sample(self, logits: torch.Tensor, rows: list[_Request], batch: BatchSampling) -> Sampled:
        return self._sampler.sample(logits, batch, [r.counts for r in rows])

    def _emit(self, rows: list[_Request], sampled: Sampled, items: list) -> list[_Request]:
        """Turn sampled tokens into events; returns the rows that go on."""
        keep = []
        for i, (req, tok) in enumerate(zip(rows, sampled.tokens.tolist())):
            req.n_generated += 1
            req.last_token = tok
            if req.params.penalised:
                req.counts[tok] = req.counts.get(tok, 0) + 1
            finish = "stop" if tok in req.stop_ids else ("length" if req.n_generated >= req.max_new else None)
            logprob, top_lp = sampled.logprobs.get(i, (None, None))
            if not req.cancelled:
                ev = TokenEvent(token_id=tok, logprob=logprob, top_logprobs=top_lp, finish_reason=finish)
                items.append((req, ev))
            if finish is not None or req.cancelled:
                self._finish(req)
            else:
                keep.append(req)
        self.generated_tokens_total += len(rows)
        self._post(items)
        return keep
