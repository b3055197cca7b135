"""Models by Hugging Face repo id (kaito.presets.hub), against a fake Hub on 127.0.0.1 (tests/hub_fake.py)
that huggingface_hub's own client talks to: describing and sizing, gated repos and tokens, unsupported
architectures, missing repos, downloads that resume, and `kaito-serve --model org/name` end to end.

conftest sets HF_HUB_OFFLINE for the run; huggingface_hub reads it once, at import, so the calls made in
this process switch its constant off (`online`), and the processes started here get an environment without it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import BIN, REPO, Server, free_port, run_cli
from hub_fake import HubFake, files_of

from kaito.presets import (
    GatedModelError,
    HubUnreachableError,
    MissingConfigError,
    ModelNotFoundError,
    PresetError,
    UnsupportedArchitectureError,
    build_vllm_command,
    check_runtime,
    describe,
    estimate,
    get_sku,
    resolve_model,
)
from kaito.presets import hub as presets_hub
from kaito.presets import weights as presets_weights

SMOL = "kaito-test/smollm2-135m"
GATED = "kaito-test/gated-smollm2"
TOY = "kaito-test/toy-arch"  # an architecture neither runtime knows
RWKV = "kaito-test/rwkv-arch"  # one transformers loads and vLLM does not
NO_CONFIG = "kaito-test/no-config"
TINY = "kaito-test/tiny"  # a 24 MiB weight file, for cut transfers
MISTRAL_HF = "kaito-test/mistral-hf"  # Hugging Face shards beside Mistral's consolidated copy and original/
MISTRAL_NATIVE = "kaito-test/mistral-native"  # Mistral's own format only: params.json, consolidated.safetensors
TOKEN = "hf_granted_token"
SKUS = ["Standard_NC24ads_A100_v4", "Standard_NC96ads_A100_v4", "Standard_NC4as_T4_v3", "Standard_NV36ads_A10_v5"]


@pytest.fixture(scope="module")
def fake(default_model_dir) -> HubFake:
    model = files_of(default_model_dir, skip=("kaito_model.json",))
    config = json.loads((default_model_dir / "config.json").read_text())
    with HubFake() as hub:
        hub.publish(SMOL, model)
        hub.publish(GATED, model, token=TOKEN)
        for repo, arch, model_type in [(TOY, "KaitoToyForCausalLM", "kaito_toy"), (RWKV, "RwkvForCausalLM", "rwkv")]:
            cfg = {**config, "architectures": [arch], "model_type": model_type}
            hub.publish(repo, {"config.json": json.dumps(cfg).encode(), "model.safetensors": b"\0" * 4096})
        hub.publish(NO_CONFIG, {"README.md": b"# weights only\n", "model.safetensors": b"\0" * 4096})
        mistral = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
                   "max_seq_len": 32768, "vocab_size": 32768}
        hub.publish(MISTRAL_HF, {
            "config.json": json.dumps({**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral"})
            .encode(), "params.json": json.dumps(mistral).encode(), "tokenizer.json": b"{}",
            "model-00001-of-00002.safetensors": b"\0" * 3000, "model-00002-of-00002.safetensors": b"\0" * 1000,
            "consolidated.safetensors": b"\0" * 4000, "original/model.safetensors": b"\0" * 5000})
        hub.publish(MISTRAL_NATIVE, {"params.json": json.dumps(mistral).encode(), "tekken.json": b"{}",
                                     "consolidated.safetensors": b"\0" * 4096})
        hub.publish(TINY, {"config.json": (default_model_dir / "config.json").read_bytes(),
                           "model.safetensors": hashlib.sha256(b"kaito").digest() * (24 << 15),
                           "original/consolidated.pth": b"\1" * 1024})
        yield hub


@pytest.fixture
def online(monkeypatch, tmp_path) -> Path:
    """huggingface_hub in this process allowed online, with no token and a fresh cache (returned)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def hub_env(fake: HubFake, home: Path, **extra: str | None) -> dict[str, str | None]:
    """The settings of a process that talks to the fake (None: unset): online, its own cache, no token."""
    return {"HF_ENDPOINT": fake.url, "HF_HOME": str(home), "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": None,
            "TRANSFORMERS_OFFLINE": None, "HF_TOKEN": None, "HF_HUB_CACHE": None, **extra}


