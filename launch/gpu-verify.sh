#!/usr/bin/env bash
# Verification of the trainer on a GPU machine, against the real libraries:
#   1. `moeq gpu-check`: CUDA ops vs their CPU references (forward and backward);
#   2. tests/fixtures/hf/verify_hf.py: logits, LoRA gradients and adapters in both directions
#      vs transformers + bitsandbytes + PEFT, for qwen3_moe, qwen2_moe, mixtral and olmoe.
# Prepare on the build machine: launch/gpu-check.sh build && ../shared/gpu/fetch-bnb.sh .device/py
# Run (repository root of the GPU machine): launch/gpu-verify.sh [arch ...]; logs go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/device-env.sh
export MOEQ_CACHE_DIR=$OUT/cache
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$OUT/gpu.txt"
status=0
.device/moeq gpu-check > "$OUT/gpu-check.log" 2>&1 || status=1
tail -3 "$OUT/gpu-check.log"
PYTHONPATH=.device/py MOEQ=.device/moeq OUT="$OUT" python3 tests/fixtures/hf/verify_hf.py "$@" 2>&1 \
  | grep -v Warning | tee "$OUT/verify_hf.log" || status=1
exit $status
