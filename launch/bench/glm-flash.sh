#!/usr/bin/env bash
# GLM-4.7-Flash at full depth on one GPU (issue: DeepSeek/GLM architectures): for each
# micro-batch size, 6 steps of configs/bench/glm-4.7-flash-47l-lora.yaml; prints the tokens/s of
# the last step, the load time and nvidia-smi's peak (100 ms sampling) above idle. GPU
# machine, repository root, .device/ carried:
#
#   OUT=/tmp/out bash launch/bench/glm-flash.sh [micro-batch sizes...]
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
export MOEQ_CACHE_DIR=${MOEQ_CACHE_DIR:-/tmp/moeq-cache}
mkdir -p "$OUT/glm-flash"
idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
for mbs in ${*:-1 2 4}; do
  conf=$OUT/glm-flash/mbs$mbs.yaml
  sed -e "s#^micro_batch_size:.*#micro_batch_size: $mbs#" configs/bench/glm-4.7-flash-47l-lora.yaml > "$conf"
  rm -rf /tmp/moeq-bench/glm-flash
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/glm-flash/mbs$mbs.mem" &
  smi=$!
  .device/moeq train --config "$conf" > "$OUT/glm-flash/mbs$mbs.log" 2>&1
  rc=$?
  kill $smi; wait $smi 2>/dev/null
  peak=$(sort -n "$OUT/glm-flash/mbs$mbs.mem" | tail -1)
  echo "glm-4.7-flash 47 layers, mbs $mbs: exit $rc, nvidia-smi peak $(( peak - idle )) MiB above idle ($idle MiB)"
  grep -E "frozen base:|model on|step 6/" "$OUT/glm-flash/mbs$mbs.log" | cut -c1-200
  [ $rc -eq 0 ] || tail -5 "$OUT/glm-flash/mbs$mbs.log"
done
