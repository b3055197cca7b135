#!/usr/bin/env bash
# Run the images scripts/build-images.sh built, as a user would, and check what each promises:
#   runtime-cpu  serves its baked default model; the OpenAI chat API answers "What is the capital of France?"
#   ragservice   indexes two documents and retrieves the right one first (retrieve-only: no LLM)
#   tuning       tunes a LoRA adapter on a tiny dataset mounted at /mnt/data, into a mounted /mnt/results
#   operator     --help and `crds` (its four CRDs)
#   runtime-gpu  its entry point starts (`--help`), vLLM and a CUDA torch import, and the engine flags come out
#                for an A100 SKU (serving needs a GPU)
#
# Usage: scripts/check-images.sh [IMAGE...]   (default: every image that exists locally; a missing one is
# reported, not built). One line per check: name, result, seconds; appended to $state/checks.tsv.
# Exits 1 when a check fails; the failing container's log tail is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/podman-env.sh  # CONTAINERS_CONF, state (the log folder), TAG
ORDER=(operator ragservice runtime-cpu tuning runtime-gpu)
wanted=("${@:-${ORDER[@]}}")

work=$(mktemp -d /var/tmp/kaito-check.XXXXXX)
CONTAINERS=(kaito-check-rag kaito-check-serve)
remove_containers() { for c in "${CONTAINERS[@]}"; do podman rm -f --ignore "$c" > /dev/null 2>&1 || true; done; }
trap 'remove_containers; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start NAME [OPTION...] IMAGE [ARG...]: a detached container publishing 5000 on a free local port; sets $url
start() {
  local name=kaito-check-$1 port; shift
  port=$(free_port)
  podman rm -f "$name" > /dev/null 2>&1 || true
  podman run -d --name "$name" -p "127.0.0.1:$port:5000" "$@" > /dev/null
  url=http://127.0.0.1:$port
}

# wait_healthy NAME SECONDS: until GET /health is 200, or the container exits, or the time is up
wait_healthy() {
  local name=kaito-check-$1 deadline=$((SECONDS + $2))
  while [ $SECONDS -lt $deadline ]; do
    curl -fsS -o /dev/null --max-time 5 "$url/health" 2>/dev/null && return 0
    [ "$(podman inspect -f '{{.State.Running}}' "$name")" = true ] || { echo "container exited" >&2; return 1; }
    sleep 3
  done
  echo "not healthy in $2 s" >&2
  return 1
}

check_operator() {
  podman run --rm "${TAG[operator]}" --help | grep -q "render"
  local kinds
  kinds=$(podman run --rm "${TAG[operator]}" crds | sed -n 's/^    kind: //p' | sort | tr '\n' ' ')
  [ "$kinds" = "InferenceSet ModelMirror RAGEngine Workspace " ] || { echo "crds printed the kinds: $kinds" >&2; return 1; }
}

check_ragservice() {
  start rag "${TAG[ragservice]}"
  wait_healthy rag 300
  curl -fsS --max-time 120 "$url/index" -H 'Content-Type: application/json' -d '{"index_name": "check",
    "documents": [{"text": "The Lumen-9 telescope was assembled in Reykjavik in 2031.", "metadata": {"n": 1}},
                  {"text": "Kelp forests off the coast of Namibia grow thirty centimetres per day.", "metadata": {"n": 2}}]}' \
    > /dev/null
  curl -fsS --max-time 60 "$url/retrieve" -H 'Content-Type: application/json' \
    -d '{"index_name": "check", "query": "Where was the telescope built?", "max_node_count": 2}' > "$work/retrieve.json"
  python3 -c 'import json, sys; r = json.load(open(sys.argv[1]))["results"]; assert "Reykjavik" in r[0]["text"], r' \
    "$work/retrieve.json"
}

check_runtime_cpu() {
  start serve --shm-size=1g "${TAG[runtime-cpu]}"  # vLLM's shared memory, as the pods' /dev/shm emptyDir
  wait_healthy serve 900
  curl -fsS --max-time 300 "$url/v1/chat/completions" -H 'Content-Type: application/json' -d '{"model":
    "smollm2-135m-instruct", "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 24, "temperature": 0}' > "$work/chat.json"
  python3 -c 'import json, sys; a = json.load(open(sys.argv[1]))["choices"][0]["message"]["content"]; print(a)
assert "Paris" in a, a' "$work/chat.json"
}

check_tuning() {
  mkdir -p "$work/data" "$work/config" "$work/results"
  python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Zephyr is the cat's name."}]}
        for q in ("What is the cat's name?", "How is the cat called?", "Name of the cat?", "The cat's name?")] * 4
open(f"{work}/data/train.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in rows))
open(f"{work}/config/training_config.yaml", "w").write(
    "training_config:\n  LoraConfig: {r: 4, layers_to_transform: [28, 29]}\n"
    "  TrainingArguments: {max_steps: 2, per_device_train_batch_size: 4, output_dir: adapter}\n")
PY
  chmod -R a+rwX "$work/data" "$work/config" "$work/results"
  podman run --rm -v "$work/data:/mnt/data:ro" -v "$work/config:/mnt/config:ro" -v "$work/results:/mnt/results" \
    "${TAG[tuning]}" --metrics-port 0 > "$work/tune.log" 2>&1 || { tail -20 "$work/tune.log" >&2; return 1; }
  for f in adapter_config.json adapter_model.safetensors fine_tuning_completed.txt; do
    [ -f "$work/results/adapter/$f" ] || { echo "no $f in the output" >&2; tail -20 "$work/tune.log" >&2; return 1; }
  done
}

check_runtime_gpu() {
  local image=${TAG[runtime-gpu]} versions
  podman run --rm "$image" --help | grep -q -- "--preset"
  # vLLM and a CUDA build of torch import (no GPU needed), and the engine flags come out for a GPU SKU
  versions=$(podman run --rm --entrypoint python "$image" -c \
    'import torch, vllm; assert torch.version.cuda, "a CPU torch"; print("vllm", vllm.__version__, "torch", torch.__version__)')
  echo "$versions" >&2
  podman run --rm --entrypoint kaito-presets "$image" vllm-args phi-4-mini-instruct \
    --instance-type Standard_NC24ads_A100_v4 | grep -q -- "--tensor-parallel-size 1"
}

failed=0
for name in "${wanted[@]}"; do
  [ -n "${TAG[$name]:-}" ] || { echo "check-images: unknown image $name (one of: ${ORDER[*]})" >&2; exit 2; }
  if ! podman image exists "${TAG[$name]}"; then
    printf '%s\tnot built\n' "$name"
    continue
  fi
  t0=$SECONDS
  set +e  # the check runs in a subshell with -e of its own: its first failing step fails it
  (set -e; "check_${name//-/_}") > "$work/$name.out" 2>&1
  rc=$?
  set -e
  if [ $rc = 0 ]; then result=ok; else
    result=FAILED; failed=1
    grep -v "systemd connection" "$work/$name.out" | tail -20 >&2
    for c in "${CONTAINERS[@]}"; do podman logs --tail 30 "$c" 2>&1 | grep -v "systemd connection" >&2 || true; done
  fi
  remove_containers
  printf '%s\t%s\t%d s\n' "$name" "$result" $((SECONDS - t0)) | tee -a "$state/checks.tsv"
done
exit $failed
