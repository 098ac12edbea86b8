#!/usr/bin/env bash
# The expert GEMMs on the GPU machine (repository root, .device/ carried): `moeq gpu-bench
# --experts` at the token counts of micro-batch 1, 4 and 8 (sequence 2048) — cuBLAS's grouped
# GEMM and the Hopper kernel side by side, raw and through the 4-bit expert op — then the whole
# `moeq gpu-check` (the Hopper kernel's twin check included). Logs to $OUT.
#
#   OUT=/tmp/out bash launch/bench/expert-gemm.sh [tokens ...]
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$OUT/gpu.txt"
for t in ${*:-2048 8192 16384}; do
  .device/moeq gpu-bench --experts "$t" --iters 20 2>&1 | tee -a "$OUT/expert-gemm.log"
done
[ "${SKIP_CHECK:-0}" = 1 ] && exit 0
.device/moeq gpu-check > "$OUT/gpu-check.log" 2>&1
rc=$?
grep -iE "hopper|cuBLAS\)|FAIL" "$OUT/gpu-check.log" | head -40
tail -3 "$OUT/gpu-check.log"
exit $rc
