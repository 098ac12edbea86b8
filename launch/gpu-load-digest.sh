#!/usr/bin/env bash
# The frozen base loaded on the GPU (codes quantized there and kept there for training) has the
# same NF4 bytes as the CPU load: the tiny default model and a 2-layer Qwen3-30B-A3B-shaped one
# are loaded on each device for one training step with MOEQ_NF4_DIGEST, and the per-parameter
# digests (codes per expert, statistics) must be identical. GPU machine, repository root,
# .device/ carried:
#
#   OUT=/tmp/out bash launch/gpu-load-digest.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/device-env.sh
export MOEQ_CACHE_DIR=${MOEQ_CACHE_DIR:-/tmp/moeq-cache}
mkdir -p "$OUT/digest"
status=0
for model in "qwen3_moe/tiny?seed=0" "qwen3_moe/qwen3-30b-a3b?seed=3&layers=2"; do
  for dev in cpu cuda; do
    tag=$(echo "$model" | tr -c 'a-z0-9' '-')$dev
    sed -e "s#^base_model:.*#base_model: synth://${model//&/\\&}#" -e "s#^device:.*#device: $dev#" \
        -e "s#^max_steps:.*#max_steps: 1#" -e "s#^warmup_steps:.*#warmup_steps: 0#" -e "s#^output_dir:.*#output_dir: /tmp/moeq-digest/$tag#" \
        configs/tiny-cpu.yaml > "$OUT/digest/$tag.yaml"
    rm -rf "/tmp/moeq-digest/$tag"
    MOEQ_NF4_DIGEST=$OUT/digest/$tag .device/moeq train --config "$OUT/digest/$tag.yaml" \
      > "$OUT/digest/$tag.log" 2>&1 || { echo "$tag: exit $?"; tail -3 "$OUT/digest/$tag.log"; status=1; }
  done
  cpu=$OUT/digest/$(echo "$model" | tr -c 'a-z0-9' '-')cpu/nf4-rank0-of-1.json
  gpu=$OUT/digest/$(echo "$model" | tr -c 'a-z0-9' '-')cuda/nf4-rank0-of-1.json
  if [ -s "$cpu" ] && cmp -s "$cpu" "$gpu"; then
    echo "$model: NF4 digests identical on CPU and GPU ($(grep -c '"stats"' "$cpu") quantized parameters)"
  else
    echo "$model: NF4 digests DIFFER or missing"; status=1
  fi
done
exit $status
