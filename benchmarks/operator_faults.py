"""`kaito-operator run` under API faults against the Kubernetes API fake (tests/kube_fake.py, its `Faults`),
with the fault-free run as its baseline in the same script:

    .venv/bin/python benchmarks/operator_faults.py              # 200 Workspaces (+ 20 RAGEngines)
    .venv/bin/python benchmarks/operator_faults.py --workspaces 50

Each run (tests/kube_faults.py `scenario`) starts two operators, each against a fresh fake, with the faults
injected before they start: one provisions nodes (inference, tuning and multi-node Workspaces, RAGEngines),
one brings its own (`--no-auto-provision`); the Workspaces (one in ten tuning, multi-node and
bring-your-own-nodes each, the rest inference) and one RAGEngine per ten are created at once, and the script
plays Karpenter, the kubelet and the workload controllers until each is at its end state (every condition
True for its generation, Ready or Succeeded, the Event of its success once, each NodeClaim and workload
once); then 3 s of quiet (nothing written) and all of them are deleted until nothing is left of them.

The faults: 5% of the operators' requests answered 500, 5% of their writes that name a resourceVersion
answered 409, their watches closed every 20 s (`--gone-rate`: the fraction of resumed watches answered 410;
0 by default). Reported per run: seconds to the end state and to deleted, the operators' API requests
(from their start to the last deletion, each retry one more), the faults injected, and the retries (a
request answered 500 or 429 sent again: their number and delays); and the ratios faulty / fault-free.
Writes benchmarks/results/operator_faults.{csv,md}.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from kube_fake import Faults  # noqa: E402 - from tests/
from kube_faults import FAULTS, scenario  # noqa: E402

OUT = REPO / "benchmarks" / "results"


def row(mode: str, n: int, run) -> dict:
    d = sorted(run.retries)
    return {"mode": mode, "workspaces": n, "ready_s": round(run.ready_s, 1), "deleted_s": round(run.deleted_s, 1),
            "api_requests": run.requests, "per_workspace": round(run.requests / n, 1),
            "injected": " ".join(f"{k}:{v}" for k, v in sorted(run.injected.items())) or "-",
            "retries": len(d), "retry_p50_s": round(statistics.median(d), 2) if d else "",
            "retry_max_s": round(d[-1], 2) if d else "", "quiet": run.quiet}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspaces", type=int, default=200)
    p.add_argument("--gone-rate", type=float, default=0.0, help="fraction of resumed watches answered 410")
    p.add_argument("--seed", type=int, default=FAULTS.seed)
    p.add_argument("--timeout", type=float, default=300, help="seconds each phase may take (then what is left is named)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    faults = dataclasses.replace(FAULTS, gone_rate=args.gone_rate, seed=args.seed)
    load = [os.getloadavg()[0]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, f in (("fault-free", Faults()), ("faults", faults)):
            run = scenario(Path(tmp) / mode, args.workspaces, f, timeout=args.timeout)
            rows.append(row(mode, args.workspaces, run))
            load.append(os.getloadavg()[0])
            print(rows[-1], flush=True)
    base, hit = rows
    ratios = {k: round(hit[k] / base[k], 2) for k in ("ready_s", "deleted_s", "api_requests")}
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "operator_faults.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"Faults: {faults.error_rate:.0%} of the operators' requests 500, {faults.conflict_rate:.0%} of their "
             f"conditional writes 409, watches closed every {faults.watch_lifetime:g} s, {faults.gone_rate:.0%} of "
             f"resumed watches 410 (seed {faults.seed}). Load average (1 min) at the start, after each run: "
             + ", ".join(f"{x:.1f}" for x in load) + ".", "",
             "| run | Workspaces | to end state s | to deleted s | API requests | per Workspace | faults injected "
             "| retries | retry delay p50 / max s | quiet after |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['workspaces']} | {r['ready_s']} | {r['deleted_s']} | {r['api_requests']} | "
              f"{r['per_workspace']} | {r['injected']} | {r['retries']} | "
              f"{r['retry_p50_s'] or '-'} / {r['retry_max_s'] or '-'} | {'yes' if r['quiet'] else 'no'} |" for r in rows]
    lines += ["", f"Faults / fault-free: end state {ratios['ready_s']}x, deleted {ratios['deleted_s']}x, "
                  f"API requests {ratios['api_requests']}x."]
    (args.out / "operator_faults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
