#!/usr/bin/env bash
# Single-GPU training benchmark: configs/qwen3-30b-a3b-12l-h100.yaml (Qwen3-30B-A3B shapes, 12
# layers, synthesized into $MOEQ_CACHE_DIR on first use). Metrics (tokens/s, MFU, sampled peak GPU
# memory per step) land in $OUT/metrics.jsonl, the log in $OUT/train.log.
# Prepare on the build machine: MOEQ_PROFILE=release launch/gpu-check.sh build
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/device-env.sh
config=${1:-configs/qwen3-30b-a3b-12l-h100.yaml}
export MOEQ_CACHE_DIR=${MOEQ_CACHE_DIR:-/tmp/moeq-cache}
out_dir=$(sed -n 's/^output_dir: *//p' "$config")
status=0
/usr/bin/time -v .device/moeq train --config "$config" > "$OUT/train.log" 2>&1 || status=$?
grep -E "step|trained|frozen|LoRA|error|Maximum resident" "$OUT/train.log" | tail -25
cp "$out_dir/metrics.jsonl" "$OUT/metrics.jsonl" 2>/dev/null || true
exit $status
