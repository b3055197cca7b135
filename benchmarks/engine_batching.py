"""Throughput of the transformers backend's engine (runtime/hf_engine.py) against one-request-at-a-time
`model.generate`, in one process on the same model object.

    .venv/bin/python benchmarks/engine_batching.py                 # the embedded default model
    .venv/bin/python benchmarks/engine_batching.py --model PATH --tokens 64 --concurrency 1 8 16

Greedy decoding, short chat prompts asking for long answers, up to --tokens new tokens a request (a
request also ends at EOS; tokens/s counts the tokens actually generated, and the table says how many
requests ended early). Prints tokens/s for each run and the ratios to
the baseline. When the engine computes in another dtype than the checkpoint's (bf16 on a CPU
without fast bf16 matmul runs in float32), the baseline is measured in both dtypes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import typing

from kaito.presets import TransformersConfig

PROMPTS = [  # short prompts with long answers, so that each request generates all its tokens
    "Write a short story about a dragon.",
    "Explain how photosynthesis works.",
    "Describe the history of Rome.",
    "Write a poem about the sea.",
    "Explain how a car engine works.",
    "Tell me a story about a brave knight.",
    "Describe how to bake bread, step by step.",
    "Explain the water cycle.",
    "Write a letter to a friend about a holiday.",
    "Describe the solar system.",
    "Explain how computers store data.",
    "Write a story about a cat who learns to fly.",
    "Describe a walk through a forest in autumn.",
    "Explain why exercise is good for health.",
    "Describe how a bill becomes a law.",
    "Write a speech for a school graduation.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: the embedded default model)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--baseline-requests", type=int, default=4, help="requests the baseline runs one at a time")
    dtypes, devices = (typing.get_args(TransformersConfig.model_fields[k].annotation) for k in ("dtype", "device"))
    ap.add_argument("--dtype", default="bfloat16", choices=dtypes)
    ap.add_argument("--device", default="auto", choices=devices)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table keeps each run's best")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from kaito.runtime.engine_api import SamplingParams
    from kaito.runtime.hf_engine import HFEngine
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model is None:
        from kaito.presets import model_folder

        args.model = str(model_folder(quiet=True))
    engine = HFEngine(args.model, TransformersConfig(dtype=args.dtype, device=args.device,
                                                     max_batch_size=max(args.concurrency)))
    tok = engine.tokenizer

    def chat(q: str) -> list[int]:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    prompts = [chat(q) for q in PROMPTS]
    while len(prompts) < max(args.concurrency):
        prompts += prompts
    params = SamplingParams(max_tokens=args.tokens, temperature=0)

    # ---------------------------------------------------------------- baseline: generate, one at a time
    def baseline(model) -> tuple[float, int, int]:
        dev = model.get_input_embeddings().weight.device
        with torch.inference_mode():
            n, t0 = 0, time.perf_counter()
            for p in prompts[: args.baseline_requests]:
                out = model.generate(torch.tensor([p], device=dev), attention_mask=torch.ones(1, len(p), device=dev,
                                     dtype=torch.long), max_new_tokens=args.tokens, do_sample=False)
                n += out.shape[1] - len(p)
            return n / (time.perf_counter() - t0), n, args.baseline_requests

    # ---------------------------------------------------------------- the engine
    async def one(p: list[int]) -> int:
        n = 0
        async for _ in engine.generate(p, params):
            n += 1
        return n

    async def engine_run(c: int) -> tuple[float, int, int]:
        t0 = time.perf_counter()
        if c == 1:  # the engine serving requests one after another
            n, reqs = 0, args.baseline_requests
            for p in prompts[:reqs]:
                n += await one(p)
        else:
            n, reqs = sum(await asyncio.gather(*(one(p) for p in prompts[:c]))), c
        return n / (time.perf_counter() - t0), n, reqs

    # ---------------------------------------------------------------- rounds, interleaved
    # On a shared machine other processes come and go: every configuration runs once a round, the
    # rounds interleave them, and the table keeps each one's best round (and says the median).
    base_name = f"generate, one at a time ({str(engine.dtype).removeprefix('torch.')})"
    runs: dict[str, list[tuple[float, int, int]]] = {base_name: []}
    requested = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    other = None
    if requested is not None and requested != engine.dtype:
        other = AutoModelForCausalLM.from_pretrained(args.model, dtype=requested).eval()
        runs[f"generate, one at a time ({args.dtype})"] = []
    for c in args.concurrency:
        runs[f"engine, {c} concurrent"] = []

    async def rounds() -> None:
        await engine.start()
        await one(prompts[0])  # warm-up
        with torch.inference_mode():
            engine.model.generate(torch.tensor([prompts[0]], device=engine.device), max_new_tokens=4, do_sample=False)
        for r in range(args.rounds):
            runs[base_name].append(baseline(engine.model))
            if other is not None and r == 0:  # slow: once
                runs[f"generate, one at a time ({args.dtype})"].append(baseline(other))
            for c in args.concurrency:
                runs[f"engine, {c} concurrent"].append(await engine_run(c))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f}" for k, v in runs.items() if len(v) > r),
                  flush=True)
        await engine.stop()

    asyncio.run(rounds())

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model {args.model}; engine dtype {engine.dtype}, device {engine.device}; {args.tokens} new tokens, greedy; "
          f"torch threads {torch.get_num_threads()}; {args.rounds} rounds; load average now {load:.1f}")
    best = {k: max(v) for k, v in runs.items()}
    base = best[base_name][0]
    print(f"{'run (best round)':44} {'tok/s':>7} {'median':>7} {'ratio':>6} {'tokens':>7} {'requests':>8}")
    for name, (tps, n, reqs) in best.items():
        med = statistics.median(t for t, _, _ in runs[name])
        print(f"{name:44} {tps:7.1f} {med:7.1f} {tps / base:6.2f} {n:7d} {reqs:8d}")
    for c in args.concurrency:
        for name, (tps, _, _) in best.items():
            if name.startswith("generate"):
                print(f"engine at {c:2d} concurrent / {name}: {best[f'engine, {c} concurrent'][0] / tps:.2f}x")

if __name__ == "__main__":
    main()