def environ(settings: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in {**os.environ, **settings}.items() if v is not None}


# --- the architecture list ------------------------------------------------------------------------------


def test_vllm_architectures_file_matches_installed_vllm():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed: the list cannot be compared with its registry")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "vllm_architectures.py"), "--check"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"rerun scripts/vllm_architectures.py: {done.stderr[-2000:]}"
    version, archs = presets_hub.vllm_architectures()
    from importlib.metadata import packages_distributions, version as dist_version

    assert version == dist_version(packages_distributions()["vllm"][0]).split("+")[0]
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"} <= archs
    assert "RwkvForCausalLM" not in archs and not any(a.startswith("#") for a in archs)


# --- the fake itself, through huggingface_hub's client ------------------------------------------------


def test_fake_hub_answers_huggingface_hub(fake, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api = HfApi(endpoint=fake.url, token=False)
    info = api.model_info(TINY, files_metadata=True)
    sizes = {s.rfilename: (s.size, s.lfs.sha256 if s.lfs else None) for s in info.siblings}
    weights = fake.repos[TINY].files["model.safetensors"]
    assert sizes["model.safetensors"] == (24 << 20, weights.sha256) and sizes["config.json"][1] is None
    assert api.model_info(TINY, revision=info.sha).sha == info.sha and info.gated is False
    assert api.model_info(GATED).gated == "manual"  # the Hub shows a gated repo's card to anyone
    tree = {f.path: type(f).__name__ for f in api.list_repo_tree(TINY, recursive=True)}
    assert tree == {"config.json": "RepoFile", "model.safetensors": "RepoFile", "original": "RepoFolder",
                    "original/consolidated.pth": "RepoFile"}
    assert [f.path for f in api.list_repo_tree(TINY, path_in_repo="original")] == ["original/consolidated.pth"]
    assert [f.path for f in api.get_paths_info(TINY, ["config.json", "absent.json"])] == ["config.json"]

    cache = tmp_path / "hub"
    small = hf_hub_download(TINY, "config.json", cache_dir=cache, endpoint=fake.url, token=False)
    big = hf_hub_download(TINY, "model.safetensors", cache_dir=cache, endpoint=fake.url, token=False)
    assert Path(small).read_bytes() == fake.repos[TINY].files["config.json"].source
    assert hashlib.sha256(Path(big).read_bytes()).hexdigest() == weights.sha256
    assert (cache / f"models--{TINY.replace('/', '--')}" / "blobs" / weights.sha256).is_file()  # LFS: by sha256
    assert Path(small).parent.name == info.sha  # X-Repo-Commit

    for call, error in [(lambda: api.model_info("kaito-test/absent"), RepositoryNotFoundError),
                        (lambda: api.model_info(TINY, revision="v9"), RevisionNotFoundError),
                        (lambda: hf_hub_download(TINY, "absent.json", cache_dir=cache, endpoint=fake.url,
                                                 token=False), RemoteEntryNotFoundError)]:
        with pytest.raises(error):
            call()
    for token, status in [(False, 401), ("hf_other_token", 403)]:
        with pytest.raises(GatedRepoError) as e:
            hf_hub_download(GATED, "config.json", cache_dir=cache, endpoint=fake.url, token=token)
        assert e.value.response.status_code == status
    assert Path(hf_hub_download(GATED, "config.json", cache_dir=cache, endpoint=fake.url, token=TOKEN)).is_file()


def test_cut_transfer_resumes_with_a_range_request(fake, online):
    """The fake drops the connection once, 16 MiB into a 24 MiB file: huggingface_hub asks for the rest
    (Range) in the same run, and kaito's download ends with the right bytes and only the files it needs."""
    fake.drop[(TINY, "model.safetensors")] = 16 << 20
    before = len(fake.requests)
    folder = presets_weights.download(TINY, endpoint=fake.url)
    weights = fake.repos[TINY].files["model.safetensors"]
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == weights.sha256
    gets = [(path, rng) for method, repo, path, rng in fake.requests[before:] if method == "GET"]
    assert ("model.safetensors", None) in gets and ("model.safetensors", "bytes=10485760-") in gets  # 10 MiB chunks
    assert not (folder / "original").exists() and {p.name for p in folder.iterdir()} == {"config.json",
                                                                                          "model.safetensors"}


# --- describing and sizing --------------------------------------------------------------------------------


def test_hub_model_sized_as_its_local_folder(fake, online, default_model_dir):
    hub_preset = describe(SMOL, endpoint=fake.url)
    local = resolve_model(str(default_model_dir))
    assert (hub_preset.name, hub_preset.hf_id, hub_preset.runtimes, hub_preset.requires_token) == (
        "smollm2-135m", SMOL, ["vllm", "transformers"], False)
    for field in ("weight_size_gib", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "context_limit", "attention", "architecture", "kv_bytes_per_token"):
        assert getattr(hub_preset, field) == getattr(local, field), field
    for sku in SKUS:
        assert estimate(hub_preset, get_sku(sku)).model_dump() == {
            **estimate(local, get_sku(sku)).model_dump(), "model": "smollm2-135m"}, sku
    assert describe(SMOL, endpoint=fake.url) is hub_preset  # kept per (repo, revision) in the process


def test_kaito_presets_estimate_and_show_a_hub_model(fake, tmp_path, default_model_dir):
    """What a user types: the id on the command line, the hub from HF_ENDPOINT."""
    env = environ(hub_env(fake, tmp_path))
    done = run_cli("kaito-presets", "estimate", SMOL, "--instance-type", SKUS[0], "--json", env=env)
    assert done.returncode == 0, done.stderr
    local = resolve_model(str(default_model_dir))
    assert json.loads(done.stdout) == {**estimate(local, get_sku(SKUS[0])).model_dump(), "model": "smollm2-135m"}
    done = run_cli("kaito-presets", "show", SMOL, "--json", env=env)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["hf_id"], shown["architecture"], shown["runtimes"]) == (SMOL, "LlamaForCausalLM",
                                                                          ["vllm", "transformers"])
    done = run_cli("kaito-presets", "estimate", GATED, "--instance-type", SKUS[0], env=env)
    assert done.returncode == 2 and "is gated: set HF_TOKEN" in done.stderr and "Traceback" not in done.stderr


