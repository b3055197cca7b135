"""The validating admission webhook: an aiohttp app (aiohttp comes with kopf, in the operator extra)
whose `POST /validate` answers Kubernetes AdmissionReviews (`admission_review`) with `validation.validate`.

The API server only calls webhooks over HTTPS: give `--tls-cert`/`--tls-key`. `kaito-operator run`
serves the same app over its own HTTPS port with `lookup_in`: ConfigMaps read from the cluster, in
the request's namespace (without a lookup, referenced ConfigMaps are not checked here).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .manifests import ManifestError, parse
from .validation import FieldError, Lookup, validate


def admission_review(review: dict[str, Any], lookup: Lookup | None = None,
                     auto_provision: bool = True) -> dict[str, Any]:
    """An admission.k8s.io/v1 AdmissionReview request -> its response (allowed, or denied with
    every message). Pure: `app` serves it over HTTPS."""
    request = review.get("request") or {}
    uid = request.get("uid", "")
    try:
        obj = parse(request.get("object") or {}, "request.object")
        old = parse(request["oldObject"], "request.oldObject") if request.get("oldObject") else None
        found = [] if request.get("operation") == "DELETE" else validate(obj, old, lookup, auto_provision)
    except ManifestError as e:
        found = [FieldError("", str(e))]
    errs = [str(e) for e in found if not e.warning]
    response: dict[str, Any] = {"uid": uid, "allowed": not errs}
    if errs:
        response["status"] = {"code": 422, "reason": "Invalid", "message": "; ".join(errs)}
    warnings = [str(e) for e in found if e.warning]
    if warnings:
        response["warnings"] = warnings
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}



def app(lookup: Lookup | None = None, lookup_in: Callable[[str], Lookup] | None = None,
        auto_provision: bool = True) -> web.Application:
    """`lookup_in(namespace)` gives the lookup for a request's namespace (it may block: it runs in a thread);
    auto_provision=False: Workspaces may omit instanceType (bring your own nodes)."""

    async def review_request(request: web.Request) -> web.Response:
        try:
            review = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": "the body must be an AdmissionReview (JSON)"}, status=400)
        if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
            return web.json_response({"error": "the body must be an AdmissionReview"}, status=400)
        if lookup_in is None:
            return web.json_response(admission_review(review, lookup, auto_provision))
        req = review.get("request") or {}
        namespace = req.get("namespace") or ((req.get("object") or {}).get("metadata") or {}).get("namespace", "default")
        return web.json_response(await asyncio.to_thread(admission_review, review, lookup_in(namespace),
                                                             auto_provision))

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    application = web.Application(client_max_size=4 * 2**20)
    application.router.add_post("/validate", review_request)
    application.router.add_get("/healthz", healthz)
    return application


def serve(host: str, port: int, cert: str | None = None, key: str | None = None) -> None:
    context = None
    if cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
    web.run_app(app(), host=host, port=port, ssl_context=context, print=None)
