"""A fake Hugging Face Hub on 127.0.0.1, for the tests of kaito.presets.hub and `kaito-serve --model org/name`.

It answers the routes huggingface_hub 2.x calls (read in its source: hf_api.py, file_download.py,
_snapshot_download.py, utils/_http.py), with the headers it checks:

- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{rev}` (model_info, repo_info): id, sha,
  gated, siblings; with `?blobs=true` (files_metadata) each sibling's size, blobId and lfs;
- `GET /api/models/{repo}/tree/{rev}[/{path}]` (list_repo_tree, snapshot_download's listing),
  `recursive` or not, one page;
- `POST /api/models/{repo}/paths-info/{rev}` (get_paths_info), the `paths` form fields;
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}` (hf_hub_download): a small file answers 200 with its git
  blob id as `ETag`, `X-Repo-Commit`, `Content-Length` and the body; a weight file (LFS: *.safetensors,
  *.bin) answers 302 with `X-Linked-Etag` (its sha256), `X-Linked-Size`, `X-Repo-Commit` and a
  `Location` on a second port, the "CDN", which the client does not send the token to; both honour
  `Range: bytes=N-` (206 with `Content-Range`), as the client's resume asks;
- errors as the Hub gives them, with `X-Error-Code` (huggingface_hub maps it to its exception types):
  404 `RepoNotFound`, `RevisionNotFound`, `EntryNotFound` (with `X-Repo-Commit`); a gated repo answers
  model_info and the tree (public on the Hub) but its files only with `Authorization: Bearer <token>`:
  401 `GatedRepo` without a token, 403 `GatedRepo` with another one.

Repos are published from files (bytes or paths, e.g. a model folder). Faults for the resume tests:
`drop[(repo, path)] = n` sends n bytes of the next download of that file, then closes the connection;
`hold[(repo, path)] = n` sends n bytes, sets `held` and stalls (until `release` is set, 120 s at most),
then closes it; `corrupt[(repo, path)] = n` serves the next n downloads of that file with its first byte
flipped (the listed size and checksum unchanged). `requests` logs (method, repo, path, Range header) for
each file request.

Not covered: xet storage (no `X-Xet-Hash`: downloads are plain HTTP), uploads and commits, private
repos, datasets and spaces, pagination, `expand` fields, rate limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pth")
CHUNK = 1 << 20
_hashes: dict[tuple[str, int, int], tuple[str, str]] = {}  # (path, size, mtime) -> (git blob id, sha256)


def files_of(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, Path]:
    """A folder's files (recursively) by their path in a repo."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


@dataclass
class _File:
    source: Path | bytes
    size: int
    blob_id: str  # git's sha1 of the blob
    sha256: str

    @classmethod
    def of(cls, source: Path | bytes) -> _File:
        if isinstance(source, bytes):
            blob = hashlib.sha1(b"blob %d\0" % len(source) + source).hexdigest()
            return cls(source, len(source), blob, hashlib.sha256(source).hexdigest())
        st = source.stat()
        key = (str(source), st.st_size, st.st_mtime_ns)
        if key not in _hashes:
            sha1, sha256 = hashlib.sha1(b"blob %d\0" % st.st_size), hashlib.sha256()
            with open(source, "rb") as f:
                while chunk := f.read(CHUNK):
                    sha1.update(chunk)
                    sha256.update(chunk)
            _hashes[key] = (sha1.hexdigest(), sha256.hexdigest())
        return cls(source, st.st_size, *_hashes[key])

    def read(self, start: int, end: int) -> bytes:
        if isinstance(self.source, bytes):
            return self.source[start:end]
        with open(self.source, "rb") as f:
            f.seek(start)
            return f.read(end - start)


