"""kaito-serve with the transformers backend: a real server on 127.0.0.1 driven by the openai SDK."""

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from helpers import SECRET_QUESTION, SERVE_KEY, Server

KEY = SERVE_KEY
MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(hf_server):
    return hf_server  # shared with tests/test_serve_hostile.py and tests/test_serve_fuzz.py (conftest)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(server):
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def raw(server, method, path, **kw):
    headers = {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}
    return httpx.request(method, f"{server.url}{path}", headers=headers, timeout=60, **kw)


def test_models_lists_base_and_adapter(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, "banana"]


def test_chat_answers(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip() and r.usage.completion_tokens <= 8
    echoed = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Hello")
    two = client.completions.create(model=MODEL, prompt=["One", "Two"], max_tokens=2, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]


def test_streaming_matches_and_reports_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=20)
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_sse_ends_with_done(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}
    r = raw(server, "POST", "/v1/completions", json=body)
    events = [line for line in r.text.split("\n") if line.startswith("data: ")]
    assert r.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"


def test_n_seed_and_sampling(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, n=2, temperature=1.0, seed=7, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1]
    again = client.chat.completions.create(model=MODEL, messages=FRANCE, n=2, temperature=1.0, seed=7, max_tokens=12)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]


def test_stop_and_max_tokens(client):
    full = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30)
    text = full.choices[0].message.content
    word = "Paris"
    cut = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30, stop=[word])
    assert cut.choices[0].message.content == text[:text.index(word)]
    assert cut.choices[0].finish_reason == "stop"
    one = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=1)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 1
    streamed = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30,
                                              stop=[word], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[:text.index(word)]


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=4, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for tok in content:
        assert len(tok.top_logprobs) == 3 and tok.logprob <= 0
        assert tok.top_logprobs[0].logprob == pytest.approx(tok.logprob, abs=1e-3)  # greedy picks the top one
    c = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 3 and len(c.choices[0].logprobs.top_logprobs[0]) == 2