def test_gated_repo_needs_a_granted_token(fake, online, monkeypatch):
    with pytest.raises(GatedModelError, match=f"{GATED} is gated: set HF_TOKEN .* modelAccessSecret with an "
                                              "HF_TOKEN key under presetOptions"):
        describe(GATED, endpoint=fake.url)
    with pytest.raises(GatedModelError, match="refused the token given: ask for access at "
                                              f"{fake.url}/{GATED}"):
        describe(GATED, "hf_other_token", endpoint=fake.url)
    preset = describe(GATED, TOKEN, endpoint=fake.url)  # the operator's call, with the modelAccessSecret's token
    assert preset.requires_token and preset.num_hidden_layers == 30
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # or the environment's, as kaito-serve gets it
    assert presets_weights.download(GATED, endpoint=fake.url).joinpath("model.safetensors").is_file()


def test_architecture_a_runtime_cannot_run(fake, online):
    with pytest.raises(UnsupportedArchitectureError, match=r"KaitoToyForCausalLM .* neither runtime runs: vLLM "
                                                           r"0\.32\.\d+ does not run .*; transformers 5[\d.]+ "
                                                           "cannot load KaitoToyForCausalLM"):
        describe(TOY, endpoint=fake.url)
    rwkv = describe(RWKV, endpoint=fake.url)
    assert rwkv.runtimes == ["transformers"]
    check_runtime(rwkv, "transformers")
    with pytest.raises(UnsupportedArchitectureError, match=r"cannot run on the vllm runtime: vLLM 0\.32\.\d+ does "
                                                           "not run architecture RwkvForCausalLM.*runs on transformers"):
        describe(RWKV, runtime="vllm", endpoint=fake.url)


