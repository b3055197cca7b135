"""Every component's benchmark in one command, each against its baseline in the same run, and one
summary of the ratios:

  serving    benchmarks/serving.py             kaito-serve (vLLM, transformers) vs vLLM's server and generate
  rag        benchmarks/rag_bench.py           kaito-rag vs plain LlamaIndex + FAISS + sentence-transformers
  tuning     benchmarks/tuning.py              kaito-tune vs TRL SFTTrainer (batch 1, no packing)
  operator   benchmarks/operator_reconcile.py  kaito-operator vs render-and-create with no controller

    python benchmarks/run_all.py                    # all four, sized to finish in about 15 minutes on 2 cores
    python benchmarks/run_all.py --only rag,tuning  # a subset
    python benchmarks/run_all.py --full             # the sizes the targets are judged at (about an hour here)

On a GPU node the same command measures there (serving: vLLM on CUDA; tuning: CUDA, LoRA; add
`--tuning-method qlora` for QLoRA). Each benchmark writes its CSV, PNG and markdown into --out
(default benchmarks/results/); this script adds summary.md: every table, the machine, the commands.
Needs the extras of what it runs (scripts/setup.sh cpu,dev,tune,operator,rag,bench).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name: (quick arguments, full arguments, markdown file(s) the benchmark writes)
SUITES: dict[str, tuple[list[str], list[str], list[str]]] = {
    "serving": (["serving.py", "--duration", "15"], ["serving.py", "--duration", "30"], ["serving.md"]),
    "rag": (["rag_bench.py", "--chunks", "3000", "--baseline-chunks", "600", "--queries", "150"],
            ["rag_bench.py"], ["rag.md"]),
    "tuning": (["tuning.py", "--steps", "48", "--eval-rows", "16"], ["tuning.py"], ["tuning-*-*.md"]),
    "operator": (["operator_reconcile.py", "--counts", "200"], ["operator_reconcile.py"], ["operator_reconcile.md"]),
}


def machine() -> str:
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, Python {platform.python_version()}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {', '.join(SUITES)}")
    p.add_argument("--full", action="store_true", help="the full sizes instead of the 15-minute ones")
    p.add_argument("--tuning-method", choices=["lora", "qlora"], default="lora")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SUITES))
    if unknown:
        p.error(f"unknown benchmarks {unknown}; choose from {', '.join(SUITES)}")
    args.out.mkdir(parents=True, exist_ok=True)

    sections, failed = [], []
    for name in chosen:
        quick, full, outputs = SUITES[name]
        script, *options = full if args.full else quick
        if name == "tuning":
            options += ["--method", args.tuning_method]
        shown = " ".join(["python", f"benchmarks/{script}", *options])
        cmd = [sys.executable, str(HERE / script), *options, "--out", str(args.out)]
        print(f"== {name}: {shown}", flush=True)
        started_at, t0 = time.time(), time.monotonic()
        rc = subprocess.run(cmd).returncode
        minutes = (time.monotonic() - t0) / 60
        print(f"== {name}: exit {rc} after {minutes:.1f} min", flush=True)
        tables = [f for pattern in outputs for f in sorted(args.out.glob(pattern)) if f.stat().st_mtime >= started_at]
        body = "\n\n".join(f.read_text().strip() for f in tables) or "(no table written)"
        if rc != 0:
            failed.append(name)
            body = f"**failed (exit {rc})**\n\n{body}"
        sections.append(f"## {name}\n\n`{shown}` ({minutes:.1f} min)\n\n{body}\n")

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"# Benchmark summary\n\n{stamp}; {machine()}; {'full' if args.full else 'quick'} sizes. "
              "Each table compares kaito with its baseline measured in the same run.\n")
    (args.out / "summary.md").write_text("\n".join([header, *sections]))
    print(f"wrote {args.out / 'summary.md'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
