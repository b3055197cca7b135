"""`kaito-operator run`: the cluster controller, on kopf and the `kubernetes` client.

A reconcile reads as render -> apply -> observe -> state -> write: the resource is rendered (render.py,
pure; the estimator sizes the model once), its objects applied (kube.Kube.apply: server-side apply as
field manager `kaito`, skipped when nothing changed; owner references cascade deletion), the nodes,
NodeClaims, pods and workload observed and the tuning or serving state decided (observe.py), and the status
written when it changed (status.py: conditions as upstream names them, Events).

Reads come from watch caches (kube.Informer): the Workspaces and RAGEngines whole, and slimmed
(kube.slim) the nodes, ConfigMap versions, kaito's own objects, NodeClaims and pods. A reconcile reads
the API only for a ConfigMap its resource names at a version it has not read yet, and for Secrets, so a
resync of a settled resource makes no request.

The resources are watched by kaito, not kopf (whose per-object event handling cost a third of the
operator's CPU): one asyncio task per Workspace / RAGEngine adds the finalizer, runs its reconciles, at
most `workers` at once on a thread pool, and runs again when the resource or an object it owns changes
(their watches poke it; kaito's own writes coming back do not), every `resync` seconds (drift), and
after a failure with exponential backoff and jitter. kopf runs the startup and cleanup, the InferenceSet
and ModelMirror controllers and the Azure provisioner.

The resources' node label selectors, kept as their events come, map node events to the resources to
look again at, and tell which NodeClaims have lost their resource: one whose resource is still unknown
ORPHAN_GRACE after it was seen (every NodeClaim is seen when the operator starts), and the API says is
gone, is deleted; a resource deleted without its finalizer has its NodeClaims deleted at once. The
finalizer keeps a resource until its NodeClaims (and so their cloud capacity) are gone.

Without auto-provisioning (bring your own nodes) no NodeClaims are made: the nodes come from the
resource's label selector, and their GPUs from the NVIDIA feature-discovery labels.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import kopf
from kaito.presets import PresetError
from kaito.presets.estimator import memo
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError
from prometheus_client import Counter, Gauge, Histogram

from . import status as st
from .api import Workspace
from .cluster import (
    NODECLAIM,
)
from .kube import Informer, Kube, backoff, digest, newer, selects
from .manifests import ManifestError, parse
from .meta import API_VERSION, GROUP
from .observe import (
    Seen,
    node_conditions,
    own_nodes,
    provisioned_nodes,
    serving_state,
    size_from_nodes,
    tuning_state,
)
from .render import RenderOptions, render
from .validation import ValidationFailed

log = logging.getLogger("kaito.operator")
FINALIZER = "kaito.sh/finalizer"
LABELS = {"Workspace": "kaito.sh/workspace", "RAGEngine": "kaito.sh/ragengine"}  # on every object kaito makes

RECONCILES = Counter("kaito_operator_reconciles_total", "Reconciles run", ["kind"])
ERRORS = Counter("kaito_operator_reconcile_errors_total", "Reconciles that failed", ["kind"])
DURATION = Histogram("kaito_operator_reconcile_duration_seconds", "Time of one reconcile", ["kind"])
BY_STATE = Gauge("kaito_operator_resources", "Workspaces and RAGEngines by state", ["kind", "state"])


@dataclass
class Config:
    auto_provision: bool = True  # False: bring your own nodes (found by the label selector)
    resync: float = 30.0  # seconds between reconciles of a resource nothing changed
    render: RenderOptions = field(default_factory=RenderOptions)
    workers: int = 16  # reconciles at once (different resources; one resource is never reconciled twice at once)
    namespaces: list[str] = field(default_factory=list)  # the namespaces watched (none: all)


def _compute_of(body: Any) -> dict:
    """A resource's `resource` (Workspace) or `spec.compute` (RAGEngine), as the API gives it."""
    return (body.get("resource") if body["kind"] == "Workspace" else (body.get("spec") or {}).get("compute")) or {}