def test_weights_are_the_files_the_engine_loads(fake, online):
    """Hugging Face shards, not Mistral's consolidated copy of them nor original/; Mistral's own format
    when it is all there is (vLLM's mistral loader, not transformers)."""
    hf_format = describe(MISTRAL_HF, endpoint=fake.url)
    assert hf_format.weight_size_gib * 2**30 == 4000 and not hf_format.vllm.mistral_format
    assert hf_format.runtimes == ["vllm", "transformers"]
    assert sorted(p.name for p in presets_weights.download(MISTRAL_HF, endpoint=fake.url).iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "params.json",
        "tokenizer.json"]
    native = describe(MISTRAL_NATIVE, endpoint=fake.url)
    assert native.weight_size_gib * 2**30 == 4096 and native.vllm.mistral_format and native.runtimes == ["vllm"]
    assert (native.architecture, native.num_hidden_layers, native.num_key_value_heads, native.context_limit) == (
        "MistralForCausalLM", 32, 8, 32768)
    with pytest.raises(UnsupportedArchitectureError, match="cannot load weights in Mistral's own format"):
        check_runtime(native, "transformers")
    flags = build_vllm_command(native, sku=get_sku(SKUS[0])).flags
    assert flags["load-format"] == flags["config-format"] == flags["tokenizer-mode"] == "mistral"