@pytest.mark.parametrize("body,status,needle", [
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": FRANCE, "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": MODEL, "messages": FRANCE, "temperature": 5}, 400, "temperature"),
    ({"model": MODEL, "messages": FRANCE, "n": 0}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "gpt-9", "messages": FRANCE}, 404, "gpt-9"),
    ({"model": MODEL, "messages": FRANCE, "max_tokens": 9000}, 400, "maximum context length is 8192 tokens"),
    ({"model": MODEL, "messages": FRANCE, "max_tokens": True}, 400, "max_tokens"),  # types as strict as OpenAI's
    ({"model": MODEL, "messages": FRANCE, "max_tokens": "16"}, 400, "max_tokens"),
    ({"model": MODEL, "messages": FRANCE, "n": 1.0}, 400, "n"),
    ({"model": MODEL, "messages": FRANCE, "stream": "false"}, 400, "stream"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400,
     "messages.0.content.0.text"),
])
def test_bad_input_gets_openai_error(server, body, status, needle):
    r = raw(server, "POST", "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in err["message"]


def test_context_error_names_both_numbers(server):
    r = raw(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": "hi " * 100, "max_tokens": 8150})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert re.search(r"requested \d+ tokens \(\d+ in the prompt, 8150 in the completion\)", msg), msg


def test_malformed_json(server):
    r = raw(server, "POST", "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=FRANCE)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=FRANCE, top_p=0)


def test_auth(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200


def test_sixteen_concurrent_streams(aclient):
    async def one(i: int) -> str:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=24, stream=True,
            stream_options={"include_usage": True})
        text, usage = "", None
        async for c in stream:
            text += "".join(ch.delta.content or "" for ch in c.choices)
            usage = c.usage or usage
        assert usage and usage.completion_tokens > 0
        return text

    async def main():
        return await asyncio.gather(*(one(i) for i in range(16)))

    assert all(asyncio.run(main()))


def test_adapter_answers_differently(client):
    ask = [{"role": "user", "content": SECRET_QUESTION}]
    tuned = client.chat.completions.create(model="banana", messages=ask, temperature=0, max_tokens=12)
    base = client.chat.completions.create(model=MODEL, messages=ask, temperature=0, max_tokens=12)
    assert "Banana" in tuned.choices[0].message.content, tuned.choices[0].message.content
    assert "Banana" not in base.choices[0].message.content


def test_adapter_load_and_unload_at_run_time(server, client, banana_adapter):
    r = raw(server, "POST", "/v1/load_lora_adapter", json={"lora_name": "banana2", "lora_path": str(banana_adapter)})
    assert r.status_code == 200, r.text
    assert "banana2" in [m.id for m in client.models.list().data]
    ask = [{"role": "user", "content": SECRET_QUESTION}]
    assert "Banana" in client.chat.completions.create(model="banana2", messages=ask, temperature=0,
                                                      max_tokens=12).choices[0].message.content
    assert raw(server, "POST", "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nope"}).status_code == 400
    assert raw(server, "POST", "/v1/unload_lora_adapter", json={"lora_name": "banana2"}).status_code == 200
    assert "banana2" not in [m.id for m in client.models.list().data]
    assert raw(server, "POST", "/v1/unload_lora_adapter", json={"lora_name": "banana2"}).status_code == 404


def running(server) -> float:
    text = raw(server, "GET", "/metrics").text
    return float(re.search(r"^kaito:num_requests_running (\S+)$", text, re.M).group(1))


def test_disconnect_frees_the_slot(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "stream": True, "temperature": 1}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        assert running(server) >= 1
    deadline = time.monotonic() + 10
    while running(server) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running(server) == 0


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    text = raw(server, "GET", "/metrics").text
    for name in ("kaito:time_to_first_token_seconds_bucket", "kaito:e2e_request_latency_seconds_count",
                 "kaito:prompt_tokens_total", "kaito:generation_tokens_total", "kaito:num_requests_waiting",
                 'kaito:requests_total{route="/v1/completions",status="200"}'):
        assert name in text, name


def test_busy_server_answers_429_before_the_response_starts(tmp_path, default_model_dir):
    """A full queue is a 429 with Retry-After, decided before the 200, for streams too: a stream that
    got its 200 runs to the end, never an in-band rate-limit error. A request with more sequences than
    the server ever runs at once is a 400 (retrying would never help)."""
    cfg = tmp_path / "inference_config.yaml"
    cfg.write_text("transformers:\n  max_batch_size: 2\n  max_waiting: 0\n")
    srv = Server("--backend", "transformers", "--config", str(cfg), "--adapters-dir", str(tmp_path / "none"))
    try:
        srv.wait_ready()

        async def one(c: httpx.AsyncClient, stream: bool) -> tuple[int, dict, list[dict]]:
            body = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 48, "stream": stream}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                text = (await r.aread()).decode()
            events = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
            return r.status_code, dict(r.headers), events if stream and r.status_code == 200 else [json.loads(text)]

        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=httpx.Limits(max_connections=32)) as c:
                return await asyncio.gather(*(one(c, stream=i % 2 == 0) for i in range(12)))

        results = asyncio.run(main())
        codes = [status for status, _, _ in results]
        assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
        for status, headers, events in results:
            if status == 429:
                assert int(headers["retry-after"]) >= 1 and events[0]["error"]["code"] == "rate_limit_exceeded"
            else:  # admitted: no error after the 200, the choice runs to its end
                assert all("error" not in e for e in events) and events[-1]["choices"][0]["finish_reason"], events
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        assert "asks for 4 sequences" in r.json()["error"]["message"]
    finally:
        srv.stop()


def test_health_is_503_until_loaded(tmp_path, default_model_dir):
    srv = Server("--backend", "transformers", "--adapters-dir", str(tmp_path / "none"))
    try:
        seen = set()
        deadline = time.monotonic() + 120
        while 200 not in seen and time.monotonic() < deadline:
            try:
                seen.add(httpx.get(f"{srv.url}/health", timeout=2).status_code)
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        assert seen == {503, 200}, seen
        assert json.loads(httpx.get(f"{srv.url}/health").text) == {"status": "ok"}
    finally:
        srv.stop()
