"""An HTTP fake of the Kubernetes API server on 127.0.0.1, for the controller tests and benchmark.

The real `kubernetes` client and kopf talk to it over HTTP. It answers as kube-apiserver does for what
the operator uses (`tests/test_operator_controller_fake.py` pins each behaviour):

- discovery (`/version`, `/api`, `/apis`, `/api/v1`, `/apis/G/V`, with `R/status` subresources);
- create (201, `generateName`: a taken name drawn again, 409 AlreadyExists, 422 without a name), get
  (404), list with label and field selectors, PUT (409 Conflict on a stale `metadata.resourceVersion`),
  PATCH (JSON merge patch; strategic merge patch read as a merge patch; JSON patch), DELETE;
- server-side apply (PATCH `application/apply-patch+yaml`, `fieldManager` required, `force`):
  `metadata.managedFields` per manager, operation and subresource (fieldsV1); an apply creates a
  missing object (audited as patch and create, as the API server authorizes it), sets what the
  manager applies, removes what the manager applied before and no longer does (unless another manager
  owns it too), and answers 409 when a field another manager owns would get another value (unless
  `force`, which takes the field over). Other writes make their manager (`fieldManager`, else the
  User-Agent up to its first `/`) own the fields they change, taken from the others. Lists are atomic
  (owned whole: the API server merges lists of maps by key, which one manager never notices);
- one global `resourceVersion` that grows on every write; a write that changes nothing changes
  neither the resourceVersion nor the watchers; `generation` grows when anything outside
  metadata and status changes;
- watches (`?watch=true`): newline-delimited JSON events from a `resourceVersion` (replayed from
  the history), the current objects as ADDED without one, `410 Gone` (an ERROR event) when the
  version is older than the history kept, `timeoutSeconds`; `drop_watches()` ends them all;
- the status subresource: the main resource ignores `status`, `/status` changes only `status`;
- the scale subresource of CRDs that declare one (`autoscaling/v1` Scale: GET, PUT, PATCH of
  spec.replicas at the CRD's specReplicasPath; status.replicas and selector from its status paths);
- a StatefulSet's spec changes only in the fields the API server lets change (422 otherwise);
- finalizers (delete sets `deletionTimestamp`; the object goes when the last finalizer does) and
  the garbage collector's cascade along `ownerReferences` (background and foreground alike; orphan
  leaves dependents);
- CustomResourceDefinitions: creating one serves its resource;
- an audit of the verbs and resources a client asked for (to check RBAC rules against), and a count
  of every request by verb (`verbs`);
- the pod proxy (`GET pods/NAME[:PORT]/proxy/PATH`), forwarded to the pod's address (`proxies`, for a
  pod whose process a test runs here);
- faults injected on purpose (`inject(Faults(...))`, changeable while it runs, seeded): a fraction of
  requests answered 500 or 429 with `Retry-After`, 409 Conflict on a fraction of the writes that name a
  resourceVersion, added latency, watches closed after a few seconds, 410 Gone on a fraction of the
  watches that resume from a past resourceVersion; each injected fault counted (`injected`) and each
  request of the faulted client traced (`trace`). `tests/test_kube_fake_faults.py` pins them.

Not covered (the README says so too): authentication and RBAC, admission webhooks and schema
validation of bodies, lists merged by key under server-side apply, defaulting, pods' graceful
deletion, namespace existence and deletion, pagination (`limit`/`continue` return everything),
protobuf, bookmarks.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import jsonpatch
from aiohttp import web


@dataclass(frozen=True)
class Kind:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = True  # has a status subresource
    scale: tuple[str, str, str | None] | None = None  # the scale subresource: spec, status, selector paths

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


BUILTIN = [
    Kind("", "v1", "namespaces", "Namespace", namespaced=False),
    Kind("", "v1", "nodes", "Node", namespaced=False),
    Kind("", "v1", "pods", "Pod"),
    Kind("", "v1", "services", "Service"),
    Kind("", "v1", "configmaps", "ConfigMap", status=False),
    Kind("", "v1", "secrets", "Secret", status=False),
    Kind("", "v1", "events", "Event", status=False),
    Kind("", "v1", "serviceaccounts", "ServiceAccount", status=False),
    Kind("rbac.authorization.k8s.io", "v1", "roles", "Role", status=False),
    Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", status=False),
    Kind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim"),
    Kind("apps", "v1", "statefulsets", "StatefulSet"),
    Kind("apps", "v1", "deployments", "Deployment"),
    Kind("batch", "v1", "jobs", "Job"),
    Kind("coordination.k8s.io", "v1", "leases", "Lease", status=False),
    Kind("events.k8s.io", "v1", "events", "Event", status=False),
    Kind("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", namespaced=False),
    Kind("karpenter.sh", "v1", "nodeclaims", "NodeClaim", namespaced=False),
]
HISTORY = 200_000  # watch events kept for replay
NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # of generated names, as the API server draws them
STATEFULSET_MUTABLE = ("replicas", "ordinals", "template", "updateStrategy", "persistentVolumeClaimRetentionPolicy",
                       "minReadySeconds")  # the rest of its spec is fixed at creation


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def status_error(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    return web.json_response(body, status=code)


_REQ = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in [*parts, cur] if p.strip()]


def label_match(selector: str | None, labels: dict[str, str]) -> bool:
    """Kubernetes label selector syntax: a=b, a==b, a!=b, a in (x,y), a notin (x), a, !a."""
    for req in _split_selector(selector or ""):
        if m := _REQ.match(req):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (op == "in") != (labels.get(key) in values):
                return False
        elif "!=" in req:
            key, value = (s.strip() for s in req.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in req:
            key, value = (s.strip() for s in req.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif req.strip().startswith("!"):
            if req.strip()[1:] in labels:
                return False
        elif req.strip() not in labels:
            return False
    return True


def field_match(selector: str | None, obj: dict) -> bool:
    for req in _split_selector(selector or ""):
        negate = "!=" in req
        path, value = (s.strip() for s in req.replace("!=", "=").replace("==", "=").split("=", 1))
        node: Any = obj
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if (str(node if node is not None else "") == value) == negate:
            return False
    return True


# --- field management (server-side apply) -------------------------------------------------------------

APPLY = "application/apply-patch+yaml"
SERVER_META = {"name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp", "managedFields",
               "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"}
Path = tuple[str, ...]


def fields(obj: dict, part: str) -> dict[Path, Any]:
    """path -> value of each field a manager can own in a `part` of an object: `status`, `main` (all but the
    status, for kinds with a status subresource) or `all`; never the server's metadata. Maps are walked;
    lists and scalars are leaves."""
    out: dict[Path, Any] = {}

    def walk(node: Any, path: Path) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, (*path, k))
        else:
            out[path] = node

    for key, value in obj.items():
        if part == "status" and key != "status" or key in ("apiVersion", "kind") or part == "main" and key == "status":
            continue
        if key == "metadata":
            value = {k: v for k, v in value.items() if k not in SERVER_META}
            if not value:
                continue
        walk(value, (key,))
    return out


def _get(obj: Any, path: Path) -> Any:
    for part in path:
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _set(obj: dict, path: Path, value: Any) -> None:
    for part in path[:-1]:
        if not isinstance(obj.get(part), dict):
            obj[part] = {}
        obj = obj[part]
    obj[path[-1]] = copy.deepcopy(value)


def _unset(obj: dict, path: Path) -> None:
    """Remove a field, and the maps it leaves empty."""
    parents = [obj]
    for part in path[:-1]:
        obj = obj.get(part)
        if not isinstance(obj, dict):
            return
        parents.append(obj)
    parents[-1].pop(path[-1], None)
    for parent, part in zip(reversed(parents[:-1]), reversed(path[:-1]), strict=True):
        if parent.get(part) == {}:
            del parent[part]


def encode(paths: set[Path]) -> dict:
    """A set of field paths as `fieldsV1` ({"f:spec": {"f:replicas": {}}})."""
    tree: dict = {}
    for path in sorted(paths):
        node = tree
        for part in path:
            node = node.setdefault(f"f:{part}", {})
    return tree


def decode(tree: dict, prefix: Path = ()) -> set[Path]:
    paths: set[Path] = set()
    for key, sub in tree.items():
        path = (*prefix, key[2:])
        paths |= decode(sub, path) if sub else {path}
    return paths


@dataclass
class Managed:
    """One entry of metadata.managedFields."""

    manager: str
    operation: str  # Apply | Update
    subresource: str  # "" or "status"
    paths: set[Path]
    time: str

    @classmethod
    def read(cls, obj: dict) -> list[Managed]:
        return [cls(e["manager"], e["operation"], e.get("subresource", ""), decode(e.get("fieldsV1") or {}), e["time"])
                for e in obj["metadata"].get("managedFields") or []]

    def dump(self, api_version: str) -> dict:
        entry = {"manager": self.manager, "operation": self.operation, "apiVersion": api_version, "time": self.time,
                 "fieldsType": "FieldsV1", "fieldsV1": encode(self.paths)}
        return {**entry, "subresource": self.subresource} if self.subresource else entry


def write_managed(obj: dict, entries: list[Managed], api_version: str) -> None:
    kept = [e.dump(api_version) for e in entries if e.paths]
    if kept:
        obj["metadata"]["managedFields"] = kept
    else:
        obj["metadata"].pop("managedFields", None)


def take(entries: list[Managed], manager: str, operation: str, sub: str, paths: set[Path], lose: set[Path]) -> None:
    """`manager`'s entry (operation, subresource) owns `paths` from now on (Apply) or in addition
    (Update); every other entry loses `lose`. The entry's time changes when its fields do."""
    mine = next((e for e in entries if (e.manager, e.operation, e.subresource) == (manager, operation, sub)), None)
    for e in entries:
        if e is not mine:
            e.paths -= lose
    owned = paths if operation == "Apply" else ((mine.paths if mine else set()) - lose) | paths
    if mine is None:
        entries.append(Managed(manager, operation, sub, owned, now()))
    elif owned != mine.paths:
        mine.paths, mine.time = owned, now()


