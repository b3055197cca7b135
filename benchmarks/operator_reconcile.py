"""Reconcile throughput and latency of `kaito-operator run` against the Kubernetes API fake
(tests/kube_fake.py), for N Workspaces created at once; the API requests a resync of settled
Workspaces makes; the operator's memory with many Workspaces.

    .venv/bin/python benchmarks/operator_reconcile.py                  # 200, 1,000, 5,000; resync; RSS at 10,000
    .venv/bin/python benchmarks/operator_reconcile.py --counts 200 --resync-at 0 --rss-at 0

For each N: the operator (a separate process, as in a cluster) runs against a fresh fake; N inference
Workspaces (phi-4 on one A100 node) are created by 4 client threads; a Workspace is done when all its
objects exist (NodeClaim, Service, headless Service, StatefulSet). Reported: Workspaces/s (N over the
time from the first create to the last object), p50/p99 of each Workspace's time from its create to its
last object, and the API requests once the operator has settled (every Workspace has its status and
nothing is written for a second), the clients' creates included. The baseline, run in the same script
against a fresh fake: the same 4 client threads render each Workspace themselves (the same render())
and create its objects: the floor the API and the rendering set, with no controller.

Resync (`--resync-at N`): in the operator run of that N, with `--resync R`, the requests and writes
(resourceVersions) over 1.25 R once settled: every Workspace is reconciled once more in that window
(the reconcile counter says how many were). RSS (`--rss-at N`): the operator's resident memory once N
Workspaces have settled, and its peak.

The fake runs in the same process as the client threads, on the same cores as the operator: its work is
part of both measurements. Writes benchmarks/results/operator_reconcile.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import free_port
from kube_fake import KubeFake
from kube_sim import Cluster, inference
from rich.progress import Progress

OUT = REPO / "benchmarks" / "results"
KINDS = ("karpenter.sh/nodeclaims", "/services", "apps/statefulsets")


def done_times(fake: KubeFake, names: list[str]) -> dict[str, float]:
    """Workspace name -> when its last object appeared (absent until all are there)."""
    def collect() -> dict[str, float]:
        by_ws: dict[str, list[float]] = {}
        for key, obj in fake.objects.items():
            labels = obj["metadata"].get("labels") or {}
            if key[0] in KINDS and "kaito.sh/workspace" in labels:
                by_ws.setdefault(labels["kaito.sh/workspace"], []).append(fake.created_at[key])
        return {n: max(ts) for n, ts in by_ws.items() if len(ts) == 4}
    return fake.call(collect)


def settle(fake: KubeFake, quiet: float = 1.0, timeout: float = 600) -> None:
    """Until every Workspace has a status and nothing was written for `quiet` seconds."""
    def pending() -> int:
        return sum(1 for (kk, _, _), o in fake.objects.items() if kk == "kaito.sh/workspaces" and not o.get("status"))
    deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        rv = fake.rv
        if rv != last:
            last, since = rv, time.monotonic()
        elif time.monotonic() - since >= quiet and fake.call(pending) == 0:
            return
        time.sleep(0.2)
    raise TimeoutError("the operator did not settle")


def reconciles(port: int) -> float:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r'^kaito_operator_reconciles_total\{[^}]*\} (\S+)', text, re.M))


def rss_mib(pid: int) -> tuple[float, float]:
    """(resident, peak resident) MiB of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    kib = {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M)}
    return round(kib["VmRSS"] / 1024, 1), round(kib["VmHWM"] / 1024, 1)


