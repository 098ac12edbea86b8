#!/usr/bin/env bash
# One device call (stop 55): gpu-check with the defaults, with the experts by chunks
# (MOEQ_EXPERT_CHUNKS=1) and with the attention rerun (MOEQ_KEEP_ATTENTION=0), all three at
# once; then the attention rerun's A/B (A kept, B rerun) at mbs 8, q/k/v/o with and without
# activation offloading. GPU machine, repository root, .device carried.
set -uo pipefail
cd "$(dirname "$0")/../.."
LIMIT=${LIMIT:-400} OUT=$OUT/check bash launch/bench/check-switches.sh - MOEQ_EXPERT_CHUNKS=1 \
  MOEQ_KEEP_ATTENTION=0
for cfg in attn offload; do
  echo "== $cfg: A = attention kept, B = rerun"
  CFG=$cfg A_ENV=MOEQ_KEEP_ATTENTION=1 MOEQ_KEEP_ATTENTION=0 OUT=$OUT/$cfg \
    bash launch/bench/ab.sh ${MBS:-8}
done
