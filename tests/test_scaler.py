"""kaito's KEDA external scaler (operator/scaler.py) through a real gRPC client generated from
proto/externalscaler.proto, against a real `kaito-serve` (transformers backend, the embedded default
model, one request at a time so the others wait) and a static vLLM /metrics page on 127.0.0.1 (a vLLM
server takes minutes to start on this CPU; the page carries vLLM's metric as vLLM writes it)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import httpx
import pytest
from helpers import Server, free_port
from kaito.operator import externalscaler_pb2 as pb
from kaito.operator import externalscaler_pb2_grpc as pb_grpc
from kaito.operator.scaler import generate, metric_value, serve

pytestmark = pytest.mark.timeout(300)
VLLM_PAGE = """# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="phi-4"} 7.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="phi-4"} 16.0
"""


@pytest.fixture(scope="module")
def serve_one_at_a_time(default_model_dir, tmp_path_factory):
    config = tmp_path_factory.mktemp("scaler") / "inference_config.yaml"
    config.write_text("transformers:\n  max_batch_size: 1\n  max_waiting: 8\n")
    srv = Server("--backend", "transformers", "--config", str(config))
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def vllm_page():
    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(VLLM_PAGE.encode())

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def pod(name: str, port: int, ready: bool = True) -> dict:
    return {"metadata": {"name": name, "labels": {"inferenceset.kaito.sh/created-by": "chat"}},
            "spec": {"containers": [{"name": "kaito-serve", "ports": [{"name": "http", "containerPort": port}]}]},
            "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": str(ready)}]}}


@pytest.fixture
def scaler():
    pods: list[dict] = []
    seen: list[tuple[str, str]] = []

    def list_pods(namespace: str, selector: str) -> list[dict]:
        seen.append((namespace, selector))
        return list(pods)

    server = serve(0, list_pods, host="127.0.0.1")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.ExternalScalerStub(channel), pods, seen
    channel.close()
    server.stop(0)


def ref(**meta: str) -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(name="chat", namespace="default", scalerMetadata={
        "inferenceSetName": "chat", "inferenceSetNamespace": "default", "threshold": "2", **meta})


def metric(stub, **meta: str) -> float:
    r = ref(**meta)
    return stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=r, metricName="s0-vllm:num_requests_waiting"),
                           timeout=10).metricValues[0].metricValueFloat


def test_waiting_requests_raise_the_metric_and_activity(scaler, serve_one_at_a_time):
    stub, pods, seen = scaler
    srv = serve_one_at_a_time
    pods.append(pod("chat-0-0", srv.port))
    spec = stub.GetMetricSpec(ref(), timeout=10).metricSpecs[0]
    assert (spec.metricName, spec.targetSize, spec.targetSizeFloat) == ("vllm:num_requests_waiting", 2, 2.0)
    assert metric(stub) == 0 and not stub.IsActive(ref(), timeout=10).result
    assert seen[-1] == ("default", "inferenceset.kaito.sh/created-by=chat")
    stream = stub.StreamIsActive(ref(streamInterval="200ms"), timeout=120)
    assert next(stream).result is False

    def ask() -> None:
        body = {"model": "smollm2-135m-instruct", "max_tokens": 48, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": "Count from one to fifty in words."}]}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=120) as r:
            for _ in r.iter_lines():
                pass

    clients = [threading.Thread(target=ask) for _ in range(4)]
    for c in clients:
        c.start()
    try:
        seen_max = 0.0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and seen_max < 2:
            seen_max = max(seen_max, metric(stub))
            time.sleep(0.1)
        assert seen_max >= 2, "requests beyond the batch of one should wait"
        assert next(stream).result is True  # the stream says so as it changes
        assert stub.IsActive(ref(), timeout=10).result or metric(stub) == 0
    finally:
        for c in clients:
            c.join(120)
    assert metric(stub) == 0 and not stub.IsActive(ref(), timeout=10).result
    assert next(stream).result is False
    stream.cancel()


def test_sum_over_ready_pods_and_both_metric_names(scaler, serve_one_at_a_time, vllm_page):
    """vLLM's page gives 7 under vllm:..., kaito-serve's 0 under kaito:...: the sum is 7; a pod not Ready
    is not asked; a pod that cannot be scraped counts as the threshold while the rest are below it (so a
    failed scrape never scales down) and as 0 once they are above it."""
    stub, pods, _ = scaler
    pods += [pod("vllm-0", vllm_page), pod("kaito-0", serve_one_at_a_time.port), pod("starting", 1, ready=False)]
    assert metric(stub) == 7 and stub.IsActive(ref(), timeout=10).result
    gone = free_port()
    pods.append(pod("gone", gone))
    assert metric(stub) == 7  # (7 + 0) / 2 = 3.5 >= 2: scaling up, the unread pod counts 0
    assert metric(stub, threshold="10") == 17  # 3.5 < 10: scaling down, the unread pod counts 10
    value = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref()), timeout=10).metricValues[0]
    assert value.metricName == "vllm:num_requests_waiting" and value.metricValue == 7
    asked = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(), metricName="s0-vllm:num_requests_waiting"),
                            timeout=10).metricValues[0]
    assert asked.metricName == "s0-vllm:num_requests_waiting" and asked.metricValue == 7
    assert metric(stub, metricName="vllm:num_requests_running") == 16
    assert metric_value(VLLM_PAGE, "kaito:nothing") is None


def test_bad_metadata_is_invalid_argument(scaler):
    stub, _, _ = scaler
    for meta, words in (({"threshold": "ten"}, "threshold"), ({"inferenceSetName": ""}, "inferenceSetName"),
                        ({"metricProtocol": "ftp"}, "http or https")):
        with pytest.raises(grpc.RpcError) as e:
            stub.IsActive(ref(**meta), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details()


def test_stubs_are_generated_from_the_proto(tmp_path):
    """The committed stubs are what grpcio-tools makes of proto/externalscaler.proto (regenerate:
    python -m kaito.operator.scaler --generate); the service and messages are KEDA's."""
    from pathlib import Path

    import kaito.operator.scaler as scaler_module

    here = Path(scaler_module.__file__).parent
    for path in generate(tmp_path):
        assert path.read_text() == (here / path.name).read_text(), f"{path.name} is stale: regenerate it"
    service = pb.DESCRIPTOR.services_by_name["ExternalScaler"]
    assert service.full_name == "externalscaler.ExternalScaler"
    assert [m.name for m in service.methods] == ["IsActive", "StreamIsActive", "GetMetricSpec", "GetMetrics",
                                                 "StreamMetricSpec"]
    fields = {m: [(f.name, f.number) for f in pb.DESCRIPTOR.message_types_by_name[m].fields]
              for m in ("ScaledObjectRef", "MetricSpec", "GetMetricsRequest", "MetricValue")}
    assert fields == {"ScaledObjectRef": [("name", 1), ("namespace", 2), ("scalerMetadata", 3)],
                      "MetricSpec": [("metricName", 1), ("targetSize", 2), ("targetSizeFloat", 3)],
                      "GetMetricsRequest": [("scaledObjectRef", 1), ("metricName", 2)],
                      "MetricValue": [("metricName", 1), ("metricValue", 2), ("metricValueFloat", 3)]}
