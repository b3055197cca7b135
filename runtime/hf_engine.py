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
* The KV cache is a `transformers.Cache` of `_KVLayer`s: per layer one `[batch, kv_heads, capacity,
  head_dim]` buffer shared by all rows, column-aligned with left padding (row r's tokens occupy
  columns start[r]..length-1). A decode step writes one column in place (no `torch.cat` copy of the
  whole cache per step, unlike `DynamicCache`); capacity grows in chunks. Admitting requests pads
  the shorter side on the left and stacks the rows; dropping rows keeps the remaining ones and cuts
  the leading columns no row needs any more. The 2-D attention mask and the position ids follow from
  start[] and the length, so the model sees exactly what a padded `generate` batch would see.
* Sampling is per row, vectorised over the rows that need it: greedy rows (temperature 0) take an
  argmax; sampled rows are scaled by their temperature and drawn by inverse CDF (one uniform number
  a row, a cumulative sum, a binary search), the number coming from the request's own
  `torch.Generator` when it has a seed (same seed + same prompt -> same text, whatever else is in
  the batch) or from the engine's. Top-p rows look for the nucleus among their 256 most likely
  tokens and sort the whole vocabulary only when those hold less than top_p. Presence/frequency
  penalties follow OpenAI: `logit[t] -= presence * (count[t] > 0) + frequency * count[t]` over the
  tokens generated so far, applied sparsely to the tokens seen. Logprobs are those of the model's raw distribution
  (log_softmax of the logits before penalties, temperature and top-p, as vLLM reports them by
  default); the top-k alternatives are sorted, most likely first. A batch of greedy rows without
  penalties or logprobs costs one argmax.
* LoRA adapters are PEFT adapters injected into the model (`PeftModel`); a batch that holds rows
  of several adapters (or the base model) runs as one forward with peft's `adapter_names=[...]`
  per row. The first `load_adapter` wraps the model, unloading the last one unwraps it.
* Events go to the asyncio side through `loop.call_soon_threadsafe` (one callback per event loop
  per step) into a per-request `asyncio.Queue`; the event loop never waits on the model.
* On a CPU without native half-precision matmul (AVX2-only x86: no AVX-512 / AMX / ARM bf16) the
  model is computed in float32 even when bf16 is asked for (`cpu_half_fallback=True`): there torch
  runs bf16 GEMMs in a generic kernel at a flat ~8 GFLOP/s, so 16 rows cost 16 times one row and
  batching gains nothing, while float32 goes through MKL (a 576x1536 linear layer: 20 GFLOP/s for 1
  row, 60 GFLOP/s for 16). On such a CPU float32 is faster even for a single request.
* On the CPU, grouped-query attention with a padding mask runs through torch's SDPA with
  `enable_gqa=True` (attention function "kaito_sdpa"); transformers' own SDPA path repeats the KV
  heads whenever there is a mask, a copy of the whole cache per layer per step (5x slower attention
  for 16 rows x 200 columns).

Measured with benchmarks/engine_batching.py on the same machine (shared with other jobs, load
average about 3; best of 3 interleaved rounds; 64 new tokens, greedy; every request generated all
64 tokens), tokens/s and ratio to one-request-at-a-time `model.generate`:

    torch threads            generate fp32   generate bf16   engine 1    engine 8     engine 16
    2 (torch's default)      14.6            10.4            15.2 1.0x   45.3 3.1x    60.6 4.2x (5.8x bf16)
    1                        15.4            14.7            16.3 1.1x   58.5 3.8x    82.9 5.4x (5.6x bf16)

Almost all of the time is the model's forward (the loop's own work -- masks, sampling, events,
cache merges -- is about 1%); at 16 concurrent, prefilling the prompts is about a fifth of the run
(no prefix caching: every chat prompt recomputes the same system prompt).

Not supported: models whose cache is not a plain attention KV cache (Mamba / linear-attention
hybrids), encoder-decoder models, beam search. Sliding-window layers keep their full history
(correct, not memory-saving).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .engine_api import EngineBusy, SamplingParams, TokenEvent, UnknownAdapter

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
_BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
_CAPACITY_CHUNK = 128  # KV columns added when a cache buffer grows


