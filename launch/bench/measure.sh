#!/usr/bin/env bash
# One device call for a set of kernel changes: gpu-check (the CUDA ops against their CPU
# references; 300 s at most, its FAIL lines and summary printed), then launch/bench/ab.sh over
# the given micro-batch sizes (A: .device/old/moeq.xz, B: .device/moeq.xz; default 4 8).
# GPU machine, repository root, .device carried:
#
#   OUT=/tmp/out [CFG=expert] bash launch/bench/measure.sh [micro-batch sizes...]
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$OUT/gpu.txt"
start=$(date +%s)
timeout 300 .device/moeq gpu-check > "$OUT/gpu-check.log" 2>&1
echo "gpu-check: exit $?, $(( $(date +%s) - start )) s"
grep -E "FAIL" "$OUT/gpu-check.log" | head -40
tail -3 "$OUT/gpu-check.log"
bash launch/bench/ab.sh ${*:-4 8}