# --- reconcile ---------------------------------------------------------------------------------------------


def reconcile(kube: Kube, cfg: Config, body: dict, seen: Seen) -> str | None:
    """Bring one resource (`body`, as the watch last showed it) to its rendered objects and write its status;
    returns its state. The API is read only for a ConfigMap it names whose version was not read yet and
    for Secrets; objects are written only when their render or a field kaito set changed."""
    body = kube.latest(body)  # with its status as kaito last wrote it
    kind, meta = body["kind"], body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp") or FINALIZER not in (meta.get("finalizers") or []):
        return None  # going, or new: kopf adds the finalizer first (and that change comes back here)
    old = body.get("status") or {}

    def write(state: str | None, conds: list[st.Cond], **extra: Any) -> str | None:
        new = {**extra, "conditions": st.conditions(old.get("conditions"), conds, meta.get("generation"))}
        if kind == "Workspace" and state:
            new["state"] = state
        st.write(kube, API_VERSION, kind, name, namespace, old, new, uid=meta.get("uid"),
                 resource_version=meta.get("resourceVersion"))
        return state

    # render
    try:
        res = parse(body, f"{kind} {namespace}/{name}")  # with its status: a recorded targetNodeCount is kept
        if isinstance(res, Workspace) and not res.resource.instance_type and not cfg.auto_provision:
            sized = size_from_nodes(seen, res)
            if isinstance(sized, tuple):  # no node to size from yet, or GPUs kaito does not know
                state = "Pending" if sized[0] == "NodesNotFound" else "NotReady"
                return write(state, [st.Cond(st.RESOURCE_READY, False, *sized), st.Cond(st.SUCCEEDED[kind], False,
                                                                                        *sized)])
            res.resource.instance_type = sized
        with memo():  # validation, the plan and the engine flags size the model once
            objects = render(res, kube.lookup(namespace, seen.config_maps), cfg.render)
    except (ManifestError, ValidationFailed, PresetError) as e:
        reason = f"Invalid{kind}"
        state = ("Failed" if body.get("tuning") else "NotReady") if kind == "Workspace" else "Failed"
        return write(state, [st.Cond(st.RESOURCE_READY, False, reason, str(e)),
                             st.Cond(st.SUCCEEDED[kind], False, reason, str(e))])

    # apply
    for mirror in (o for o in objects if o["kind"] == "ModelMirror"):  # shared by the model's Workspaces
        kube.ensure(mirror)
    claims = [o for o in objects if o["kind"] == "NodeClaim"] if cfg.auto_provision else []
    workload = [o for o in objects if o["kind"] not in ("NodeClaim", "ModelMirror")]
    live = {(o["kind"], o["metadata"]["name"]): kube.apply(o, seen.objects) for o in claims + workload}

    # observe
    need = _node_count(workload) if isinstance(res, Workspace) else ((res.spec.compute.count or 1) if res.spec.compute
                                                                     else 1)
    nodes = (provisioned_nodes(seen, res, [live[("NodeClaim", c["metadata"]["name"])] for c in claims])
             if cfg.auto_provision else own_nodes(seen, res, need))

    # state
    if isinstance(res, Workspace) and res.tuning is not None:
        state, conds = tuning_state(seen, res, live.get(("Job", name)), nodes)
    else:
        wl = next(o for o in workload if o["kind"] in ("StatefulSet", "Deployment"))
        state, conds = serving_state(seen, res, wl, live[(wl["kind"], wl["metadata"]["name"])], nodes)

    # write
    extra: dict[str, Any] = {"workerNodes": nodes.names}
    if isinstance(res, Workspace) and old.get("targetNodeCount") is None:
        extra["targetNodeCount"] = need  # set once, immutable after (as upstream's estimator writes it)
    write(state, node_conditions(cfg.auto_provision, nodes, claims) + conds, **extra)
    return state


