#!/usr/bin/env bash
# The gated delta rule's kernels on the GPU machine (repository root, .device/ carried): the
# chunk op (what trains), the chunkwise form, the token-by-token kernels, the chunked reference
# on candle ops and the dense gated-attention layer of the same model (Qwen3.5-35B-A3B's
# shapes), for each number of rows of 2,048 positions (default 1 4). Log in $OUT/delta-rule.log.
#
#   OUT=/tmp/out bash launch/bench/delta-rule.sh [rows...]
#
# SPLITS="2,64 1,16 ..." instead times the token-by-token kernels alone under each
# MOEQ_DELTA_RULE_SPLIT=CPW,CHUNK (value columns per warp, tokens between the backward's
# checkpoints).
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
for b in ${*:-1 4}; do
  if [ -n "${SPLITS:-}" ]; then
    for split in $SPLITS; do
      echo "== MOEQ_DELTA_RULE_SPLIT=$split"
      MOEQ_DELTA_RULE_SPLIT=$split .device/moeq gpu-bench --delta-rule "$b" --delta-forms recurrent | grep -E "^gated|token-by-token"
    done
  else
    .device/moeq gpu-bench --delta-rule "$b"
  fi
done 2>&1 | tee "$OUT/delta-rule.log"
