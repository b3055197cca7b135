"""Serving benchmark: OpenAI chat streaming at several concurrencies against

  kaito-vllm  (a) kaito-serve, vLLM backend
  vllm        (b) vLLM's own OpenAI server, same model and engine flags, no kaito middleware
  kaito-hf    (c) kaito-serve, transformers backend (continuous batching)
  generate    (d) baseline: one request at a time with transformers `generate`, in this process

Each server target is loaded for --duration seconds per concurrency with Locust
(benchmarks/locustfile.py), or, where Locust is not installed (a GPU node without network), with the
same requests from a small asyncio httpx client (--client httpx). Writes CSV, a PNG chart and a markdown summary with the ratios the targets are judged
by: (a)/(b) throughput >= 0.97 and TTFT p50 overhead <= 5 ms; (c) at 16 >= 5x (d) and >= 0.6x (b).

    python benchmarks/serving.py                       # all targets, concurrency 1, 8, 16
    python benchmarks/serving.py --targets kaito-hf,generate --duration 20
    python benchmarks/serving.py --targets kaito-hf,generate --client httpx   # e.g. on a GPU node
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import statistics
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

import procs  # benchmarks/ is on sys.path: scripts run from their folder
from procs import free_port

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MODEL = "smollm2-135m-instruct"
TARGETS = ["kaito-vllm", "vllm", "kaito-hf", "generate"]
# Open-ended prompts, so that nearly every answer runs to max_tokens on every target (the locustfile's too).
PROMPTS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain in detail how a bicycle works, part by part.",
    "Write a long essay about the history of the planet Mars.",
    "Describe, in great detail, a walk through a busy city market.",
]
LABELS = {"kaito-vllm": "(a) kaito-serve vLLM", "vllm": "(b) vLLM server", "kaito-hf": "(c) kaito-serve transformers",
          "generate": "(d) sequential generate"}


class StreamTimer:
    """Time to first token, inter-token gaps and completion tokens of one streamed chat answer, fed its
    server-sent-event lines as they arrive (str or bytes; used by the locustfile and the httpx client)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.gaps: list[float] = []
        self.tokens = 0

    def feed(self, line: str | bytes) -> None:
        if isinstance(line, bytes):
            line = line.decode()
        if not line.startswith("data: ") or line == "data: [DONE]":
            return
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            self.tokens = chunk["usage"]["completion_tokens"]
        if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
            now = time.perf_counter()
            if self.first is None:
                self.first = now
            elif self.last is not None:
                self.gaps.append(now - self.last)
            self.last = now

    def ttft_ms(self) -> float | None:
        return None if self.first is None else (self.first - self.start) * 1000

    def itl_ms(self) -> float | None:
        return sum(self.gaps) / len(self.gaps) * 1000 if self.gaps else None


def server_command(target: str, port: int, empty_dir: Path) -> tuple[list[str], dict[str, str]]:
    base = ["--host", "127.0.0.1", "--port", str(port)]
    serve = [sys.executable, "-m", "kaito.runtime.cli", "--adapters-dir", str(empty_dir), *base]
    if target == "kaito-hf":
        return [*serve, "--backend", "transformers"], {}
    if target == "kaito-vllm":
        return [*serve, "--backend", "vllm"], {}
    # vLLM's own server with exactly the engine flags kaito computes, minus kaito's middleware
    from kaito.presets import get_model, model_folder
    from kaito.runtime.options import ServeOptions
    from kaito.runtime.vllm_backend import MIDDLEWARE, build_command

    opts = ServeOptions(preset=get_model(MODEL), model_path=str(model_folder()), served_model_name=MODEL,
                        backend="vllm", adapters_dir=empty_dir, host="127.0.0.1", port=port)
    cmd = build_command(opts)
    argv = list(cmd.argv)
    while "--middleware" in argv:
        i = argv.index("--middleware")
        if argv[i + 1] == MIDDLEWARE:
            del argv[i:i + 2]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv], cmd.env


def start(target: str, port: int, empty_dir: Path, log: Path) -> subprocess.Popen:
    argv, env = server_command(target, port, empty_dir)
    return procs.start(argv, port, log, env)


def warm_up(port: int) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    for _ in range(3):
        httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=300)


