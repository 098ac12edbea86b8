#!/usr/bin/env bash
# Where device memory peaks in a step: the 12-layer Qwen3-30B-A3B bench config (q/k/v/o LoRA,
# weights drawn on the GPU) trained for 4 steps per micro-batch size with MOEQ_PHASE_TIMES=1,
# whose log ends with the pool's high-water mark up to each point of the step (load, model
# built, forward, head, each layer's recompute, its MLP's backward, the rest of its backward,
# the gradients' accumulation, optimizer) and the memory outside the pool; nvidia-smi's peak
# for the run is printed next to it. GPU machine, repository root, .device/ carried:
#
#   OUT=/tmp/out [CFG=offload] bash launch/bench/memory-profile.sh [micro-batch sizes...]
#
# CFG picks another 12-layer bench config (offload: activation_offloading; expert: expert LoRA).
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
export MOEQ_CACHE_DIR=${MOEQ_CACHE_DIR:-/tmp/moeq-cache}
mkdir -p "$OUT/memory"
idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
for mbs in ${*:-1}; do
  conf=$OUT/memory/mbs$mbs.yaml
  sed -e "s#^micro_batch_size:.*#micro_batch_size: $mbs#" -e "s#^max_steps:.*#max_steps: 4#" \
      -e "s#^warmup_steps:.*#warmup_steps: 1#" -e "s#^output_dir:.*#output_dir: /tmp/moeq-bench/memory#" \
      "configs/bench/qwen3-30b-a3b-12l-${CFG:-attn}-lora.yaml" > "$conf"
  rm -rf /tmp/moeq-bench/memory
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/memory/mbs$mbs.mem" &
  smi=$!
  MOEQ_PHASE_TIMES=1 .device/moeq train --config "$conf" > "$OUT/memory/mbs$mbs.log" 2>&1
  rc=$?
  kill $smi; wait $smi 2>/dev/null
  peak=$(sort -n "$OUT/memory/mbs$mbs.mem" | tail -1)
  echo "mbs $mbs: exit $rc, nvidia-smi peak $(( peak - idle )) MiB above idle ($idle MiB)"
  grep -E "frozen base:|model on" "$OUT/memory/mbs$mbs.log" | cut -c1-160
  grep -A14 "device memory" "$OUT/memory/mbs$mbs.log" | cut -c1-160
  grep -E '"step"' "/tmp/moeq-bench/memory/metrics.jsonl" | tail -1 | cut -c1-400
done
