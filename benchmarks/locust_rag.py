"""Locust load for kaito-rag: index, retrieve and chat (with an index) mixed 1 : 8 : 1.

    locust -f benchmarks/locust_rag.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:5000 \
        --csv benchmarks/results/locust_rag

The index is seeded once before the users start (200 generated documents); each user then indexes a
new small document now and then, retrieves with generated questions, and asks chat questions answered
from the index (needs the service's LLM; set KAITO_BENCH_CHAT=0 to leave chat out).
Environment: KAITO_BENCH_INDEX (default locust), KAITO_BENCH_API_KEY, KAITO_BENCH_MODEL (chat model name),
KAITO_BENCH_MAX_TOKENS (default 32).
"""

from __future__ import annotations

import os
import random
import sys
import uuid
from pathlib import Path

import httpx
from locust import HttpUser, between, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rag_bench import corpus, queries  # noqa: E402

INDEX = os.environ.get("KAITO_BENCH_INDEX", "locust")
API_KEY = os.environ.get("KAITO_BENCH_API_KEY")
MODEL = os.environ.get("KAITO_BENCH_MODEL", "smollm2-135m-instruct")
MAX_TOKENS = int(os.environ.get("KAITO_BENCH_MAX_TOKENS", "32"))
CHAT = os.environ.get("KAITO_BENCH_CHAT", "1") != "0"
SEED = corpus(200)
QUESTIONS = queries(SEED, 500)


HEADERS = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}


@events.test_start.add_listener
def seed(environment, **_) -> None:
    r = httpx.post(f"{environment.host}/index", json={"index_name": INDEX, "documents": SEED}, headers=HEADERS,
                   timeout=600)
    r.raise_for_status()


class RagUser(HttpUser):
    wait_time = between(0, 0.05)

    def on_start(self) -> None:
        self.client.headers.update(HEADERS)

    @task(1)
    def index(self) -> None:
        doc = random.choice(SEED)
        text = f"{doc['text']} Note {uuid.uuid4().hex[:8]}."
        self.client.post("/index", json={"index_name": INDEX, "documents": [{"text": text, "metadata": doc["metadata"]}]})

    @task(8)
    def retrieve(self) -> None:
        self.client.post("/retrieve", json={"index_name": INDEX, "query": random.choice(QUESTIONS), "max_node_count": 5})

    @task(1)
    def chat(self) -> None:
        if not CHAT:
            return
        self.client.post("/v1/chat/completions", json={
            "model": MODEL, "index_name": INDEX, "max_tokens": MAX_TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": random.choice(QUESTIONS)}]}, name="/v1/chat/completions (rag)")
