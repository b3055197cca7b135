"""The InferenceSet controller. The reconcile is a function of the set and its Workspaces as the watch cache
holds them (reconcile_set; the Workspaces are server-side applied, skipped when unchanged; the ScaledObject
and gateway objects, which no watch caches, are applied each time, a no-op at the server when unchanged);
the kopf wiring (register) runs it per InferenceSet in a daemon, poked by the set's and its Workspaces'
changes, and every `resync` seconds. What a set is made of: inferenceset.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import kopf
from kaito.presets import PresetError
from kaito.presets.estimator import memo
from kubernetes.dynamic.exceptions import ConflictError, ResourceNotFoundError

from . import status as st
from .api import (
    INFERENCESET_LABEL,
    SCALEDOBJECT_MANAGED_BY,
    InferenceSet,
)
from .kube import Informer, Kube
from .manifests import ManifestError, parse
from .meta import API_VERSION, GROUP, VERSION
from .validation import ValidationFailed

from .inferenceset import (
    MANAGER,
    KIND,
    SCALEDOBJECT,
    SetConfig,
    allowed_replicas,
    autoscaling,
    gateway_objects,
    index_of,
    nodes_per_replica,
    validate_set,
    workspace_doc,
)

log = logging.getLogger("kaito.operator.inferenceset")


# --- reconcile ------------------------------------------------------------------------------------------------------


def owned_workspaces(found: Iterable[dict], iset: dict) -> dict[int, dict]:
    """index -> Workspace, for the Workspaces the set made (its label, as the watch cache found them, and
    its owner reference)."""
    meta = iset["metadata"]
    out = {}
    for ws in found:
        index = index_of(meta["name"], ws["metadata"]["name"])
        refs = ws["metadata"].get("ownerReferences") or []
        if index is not None and any(r.get("uid") == meta.get("uid") for r in refs):
            out[index] = ws
    return out


def _ready(ws: dict) -> bool:
    return st.is_true(ws, st.WORKSPACE_SUCCEEDED) and not ws["metadata"].get("deletionTimestamp")


def reconcile_set(kube: Kube, cfg: SetConfig, body: dict, found: list[dict],
                  config_maps: dict[str, str]) -> str | None:
    """Bring one InferenceSet (`body`, as the watch last showed it) to its spec: its Workspaces (`found`, in
    the watch cache), ScaledObject and InferencePool; write its status; returns Ready / Pending / NotReady,
    or None when it is going. `config_maps`: the namespace's ConfigMaps' versions (kube.Kube.lookup)."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    if body["metadata"].get("deletionTimestamp"):
        return None
    old = body.get("status") or {}
    lookup = kube.lookup(namespace, config_maps)
    conds: list[st.Cond] = []

    def write(state: str, **fields: Any) -> str:
        new = {**fields, "selector": f"{INFERENCESET_LABEL}={name}",
               "conditions": st.conditions(old.get("conditions"), conds, body["metadata"].get("generation"))}
        st.write(kube, API_VERSION, KIND, name, namespace, old, new, uid=body["metadata"].get("uid"),
                 resource_version=body["metadata"].get("resourceVersion"))
        return state

    owned = owned_workspaces(found, body)
    present = {i: ws for i, ws in owned.items() if not ws["metadata"].get("deletionTimestamp")}
    counts = {"replicas": len(present), "readyReplicas": sum(map(_ready, present.values()))}
    try:
        iset = parse(body, f"{KIND} {namespace}/{name}")
        assert isinstance(iset, InferenceSet)
        with memo():  # the replica's model sized once
            errs = [e for e in validate_set(iset, lookup=lookup, auto_provision=cfg.auto_provision) if not e.warning]
            if errs:
                raise ValidationFailed(iset, errs)
            per = nodes_per_replica(iset, lookup, cfg.render)
    except (ManifestError, ValidationFailed, PresetError) as e:
        conds.append(st.Cond(st.INFERENCESET_READY, False, "InvalidInferenceSet", str(e)))
        return write("NotReady", **counts)

    want = iset.spec.replicas
    allowed = allowed_replicas(iset, per)
    # scale down: the highest index first, the next once it is gone
    if len(present) == len(owned):
        extra = sorted((i for i in present if i >= allowed), reverse=True)
        if extra:
            log.info("scaling down", extra={"inferenceset": f"{namespace}/{name}", "workspace":
                                            present[extra[0]]["metadata"]["name"], "replicas": allowed})
            kube.delete(API_VERSION, "Workspace", present[extra[0]]["metadata"]["name"], namespace)
    # scale up, and keep the replicas as the template says
    cached = {("Workspace", ws["metadata"]["name"]): ws for ws in owned.values()}
    for index in range(allowed):
        if index not in owned or index in present:
            kube.apply(workspace_doc(iset, index), cached)

    ready = sum(_ready(ws) for i, ws in present.items() if i < allowed)
    if allowed < want:
        conds.append(st.Cond(st.INFERENCESET_READY, False, "NodeCountLimitExceeded",
                             f"{want} replicas need {want * per} GPU nodes ({per} each), more than nodeCountLimit "
                             f"{iset.spec.node_count_limit}: running {allowed}"))
    elif ready >= want:
        conds.append(st.Cond(st.INFERENCESET_READY, True, "inferencesetReady", "inferenceset is ready"))
    else:
        conds.append(st.Cond(st.INFERENCESET_READY, False, "inferencesetNotReady",
                             f"inferenceset is not ready, {ready}/{want} replicas are ready"))
    conds += _apply_extras(kube, cfg, iset, per)
    state = "Ready" if conds[0].ok else ("NotReady" if conds[0].reason == "NodeCountLimitExceeded" else "Pending")
    return write(state, replicas=len(present), readyReplicas=ready)


