"""The transformers backend's generation engine (runtime/hf_engine.py) on the real default model."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import SECRET_QUESTION
from kaito.presets import TransformersConfig
from kaito.runtime.engine_api import EngineBusy, SamplingParams, TokenEvent, UnknownAdapter

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea, please, using simple words.",
    "Hi",
]


def settings(**kw) -> TransformersConfig:
    """The engine's default settings: on the CPU it computes in float32, in which torch's kernels give a
    row the same numbers whatever else is in the batch (in bf16 they do not: a row's logits change with
    the batch's size and padding, and batching would change the text)."""
    return TransformersConfig(**kw)


@pytest.fixture(scope="module")
def engine(default_model_dir):
    from kaito.runtime.hf_engine import HFEngine

    eng = HFEngine(str(default_model_dir), settings(max_batch_size=16))
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.stop())


def chat(engine, question: str) -> list[int]:
    ids = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


async def collect(engine, prompt: list[int], **params) -> list[TokenEvent]:
    return [ev async for ev in engine.generate(prompt, SamplingParams(**params))]


def tokens(events: list[TokenEvent]) -> list[int]:
    return [ev.token_id for ev in events]


def run(coro):
    return asyncio.run(coro)


async def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def greedy_alone(engine) -> dict[str, list[int]]:
    """Each question answered greedily, one request at a time (24 tokens at most)."""
    return {q: tokens(run(collect(engine, chat(engine, q), max_tokens=24, temperature=0))) for q in QUESTIONS}


def test_greedy_answer_is_paris(engine):
    events = run(collect(engine, chat(engine, "What is the capital of France?"), max_tokens=32, temperature=0))
    text = engine.tokenizer.decode(tokens(events), skip_special_tokens=True)
    assert "Paris" in text
    assert [ev.finish_reason for ev in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == "stop" and events[-1].token_id in engine.eos_token_ids
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_batched_greedy_equals_single(engine, greedy_alone):
    """Prompts of different lengths in one batch (left padding) give the same tokens as alone."""

    async def together():
        return await asyncio.gather(
            *(collect(engine, chat(engine, q), max_tokens=24, temperature=0) for q in QUESTIONS)
        )

    for q, events in zip(QUESTIONS, run(together())):
        assert tokens(events) == greedy_alone[q], q


@pytest.mark.parametrize("first, second", [(QUESTIONS[2], QUESTIONS[0]), (QUESTIONS[3], QUESTIONS[2])],
                         ids=["shorter-prompt-joins", "longer-prompt-joins"])
def test_request_joining_a_running_batch(engine, greedy_alone, first, second):
    """A request that arrives while another decodes joins the batch and gets the tokens it gets alone;
    the running request is not disturbed. The joining prompt is shorter than the batch's columns (it is
    padded) or longer (the running rows are padded)."""

    async def scenario():
        seen: list[TokenEvent] = []

        async def long_one():
            async for ev in engine.generate(chat(engine, first), SamplingParams(max_tokens=24, temperature=0)):
                seen.append(ev)
            return seen

        task = asyncio.create_task(long_one())
        await wait_for(lambda: len(seen) >= 4)
        assert engine.num_running == 1
        stream = engine.generate(chat(engine, second), SamplingParams(max_tokens=24, temperature=0))
        joined = [await stream.__anext__()]
        assert not seen[-1].finish_reason, "the first request finished before the second joined"
        assert engine.num_running == 2
        joined += [ev async for ev in stream]
        return await task, joined

    a, b = run(scenario())
    assert tokens(a) == greedy_alone[first]
    assert tokens(b) == greedy_alone[second]


def test_seed_is_reproducible(engine):
    prompt = chat(engine, "Tell me a short story about a cat.")
    params = {"max_tokens": 16, "temperature": 1.0, "top_p": 0.95}

    async def scenario():
        alone = await collect(engine, prompt, seed=1234, **params)
        # the same seed twice in one batch, next to an unseeded request
        batch = await asyncio.gather(
            collect(engine, prompt, seed=1234, **params),
            collect(engine, prompt, seed=1234, **params),
            collect(engine, prompt, **params),
        )
        other = await collect(engine, prompt, seed=99, **params)
        return alone, batch, other

    alone, batch, other = run(scenario())
    assert tokens(alone) == tokens(batch[0]) == tokens(batch[1])
    assert tokens(other) != tokens(alone)


def test_max_tokens_one(engine):
    events = run(collect(engine, chat(engine, QUESTIONS[0]), max_tokens=1, temperature=0))
    assert len(events) == 1 and events[0].finish_reason == "length"


def test_stop_token_ids(engine, greedy_alone):
    ref = greedy_alone[QUESTIONS[1]]
    cut = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])
    events = run(collect(engine, chat(engine, QUESTIONS[1]), max_tokens=24, temperature=0, stop_token_ids=(ref[cut],)))
    assert tokens(events) == ref[: cut + 1]  # the stop token itself is the last event
    assert events[-1].finish_reason == "stop"


