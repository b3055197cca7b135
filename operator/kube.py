"""A small facade over the `kubernetes` client's DynamicClient: objects are plain dicts, as render()
gives them. `apply` is server-side apply as field manager `kaito` (forcing conflicts: kaito owns what it
renders), skipped when the object is as kaito's last write left it and carries this render's hash
(`kaito.sh/rendered-hash`). `slim` is what the operator's watch caches keep of an object.

Every request is retried where it failed when the API server answers 429 (after its Retry-After), 500,
502, 503 or 504, or the connection fails: urllib3's Retry (the client's `Configuration.retries`), backing
off exponentially with jitter from the first retry, a bounded number of times (`RETRIES`). A caller sees
the error only once they are spent.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError, UnprocessibleEntityError
from kubernetes.watch.watch import iter_resp_lines
from urllib3.util.retry import Retry

log = logging.getLogger("kaito.operator")
MERGE = "application/merge-patch+json"
FIELD_MANAGER = "kaito"
RENDERED_HASH = "kaito.sh/rendered-hash"  # on every object kaito applies: a digest of what it rendered
APPLIED = "appliedFields"  # in a slimmed object: a digest of the fields kaito's applies own in it


class Backoff(Retry):
    """urllib3's Retry backing off before every retry, the first too (urllib3 retries at once first):
    `backoff_factor` * 2^(retries so far), up to `backoff_max`, times a random 0.5-1.5 (so clients that failed
    together do not retry together). A Retry-After the server sends is slept instead."""

    def get_backoff_time(self) -> float:
        return min(self.backoff_max, self.backoff_factor * 2 ** (len(self.history) - 1)) * random.uniform(0.5, 1.5)


# 6 retries, about 0.2, 0.4, 0.8, 1.6, 3.2 and 6.4 s apart (each +-50%): 13 s at most before a caller sees the error
RETRIES = Backoff(total=6, backoff_factor=0.2, backoff_max=8, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=None, raise_on_status=False, respect_retry_after_header=True)


def backoff(failures: int, cap: float = 300.0) -> float:
    """Seconds before the next try after `failures` failures in a row: doubling from 1, capped, with jitter
    (so what failed together does not retry together)."""
    return min(cap, 2.0 ** min(failures - 1, 12)) * random.uniform(0.8, 1.2)


def _plain(_client: Any, data: Any) -> Any:
    """The DynamicClient's response as the JSON it is (not its ResourceInstance wrapper)."""
    return data


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:24]


def rendered_hash(obj: dict) -> str:
    """A digest of an object as kaito renders it (its status aside)."""
    return digest({k: v for k, v in obj.items() if k != "status"})


def applied_fields(obj: dict) -> str | None:
    """A digest of the fields kaito's server-side applies own in a live object (its managedFields). Another
    writer that changes or removes one of them takes it from kaito, and the digest changes; fields others
    add, and status writes, leave it as it is."""
    for entry in obj["metadata"].get("managedFields") or []:
        if (entry.get("manager"), entry.get("operation"), entry.get("subresource")) == (FIELD_MANAGER, "Apply", None):
            return digest(entry.get("fieldsV1"))
    return None


def slim(obj: Any) -> dict:
    """What the watch caches keep of an object: the metadata the operator reads (name, namespace, uid,
    resourceVersion, labels, its owners' uids, deletion, kaito's rendered hash), the digest of the fields
    kaito applied, the status (a node's capacity and conditions only) and a pod's node; not the spec, the
    other annotations or managedFields."""
    meta = obj["metadata"]
    kept = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "labels", "deletionTimestamp")
            if meta.get(k)}
    if meta.get("ownerReferences"):
        kept["ownerReferences"] = [{"uid": ref.get("uid")} for ref in meta["ownerReferences"]]
    if rendered := (meta.get("annotations") or {}).get(RENDERED_HASH):
        kept["annotations"] = {RENDERED_HASH: rendered}
    out: dict[str, Any] = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "metadata": kept}
    if fields := applied_fields(obj):
        out[APPLIED] = fields
    status = obj.get("status")
    if status and obj.get("kind") == "Node":
        status = {"capacity": status.get("capacity") or {},
                  "conditions": [{k: c.get(k) for k in ("type", "status", "reason")} for c in status.get("conditions")
                                 or []]}
    if status:
        out["status"] = status
    if obj.get("kind") == "Pod" and (node := (obj.get("spec") or {}).get("nodeName")):
        out["spec"] = {"nodeName": node}
    return out


