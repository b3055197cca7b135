"""Adapters, datasets and tuning outputs as OCI images, pulled and pushed without running anything inside
them: an image `FROM scratch` works, and so does a plain OCI artifact (`oras push`).

`pull(ref, dest)` reads the image's manifest (an index: the linux/amd64 entry, else the first), downloads
each layer, checks its digest, and lays the files out: a tar layer (gzip or not) is extracted, as a
container runtime would (whiteouts applied, no absolute paths, links or devices), an artifact's file
layer is written under its title annotation. Then `dest` gets the image's `/data` folder (upstream KAITO's
layout for adapter and dataset images), or every file when there is no `/data`.

`push(folder, files, ref)` writes upstream KAITO's adapter image: one gzip tar layer holding
`data/<file>`, an OCI image config with its diff id and no platform, so that kaito's pull, upstream's
puller (skopeo, then the layers untarred) and a container runtime's image volume all read it.

The client is oras-py (the ORAS project's Python SDK). Credentials come from Docker config files
(`.dockerconfigjson` of Kubernetes pull and push secrets, passed as `auth`), then $DOCKER_CONFIG; a
registry answering with a Basic challenge (the Distribution registry with htpasswd) gets Basic auth,
others the token flow. Registries on loopback addresses and those listed in KAITO_INSECURE_REGISTRIES
are spoken to over plain HTTP.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from .catalogue import PresetError
from .contract import DOCKER_CONFIG_ENV, INSECURE_REGISTRIES_ENV

DATA = "data"  # upstream's layout: the files lie under /data in the image
TITLE = "org.opencontainers.image.title"
UNPACK = "io.deis.oras.content.unpack"  # oras: a directory pushed as a gzip tar
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
INDEXES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
ACCEPT = [MANIFEST, "application/vnd.docker.distribution.manifest.v2+json", *INDEXES]
TARS = {"application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar.gzip", "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"}
LOOPBACK = ("localhost", "127.0.0.1", "[::1]")


class ImageError(PresetError):
    """An image or artifact that cannot be pulled or pushed, said with what to do."""


def _insecure(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    listed = {h.strip() for h in os.environ.get(INSECURE_REGISTRIES_ENV, "").split(",") if h.strip()}
    return name in LOOPBACK or host in listed or name in listed


def _client(ref: str, auth: Iterable[Path | str]):
    """An oras-py Registry for `ref` with the credentials of `auth` (Docker config files), and the parsed
    container."""
    try:
        import oras.container
        import oras.provider
        import requests
    except ImportError:
        raise ImageError("pulling and pushing images needs oras-py: install kaito[hf-base]") from None
    container = oras.container.Container(ref)
    insecure = _insecure(container.registry)
    scheme = "http" if insecure else "https"
    try:  # the registry's challenge says which scheme it wants
        challenge = requests.get(f"{scheme}://{container.registry}/v2/", timeout=30).headers.get("Www-Authenticate", "")
    except requests.RequestException as e:
        raise ImageError(f"the registry {container.registry} of {ref} cannot be reached over {scheme}: "
                         f"{type(e).__name__}: {e}") from None
    backend = "basic" if challenge.lower().startswith("basic") else "token"
    registry = oras.provider.Registry(hostname=container.registry, insecure=insecure, auth_backend=backend)
    docker = os.environ.get(DOCKER_CONFIG_ENV)
    given = [*auth, *([Path(docker) / "config.json"] if docker else [])]
    files = [str(p) for p in given if Path(p).is_file()]
    registry.auth.load_configs(container, configs=files)
    if backend == "basic" and getattr(registry.auth, "_basic_auth", None) is None:
        registry.auth.set_basic_auth("", "")  # no credentials: the registry's 401 is the answer, not a retry loop
    return registry, container


def _check(response, what: str, ref: str) -> None:
    if response.status_code in (200, 201, 202):
        return
    try:
        errors = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in response.json().get("errors", []))
    except ValueError:
        errors = response.text[:200]
    hint = {401: " (the pull or push secret is missing or its credentials are refused)",
            403: " (the credentials given may not access this repository)",
            404: " (no such repository or tag)"}.get(response.status_code, "")
    raise ImageError(f"{ref}: {what} failed with HTTP {response.status_code}{hint}: {errors or response.reason}")


def _request(registry, ref: str, what: str, url: str, method: str = "GET", **kw):
    # oras-py's do_request without its retry decorator, which sleeps about two minutes through five tries
    # before a refused credential or a 5xx comes back: the error is said at once (a failed init container
    # is retried by Kubernetes anyway)
    do_request = getattr(type(registry).do_request, "__wrapped__", type(registry).do_request)
    try:
        response = do_request(registry, url, method, **kw)
    except ValueError as e:  # oras-py: "Cannot respond to request for authentication"
        raise ImageError(f"{ref}: {what}: the registry asks for credentials that were not given or are refused "
                         f"(imagePullSecrets / imagePushSecret): {e}") from None
    except Exception as e:
        if type(e).__module__.startswith(("requests", "urllib3")):
            raise ImageError(f"{ref}: {what}: {type(e).__name__}: {e}") from None
        raise
    _check(response, what, ref)
    return response


def _manifest(registry, container, ref: str) -> dict:
    url = f"{registry.prefix}://{container.manifest_url()}"
    manifest = _request(registry, ref, "reading the manifest", url, headers={"Accept": ", ".join(ACCEPT)}).json()
    if manifest.get("mediaType") in INDEXES or "manifests" in manifest:
        entries = manifest.get("manifests") or []
        if not entries:
            raise ImageError(f"{ref}: an empty image index")
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        chosen = next((m for m in entries if (m.get("platform") or {}).get("architecture") == arch), entries[0])
        url = f"{registry.prefix}://{container.manifest_url(chosen['digest'])}"
        manifest = _request(registry, ref, "reading the manifest", url, headers={"Accept": ", ".join(ACCEPT)}).json()
    return manifest


def pull(ref: str, dest: Path | str, *, auth: Iterable[Path | str] = ()) -> Path:
    """The files of image or artifact `ref` (its /data folder when it has one) into folder `dest`, replacing
    what is in it (it may be a volume's mount point). Nothing in the image runs."""
    dest = Path(dest)
    registry, container = _client(ref, auth)
    manifest = _manifest(registry, container, ref)
    dest.mkdir(parents=True, exist_ok=True)
    for child in dest.iterdir():  # an earlier run's files
        _remove(child)
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=dest) as tmp:  # on the same volume: moves, not copies
        root = Path(tmp) / "root"
        root.mkdir()
        for layer in manifest.get("layers") or []:
            blob = Path(tmp) / "blob"
            _blob(registry, container, ref, layer, blob)
            annotations = layer.get("annotations") or {}
            title, media = annotations.get(TITLE), layer.get("mediaType", "")
            if title and not annotations.get(UNPACK):  # an artifact's file
                target = _inside(root, title)
                target.parent.mkdir(parents=True, exist_ok=True)
                blob.replace(target)
            elif media in TARS or annotations.get(UNPACK):
                _untar(blob, root)
            else:
                raise ImageError(f"{ref}: layer {layer.get('digest')} has media type {media!r} and no file name "
                                 "(title annotation): neither an image layer nor an artifact file kaito can read"
                                 + (" (zstd layers are not supported: push with gzip)" if "zstd" in media else ""))
        source = root / DATA if (root / DATA).is_dir() else root
        files = list(source.iterdir())
        if not files:
            raise ImageError(f"{ref} holds no files (expected them under /{DATA}, or as artifact files)")
        for child in files:
            child.replace(dest / child.name)
    return dest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _blob(registry, container, ref: str, layer: dict, path: Path) -> None:
    digest = layer["digest"]
    url = f"{registry.prefix}://{container.get_blob_url(digest)}"
    algorithm, _, expected = digest.partition(":")
    h = hashlib.new(algorithm)
    with _request(registry, ref, f"downloading layer {digest}", url, stream=True) as response, open(path, "wb") as f:
        for chunk in response.iter_content(1 << 20):
            h.update(chunk)
            f.write(chunk)
    if h.hexdigest() != expected:
        raise ImageError(f"{ref}: layer {digest} arrived with digest {algorithm}:{h.hexdigest()}: corrupted on the "
                         "way or in the registry")


