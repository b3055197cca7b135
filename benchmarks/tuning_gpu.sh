#!/usr/bin/env bash
# The tuning benchmark on one CUDA GPU, in one go: LoRA (bf16) and QLoRA (4-bit nf4, double quantisation,
# bf16 compute), each beside the TRL SFTTrainer baseline. Writes benchmarks/results/tuning-cuda-*.{csv,md,png}.
#
#   bash benchmarks/tuning_gpu.sh                     # the embedded default model, 400 examples
#   MODEL=/path/to/model STEPS=800 OUT=$OUT bash benchmarks/tuning_gpu.sh
#
# Needs torch (CUDA), transformers, peft, accelerate, pydantic, pyyaml, prometheus-client; bitsandbytes
# for QLoRA; trl + datasets (extra `bench`) for the baseline (skipped, with a line saying so, when missing).
# WHEELS=dir installs wheels from that folder first (no index).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
out=${OUT:-benchmarks/results}
steps=${STEPS:-400}
if [ -n "${WHEELS:-}" ]; then
  "$py" -m pip install --quiet --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
fi
if ! "$py" -c "import kaito.tuning.train" 2>/dev/null; then
  "$py" -m pip install --quiet --no-deps --no-build-isolation -e .  # kaito itself, no dependency changes
fi
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0))"
model=()
if [ -n "${MODEL:-}" ]; then model=(--model "$MODEL"); fi
for method in lora qlora; do
  "$py" benchmarks/tuning.py --device cuda --method "$method" --steps "$steps" --out "$out" "${model[@]}"
done
