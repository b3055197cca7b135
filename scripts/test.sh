#!/usr/bin/env bash
# The test command (README, CI): set up .venv with the pinned test dependencies, then run pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k estimator
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu,dev,operator,tune,chart,rag
# a real OCI registry, skopeo and buildah for the image pull/push tests (tests/oci_registry.py)
missing=$(for tool in docker-registry skopeo buildah; do command -v "$tool" >/dev/null || echo "$tool"; done)
if [ -n "$missing" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
bash scripts/embedding-server-venv.sh  # a real embedding server for the remote-embedding tests (about a minute, once)
exec .venv/bin/pytest "$@"
