"""Models outside the catalogue, by Hugging Face repo id (`org/name`), as upstream KAITO accepts them.

`describe(name, token)` turns a preset name into a ModelPreset: a catalogue preset (by name, Hugging
Face id or alias), else the repo's file list (weight sizes) and config.json (or Mistral's params.json)
sized with `preset_from_config`, from a complete copy in the local cache when there is one, else from
the hub; `model_files` says which of a repo's files an engine loads, which `weights.py` fetches.
Everything goes through huggingface_hub, so HF_ENDPOINT (a mirror), HF_TOKEN / `hf auth login` and
HF_HUB_OFFLINE apply as usual.

Whether a runtime can run the model comes from its architecture: vLLM's from
`vllm_architectures.txt` (the registry of the vLLM we ship, written by
scripts/vllm_architectures.py: the operator image has no vLLM), transformers' from its
AutoModelForCausalLM mapping. Failures are HubError subclasses (PresetError) saying what to do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any


from .catalogue import PresetError, _slug, get_model, hub_cache, preset_from_config, weight_files
from .schema import ModelPreset, Runtime, VLLMDefaults

VLLM_ARCHITECTURES = Path(__file__).parent / "vllm_architectures.txt"
# What a served model needs from its repository besides the weights (top-level files only: not the
# original/ checkpoints); weight_files picks the weights.
HUB_FILES = ["*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py"]
CONFIG_FILES = ("config.json", "params.json")  # params.json: Mistral's own format, without config.json
NO_TRANSFORMERS_LOADER = ("awq", "gptq", "modelopt")  # need gptqmodel, or have no transformers loader
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(PresetError):
    """A Hugging Face repository that cannot be described or downloaded."""


class GatedModelError(HubError):
    """The repo is gated and no token, or a refused one, was given."""


class ModelNotFoundError(HubError):
    """No such repo (or revision) on the hub, or a private one the token cannot see."""


class MissingConfigError(HubError):
    """The repo has no config.json (nor params.json): not a model kaito can size."""


class HubUnreachableError(HubError):
    """The hub cannot be reached (network, HF_HUB_OFFLINE) and no complete copy is cached."""


class UnsupportedArchitectureError(HubError):
    """The model's architecture runs on neither runtime (or not on the one asked for)."""


def is_repo_id(ref: str) -> bool:
    return bool(REPO_ID.match(ref))


def model_files(files: Iterable[str]) -> list[str]:
    """The files of a repo that an engine loads: the weights and the top-level config, tokenizer and chat
    template files."""
    files = list(files)
    weights = weight_files(dict.fromkeys(files, 0))
    return sorted(f for f in files if f in weights or ("/" not in f and any(fnmatch(f, p) for p in HUB_FILES)))


# --- which runtime runs an architecture -----------------------------------------------------------


@cache
def vllm_architectures() -> tuple[str, frozenset[str]]:
    """(vLLM version, the architectures it runs), from vllm_architectures.txt."""
    try:
        lines = VLLM_ARCHITECTURES.read_text().splitlines()
    except FileNotFoundError:
        raise PresetError(f"{VLLM_ARCHITECTURES} is missing: reinstall kaito") from None
    version = re.search(r"vLLM (\S+)", lines[0])
    return (version.group(1) if version else "?"), frozenset(x for x in lines if x and not x.startswith("#"))