def run_once(n: int, mode: str, progress: Progress, resync: float = 0, rss: bool = False) -> dict:
    fake = KubeFake().start()
    cluster = Cluster(fake.url)
    cluster.install_crds()
    op, metrics = None, free_port()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if mode == "operator":
                with open(Path(tmp) / "operator.log", "w") as log:  # the child keeps its own descriptor
                    op = subprocess.Popen([str(Path(sys.executable).parent / "kaito-operator"), "run", "--resync",
                                           str(resync or 600), "--metrics-port", str(metrics)],
                                          env={**os.environ, "KUBECONFIG": fake.kubeconfig(Path(tmp) / "kc")},
                                          stdout=log, stderr=subprocess.STDOUT)
                cluster.create(inference("warm-up"))  # started and watching before the clock starts
                t0 = time.monotonic()
                while "warm-up" not in done_times(fake, ["warm-up"]):
                    if time.monotonic() - t0 > 120:
                        raise TimeoutError("the operator did not start")
                    time.sleep(0.2)
                settle(fake)
            start_requests = fake.requests
            names = [f"bench-{i:05d}" for i in range(n)]
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
            deadline = time.monotonic() + 1200
            while True:
                done = done_times(fake, names)
                progress.update(task, completed=len([x for x in names if x in done]))
                if all(x in done for x in names) or time.monotonic() > deadline:
                    break
                time.sleep(1)  # a look scans every object (on the fake's loop); the times are the fake's own
            created = {x: fake.created_at[("kaito.sh/workspaces", "default", x)] for x in names}
            missing = [x for x in names if x not in done]
            if missing:
                raise TimeoutError(f"{len(missing)} Workspaces incomplete after 1200 s")
            lat = sorted(done[x] - created[x] for x in names)
            span = max(done.values()) - min(created.values())
            if op:
                settle(fake)
            requests = fake.requests - start_requests
            row = {"mode": mode, "workspaces": n, "seconds": round(span, 2), "workspaces_per_s": round(n / span, 1),
                   "p50_s": round(statistics.median(lat), 3), "p99_s": round(lat[int(0.99 * (n - 1))], 3),
                   "api_requests": requests, "requests_per_workspace": round(requests / n, 2)}
            if op and resync:
                before, rv, count = fake.requests, fake.rv, reconciles(metrics)
                time.sleep(resync * 1.25)
                row |= {"resync_s": resync, "resync_requests": fake.requests - before, "resync_writes": fake.rv - rv,
                        "resync_reconciles": int(reconciles(metrics) - count)}
            if op and rss:
                row["rss_mib"], row["rss_peak_mib"] = rss_mib(op.pid)
            return row
        finally:
            if op:
                op.kill()
                op.wait()
            fake.stop()


def counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def plot(rows: list[dict], out: Path) -> None:
    """Throughput by count, baseline and operator, as operator_reconcile.png in `out`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for mode in ("baseline", "operator"):
            sel = [r for r in rows if r["mode"] == mode and "rss_mib" not in r]
            ax.plot([r["workspaces"] for r in sel], [r["workspaces_per_s"] for r in sel], marker="o", label=mode)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("Workspaces created at once")
        ax.set_ylabel("Workspaces/s")
        ax.set_title("kaito-operator reconcile throughput (API fake, 2 cores)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "operator_reconcile.png", dpi=120)
    except ImportError:
        print("matplotlib not installed (the bench extra): no plot", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=counts, nargs="+", default=[[200, 1000, 5000]],
                   help="Workspaces created at once, e.g. 200,1000,5000 or 200 1000")
    p.add_argument("--resync-at", type=int, default=1000, help="measure a resync in the operator run of this count")
    p.add_argument("--resync", type=float, default=20, help="the operator's --resync in that run (seconds)")
    p.add_argument("--rss-at", type=int, default=10000, help="the operator's memory with this many Workspaces (0: no)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    out = args.out
    rows = []
    with Progress() as progress:
        for n in [n for group in args.counts for n in group]:
            base = run_once(n, "baseline", progress)
            oper = run_once(n, "operator", progress, resync=args.resync if n == args.resync_at else 0)
            oper["ratio_to_baseline"] = round(oper["workspaces_per_s"] / base["workspaces_per_s"], 3)
            oper["requests_to_baseline"] = round(oper["api_requests"] / base["api_requests"], 3)
            rows += [base, oper]
        if args.rss_at:
            rows.append(run_once(args.rss_at, "operator", progress, rss=True))
    out.mkdir(parents=True, exist_ok=True)
    fields = ["mode", "workspaces", "seconds", "workspaces_per_s", "p50_s", "p99_s", "api_requests",
              "requests_per_workspace", "ratio_to_baseline", "requests_to_baseline", "resync_s", "resync_requests",
              "resync_writes", "resync_reconciles", "rss_mib", "rss_peak_mib"]
    with open(out / "operator_reconcile.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)
    lines = ["| mode | Workspaces | s | Workspaces/s | p50 s | p99 s | API requests | per Workspace | "
             "operator / baseline (throughput, requests) |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['workspaces']} | {r['seconds']} | {r['workspaces_per_s']} | {r['p50_s']} | "
              f"{r['p99_s']} | {r['api_requests']} | {r['requests_per_workspace']} | "
              + (f"{r['ratio_to_baseline']}, {r['requests_to_baseline']}" if "ratio_to_baseline" in r else "") + " |"
              for r in rows]
    for r in rows:
        if "resync_requests" in r:
            lines.append(f"\nResync of {r['workspaces']} settled Workspaces (--resync {r['resync_s']:g}, over "
                         f"{r['resync_s'] * 1.25:g} s): {r['resync_reconciles']} reconciles, {r['resync_requests']} "
                         f"API requests, {r['resync_writes']} writes.")
        if "rss_mib" in r:
            lines.append(f"\nOperator memory with {r['workspaces']} settled Workspaces: RSS {r['rss_mib']} MiB "
                         f"(peak {r['rss_peak_mib']} MiB).")
    (out / "operator_reconcile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, out)


if __name__ == "__main__":
    main()
