# Sourced by scripts/build-images.sh and scripts/check-images.sh: the podman settings this machine kind
# needs (runc: crun refuses mixed cgroups; cgroupfs; a file events logger; ulimits within the container's
# own limits) in $state/containers.conf, pointed at by CONTAINERS_CONF. Sets `state`, the folder of logs.
state=${KAITO_IMAGES_LOG:-${KAITO_HOME:-$HOME/.cache/kaito}/images}
mkdir -p "$state"
export CONTAINERS_CONF="$state/containers.conf"
cat > "$CONTAINERS_CONF" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
REGISTRY=ghcr.io/kaito-project/kaito
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
declare -A TAG=(
  [operator]="$REGISTRY/kaito-operator:$VERSION"
  [ragservice]="$REGISTRY/kaito-rag:$VERSION"
  [runtime-cpu]="$REGISTRY/kaito-serve:$VERSION-cpu"
  [tuning]="$REGISTRY/kaito-tune:$VERSION"
  [runtime-gpu]="$REGISTRY/kaito-serve:$VERSION"
)