@cache
def _causal_lm_classes() -> tuple[str, frozenset[str]] | None:
    """(transformers version, the classes AutoModelForCausalLM builds), None without transformers."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return None
    return transformers.__version__, frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def runtimes_of(preset: ModelPreset) -> list[Runtime]:
    """The runtimes that can run a model: vLLM when its registry has the architecture; transformers when
    AutoModelForCausalLM builds that class from a checkpoint it can load (the catalogue's rule). Without
    transformers installed (the operator image) its check is left to kaito-serve, which has it."""
    runtimes: list[Runtime] = ["vllm"] if preset.architecture in vllm_architectures()[1] else []
    known = _causal_lm_classes()
    if ((known is None or preset.architecture in known[1]) and preset.quantization not in NO_TRANSFORMERS_LOADER
            and not preset.vllm.mistral_format):
        runtimes.append("transformers")
    return runtimes


def _why_not(preset: ModelPreset, runtime: str) -> str:
    if runtime == "vllm":
        return (f"vLLM {vllm_architectures()[0]} does not run architecture {preset.architecture} (the architectures "
                f"it registers are listed in presets/{VLLM_ARCHITECTURES.name})")
    known = _causal_lm_classes()
    version = f"transformers {known[0]}" if known else "transformers"
    if preset.vllm.mistral_format:
        return f"{version} cannot load weights in Mistral's own format (consolidated*.safetensors)"
    if preset.quantization in NO_TRANSFORMERS_LOADER:
        return f"{version} cannot load {preset.quantization} weights here"
    return (f"{version} cannot load {preset.architecture} (model_type {preset.family}) as a causal LM: "
            "AutoModelForCausalLM does not build that class")


def check_runtime(preset: ModelPreset, runtime: str) -> None:
    """Raise UnsupportedArchitectureError when `runtime` (vllm, transformers) cannot run the preset."""
    if runtime in preset.runtimes:
        return
    other = f"; it runs on {' and '.join(preset.runtimes)}" if preset.runtimes else ""
    raise UnsupportedArchitectureError(
        f"{preset.hf_id} cannot run on the {runtime} runtime: {_why_not(preset, runtime)}{other}")


# --- describing a repo ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """A repo's files at one commit, from the hub or (`folder`) from a complete copy in the local cache."""

    sha: str
    files: dict[str, int]  # path -> size
    gated: bool = False
    folder: Path | None = None  # a complete copy in the local cache


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def gated_message(repo: str, *, refused: bool = False, endpoint: str | None = None) -> str:
    # Upstream KAITO: "This preset requires authentication and needs a modelAccessSecret with HF_TOKEN key
    # under presetOptions to download the model"; said here for every way kaito gets a token.
    where = ("in a Workspace, a modelAccessSecret with an HF_TOKEN key under presetOptions; elsewhere the HF_TOKEN "
             "variable or `hf auth login`")
    if refused:
        endpoint = _endpoint(endpoint)
        return (f"{repo} is gated and the Hugging Face hub refused the token given: ask for access at {endpoint}/"
                f"{repo} with the token's account, or give a token that was granted access ({where})")
    return (f"{repo} is gated: set HF_TOKEN to a Hugging Face token that was granted access ({where}); the hub "
            "requires authentication to download it")


@contextmanager
def hub_errors(repo: str, token: str | None, endpoint: str | None) -> Iterator[None]:
    """huggingface_hub's errors as HubErrors saying what to do."""
    import httpx2
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = _endpoint(endpoint)
    try:
        yield
    except GatedRepoError as e:
        refused = e.response.status_code == 403 or bool(token or get_token())
        raise GatedModelError(gated_message(repo, refused=refused, endpoint=url)) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo} was not found on the Hugging Face hub ({url}): check the id (org/name, as on its model page); "
            "a private repository needs a token that can read it") from None
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"{repo}: revision not found on the hub ({url}): {_first_line(e)}") from None
    except (OfflineModeIsEnabled, httpx2.TransportError, LocalEntryNotFoundError) as e:
        if isinstance(e, OfflineModeIsEnabled) or constants.is_offline_mode():
            why, fix = "HF_HUB_OFFLINE is set", "Unset HF_HUB_OFFLINE"
        else:
            why, fix = f"{type(e).__name__}: {_first_line(e)}", "Check the network (or HF_ENDPOINT, for a mirror)"
        raise HubUnreachableError(
            f"The Hugging Face hub ({url}) could not be reached for {repo} ({why}) and no complete copy is in "
            f"{hub_cache()}. {fix}, or download the model where the hub is reachable.") from None
    except HfHubHTTPError as e:
        raise HubError(f"the Hugging Face hub ({url}) answered {e.response.status_code} for {repo}: "
                       f"{e.server_message or _first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _cached_listing(repo: str, revision: str | None) -> Listing | None:
    """The repo's files from a copy in the local cache that holds every file the engine loads; None when
    there is none, or an interrupted download left it incomplete."""
    storage = hub_cache() / f"models--{repo.replace('/', '--')}"
    ref = storage / "refs" / (revision or "main")
    if ref.is_file():
        commit = ref.read_text().strip()
    elif revision:
        commit = revision
    else:  # a cache without refs: its newest snapshot with a config
        found = sorted((p for c in CONFIG_FILES for p in storage.glob(f"snapshots/*/{c}")),
                       key=lambda p: p.stat().st_mtime)
        if not found:
            return None
        commit = found[-1].parent.name
    folder = storage / "snapshots" / commit
    if not folder.is_dir():
        return None
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:  # the listing huggingface_hub keeps of a snapshot_download
        files = {f.path: f.size for f in get_cached_repo_tree(repo, revision=commit, cache_dir=hub_cache())}
    except CachedRepoTreeNotFoundError:  # files fetched one by one (e.g. by transformers)
        files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    complete = all((folder / f).is_file() for f in model_files(files))
    if not (complete and weight_files(files) and any(c in files for c in CONFIG_FILES)):
        return None
    return Listing(sha=commit, files=files, folder=folder)


def hub_listing(repo: str, revision: str | None, token: str | None, endpoint: str | None) -> Listing:
    """The repo's files and their sizes, asked of the hub."""
    from huggingface_hub import HfApi

    with hub_errors(repo, token, endpoint):
        info = HfApi(endpoint=endpoint, token=token or None).model_info(
            repo, revision=revision, files_metadata=True)
    return Listing(sha=info.sha, files={s.rfilename: s.size or 0 for s in info.siblings or []},
                    gated=bool(info.gated))


def require_hub(repo: str) -> None:
    """`repo` is a hub repo id and huggingface_hub is installed, or a PresetError saying so."""
    if not is_repo_id(repo):
        raise PresetError(f"{repo!r} is not a Hugging Face repo id (org/name)")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise PresetError("models from the Hugging Face hub need huggingface_hub: install kaito[hf]") from None


def listing_of(repo: str, revision: str | None, token: str | None, endpoint: str | None) -> Listing:
    """The repo's files: a complete copy in the local cache when there is one, else the hub's listing."""
    return _cached_listing(repo, revision) or hub_listing(repo, revision, token, endpoint)


def _config(repo: str, listing: Listing, token: str | None, endpoint: str | None) -> dict[str, Any]:
    name = next((c for c in CONFIG_FILES if c in listing.files), None)
    if name is None:
        raise MissingConfigError(
            f"{repo} has no config.json (nor Mistral's params.json), so kaito cannot tell its architecture or size: "
            f"it is not a transformers model. Its files: {', '.join(sorted(listing.files)[:12]) or 'none'}")
    if listing.folder is not None:
        path = listing.folder / name
    else:
        from huggingface_hub import hf_hub_download

        with hub_errors(repo, token, endpoint):
            path = Path(hf_hub_download(repo, name, revision=listing.sha, cache_dir=hub_cache(), token=token or None,
                                        endpoint=endpoint))
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise HubError(f"{repo}'s {name} is not valid JSON: {e}") from None
    if name == "params.json":
        config.setdefault("architectures", ["MistralForCausalLM"])
    return config


_described: dict[tuple[str, str, str, str | None], ModelPreset] = {}


def describe_repo(repo: str, token: str | None = None, *, revision: str | None = None,
                  endpoint: str | None = None) -> ModelPreset:
    """A Hugging Face repo outside the catalogue as a ModelPreset, kept per (repo, revision) in this process."""
    require_hub(repo)
    key = (_endpoint(endpoint), str(hub_cache()), repo, revision)
    if key in _described:
        return _described[key]
    listing = listing_of(repo, revision, token, endpoint)
    config = _config(repo, listing, token, endpoint)
    weights = weight_files(listing.files)
    if not weights:
        raise HubError(f"{repo} has no *.safetensors or *.bin weights at its top level: kaito serves those only")
    preset = preset_from_config(
        config, name=_slug(repo.rsplit("/", 1)[-1]), hf_id=repo, weight_size_gib=sum(weights.values()) / 2**30,
        description=f"{repo} (described from its Hugging Face repo)", requires_token=listing.gated,
        vllm=VLLMDefaults(mistral_format=all(w.startswith("consolidated") for w in weights)))
    runtimes = runtimes_of(preset)
    if not runtimes:
        raise UnsupportedArchitectureError(
            f"{repo} has architecture {preset.architecture} (model_type {preset.family}), which neither runtime "
            f"runs: {_why_not(preset, 'vllm')}; {_why_not(preset, 'transformers')}")
    _described[key] = preset = preset.model_copy(update={"runtimes": runtimes})
    return preset


def describe(name: str, token: str | None = None, *, revision: str | None = None, runtime: Runtime | None = None,
             endpoint: str | None = None) -> ModelPreset:
    """The preset a Workspace names: a catalogue preset (name, Hugging Face id or legacy alias), else a Hugging
    Face repo (`org/name`) described from the hub with `token` (default HF_TOKEN or the stored login). With
    `runtime`, fail when that runtime cannot run the model."""
    try:
        preset = get_model(name)
    except PresetError:
        if not is_repo_id(name):
            raise
        preset = describe_repo(name, token, revision=revision, endpoint=endpoint)
    if runtime is not None:
        check_runtime(preset, runtime)
    return preset