def test_logprobs(engine, greedy_alone):
    q = QUESTIONS[1]
    events = run(collect(engine, chat(engine, q), max_tokens=24, temperature=0, logprobs=5))
    assert tokens(events) == greedy_alone[q]
    for ev in events:
        assert ev.logprob is not None and ev.logprob <= 0
        assert len(ev.top_logprobs) == 5
        values = [lp for _, lp in ev.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert ev.top_logprobs[0][0] == ev.token_id  # greedy: the chosen token is the most likely one
        assert ev.logprob == pytest.approx(values[0], abs=1e-6)
    # logprobs=0: the chosen token's logprob only; no logprobs: none
    ev0 = run(collect(engine, chat(engine, q), max_tokens=2, temperature=0, logprobs=0))[0]
    assert ev0.logprob is not None and ev0.top_logprobs == []
    plain = run(collect(engine, chat(engine, q), max_tokens=2, temperature=0))[0]
    assert plain.logprob is None and plain.top_logprobs is None


def test_penalties_change_the_output(engine):
    prompt = chat(engine, "Write a short poem about the sea.")  # greedily, it repeats a line

    async def scenario():
        return await asyncio.gather(
            collect(engine, prompt, max_tokens=32, temperature=0),
            collect(engine, prompt, max_tokens=32, temperature=0, frequency_penalty=2.0),
            collect(engine, prompt, max_tokens=32, temperature=0, presence_penalty=2.0),
        )

    plain, freq, pres = run(scenario())
    assert tokens(freq) != tokens(plain)
    assert tokens(pres) != tokens(plain)
    # a penalised answer repeats itself less
    assert len(set(tokens(freq))) > len(set(tokens(plain)))


def test_cancellation_frees_the_slot(engine):
    async def scenario():
        stream = engine.generate(chat(engine, QUESTIONS[2]), SamplingParams(max_tokens=500, temperature=0))
        got = [await stream.__anext__(), await stream.__anext__()]
        assert engine.num_running == 1
        await stream.aclose()
        assert engine.num_running == 0
        # a consumer task that is cancelled while it waits for a token
        started = asyncio.Event()

        async def consumer():
            async for _ in engine.generate(chat(engine, QUESTIONS[2]), SamplingParams(max_tokens=500, temperature=0)):
                started.set()

        task = asyncio.create_task(consumer())
        await started.wait()
        assert engine.num_running == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.num_running == 0
        await wait_for(lambda: not engine._rows, timeout=10)  # the batch row is gone at the next step
        return got

    assert len(run(scenario())) == 2


def test_engine_busy_when_the_queue_is_full(default_model_dir):
    from kaito.runtime.hf_engine import HFEngine

    eng = HFEngine(str(default_model_dir), settings(max_batch_size=1, max_waiting=1))
    prompt = chat(eng, QUESTIONS[0])

    async def scenario():
        await eng.start()
        try:
            a = eng.generate(prompt, SamplingParams(max_tokens=200, temperature=0))
            await a.__anext__()  # a is running: the batch (1 row) is full
            assert eng.has_room() and not eng.has_room(2)  # one place left, in the queue
            b = eng.generate(prompt, SamplingParams(max_tokens=2, temperature=0))  # waits
            assert eng.num_running == 1 and eng.num_waiting == 1 and not eng.has_room()
            with pytest.raises(EngineBusy) as busy:
                eng.generate(prompt, SamplingParams(max_tokens=2, temperature=0))
            assert busy.value.retry_after_s > 0
            await a.aclose()  # frees the slot: b runs
            events = [ev async for ev in b]
            assert len(events) == 2 and events[-1].finish_reason == "length"
            # stopping the engine fails the requests it still holds
            c = eng.generate(prompt, SamplingParams(max_tokens=200, temperature=0))
            await c.__anext__()
        finally:
            await eng.stop()
        with pytest.raises(RuntimeError, match="stopped"):
            async for _ in c:
                pass

    run(scenario())


def test_sixteen_concurrent_requests(engine):
    prompts = [chat(engine, f"Count from {i} to {i + 5}.") for i in range(16)]

    async def scenario():
        peak = 0

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, engine.num_running)
                await asyncio.sleep(0.005)

        w = asyncio.create_task(watch())
        res = await asyncio.gather(
            *(collect(engine, p, max_tokens=8, temperature=0.7, seed=i) for i, p in enumerate(prompts))
        )
        w.cancel()
        return res, peak

    results, peak = run(scenario())
    assert all(r and r[-1].finish_reason in ("stop", "length") for r in results)
    assert peak > 1  # they ran together
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_bad_requests(engine):
    async def scenario():
        with pytest.raises(ValueError):
            engine.generate([], SamplingParams(max_tokens=4))
        with pytest.raises(ValueError):
            engine.generate([1] * engine.max_model_len, SamplingParams(max_tokens=4))
        with pytest.raises(UnknownAdapter):
            engine.generate([1, 2, 3], SamplingParams(max_tokens=4, adapter="nope"))

    run(scenario())


