"""Running the controller: kopf with the handlers of controller.py (and the Azure provisioner's), a
Lease for leader election, Prometheus metrics and the validating webhook over HTTPS.

Leader election uses the `kubernetes` client's LeaseLock: a replica acquires the Lease before it
starts kopf, renews it in a thread, and exits (to be restarted as a follower) the moment it cannot
renew, so two replicas never act at once. Health, metrics and the (stateless) webhook start before
the Lease is taken, so followers answer them too.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import ssl
import threading

import kopf

from .controller import Config, register
from .kube import Kube, load_config
from .render import RenderOptions

log = logging.getLogger("kaito.operator")


def lead(namespace: str, name: str, identity: str, duration: int = 15) -> None:
    """Block until this replica holds the Lease; then keep renewing it in a thread (exit when lost)."""
    from kubernetes.leaderelection import electionconfig, leaderelection
    from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

    def lost() -> None:
        log.error("leader election lost: stopping", extra={"identity": identity})
        os._exit(1)

    retry = max(1, duration // 6)
    renew = max(int(retry * 1.2) + 1, duration * 2 // 3)
    cfg = electionconfig.Config(LeaseLock(name, namespace, identity), lease_duration=max(duration, renew + 1),
                                renew_deadline=renew, retry_period=retry, onstarted_leading=lambda: None,
                                onstopped_leading=lost)
    election = leaderelection.LeaderElection(cfg)
    election.acquire()
    log.info("leading", extra={"identity": identity, "lease": f"{namespace}/{name}"})

    def renew() -> None:
        election.renew_loop()
        lost()

    threading.Thread(target=renew, name="lease-renewer", daemon=True).start()


def run(args: argparse.Namespace, azure_credential: object = None) -> int:
    """`kaito-operator run`; azure_credential replaces azure-identity's DefaultAzureCredential."""
    load_config()
    identity = f"{socket.gethostname()}-{os.getpid()}"
    if args.health_port:  # answers while a follower waits for the Lease too (kopf's probe starts with kopf)
        _health(args.health_port)
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    cfg = Config(auto_provision=args.auto_provision, resync=args.resync,
                 render=RenderOptions(**({"image_registry": args.registry} if args.registry else {}),
                                      **({"image_tag": args.tag} if args.tag else {})))
    if args.webhook_port:  # stateless: every replica answers admission, the followers too
        _webhook(args, cfg)
    if args.leader_elect:
        lead(args.lease_namespace, args.lease_name, identity, args.lease_duration)
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)
    register(registry, cfg)
    if args.provisioner == "azure":
        from .azure import register as register_azure

        register_azure(registry, credential=azure_credential)
    log.info("kaito-operator running", extra={"auto_provision": cfg.auto_provision, "provisioner": args.provisioner,
                                                "namespaces": args.namespace or "all"})
    kopf.run(registry=registry, standalone=True, clusterwide=not args.namespace, namespaces=args.namespace)
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
    """Part 1's admission app (webhook.app) over HTTPS, on its own event loop in a thread, started before
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