class Gone(Exception):
    pass


@dataclass
class Faults:
    """What the fake does wrong on purpose, to the requests of one client (`token`, its bearer token: the
    kubeconfig's, the operator's, by default; None: every client). Rates are fractions of its requests,
    drawn from a random generator seeded with `seed`: the same requests in the same order meet the same
    faults. A fault answers in the API server's place, before the request is served (nothing is written)."""

    error_rate: float = 0.0  # requests answered 500 InternalError
    throttle_rate: float = 0.0  # requests answered 429 TooManyRequests with Retry-After: `retry_after`
    retry_after: int = 1
    conflict_rate: float = 0.0  # writes that name a resourceVersion (PUT, a patch's metadata.resourceVersion)
    #                             answered 409 Conflict, as when another writer got there first
    latency: float = 0.0  # seconds added before each request is served
    watch_lifetime: float = 0.0  # seconds after which a watch is closed (0: when the client asks)
    gone_rate: float = 0.0  # watches from a resourceVersion older than the newest answered 410 Gone
    seed: int = 0
    token: str | None = "fake-token"


class KubeFake:
    """The API server: `start()` serves it from a thread (its own event loop); `url` is its address."""

    def __init__(self) -> None:
        self.kinds: dict[tuple[str, str, str], Kind] = {}
        for k in BUILTIN:
            self.add_kind(k)
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (kind key, namespace, name) -> object
        self.rv = 0
        self.history: list[tuple[int, str, str | None, dict, bytes]] = []  # (rv, kind key, namespace, labels, line)
        self.changed: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.requests = 0
        self.verbs: Counter[str] = Counter()  # every request by verb (get, list, watch, create, patch, apply...)
        self.history_limit = HISTORY
        self.audit: set[tuple[str, str, str]] = set()  # (verb, group, resource[/sub]) asked with `audit_token`
        self.audit_token = "fake-token"
        self.created_at: dict[tuple[str, str, str], float] = {}  # key -> time.monotonic() of its creation  # the token of kubeconfig(): the operator's requests
        self.url = ""
        self.epoch = 0  # drop_watches() ends the watches of an older epoch
        self.intercept = None  # async (request, handler) -> response: a test's hand on every request
        self.faults: Faults | None = None
        self.proxies: dict[tuple[str, str], str] = {}  # (namespace, pod) -> "host:port" of the pod proxy
        self._random = random.Random(0)
        self.injected: Counter[str] = Counter()  # faults injected: "500", "429", "409", "410", "closed"
        self.trace: list[tuple[float, str, str, int]] = []  # (time.monotonic() at its start, method, path?query,
        #                                                     status) of each request of the faulted client

    def inject(self, faults: Faults | None) -> None:
        """Inject these faults from now on (None: none); the generator starts again from their seed, the
        counts and the trace from empty. Safe from any thread."""
        self._random = random.Random(faults.seed if faults else 0)
        self.injected = Counter()
        self.trace = []
        self.faults = faults

    def _faulted(self, request: web.Request) -> Faults | None:
        f = self.faults
        if f is None or f.token is not None and request.headers.get("Authorization") != f"Bearer {f.token}":
            return None
        return f

    # --- kinds ------------------------------------------------------------------------------------

    def add_kind(self, kind: Kind) -> None:
        self.kinds[(kind.group, kind.version, kind.plural)] = kind

    @staticmethod
    def kkey(kind: Kind) -> str:
        return f"{kind.group}/{kind.plural}"

    # --- storage ----------------------------------------------------------------------------------

    def _emit(self, kind: Kind, type_: str, obj: dict) -> None:
        """Record a watch event, serialized once for every watcher (and so frozen as it is now)."""
        meta = obj["metadata"]
        line = json.dumps({"type": type_, "object": obj}).encode() + b"\n"
        self.history.append((self.rv, self.kkey(kind), meta.get("namespace"), dict(meta.get("labels") or {}), line))
        if len(self.history) > self.history_limit:
            del self.history[: len(self.history) - self.history_limit]
        assert self.changed is not None
        self.changed.set()
        self.changed = asyncio.Event()

    def _bump(self, obj: dict) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def _generate(self, kind: Kind, ns: str, prefix: str) -> str:
        """A name for `generateName`: the prefix and 5 characters of the API server's alphabet, drawn again
        while the name is taken (as the API server does since Kubernetes 1.31, up to 8 draws)."""
        for _ in range(8):
            name = prefix + "".join(random.choices(NAME_ALPHABET, k=5))
            if (self.kkey(kind), ns, name) not in self.objects:
                break
        return name

    def create(self, kind: Kind, ns: str | None, body: dict, manager: str | None = None,
               operation: str = "Update") -> tuple[int, dict]:
        meta = body.setdefault("metadata", {})
        if kind.namespaced:
            if meta.get("namespace") and ns and meta["namespace"] != ns:
                return 400, {"reason": "BadRequest", "message": "the namespace of the object does not match the "
                                                                 "namespace of the request"}
            meta["namespace"] = ns or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = self._generate(kind, meta.get("namespace", ""), meta["generateName"])
        if not meta.get("name"):
            return 422, {"reason": "Invalid", "message": f"{kind.kind}: metadata.name: Required value"}
        key = (self.kkey(kind), meta.get("namespace", ""), meta["name"])
        if key in self.objects:
            return 409, {"reason": "AlreadyExists", "message": f'{kind.plural} "{meta["name"]}" already exists'}
        body["apiVersion"], body["kind"] = kind.api_version, kind.kind
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        meta.pop("deletionTimestamp", None)
        meta.pop("managedFields", None)
        if kind.status:
            body.pop("status", None)
        if manager:
            write_managed(body, [Managed(manager, operation, "", set(fields(body, "all")), now())], kind.api_version)
        self._bump(body)
        self.objects[key] = body
        self.created_at[key] = time.monotonic()
        self._emit(kind, "ADDED", body)
        if kind.kind == "CustomResourceDefinition":
            spec = body.get("spec", {})
            for v in spec.get("versions", []):
                subs = v.get("subresources") or {}
                scale = subs.get("scale")
                self.add_kind(Kind(spec["group"], v["name"], spec["names"]["plural"], spec["names"]["kind"],
                                   spec.get("scope") == "Namespaced", "status" in subs,
                                   (scale["specReplicasPath"], scale["statusReplicasPath"],
                                    scale.get("labelSelectorPath")) if scale else None))
        return 201, body

    def update(self, kind: Kind, key: tuple, new: dict, sub: str | None, expect_rv: str | None,
               manager: str | None = None, managed: list[Managed] | None = None) -> tuple[int, dict]:
        """Replace an object (or its status); `manager` owns the fields this changes, or `managed` (an
        apply's) are the object's managed fields."""
        old = self.objects.get(key)
        if old is None:
            return 404, {"reason": "NotFound", "message": f'{kind.plural} "{key[2]}" not found'}
        if expect_rv and expect_rv != old["metadata"]["resourceVersion"]:
            return 409, {"reason": "Conflict", "message": f'Operation cannot be fulfilled on {kind.plural} "{key[2]}": '
                                                          "the object has been modified; please apply your changes "
                                                          "to the latest version and try again"}
        if sub == "status":  # only the status changes
            new = {**copy.deepcopy(old), "status": new.get("status")}
            if new["status"] is None:
                new.pop("status")
        else:
            meta = new["metadata"] = dict(new.get("metadata") or {})  # a merge patch shares the old one's
            for field in ("uid", "creationTimestamp", "namespace", "name", "generation", "deletionTimestamp"):
                if field in old["metadata"]:
                    meta[field] = old["metadata"][field]
                else:
                    meta.pop(field, None)
            new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
            if kind.status:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
            if kind.kind == "StatefulSet" and {k: v for k, v in (new.get("spec") or {}).items()
                                               if k not in STATEFULSET_MUTABLE} != {
                    k: v for k, v in (old.get("spec") or {}).items() if k not in STATEFULSET_MUTABLE}:
                return 422, {"reason": "Invalid", "message": f"StatefulSet.apps \"{old['metadata']['name']}\" is "
                             "invalid: spec: Forbidden: updates to statefulset spec for fields other than "
                             f"{', '.join(repr(f) for f in STATEFULSET_MUTABLE)} are forbidden"}
            if old["metadata"].get("deletionTimestamp"):  # finalizers may only be removed now
                new_f = set(meta.get("finalizers") or [])
                if new_f - set(old["metadata"].get("finalizers") or []):
                    return 422, {"reason": "Invalid", "message": "metadata.finalizers: Forbidden: no new finalizers "
                                                                 "can be added if the object is being deleted"}
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        new["metadata"].pop("managedFields", None)  # the server's, never a client's
        if old["metadata"].get("managedFields"):
            new["metadata"]["managedFields"] = copy.deepcopy(old["metadata"]["managedFields"])
        if managed is not None:
            write_managed(new, managed, kind.api_version)
        elif manager:
            part = self._part(kind, sub)
            before, after = fields(old, part), fields(new, part)
            changed = {p for p, v in after.items() if p not in before or before[p] != v}
            if changed or before.keys() - after.keys():
                entries = Managed.read(old)
                take(entries, manager, "Update", sub or "", changed, changed | (before.keys() - after.keys()))
                write_managed(new, entries, kind.api_version)

        def spec_part(o: dict) -> dict:
            return {k: v for k, v in o.items() if k not in ("metadata", "status")}

        if spec_part(new) != spec_part(old):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        if new == old:
            return 200, old  # no change: no new resourceVersion, no event
        self._bump(new)
        self.objects[key] = new
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(kind, key)
        else:
            self._emit(kind, "MODIFIED", new)
        return 200, new

    @staticmethod
    def _part(kind: Kind, sub: str | None) -> str:
        return "status" if sub == "status" else "main" if kind.status else "all"

    def apply(self, kind: Kind, ns: str | None, name: str, sub: str | None, body: Any, manager: str,
              force: bool) -> tuple[int, dict]:
        """Server-side apply of `body` by `manager` (the module's docstring says what it does)."""
        if not isinstance(body, dict) or (body.get("apiVersion"), body.get("kind")) != (kind.api_version, kind.kind):
            return 400, {"reason": "BadRequest", "message": f"an apply must be a {kind.api_version} {kind.kind}"}
        meta = body.get("metadata") or {}
        if meta.get("name", name) != name:
            return 400, {"reason": "BadRequest", "message": "the name of the object does not match the name on the URL"}
        key = (self.kkey(kind), ns or "" if kind.namespaced else "", name)
        live = self.objects.get(key)
        if live is None:
            if sub:
                return 404, {"reason": "NotFound", "message": f'{kind.plural} "{name}" not found'}
            return self.create(kind, ns, {**copy.deepcopy(body), "metadata": {**meta, "name": name}}, manager, "Apply")
        part = self._part(kind, sub)
        applied = fields(body, part)
        entries = Managed.read(live)
        mine = next((e for e in entries if (e.manager, e.operation, e.subresource) == (manager, "Apply", sub or "")),
                    None)
        theirs = {p for e in entries if e is not mine and e.subresource == (sub or "") for p in e.paths}
        conflicts = {p for p in applied if p in theirs and _get(live, p) != applied[p]}
        if conflicts and not force:
            owners = sorted({e.manager for e in entries if e.paths & conflicts})
            listed = ", ".join("." + ".".join(p) for p in sorted(conflicts))
            return 409, {"reason": "Conflict", "message": f"Apply failed with {len(conflicts)} conflict(s): conflict with "
                                                          f"{', '.join(map(repr, owners))}: {listed}"}
        new = copy.deepcopy(live)
        for path in (mine.paths if mine else set()) - applied.keys() - theirs:  # no longer applied: removed
            _unset(new, path)
        for path, value in applied.items():
            _set(new, path, value)
        take(entries, manager, "Apply", sub or "", set(applied), conflicts)
        return self.update(kind, key, new, sub, meta.get("resourceVersion"), managed=entries)

    def delete(self, kind: Kind, key: tuple, propagation: str = "Background") -> tuple[int, dict]:
        obj = self.objects.get(key)
        if obj is None:
            return 404, {"reason": "NotFound", "message": f'{kind.plural} "{key[2]}" not found'}
        if obj["metadata"].get("finalizers") or propagation == "Foreground":
            if not obj["metadata"].get("deletionTimestamp"):
                obj = copy.deepcopy(obj)
                obj["metadata"]["deletionTimestamp"] = now()
                obj["metadata"]["deletionGracePeriodSeconds"] = 0
                if not obj["metadata"].get("finalizers"):  # foreground without finalizers: dependents first
                    self._cascade(obj["metadata"]["uid"])
                    self._remove(kind, key, obj)
                    return 200, obj
                self._bump(obj)
                self.objects[key] = obj
                self._emit(kind, "MODIFIED", obj)
            return 200, obj
        self._remove(kind, key, cascade=propagation != "Orphan")
        return 200, obj

    def _remove(self, kind: Kind, key: tuple, obj: dict | None = None, cascade: bool = True) -> None:
        obj = self.objects.pop(key, None) or obj
        assert obj is not None
        self._bump(obj)
        self._emit(kind, "DELETED", obj)
        if cascade:
            self._cascade(obj["metadata"]["uid"])
        else:  # orphan: the dependents lose their owner reference
            for k, dep in list(self.objects.items()):
                refs = dep["metadata"].get("ownerReferences") or []
                if any(r.get("uid") == obj["metadata"]["uid"] for r in refs):
                    new = copy.deepcopy(dep)
                    new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != obj["metadata"]["uid"]]
                    self.update(self._kind_of(k), k, new, None, None)

    def _kind_of(self, key: tuple) -> Kind:
        return next(k for k in self.kinds.values() if self.kkey(k) == key[0])

    def _cascade(self, uid: str) -> None:
        """The garbage collector: dependents whose owners are all gone are deleted."""
        for key, dep in list(self.objects.items()):
            refs = dep["metadata"].get("ownerReferences") or []
            if refs and any(r.get("uid") == uid for r in refs) and key in self.objects:
                alive = {o["metadata"]["uid"] for o in self.objects.values()}
                if not any(r.get("uid") in alive for r in refs if r.get("uid") != uid):
                    self.delete(self._kind_of(key), key)

    # --- HTTP ---------------------------------------------------------------------------------------

    def _resolve(self, path: str) -> tuple[Kind | None, str | None, str | None, str | None, Any]:
        """path -> (kind, namespace, name, subresource, discovery answer)."""
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"]:
            if len(parts) == 1:
                return None, None, None, None, {"kind": "APIVersions", "versions": ["v1"],
                                                "serverAddressByClientCIDRs": []}
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"]:
            if len(parts) == 1:
                return None, None, None, None, self._groups()
            if len(parts) == 2:
                g = [x for x in self._groups()["groups"] if x["name"] == parts[1]]
                return None, None, None, None, (g[0] | {"kind": "APIGroup", "apiVersion": "v1"}) if g else 404
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None, None, None, None, 404
        if not rest:
            res = self._resources(group, version)
            return None, None, None, None, res if res["resources"] else 404
        ns = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        kind = self.kinds.get((group, version, rest[0]))
        if kind is None:
            return None, None, None, None, 404
        return kind, ns, rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None, None

    def _groups(self) -> dict:
        groups: dict[str, list[str]] = {}
        for k in self.kinds.values():
            if k.group:
                groups.setdefault(k.group, [])
                if k.version not in groups[k.group]:
                    groups[k.group].append(k.version)
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
             "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}} for g, vs in groups.items()]}

    def _resources(self, group: str, version: str) -> dict:
        out = []
        for k in self.kinds.values():
            if (k.group, k.version) != (group, version):
                continue
            verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
            out.append({"name": k.plural, "singularName": k.kind.lower(), "namespaced": k.namespaced,
                        "kind": k.kind, "verbs": verbs})
            if k.status:
                out.append({"name": f"{k.plural}/status", "singularName": "", "namespaced": k.namespaced,
                            "kind": k.kind, "verbs": ["get", "patch", "update"]})
            if k.scale:
                out.append({"name": f"{k.plural}/scale", "singularName": "", "namespaced": k.namespaced,
                            "group": "autoscaling", "version": "v1", "kind": "Scale",
                            "verbs": ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": out}

    async def _proxy(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        """GET through the pod proxy (`pods/NAME[:PORT]/proxy/PATH`) to the pod's address: `proxies[(namespace,
        pod)]` ("host:port", set by a test that runs the pod's process here), else its status.podIP and PORT."""
        pod_name, _, port = name.partition(":")
        pod = self.objects.get((self.kkey(self.kinds[("", "v1", "pods")]), ns, pod_name))
        if pod is None:
            return status_error(404, "NotFound", f'pods "{pod_name}" not found')
        target = self.proxies.get((ns, pod_name)) or f"{(pod.get('status') or {}).get('podIP')}:{port or 80}"
        rest = request.path.split("/proxy/", 1)[1] if "/proxy/" in request.path else ""
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, session.get(
                    f"http://{target}/{rest}") as resp:
                body = await resp.read()
                return web.Response(body=body, status=resp.status, content_type=resp.content_type)
        except (TimeoutError, aiohttp.ClientError) as e:
            return status_error(503, "ServiceUnavailable", f"error trying to reach service: {e}")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if request.path.rstrip("/") == "/version":
            return web.json_response({"major": "1", "minor": "33", "gitVersion": "v1.33.0-kaito-fake",
                                      "platform": "linux/amd64"})
        kind, ns, name, sub, answer = self._resolve(request.path)
        if answer == 404:
            return status_error(404, "NotFound", "the server could not find the requested resource")
        if answer is not None:
            return web.json_response(answer)
        assert kind is not None
        if kind.namespaced is False and ns:
            return status_error(404, "NotFound", "the server could not find the requested resource")
        if kind.plural == "pods" and sub == "proxy" and name and request.method == "GET":
            if request.headers.get("Authorization") == f"Bearer {self.audit_token}":
                self.audit.add(("get", "", "pods/proxy"))
            return await self._proxy(request, ns or "", name)
        if sub not in (None, "status", "scale") or (sub == "status" and not kind.status) or (
                sub == "scale" and not kind.scale):
            return status_error(404, "NotFound", "the server could not find the requested resource")
        q = request.query
        m = request.method
        verb = {"GET": "get" if name else ("watch" if q.get("watch") in ("true", "1") else "list"),
                "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(m, m)
        audited = request.headers.get("Authorization") == f"Bearer {self.audit_token}"
        if audited:
            self.audit.add((verb, kind.group, kind.plural + (f"/{sub}" if sub else "")))
        applying = m == "PATCH" and request.content_type == APPLY
        self.verbs["apply" if applying else verb] += 1
        manager = q.get("fieldManager") or request.headers.get("User-Agent", "").split("/")[0] or "unknown"
        if name is None:
            if m == "GET" and q.get("watch") in ("true", "1"):
                return await self._watch(request, kind, ns)
            if m == "GET":
                items = [o for (kk, ons, _), o in self.objects.items()
                         if kk == self.kkey(kind) and (ns is None or ons == ns)
                         and label_match(q.get("labelSelector"), o["metadata"].get("labels") or {})
                         and field_match(q.get("fieldSelector"), o)]
                return web.json_response({"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                                          "metadata": {"resourceVersion": str(self.rv)}, "items": items})
            if m == "POST":
                code, obj = self.create(kind, ns, await request.json(), manager)
                return web.json_response(obj, status=code) if code < 300 else status_error(code, obj["reason"],
                                                                                           obj["message"])
            return status_error(405, "MethodNotAllowed", f"{m} is not supported on a collection here")
        key = (self.kkey(kind), ns or "" if kind.namespaced else "", name)
        if kind.namespaced and not ns:
            return status_error(404, "NotFound", "the server could not find the requested resource")
        current = self.objects.get(key)
        if sub == "scale":
            return await self._scale(request, kind, key, current, manager)
        if applying:
            if not q.get("fieldManager"):
                return status_error(422, "Invalid", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required "
                                                    "value: is required for apply patch")
            code, obj = self.apply(kind, ns, name, sub, await request.json(), q["fieldManager"],
                                   q.get("force", "").lower() in ("true", "1"))
            if audited and code == 201:  # an apply that creates is authorized as a create too
                self.audit.add(("create", kind.group, kind.plural))
            return web.json_response(obj, status=code) if code < 300 else status_error(code, obj["reason"],
                                                                                       obj["message"])
        if m == "GET":
            if current is None:
                return status_error(404, "NotFound", f'{kind.plural} "{name}" not found')
            return web.json_response(current)
        if m == "DELETE":
            body = await request.json() if request.can_read_body else {}
            propagation = q.get("propagationPolicy") or (body or {}).get("propagationPolicy") or "Background"
            code, obj = self.delete(kind, key, propagation)
        elif m == "PUT":
            body = await request.json()
            code, obj = self.update(kind, key, body, sub, (body.get("metadata") or {}).get("resourceVersion"), manager)
        elif m == "PATCH":
            if current is None:
                return status_error(404, "NotFound", f'{kind.plural} "{name}" not found')
            ctype = request.content_type
            patch = await request.json()
            try:
                if ctype == "application/json-patch+json":
                    new = jsonpatch.apply_patch(current, patch)
                    expect = None
                elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                    new = merge_patch(current, patch)
                    expect = (patch.get("metadata") or {}).get("resourceVersion")
                else:
                    return status_error(415, "UnsupportedMediaType", f"the patch type {ctype} is not supported")
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                return status_error(422, "Invalid", str(e))
            code, obj = self.update(kind, key, new, sub, expect, manager)
        else:
            return status_error(405, "MethodNotAllowed", f"{m} is not supported")
        return web.json_response(obj, status=code) if code < 300 else status_error(code, obj["reason"], obj["message"])

    @staticmethod
    def _path(obj: dict, path: str | None) -> Any:
        node: Any = obj
        for part in (path or "").strip(".").split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def _scale_view(self, kind: Kind, obj: dict) -> dict:
        assert kind.scale is not None
        spec_path, status_path, selector_path = kind.scale
        meta = {k: obj["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in obj["metadata"]}
        status: dict[str, Any] = {"replicas": self._path(obj, status_path) or 0}
        if selector_path and self._path(obj, selector_path):
            status["selector"] = self._path(obj, selector_path)
        return {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": meta,
                "spec": {"replicas": self._path(obj, spec_path) or 0}, "status": status}

    async def _scale(self, request: web.Request, kind: Kind, key: tuple, current: dict | None,
                     manager: str) -> web.Response:
        """GET / PUT / PATCH of `<resource>/scale`: the Scale's spec.replicas is the object's specReplicasPath."""
        if current is None:
            return status_error(404, "NotFound", f'{kind.plural} "{key[2]}" not found')
        view = self._scale_view(kind, current)
        if request.method == "GET":
            return web.json_response(view)
        body = await request.json()
        if request.method == "PUT":
            scale, expect = body, (body.get("metadata") or {}).get("resourceVersion")
        elif request.method == "PATCH" and request.content_type == "application/json-patch+json":
            scale, expect = jsonpatch.apply_patch(view, body), None
        elif request.method == "PATCH":
            scale, expect = merge_patch(view, body), (body.get("metadata") or {}).get("resourceVersion")
        else:
            return status_error(405, "MethodNotAllowed", f"{request.method} is not supported on scale")
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            return status_error(422, "Invalid", f"Scale.spec.replicas: Invalid value: {replicas!r}: must be greater "
                                                "than or equal to 0")
        new = copy.deepcopy(current)
        node = new
        *parents, leaf = kind.scale[0].strip(".").split(".")  # type: ignore[index]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = replicas
        code, obj = self.update(kind, key, new, None, expect, manager)
        if code >= 300:
            return status_error(code, obj["reason"], obj["message"])
        return web.json_response(self._scale_view(kind, obj))

    async def _watch(self, request: web.Request, kind: Kind, ns: str | None) -> web.StreamResponse:
        q = request.query
        kk = self.kkey(kind)

        def wanted(namespace: str | None, labels: dict, line: bytes) -> bool:
            return ((ns is None or namespace == ns) and label_match(q.get("labelSelector"), labels)
                    and (not q.get("fieldSelector") or field_match(q["fieldSelector"], json.loads(line)["object"])))

        since = q.get("resourceVersion") or "0"
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)

        def line(type_: str, obj: dict) -> bytes:
            return json.dumps({"type": type_, "object": obj}).encode() + b"\n"

        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(q.get("timeoutSeconds") or 1800)
        faults = self._faulted(request)
        closes = bool(faults and faults.watch_lifetime and loop.time() + faults.watch_lifetime < deadline)
        if closes:
            deadline = loop.time() + faults.watch_lifetime  # type: ignore[union-attr]
        if since == "0":
            pos = self.rv
            for (okk, _, _), o in list(self.objects.items()):
                if okk == kk and wanted(o["metadata"].get("namespace"), o["metadata"].get("labels") or {},
                                        added := line("ADDED", o)):
                    await resp.write(added)
        else:
            pos = int(since)
            oldest = self.history[0][0] if self.history else self.rv + 1
            gone = bool(faults and faults.gone_rate and pos < self.rv and self._random.random() < faults.gone_rate)
            if gone or pos < oldest - 1 and pos < self.rv:
                self.injected["410"] += gone
                await resp.write(line("ERROR", {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                                "status": "Failure", "reason": "Expired", "code": 410,
                                                "message": f"too old resource version: {pos} ({oldest - 1})"}))
                return resp
        try:
            epoch = self.epoch
            while self.epoch == epoch:
                assert self.changed is not None
                changed = self.changed
                start = self._index_after(pos)
                for rv, ekk, namespace, labels, data in self.history[start:]:
                    pos = rv
                    if ekk == kk and wanted(namespace, labels, data):
                        await resp.write(data)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self.injected["closed"] += closes
                    break
                try:
                    await asyncio.wait_for(changed.wait(), timeout=min(remaining, 5))
                except TimeoutError:
                    pass
        except (ConnectionResetError, asyncio.CancelledError):
            return resp
        return resp

    def drop_watches(self) -> None:
        """End every watch now, as an API server's restart does (clients resume from their last version)."""
        self.epoch += 1
        assert self.changed is not None
        self.changed.set()
        self.changed = asyncio.Event()

    def _index_after(self, rv: int) -> int:
        lo, hi = 0, len(self.history)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.history[mid][0] <= rv:
                lo = mid + 1
            else:
                hi = mid
        return lo

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> KubeFake:
        ready = threading.Event()

        def serve() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.changed = asyncio.Event()
            app = web.Application(client_max_size=64 * 2**20, middlewares=[self._intercept, self._inject])
            app.router.add_route("*", "/{tail:.*}", self.handle)
            self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
            self.loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, host, port)
            self.loop.run_until_complete(site.start())
            sock = site._server.sockets[0]  # type: ignore[union-attr]
            self.url = f"http://{host}:{sock.getsockname()[1]}"
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self._runner.cleanup())

        self._thread = threading.Thread(target=serve, name="kube-fake", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    @web.middleware
    async def _intercept(self, request: web.Request, handler) -> web.StreamResponse:
        """Every request through `intercept` when a test sets it: it may record the request, answer in
        the fake's place (an error, a delay, no answer) or call `handler` and look at the response."""
        if self.intercept is None:
            return await handler(request)
        return await self.intercept(request, handler)

    @web.middleware
    async def _inject(self, request: web.Request, handler) -> web.StreamResponse:
        """The faults (`inject`) of the client they are for: latency, then a 500 or 429, then a 409 for a
        write that names a resourceVersion; the watch faults are the watch's own (`_watch`)."""
        f = self._faulted(request)
        if f is None:
            return await handler(request)
        start = time.monotonic()
        response = await self._fault(request, f) or await handler(request)
        self.trace.append((start, request.method, request.path_qs, response.status))
        return response

    async def _fault(self, request: web.Request, f: Faults) -> web.StreamResponse | None:
        if f.latency:
            await asyncio.sleep(f.latency)
        draw = self._random.random()
        if draw < f.error_rate:
            self.injected["500"] += 1
            return status_error(500, "InternalError", "Internal error occurred: injected by the fake")
        if draw < f.error_rate + f.throttle_rate:
            self.injected["429"] += 1
            body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 429,
                    "reason": "TooManyRequests", "details": {"retryAfterSeconds": f.retry_after},
                    "message": "the server has received too many requests and has asked us to try again later"}
            return web.json_response(body, status=429, headers={"Retry-After": str(f.retry_after)})
        if f.conflict_rate and request.method in ("PUT", "PATCH"):
            try:
                body = await request.json()
            except ValueError:
                return None
            named = isinstance(body, dict) and (body.get("metadata") or {}).get("resourceVersion")
            if named and self._random.random() < f.conflict_rate:
                self.injected["409"] += 1
                return status_error(409, "Conflict", "Operation cannot be fulfilled: the object has been modified; "
                                                     "please apply your changes to the latest version and try again")
        return None

    def stop(self) -> None:
        if self.loop:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def kubeconfig(self, path) -> str:
        """A kubeconfig file for clients in other processes (the operator)."""
        import yaml

        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
               "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
               "users": [{"name": "fake", "user": {"token": "fake-token"}}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}]}
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        return str(path)

    def call(self, fn, *args):
        """Run `fn(*args)` on the server's loop (direct access for assertions)."""
        assert self.loop is not None
        fut = asyncio.run_coroutine_threadsafe(self._call(fn, *args), self.loop)
        return fut.result(10)

    @staticmethod
    async def _call(fn, *args):
        return fn(*args)


if __name__ == "__main__":  # a standalone fake, for trying the operator by hand
    import sys
    import time

    fake = KubeFake().start(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(fake.url, flush=True)
    while True:
        time.sleep(3600)
