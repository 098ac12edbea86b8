#!/usr/bin/env bash
# Where loading time goes: the 12-layer Qwen3-30B-A3B bench model loaded (a) from a synthesized
# bf16 checkpoint on disk (written first; it is then in the page cache) and (b) drawn on the GPU
# (init=device), each followed by 2 training steps, with MOEQ_PHASE_TIMES=1 so the log carries a
# per-phase table of the load (profiling synchronizes every phase), then each again without
# profiling: the honest wall time ("frozen base: ... in N s" plus "model on the GPU: built in
# M s", the codes and statistics then being on the GPU). GPU machine, repository root,
# .device/ carried:
#
#   OUT=/tmp/out bash launch/bench/load-profile.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
export MOEQ_CACHE_DIR=${MOEQ_CACHE_DIR:-/tmp/moeq-cache}
mkdir -p "$OUT/load"
for run in disk device disk-plain device-plain; do
  init=${run%-plain}
  profile=1
  [ "$run" = "$init" ] || profile=0
  conf=$OUT/load/$run.yaml
  sed -e "s#^base_model:.*#base_model: synth://qwen3_moe/qwen3-30b-a3b?seed=0\&layers=12\&init=$init#" \
      -e "s#^max_steps:.*#max_steps: 2#" -e "s#^warmup_steps:.*#warmup_steps: 1#" \
      -e "s#^output_dir:.*#output_dir: /tmp/moeq-bench/load-$init#" \
      configs/bench/qwen3-30b-a3b-12l-attn-lora.yaml > "$conf"
  rm -rf "/tmp/moeq-bench/load-$init"
  start=$(date +%s)
  MOEQ_PHASE_TIMES=$profile .device/moeq train --config "$conf" > "$OUT/load/$run.log" 2>&1
  echo "$run (MOEQ_PHASE_TIMES=$profile): exit $?, $(( $(date +%s) - start )) s wall (synthesis included for the first disk run)"
  grep -E "synthesiz|frozen base:|model on|loading: |  load: " "$OUT/load/$run.log" | cut -c1-160
done