def _ref(obj: dict) -> tuple[str, str, str, str]:
    return obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace") or "", obj["metadata"]["name"]


def newer(a: dict, b: dict) -> bool:
    """Whether `a` is a later version of the same object than `b` (resourceVersions are etcd revisions,
    compared as integers as client-go's mutation cache does)."""
    return int(a["metadata"]["resourceVersion"]) > int(b["metadata"]["resourceVersion"])


def load_config() -> None:
    """In a pod: its service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except config.ConfigException as e:
            raise SystemExit(f"kaito-operator: no cluster to talk to (not in a pod, and {e}); set KUBECONFIG") from None


def selector_string(labels: dict[str, str] | None = None, expressions: list[dict] | None = None) -> str:
    """A LabelSelector (matchLabels + matchExpressions) in the API's query syntax."""
    parts = [f"{k}={v}" for k, v in sorted((labels or {}).items())]
    for e in expressions or []:
        op, key, values = e["operator"], e["key"], ",".join(e.get("values") or [])
        parts.append({"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})", "Exists": key,
                      "DoesNotExist": f"!{key}"}[op])
    return ",".join(parts)


def selects(labels: dict[str, str], match: dict[str, str] | None = None, expressions: list[dict] | None = None) -> bool:
    """Whether a LabelSelector (matchLabels + matchExpressions) selects an object with these labels."""
    if any(labels.get(k) != v for k, v in (match or {}).items()):
        return False
    for e in expressions or []:
        value, values = labels.get(e["key"]), e.get("values") or []
        if not {"In": value in values, "NotIn": value not in values, "Exists": e["key"] in labels,
                "DoesNotExist": e["key"] not in labels}[e["operator"]]:
            return False
    return True