def _apply_extras(kube: Kube, cfg: SetConfig, iset: InferenceSet, per: int) -> list[st.Cond]:
    """The ScaledObject (or its removal when the annotation goes) and the gateway objects."""
    conds = []
    scaled = autoscaling(iset, per, cfg.scaler_address)
    if scaled is None:
        with contextlib.suppress(ResourceNotFoundError):
            live = kube.get(*SCALEDOBJECT, iset.name, iset.namespace)
            if live and (live["metadata"].get("annotations") or {}).get(SCALEDOBJECT_MANAGED_BY) == MANAGER:
                kube.delete(*SCALEDOBJECT, iset.name, iset.namespace)
    elif isinstance(scaled, str):
        conds.append(st.Cond(st.SCALEDOBJECT_READY, False, "InvalidAutoscaling", scaled))
    else:
        try:
            kube.apply(scaled)
            spec = scaled["spec"]
            metric = spec["triggers"][0]["metadata"]["metricName"]
            conds.append(st.Cond(st.SCALEDOBJECT_READY, True, "ScaledObjectApplied",
                                 f"KEDA scales {iset.name} between {spec['minReplicaCount']} and "
                                 f"{spec['maxReplicaCount']} replicas on {metric}"))
        except ResourceNotFoundError:
            conds.append(st.Cond(st.SCALEDOBJECT_READY, False, "KEDANotInstalled",
                                 "keda.sh/v1alpha1 ScaledObject is not served here: install KEDA"))
    if cfg.gateway:
        try:
            for obj in gateway_objects(iset, cfg.epp_image):
                kube.apply(obj)
        except ResourceNotFoundError:  # the pool comes first: without its CRD nothing is made
            conds.append(st.Cond(st.INFERENCEPOOL_READY, False, "GatewayAPIInferenceExtensionNotInstalled",
                                 "inference.networking.k8s.io/v1 InferencePool is not served here: install the "
                                 "Gateway API Inference Extension's CRDs"))
    return conds


def delete_workspaces(kube: Kube, found: list[dict], namespace: str, name: str, uid: str | None) -> int:
    """Delete the set's Workspaces (`found`, in the watch cache; highest index first); returns how many are
    left."""
    left = owned_workspaces(found, {"metadata": {"namespace": namespace, "name": name, "uid": uid}})
    for index in sorted(left, reverse=True):
        if not left[index]["metadata"].get("deletionTimestamp"):
            kube.delete(API_VERSION, "Workspace", left[index]["metadata"]["name"], namespace)
    return len(left)


# --- kopf wiring ------------------------------------------------------------------------------------------------


