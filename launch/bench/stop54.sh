#!/usr/bin/env bash
# One device call (2026-12-05, stop 54): gpu-check with the new defaults (token-major row
# gathers, experts by chunks, expert adapters in K), their A/B together against the old paths
# (q/k/v/o and expert LoRA, mbs 8), activation offloading's speed and peak, and full depth at
# mbs 8 if time is left. GPU machine, repository root, .device carried.
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
timeout 240 .device/moeq gpu-check > "$OUT/gpu-check.log" 2>&1
echo "gpu-check: exit $?, $(( $(date +%s) - start )) s"
grep -E "^FAIL|r8 every expert" "$OUT/gpu-check.log" | head -30
grep -E "passed, [0-9]+ failed" "$OUT/gpu-check.log"
old="MOEQ_ROWS_BY_TOKEN=0 MOEQ_EXPERT_CHUNKS=0 MOEQ_LORA_IN_K=0"
for cfg in attn expert; do
  echo "== $cfg: A = $old, B = the defaults"
  CFG=$cfg A_ENV="$old" OUT=$OUT/$cfg bash launch/bench/ab.sh 8
done
echo "== offload (activation_offloading: true), the defaults"
CFG=offload A_ENV=MOEQ_UNUSED=1 OUT=$OUT/offload bash launch/bench/ab.sh 8
echo "== full depth, mbs 8"
OUT=$OUT/full timeout "${FULL_LIMIT:-120}" bash launch/bench/side-by-side.sh full 8 | tail -12
