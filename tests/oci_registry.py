"""A real OCI registry on 127.0.0.1 for the tests: the Distribution registry (Debian's `docker-registry`
package, `/usr/bin/docker-registry serve CONFIG`) with filesystem storage in a temporary folder and
htpasswd authentication, so pull and push secrets are exercised. Plain HTTP, as kaito speaks to loopback
registries. scripts/test.sh installs the package (and skopeo, buildah) when it is missing.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import httpx
from helpers import free_port

REGISTRY = Path("/usr/bin/docker-registry")
USER, PASSWORD = "kaito", "kaito-push-secret"
# bcrypt of PASSWORD (the registry's htpasswd wants bcrypt; made once with crypt.crypt and a fixed salt)
HTPASSWD = f"{USER}:$2b$05$abcdefghijklmnopqrstuuodCvPa1l83EcYSD1Yam99onhU31a4Qa\n"


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Registry:
        if not REGISTRY.exists():
            raise RuntimeError(f"{REGISTRY} is missing: apt-get install -y docker-registry (scripts/test.sh does)")
        (self.root / "htpasswd").write_text(HTPASSWD)
        config = {
            "version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.root / "data")}, "delete": {"enabled": True}},
            "http": {"addr": self.host}, "auth": {"htpasswd": {"realm": "kaito-test", "path": str(self.root / "htpasswd")}},
        }
        (self.root / "config.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = open(self.root / "registry.log", "wb")
        self.proc = subprocess.Popen([str(REGISTRY), "serve", str(self.root / "config.yml")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://{self.host}/v2/", timeout=1).status_code == 401:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"the registry did not start: {(self.root / 'registry.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()

    def docker_config(self, path: Path, password: str = PASSWORD) -> Path:
        """A Docker config file (a Kubernetes secret's .dockerconfigjson) with credentials for this registry."""
        token = base64.b64encode(f"{USER}:{password}".encode()).decode()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"auths": {self.host: {"auth": token}}}))
        return path
