"""Reconcile throughput and latency of `kaito-operator run` against the Kubernetes API fake
(tests/kube_fake.py), for N Workspaces created at once.

    .venv/bin/python benchmarks/operator_reconcile.py                  # 200 and 1,000 Workspaces
    .venv/bin/python benchmarks/operator_reconcile.py --counts 200

For each N: the operator (a separate process, as in a cluster) runs against a fresh fake; N inference
Workspaces (phi-4 on one A100 node) are created by 4 client threads; a Workspace is done when all its
objects exist (NodeClaim, Service, headless Service, StatefulSet). Reported: Workspaces/s (N over the
time from the first create to the last object) and p50/p99 of each Workspace's time from its create
to its last object. The baseline, run in the same script against a fresh fake: the same 4 client
threads render each Workspace themselves (the same render()) and create its objects: the floor the
API and the rendering set, with no controller. Writes benchmarks/results/operator_reconcile.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from kube_fake import KubeFake
from kube_sim import Cluster, inference
from rich.progress import Progress

OUT = REPO / "benchmarks" / "results"


def done_times(fake: KubeFake, names: list[str]) -> dict[str, float]:
    """Workspace name -> when its last object appeared (absent until all are there)."""
    def collect() -> dict[str, float]:
        by_ws: dict[str, list[float]] = {}
        for key, obj in fake.objects.items():
            labels = obj["metadata"].get("labels") or {}
            if key[0] in ("karpenter.sh/nodeclaims", "/services", "apps/statefulsets") and "kaito.sh/workspace" in labels:
                by_ws.setdefault(labels["kaito.sh/workspace"], []).append(fake.created_at[key])
        return {n: max(ts) for n, ts in by_ws.items() if len(ts) == 4}
    return fake.call(collect)


def run_once(n: int, mode: str, progress: Progress) -> dict:
    fake = KubeFake().start()
    cluster = Cluster(fake.url)
    cluster.install_crds()
    op = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if mode == "operator":
                with open(Path(tmp) / "operator.log", "w") as log:  # the child keeps its own descriptor
                    op = subprocess.Popen([str(Path(sys.executable).parent / "kaito-operator"), "run", "--resync",
                                           "600"], env={**os.environ, "KUBECONFIG": fake.kubeconfig(Path(tmp) / "kc")},
                                          stdout=log, stderr=subprocess.STDOUT)
                cluster.create(inference("warm-up"))  # started and watching before the clock starts
                t0 = time.monotonic()
                while "warm-up" not in done_times(fake, ["warm-up"]):
                    if time.monotonic() - t0 > 120:
                        raise TimeoutError("the operator did not start")
                    time.sleep(0.2)
            names = [f"bench-{i:04d}" for i in range(n)]
            task = progress.add_task(f"{mode} {n}", total=n)

            def make(name: str) -> None:
                doc = inference(name)
                if mode == "operator":
                    cluster.create(doc)
                else:  # baseline: the client renders and creates the objects itself
                    from kaito.operator.manifests import parse
                    from kaito.operator.render import render

                    made = cluster.create(doc)
                    res = parse({k: v for k, v in made.items() if k != "status"})
                    for obj in render(res):
                        cluster.create(obj)

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(make, names))
            deadline = time.monotonic() + 600
            while True:
                done = done_times(fake, names)
                progress.update(task, completed=len([x for x in names if x in done]))
                if all(x in done for x in names) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            created = {x: fake.created_at[("kaito.sh/workspaces", "default", x)] for x in names}
            missing = [x for x in names if x not in done]
            if missing:
                raise TimeoutError(f"{len(missing)} Workspaces incomplete after 600 s")
            lat = sorted(done[x] - created[x] for x in names)
            span = max(done.values()) - min(created.values())
            return {"mode": mode, "workspaces": n, "seconds": round(span, 2), "workspaces_per_s": round(n / span, 1),
                    "p50_s": round(statistics.median(lat), 3), "p99_s": round(lat[int(0.99 * (n - 1))], 3),
                    "api_requests": fake.requests}
        finally:
            if op:
                op.kill()
                op.wait()
            fake.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs="+", default=[200, 1000])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    out = args.out
    rows = []
    with Progress() as progress:
        for n in args.counts:
            base = run_once(n, "baseline", progress)
            oper = run_once(n, "operator", progress)
            oper["ratio_to_baseline"] = round(oper["workspaces_per_s"] / base["workspaces_per_s"], 3)
            rows += [base, oper]
    out.mkdir(parents=True, exist_ok=True)
    fields = ["mode", "workspaces", "seconds", "workspaces_per_s", "p50_s", "p99_s", "api_requests",
              "ratio_to_baseline"]
    with open(out / "operator_reconcile.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)
    lines = ["| mode | Workspaces | s | Workspaces/s | p50 s | p99 s | API requests | operator / baseline |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['workspaces']} | {r['seconds']} | {r['workspaces_per_s']} | {r['p50_s']} | "
              f"{r['p99_s']} | {r['api_requests']} | {r.get('ratio_to_baseline', '')} |" for r in rows]
    (out / "operator_reconcile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for mode in ("baseline", "operator"):
            sel = [r for r in rows if r["mode"] == mode]
            ax.plot([r["workspaces"] for r in sel], [r["workspaces_per_s"] for r in sel], marker="o", label=mode)
        ax.set_xlabel("Workspaces created at once")
        ax.set_ylabel("Workspaces/s")
        ax.set_title("kaito-operator reconcile throughput (API fake, 2 cores)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "operator_reconcile.png", dpi=120)
    except ImportError:
        print("matplotlib not installed (the bench extra): no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
