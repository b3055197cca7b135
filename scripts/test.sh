#!/usr/bin/env bash
# The test command (README, CI): set up .venv with the pinned test dependencies, then run pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k estimator
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu,dev,operator,tune,chart,rag
exec .venv/bin/pytest "$@"