def _inside(root: Path, name: str) -> Path:
    parts = [p for p in PurePosixPath(name).parts if p not in ("/", ".")]
    if not parts or ".." in parts:
        raise ImageError(f"refusing a path outside the image's root: {name!r}")
    return root.joinpath(*parts)


def _untar(blob: Path, root: Path) -> None:
    """Extract an image layer as a runtime applies it: whiteouts delete, only files, folders and links
    that stay inside `root` are written."""
    with tarfile.open(blob, "r:*") as tar:
        for member in tar:
            path = PurePosixPath(member.name)
            if path.name.startswith(".wh."):
                target = _inside(root, str(path.parent / path.name[4:])) if path.name != ".wh..wh..opq" else None
                if target is None:  # opaque folder: its earlier content goes
                    folder = _inside(root, str(path.parent)) if str(path.parent) not in ("", ".") else root
                    for child in folder.glob("*") if folder.is_dir() else []:
                        _remove(child)
                elif target.exists() or target.is_symlink():
                    _remove(target)
                continue
            if str(path) in ("", "."):
                continue
            target = _inside(root, member.name)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_symlink():
                    target.unlink()
                with tar.extractfile(member) as src, open(target, "wb") as out:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, out)
            elif member.issym() and not PurePosixPath(member.linkname).is_absolute() and ".." not in PurePosixPath(
                    member.linkname).parts:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                target.symlink_to(member.linkname)
            # hard links, devices, fifos and links leaving the folder are not written