def test_missing_repo_config_or_hub(fake, online):
    with pytest.raises(ModelNotFoundError, match="kaito-test/absent was not found on the Hugging Face hub"):
        describe("kaito-test/absent", endpoint=fake.url)
    with pytest.raises(MissingConfigError, match="has no config.json .* Its files: README.md, model.safetensors"):
        describe(NO_CONFIG, endpoint=fake.url)
    with pytest.raises(HubUnreachableError, match=r"could not be reached .*ConnectError"):
        describe(SMOL, endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(PresetError, match="unknown preset 'not-a-repo-id'"):
        describe("not-a-repo-id")  # neither a preset nor org/name: the catalogue's error
    requests = len(fake.requests)
    assert describe("HuggingFaceTB/SmolLM2-135M-Instruct", endpoint=fake.url).name == "smollm2-135m-instruct"
    assert len(fake.requests) == requests  # the catalogue first: the hub is not asked


def test_complete_cached_copy_is_used_and_an_incomplete_one_is_not(fake, online):
    folder = presets_weights.download(SMOL, endpoint=fake.url)
    closed = f"http://127.0.0.1:{free_port()}"  # no hub: the cached copy answers
    assert describe(SMOL, endpoint=closed).weight_size_gib == pytest.approx((folder / "model.safetensors")
                                                                            .stat().st_size / 2**30)
    assert presets_weights.download(SMOL, endpoint=closed) == folder
    (folder / "model.safetensors").unlink()  # as an interrupted download leaves it
    with pytest.raises(HubUnreachableError, match="no complete copy"):
        describe(SMOL, endpoint=f"http://127.0.0.1:{free_port()}")  # another hub: not the preset kept above


# --- downloads that resume; kaito-serve ------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_download_killed_halfway_resumes_without_fetching_finished_files(fake, tmp_path):
    """`kaito-presets download org/name` killed while the weights are half through: the next run fetches
    the weights again and nothing else (huggingface_hub keeps each finished file; a file cut by a crash
    starts over, as its temporary file belongs to the dead process)."""
    env = environ(hub_env(fake, tmp_path))
    files = fake.repos[SMOL].files
    others = [p for p in files if p != "model.safetensors"]
    before = {p: fake.downloads(SMOL, p) for p in files}
    fake.held.clear()
    fake.hold[(SMOL, "model.safetensors")] = files["model.safetensors"].size // 2
    exe = str(BIN / "kaito-presets")
    proc = subprocess.Popen([exe, "download", SMOL], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert fake.held.wait(120), "the weights were never asked for"
        snapshot = tmp_path / "hub" / f"models--{SMOL.replace('/', '--')}" / "snapshots" / fake.repos[SMOL].sha
        deadline = time.monotonic() + 60
        while not all((snapshot / p).is_file() for p in others) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all((snapshot / p).is_file() for p in others)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert not (snapshot / "model.safetensors").exists()
    blobs = snapshot.parent.parent / "blobs"
    assert list(blobs.glob("*.incomplete"))  # the dead process's partial file
    done = run_cli("kaito-presets", "download", SMOL, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == snapshot
    assert not list(blobs.glob("*.incomplete"))  # removed, not left to fill the disk
    assert hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest() == files[
        "model.safetensors"].sha256
    assert {p: fake.downloads(SMOL, p) - before[p] for p in files} == {
        **dict.fromkeys(others, 1), "model.safetensors": 2}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kaito_serve_downloads_and_serves_a_hub_model(fake, tmp_path):
    """`kaito-serve --model org/name` with only HF_ENDPOINT and a fresh KAITO_HOME: the weights land in
    $KAITO_HOME/huggingface/hub (HF_HOME unset), then the model answers through the OpenAI SDK."""
    from openai import OpenAI

    env = hub_env(fake, tmp_path, KAITO_HOME=str(tmp_path / "kaito"), HF_HOME=None)
    srv = Server("--model", SMOL, "--backend", "transformers", env=env, log_path=tmp_path / "serve.log")
    try:
        srv.wait_ready(timeout=500)
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="none", timeout=120)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
        reply = client.chat.completions.create(
            model="smollm2-135m", max_tokens=32, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in reply.choices[0].message.content
        from prometheus_client.parser import text_string_to_metric_families

        samples = {(s.name, s.labels.get("model")): s.value for family in text_string_to_metric_families(
            httpx.get(f"{srv.url}/metrics").text) for s in family.samples}
        size = sum(f.size for f in fake.repos[SMOL].files.values())
        assert samples[("kaito_model_download_bytes", SMOL)] == samples[("kaito_model_download_size_bytes", SMOL)] \
            == size
    finally:
        srv.stop()
    log = srv.log()
    assert f"downloading {SMOL} (6 files" in log, log
    snapshot = tmp_path / "kaito" / "huggingface" / "hub" / f"models--{SMOL.replace('/', '--')}" / "snapshots"
    assert (snapshot / fake.repos[SMOL].sha / "model.safetensors").is_file()


@pytest.mark.timeout(300)
def test_two_processes_sharing_a_cache_download_once(fake, tmp_path):
    """Two `kaito-presets download` on one cache (two pods on one PVC, an init container and kaito-serve):
    the second waits for the first's lock, then uses its copy; every file is fetched once."""
    env = environ(hub_env(fake, tmp_path))
    files = fake.repos[SMOL].files
    before = {p: fake.downloads(SMOL, p) for p in files}
    fake.held.clear()
    fake.release.clear()
    fake.hold[(SMOL, "model.safetensors")] = files["model.safetensors"].size // 2
    exe = str(BIN / "kaito-presets")
    first = subprocess.Popen([exe, "download", SMOL], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        assert fake.held.wait(120), "the weights were never asked for"
        second = subprocess.Popen([exe, "download", SMOL], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        time.sleep(3)  # long enough to reach the lock the first one holds
        assert second.poll() is None
    finally:
        fake.release.set()
    out1, err1 = first.communicate(timeout=240)
    out2, err2 = second.communicate(timeout=240)
    fake.release.clear()
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert out1 == out2 and Path(out1.strip()).joinpath("model.safetensors").is_file()
    assert f"waiting for another process downloading {SMOL}" in err2
    assert f"downloading {SMOL} (" in err1 and f"downloading {SMOL} (" not in err2
    assert re.search(rf"downloading {SMOL}: [1-9]0% \([\d.]+ GiB of 0\.25 GiB\)", err1), err1  # progress, off a tty
    # every file once; the weights twice, by the first process: the fake cut the held transfer when released,
    # and the first process asked for the rest with a range request
    assert {p: fake.downloads(SMOL, p) - before[p] for p in files} == {
        **dict.fromkeys(files, 1), "model.safetensors": 2}
    assert fake.requests[-1][1:3] == (SMOL, "model.safetensors") and fake.requests[-1][3].startswith("bytes=")


def test_corrupted_file_is_detected_and_fetched_again(fake, online, capsys):
    """A file whose bytes do not match its etag (the blob's name: sha256 for LFS files, the git blob id for
    the others): in the cache, or as served, it is fetched again; served wrong twice, it is an error."""
    folder = presets_weights.download(TINY, endpoint=fake.url)
    weights = folder / "model.safetensors"
    blob = weights.resolve()
    assert blob.name == fake.repos[TINY].files["model.safetensors"].sha256
    before = fake.downloads(TINY, "model.safetensors")
    assert presets_weights.download(TINY, endpoint=fake.url) == folder  # checked once: not fetched again
    assert fake.downloads(TINY, "model.safetensors") == before
    with open(blob, "r+b") as f:  # one byte flipped on disk, same size
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 1]))
    assert presets_weights.download(TINY, endpoint=fake.url) == folder
    assert "model.safetensors do not match the hub's checksum: downloading them again" in capsys.readouterr().err
    assert fake.downloads(TINY, "model.safetensors") == before + 1
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == blob.name

    fake.corrupt[(MISTRAL_NATIVE, "params.json")] = 1  # served wrong once (a git blob id etag): fetched again
    before = fake.downloads(MISTRAL_NATIVE, "params.json")
    folder = presets_weights.download(MISTRAL_NATIVE, endpoint=fake.url)
    assert (folder / "params.json").read_bytes() == fake.repos[MISTRAL_NATIVE].files["params.json"].source
    assert fake.downloads(MISTRAL_NATIVE, "params.json") == before + 2
    fake.corrupt[(MISTRAL_HF, "tokenizer.json")] = 2  # served wrong twice: an error, and nothing wrong kept
    with pytest.raises(presets_weights.ChecksumError, match="tokenizer.json downloaded twice and neither copy "
                                                            "matches the hub's checksum"):
        presets_weights.download(MISTRAL_HF, endpoint=fake.url)
    assert not list(presets_weights.storage(MISTRAL_HF).glob("snapshots/*/tokenizer.json"))


def test_download_errors_are_clear(fake, online, monkeypatch):
    with pytest.raises(GatedModelError, match=f"{GATED} is gated: set HF_TOKEN"):
        presets_weights.download(GATED, endpoint=fake.url)
    with pytest.raises(GatedModelError, match="refused the token given"):
        presets_weights.download(GATED, "hf_other_token", endpoint=fake.url)
    with pytest.raises(ModelNotFoundError, match="kaito-test/absent was not found on the Hugging Face hub"):
        presets_weights.download("kaito-test/absent", endpoint=fake.url)
    assert not presets_weights.storage("kaito-test/absent").exists()  # no trace of a repo that is not there
    requests = len(fake.requests)
    free = fake.repos[TINY].files["model.safetensors"].size // 2
    monkeypatch.setattr(presets_weights.shutil, "disk_usage", lambda path: shutil_usage(free))
    with pytest.raises(presets_weights.DiskSpaceError, match=r"not enough disk space to download kaito-test/tiny: "
                                                              r"0\.02 GiB still to fetch \(2 files\), only 0\.01 GiB "
                                                              r"free in .* presetOptions\.modelWeightsPVC"):
        presets_weights.download(TINY, endpoint=fake.url)
    assert len(fake.requests) == requests  # refused before any file was asked for


def shutil_usage(free: int):
    import shutil

    return shutil._ntuple_diskusage(1 << 40, (1 << 40) - free, free)


def test_download_progress_on_metrics(fake, online):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    registry.register(presets_weights.metrics_collector())
    presets_weights.download(TINY, endpoint=fake.url)
    size = sum(f.size for p, f in fake.repos[TINY].files.items() if "/" not in p)  # not original/
    found = {(s.name, s.labels["model"]): s.value for family in text_string_to_metric_families(
        generate_latest(registry).decode()) for s in family.samples}
    assert found[("kaito_model_download_bytes", TINY)] == found[("kaito_model_download_size_bytes", TINY)] == size