def _node_count(workload: list[dict]) -> int:
    """The estimator's node count (the StatefulSet's replicas), the template's count, or 1 for tuning."""
    return next((o["spec"]["replicas"] for o in workload if o["kind"] in ("StatefulSet", "Deployment")), 1)


def cleanup(kube: Kube, kind: str, namespace: str, name: str) -> int:
    """Delete the resource's NodeClaims (cluster scoped, so not owned); returns how many remain."""
    label = LABELS[kind]
    remaining = kube.list(*NODECLAIM, selector=f"{label}={name},{label}namespace={namespace}")
    for claim in remaining:
        if not claim["metadata"].get("deletionTimestamp"):
            kube.delete(*NODECLAIM, claim["metadata"]["name"])
    return len(remaining)


def owner(labels: dict[str, str], namespace: str | None) -> tuple[str, str, str] | None:
    """(kind, namespace, name) of the resource an object kaito made belongs to, from its labels (a
    cluster-scoped NodeClaim, or the node Karpenter makes for it, names the namespace in a label too)."""
    for kind, label in LABELS.items():
        if label in labels and (namespace or f"{label}namespace" in labels):
            return kind, namespace or labels[f"{label}namespace"], labels[label]
    return None


class Backoffs:
    """kopf's retries of its own failed API requests (settings.networking.error_backoffs: a 5xx, a 429, a
    broken connection): kopf's 1, 1, 2, 3, 5, 8, 13 and 21 s, each with jitter (+-50%) so that what failed
    together does not retry together. Iterated anew for every request."""

    STEPS = (1, 1, 2, 3, 5, 8, 13, 21)

    def __iter__(self):
        return (step * random.uniform(0.5, 1.5) for step in self.STEPS)

    def __len__(self) -> int:
        return len(self.STEPS)


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf's change detection (the last-handled-configuration annotation) serves on.create/on.update/
    on.resume handlers, which kaito does not have: every object reads as handled and unchanged, so kopf
    writes no annotation (one request fewer per resource) and compares nothing."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: kopf.Body) -> Any:
        return {}

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        pass


# --- kopf wiring ---------------------------------------------------------------------------------------------

WATCHED = (("v1", "Service"), ("v1", "ConfigMap"), ("apps/v1", "StatefulSet"), ("apps/v1", "Deployment"),
           ("batch/v1", "Job"), ("v1", "Pod"))  # kaito's in a namespace: what it writes there, and the pods
ORPHAN_GRACE = 10.0  # seconds a NodeClaim's resource may be missing from the caches before the API is asked