class Kube:
    """Safe to share between threads: discovery (lazy, cached in a file of this client's own) runs under a lock.
    `connections`: HTTP connections kept to the API server (at least the client's default)."""

    def __init__(self, api_client: client.ApiClient | None = None, connections: int = 0) -> None:
        cache = os.path.join(tempfile.gettempdir(), f"kaito-discovery-{os.getpid()}-{id(self)}.json")
        self._lock = threading.Lock()
        self._resources: dict[tuple[str, str], Any] = {}
        self._written: dict[tuple[str, str, str, str], dict] = {}  # each object as kaito's last write left it, slimmed
        self._config_maps: dict[tuple[str, str], dict | None] = {}  # ConfigMaps read, by (namespace, name)
        if api_client is None:
            cfg = client.Configuration.get_default_copy()
            cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize, connections)
            cfg.retries = RETRIES
            api_client = client.ApiClient(cfg)
        with self._lock:
            self.dyn = DynamicClient(api_client, cache_file=cache)

    def sibling(self) -> Kube:
        """A client on this one's connections and discovery, with a record of writes of its own: for a
        controller whose writes another controller must see as news, not as the echo of its own."""
        other = copy.copy(self)
        other._written, other._config_maps = {}, {}
        return other

    def resource(self, api_version: str, kind: str):
        """The DynamicClient's resource of a kind (discovered once, under the lock)."""
        key = (api_version, kind)
        if key not in self._resources:
            with self._lock:
                self._resources[key] = self.dyn.resources.get(api_version=api_version, kind=kind)
        return self._resources[key]

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict | None:
        try:
            return self.resource(api_version, kind).get(name=name, namespace=namespace, serializer=_plain)
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, namespace: str | None = None, selector: str = "") -> list[dict]:
        found = self.resource(api_version, kind).get(namespace=namespace, label_selector=selector or None,
                                                     serializer=_plain)
        return found["items"]

    def apply(self, obj: dict, cache: Mapping[tuple[str, str], dict] | None = None) -> dict:
        """Server-side apply `obj` (field manager kaito, conflicts forced) with its rendered hash. With `cache`
        (what the watch cache holds of such objects, slimmed, by kind and name), nothing is written when
        nothing would change: the newer of the cached object and kaito's last write of it carries this
        render's hash, and nobody took a field from kaito since that write. Without one, it is written (a
        no-op at the server when nothing changed). Returns the object as now known, slimmed."""
        rendered = rendered_hash(obj)
        key = _ref(obj)
        mine = self._written.get(key)
        if cache is not None and mine is not None:
            live = cache.get((obj["kind"], obj["metadata"]["name"]))
            known = live if live is not None and not newer(mine, live) else mine
            if not known["metadata"].get("deletionTimestamp") and known.get(APPLIED) == mine.get(APPLIED) and (
                    known["metadata"].get("annotations") or {}).get(RENDERED_HASH) == rendered:
                return known
        meta = obj["metadata"]
        body = {**obj, "metadata": {**meta, "annotations": {**(meta.get("annotations") or {}), RENDERED_HASH: rendered}}}
        res = self.resource(obj["apiVersion"], obj["kind"])
        namespace = meta.get("namespace") if res.namespaced else None

        def apply() -> dict:
            return slim(res.server_side_apply(body=json.dumps(body),  # as JSON: the client would walk it first
                                              name=meta["name"], namespace=namespace, field_manager=FIELD_MANAGER,
                                              force_conflicts=True, serializer=_plain))

        try:
            done = apply()
        except UnprocessibleEntityError as e:
            if obj["kind"] != "StatefulSet" or "spec: Forbidden" not in str(e.body):
                raise
            self._replace_statefulset(res, meta["name"], namespace)
            done = apply()
        self._written[key] = done
        return done

    def _replace_statefulset(self, res: Any, name: str, namespace: str | None, wait: float = 30) -> None:
        """A StatefulSet whose fixed fields changed (its claim templates: where its pods keep weights) is
        deleted with its pods orphaned, as `kubectl delete --cascade=orphan` does; the one applied next adopts
        them and rolls them to its template. Returns once it is gone."""
        log.info("re-creating a StatefulSet whose fixed fields changed", extra={"statefulset": f"{namespace}/{name}"})
        res.delete(name=name, namespace=namespace, body={"propagationPolicy": "Orphan"})
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                res.get(name=name, namespace=namespace)
            except NotFoundError:
                return
            time.sleep(0.2)
        raise TimeoutError(f"StatefulSet {namespace}/{name} still there {wait:.0f} s after its deletion")

    def echo(self, obj: Any) -> bool:
        """Whether a watch event's object is kaito's own last write of it (nothing new to look at). Once the
        watch has shown it, the record of that write keeps only its version, applied fields and status (what
        `latest` gives a body older than that write: a watch that resumes may show an earlier version again)."""
        key = _ref(obj)
        mine = self._written.get(key)
        if mine is None or mine["metadata"]["resourceVersion"] != obj["metadata"].get("resourceVersion"):
            return False
        self._written[key] = {"metadata": {"resourceVersion": mine["metadata"]["resourceVersion"]},
                              **{k: mine[k] for k in (APPLIED, "status") if k in mine}}
        return True

    def latest(self, obj: dict) -> dict:
        """`obj` as a watch showed it, or, when kaito's own status write of it is newer (its watch event not
        seen yet), with that write's status and resourceVersion: what the object is now, as nothing else
        could change it in between (the write was made over the version before)."""
        mine = self._written.get(_ref(obj))
        if mine is None or not newer(mine, obj):
            return obj
        return {**obj, "metadata": {**obj["metadata"], "resourceVersion": mine["metadata"]["resourceVersion"]},
                "status": mine.get("status") or {}}

    def forget(self, obj: Any) -> None:
        """The object is gone: its next apply creates it again."""
        self._written.pop(_ref(obj), None)

    def lookup(self, namespace: str, config_maps: Mapping[str, str]) -> Callable[[str, str], dict | None]:
        """The ConfigMaps and Secrets of a namespace by name, for validation and render. A ConfigMap only
        when the watch cache has it (`config_maps`: name -> resourceVersion), read once per version; a
        Secret from the API."""

        def lookup(kind: str, name: str) -> dict | None:
            if kind != "ConfigMap":
                return self.get("v1", kind, name, namespace)
            version = config_maps.get(name)
            if not version:
                return None
            known = self._config_maps.get((namespace, name))
            if known is None or known["metadata"]["resourceVersion"] != version:
                known = self._config_maps[(namespace, name)] = self.get("v1", "ConfigMap", name, namespace)
            return known

        return lookup

    def create(self, obj: dict) -> dict:
        res = self.resource(obj["apiVersion"], obj["kind"])
        ns = obj["metadata"].get("namespace") if res.namespaced else None
        return res.create(body=obj, namespace=ns, field_manager=FIELD_MANAGER, serializer=_plain)

    def ensure(self, obj: dict) -> None:
        """Create `obj` unless it was made or found already: an object shared by several resources and never
        changed after (a ModelMirror). `forget` it when it goes, so that the next call makes it again."""
        key = _ref(obj)
        if key in self._written:
            return
        try:
            done = slim(self.create(obj))
        except ConflictError:  # another resource's reconcile made it
            done = {"metadata": {"resourceVersion": "0"}}
        self._written[key] = done

    def proxy(self, namespace: str, pod: str, port: int, path: str) -> str:
        """GET `path` of a pod's `port` through the API server's pod proxy (what `kubectl get --raw` reads)."""
        api = client.CoreV1Api(self.dyn.client)
        return api.connect_get_namespaced_pod_proxy_with_path(f"{pod}:{port}", namespace, path,
                                                              _request_timeout=(5, 10))

    def patch(self, api_version: str, kind: str, name: str, namespace: str | None, body: dict) -> dict:
        return self.resource(api_version, kind).patch(body=body, name=name, namespace=namespace,
                                                      content_type=MERGE, field_manager=FIELD_MANAGER,
                                                      serializer=_plain)

    def finalize(self, obj: dict, finalizer: str, present: bool) -> dict:
        """Add (or remove) `finalizer` on `obj`, only if it is still at the version given (else kubernetes'
        ConflictError); returns the object as written. The write is remembered like kaito's others, so its
        watch event is not news."""
        meta = obj["metadata"]
        have = list(meta.get("finalizers") or [])
        want = [f for f in have if f != finalizer] + ([finalizer] if present else [])
        done = self.resource(obj["apiVersion"], obj["kind"]).patch(
            body={"metadata": {"finalizers": want, "resourceVersion": meta["resourceVersion"]}}, name=meta["name"],
            namespace=meta.get("namespace"), content_type=MERGE, field_manager=FIELD_MANAGER, serializer=_plain)
        self._written[_ref(done)] = slim(done)  # its watch event is an echo
        return done

    def patch_status(self, api_version: str, kind: str, name: str, namespace: str | None, status: dict,
                     resource_version: str | None = None) -> None:
        """Merge `status` in; with `resource_version`, only if the object is still at that version (else
        kubernetes' ConflictError: it changed since it was read)."""
        body: dict = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        done = self.resource(api_version, kind).status.patch(body=body, name=name, namespace=namespace,
                                                             content_type=MERGE, field_manager=FIELD_MANAGER,
                                                             serializer=_plain)
        self._written[_ref(done)] = slim(done)  # its watch event is an echo

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
        try:
            self.resource(api_version, kind).delete(name=name, namespace=namespace)
            return True
        except NotFoundError:
            return False