# --------------------------------------------------------------------------------------------- KV cache


def _cache_classes():
    from transformers.cache_utils import Cache, DynamicLayer

    class _KVLayer(DynamicLayer):
        """One attention layer's keys and values for the whole batch: preallocated buffers
        `[batch, heads, capacity, head_dim]`, the first `length` columns in use. `keys`/`values` are
        views of the used part, so code that reads them (masks, seq length) sees a normal layer."""

        def __init__(self) -> None:
            super().__init__()
            self.k_buf: torch.Tensor | None = None
            self.v_buf: torch.Tensor | None = None
            self.length = 0

        def lazy_initialization(self, key_states, value_states) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def _set(self, k_buf: torch.Tensor, v_buf: torch.Tensor, length: int) -> None:
            self.k_buf, self.v_buf, self.length = k_buf, v_buf, length
            self.keys, self.values = k_buf[:, :, :length], v_buf[:, :, :length]
            self.dtype, self.device, self.is_initialized = k_buf.dtype, k_buf.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            q = key_states.shape[-2]
            end = self.length + q
            if self.k_buf is None or end > self.k_buf.shape[2]:
                b, h, _, d = key_states.shape
                cap = end + (_CAPACITY_CHUNK if self.k_buf is not None else 0)
                k_buf = key_states.new_zeros((b, h, cap, d))
                v_buf = value_states.new_zeros((b, h, cap, value_states.shape[-1]))
                if self.k_buf is not None and self.length:
                    k_buf[:, :, : self.length] = self.k_buf[:, :, : self.length]
                    v_buf[:, :, : self.length] = self.v_buf[:, :, : self.length]
                self.k_buf, self.v_buf = k_buf, v_buf
            self.k_buf[:, :, self.length : end] = key_states
            self.v_buf[:, :, self.length : end] = value_states
            self._set(self.k_buf, self.v_buf, end)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.length + query_length, 0

        def reset(self) -> None:
            self.k_buf = self.v_buf = self.keys = self.values = None
            self.length = 0
            self.is_initialized = False

        def crop(self, tokens_to_remove: int) -> None:  # not used by the engine
            raise NotImplementedError

        def batch_select_indices(self, indices: torch.Tensor) -> None:  # not used by the engine
            raise NotImplementedError

    class _BatchCache(Cache):
        def __init__(self, num_layers: int) -> None:
            super().__init__(layers=[_KVLayer() for _ in range(num_layers)])

        @property
        def length(self) -> int:
            return self.layers[0].length

        def select(self, rows: torch.Tensor | None, first_col: int, headroom: int) -> None:
            """Keep `rows` (all when None) and the columns from `first_col` on, in fresh buffers with
            `headroom` free columns."""
            for layer in self.layers:
                n = layer.length - first_col
                k, v = layer.k_buf[:, :, first_col : layer.length], layer.v_buf[:, :, first_col : layer.length]
                if rows is not None:
                    idx = rows.to(k.device)  # layers can sit on different GPUs (device_map="auto")
                    k, v = k.index_select(0, idx), v.index_select(0, idx)
                kb = k.new_zeros((k.shape[0], k.shape[1], n + headroom, k.shape[3]))
                vb = v.new_zeros((v.shape[0], v.shape[1], n + headroom, v.shape[3]))
                kb[:, :, :n], vb[:, :, :n] = k, v
                layer._set(kb, vb, n)

        def merge(self, other: _BatchCache, headroom: int) -> tuple[int, int]:
            """Append `other`'s rows after ours, right-aligned on the columns. Returns the column
            shifts (ours, theirs) that the rows' start columns must be moved by."""
            la, lb = self.length, other.length
            n = max(la, lb)
            for mine, theirs in zip(self.layers, other.layers):
                ba, bb = mine.k_buf.shape[0], theirs.k_buf.shape[0]
                h, d = mine.k_buf.shape[1], mine.k_buf.shape[3]
                kb = mine.k_buf.new_zeros((ba + bb, h, n + headroom, d))
                vb = mine.v_buf.new_zeros((ba + bb, h, n + headroom, mine.v_buf.shape[3]))
                kb[:ba, :, n - la : n], vb[:ba, :, n - la : n] = mine.keys, mine.values
                kb[ba:, :, n - lb : n], vb[ba:, :, n - lb : n] = theirs.keys, theirs.values
                mine._set(kb, vb, n)
            return n - la, n - lb

    return _BatchCache