def run_locust(port: int, users: int, duration: int, prefix: Path, max_tokens: int) -> dict[str, float]:
    env = {**os.environ, "KAITO_BENCH_MODEL": MODEL, "KAITO_BENCH_MAX_TOKENS": str(max_tokens)}
    subprocess.run([str(BIN / "locust"), "-f", str(HERE / "locustfile.py"), "--headless", "-u", str(users),
                    "-r", str(users), "-t", f"{duration}s", "--host", f"http://127.0.0.1:{port}", "--csv",
                    str(prefix), "--only-summary", "--stop-timeout", "60"], env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=duration + 180)
    rows = {r["Name"]: r for r in csv.DictReader(open(f"{prefix}_stats.csv"))}
    e2e, ttft, itl = rows.get("e2e", {}), rows.get("ttft", {}), rows.get("itl", {})
    requests = int(e2e.get("Request Count", 0))
    tokens = requests * float(e2e.get("Average Content Size", 0) or 0)
    return {"requests": requests, "failures": int(rows.get("http", {}).get("Failure Count", 0)),
            "out_tok_s": tokens / duration, "ttft_p50_ms": float(ttft.get("50%", "nan") or "nan"),
            "itl_p50_ms": float(itl.get("50%", "nan") or "nan"), "e2e_p50_ms": float(e2e.get("50%", "nan") or "nan")}


def run_httpx(port: int, users: int, duration: int, max_tokens: int) -> dict[str, float]:
    """The locustfile's user, as asyncio tasks: `users` clients sending streaming chat requests back to
    back for `duration` seconds (requests in flight at the end are finished and counted)."""
    ttft, itl, e2e = [], [], []
    counts = {"tokens": 0, "requests": 0, "failures": 0}

    async def user(client: httpx.AsyncClient, n: int, stop_at: float) -> None:
        while time.perf_counter() < stop_at:
            body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            timer = StreamTimer()
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                    if resp.status_code != 200:
                        counts["failures"] += 1
                        await resp.aread()
                        continue
                    async for line in resp.aiter_lines():
                        timer.feed(line)
            except httpx.HTTPError:
                counts["failures"] += 1
                continue
            counts["requests"] += 1
            counts["tokens"] += timer.tokens
            e2e.append((time.perf_counter() - timer.start) * 1000)
            if timer.ttft_ms() is not None:
                ttft.append(timer.ttft_ms())
            if timer.itl_ms() is not None:
                itl.append(timer.itl_ms())

    async def load() -> float:
        limits = httpx.Limits(max_connections=users + 4)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300, limits=limits,
                                     headers={"Authorization": "Bearer none"}) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(user(client, n, t0 + duration) for n in range(users)))
            return time.perf_counter() - t0

    elapsed = asyncio.run(load())
    p50 = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    return {"requests": counts["requests"], "failures": counts["failures"], "out_tok_s": counts["tokens"] / elapsed,
            "ttft_p50_ms": p50(ttft), "itl_p50_ms": p50(itl), "e2e_p50_ms": p50(e2e)}


def run_generate(duration: int, max_tokens: int) -> dict[str, float]:
    """One request at a time with model.generate: the throughput a server without batching gets at any
    concurrency (requests queue behind each other). The model is loaded as the transformers backend
    loads it (same device and dtype choice: bf16 on a GPU, float32 on a CPU without fast bf16)."""
    import torch

    from kaito.presets import TransformersConfig, model_folder
    from kaito.runtime.hf_model import load_model

    tok, model = load_model(str(model_folder()), TransformersConfig())
    print(f"  generate baseline on {model.device} in {model.dtype}", flush=True)

    def inputs(i: int):
        text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                       add_generation_prompt=True, tokenize=False)
        return tok(text, return_tensors="pt", add_special_tokens=False).to(model.device)

    with torch.inference_mode():
        ttfts = []
        for i in range(5):  # time to first token of an idle server: one prefill + one token
            ids = inputs(i)
            t0 = time.perf_counter()
            model.generate(**ids, max_new_tokens=1, do_sample=False)
            ttfts.append((time.perf_counter() - t0) * 1000)
        requests = tokens = 0
        start = time.perf_counter()
        while time.perf_counter() - start < duration:
            ids = inputs(requests)
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
            requests += 1
    elapsed = time.perf_counter() - start
    return {"requests": requests, "failures": 0, "out_tok_s": tokens / elapsed,
            "ttft_p50_ms": statistics.median(ttfts), "itl_p50_ms": float("nan"), "e2e_p50_ms": float("nan")}