class Informer:
    """The feed of a watch cache: the objects of one kind a label selector picks (in one namespace, or all),
    listed, then watched from the listing's resourceVersion; a watch that ends, or fails (after the client's
    retries, and a backoff of its own), is resumed from the last version seen; one the API server answers
    410 Gone lists again. It runs in a thread of its own and hands each change to `notify(type, object)` on
    the event loop, slimmed unless `full` (an object a new listing lacks as DELETED); `listed` (an asyncio.Event of that
    loop) is set once the first listing is handed over."""

    def __init__(self, kube: Kube, api_version: str, kind: str, selector: str,
                 notify: Callable[[str, dict], None], loop: Any, namespace: str | None = None,
                 full: bool = False) -> None:
        self.kube, self.api_version, self.kind, self.selector = kube, api_version, kind, selector
        self.notify, self.loop, self.namespace, self.full = notify, loop, namespace, full
        self.listed = asyncio.Event()
        self._known: set[tuple[str, str]] = set()  # (namespace, name) of what the cache holds
        self._stopped = False

    def start(self) -> Informer:
        threading.Thread(target=self._run, name=f"watch-{self.kind.lower()}", daemon=True).start()
        return self

    def stop(self) -> None:
        """No more changes handed over; the thread ends when its watch does (within its timeout)."""
        self._stopped = True

    def _hand(self, type_: str, obj: dict) -> None:
        key = (obj["metadata"].get("namespace") or "", obj["metadata"]["name"])
        if type_ == "DELETED":
            self._known.discard(key)
        else:
            self._known.add(key)
        if not self._stopped:
            self.loop.call_soon_threadsafe(self.notify, type_, obj if self.full else slim(obj))

    def _list(self, res: Any) -> str:
        found = res.get(namespace=self.namespace, label_selector=self.selector, serializer=_plain)
        gone = self._known - {(o["metadata"].get("namespace") or "", o["metadata"]["name"]) for o in found["items"]}
        for namespace, name in gone:
            self._hand("DELETED", {"apiVersion": self.api_version, "kind": self.kind,
                                   "metadata": {"namespace": namespace, "name": name, "resourceVersion": "0"}})
        for obj in found["items"]:
            self._hand("ADDED", {"apiVersion": self.api_version, "kind": self.kind, **obj})
        self.loop.call_soon_threadsafe(self.listed.set)
        return found["metadata"]["resourceVersion"]

    def _run(self) -> None:
        version, failures = None, 0
        while not self._stopped:
            try:
                res = self.kube.resource(self.api_version, self.kind)
                version = version or self._list(res)
                resp = res.get(namespace=self.namespace, label_selector=self.selector, watch=True, serialize=False,
                               resource_version=version, allow_watch_bookmarks=True, timeout_seconds=300,
                               _request_timeout=(10, 330))
                failures = 0
                try:
                    for line in iter_resp_lines(resp):
                        event = json.loads(line) if line else None
                        if not event:
                            continue
                        if event["type"] == "ERROR":
                            raise ApiException(status=event["object"].get("code"), reason=event["object"].get("reason"))
                        version = event["object"]["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            self._hand(event["type"], event["object"])
                finally:
                    resp.release_conn()
            except Exception as e:  # noqa: BLE001 - expired (410): list again; else resume from `version`
                if isinstance(e, ApiException) and e.status == 410:
                    version = None
                elif not self._stopped:
                    failures += 1
                    wait = backoff(failures, cap=30)
                    log.warning("watch failed", extra={"kind": self.kind, "retry_in_s": round(wait, 1),
                                                       "error": str(e)[:300]})
                    time.sleep(wait)
