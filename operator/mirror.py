"""ModelMirror: a model's weights downloaded once per namespace into a claim that every Workspace of the
model mounts, started when the first such Workspace appears, in parallel with its GPU nodes.

- `mirror_for(plan, opts)`: the ModelMirror a Workspace needs (with `--model-mirror` and a StorageClass:
  the operator's, or the Workspace's `kaito.sh/model-mirror-storage-class`): a hub model, no
  `kaito.sh/use-local-weights`, no `presetOptions.modelWeightsPVC`, not opted out with
  `kaito.sh/model-streaming: disabled`. Its name is the model's and the namespace's, so every Workspace
  of the model in a namespace names the same one; the controller creates it when it is missing and never
  changes it after (the spec is immutable, as upstream's).
- `render_mirror(mirror)`: a Managed mirror's PersistentVolumeClaim (ReadWriteMany, the mirror's size
  and class) and its download Job (`kaito-presets download MODEL` with HF_HOME on the claim and its
  progress on /metrics), owned by the mirror in `spec.jobNamespace`. A Static mirror makes nothing.
- `mirror_status(...)`: Pending while the Job runs (the bytes fetched so far and in all, read from its
  pod's /metrics through the API server's pod proxy), Ready once it succeeded, the Job's failure said.
- The Workspace's pods mount the claim as their weights volume. Their `weights` init container runs the
  same download: it waits on the download lock in the claim while the Job still fetches, then finds the
  copy complete and verified; kaito-serve loads it. A pod restarted, or one more replica, downloads nothing.
- `reconcile_mirror(kube, body, idle)`: one pass of a mirror (a kopf timer runs it): its objects, its
  status, and, for the mirrors kaito made, garbage collection once no StatefulSet has used it for `idle`
  seconds (its claim and Job go with it, by owner reference).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import kopf
from kaito.presets.contract import HF_HOME_ENV, HF_TOKEN_ENV, PORT, WEIGHTS_DIR
from kubernetes.dynamic.exceptions import ConflictError
from prometheus_client import Gauge
from prometheus_client.parser import text_string_to_metric_families

from . import parts
from . import status as st
from .api import MODEL_MIRROR_STORAGE_CLASS, MODEL_STREAMING, ModelMirror, Workspace
from .manifests import parse
from .parts import RenderOptions
from .plan import InferencePlan, model_access_secret

if TYPE_CHECKING:
    from .kube import Kube

log = logging.getLogger("kaito.operator.mirror")
MIRROR_API_VERSION = "kaito.sh/v1alpha1"
MIRROR_LABEL = "kaito.sh/modelmirror"  # on a mirror's claim and Job, and on the StatefulSets that mount it
MANAGED_BY = {"app.kubernetes.io/managed-by": "kaito"}
READY = "ModelMirrorReady"
BYTES = Gauge("kaito_model_mirror_downloaded_bytes", "Bytes a ModelMirror's download has fetched", ["mirror"])
TOTAL = Gauge("kaito_model_mirror_size_bytes", "Bytes of the files a ModelMirror downloads", ["mirror"])


def mirror_name(model_id: str, namespace: str) -> str:
    """The mirror of a model for the Workspaces of a namespace: readable, unique, and a valid name for its
    claim and Job too."""
    slug = re.sub(r"[^a-z0-9]+", "-", model_id.lower()).strip("-")[:40].strip("-")
    return f"{slug}-{hashlib.sha256(f'{namespace}/{model_id}'.encode()).hexdigest()[:8]}"


def storage_class(ws: Workspace, opts: RenderOptions) -> str | None:
    return ws.annotation(MODEL_MIRROR_STORAGE_CLASS) or opts.model_mirror_storage_class


def mirror_for(plan: InferencePlan, opts: RenderOptions) -> dict[str, Any] | None:
    """The ModelMirror object the Workspace's weights come from, or None (they are downloaded per pod)."""
    ws = plan.workspace
    preset = ws.inference.preset if ws.inference else None
    options = preset.preset_options if preset else None
    klass = storage_class(ws, opts)
    if (not opts.model_mirror or not klass or plan.local_weights or plan.preset.source is not None
            or (options and options.model_weights_pvc) or (ws.annotation(MODEL_STREAMING) or "") == "disabled"):
        return None
    model = plan.preset.hf_id
    source: dict[str, Any] = {"registry": "huggingface", "modelID": model}
    if secret := model_access_secret(ws):
        source["accessSecret"] = {"name": secret, "namespace": ws.namespace}
    return {"apiVersion": MIRROR_API_VERSION, "kind": "ModelMirror",
            "metadata": {"name": mirror_name(model, ws.namespace), "labels": dict(MANAGED_BY)},
            "spec": {"mode": "Managed", "source": source,
                     "storage": {"size": f"{plan.estimate.disk_gib}Gi", "storageClassName": klass},
                     "jobNamespace": ws.namespace}}