def push(folder: Path | str, files: Iterable[str], ref: str, *, auth: Iterable[Path | str] = ()) -> str:
    """Push `files` of `folder` as upstream KAITO's adapter image (`/data/<file>`, one gzip layer, a config
    without platform); returns the manifest's digest."""
    folder = Path(folder)
    names = list(files)
    for name in names:
        if not (folder / name).is_file():
            raise ImageError(f"cannot push {ref}: {folder / name} does not exist")
    registry, container = _client(ref, auth)
    with tempfile.TemporaryDirectory() as tmp:
        layer_path, config_path = Path(tmp) / "layer.tar.gz", Path(tmp) / "config.json"
        # one pass: the tar is hashed as written (its diff id), then gzipped (level 1: weights barely compress)
        # and hashed again (the layer's digest)
        with open(layer_path, "wb") as out:
            packed = _Hashing(out)
            with gzip.GzipFile(fileobj=packed, mode="wb", compresslevel=1, mtime=0) as gz:
                plain = _Hashing(gz)
                with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    info = tarfile.TarInfo(DATA)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                    for name in names:
                        info = tarfile.TarInfo(f"{DATA}/{name}")
                        info.size, info.mode = (folder / name).stat().st_size, 0o644
                        with open(folder / name, "rb") as f:
                            tar.addfile(info, f)
        config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [plain.digest()]}},
                            separators=(",", ":")).encode()
        config_path.write_bytes(config)
        layer = {"mediaType": LAYER, "digest": packed.digest(), "size": packed.size}
        for path, descriptor in ((layer_path, layer),
                                 (config_path, {"mediaType": CONFIG, "digest": _digest(config), "size": len(config)})):
            try:
                response = registry.upload_blob(str(path), container, descriptor)
            except ValueError as e:
                raise ImageError(f"{ref}: uploading a layer: the registry asks for credentials that were not given "
                                 f"or are refused (imagePushSecret, or DOCKER_CONFIG): {e}") from None
            _check(response, "uploading a layer", ref)
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST,
                "config": {"mediaType": CONFIG, "digest": _digest(config), "size": len(config)}, "layers": [layer]}
    body = json.dumps(manifest, separators=(",", ":")).encode()
    _request(registry, ref, "writing the manifest", f"{registry.prefix}://{container.manifest_url()}", "PUT",
             data=body, headers={"Content-Type": MANIFEST})
    return _digest(body)


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through it to `out`."""

    def __init__(self, out) -> None:
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)

    def digest(self) -> str:
        return f"sha256:{self.sha.hexdigest()}"


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"
