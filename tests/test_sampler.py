"""The engine's sampler (runtime/sampler.py) on random logits: no model needed."""

from __future__ import annotations

import math

import pytest
import torch
from kaito.runtime.engine_api import SamplingParams
from kaito.runtime.sampler import BatchSampling, Sampler, seeded_generator

VOCAB = 64


def batch(*params: SamplingParams) -> BatchSampling:
    return BatchSampling.build(params, [seeded_generator(p, "cpu") for p in params], "cpu")


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def frequencies(params: SamplingParams, probs: list[float], n: int = 40000, **sampler) -> torch.Tensor:
    """How often each token is drawn when `n` rows with `params` sample from `probs`."""
    p = torch.tensor(probs)
    s = Sampler("cpu", seed=1)
    for k, v in sampler.items():
        setattr(s, k, v)
    tokens = s.sample(p.log().repeat(n, 1), batch(*[params] * n), [{}] * n).tokens
    return torch.bincount(tokens, minlength=len(probs)).float() / n


def test_greedy_rows_take_the_argmax():
    x = logits(5)
    b = batch(*[SamplingParams(max_tokens=1, temperature=0)] * 5)
    assert b.simple
    assert Sampler("cpu").sample(x, b, [{}] * 5).tokens.tolist() == x.argmax(-1).tolist()
    # next to sampled rows the greedy ones still take the argmax
    mixed = batch(SamplingParams(max_tokens=1, temperature=0), SamplingParams(max_tokens=1),
                  SamplingParams(max_tokens=1, temperature=0))
    assert not mixed.simple
    tokens = Sampler("cpu", seed=0).sample(x[:3], mixed, [{}] * 3).tokens
    assert tokens[0] == x[0].argmax() and tokens[2] == x[2].argmax()


P = [0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0, 0.0, 0.0]


def test_temperature_one_draws_the_model_distribution():
    assert torch.allclose(frequencies(SamplingParams(max_tokens=1), P), torch.tensor(P), atol=0.01)


def test_temperature_sharpens_and_flattens():
    # softmax(log p / T) is proportional to p ** (1 / T)
    for t in (0.5, 2.0):
        q = torch.tensor(P) ** (1 / t)
        assert torch.allclose(frequencies(SamplingParams(max_tokens=1, temperature=t), P), q / q.sum(), atol=0.01)


def test_top_p_draws_from_the_nucleus():
    nucleus = frequencies(SamplingParams(max_tokens=1, top_p=0.7), P)
    assert torch.allclose(nucleus, torch.tensor([2 / 3, 1 / 3, 0, 0, 0, 0, 0, 0]), atol=0.01)
    # the top 2 hold 0.75 < 0.9: the row is sorted entirely to find its nucleus
    wide = frequencies(SamplingParams(max_tokens=1, top_p=0.9), P, top_k_first=2)
    assert torch.allclose(wide, torch.tensor([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0, 0, 0, 0]), atol=0.01)
    # the most likely token always stays
    assert frequencies(SamplingParams(max_tokens=1, top_p=0.01), P, n=1000)[0] == 1


def test_a_seed_gives_the_same_tokens_whatever_else_is_in_the_batch():
    seeded = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=1234)
    steps = [logits(1, seed=i)[0] for i in range(8)]

    def run(others: list[SamplingParams], at: int) -> list[int]:
        rows = others[:at] + [seeded] + others[at:]
        b, s = batch(*rows), Sampler("cpu")  # the sampler's own generator: unseeded
        out = []
        for i, step in enumerate(steps):
            x = logits(len(rows), seed=100 + i)
            x[at] = step
            out.append(int(s.sample(x, b, [{}] * len(rows)).tokens[at]))
        return out

    alone = run([], 0)
    crowd = [SamplingParams(max_tokens=8), SamplingParams(max_tokens=8, temperature=0),
             SamplingParams(max_tokens=8, seed=7, temperature=0.7), SamplingParams(max_tokens=8, top_p=0.5)]
    assert run(crowd, 2) == alone
    assert run(crowd[:1], 1) == alone
    other_seed = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=99)
    b = batch(other_seed)
    assert [int(Sampler("cpu").sample(s[None], b, [{}]).tokens[0]) for s in steps] != alone


def test_seeded_generator_only_for_sampled_rows_with_a_seed():
    assert seeded_generator(SamplingParams(max_tokens=1, seed=1), "cpu") is not None
    assert seeded_generator(SamplingParams(max_tokens=1, seed=1, temperature=0), "cpu") is None
    assert seeded_generator(SamplingParams(max_tokens=1), "cpu") is None


def test_penalties_follow_openai():
    """logit[t] -= presence * (count[t] > 0) + frequency * count[t]; token 5 was generated 3 times."""
    x = torch.zeros(4, VOCAB)
    x[:, 5] = 4.0
    x[:, 6] = torch.tensor([1.2, 2.5, 1.4, 1.6])  # the runner-up, per row
    b = batch(SamplingParams(max_tokens=1, temperature=0, frequency_penalty=1.0),  # 4 - 3 = 1 < 1.2
              SamplingParams(max_tokens=1, temperature=0, presence_penalty=2.0),  # 4 - 2 = 2 < 2.5
              SamplingParams(max_tokens=1, temperature=0, presence_penalty=1.0, frequency_penalty=0.5),  # 1.5 > 1.4
              SamplingParams(max_tokens=1, temperature=0, presence_penalty=1.0, frequency_penalty=0.5))  # 1.5 < 1.6
    before = x.clone()
    assert Sampler("cpu").sample(x, b, [{5: 3}] * 4).tokens.tolist() == [6, 6, 5, 6]
    assert torch.equal(x, before)  # the caller's logits are not changed
    # tokens not generated yet are not penalised
    assert Sampler("cpu").sample(x, b, [{}, {7: 9}, {}, {6: 1, 8: 2}]).tokens.tolist() == [5, 5, 5, 5]


def test_logprobs_are_the_raw_distribution():
    x = logits(4)
    b = batch(SamplingParams(max_tokens=1, temperature=0, logprobs=3),
              SamplingParams(max_tokens=1),  # no logprobs
              SamplingParams(max_tokens=1, temperature=0.5, presence_penalty=2.0, logprobs=0),
              SamplingParams(max_tokens=1, temperature=0, logprobs=5))
    counts = [{}, {}, {int(x[2].argmax()): 1}, {}]
    out = Sampler("cpu", seed=0).sample(x, b, counts)
    raw = torch.log_softmax(x, dim=-1)
    assert set(out.logprobs) == {0, 2, 3}
    for row, k in ((0, 3), (2, 0), (3, 5)):
        chosen, top = out.logprobs[row]
        token = int(out.tokens[row])
        assert chosen == pytest.approx(float(raw[row, token]), abs=1e-5)  # before penalties and temperature
        assert len(top) == k
        assert [t for t, _ in top] == raw[row].topk(k).indices.tolist() if k else top == []
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        assert all(lp <= 0 and math.isfinite(lp) for _, lp in top)
    assert out.logprobs[0][1][0][0] == int(out.tokens[0])  # greedy: the chosen token is the most likely


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(temperature=math.inf),
                                 dict(top_p=0), dict(top_p=1.5), dict(presence_penalty=3),
                                 dict(frequency_penalty=-2.5), dict(logprobs=21), dict(logprobs=-1)])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**{"max_tokens": 4, **bad})