# --------------------------------------------------------------------------------------------- attention

_ATTN = "kaito_sdpa"


def _register_gqa_sdpa() -> None:
    """transformers' SDPA path repeats the KV heads of grouped-query attention (a copy of the whole
    cache, every layer, every step) whenever there is an attention mask, i.e. whenever a batch has
    padding. On the CPU torch's SDPA takes the mask together with `enable_gqa=True` (5x faster for
    16 rows x 200 columns), so this variant does that and defers to transformers otherwise."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        if (
            getattr(module, "num_key_value_groups", 1) > 1
            and isinstance(attention_mask, torch.Tensor)
            and attention_mask.dtype == torch.bool
            and kwargs.get("position_bias") is None
            and key.shape[-1] == value.shape[-1]
            and query.device.type == "cpu"
            and not module.training
        ):
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True
            )
            return out.transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)

    AttentionInterface.register(_ATTN, gqa_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTN, sdpa_mask)


# --------------------------------------------------------------------------------------------- requests


class _AdapterGone(Exception):
    """A row's adapter was unloaded between the check and the forward."""


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

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.params.presence_penalty != 0 or self.params.frequency_penalty != 0


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


# --------------------------------------------------------------------------------------------- the engine


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_has_fast(dtype: Any) -> bool:
    """Whether torch's CPU matmul runs `dtype` ("auto" = the checkpoint's half dtype) through oneDNN's
    native or AVX-512 kernels (torch's mkldnn_bf16/fp16 device checks). Unknown CPU: assume yes."""
    flags = _cpu_flags()
    if not flags:
        return True
    if dtype == torch.float16:
        return bool(flags & {"avx512_fp16", "amx_fp16"}) or {"fphp", "asimdhp"} <= flags
    return ({"avx512bw", "avx512vl", "avx512dq"} <= flags or bool(flags & {"avx512_bf16", "amx_bf16"})
            or "bf16" in flags)


