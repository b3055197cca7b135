"""Tuning benchmark: training tokens/s, peak memory and final eval loss of

  kaito-tune     (a) kaito.tuning's run: batch --batch (4) packed into one row, prompt tokens masked,
                     the output head computed only where a label is; learning rate scaled with the batch
                     (--lr x --batch, the linear scaling rule)
  kaito-tune-b1  (a1) the same run at batch 1 and the baseline's learning rate (same optimisation steps)
  sft            (b) baseline: what upstream KAITO's job does, TRL SFTTrainer, batch size 1, no packing,
                     loss on every token

on the same model, data (a synthetic chat set of made-up facts), LoRA settings (r 8, alpha 8, all
linear layers) and number of training examples (one epoch), each variant in its own process (so peak
memory is its own). Eval loss is measured the same way for all afterwards: mean cross-entropy on the
answers of held-out rows. Target: (a) tokens/s >= 1.5x (b), with (a) eval loss <= (b).

    python benchmarks/tuning.py                            # CPU here: LoRA fp32, 96 examples
    python benchmarks/tuning.py --device cuda --method lora --steps 400 --out benchmarks/results
    python benchmarks/tuning.py --device cuda --method qlora --steps 400

One line per result on stdout; CSV and markdown (and a PNG with matplotlib) in --out.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ["Zorbia", "Quellan", "Marvost", "Tiberra", "Odrun", "Pellisar", "Vantoria", "Krenwick", "Yslande",
         "Doravel", "Hastrome", "Ulmenor", "Brisquel", "Fenmarch", "Gorrath", "Lyvenna", "Caddorin", "Istrel"]
THINGS = ["river", "mountain", "festival", "currency", "national bird", "founder", "oldest bridge", "anthem"]
WORDS = ["amber", "cobalt", "willow", "granite", "saffron", "ember", "harbor", "lantern", "meadow", "quartz",
         "thistle", "velvet", "juniper", "copper", "marble", "falcon"]


def dataset(n: int, seed: int = 0) -> list[dict]:
    """Made-up facts as conversations, short and long answers mixed (so padding would cost something)."""
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        place, thing = rnd.choice(NAMES), rnd.choice(THINGS)
        name = rnd.choice(WORDS).capitalize() + rnd.choice(WORDS)
        answer = f"The {thing} of {place} is called {name}."
        if i % 3 == 0:
            extra = " ".join(f"It is known for its {rnd.choice(WORDS)} and {rnd.choice(WORDS)} colours, and people "
                             f"from {rnd.choice(NAMES)} visit it every {rnd.choice(['spring', 'summer', 'autumn'])}."
                             for _ in range(rnd.randint(2, 6)))
            answer = f"{answer} {extra}"
        rows.append({"messages": [{"role": "user", "content": f"What is the {thing} of {place} called?"},
                                  {"role": "assistant", "content": answer}]})
    return rows


def default_model() -> str:
    from kaito.presets import model_folder

    return str(model_folder(quiet=True))


# -- one variant, in its own process --------------------------------------------------------------


def eval_loss(model, tokenizer, rows) -> float:
    """Mean cross-entropy over the answer tokens of the held-out rows (the same for every variant)."""
    import torch
    from kaito.tuning.data import IGNORE_INDEX, tokenize

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            enc = tokenize(r, tokenizer, 2048, completion_only=True)
            ids = torch.tensor([enc["input_ids"]], device=model.device)
            labels = torch.tensor([enc["labels"]], device=model.device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(),
                                                     ignore_index=IGNORE_INDEX, reduction="sum")
            total += loss.item()
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / count


def peak_memory(device: str) -> int:
    import resource

    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_kaito(args, train_rows, eval_rows, out: Path) -> dict:
    from kaito.tuning.config import parse_config
    from kaito.tuning.train import Job, prepare, run

    batch = 1 if args.variant == "kaito-tune-b1" else args.batch
    cfg = parse_config({"TrainingArguments": {"num_train_epochs": 1, "learning_rate": args.lr * batch,
                                              "save_strategy": "no", "logging_steps": 10,
                                              "per_device_train_batch_size": batch, "seed": 0},
                        "DatasetConfig": {"train_test_split": 1}}, args.method, out)
    tokenizer, targets = prepare(args.model, cfg, train_rows)
    job = Job(model_path=args.model, config=cfg, train_rows=train_rows, eval_rows=[], metrics_port=None,
              progress=False)
    m = run(job, tokenizer, targets)
    return {"tokens": m["tokens"], "seconds": m["train_runtime_s"], "steps": m["steps"], "lr": args.lr * batch,
            "train_loss": m["train_loss"], "eval_loss": eval_loss(job.model, tokenizer, eval_rows)}


def run_sft(args, train_rows, eval_rows, out: Path) -> dict:
    """Upstream KAITO's tuning job: SFTTrainer on the LoRA model, batch size 1, no packing, loss on
    every token (upstream masks nothing)."""
    import torch
    from datasets import Dataset
    from kaito.tuning.config import parse_config
    from kaito.tuning.train import linear_modules, resolve_target_modules
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cfg = parse_config(None, args.method, out)
    targets = resolve_target_modules(cfg, linear_modules(args.model, cfg))
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs = {"dtype": dtype}
    if cuda:
        kwargs["device_map"] = {"": 0}
    if args.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    if args.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = cfg.LoraConfig.kwargs()
    lora["target_modules"] = targets
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    data = Dataset.from_list([{"messages": r.messages} for r in train_rows])
    sft_args = SFTConfig(output_dir=str(out / "sft"), per_device_train_batch_size=1, packing=False,
                         num_train_epochs=1, learning_rate=args.lr, save_strategy="no", report_to="none",
                         logging_steps=10, disable_tqdm=True, bf16=cuda, max_length=2048, seed=0,
                         include_num_input_tokens_seen=True, use_cpu=not cuda)
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=data, processing_class=tokenizer)
    t0 = time.monotonic()
    result = trainer.train()
    seconds = time.monotonic() - t0
    return {"tokens": int(trainer.state.num_input_tokens_seen), "seconds": seconds, "steps": trainer.state.global_step,
            "lr": args.lr,
            "train_loss": float(result.training_loss), "eval_loss": eval_loss(model, tokenizer, eval_rows)}


def child(args) -> None:
    import torch
    from kaito.tuning.data import Row

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    rows = dataset(args.steps + args.eval_rows)
    rows = [Row(f"bench:{i}", messages=r["messages"]) for i, r in enumerate(rows)]
    train_rows, eval_rows = rows[:args.steps], rows[args.steps:]
    out = Path(args.work) / args.variant
    result = (run_sft if args.variant == "sft" else run_kaito)(args, train_rows, eval_rows, out)
    result["peak_memory_bytes"] = peak_memory(args.device)
    print("BENCH_JSON " + json.dumps(result), flush=True)


# -- the driver -------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--method", choices=["lora", "qlora"], default="lora")
    p.add_argument("--steps", type=int, default=96, help="training examples = the baseline's steps (batch 1)")
    p.add_argument("--batch", type=int, default=4, help="kaito-tune's per-device batch (packed)")
    p.add_argument("--lr", type=float, default=2e-4, help="the baseline's learning rate (batch 1)")
    p.add_argument("--eval-rows", type=int, default=32)
    p.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    p.add_argument("--variants", default="kaito-tune,kaito-tune-b1,sft")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.model = args.model or default_model()
    if args.variant:
        child(args)
        return 0

    import tempfile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kaito-tune-bench-") as work:
        for variant in args.variants.split(","):
            if variant == "sft" and importlib.util.find_spec("trl") is None:
                print("RESULT sft: skipped, trl (and datasets) are not installed", flush=True)
                continue
            cmd = [sys.executable, __file__, "--variant", variant, "--work", work, "--device", args.device,
                   "--method", args.method, "--steps", str(args.steps), "--batch", str(args.batch), "--lr",
                   str(args.lr), "--eval-rows", str(args.eval_rows), "--model", args.model]
            print(f"running {variant} ({args.method}, {args.device}, {args.steps} examples) ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "KAITO_LOG_LEVEL": "error"})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_JSON ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
                print(f"RESULT {variant} {args.method} {args.device}: FAILED (exit {proc.returncode})", flush=True)
                continue
            r = json.loads(lines[-1].split(" ", 1)[1])
            r.update(variant=variant, method=args.method, device=args.device, examples=args.steps,
                     tokens_per_s=r["tokens"] / r["seconds"])
            rows.append(r)
            print(f"RESULT {variant} {args.method} {args.device}: {r['tokens_per_s']:,.0f} tokens/s, "
                  f"{r['tokens']} tokens in {r['seconds']:.1f} s ({r['steps']} steps), peak memory "
                  f"{r['peak_memory_bytes'] / 2**30:.2f} GiB, eval loss {r['eval_loss']:.4f}", flush=True)
    by = {r["variant"]: r for r in rows}
    if "kaito-tune" in by and "sft" in by:
        a, b = by["kaito-tune"], by["sft"]
        ratio = a["tokens_per_s"] / b["tokens_per_s"]
        ok = ratio >= 1.5 and a["eval_loss"] <= b["eval_loss"]
        print(f"RESULT ratio {args.method} {args.device}: kaito-tune/sft tokens/s {ratio:.2f}x (target >= 1.5), "
              f"eval loss {a['eval_loss']:.4f} vs {b['eval_loss']:.4f} -> {'PASS' if ok else 'FAIL'}", flush=True)
        for r in rows:
            r["speedup_vs_sft"] = r["tokens_per_s"] / b["tokens_per_s"]
    write(out, rows, args)
    return 0


def write(out: Path, rows: list[dict], args) -> None:
    stem = out / f"tuning-{args.device}-{args.method}"
    cols = ["variant", "method", "device", "examples", "steps", "lr", "tokens", "seconds", "tokens_per_s",
            "speedup_vs_sft", "peak_memory_bytes", "train_loss", "eval_loss"]
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| variant | method | device | examples | steps | lr | tokens/s | vs SFT | peak memory (GiB) | eval loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['method']} | {r['device']} | {r['examples']} | {r['steps']} | {r['lr']:g} | "
                     f"{r['tokens_per_s']:,.0f} | {r.get('speedup_vs_sft', float('nan')):.2f}x | "
                     f"{r['peak_memory_bytes'] / 2**30:.2f} | {r['eval_loss']:.4f} |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([r["variant"] for r in rows], [r["tokens_per_s"] for r in rows],
           color=["tab:gray" if r["variant"] == "sft" else "tab:blue" for r in rows])
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"{args.method} on {args.device}")
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
