"""How fast does load on a two-replica InferenceSet make kaito's scaler ask for a third replica?

The simulated cluster: the API-server fake (tests/kube_fake.py), the real operator (`kaito-operator run
--scaler-port`), two real kaito-serve processes (transformers backend, the embedded default model) as
the replicas' pods, and the scaler between them. The script plays Karpenter and the kubelet (nodes,
Ready StatefulSets, Pod objects pointing at the kaito-serves) and KEDA: every `--poll` seconds it calls
the scaler's GetMetrics over gRPC and computes what KEDA's HPA asks for with the ScaledObject's
AverageValue target, ceil(sum / threshold). Streaming clients spread round-robin over the replicas
(as a Service would); the report is the time from the start of the load to the first answer asking
for a third replica, the metric's peak, and the requests each replica served.

  python benchmarks/inferenceset_scaling.py [--clients 12] [--duration 30] [--threshold 2] [--poll 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from addon_schemas import keda_crd  # noqa: E402
from helpers import Server, free_port  # noqa: E402
from kaito.operator import externalscaler_pb2 as pb  # noqa: E402
from kaito.operator import externalscaler_pb2_grpc as pb_grpc  # noqa: E402
from kube_fake import KubeFake  # noqa: E402
from kube_sim import WS, Cluster, Operator, wait_for  # noqa: E402

NAME = "bench"
LABEL = "inferenceset.kaito.sh/created-by"
MODEL = "smollm2-135m-instruct"


def inference_set(threshold: int) -> dict:
    return {"apiVersion": WS, "kind": "InferenceSet",
            "metadata": {"name": NAME, "namespace": "default",
                         "annotations": {"scaledobject.kaito.sh/auto-provision": "true",
                                         "scaledobject.kaito.sh/threshold": str(threshold),
                                         "scaledobject.kaito.sh/max-replicas": "4"}},
            "spec": {"replicas": 2, "labelSelector": {"matchLabels": {"apps": NAME}},
                     "template": {"metadata": {"annotations": {"kaito.sh/runtime": "transformers"}},
                                  "resource": {"instanceType": "Standard_NC4as_T4_v3"},
                                  "inference": {"preset": {"name": MODEL}}}}}


def pod(ws: str, port: int) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{ws}-0", "namespace": "default",
                                                           "labels": {LABEL: NAME, "kaito.sh/workspace": ws}},
            "spec": {"containers": [{"name": "kaito-serve", "image": "kaito-serve",
                                     "ports": [{"name": "http", "containerPort": port}]}]}}


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="iset-bench-"))
    config = work / "inference_config.yaml"
    config.write_text(f"transformers:\n  max_batch_size: {args.batch}\n  max_waiting: 64\n")
    servers = [Server("--backend", "transformers", "--config", str(config), log_path=work / f"serve-{i}.log")
               for i in range(2)]
    fake = KubeFake().start()
    cluster = Cluster(fake.url)
    cluster.create(keda_crd())  # KEDA's kind, so the operator makes the ScaledObject whose trigger we play
    cluster.install_crds()
    scaler_port = free_port()
    op = Operator(fake.kubeconfig(work / "kubeconfig"), "--resync", "1", "--scaler-port", str(scaler_port),
                  log_path=work / "operator.log").start()
    try:
        for s in servers:
            s.wait_ready()
        cluster.create(inference_set(args.threshold))
        replicas = [f"{NAME}-0", f"{NAME}-1"]
        for ws, srv in zip(replicas, servers, strict=True):  # Karpenter, the StatefulSet controller, the kubelet
            wait_for(lambda ws=ws: cluster.get("apps/v1", "StatefulSet", ws), 60, f"StatefulSet {ws}")
            cluster.karpenter(f"kaito.sh/workspace={ws}")
            cluster.statefulset_ready(ws)
            cluster.create(pod(ws, srv.port))
            cluster.patch_status("v1", "Pod", f"{ws}-0", {"podIP": "127.0.0.1",
                                                          "conditions": [{"type": "Ready", "status": "True"}]})
        wait_for(lambda: ((cluster.get(WS, "InferenceSet", NAME) or {}).get("status") or {}).get("readyReplicas") == 2,
                 60, "two ready replicas")
        scaled = wait_for(lambda: cluster.get("keda.sh/v1alpha1", "ScaledObject", NAME), 30, "ScaledObject")
        return _load(args, servers, scaler_port, scaled["spec"]["triggers"][0]["metadata"])
    finally:
        op.kill()
        fake.stop()
        for s in servers:
            s.stop()


def _load(args: argparse.Namespace, servers: list[Server], scaler_port: int, meta: dict) -> dict:
    stub = pb_grpc.ExternalScalerStub(grpc.insecure_channel(f"127.0.0.1:{scaler_port}"))
    ref = pb.ScaledObjectRef(name=NAME, namespace="default", scalerMetadata=meta)
    threshold = int(meta["threshold"])
    served = [0, 0]
    failed = [0]
    stop = threading.Event()
    lock = threading.Lock()
    turn = [0]

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                with lock:
                    i = turn[0] % 2
                    turn[0] += 1
                body = {"model": MODEL, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                        "messages": [{"role": "user", "content": "Tell me a short story about a lighthouse."}]}
                try:
                    with http.stream("POST", f"{servers[i].url}/v1/chat/completions", json=body) as r:
                        ok = r.status_code == 200
                        for _ in r.iter_lines():
                            pass
                except httpx.HTTPError:
                    ok = False
                with lock:
                    if ok:
                        served[i] += 1
                    else:
                        failed[0] += 1

    samples: list[tuple[float, float, int]] = []
    asked_at = None
    t0 = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    while time.monotonic() - t0 < args.duration:
        value = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref), timeout=10).metricValues[0].metricValueFloat
        desired = max(1, math.ceil(value / threshold))  # KEDA's AverageValue target, as the HPA computes it
        now = time.monotonic() - t0
        samples.append((round(now, 2), value, desired))
        if desired >= 3 and asked_at is None:
            asked_at = now
        time.sleep(args.poll)
    stop.set()
    for t in threads:
        t.join(180)
    return {"clients": args.clients, "duration_s": args.duration, "threshold": threshold, "poll_s": args.poll,
            "batch": args.batch, "max_tokens": args.max_tokens,
            "seconds_to_third_replica": None if asked_at is None else round(asked_at, 2),
            "peak_waiting": max(v for _, v, _ in samples), "requests_per_replica": served, "failed": failed[0],
            "samples": samples}


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "inferenceset_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    third = result["seconds_to_third_replica"]
    lines = [
        "# InferenceSet scaling: load to the scaler's third replica",
        "",
        f"Two replicas (kaito-serve, transformers backend, {MODEL}, `max_batch_size: {result['batch']}`) "
        f"behind the API-server fake and the real operator; {result['clients']} streaming clients "
        f"(max_tokens {result['max_tokens']}) round-robin for {result['duration_s']} s; the scaler asked over "
        f"gRPC every {result['poll_s']} s (KEDA polls every 15 s); threshold {result['threshold']} waiting "
        "requests per replica; desired replicas = ceil(sum / threshold).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| time from load start to the scaler asking for 3 replicas | {third if third is not None else 'never'} s |",
        f"| peak of vllm:num_requests_waiting (sum over the replicas) | {result['peak_waiting']:g} |",
        f"| requests served by replica 0 / 1 | {result['requests_per_replica'][0]} / "
        f"{result['requests_per_replica'][1]} |",
        f"| failed requests | {result['failed']} |",
        "",
        "Samples (s since load start, waiting sum, desired replicas): "
        + ", ".join(f"({t}, {v:g}, {d})" for t, v, d in result["samples"]),
        "",
    ]
    (out / "inferenceset_scaling.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--threshold", type=int, default=2)
    p.add_argument("--poll", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=2, help="kaito-serve's transformers max_batch_size")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    result = run(args)
    write(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