def render_mirror(mirror: ModelMirror, opts: RenderOptions) -> list[dict[str, Any]]:
    """A Managed mirror's claim and download Job in its jobNamespace (owned by it); nothing for a Static one."""
    spec = mirror.spec
    if spec.mode == "Static" or spec.source is None or spec.storage is None:
        return []
    name, namespace = mirror.name, spec.job_namespace or "default"
    labels = {**MANAGED_BY, MIRROR_LABEL: name}
    meta = {"name": name, "namespace": namespace, "labels": labels}
    if uid := (mirror.metadata.model_extra or {}).get("uid"):
        meta["ownerReferences"] = [{"apiVersion": MIRROR_API_VERSION, "kind": "ModelMirror", "name": name,
                                    "uid": uid, "controller": True, "blockOwnerDeletion": True}]
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta,
             "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": spec.storage.size}},
                      **({"storageClassName": spec.storage.storage_class_name}
                         if spec.storage.storage_class_name else {})}}
    env = [{"name": HF_HOME_ENV, "value": WEIGHTS_DIR}]
    if spec.source.access_secret:
        env.append(parts.secret_env(HF_TOKEN_ENV, spec.source.access_secret.name, HF_TOKEN_ENV))
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {**meta, "name": job_name(name)},
           "spec": {"backoffLimit": 6, "template": {"metadata": {"labels": labels}, "spec": {
               "restartPolicy": "OnFailure",
               "containers": [{"name": "download", "image": opts.image("kaito-serve"),
                               "command": ["kaito-presets", "download", spec.source.model_id,
                                           "--metrics-port", str(PORT)],
                               "ports": [{"name": "metrics", "containerPort": PORT}], "env": env,
                               "volumeMounts": [{"name": "weights", "mountPath": WEIGHTS_DIR}]}],
               "volumes": [{"name": "weights", "persistentVolumeClaim": {"claimName": name}}]}}}}
    return [claim, job]


def job_name(mirror: str) -> str:
    return f"{mirror}-download"


def progress(metrics: str, model: str) -> tuple[int, int] | None:
    """(bytes fetched, bytes in all) of `model` in a download's /metrics text, if it says."""
    found = {sample.name: sample.value for family in text_string_to_metric_families(metrics)
             for sample in family.samples if sample.labels.get("model") == model}
    if "kaito_model_download_size_bytes" not in found:
        return None
    return int(found.get("kaito_model_download_bytes", 0)), int(found["kaito_model_download_size_bytes"])


def mirror_status(mirror: ModelMirror, job: dict | None, fetched: tuple[int, int] | None, old: dict) -> tuple[
        str, list[st.Cond], dict[str, Any]]:
    """(phase, conditions, other status fields) from the download Job and its progress."""
    spec = mirror.spec
    if spec.mode == "Static":
        return "Ready", [st.Cond(READY, True, "Static", "the weights are in storage of your own")], {}
    done, total = fetched or (old.get("downloadedBytes"), old.get("totalBytes"))
    extra: dict[str, Any] = {"modelPath": f"pvc://{spec.job_namespace or 'default'}/{mirror.name}/hub",
                             **({"downloadedBytes": done} if done is not None else {}),
                             **({"totalBytes": total} if total is not None else {})}
    js = (job or {}).get("status") or {}
    failed = next((c for c in js.get("conditions") or [] if c.get("type") == "Failed" and c.get("status") == "True"),
                  None)
    if js.get("succeeded"):
        if total is not None:
            extra["downloadedBytes"] = total
        extra["lastDownloadTime"] = old.get("lastDownloadTime") or st.now()
        return "Ready", [st.Cond(READY, True, "Downloaded", f"{spec.source.model_id} is in the claim")], extra
    if failed:
        message = f"the download Job failed: {failed.get('message') or failed.get('reason') or 'see its pods'}"
        extra["failureMessage"] = message
        return "Pending", [st.Cond(READY, False, "DownloadFailed", message)], extra
    if job is None:
        return "Pending", [st.Cond(READY, False, "DownloadPending", "the download Job is being made")], extra
    said = f": {done} of {total} bytes" if done is not None and total else ""
    return "Pending", [st.Cond(READY, False, "Downloading", f"downloading {spec.source.model_id}{said}")], extra


