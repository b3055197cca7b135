"""kaito's KEDA external scaler: KEDA's `externalscaler.ExternalScaler` gRPC service
(proto/externalscaler.proto) for the ScaledObjects InferenceSets ask for (inferenceset.py).

For a trigger (metadata `inferenceSetName`, `inferenceSetNamespace`, `metricName`, `threshold`, and
optionally `metricProtocol`, `metricPort`, `metricPath`, `scrapeTimeout`) it scrapes `/metrics` of the
InferenceSet's ready pods (label inferenceset.kaito.sh/created-by) directly, no Prometheus in between,
parses the Prometheus text with prometheus_client's parser and sums the metric over the pods:

- GetMetricSpec: the metric with `threshold` as its target per replica (KEDA's AverageValue: the HPA
  asks for ceil(sum / threshold) replicas);
- GetMetrics: the sum. A pod that cannot be scraped counts as 0 when the others are at or above the
  threshold (scaling up) and as the threshold when they are below (scaling down), so a missing scrape
  never causes a scale-down (upstream keda-kaito-scaler's rule);
- IsActive: the sum is above zero (KEDA scales a set with min-replicas 0 to zero while inactive);
  StreamIsActive sends it when the stream opens and whenever it changes (`streamInterval` seconds apart).

The default metric `vllm:num_requests_waiting` is read from vLLM pods as is and from kaito-serve's
transformers backend under its `kaito:` name (the same gauge).

Run inside `kaito-operator run --scaler-port PORT` (every replica, leader or not: it is stateless).
"""

from __future__ import annotations

import logging
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from kaito.presets.contract import KAITO_WAITING_METRIC, PORT, WAITING_METRIC
from prometheus_client.parser import text_string_to_metric_families

from . import externalscaler_pb2 as pb
from . import externalscaler_pb2_grpc as pb_grpc
from .api import INFERENCESET_LABEL

log = logging.getLogger("kaito.operator.scaler")
PROTO = Path(__file__).parent / "proto" / "externalscaler.proto"
ALIASES = {WAITING_METRIC: KAITO_WAITING_METRIC}  # vLLM's name -> kaito-serve's transformers backend's