class HFEngine:
    """Continuous-batching generation engine over a transformers causal LM (see the module docstring)."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "bfloat16",
        device: str = "auto",
        max_batch_size: int = 16,
        max_waiting: int | None = None,
        max_model_len: int | None = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        max_prefill_tokens: int = 4096,
        cpu_half_fallback: bool = True,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.max_batch_size = max_batch_size
        self.max_waiting = max_batch_size if max_waiting is None else max_waiting
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        self.max_prefill_tokens = max_prefill_tokens

        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch sees no CUDA GPU")
        if load_in_4bit and load_in_8bit:
            raise ValueError("choose one of load_in_4bit and load_in_8bit")
        if (load_in_4bit or load_in_8bit) and device == "cpu":
            raise ValueError(
                f"load_in_{'4' if load_in_4bit else '8'}bit needs a CUDA GPU (bitsandbytes quantisation); "
                "this engine runs on the CPU: load the model unquantised (dtype bfloat16 or float32)"
            )
        if dtype == "auto":
            torch_dtype: Any = "auto"
        elif dtype in _DTYPES:
            torch_dtype = _DTYPES[dtype]
        else:
            raise ValueError(f"dtype must be one of auto, {', '.join(sorted(_DTYPES))}; not {dtype!r}")

        if (cpu_half_fallback and device == "cpu" and torch_dtype in (torch.bfloat16, torch.float16, "auto")
                and not _cpu_has_fast(torch_dtype)):
            # Without native half-precision matmul (AVX2-only x86) torch runs bf16 GEMMs in a generic
            # kernel at a flat ~8 GFLOP/s: a 16-row batch costs 16x one row, so batching gains nothing.
            # float32 goes through MKL (20 -> 60 GFLOP/s from 1 to 16 rows on the dev machine).
            log.warning("this CPU has no fast %s matmul: computing in float32", dtype)
            torch_dtype = torch.float32
        if device.startswith("cuda") and torch_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            log.warning("this GPU has no bfloat16 support: computing in float16")
            torch_dtype = torch.float16
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if device.startswith("cuda"):
            kwargs["device_map"] = "auto" if device == "cuda" else {"": device}
        if load_in_4bit or load_in_8bit:
            from transformers import BitsAndBytesConfig

            compute = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.bfloat16
            kwargs["quantization_config"] = (
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                                   bnb_4bit_use_double_quant=True)
                if load_in_4bit else BitsAndBytesConfig(load_in_8bit=True)
            )
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, **kwargs)
        self.model.eval()
        self.model.requires_grad_(False)
        if self.model.config._attn_implementation == "sdpa" and device == "cpu":
            try:
                _register_gqa_sdpa()
                self.model.set_attn_implementation(_ATTN)
            except Exception as e:  # noqa: BLE001 - a model that does not take custom attention functions
                log.info("keeping transformers' sdpa attention: %s", e)
        self.device = self.model.get_input_embeddings().weight.device
        self.dtype = self.model.get_input_embeddings().weight.dtype

        cfg = self.model.config.get_text_config(decoder=True) if hasattr(self.model.config, "get_text_config") \
            else self.model.config
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0]) \
            if self.model.get_output_embeddings() is not None else int(cfg.vocab_size)
        self._num_layers = int(cfg.num_hidden_layers)
        limit = int(getattr(cfg, "max_position_embeddings", None) or 2048)
        if max_model_len is None:
            self.max_model_len = limit
        else:
            if max_model_len < 2:
                raise ValueError("max_model_len must be at least 2")
            if max_model_len > limit:
                log.warning("max_model_len %d is beyond the model's %d positions: using %d", max_model_len, limit,
                            limit)
            self.max_model_len = min(int(max_model_len), limit)

        eos: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            val = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(val, int):
                eos.add(val)
            elif isinstance(val, (list, tuple)):
                eos.update(int(v) for v in val)
        self.eos_token_ids: frozenset[int] = frozenset(t for t in eos if t >= 0)
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else (min(self.eos_token_ids) if self.eos_token_ids else 0)

        import inspect

        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._BatchCache = _cache_classes()

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
        self._cache = None
        self._start: torch.Tensor | None = None  # [B] first column of each row
        self._last: torch.Tensor | None = None  # [B] last sampled token of each row
        self._meta: dict[str, Any] | None = None  # per-batch-composition tensors for sampling
        self._rng = torch.Generator(device=self.device)
        self._rng.seed()

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

    def adapters(self) -> dict[str, str]:
        return dict(self._adapters)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Queue a request and return the stream of its tokens. Raises EngineBusy at once when the
        running batch and `max_waiting` queued requests are full, UnknownAdapter for an adapter that is not loaded and
        ValueError for a request the engine cannot run (empty or too long prompt, bad parameter)."""
        prompt = [int(t) for t in prompt_ids]
        self._validate(prompt, params)
        loop = asyncio.get_running_loop()
        max_new = min(params.max_tokens, self.max_model_len - len(prompt))
        gen = None
        if params.seed is not None and params.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(params.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        req = _Request(
            id=next(self._ids), prompt=prompt, params=params, max_new=max_new,
            stop_ids=self.eos_token_ids | frozenset(params.stop_token_ids), loop=loop, queue=asyncio.Queue(),
            generator=gen,
        )
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopping")
            # the running batch plus the waiting room is the capacity (the server's 429 check is the same)
            if self._n_running + len(self._waiting) >= self.max_batch_size + self.max_waiting:
                raise EngineBusy(self._retry_after())
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
                self._post([(req, UnknownAdapter(f"adapter {name!r} was unloaded"))])
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
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; this model's context (max_model_len) is "
                f"{self.max_model_len}, which must leave room for at least one new token"
            )
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if p.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not (p.temperature >= 0 and math.isfinite(p.temperature)):
            raise ValueError("temperature must be >= 0")
        if not (0 < p.top_p <= 1):
            raise ValueError("top_p must be in (0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(p, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2]")
        if p.logprobs is not None and not 0 <= p.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        if p.adapter is not None and p.adapter not in self._adapters:
            raise UnknownAdapter(f"adapter {p.adapter!r} is not loaded")

    def _retry_after(self) -> float:
        return 1.0

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
            self._rows, self._cache, self._meta = [], None, None

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
        self._rows, self._cache, self._start, self._last, self._meta = [], None, None, None, None

    def _iteration(self) -> None:
        # 1. rows whose consumer went away, or whose adapter was unloaded
        self._drop([r for r in self._rows
                    if r.cancelled or (r.params.adapter is not None and r.params.adapter not in self._adapters)])
        # 2. admit waiting requests
        if len(self._rows) < self.max_batch_size and self._waiting:
            self._admit()
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

    def _admit(self) -> None:
        reqs = self._take_waiting()
        bad = [r for r in reqs if r.params.adapter and r.params.adapter not in self._adapters]
        items = []
        for r in bad:
            items += self._finish(r, UnknownAdapter(f"adapter {r.params.adapter!r} was unloaded"))
        reqs = [r for r in reqs if r not in bad]
        if not reqs:
            self._post(items)
            return
        try:
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
            cache = self._BatchCache(self._num_layers)
            logits = self._forward(ids, mask, pos, cache, reqs)
            tokens, lps = self._sample(logits, reqs, self._make_meta(reqs))
        except _AdapterGone:  # fail the requests of the unloaded adapter, queue the others again
            gone = [r for r in reqs if r.params.adapter is not None and r.params.adapter not in self._adapters]
            for r in gone:
                items += self._finish(r, UnknownAdapter(f"adapter {r.params.adapter!r} was unloaded"))
            self._post(items)
            with self._cond:
                for r in reversed([r for r in reqs if r not in gone]):
                    if r.cancelled:
                        r.state = "done"
                    else:
                        r.state = "waiting"
                        self._n_running -= 1
                        self._waiting.appendleft(r)
            return
        except Exception as e:
            log.exception("prefill failed")
            for r in reqs:
                items += self._finish(r, self._failure(e))
            self._post(items)
            return
        self.prompt_tokens_total += sum(len(r.prompt) for r in reqs)
        keep = self._emit(reqs, tokens, lps, items)
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
            shift_old, shift_new = self._cache.merge(cache, _CAPACITY_CHUNK)
            self._start = torch.cat([self._start + shift_old, start + shift_new])
            self._last = torch.cat([self._last, last])
            self._rows = self._rows + list(reqs)
        self._meta = None

    def _decode(self) -> None:
        rows = self._rows
        try:
            length = self._cache.length
            cols = torch.arange(length + 1, device=self.device)
            mask = cols[None, :] >= self._start[:, None]
            pos = (length - self._start)[:, None]
            if self._meta is None:
                self._meta = self._make_meta(rows)
            logits = self._forward(self._last[:, None], mask, pos, self._cache, rows)
            tokens, lps = self._sample(logits, rows, self._meta)
        except _AdapterGone:
            self._drop([r for r in rows if r.params.adapter is not None and r.params.adapter not in self._adapters])
            return
        except Exception as e:
            log.exception("decode step failed")
            self._fail_rows(e)
            return
        self.steps_total += 1
        self._last = tokens
        items: list = []
        keep = self._emit(rows, tokens, lps, items)
        if len(keep) < len(rows):
            self._drop([r for r in rows if r not in keep], already_done=True)

    def _drop(self, gone: list[_Request], already_done: bool = False) -> None:
        """Remove rows from the batch (finished, cancelled or failed)."""
        if not gone:
            return
        if not already_done:
            items = []
            for r in gone:
                err = None if r.cancelled else UnknownAdapter(f"adapter {r.params.adapter!r} was unloaded")
                items += self._finish(r, err)
            self._post(items)
        gone_set = set(map(id, gone))
        idx = [i for i, r in enumerate(self._rows) if id(r) not in gone_set]
        self._rows = [self._rows[i] for i in idx]
        self._meta = None
        if not idx:
            self._cache, self._start, self._last = None, None, None
            return
        sel = torch.tensor(idx, device=self.device)
        start = self._start.index_select(0, sel)
        first = int(start.min())
        self._cache.select(sel, first, _CAPACITY_CHUNK)
        self._start = start - first
        self._last = self._last.index_select(0, sel)

    def _forward(self, ids, mask, pos, cache, rows) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                  "past_key_values": cache, "use_cache": True}
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with self._model_lock:  # an adapter unloaded since the rows were checked: no forward
            if any(r.params.adapter is not None and r.params.adapter not in self._adapters for r in rows):
                raise _AdapterGone
            if self._peft is not None:
                kwargs["adapter_names"] = [r.params.adapter or _BASE for r in rows]
                out = self._peft(**kwargs)
            else:
                out = self.model(**kwargs)
        return out.logits[:, -1, :].to(self.device)  # device_map may put lm_head on another GPU

    # ----------------------------------------------------------------------------------------- sampling

    def _make_meta(self, rows: list[_Request]) -> dict[str, Any]:
        """Index tensors and per-row parameters that stay the same while the batch does not change."""
        dev = self.device
        greedy = [i for i, r in enumerate(rows) if r.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.greedy]
        meta: dict[str, Any] = {
            "all_greedy": len(greedy) == len(rows),
            "simple": len(greedy) == len(rows) and not any(r.penalised or r.params.logprobs is not None for r in rows),
            "greedy": torch.tensor(greedy, dtype=torch.long, device=dev),
            "sampled": torch.tensor(sampled, dtype=torch.long, device=dev),
            "penalised": [i for i, r in enumerate(rows) if r.penalised],
            "lp_rows": [i for i, r in enumerate(rows) if r.params.logprobs is not None],
        }
        if sampled:
            srows = [rows[i] for i in sampled]
            temps = [r.params.temperature for r in srows]
            meta["temps"] = torch.tensor(temps, dtype=torch.float32, device=dev)[:, None]
            top_p = [j for j, r in enumerate(srows) if r.params.top_p < 1]
            full = [j for j, r in enumerate(srows) if r.params.top_p >= 1]
            meta["top_p_rows"] = torch.tensor(top_p, dtype=torch.long, device=dev)
            top_ps = [srows[j].params.top_p for j in top_p]
            meta["top_p"] = torch.tensor(top_ps, dtype=torch.float32, device=dev)[:, None]
            meta["full_rows"] = torch.tensor(full, dtype=torch.long, device=dev)
            meta["seeded"] = [(j, r.generator) for j, r in enumerate(srows) if r.generator is not None]
        if meta["lp_rows"]:
            meta["lp_idx"] = torch.tensor(meta["lp_rows"], dtype=torch.long, device=dev)
            meta["lp_k"] = max(rows[i].params.logprobs for i in meta["lp_rows"])
        return meta

    def _sample(self, logits: torch.Tensor, rows: list[_Request], meta: dict[str, Any]):
        """One token per row. Returns (tokens [B] on the device, logprob info or None)."""
        if meta["simple"]:
            return logits.argmax(-1), None
        logits = logits.float()
        lps = None
        if meta["lp_rows"]:  # raw distribution: before penalties, temperature and top-p
            lp = torch.log_softmax(logits.index_select(0, meta["lp_idx"]), dim=-1)
            k = meta["lp_k"]
            top = lp.topk(k, dim=-1) if k else None
            lps = (lp, top)
        for i in meta["penalised"]:
            r = rows[i]
            if r.counts:
                ids = torch.tensor(list(r.counts.keys()), dtype=torch.long, device=logits.device)
                cnt = torch.tensor(list(r.counts.values()), dtype=torch.float32, device=logits.device)
                logits[i].index_add_(0, ids, -(r.params.frequency_penalty * cnt + r.params.presence_penalty))
        if meta["all_greedy"]:
            tokens = logits.argmax(-1)
        else:
            tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
            if len(meta["greedy"]):
                tokens[meta["greedy"]] = logits.index_select(0, meta["greedy"]).argmax(-1)
            probs = (logits.index_select(0, meta["sampled"]) / meta["temps"]).softmax(-1)
            tokens[meta["sampled"]] = self._draw(probs, meta)
        return tokens, lps

    _TOP_K_FIRST = 256  # top-p looks for the nucleus among this many most likely tokens before sorting all

    def _draw(self, probs: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
        """Draw one token per row of `probs` by inverse CDF: one uniform number per row (from the
        request's own generator when it has a seed), a cumulative sum and a binary search; top-p rows
        look for their nucleus among the top `_TOP_K_FIRST` tokens and sort the whole row only when
        those hold less than top_p."""
        n, vocab = probs.shape
        u = torch.rand(n, generator=self._rng, device=probs.device)
        for j, gen in meta["seeded"]:
            u[j] = torch.rand((), generator=gen, device=probs.device)
        out = torch.empty(n, dtype=torch.long, device=probs.device)
        full = meta["full_rows"]
        if len(full):
            cum = probs.index_select(0, full).cumsum(-1)
            pick = torch.searchsorted(cum, (u.index_select(0, full) * cum[:, -1])[:, None], right=True)
            out[full] = pick[:, 0].clamp_(max=vocab - 1)
        tp_rows = meta["top_p_rows"]
        if len(tp_rows):
            sub, top_p, u_tp = probs.index_select(0, tp_rows), meta["top_p"], u.index_select(0, tp_rows)
            vals, idx = sub.topk(min(self._TOP_K_FIRST, vocab), dim=-1)
            cum = vals.cumsum(-1)
            short = (cum[:, -1:] < top_p)[:, 0]
            if bool(short.any()):  # the nucleus is wider than the top-k: sort those rows entirely
                rows = short.nonzero()[:, 0]
                v_all, i_all = sub.index_select(0, rows).sort(dim=-1, descending=True)
                picked = self._nucleus(v_all, i_all, v_all.cumsum(-1), top_p.index_select(0, rows),
                                       u_tp.index_select(0, rows))
                keep = (~short).nonzero()[:, 0]
                res = torch.empty(len(tp_rows), dtype=torch.long, device=probs.device)
                res[rows] = picked
                if len(keep):
                    res[keep] = self._nucleus(vals.index_select(0, keep), idx.index_select(0, keep),
                                              cum.index_select(0, keep), top_p.index_select(0, keep),
                                              u_tp.index_select(0, keep))
                out[tp_rows] = res
            else:
                out[tp_rows] = self._nucleus(vals, idx, cum, top_p, u_tp)
        return out

    @staticmethod
    def _nucleus(vals, idx, cum, top_p, u) -> torch.Tensor:
        """Sample within the smallest prefix of the sorted probabilities `vals` whose mass reaches
        top_p (the most likely token always stays)."""
        count = ((cum - vals) < top_p).sum(-1, keepdim=True).clamp_(min=1)
        mass = cum.gather(1, count - 1)
        pick = torch.searchsorted(cum, u[:, None] * mass, right=True)
        pick = torch.minimum(pick, count - 1)
        return idx.gather(1, pick)[:, 0]

    def _emit(self, rows: list[_Request], tokens: torch.Tensor, lps, items: list) -> list[_Request]:
        """Turn sampled tokens into events; returns the rows that go on."""
        toks = tokens.tolist()
        lp_rows: dict[int, int] = {}
        chosen_lp = top_vals = top_ids = None
        if lps is not None:
            lp, top = lps
            lp_rows = {i: j for j, i in enumerate(r for r, req in enumerate(rows) if req.params.logprobs is not None)}
            idx = torch.tensor([toks[i] for i in lp_rows], dtype=torch.long, device=lp.device)
            chosen_lp = lp.gather(1, idx[:, None])[:, 0].tolist()
            if top is not None:
                top_vals, top_ids = top.values.tolist(), top.indices.tolist()
        keep = []
        for i, (req, tok) in enumerate(zip(rows, toks)):
            req.n_generated += 1
            req.last_token = tok
            if req.penalised:
                req.counts[tok] = req.counts.get(tok, 0) + 1
            finish = "stop" if tok in req.stop_ids else ("length" if req.n_generated >= req.max_new else None)
            logprob = top_lp = None
            if i in lp_rows:
                j = lp_rows[i]
                logprob = chosen_lp[j]
                k = req.params.logprobs
                top_lp = list(zip(top_ids[j][:k], top_vals[j][:k])) if k else []
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