def register(registry: kopf.OperatorRegistry, cfg: Config, kube_factory=Kube) -> None:
    """The controller's startup and cleanup, in `registry` (kopf.run(registry=...)); the startup starts the
    watches (kube.Informer, each in a thread, handing changes to the event loop), and a reconcile starts
    once they have all listed: the Workspaces and RAGEngines whole (`bodies`; each gets its task in
    `loops`), the nodes slimmed (`nodes`, by name), every ConfigMap's version (`config_maps`), the
    objects kaito made (NodeClaims too) and its pods slimmed, selected by label at the API server, kept by
    resource in `rendered` and `pods`. The resources' node label selectors are kept in `selectors`. A
    NodeClaim whose resource is not there is an orphan suspect: deleted when, ORPHAN_GRACE later, it is
    still not there and the API says it is gone. kopf keeps one index, `kaito_configmap_versions`, for
    the InferenceSet controller."""
    pokes: dict[tuple[str, str, str], asyncio.Event] = {}
    rendered: dict[tuple[str, str, str], dict[tuple[str, str], dict]] = {}  # resource -> (kind, name) -> object
    pods: dict[tuple[str, str, str], dict[str, dict]] = {}  # resource -> name -> pod
    informers: list[Informer] = []
    suspects: dict[str, tuple[float, tuple[str, str, str]]] = {}  # NodeClaim -> (since, its resource)
    selectors: dict[tuple[str, str, str], tuple[dict, list]] = {}  # resource -> (matchLabels, matchExpressions)
    collector: list[asyncio.Task] = []
    states: dict[tuple[str, str, str], str] = {}
    nodes_seen: dict[str, str] = {}  # node name -> digest of what a reconcile reads of it
    nodes: dict[str, dict] = {}  # node name -> node (slimmed)
    config_maps: dict[str, dict[str, str]] = {}  # namespace -> ConfigMap name -> resourceVersion
    bodies: dict[tuple[str, str, str], dict] = {}  # resource -> the resource, as its watch last showed it
    loops: dict[tuple[str, str, str], asyncio.Task] = {}  # resource -> its keep_reconciled
    cleanups: set[asyncio.Task] = set()  # the NodeClaim cleanups of resources gone
    cleaned: set[tuple[str, str, str]] = set()  # resources whose finalizer went after their NodeClaims did
    kube_holder: list[Kube] = []
    pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="kaito-reconcile")
    workers = asyncio.Semaphore(cfg.workers)

    def kube() -> Kube:
        if not kube_holder:
            # a connection for each worker and handler thread, and each watch (held while it streams): in each
            # namespace kaito's objects, ConfigMaps and the resources; cluster-wide NodeClaims and nodes; and
            # the InferenceSets' Workspaces (their controller's client shares these connections)
            watches = (len(WATCHED) + 1 + len(LABELS)) * max(1, len(cfg.namespaces)) + len(LABELS) + 2
            kube_holder.append(kube_factory(connections=2 * cfg.workers + watches))
        return kube_holder[0]

    def poke(key: tuple[str, str, str]) -> None:
        if key in pokes:
            pokes[key].set()

    def count(key: tuple[str, str, str], state: str | None) -> None:
        """The resources-by-state gauge, moved by one resource's change."""
        before = states.pop(key, None) if state is None else states.get(key)
        if before == state:
            return
        if before:
            BY_STATE.labels(key[0], before).dec()
        if state:
            states[key] = state
            BY_STATE.labels(key[0], state).inc()

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, retry: int, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = NoDiffBase()
        settings.posting.enabled = False
        settings.watching.server_timeout = 300
        settings.networking.request_timeout = 60
        settings.networking.error_backoffs = Backoffs()
        # a timer still running when its resource is deleted (a ModelMirror's pass deletes its own mirror)
        # is checked again after this long before kopf removes the finalizer; kopf's default is 60 s
        settings.background.cancellation_polling = 1
        # the handlers' blocking calls (asyncio.to_thread: deletions, cleanups, orphan checks) get as many
        # threads as the reconciles: a request retried after a backoff holds its thread meanwhile
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(cfg.workers, "kaito-handler"))
        watched = [*WATCHED, NODECLAIM, ("v1", "Node"), *((API_VERSION, kind) for kind in LABELS)]

        def discover() -> Kube:
            k = kube()
            for api_version, kind in watched:
                k.resource(api_version, kind)
            return k

        try:
            k = await asyncio.to_thread(discover)  # discovery once, before the watches start
        except ApiException as e:  # the API failed past the client's retries: try again soon, not in kopf's 60 s
            raise kopf.TemporaryError(f"discovery failed: {e.status} {e.reason}", delay=backoff(retry + 1, cap=30))
        loop = asyncio.get_running_loop()
        for api_version, kind in WATCHED:
            for namespace in cfg.namespaces or [None]:
                informers.append(Informer(k, api_version, kind, "app.kubernetes.io/managed-by=kaito", seen_pod
                                          if kind == "Pod" else seen_object, loop, namespace).start())
        for label in LABELS.values():  # cluster scoped; kaito's carry their resource's labels
            informers.append(Informer(k, *NODECLAIM, label, seen_claim, loop).start())
        informers.append(Informer(k, "v1", "Node", "", seen_node, loop).start())
        for namespace in cfg.namespaces or [None]:
            informers.append(Informer(k, "v1", "ConfigMap", "", seen_config_map, loop, namespace).start())
            for kind in LABELS:  # whole objects: what a reconcile renders
                informers.append(Informer(k, API_VERSION, kind, "", seen_resource, loop, namespace, full=True).start())
        collector.append(loop.create_task(collect_orphans()))

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        for task in [*collector, *loops.values()]:
            task.cancel()
        for informer in informers:
            informer.stop()
        pool.shutdown(wait=False, cancel_futures=True)

    async def versions(body: kopf.Body, **_: Any) -> dict:
        return {body["metadata"]["namespace"]: (body["metadata"]["name"], body["metadata"]["resourceVersion"])}

    kopf.index("", "v1", "configmaps", registry=registry, id="kaito_configmap_versions")(versions)  # InferenceSets'

    def observe(key: tuple[str, str, str], body: dict) -> Seen:
        """What the caches hold for one resource (on the event loop, where the watches change them)."""
        namespace = key[1]
        objects = dict(rendered.get(key, {}))
        its_pods = list(pods.get(key, {}).values())
        spec = _compute_of(body)
        names = {*(spec.get("preferredNodes") or []), *((p.get("spec") or {}).get("nodeName") for p in its_pods),
                 *((o.get("status") or {}).get("nodeName") for o in objects.values() if o["kind"] == "NodeClaim")}
        seen = {name: nodes[name] for name in names if name in nodes}
        sel = spec.get("labelSelector") or {}
        if not cfg.auto_provision and (sel.get("matchLabels") or sel.get("matchExpressions")):
            seen |= {name: node for name, node in nodes.items()
                     if selects(node["metadata"].get("labels") or {}, sel.get("matchLabels"),
                                sel.get("matchExpressions"))}
        return Seen(objects, its_pods, seen, dict(config_maps.get(namespace, {})))

    def keep_written(key: tuple[str, str, str], body: dict) -> None:
        """kaito's own write of a resource, kept unless it is gone (its DELETED event ends its loop) or the
        watch brought a newer version already."""
        if key in bodies and newer(body, bodies[key]):
            bodies[key] = body

    async def keep_reconciled(key: tuple[str, str, str]) -> None:
        """A resource's life in the operator, from its first event to its last: its finalizer added, its
        reconciles (again on a poke, every resync, after a failure with backoff), and once it is being deleted
        its cleanup (its NodeClaims gone) before the finalizer is removed."""
        kind, ns, name = key
        event = pokes.setdefault(key, asyncio.Event())
        failures = 0
        try:
            while (body := bodies.get(key)) is not None:
                event.clear()
                meta = body["metadata"]
                pause = None  # seconds to wait whatever pokes come (a cleanup or finalizer that failed)
                try:
                    if meta.get("deletionTimestamp"):
                        wait = None
                        if FINALIZER in (meta.get("finalizers") or []):
                            left = await delete(body)
                            if left:
                                log.info("waiting for NodeClaims to go", extra={"resource": f"{ns}/{name}",
                                                                                 "left": left})
                                pause = 2.0
                            else:
                                cleaned.add(key)  # its DELETED event needs no cleanup
                                keep_written(key, await asyncio.to_thread(kube().finalize, body, FINALIZER, False))
                                failures = 0
                    else:
                        if FINALIZER not in (meta.get("finalizers") or []):  # before anything is made
                            keep_written(key, await asyncio.to_thread(kube().finalize, body, FINALIZER, True))
                            continue  # with the finalizer (or a newer version the watch brought)
                        wait, failures = await run(key, body, failures)
                except ConflictError:  # it changed while we looked: its change pokes us
                    wait = random.uniform(0.1, 0.3)
                except NotFoundError:  # gone: its DELETED event ends this
                    wait = None
                except Exception as e:  # noqa: BLE001 - retried with backoff
                    failures += 1
                    pause = backoff(failures)
                    log.warning("finalizer or cleanup failed", extra={"kind": kind, "resource": f"{ns}/{name}",
                                                                      "retry_in_s": round(pause, 1),
                                                                      "error": str(e)[:500]})
                if pause is not None:
                    await asyncio.sleep(pause)
                    continue
                try:
                    await asyncio.wait_for(event.wait(), wait)
                except TimeoutError:
                    pass
        finally:
            pokes.pop(key, None)
            loops.pop(key, None)
            count(key, None)

    async def run(key: tuple[str, str, str], body: dict, failures: int) -> tuple[float, int]:
        """One reconcile on the worker pool, the caches read as it starts; returns (seconds until the next,
        failures in a row)."""
        kind, ns, name = key
        for informer in informers:
            await informer.listed.wait()
        async with workers:  # at most cfg.workers at once
            t0 = time.perf_counter()
            RECONCILES.labels(kind).inc()
            try:
                state = await asyncio.get_running_loop().run_in_executor(pool, reconcile, kube(), cfg, dict(body),
                                                                         observe(key, body))
                if state:
                    count(key, state)
                return cfg.resync * random.uniform(0.9, 1.1), 0  # resyncs spread out
            except ConflictError:  # it changed while we looked: look again soon (that change pokes us too)
                return random.uniform(0.1, 0.3), failures
            except Exception as e:  # noqa: BLE001 - any failure is retried with backoff
                ERRORS.labels(kind).inc()
                wait = backoff(failures + 1)
                log.warning("reconcile failed", extra={"kind": kind, "resource": f"{ns}/{name}",
                                                       "retry_in_s": round(wait, 1), "error": str(e)[:500]})
                return wait, failures + 1
            finally:
                DURATION.labels(kind).observe(time.perf_counter() - t0)

    def seen_resource(type: str, body: dict) -> None:
        """A Workspace or RAGEngine changed: keep it and its node label selector, and look again at it
        (unless it is its own write coming back); new: its loop starts; gone: its loop ends, and its
        NodeClaims go too unless its loop saw them gone (not so when its finalizer was removed by hand)."""
        key = (body["kind"], body["metadata"]["namespace"], body["metadata"]["name"])
        if type == "DELETED":
            bodies.pop(key, None)
            selectors.pop(key, None)
            kube().forget(body)
            poke(key)
            if key in cleaned:
                cleaned.discard(key)
                return
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(cleanup, kube(), *key))
            cleanups.add(task)  # held until done
            task.add_done_callback(cleanups.discard)
            return
        bodies[key] = body
        sel = _compute_of(body).get("labelSelector") or {}
        selectors[key] = (sel.get("matchLabels") or {}, sel.get("matchExpressions") or [])
        if key not in loops:
            loops[key] = asyncio.get_running_loop().create_task(keep_reconciled(key))
        elif not kube().echo(body):
            poke(key)

    def seen_config_map(type: str, cm: dict) -> None:
        """The versions of a namespace's ConfigMaps: a reconcile reads one again only at a new version."""
        namespace, name = cm["metadata"]["namespace"], cm["metadata"]["name"]
        if type == "DELETED":
            config_maps.get(namespace, {}).pop(name, None)
        else:
            config_maps.setdefault(namespace, {})[name] = cm["metadata"]["resourceVersion"]

    def keep(key: tuple[str, str, str] | None, obj: dict, type: str) -> bool:
        """Keep an object kaito renders (slimmed) in the cache; whether it is news to its resource (not the
        echo of kaito's own write)."""
        if key is None:
            return False
        objects = rendered.setdefault(key, {})
        if type == "DELETED":
            objects.pop((obj["kind"], obj["metadata"]["name"]), None)
            if not objects:
                del rendered[key]
            kube().forget(obj)
            return True
        objects[(obj["kind"], obj["metadata"]["name"])] = obj
        return not kube().echo(obj)

    def seen_object(type: str, obj: dict) -> None:
        """An object kaito made in a namespace changed (or went): keep it, and look again at its resource."""
        key = owner(obj["metadata"].get("labels") or {}, obj["metadata"].get("namespace"))
        if keep(key, obj, type):
            poke(key)  # type: ignore[arg-type]

    def seen_pod(type: str, pod: dict) -> None:
        if key := owner(pod["metadata"].get("labels") or {}, pod["metadata"].get("namespace")):
            found = pods.setdefault(key, {})
            if type == "DELETED":
                found.pop(pod["metadata"]["name"], None)
                if not found:
                    del pods[key]
            else:
                found[pod["metadata"]["name"]] = pod
            poke(key)

    def seen_node(type: str, body: dict) -> None:
        """A node changed what a reconcile reads of it: keep it, and look again at the resources it may serve
        (its NodeClaim's, and those whose label selector picks it)."""
        name, labels = body["metadata"]["name"], body["metadata"].get("labels") or {}
        view = digest({k: v for k, v in body.items() if k != "metadata"} | {"labels": labels})
        if type == "DELETED":
            nodes.pop(name, None)
            nodes_seen.pop(name, None)
        else:
            nodes[name] = body
            if nodes_seen.get(name) == view:
                return
            nodes_seen[name] = view
        if key := owner(labels, None):
            poke(key)
        for key, (match, exprs) in selectors.items():
            if (match or exprs) and selects(labels, match, exprs):
                poke(key)

    async def delete(body: dict) -> int:
        """The resource is being deleted: say so in its status and delete its NodeClaims; returns how many
        are still there (its loop asks again until none is)."""
        kind, ns, name = body["kind"], body["metadata"]["namespace"], body["metadata"]["name"]
        k = kube()
        deleting = st.Cond(st.DELETING[kind], True, "Deleting", "deleting the resource's NodeClaims and objects")
        old = ((await asyncio.to_thread(k.get, API_VERSION, kind, name, ns)) or body).get("status") or {}
        await asyncio.to_thread(st.write, k, API_VERSION, kind, name, ns, old,
                                {"conditions": st.conditions(old.get("conditions"),
                                                             st.kept(old, st.DELETING[kind]) + [deleting])},
                                uid=body["metadata"].get("uid"))
        return await asyncio.to_thread(cleanup, k, kind, ns, name)

    def seen_claim(type: str, claim: dict) -> None:
        """A NodeClaim changed: keep it and look again at its resource; one whose resource the index lacks
        (gone, or not listed by kopf yet) is an orphan suspect."""
        key, name = owner(claim["metadata"].get("labels") or {}, None), claim["metadata"]["name"]
        if keep(key, claim, type):
            poke(key)  # type: ignore[arg-type]
        if type == "DELETED" or claim["metadata"].get("deletionTimestamp") or key is None or key in selectors:
            suspects.pop(name, None)
        else:
            suspects.setdefault(name, (time.monotonic(), key))

    async def collect_orphans() -> None:
        """Delete the NodeClaims whose resource is gone (deleted without its finalizer's cleanup, e.g. while
        the operator was down): suspects for ORPHAN_GRACE that the index still lacks and the API confirms."""
        while True:
            await asyncio.sleep(ORPHAN_GRACE / 4)
            for name, (since, key) in list(suspects.items()):
                if key in selectors or time.monotonic() - since < ORPHAN_GRACE:
                    continue
                suspects.pop(name, None)
                try:
                    if await asyncio.to_thread(kube().get, API_VERSION, key[0], key[2], key[1]) is None:
                        log.info("deleting an orphaned NodeClaim", extra={"nodeclaim": name, "owner": "/".join(key)})
                        await asyncio.to_thread(kube().delete, *NODECLAIM, name)
                except Exception as e:  # noqa: BLE001 - the next time it is seen, it is looked at again
                    log.warning("orphan check failed", extra={"nodeclaim": name, "error": str(e)[:300]})

