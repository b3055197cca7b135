"""Locust load for OpenAI chat streaming: each user sends streaming chat completions back to back and
records, as separate Locust entries, time to first token (`ttft`), mean inter-token latency (`itl`)
and the whole request (`e2e`, whose response length is the output token count).

    locust -f benchmarks/locustfile.py --headless -u 8 -r 8 -t 30s --host http://127.0.0.1:5000 \
        --csv out/run

Environment: KAITO_BENCH_MODEL (served model name), KAITO_BENCH_MAX_TOKENS (default 64),
KAITO_BENCH_API_KEY.
"""

from __future__ import annotations

import os
import time

from locust import HttpUser, events, task
from serving import PROMPTS, StreamTimer  # locust puts this file's folder on sys.path

MODEL = os.environ.get("KAITO_BENCH_MODEL", "smollm2-135m-instruct")
MAX_TOKENS = int(os.environ.get("KAITO_BENCH_MAX_TOKENS", "64"))
API_KEY = os.environ.get("KAITO_BENCH_API_KEY", "none")


def _record(name: str, ms: float, length: int = 0, exc: Exception | None = None) -> None:
    events.request.fire(request_type="SSE", name=name, response_time=ms, response_length=length,
                        exception=exc, context={})


class ChatStreamUser(HttpUser):
    @task
    def chat(self) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPTS[hash(self) % len(PROMPTS)]}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        timer = StreamTimer()
        try:
            with self.client.post("/v1/chat/completions", json=body, stream=True, catch_response=True,
                                  headers={"Authorization": f"Bearer {API_KEY}"}, name="http") as resp:
                if resp.status_code != 200:
                    resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                    return
                for line in resp.iter_lines():
                    timer.feed(line)
                resp.success()
        except Exception as e:  # noqa: BLE001 - reported to locust as a failure
            _record("e2e", (time.perf_counter() - timer.start) * 1000, 0, e)
            return
        end = time.perf_counter()
        if timer.ttft_ms() is not None:
            _record("ttft", timer.ttft_ms())
        if timer.itl_ms() is not None:
            _record("itl", timer.itl_ms())
        _record("e2e", (end - timer.start) * 1000, timer.tokens)
