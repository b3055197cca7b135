"""A local pod of the local runner: its process (started in a session of its own, its exit code and last
error kept in the resource's folder), and what pods read from a cluster that the runner finds here
instead: hostPath folders for volumes, Secrets from the applied file, this machine's CPUs and ports."""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from kaito.presets.contract import RESULTS_DIR

from .manifests import Manifests

BIN = Path(sys.executable).parent
EXTRAS = {"kaito-serve": "hf", "kaito-tune": "tune", "kaito-rag": "rag"}
ERROR_LINE = re.compile(r"^(?:[\w.-]+: )?error: (.+)$")  # `error: ...` or `kaito-serve: error: ...`


class LocalError(RuntimeError):
    """What the local runner cannot do, and what to do instead."""


def gpu_count() -> int:
    """GPUs nvidia-smi lists (0 without an NVIDIA driver)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # exited, not yet reaped
        return None
    return int(fields[19])


def exe(name: str) -> str:
    exe = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not exe:
        raise LocalError(f"{name} is not installed here: pip install 'kaito[{EXTRAS[name]}]'")
    return exe


def spawn(command: list[str], env: dict[str, str], work: Path, folder: Path, pod: str) -> int:
    """Start one pod's process in a session of its own (a process group `delete` stops as a whole), logging
    to `log<pod>`; sh waits for it and writes its exit code to `exit_code<pod>`, so a later `get` can tell
    a crash from a clean exit."""
    (folder / f"exit_code{pod}").unlink(missing_ok=True)
    wrapper = ["/bin/sh", "-c", '"$@"; echo $? > "$KAITO_EXIT_FILE"', "kaito-local", *command]
    with open(folder / f"log{pod}", "ab") as log_file:
        proc = subprocess.Popen(wrapper, cwd=work, env={**env, "KAITO_EXIT_FILE": str(folder / f"exit_code{pod}")},
                                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc.pid


def ended(folder: Path, pod: str) -> str:
    """How a pod's process ended (its exit code file), with the last error it printed."""
    code_file = folder / f"exit_code{pod}"
    code = code_file.read_text().strip() if code_file.is_file() else ""
    if code:
        n = int(code)
        how = f"was killed by signal {n - 128}" if n > 128 else f"exited with code {n}"
    else:
        how = "was killed"
    error = last_error(folder / f"log{pod}")
    return f"{how}{f': {error}' if error else ''}; see `kaito-operator local logs {folder.name}" + (
        f" --pod {pod[1:]}`" if pod else "`")


def last_error(log_path: Path) -> str | None:
    """The last `error:` line an entry point printed (`error: ...` or `kaito-serve: error: ...`)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if m := ERROR_LINE.match(line):
            return m.group(1).strip()
    return None


def cpu_shares(pods: int) -> list[str]:
    """This machine's CPUs split between `pods` local pods, as VLLM_CPU_OMP_THREADS_BIND lists ("0,1")."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < pods:
        raise LocalError(f"{pods} local pods need a CPU each; this machine gives {len(cpus)}")
    per = len(cpus) // pods
    return [",".join(map(str, cpus[i * per:(i + 1) * per])) for i in range(pods)]


def local_training_config(text: str, output: str) -> str:
    """The training config with the pod's output folder (upstream configs name /mnt/results) moved to
    the local output folder; anything else is kept as written."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        return text
    section = (data.get("training_config") if isinstance(data.get("training_config"), dict) else data)
    args = section.get("TrainingArguments") if isinstance(section, dict) else None
    out_dir = args.get("output_dir") if isinstance(args, dict) else None
    if not isinstance(out_dir, str) or not (out_dir == RESULTS_DIR or out_dir.startswith(RESULTS_DIR + "/")):
        return text
    args["output_dir"] = output + out_dir[len(RESULTS_DIR):]
    return yaml.safe_dump(data, sort_keys=False)


def host_path(volume: dict | None, what: str, *, create: bool = False) -> str:
    if not volume or "hostPath" not in volume:
        kind = next(iter(volume), "nothing") if volume else "nothing"
        raise LocalError(f"{what} uses a {kind} volume, which exists only in a cluster; use hostPath (a local "
                         "folder) with the local runner")
    path = Path(volume["hostPath"]["path"]).expanduser()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    elif not path.exists():
        raise LocalError(f"{what}: {path} does not exist")
    return str(path)


def pull_image(manifests: Manifests, ref: str, dest: Path, secrets: list[str], what: str) -> str:
    """What the pod's init container does (`kaito-presets pull`'s code): image `ref`'s files into `dest`,
    with its imagePullSecrets read from the applied file."""
    from kaito.presets.oci import ImageError, pull

    with tempfile.TemporaryDirectory() as tmp:
        auth = [docker_config(manifests, s, Path(tmp) / str(i)) for i, s in enumerate(dict.fromkeys(secrets))]
        try:
            pull(ref, dest, auth=[a / "config.json" for a in auth])
        except ImageError as e:
            raise LocalError(f"{what}: {e}") from None
    return str(dest)


def docker_config(manifests: Manifests, secret: str, folder: Path) -> Path:
    """A Docker config folder (DOCKER_CONFIG) holding the .dockerconfigjson of Secret `secret`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(secret_value(manifests, secret, ".dockerconfigjson"))
    return folder


def secret_value(manifests: Manifests, name: str, key: str) -> str:
    secret = manifests.find("Secret", name)
    if secret is None:
        raise LocalError(f"Secret {name!r} is not in the applied file: the local runner reads Secrets from it")
    if key in (secret.get("stringData") or {}):
        return str(secret["stringData"][key])
    if key in (secret.get("data") or {}):
        try:
            return base64.b64decode(secret["data"][key], validate=True).decode()
        except ValueError:
            raise LocalError(f"Secret {name!r}: data.{key} is not base64") from None
    raise LocalError(f"Secret {name!r} has no {key} key")
