#!/usr/bin/env bash
# The gated delta rule's kernels on the GPU machine (repository root, .device/ carried): moeq's
# kernels, the chunked reference on candle ops and the dense gated-attention layer of the same
# model (Qwen3.5-35B-A3B's shapes), for each number of rows of 2,048 positions (default 1 4).
# Log in $OUT/delta-rule.log.
#
#   OUT=/tmp/out bash launch/bench/delta-rule.sh [rows...]
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
for b in ${*:-1 4}; do .device/moeq gpu-bench --delta-rule "$b"; done 2>&1 | tee "$OUT/delta-rule.log"