@dataclass
class _Repo:
    files: dict[str, _File]
    token: str | None  # gated: the token that was granted access
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha = hashlib.sha1(json.dumps({p: f.blob_id for p, f in sorted(self.files.items())}).encode()).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def _entry(path: str, f: _File) -> dict:
    out = {"type": "file", "oid": f.blob_id, "size": f.size, "path": path}
    if _is_lfs(path):
        out["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
    return out


class HubFake:
    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str, str, str | None]] = []  # method, repo, path, Range
        self.drop: dict[tuple[str, str], int] = {}
        self.hold: dict[tuple[str, str], int] = {}
        self.corrupt: dict[tuple[str, str], int] = {}
        self.held = threading.Event()
        self.release = threading.Event()
        self.url = self.cdn_url = ""

    def publish(self, repo: str, files: dict[str, Path | bytes], *, token: str | None = None) -> str:
        """Serve `files` as model repo `repo` (gated when `token` is given); returns its commit sha."""
        self.repos[repo] = _Repo({p: _File.of(src) for p, src in files.items()}, token)
        return self.repos[repo].sha

    def downloads(self, repo: str, path: str) -> int:
        """How many times the body of a file was asked for (GET on the hub or the CDN)."""
        return sum(1 for m, r, p, _ in self.requests if (m, r, p) == ("GET", repo, path))

    # --- helpers ---

    @staticmethod
    def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
        return web.json_response({"error": message}, status=status,
                                 headers={"X-Error-Code": code, "X-Error-Message": message, **headers})

    def _repo(self, request: web.Request) -> tuple[str, _Repo | web.Response]:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        found = self.repos.get(repo)
        if found is None:
            return repo, self._error(404, "RepoNotFound", "Repository not found")
        rev = request.match_info.get("rev", "main")
        if rev not in ("main", found.sha):
            return repo, self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo, found

    # --- the API routes ---

    async def model_info(self, request: web.Request) -> web.Response:
        repo, found = self._repo(request)
        if isinstance(found, web.Response):
            return found
        blobs = request.query.get("blobs", "").lower() == "true"
        siblings = [{"rfilename": p, **({"size": f.size, "blobId": f.blob_id} if blobs else {}),
                     **({"lfs": {"size": f.size, "sha256": f.sha256, "pointerSize": 134}} if blobs and _is_lfs(p)
                        else {})} for p, f in sorted(found.files.items())]
        org, name = repo.split("/")
        return web.json_response({
            "_id": found.sha[:24], "id": repo, "modelId": repo, "author": org, "sha": found.sha,
            "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z", "private": False,
            "gated": "manual" if found.token else False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": ["transformers", "safetensors"], "pipeline_tag": "text-generation", "library_name": "transformers",
            "siblings": siblings})

    async def tree(self, request: web.Request) -> web.Response:
        repo, found = self._repo(request)
        if isinstance(found, web.Response):
            return found
        base = request.match_info.get("path", "").strip("/")
        prefix = f"{base}/" if base else ""
        recursive = request.query.get("recursive", "").lower() == "true"
        entries, folders = [], set()
        for path, f in sorted(found.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                entries.append(_entry(path, f))
        if base and not entries and not folders:
            return self._error(404, "EntryNotFound", f"{base} does not exist on main")
        entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                    for d in sorted(folders)]
        return web.json_response(entries)

    async def paths_info(self, request: web.Request) -> web.Response:
        repo, found = self._repo(request)
        if isinstance(found, web.Response):
            return found
        form = await request.post()
        paths = [str(p) for p in form.getall("paths", [])]
        return web.json_response([_entry(p, found.files[p]) for p in paths if p in found.files])

    # --- files ---

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo, found = self._repo(request)
        if isinstance(found, web.Response):
            return found
        path = request.match_info["path"]
        self.requests.append((request.method, repo, path, request.headers.get("Range")))
        if found.token is not None and request.headers.get("Authorization") != f"Bearer {found.token}":
            if "Authorization" not in request.headers:
                return self._error(401, "GatedRepo", f"Access to model {repo} is restricted. You must have access to "
                                   "it and be authenticated to access it. Please log in.")
            return self._error(403, "GatedRepo", f"Access to model {repo} is restricted and you are not in the "
                               f"authorized list. Visit {self.url}/{repo} to ask for access.")
        f = found.files.get(path)
        if f is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on main", **{"X-Repo-Commit": found.sha})
        if _is_lfs(path):  # to the "CDN", as the Hub redirects to its storage
            return web.Response(status=302, headers={
                "Location": f"{self.cdn_url}/{repo}/{f.sha256}?name={quote(path)}", "X-Repo-Commit": found.sha,
                "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size), "ETag": f'"{f.blob_id}"'})
        return await self._send(request, repo, path, f, {"ETag": f'"{f.blob_id}"', "X-Repo-Commit": found.sha})

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        path = request.query.get("name", "")
        found = self.repos.get(repo)
        f = found.files.get(path) if found else None
        if f is None or f.sha256 != request.match_info["sha256"]:
            return web.Response(status=404, text="NoSuchKey")
        self.requests.append((request.method, repo, path, request.headers.get("Range")))
        return await self._send(request, repo, path, f, {
            "ETag": f'"{f.sha256}"', "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}";'})

    async def _send(self, request: web.Request, repo: str, path: str, f: _File,
                    headers: dict[str, str]) -> web.StreamResponse:
        start = 0
        ranged = request.headers.get("Range", "")
        if ranged.startswith("bytes="):
            first, _, last = ranged[len("bytes="):].partition("-")
            start = int(first or 0)
            if last:
                raise web.HTTPNotImplemented(text="only open ranges (bytes=N-)")
            if start >= f.size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{f.size}"})
        resp = web.StreamResponse(status=206 if start else 200, headers={
            **headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
            **({"Content-Range": f"bytes {start}-{f.size - 1}/{f.size}"} if start else {})})
        resp.content_length = f.size - start
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        flip = self.corrupt.get((repo, path), 0) > 0
        if flip:
            self.corrupt[(repo, path)] -= 1
        cut = self.drop.pop((repo, path), None)
        stall = self.hold.pop((repo, path), None)
        stop = next((n for n in (cut, stall) if n is not None), f.size)
        pos = start
        while pos < min(stop, f.size):
            end = min(pos + CHUNK, stop, f.size)
            chunk = f.read(pos, end)
            if flip and pos == 0:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            await resp.write(chunk)
            pos = end
        if stall is not None:
            self.held.set()
            for _ in range(1200):  # 120 s at most, or until the client goes away
                if self.release.is_set() or request.transport is None or request.transport.is_closing():
                    break
                await asyncio.sleep(0.1)
        if pos < f.size:  # a fault: the connection goes before the body is complete
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp

    # --- life cycle ---

    def start(self) -> HubFake:
        ready = threading.Event()

        def serve() -> None:
            self.loop = asyncio.new_event_loop()
            repo = "/{org}/{name}"
            hub = web.Application()
            hub.router.add_get(f"/api/models{repo}", self.model_info)
            hub.router.add_get(f"/api/models{repo}/revision/{{rev}}", self.model_info)
            hub.router.add_get(f"/api/models{repo}/tree/{{rev}}", self.tree)
            hub.router.add_get(f"/api/models{repo}/tree/{{rev}}/{{path:.+}}", self.tree)
            hub.router.add_post(f"/api/models{repo}/paths-info/{{rev}}", self.paths_info)
            hub.router.add_route("*", f"{repo}/resolve/{{rev}}/{{path:.+}}", self.resolve)
            cdn = web.Application()
            cdn.router.add_route("*", f"{repo}/{{sha256}}", self.cdn)
            self._runners = [web.AppRunner(app, access_log=None, shutdown_timeout=0.5) for app in (hub, cdn)]
            urls = []
            for runner in self._runners:
                self.loop.run_until_complete(runner.setup())
                site = web.TCPSite(runner, "127.0.0.1", 0)
                self.loop.run_until_complete(site.start())
                urls.append(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")  # type: ignore[union-attr]
            self.url, self.cdn_url = urls
            ready.set()
            self.loop.run_forever()
            for runner in self._runners:
                self.loop.run_until_complete(runner.cleanup())

        self._thread = threading.Thread(target=serve, name="hub-fake", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake hub did not start")
        return self

    def stop(self) -> None:
        self.release.set()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> HubFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