def test_a_failing_step_fails_its_requests(engine, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    async def scenario():
        monkeypatch.setattr(engine, "_forward", boom)
        with pytest.raises(RuntimeError, match="simulated"):
            await collect(engine, chat(engine, QUESTIONS[0]), max_tokens=4, temperature=0)
        monkeypatch.undo()
        events = await collect(engine, chat(engine, QUESTIONS[0]), max_tokens=4, temperature=0)
        assert len(events) == 4

    run(scenario())
    assert engine.num_running == 0


def test_a_bad_row_in_a_prefill_fails_only_its_request(engine, greedy_alone):
    """A row that makes the batch's prefill raise (a token id past the vocabulary, planted after the
    checks of `generate`, as a bug would let it through) fails alone: the other prompts of the same
    prefill are prefilled again one at a time and get the tokens they get alone."""
    good = [QUESTIONS[0], QUESTIONS[3]]

    async def scenario():
        with engine._cond:  # the engine thread takes all three from the queue together
            streams = [engine.generate(chat(engine, q), SamplingParams(max_tokens=24, temperature=0)) for q in good]
            bad = engine.generate(chat(engine, QUESTIONS[1]), SamplingParams(max_tokens=24, temperature=0))
            bad._req.prompt[-1] = engine.vocab_size + 7

        async def drain(stream):
            return [ev async for ev in stream]

        return await asyncio.wait_for(asyncio.gather(*(drain(s) for s in [*streams, bad]), return_exceptions=True),
                                      120)

    *answers, failure = run(scenario())
    assert isinstance(failure, RuntimeError) and isinstance(failure.__cause__, IndexError), failure
    assert [tokens(a) for a in answers] == [greedy_alone[q] for q in good]
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_a_bad_row_in_a_decode_step_fails_only_its_request(engine, greedy_alone):
    """A row that makes the batch's decode step raise (a penalised row whose token counts hold an id
    past the vocabulary: its penalty fails in the sampler) leaves the batch with the error; the step
    is undone and the other rows decode on, with exactly the tokens they get alone."""
    good = [QUESTIONS[0], QUESTIONS[2]]

    async def scenario():
        with engine._cond:  # one prefill, then one decode batch of three rows
            streams = [engine.generate(chat(engine, q), SamplingParams(max_tokens=24, temperature=0)) for q in good]
            bad = engine.generate(chat(engine, QUESTIONS[1]),
                                  SamplingParams(max_tokens=24, temperature=0, presence_penalty=0.5))
        firsts = [await s.__anext__() for s in [*streams, bad]]
        bad._req.counts[engine.vocab_size + 7] = 1

        async def drain(stream, first):
            return [first, *[ev async for ev in stream]]

        return await asyncio.wait_for(asyncio.gather(*(drain(s, f) for s, f in zip([*streams, bad], firsts)),
                                                     return_exceptions=True), 120)

    *answers, failure = run(scenario())
    assert isinstance(failure, RuntimeError) and "generation failed" in str(failure), failure
    assert [tokens(a) for a in answers] == [greedy_alone[q] for q in good]
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_lora_adapter_in_a_mixed_batch(engine, banana_adapter):
    engine.load_adapter("secret", str(banana_adapter))
    try:
        assert engine.adapters() == {"secret": str(banana_adapter)}
        prompt = chat(engine, SECRET_QUESTION)

        async def scenario():
            return await asyncio.gather(
                collect(engine, prompt, max_tokens=16, temperature=0, adapter="secret"),
                collect(engine, prompt, max_tokens=16, temperature=0),
                collect(engine, chat(engine, QUESTIONS[0]), max_tokens=16, temperature=0, adapter="secret"),
            )

        tuned, base, tuned_other = run(scenario())

        def text(evs):
            return engine.tokenizer.decode(tokens(evs), skip_special_tokens=True)

        assert "Banana" in text(tuned)
        assert "Banana" not in text(base)
        assert tokens(tuned) != tokens(base)
        assert tuned_other  # another prompt through the adapter in the same batch runs too

        async def unload_midway():  # unloading the adapter fails the requests still using it
            stream = engine.generate(prompt, SamplingParams(max_tokens=16, temperature=0, adapter="secret"))
            await stream.__anext__()
            engine.unload_adapter("secret")
            with pytest.raises(UnknownAdapter):
                async for _ in stream:
                    pass

        run(unload_midway())
    finally:
        if "secret" in engine.adapters():
            engine.unload_adapter("secret")
    assert engine.adapters() == {}
    with pytest.raises(UnknownAdapter):
        engine.unload_adapter("secret")
    # the base model is back: the same answer as before the adapter was loaded
    events = run(collect(engine, chat(engine, "What is the capital of France?"), max_tokens=32, temperature=0))
    assert "Paris" in engine.tokenizer.decode(tokens(events), skip_special_tokens=True)
