"""Running the controller: kopf with the handlers of controller.py (and the Azure provisioner's), a
Lease for leader election, Prometheus metrics and the validating webhook over HTTPS.

Leader election uses the `kubernetes` client's LeaseLock: a replica acquires the Lease before it
starts kopf, renews it in a thread, and exits (to be restarted as a follower) once it has not renewed
for 2/3 of the Lease's duration, measured from the last renewal it sent, so it has stopped before
another replica may take the Lease: two replicas never act at once. Health, metrics and the (stateless) webhook start before
the Lease is taken, so followers answer them too.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import socket
import ssl
import threading
import time

import kopf

from .controller import Config, register
from .kube import Kube, load_config
from .render import RenderOptions

log = logging.getLogger("kaito.operator")


def lead(namespace: str, name: str, identity: str, duration: int = 15) -> None:
    """Block until this replica holds the Lease; then keep renewing it in a thread, and exit when lost.

    The `kubernetes` client's LeaderElection reads and writes the Lease (each request bounded by a
    timeout); the timing is kept here on the monotonic clock. A watchdog ends the process `deadline`
    (2/3 of the duration) after the last successful renewal was sent, whatever the API server does
    meanwhile (errors, no answer at all): another replica takes the Lease only `duration` after it saw
    that renewal, so by then nothing of this one runs."""
    from kubernetes.leaderelection import electionconfig, leaderelection
    from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

    duration = max(duration, 2)
    retry, deadline = max(1, duration // 7), duration * 2 / 3  # client-go's defaults: 15 s, 10 s, 2 s
    lock = LeaseLock(name, namespace, identity)
    for call in ("read_namespaced_lease", "create_namespaced_lease", "replace_namespaced_lease"):
        setattr(lock.api_instance, call, functools.partial(getattr(lock.api_instance, call), _request_timeout=retry))
    election = leaderelection.LeaderElection(electionconfig.Config(
        lock, lease_duration=duration, renew_deadline=deadline, retry_period=retry,
        onstarted_leading=lambda: None, onstopped_leading=None))

    def attempt() -> float | None:
        """Acquire or renew once: when the attempt started if it succeeded, else None."""
        sent = time.monotonic()
        try:
            return sent if election.try_acquire_or_renew() else None
        except Exception as e:  # noqa: BLE001 - a timeout, a refused connection: not renewed
            log.debug("lease request failed", extra={"identity": identity, "error": str(e)[:300]})
            return None

    while (renewed := attempt()) is None:
        time.sleep(retry)
    log.info("leading", extra={"identity": identity, "lease": f"{namespace}/{name}"})

    def renew() -> None:
        nonlocal renewed
        while True:
            time.sleep(retry)
            renewed = attempt() or renewed

    def watchdog() -> None:
        while (left := renewed + deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))
        log.error("leader election lost: stopping", extra={"identity": identity})
        os._exit(1)

    threading.Thread(target=renew, name="lease-renewer", daemon=True).start()
    threading.Thread(target=watchdog, name="lease-watchdog", daemon=True).start()


def run(args: argparse.Namespace, azure_credential: object = None) -> int:
    """`kaito-operator run`; azure_credential replaces azure-identity's DefaultAzureCredential."""
    load_config()
    identity = f"{socket.gethostname()}-{os.getpid()}"
    if args.health_port:  # answers while a follower waits for the Lease too (kopf's probe starts with kopf)
        _health(args.health_port)
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    cfg = Config(auto_provision=args.auto_provision, resync=args.resync, workers=max(1, args.workers),
                 namespaces=list(args.namespace or []),
                 render=RenderOptions(**({"image_registry": args.registry} if args.registry else {}),
                                      **({"image_tag": args.tag} if args.tag else {}),
                                      auto_provision=args.auto_provision,
                                      model_mirror=getattr(args, "model_mirror", False),
                                      model_mirror_storage_class=getattr(args, "model_mirror_storage_class", None),
                                      weights_storage_class=getattr(args, "weights_storage_class", None)))
    if args.webhook_port:  # stateless: every replica answers admission, the followers too
        _webhook(args, cfg)
    scaler_address = getattr(args, "scaler_address", None)
    if getattr(args, "scaler_port", 0):  # stateless: every replica answers KEDA, the followers too
        from .scaler import serve_from_cluster

        scaler = serve_from_cluster(args.scaler_port)  # kept referenced while kopf runs: a collected server stops
        scaler_address = scaler_address or f"127.0.0.1:{args.scaler_port}"
    if args.leader_elect:
        lead(args.lease_namespace, args.lease_name, identity, args.lease_duration)
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)
    shared: list[Kube] = []

    def kube(connections: int = 0) -> Kube:  # one client for all handlers (and one record of kaito's writes)
        if not shared:
            shared.append(Kube(connections=connections))
        return shared[0]

    register(registry, cfg, kube_factory=kube)
    from .inferenceset import EPP_IMAGE, SetConfig
    from .inferenceset_controller import register as register_sets

    register_sets(registry, SetConfig(auto_provision=cfg.auto_provision, resync=cfg.resync, render=cfg.render,
                                      scaler_address=scaler_address, gateway=getattr(args, "gateway", False),
                                      epp_image=getattr(args, "epp_image", None) or EPP_IMAGE),
                kube_factory=lambda: kube().sibling())  # the sets write Workspaces: news to their controller
    if cfg.render.model_mirror:
        from .mirror import register as register_mirrors

        register_mirrors(registry, cfg.render, args.model_mirror_idle, kube)
    if args.provisioner == "azure":
        from .azure import register as register_azure

        register_azure(registry, credential=azure_credential)
    log.info("kaito-operator running", extra={"auto_provision": cfg.auto_provision, "provisioner": args.provisioner,
                                                "namespaces": args.namespace or "all"})
    kopf.run(registry=registry, standalone=True, clusterwide=not args.namespace, namespaces=args.namespace)
    if getattr(args, "scaler_port", 0):
        scaler.stop(grace=1)
    return 0


def _health(port: int) -> None:
    """GET /healthz -> 200 while the process runs (a lost Lease or a dead kopf ends the process)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path.split("?")[0] == "/healthz"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b"ok\n" if ok else b"")

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Health)
    threading.Thread(target=server.serve_forever, name="healthz", daemon=True).start()


def _webhook(args: argparse.Namespace, cfg: Config) -> None:
    """The admission app (webhook.app) over HTTPS, on its own event loop in a thread, started before
    the Lease is taken (a Service sends admission requests to every replica). Returns once it listens."""
    import asyncio

    from aiohttp import web

    from .webhook import app

    if not (args.tls_cert and args.tls_key):
        raise SystemExit("--webhook-port needs --tls-cert and --tls-key (the API server calls webhooks over HTTPS)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_cert, args.tls_key)

    kube: list[Kube] = []

    def lookup_in(namespace: str):
        if not kube:
            kube.append(Kube())

        def lookup(kind: str, name: str) -> dict | None:
            return kube[0].get("v1", kind, name, namespace)
        return lookup

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app(lookup_in=lookup_in, auto_provision=cfg.auto_provision), access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "0.0.0.0", args.webhook_port, ssl_context=context).start())
    threading.Thread(target=loop.run_forever, name="webhook", daemon=True).start()