class TriggerError(ValueError):
    """Trigger metadata the scaler cannot use (answered INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Trigger:
    namespace: str
    inference_set: str
    metric: str
    threshold: int
    protocol: str = "http"
    port: int | None = None  # None: each pod's container port named http
    path: str = "/metrics"
    timeout: float = 3.0
    stream_interval: float = 5.0

    @classmethod
    def parse(cls, ref: pb.ScaledObjectRef, metric: str = "") -> Trigger:
        meta = dict(ref.scalerMetadata)
        name = meta.get("inferenceSetName")
        if not name:
            raise TriggerError("inferenceSetName must be specified")
        try:
            threshold = int(meta.get("threshold", ""))
            port = int(meta["metricPort"]) if meta.get("metricPort") else None
            timeout = _seconds(meta.get("scrapeTimeout") or "3s")
            interval = _seconds(meta.get("streamInterval") or "5s")
        except ValueError as e:
            raise TriggerError(f"threshold must be an integer, metricPort a port, scrapeTimeout and "
                               f"streamInterval durations ({e})") from None
        if threshold < 1:
            raise TriggerError("threshold must be a positive integer")
        protocol = meta.get("metricProtocol") or "http"
        if protocol not in ("http", "https"):
            raise TriggerError("metricProtocol must be either http or https")
        asked = re.sub(r"^s\d+-", "", metric)  # KEDA names the HPA's metric s<trigger index>-<name>
        return cls(meta.get("inferenceSetNamespace") or ref.namespace or "default", name,
                   meta.get("metricName") or asked or WAITING_METRIC, threshold, protocol, port,
                   meta.get("metricPath") or "/metrics", timeout, interval)


def _seconds(text: str) -> float:
    """A duration as KEDA metadata writes it: 3s, 500ms, 1m, or plain seconds."""
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def metric_value(text: str, metric: str) -> float | None:
    """The sum of `metric`'s samples in a Prometheus text page (every label set), or of its kaito-serve
    alias when the page has no such metric; None when neither is there."""
    families = list(text_string_to_metric_families(text))
    for name in (metric, ALIASES.get(metric)):
        values = [s.value for f in families for s in f.samples if s.name == name]
        if values:
            return float(sum(values))
    return None


def pod_ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def pod_url(pod: dict, trigger: Trigger) -> str:
    port = trigger.port or next((p["containerPort"] for c in pod["spec"].get("containers") or []
                                 for p in c.get("ports") or [] if p.get("name") == "http"), PORT)
    return f"{trigger.protocol}://{pod['status']['podIP']}:{port}{trigger.path}"


class Scaler(pb_grpc.ExternalScalerServicer):
    """`pods(namespace, selector)` lists pods as the API returns them (Kube.list, or a test's list)."""

    def __init__(self, pods: Callable[[str, str], list[dict]]) -> None:
        self.pods = pods
        self.http = httpx.Client(verify=False)  # noqa: S501 - pods' self-signed certificates, as upstream

    # --- the metric ---------------------------------------------------------------------------------

    def total(self, trigger: Trigger) -> float:
        ready = [p for p in self.pods(trigger.namespace, f"{INFERENCESET_LABEL}={trigger.inference_set}")
                 if pod_ready(p) and (p.get("status") or {}).get("podIP")]
        with futures.ThreadPoolExecutor(max_workers=max(1, min(16, len(ready)))) as pool:
            found = list(pool.map(lambda p: self._scrape(p, trigger), ready))
        values = [v for v in found if v is not None]
        missing = len(found) - len(values)
        total = sum(values)
        if missing and values and total / len(values) < trigger.threshold:
            total += trigger.threshold * missing  # scaling down: a pod we cannot read is not taken as idle
        return total

    def _scrape(self, pod: dict, trigger: Trigger) -> float | None:
        url = pod_url(pod, trigger)
        try:
            response = self.http.get(url, timeout=trigger.timeout)
            response.raise_for_status()
            value = metric_value(response.text, trigger.metric)
        except (httpx.HTTPError, ValueError) as e:
            log.warning("scrape failed", extra={"pod": pod["metadata"]["name"], "url": url, "error": str(e)[:300]})
            return None
        if value is None:
            log.warning("metric not found", extra={"pod": pod["metadata"]["name"], "metric": trigger.metric})
        return value

    # --- KEDA's service -----------------------------------------------------------------------------

    def _trigger(self, ref: pb.ScaledObjectRef, context: grpc.ServicerContext, metric: str = "") -> Trigger:
        try:
            return Trigger.parse(ref, metric)
        except TriggerError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # abort raises; for type checkers

    def IsActive(self, request: pb.ScaledObjectRef, context: grpc.ServicerContext) -> pb.IsActiveResponse:
        return pb.IsActiveResponse(result=self.total(self._trigger(request, context)) > 0)

    def StreamIsActive(self, request: pb.ScaledObjectRef, context: grpc.ServicerContext) -> Iterator[
            pb.IsActiveResponse]:
        trigger = self._trigger(request, context)
        last = None
        while context.is_active():
            active = self.total(trigger) > 0
            if active != last:
                yield pb.IsActiveResponse(result=active)
                last = active
            time.sleep(trigger.stream_interval)

    def GetMetricSpec(self, request: pb.ScaledObjectRef, context: grpc.ServicerContext) -> pb.GetMetricSpecResponse:
        trigger = self._trigger(request, context)
        return pb.GetMetricSpecResponse(metricSpecs=[pb.MetricSpec(
            metricName=trigger.metric, targetSize=trigger.threshold, targetSizeFloat=float(trigger.threshold))])

    def GetMetrics(self, request: pb.GetMetricsRequest, context: grpc.ServicerContext) -> pb.GetMetricsResponse:
        trigger = self._trigger(request.scaledObjectRef, context, request.metricName)
        total = self.total(trigger)
        return pb.GetMetricsResponse(metricValues=[pb.MetricValue(  # under the name KEDA asked for
            metricName=request.metricName or trigger.metric, metricValue=math.ceil(total), metricValueFloat=total)])


def serve(port: int, pods: Callable[[str, str], list[dict]], host: str = "0.0.0.0") -> grpc.Server:
    """Start the scaler's gRPC server on host:port (0: a free port, in `server.port`); returns it running."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="scaler"))
    pb_grpc.add_ExternalScalerServicer_to_server(Scaler(pods), server)
    server.port = server.add_insecure_port(f"{host}:{port}")  # type: ignore[attr-defined]
    server.start()
    log.info("external scaler listening", extra={"address": f"{host}:{server.port}"})  # type: ignore[attr-defined]
    return server


def serve_from_cluster(port: int) -> grpc.Server:
    """The scaler with pods listed through the operator's kubernetes client (lazily, once per process)."""
    from .kube import Kube

    kube: list[Kube] = []
    lock = threading.Lock()

    def pods(namespace: str, selector: str) -> list[dict]:
        with lock:
            if not kube:
                kube.append(Kube())
        return kube[0].list("v1", "Pod", namespace, selector)

    return serve(port, pods)


def generate(out_dir: Path) -> list[Path]:
    """The Python stubs of proto/externalscaler.proto (grpcio-tools), written into out_dir as
    externalscaler_pb2.py and externalscaler_pb2_grpc.py, importing each other as kaito.operator's."""
    import shutil
    import tempfile

    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "kaito" / "operator"
        package.mkdir(parents=True)
        shutil.copy(PROTO, package / PROTO.name)
        code = protoc.main(["protoc", f"-I{tmp}", f"--python_out={tmp}", f"--grpc_python_out={tmp}",
                            f"kaito/operator/{PROTO.name}"])
        if code != 0:
            raise RuntimeError(f"protoc failed ({code})")
        written = []
        for name in ("externalscaler_pb2.py", "externalscaler_pb2_grpc.py"):
            target = Path(out_dir) / name
            shutil.copy(package / name, target)
            written.append(target)
        return written


if __name__ == "__main__":  # python -m kaito.operator.scaler --generate
    if sys.argv[1:] == ["--generate"]:
        for path in generate(Path(__file__).parent):
            print(f"wrote {path}")
    else:
        sys.exit("usage: python -m kaito.operator.scaler --generate")