def reconcile_mirror(kube: Kube, body: dict, opts: RenderOptions, idle: float) -> str | None:
    """One pass of a mirror: its claim and Job, its status; a mirror kaito made that no StatefulSet has used for
    `idle` seconds is deleted. Returns its phase (None once deleted)."""
    body = kube.latest(body)  # with its status as kaito last wrote it
    mirror = parse(body, f"ModelMirror {body['metadata']['name']}")
    assert isinstance(mirror, ModelMirror)
    name, old = mirror.name, body.get("status") or {}
    namespace = mirror.spec.job_namespace or "default"
    job = None
    fetched = None
    for obj in render_mirror(mirror, opts):
        live = kube.get(obj["apiVersion"], obj["kind"], obj["metadata"]["name"], namespace)
        if live is None:
            kube.forget(obj)
            live = kube.apply(obj)
        if obj["kind"] == "Job":
            job = live
    if job is not None and not (job.get("status") or {}).get("succeeded"):
        fetched = _scrape(kube, namespace, job_name(name), mirror.spec.source.model_id)  # type: ignore[union-attr]
    phase, conds, extra = mirror_status(mirror, job, fetched, old)
    if fetched:
        BYTES.labels(name).set(fetched[0])
        TOTAL.labels(name).set(fetched[1])
    elif extra.get("totalBytes") and phase == "Ready":
        BYTES.labels(name).set(extra["totalBytes"])
        TOTAL.labels(name).set(extra["totalBytes"])
    if (body["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by") == "kaito":
        users = kube.list("apps/v1", "StatefulSet", namespace, selector=f"{MIRROR_LABEL}={name}")
        since = None if users else old.get("unusedSince") or st.now()
        if since and _age(since) > idle:
            log.info("deleting an unused ModelMirror", extra={"mirror": name, "unused_s": round(_age(since))})
            kube.delete(MIRROR_API_VERSION, "ModelMirror", name)
            for gauge in (BYTES, TOTAL):
                try:
                    gauge.remove(name)
                except KeyError:  # never set
                    pass
            return None
        extra["unusedSince"] = since
    new = {"phase": phase, **extra,
           "conditions": st.conditions(old.get("conditions"), conds, body["metadata"].get("generation"))}
    st.write(kube, MIRROR_API_VERSION, "ModelMirror", name, None, old, new, uid=body["metadata"].get("uid"),
             resource_version=body["metadata"].get("resourceVersion"))
    return phase


def _scrape(kube: Kube, namespace: str, job: str, model: str) -> tuple[int, int] | None:
    """The download's progress from its running pod's /metrics, through the API server's pod proxy."""
    for pod in kube.list("v1", "Pod", namespace, selector=f"job-name={job}"):
        if (pod.get("status") or {}).get("phase") != "Running":
            continue
        try:
            return progress(kube.proxy(namespace, pod["metadata"]["name"], PORT, "metrics"), model)
        except Exception as e:  # noqa: BLE001 - progress is informational: the next pass asks again
            log.debug("progress not read", extra={"pod": pod["metadata"]["name"], "error": str(e)[:200]})
    return None


def _age(stamp: str) -> float:
    return time.time() - datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


POLL = 5.0  # seconds between passes of a mirror (its progress, its Job, its users)


def register(registry: kopf.OperatorRegistry, opts: RenderOptions, idle: float, kube: Callable[[], Kube],
             poll: float = POLL) -> None:
    """Every ModelMirror gets a pass every `poll` seconds (a kopf timer; an error is retried by kopf with a
    backoff). Mirrors are few (one per model and namespace), so a pass reads what it needs from the API.
    `kube`: the client the Workspace controller uses too (a mirror deleted is forgotten there)."""

    @kopf.timer("kaito.sh", "v1alpha1", "modelmirrors", registry=registry, id="modelmirror", interval=poll,
                sharp=True)
    async def pass_(body: kopf.Body, retry: int, **_: Any) -> None:
        try:
            await asyncio.to_thread(reconcile_mirror, kube(), dict(body), opts, idle)
        except ConflictError:  # it changed while we looked: the next pass looks again
            pass
        except Exception as e:
            from .kube import backoff

            raise kopf.TemporaryError(f"ModelMirror {body['metadata']['name']}: {e}"[:500],
                                      delay=backoff(retry + 1, cap=30)) from e

    @kopf.on.event("kaito.sh", "v1alpha1", "modelmirrors", registry=registry, id="modelmirror-gone")
    async def gone(body: kopf.Body, type: str, **_: Any) -> None:
        if type == "DELETED":  # a Workspace that still needs it makes it again
            kube().forget({"apiVersion": MIRROR_API_VERSION, "kind": "ModelMirror",
                           "metadata": {"name": body["metadata"]["name"]}})