def summary(results: list[dict], concurrencies: list[int]) -> str:
    by = {(r["target"], r["concurrency"]): r for r in results}
    lines = ["| target | concurrency | requests | out tok/s | TTFT p50 ms | ITL p50 ms |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {LABELS[r['target']]} | {r['concurrency']} | {r['requests']} | {r['out_tok_s']:.1f} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['itl_p50_ms']:.1f} |")
    lines += ["", "| ratio | " + " | ".join(f"c={c}" for c in concurrencies) + " | target |",
              "|---|" + "---|" * len(concurrencies) + "---|"]

    def ratio(num: str, den: str, key: str = "out_tok_s", diff: bool = False) -> list[str]:
        out = []
        for c in concurrencies:
            a, b = by.get((num, c)), by.get((den, c))
            if not a or not b or not b[key]:
                out.append("-")
            else:
                out.append(f"{a[key] - b[key]:+.1f} ms" if diff else f"{a[key] / b[key]:.2f}")
        return out

    rows = [("(a)/(b) throughput", "kaito-vllm", "vllm", "out_tok_s", False, ">= 0.97"),
            ("(a)-(b) TTFT p50", "kaito-vllm", "vllm", "ttft_p50_ms", True, "<= 5 ms"),
            ("(c)/(d) throughput", "kaito-hf", "generate", "out_tok_s", False, ">= 5 at c=16"),
            ("(c)/(b) throughput", "kaito-hf", "vllm", "out_tok_s", False, ">= 0.6 at c=16")]
    for name, a, b, key, diff, goal in rows:
        lines.append(f"| {name} | " + " | ".join(ratio(a, b, key, diff)) + f" | {goal} |")
    return "\n".join(lines) + "\n"


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for target in dict.fromkeys(r["target"] for r in results):
        rows = [r for r in results if r["target"] == target]
        xs = [r["concurrency"] for r in rows]
        ax1.plot(xs, [r["out_tok_s"] for r in rows], marker="o", label=LABELS[target])
        ax2.plot(xs, [r["ttft_p50_ms"] for r in rows], marker="o", label=LABELS[target])
    ax1.set(xlabel="concurrent requests", ylabel="output tokens/s", title="Throughput")
    ax2.set(xlabel="concurrent requests", ylabel="ms", title="Time to first token (p50)")
    ax1.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--concurrency", default="1,8,16")
    p.add_argument("--duration", type=int, default=30, help="seconds of load per concurrency")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--client", choices=["locust", "httpx"],
                   default="locust" if importlib.util.find_spec("locust") else "httpx",
                   help="load generator (default: locust when installed)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    targets = args.targets.split(",")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets {sorted(unknown)}; choose from {TARGETS}")
    if {"kaito-vllm", "vllm"} & set(targets) and importlib.util.find_spec("vllm") is None:
        p.error("vLLM is not installed in this environment: scripts/setup.sh cpu,bench")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    empty = out / "raw" / "no-adapters"
    empty.mkdir(exist_ok=True)
    results = []
    for target in targets:
        if target == "generate":
            print(f"{LABELS[target]}: {args.duration} s of sequential requests", flush=True)
            r = run_generate(args.duration, args.max_tokens)
            results += [{"target": target, "concurrency": c, **r} for c in concurrencies]
            continue
        port = free_port()
        print(f"{LABELS[target]}: starting", flush=True)
        proc = start(target, port, empty, out / "raw" / f"{target}.log")
        try:
            warm_up(port)
            for c in concurrencies:
                if args.client == "locust":
                    r = run_locust(port, c, args.duration, out / "raw" / f"{target}-c{c}", args.max_tokens)
                else:
                    r = run_httpx(port, c, args.duration, args.max_tokens)
                print(f"  c={c}: {r['out_tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms, "
                      f"{r['requests']} requests, {r['failures']} failures", flush=True)
                results.append({"target": target, "concurrency": c, **r})
        finally:
            procs.stop(proc)
    with open(out / "serving.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    chart(results, out / "serving.png")
    md = summary(results, concurrencies)
    (out / "serving.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
