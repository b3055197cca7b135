"""The engine's sampler: one token per row of the running batch, vectorised over the rows that need it.

* Greedy rows (temperature 0) take an argmax. A batch of greedy rows without penalties or logprobs
  costs one argmax.
* Sampled rows are scaled by their temperature and drawn by inverse CDF (one uniform number a row,
  a cumulative sum, a binary search), the number coming from the request's own `torch.Generator`
  when it has a seed (same seed + same prompt -> same text, whatever else is in the batch) or from
  the sampler's. Top-p rows look for the nucleus among their `TOP_K_FIRST` most likely tokens and
  sort the whole vocabulary only when those hold less than top_p.
* Presence/frequency penalties follow OpenAI: `logit[t] -= presence * (count[t] > 0) + frequency *
  count[t]` over the tokens generated so far, applied sparsely to the tokens seen.
* Logprobs are those of the model's raw distribution (log_softmax of the logits before penalties,
  temperature and top-p, as vLLM reports them by default); the top-k alternatives are sorted, most
  likely first.

`BatchSampling` holds what sampling needs of the rows as index tensors; the engine builds it once
per batch composition (rows admitted or dropped) and reuses it every step until then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .engine_api import SamplingParams

TOP_K_FIRST = 256  # top-p looks for the nucleus among this many most likely tokens before sorting all


def seeded_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """The request's own random generator when it samples with a seed; None otherwise."""
    if params.seed is None or params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(params.seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


def _index(rows: list[int], device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _column(values: list[float], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


@dataclass(frozen=True)
class BatchSampling:
    """What sampling needs of a batch's rows. Row numbers index the batch; `full`, `top_p_rows` and
    `seeded` index the sampled rows (`sampled`)."""

    simple: bool  # every row greedy, no penalties, no logprobs: one argmax
    greedy: torch.Tensor  # rows that take the argmax
    sampled: torch.Tensor  # rows drawn from their distribution
    temperatures: torch.Tensor  # [len(sampled), 1]
    full: torch.Tensor  # sampled rows that draw from the whole vocabulary
    top_p_rows: torch.Tensor  # sampled rows that draw from their nucleus
    top_p: torch.Tensor  # [len(top_p_rows), 1]
    seeded: tuple[tuple[int, torch.Generator], ...]  # sampled rows with their own generator
    penalties: tuple[tuple[int, float, float], ...]  # (row, presence, frequency) of the penalised rows
    logprob_rows: tuple[int, ...]  # rows that report logprobs
    logprob_index: torch.Tensor  # the same rows as an index
    logprob_k: tuple[int, ...]  # how many top alternatives each of those rows reports

    @classmethod
    def build(cls, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
              device: torch.device | str) -> BatchSampling:
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        sp = [params[i] for i in sampled]
        top_p = [j for j, p in enumerate(sp) if p.top_p < 1]
        penalties = tuple((i, p.presence_penalty, p.frequency_penalty) for i, p in enumerate(params) if p.penalised)
        logprob_rows = tuple(i for i, p in enumerate(params) if p.logprobs is not None)
        return cls(
            simple=not sampled and not penalties and not logprob_rows,
            greedy=_index(greedy, device),
            sampled=_index(sampled, device),
            temperatures=_column([p.temperature for p in sp], device),
            full=_index([j for j, p in enumerate(sp) if p.top_p >= 1], device),
            top_p_rows=_index(top_p, device),
            top_p=_column([sp[j].top_p for j in top_p], device),
            seeded=tuple((j, generators[i]) for j, i in enumerate(sampled) if generators[i] is not None),
            penalties=penalties,
            logprob_rows=logprob_rows,
            logprob_index=_index(list(logprob_rows), device),
            logprob_k=tuple(params[i].logprobs for i in logprob_rows),
        )


@dataclass(frozen=True)
class Sampled:
    tokens: torch.Tensor  # [rows] on the logits' device
    logprobs: dict[int, tuple[float, list[tuple[int, float]]]]  # row -> (chosen token's logprob, top-k)


class Sampler:
    """Samples one token per row. Rows without a seed draw from the sampler's own generator."""

    top_k_first = TOP_K_FIRST

    def __init__(self, device: torch.device | str, seed: int | None = None) -> None:
        self.rng = torch.Generator(device=device)
        if seed is None:
            self.rng.seed()
        else:
            self.rng.manual_seed(seed)

    def sample(self, logits: torch.Tensor, batch: BatchSampling, counts: Sequence[Mapping[int, int]]) -> Sampled:
        """One token per row of `logits` [rows, vocab]; `counts[row]` holds the tokens the row has
        generated so far (token -> count), read for penalised rows. `logits` is not modified."""
        if batch.simple:
            return Sampled(logits.argmax(-1), {})
        logits = logits.to(torch.float32, copy=bool(batch.penalties))
        raw = None
        if batch.logprob_rows:  # the raw distribution: before penalties, temperature and top-p
            raw = torch.log_softmax(logits.index_select(0, batch.logprob_index), dim=-1)
        for i, presence, frequency in batch.penalties:
            if counts[i]:
                ids = torch.tensor(list(counts[i].keys()), dtype=torch.long, device=logits.device)
                cnt = torch.tensor(list(counts[i].values()), dtype=torch.float32, device=logits.device)
                logits[i].index_add_(0, ids, -(frequency * cnt + presence))
        if not len(batch.sampled):
            tokens = logits.argmax(-1)
        else:
            tokens = torch.empty(len(logits), dtype=torch.long, device=logits.device)
            if len(batch.greedy):
                tokens[batch.greedy] = logits.index_select(0, batch.greedy).argmax(-1)
            probs = (logits.index_select(0, batch.sampled) / batch.temperatures).softmax(-1)
            tokens[batch.sampled] = self.draw(probs, batch)
        return Sampled(tokens, self._logprobs(raw, tokens, batch) if raw is not None else {})

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, batch: BatchSampling) -> dict:
        rows = batch.logprob_rows
        chosen = raw.gather(1, tokens.index_select(0, batch.logprob_index)[:, None])[:, 0].tolist()
        k = max(batch.logprob_k)
        top_ids = top_vals = [[]] * len(rows)
        if k:
            top = raw.topk(k, dim=-1)
            top_vals, top_ids = top.values.tolist(), top.indices.tolist()
        return {row: (chosen[j], list(zip(top_ids[j][:kj], top_vals[j][:kj])))
                for j, (row, kj) in enumerate(zip(rows, batch.logprob_k))}

    def draw(self, probs: torch.Tensor, batch: BatchSampling) -> torch.Tensor:
        """Draw one token per row of `probs` (the sampled rows) by inverse CDF: one uniform number per
        row (from the request's own generator when it has a seed), a cumulative sum and a binary
        search; top-p rows look for their nucleus among the top `top_k_first` tokens and sort the
        whole row only when those hold less than top_p."""
        n, vocab = probs.shape
        u = torch.rand(n, generator=self.rng, device=probs.device)
        for j, gen in batch.seeded:
            u[j] = torch.rand((), generator=gen, device=probs.device)
        out = torch.empty(n, dtype=torch.long, device=probs.device)
        full = batch.full
        if len(full):
            cum = probs.index_select(0, full).cumsum(-1)
            pick = torch.searchsorted(cum, (u.index_select(0, full) * cum[:, -1])[:, None], right=True)
            out[full] = pick[:, 0].clamp_(max=vocab - 1)
        tp_rows = batch.top_p_rows
        if len(tp_rows):
            sub, top_p, u_tp = probs.index_select(0, tp_rows), batch.top_p, u.index_select(0, tp_rows)
            vals, idx = sub.topk(min(self.top_k_first, vocab), dim=-1)
            cum = vals.cumsum(-1)
            short = (cum[:, -1:] < top_p)[:, 0]
            if bool(short.any()):  # the nucleus is wider than the top-k: sort those rows entirely
                rows = short.nonzero()[:, 0]
                v_all, i_all = sub.index_select(0, rows).sort(dim=-1, descending=True)
                picked = _nucleus(v_all, i_all, v_all.cumsum(-1), top_p.index_select(0, rows),
                                  u_tp.index_select(0, rows))
                keep = (~short).nonzero()[:, 0]
                res = torch.empty(len(tp_rows), dtype=torch.long, device=probs.device)
                res[rows] = picked
                if len(keep):
                    res[keep] = _nucleus(vals.index_select(0, keep), idx.index_select(0, keep),
                                         cum.index_select(0, keep), top_p.index_select(0, keep),
                                         u_tp.index_select(0, keep))
                out[tp_rows] = res
            else:
                out[tp_rows] = _nucleus(vals, idx, cum, top_p, u_tp)
        return out


def _nucleus(vals, idx, cum, top_p, u) -> torch.Tensor:
    """Sample within the smallest prefix of the sorted probabilities `vals` whose mass reaches top_p
    (the most likely token always stays)."""
    count = ((cum - vals) < top_p).sum(-1, keepdim=True).clamp_(min=1)
    mass = cum.gather(1, count - 1)
    pick = torch.searchsorted(cum, u[:, None] * mass, right=True)
    pick = torch.minimum(pick, count - 1)
    return idx.gather(1, pick)[:, 0]