def register(registry: kopf.OperatorRegistry, cfg: SetConfig, kube_factory=Kube) -> None:
    """The InferenceSet handlers, in `registry` (the same registry as controller.register's, whose
    `kaito_configmap_versions` index they read). The sets' Workspaces come from a watch of their own
    (kube.Informer, selected by the set label), kept slimmed by (namespace, set) in `replicas`."""
    from .controller import backoff

    pokes: dict[tuple[str, str], asyncio.Event] = {}
    replicas: dict[tuple[str, str], dict[str, dict]] = {}
    watches: list[Informer] = []
    kubes: list[Kube] = []

    def kube() -> Kube:
        if not kubes:
            kubes.append(kube_factory())
        return kubes[0]

    def seen(type: str, ws: dict) -> None:
        """A set's Workspace changed (or went): keep it, and look again at the set unless it is the set's own
        write coming back."""
        key = (ws["metadata"]["namespace"], ws["metadata"]["labels"][INFERENCESET_LABEL])
        found = replicas.setdefault(key, {})
        if type == "DELETED":
            found.pop(ws["metadata"]["name"], None)
            kube().forget(ws)
        else:
            found[ws["metadata"]["name"]] = ws
        if not found:
            del replicas[key]
        if type == "DELETED" or not kube().echo(ws):
            poke(key)

    @kopf.on.startup(registry=registry, id="inferenceset-workspaces")
    async def watch(**_: Any) -> None:
        k = await asyncio.to_thread(kube)
        watches.append(Informer(k, API_VERSION, "Workspace", INFERENCESET_LABEL, seen, asyncio.get_running_loop())
                       .start())

    @kopf.daemon(GROUP, VERSION, "inferencesets", registry=registry, id="reconcile-inferencesets",
                 cancellation_timeout=5.0)
    async def keep_reconciled(body: kopf.Body, **kwargs: Any) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        event = pokes.setdefault(key, asyncio.Event())
        failures = 0
        try:
            while True:
                event.clear()
                try:  # the caches are read here, on the event loop, where they change
                    for informer in watches:
                        await informer.listed.wait()
                    found = list(replicas.get(key, {}).values())
                    versions = dict(kwargs["kaito_configmap_versions"].get(key[0], ()))
                    await asyncio.to_thread(reconcile_set, kube(), cfg, dict(body), found, versions)
                    wait, failures = cfg.resync, 0
                except ConflictError:  # changed since it was read: look again
                    wait = 0.2
                except Exception as e:  # noqa: BLE001 - retried with backoff
                    failures += 1
                    wait = backoff(failures)
                    log.warning("inferenceset reconcile failed", extra={"inferenceset": "/".join(key),
                                                                        "retry_in_s": round(wait, 1),
                                                                        "error": str(e)[:500]})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), wait)
        finally:
            pokes.pop(key, None)

    def poke(key: tuple[str, str]) -> None:
        if key in pokes:
            pokes[key].set()

    @kopf.on.event(GROUP, VERSION, "inferencesets", registry=registry, id="changed-inferencesets")
    async def changed(body: kopf.Body, **_: Any) -> None:
        poke((body["metadata"]["namespace"], body["metadata"]["name"]))

    @kopf.on.delete(GROUP, VERSION, "inferencesets", registry=registry, id="cleanup-inferencesets")
    async def deleting(body: kopf.Body, **_: Any) -> None:
        ns, name, uid = body["metadata"]["namespace"], body["metadata"]["name"], body["metadata"].get("uid")
        k = kube()
        old = ((await asyncio.to_thread(k.get, API_VERSION, KIND, name, ns)) or body).get("status") or {}
        kept = st.kept(old, st.INFERENCESET_DELETING)
        going = st.Cond(st.INFERENCESET_DELETING, True, "inferencesetDeleted", "inferenceset is being deleted")
        await asyncio.to_thread(st.write, k, API_VERSION, KIND, name, ns, old,
                                {"conditions": st.conditions(old.get("conditions"), [*kept, going])}, uid=uid)
        found = list(replicas.get((ns, name), {}).values())
        left = await asyncio.to_thread(delete_workspaces, k, found, ns, name, uid)
        if left:
            raise kopf.TemporaryError(f"waiting for {left} Workspace(s) to go", delay=1)
