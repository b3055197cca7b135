"""What kaito's weight delivery costs on this machine, everything on 127.0.0.1:

- a model downloaded from the fake hub (tests/hub_fake.py) by kaito.presets.weights (lock, checksums,
  progress) and by huggingface_hub's snapshot_download alone (the baseline), same files, fresh caches;
- a start with the copy cached and checked before (the record says so: no hashing), and one that hashes
  every file again (a cache seeded by `hf download`, or a file touched since);
- an adapter-sized image pushed and pulled through the Distribution registry (tests/oci_registry.py) by
  kaito.presets.oci, and pulled by skopeo (upstream's puller) for comparison.

    python benchmarks/weights.py [--adapter-mib 100]

The default model's folder (SmolLM2-135M, bf16 safetensors, materialised from its package) is the model.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hub_fake import HubFake, files_of  # noqa: E402
from oci_registry import PASSWORD, USER, Registry  # noqa: E402

REPO = "kaito-bench/smollm2-135m"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter-mib", type=int, default=100)
    args = p.parse_args()
    from huggingface_hub import constants, snapshot_download

    from kaito.presets import model_folder
    from kaito.presets import weights as presets_weights
    from kaito.presets.hub import model_files

    constants.HF_HUB_OFFLINE = False
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    constants.HF_HUB_DISABLE_PROGRESS_BARS = True
    tmp = Path(tempfile.mkdtemp(prefix="kaito-bench-weights-"))
    rows = []
    with HubFake() as hub:
        hub.publish(REPO, files_of(model_folder(quiet=True), skip=("kaito_model.json",)))
        size = sum(f.size for f in hub.repos[REPO].files.values())
        files = model_files(hub.repos[REPO].files)
        base_s, _ = timed(lambda: snapshot_download(REPO, allow_patterns=files, cache_dir=tmp / "baseline",
                                                    endpoint=hub.url, token=False))
        os.environ["HF_HUB_CACHE"] = str(tmp / "kaito")
        kaito_s, folder = timed(lambda: presets_weights.download(REPO, endpoint=hub.url))
        cached_s, _ = timed(lambda: presets_weights.download(REPO, endpoint=hub.url))
        (presets_weights.storage(REPO) / ".kaito" / "verified.json").unlink()
        rehash_s, _ = timed(lambda: presets_weights.download(REPO, endpoint=hub.url))
    mib = size / 2**20
    rows += [("hub download, huggingface_hub snapshot_download (baseline)", base_s, mib / base_s),
             ("hub download, kaito.presets.weights (lock, checksums, progress)", kaito_s, mib / kaito_s),
             ("start with a checked copy cached", cached_s, None),
             ("start with every file hashed again", rehash_s, mib / rehash_s)]

    from kaito.presets import oci

    (tmp / "registry").mkdir()
    reg = Registry(tmp / "registry").start()
    try:
        creds = reg.docker_config(tmp / "auth.json")
        adapter = tmp / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text('{"r": 8}')
        (adapter / "adapter_model.safetensors").write_bytes(os.urandom(args.adapter_mib << 20))
        ref = f"{reg.host}/bench/adapter:1"
        push_s, _ = timed(lambda: oci.push(adapter, ["adapter_config.json", "adapter_model.safetensors"], ref,
                                           auth=[creds]))
        pull_s, _ = timed(lambda: oci.pull(ref, tmp / "pulled", auth=[creds]))
        skopeo_s, _ = timed(lambda: subprocess.run(
            ["skopeo", "copy", "--src-tls-verify=false", f"--src-creds={USER}:{PASSWORD}", f"docker://{ref}",
             f"dir:{tmp / 'skopeo'}"], check=True, capture_output=True))
    finally:
        reg.stop()
    amib = args.adapter_mib
    rows += [(f"push a {amib} MiB adapter image, kaito.presets.oci", push_s, amib / push_s),
             ("pull it, kaito.presets.oci (layers checked and extracted)", pull_s, amib / pull_s),
             ("pull it, skopeo copy to a folder (upstream's puller, before untar)", skopeo_s, amib / skopeo_s)]
    print(f"model: {len(files)} files, {mib:.0f} MiB; adapter: {amib} MiB of random bytes\n")
    print("| what | seconds | MiB/s |\n|---|---|---|")
    for what, seconds, rate in rows:
        print(f"| {what} | {seconds:.2f} | {f'{rate:.0f}' if rate else '-'} |")


if __name__ == "__main__":
    main()
