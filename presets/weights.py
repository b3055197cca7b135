"""Downloading a Hugging Face repository's weights: what kaito-serve, kaito-tune and the operator's pods run.

`download(repo)` fetches the files an engine loads (`hub.model_files`) with huggingface_hub's
`snapshot_download` into `hub_cache()` and returns the snapshot folder. Around it:

- one download per cache: a file lock per repository (filelock), so a second process sharing the cache
  waits and then uses the first one's copy (huggingface_hub also locks each file);
- resume: the files already fetched are kept, a transfer cut mid-file continues with a range request in
  the same run; after a kill the cut file starts over and the partial file the dead process left is
  removed (huggingface_hub names its temporary files per process);
- checksums: every file is checked against the name of its blob in the cache, which is its etag: the
  sha256 of an LFS file, the git blob id of the others; a file that does not match is fetched again, and
  a second mismatch is an error. A file checked once is not hashed again while its size and mtime hold;
- disk space: the bytes still to fetch are compared with the free space before anything is fetched;
- progress: huggingface_hub's progress bars on a terminal, a line per 10 % otherwise, and the gauges
  `kaito_model_download_bytes` / `kaito_model_download_size_bytes` per model for a process that serves
  /metrics (`metrics_collector()`).

Gated repositories, unknown ones and an unreachable hub are the hub module's HubErrors.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import sys
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from rich.console import Console

from .catalogue import hub_cache
from .hub import (
    GatedModelError,
    HubError,
    Listing,
    gated_message,
    hub_errors,
    hub_listing,
    listing_of,
    model_files,
    require_hub,
)

CHUNK = 1 << 22
HEX = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
_progress: dict[str, tuple[int, int]] = {}  # repo -> (bytes in the cache, bytes in all)
err = Console(stderr=True, soft_wrap=True, highlight=False)


class DiskSpaceError(HubError):
    """Not enough free disk space for the files still to fetch."""


class ChecksumError(HubError):
    """A file's bytes do not match the hub's checksum, twice."""


def storage(repo: str) -> Path:
    """The repository's folder in the cache (huggingface_hub's layout)."""
    return hub_cache() / f"models--{repo.replace('/', '--')}"


def download(repo: str, token: str | None = None, *, revision: str | None = None, endpoint: str | None = None,
             gated: bool = False) -> Path:
    """The local folder of a Hugging Face repo holding the files an engine loads, fetched into hub_cache()
    unless a complete, verified copy is there. `gated`: the repo is known to be gated, so a missing token
    fails at once."""
    require_hub(repo)
    from huggingface_hub import get_token

    if gated and not (token or get_token()):
        raise GatedModelError(gated_message(repo))
    home = storage(repo)
    (home / ".kaito").mkdir(parents=True, exist_ok=True)
    try:
        return _download(repo, home, token, revision, endpoint)
    except HubError:
        if not any(p.name != ".kaito" for p in home.iterdir()):  # nothing fetched (a 404): no trace left
            shutil.rmtree(home, ignore_errors=True)
        raise


def _download(repo: str, home: Path, token: str | None, revision: str | None, endpoint: str | None) -> Path:
    with _locked(repo, home / ".kaito" / "download.lock"):
        listing = listing_of(repo, revision, token, endpoint)
        for attempt in range(2):
            folder = listing.folder or _fetch(repo, listing, revision, token, endpoint)
            files = model_files(listing.files)
            bad = _verify(home, folder, files)
            if not bad:
                total = sum(listing.files[f] for f in files)
                _progress[repo] = (total, total)
                return folder
            if attempt:
                raise ChecksumError(
                    f"{repo}: {', '.join(bad)} downloaded twice and neither copy matches the hub's checksum: the hub "
                    f"or a proxy between (HF_ENDPOINT) serves other bytes than it lists. Nothing was kept.")
            err.print(f"{repo}: {', '.join(bad)} do not match the hub's checksum: downloading them again", markup=False)
            # fetched again from the hub (a cached copy is not trusted for the listing either)
            listing = hub_listing(repo, listing.sha, token, endpoint)
            revision = listing.sha
    raise AssertionError("unreachable")


@contextmanager
def _locked(repo: str, path: Path) -> Iterator[None]:
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        err.print(f"waiting for another process downloading {repo} into {hub_cache()}", markup=False)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _fetch(repo: str, listing: Listing, revision: str | None, token: str | None, endpoint: str | None) -> Path:
    from huggingface_hub import snapshot_download

    home = storage(repo)
    files = model_files(listing.files)
    for partial in (home / "blobs").glob("*.incomplete"):  # left by a killed process: we hold the lock
        partial.unlink(missing_ok=True)
    snapshot = home / "snapshots" / listing.sha
    missing = {f: listing.files[f] for f in files if not (snapshot / f).is_file()}
    total = sum(listing.files[f] for f in files)
    need = sum(missing.values())
    free = _free_bytes(home)
    if need > free:
        raise DiskSpaceError(
            f"not enough disk space to download {repo}: {_gib(need)} still to fetch ({len(missing)} files), only "
            f"{_gib(free)} free in {hub_cache()}. Free some space, point HF_HOME at a larger volume, or (in a "
            "Workspace) give presetOptions.modelWeightsPVC a volume that holds the model")
    err.print(f"downloading {repo} ({len(files)} files, {total / 2**30:.2f} GiB) into {hub_cache()}", markup=False)
    with _watch(repo, home, snapshot, files, listing.files):
        try:
            with hub_errors(repo, token, endpoint):
                return Path(snapshot_download(repo, revision=revision, allow_patterns=files, cache_dir=hub_cache(),
                                              token=token or None, endpoint=endpoint))
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise DiskSpaceError(f"the disk filled up while downloading {repo} into {hub_cache()} ({_gib(need)} were "
                                 f"to be fetched): free some space or point HF_HOME at a larger volume") from None


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@contextmanager
def _watch(repo: str, home: Path, snapshot: Path, files: list[str], sizes: dict[str, int]) -> Iterator[None]:
    """Progress while huggingface_hub downloads: the bytes in the cache, polled each second, into the
    gauges, and as a line per 10 % when stderr is not a terminal (the bars are huggingface_hub's there)."""
    total = sum(sizes[f] for f in files)
    stop = threading.Event()
    tty = sys.stderr.isatty()

    def size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:  # renamed into place (or removed) since it was listed
            return 0

    def done() -> int:
        have = sum(sizes[f] for f in files if (snapshot / f).exists())
        return have + sum(size(p) for p in (home / "blobs").glob("*.incomplete"))

    def poll() -> None:
        shown = -1
        while True:
            now = min(done(), total)
            _progress[repo] = (now, total)
            tenth = now * 10 // max(total, 1)
            if not tty and tenth > shown:
                if shown >= 0:
                    err.print(f"downloading {repo}: {tenth * 10}% ({_gib(now)} of {_gib(total)})", markup=False)
                shown = tenth
            if stop.wait(1):
                return

    _progress[repo] = (0, total)
    thread = threading.Thread(target=poll, name="download-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        _progress[repo] = (min(done(), total), total)


# --- checksums --------------------------------------------------------------------------------------


def _verify(home: Path, folder: Path, files: list[str]) -> list[str]:
    """The files whose bytes do not match their etag (the name of their blob); those are removed, so the
    next snapshot_download fetches them. Files checked before are skipped while their size and mtime hold."""
    record_path = home / ".kaito" / "verified.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}

    def check(name: str) -> tuple[str, bool, str, list[int]]:
        path = folder / name
        blob = path.resolve()
        if not blob.is_file():
            return name, False, blob.name, []
        st = blob.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        if not HEX.match(blob.name) or record.get(blob.name) == stamp:  # not by etag (a plain copy), or known
            return name, True, blob.name, stamp
        return name, _digest(blob, len(blob.name)) == blob.name, blob.name, stamp

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(check, files))
    bad = []
    for name, ok, blob, stamp in results:
        if ok:
            record[blob] = stamp
            continue
        bad.append(name)
        record.pop(blob, None)
        (home / "blobs" / blob).unlink(missing_ok=True)
        (folder / name).unlink(missing_ok=True)
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(record_path)
    return bad


def _digest(path: Path, length: int) -> str:
    """sha256 (64 hex digits, an LFS file's etag) or git's blob sha1 (40, a small file's etag) of a file."""
    h = hashlib.sha256() if length == 64 else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --- metrics ----------------------------------------------------------------------------------------


def metrics_collector(progress: Mapping[str, tuple[int, int]] = _progress):
    """A prometheus-client collector of the downloads made in this process (register it in the registry a
    server exposes): bytes in the cache and bytes in all, per model (`progress`: repo -> the two)."""
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    class DownloadCollector(Collector):
        def collect(self):
            done = GaugeMetricFamily("kaito_model_download_bytes",
                                     "Bytes of the model's files in the local cache (downloaded so far)", labels=["model"])
            size = GaugeMetricFamily("kaito_model_download_size_bytes",
                                     "Bytes of the model's files that the engine loads", labels=["model"])
            for repo, (have, total) in sorted(progress.items()):
                done.add_metric([repo], have)
                size.add_metric([repo], total)
            yield done
            yield size

    return DownloadCollector()
