#!/usr/bin/env bash
# Published shapes of the later architectures at full depth on one GPU (issue: gpt-oss and the
# grouped-query families), moeq alone: for each config in $CONFIGS and each micro-batch size,
# 6 steps; prints the tokens/s of the last step, the load time and nvidia-smi's peak (100 ms
# sampling) above idle. GPU machine, repository root, .device/ carried:
#
#   OUT=/tmp/out CONFIGS="configs/bench/ernie-4.5-21b-a3b.yaml ..." bash launch/bench/shapes.sh [micro-batch sizes...]
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
export MOEQ_CACHE_DIR=${MOEQ_CACHE_DIR:-/tmp/moeq-cache}
mkdir -p "$OUT/shapes"
idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
for cfg in ${CONFIGS:?set CONFIGS to the bench configs}; do
  name=$(basename "$cfg" .yaml)
  for mbs in ${*:-1 8}; do
    conf=$OUT/shapes/$name-mbs$mbs.yaml
    sed -e "s#^micro_batch_size:.*#micro_batch_size: $mbs#" \
        -e "s#^output_dir:.*#output_dir: /tmp/moeq-bench/$name#" "$cfg" > "$conf"
    rm -rf "/tmp/moeq-bench/$name"
    log=$OUT/shapes/$name-mbs$mbs.log
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "${log%.log}.mem" &
    smi=$!
    .device/moeq train --config "$conf" > "$log" 2>&1
    rc=$?
    kill $smi; wait $smi 2>/dev/null
    peak=$(sort -n "${log%.log}.mem" | tail -1)
    echo "$name, mbs $mbs: exit $rc, nvidia-smi peak $(( peak - idle )) MiB above idle ($idle MiB)"
    grep -E "frozen base:|model on|step 6/" "$log" | cut -c1-220
    [ $rc -eq 0 ] || tail -5 "$log"
  done
done
