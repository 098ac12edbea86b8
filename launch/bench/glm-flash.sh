#!/usr/bin/env bash
# GLM-4.7-Flash at full depth on one GPU (issue: DeepSeek/GLM architectures): for each
# micro-batch size, 6 steps of configs/bench/glm-4.7-flash-47l-$CFG.yaml (CFG: expert-lora, the
# default, or attn-lora); prints the tokens/s of the last step, the load time and nvidia-smi's
# peak (100 ms sampling) above idle. OPT=adamw_bnb_8bit swaps the optimizer; with
# MOEQ_PHASE_TIMES=1 the log ends with the time per phase and the pool's high-water marks.
# GPU machine, repository root, .device/ carried:
#
#   OUT=/tmp/out [CFG=attn-lora] [OPT=...] bash launch/bench/glm-flash.sh [micro-batch sizes...]
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
export MOEQ_CACHE_DIR=${MOEQ_CACHE_DIR:-/tmp/moeq-cache}
CFG=${CFG:-expert-lora}
OPT=${OPT:-}
name=$CFG${OPT:+-$OPT}
[ "${MOEQ_PHASE_TIMES:-}" = 1 ] && name=$name-phases
mkdir -p "$OUT/glm-flash"
idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
for mbs in ${*:-1 2 4}; do
  conf=$OUT/glm-flash/$name-mbs$mbs.yaml
  sed -e "s#^micro_batch_size:.*#micro_batch_size: $mbs#" \
      configs/bench/glm-4.7-flash-47l-$CFG.yaml > "$conf"
  [ -n "$OPT" ] && echo "optimizer: $OPT" >> "$conf"
  rm -rf /tmp/moeq-bench/glm-flash*
  log=$OUT/glm-flash/$name-mbs$mbs.log
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "${log%.log}.mem" &
  smi=$!
  .device/moeq train --config "$conf" > "$log" 2>&1
  rc=$?
  kill $smi; wait $smi 2>/dev/null
  peak=$(sort -n "${log%.log}.mem" | tail -1)
  echo "glm-4.7-flash 47 layers, $name, mbs $mbs: exit $rc, nvidia-smi peak $(( peak - idle )) MiB above idle ($idle MiB)"
  grep -E "frozen base:|model on|adapter|attention:|step 6/" "$log" | cut -c1-200
  [ "${MOEQ_PHASE_TIMES:-}" = 1 ] && grep -A16 "phase times" "$log" && grep -A14 "device memory" "$log"
  [ $rc -eq 0 ] || tail -5 "$log"
done
