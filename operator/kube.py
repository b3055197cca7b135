"""A small facade over the `kubernetes` client's DynamicClient: objects are plain dicts, as render()
gives them, and `apply` is idempotent (create, or merge-patch only what differs from the live object).
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import Any

from kubernetes import client, config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError

MERGE = "application/merge-patch+json"


def load_config() -> None:
    """In a pod: its service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except config.ConfigException as e:
            raise SystemExit(f"kaito-operator: no cluster to talk to (not in a pod, and {e}); set KUBECONFIG") from None


def subset(desired: Any, live: Any) -> bool:
    """Whether every field of `desired` has its value in `live` (fields the API server adds are ignored;
    lists must have the same length, item by item)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(subset(v, live.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(desired) == len(live) and all(map(subset, desired, live))
    if isinstance(desired, int | float) and isinstance(live, str) or isinstance(live, int | float) and isinstance(
            desired, str):
        return str(desired) == str(live)
    return desired == live


def selector_string(labels: dict[str, str] | None = None, expressions: list[dict] | None = None) -> str:
    """A LabelSelector (matchLabels + matchExpressions) in the API's query syntax."""
    parts = [f"{k}={v}" for k, v in sorted((labels or {}).items())]
    for e in expressions or []:
        op, key, values = e["operator"], e["key"], ",".join(e.get("values") or [])
        parts.append({"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})", "Exists": key,
                      "DoesNotExist": f"!{key}"}[op])
    return ",".join(parts)


class Kube:
    """Safe to share between threads: discovery (lazy, cached in a file of this client's own) runs under a lock."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        cache = os.path.join(tempfile.gettempdir(), f"kaito-discovery-{os.getpid()}-{id(self)}.json")
        self._lock = threading.Lock()
        self._resources: dict[tuple[str, str], Any] = {}
        with self._lock:
            self.dyn = DynamicClient(api_client or client.ApiClient(), cache_file=cache)

    def _res(self, api_version: str, kind: str):
        key = (api_version, kind)
        if key not in self._resources:
            with self._lock:
                self._resources[key] = self.dyn.resources.get(api_version=api_version, kind=kind)
        return self._resources[key]

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict | None:
        try:
            return self._res(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, namespace: str | None = None, selector: str = "") -> list[dict]:
        found = self._res(api_version, kind).get(namespace=namespace, label_selector=selector or None)
        return [item.to_dict() if hasattr(item, "to_dict") else dict(item) for item in found.to_dict()["items"]]

    def apply(self, obj: dict, create_first: bool = False) -> str:
        """Create `obj`, or patch the live object where it differs; returns created|patched|unchanged.
        create_first: try to create before reading (one request fewer when the object is likely new)."""
        res = self._res(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        ns = meta.get("namespace") if res.namespaced else None
        if create_first:
            try:
                res.create(body=obj, namespace=ns)
                return "created"
            except ConflictError:
                pass
        for _ in range(3):
            try:
                live = res.get(name=meta["name"], namespace=ns).to_dict()
            except NotFoundError:
                try:
                    res.create(body=obj, namespace=ns)
                    return "created"
                except ConflictError:  # created meanwhile: patch it
                    continue
            desired = {k: v for k, v in obj.items() if k != "status"}
            if subset(desired, live):
                return "unchanged"
            res.patch(body=desired, name=meta["name"], namespace=ns, content_type=MERGE)
            return "patched"
        raise RuntimeError(f"{obj['kind']} {meta['name']}: could not create or patch it")

    def patch(self, api_version: str, kind: str, name: str, namespace: str | None, body: dict) -> dict:
        return self._res(api_version, kind).patch(body=body, name=name, namespace=namespace,
                                                  content_type=MERGE).to_dict()

    def patch_status(self, api_version: str, kind: str, name: str, namespace: str | None, status: dict) -> None:
        self._res(api_version, kind).status.patch(body={"status": status}, name=name, namespace=namespace,
                                                  content_type=MERGE)

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
        try:
            self._res(api_version, kind).delete(name=name, namespace=namespace)
            return True
        except NotFoundError:
            return False
