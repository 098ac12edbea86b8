#!/usr/bin/env bash
# Attention kernels on the GPU machine (repository root, .device/ carried): moeq's, cuDNN's
# through moeq (both backward algorithms) and PyTorch's SDPA backends, at Qwen3-30B-A3B's shape
# for each number of rows given (default 1 4 8). Log in $OUT/attention.log.
#
#   OUT=/tmp/out bash launch/bench/attention.sh [rows...]
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
rows=${*:-1 4 8}
{
  for b in $rows; do .device/moeq gpu-bench --attention "$b"; done
  python3 launch/bench/torch_sdpa.py $rows
} 2>&1 | tee "$OUT/attention.log"
