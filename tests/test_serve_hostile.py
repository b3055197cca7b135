"""kaito-serve (transformers backend) against hostile input: what one client sends never breaks the
server for anyone else. The real server of conftest.hf_server, driven with httpx over 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
from helpers import SERVE_KEY

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
AUTH = {"Authorization": f"Bearer {SERVE_KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}
LIMIT = 16 * 8192 * 16  # the default body limit for the default model's 8192-token context (2 MiB)


POLL = """
import select, sys, time
import httpx
worst = 0.0
with httpx.Client(timeout=30) as c:
    c.get(sys.argv[1])
    print("ready", flush=True)
    while not select.select([sys.stdin], [], [], 0)[0]:
        t = time.monotonic()
        assert c.get(sys.argv[1]).status_code == 200
        worst = max(worst, time.monotonic() - t)
        time.sleep(0.005)
print(worst, flush=True)
"""


class HealthWatch:
    """Asks /health every few milliseconds, from a process of its own (one kept-alive connection), while
    the block runs; `worst` is the slowest answer, in seconds."""

    def __init__(self, url: str) -> None:
        self.url, self.worst = f"{url}/health", 0.0

    def __enter__(self) -> HealthWatch:
        self.proc = subprocess.Popen([sys.executable, "-c", POLL, self.url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *exc) -> None:
        out, _ = self.proc.communicate("stop\n", timeout=60)
        self.worst = float(out.split()[-1])


def rss_mb(pid: int) -> float:
    """The process's resident memory (VmRSS), MiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def post(server, path: str, body: bytes | dict, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # ASCII: surrogates as \ud800
    return httpx.post(f"{server.url}{path}", content=content, headers=JSON, timeout=60, **kw)


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def test_a_huge_body_is_refused_at_once_and_stalls_no_one(hf_server):
    """20 MB, declared (Content-Length) or chunked: 413 in well under a second, read at most up to the
    limit; /health keeps answering fast meanwhile and the server's memory stays where it was."""
    huge = b'{"model": "%s", "prompt": "' % MODEL.encode() + b"a" * 20_000_000 + b'"}'

    def chunked():
        for i in range(0, len(huge), 1 << 16):
            yield huge[i:i + (1 << 16)]

    before = rss_mb(hf_server.proc.pid)
    with HealthWatch(hf_server.url) as health:
        for content in (huge, chunked()):
            t = time.monotonic()
            r = httpx.post(f"{hf_server.url}/v1/completions", content=content, headers=JSON, timeout=30)
            took = time.monotonic() - t
            err = assert_error(r, 413)
            assert err["code"] == "request_too_large" and str(LIMIT) in err["message"]
            assert took < 1, f"refused after {took:.2f} s"
    assert health.worst < 0.05, f"/health took {health.worst * 1000:.0f} ms while the body came"
    time.sleep(0.2)
    assert rss_mb(hf_server.proc.pid) - before < 200


def test_a_long_prompt_is_tokenised_off_the_event_loop(hf_server):
    """A prompt just under the body limit takes the tokenizer about a second (then it is refused: it
    is far longer than the context); /health answers throughout, not after it."""
    body = json.dumps({"model": MODEL, "prompt": "hello world, this is a long prompt. " * (LIMIT // 40)}).encode()
    with HealthWatch(hf_server.url) as health:
        r = post(hf_server, "/v1/completions", body)
    assert assert_error(r, 400)["code"] == "context_length_exceeded"
    assert health.worst < 0.25, f"/health took {health.worst * 1000:.0f} ms while the prompt was tokenised"


SURROGATE = "text must be valid Unicode: a lone surrogate"


@pytest.mark.parametrize("path, body, param, needle", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.0.content",
     f"{SURROGATE} (\\ud800) at character 3"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages.0.content.0.text", SURROGATE),
    ("/v1/completions", {"prompt": "\ud83d"}, "prompt", SURROGATE),
    ("/v1/completions", {"prompt": ["fine", "bad \udc00 text"]}, "prompt.1", SURROGATE),
    ("/v1/completions", {"prompt": "nul \x00 inside"}, "prompt", "text must not contain NUL characters"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"]}, "stop.0", SURROGATE),
], ids=["chat", "chat-part", "completion", "completion-list", "nul", "stop"])
def test_lone_surrogates_and_nul_are_a_clear_400(hf_server, path, body, param, needle):
    err = assert_error(post(hf_server, path, {"model": MODEL, "max_tokens": 2, **body}), 400)
    assert err["param"] == param and needle in err["message"], err


def test_a_valid_surrogate_pair_is_text(hf_server):
    r = post(hf_server, "/v1/completions", {"model": MODEL, "prompt": "Emoji: \U0001f600", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_requests_that_can_never_fit_are_a_400(hf_server):
    """More sequences than the server ever runs at once (16 + 16 here), or a prompt longer than the
    context: a 400 that says why, not a 429 that invites retries."""
    err = assert_error(post(hf_server, "/v1/completions", {"model": MODEL, "prompt": ["a"] * 4, "n": 16}), 400)
    assert err["param"] == "n" and "asks for 64 sequences" in err["message"]
    err = assert_error(post(hf_server, "/v1/completions", {"model": MODEL, "prompt": [1] * 9000}), 400)
    assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("content, headers", [
    (b"[1, 2]", JSON),
    (b'{"model": "m", "prompt": "hi"}', AUTH),  # no Content-Type
    (b"[" * 100_000 + b"]" * 100_000, JSON),  # deeper than Python's recursion limit
], ids=["array", "no-content-type", "deep"])
def test_a_body_that_is_not_a_json_object_is_a_clear_400(hf_server, content, headers):
    r = httpx.post(f"{hf_server.url}/v1/completions", content=content, headers=headers, timeout=60)
    assert_error(r, 400)


def test_a_wrong_method_is_a_405_that_says_what_is_allowed(hf_server):
    r = httpx.get(f"{hf_server.url}/v1/chat/completions", headers=AUTH)
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"


def test_openapi_declares_every_status_and_content_type_served(hf_server):
    doc = httpx.get(f"{hf_server.url}/openapi.json", headers=AUTH).json()
    ops = {(m.upper(), p): op for p, methods in doc["paths"].items() for m, op in methods.items()}

    def content(op, status):
        return set(op["responses"][status].get("content", {}))

    assert content(ops["GET", "/metrics"], "200") == {"text/plain"}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert content(ops["POST", path], "200") == {"text/plain"}
        assert content(ops["POST", path], "400") == content(ops["POST", path], "413") == {"application/json"}
    for path in ("/v1/chat/completions", "/v1/completions"):
        op = ops["POST", path]
        assert set(op["responses"]) == {"200", "400", "401", "404", "413", "429", "500", "503"}
        assert content(op, "200") == {"application/json", "text/event-stream"}
        assert op["responses"]["429"]["headers"]["Retry-After"]["required"]
        assert op["responses"]["401"]["headers"]["WWW-Authenticate"]["required"]
        assert op["security"] == [{"bearer": []}]
    assert set(ops["GET", "/health"]["responses"]) == {"200", "503"} and "security" not in ops["GET", "/health"]
    assert not any("422" in op["responses"] for op in ops.values())  # validation errors are 400s
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
