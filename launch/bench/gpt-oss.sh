#!/usr/bin/env bash
# gpt-oss-20b at full depth on one GPU from a checkpoint in its release format (issue: gpt-oss
# and the grouped-query families): `moeq synth --layout mxfp4` writes the published shape with
# its experts as MXFP4 blocks and scales (once, to $GPT_OSS_DIR), then configs/bench/gpt-oss-20b.yaml
# trains 6 steps per (micro-batch, sequence length); prints tokens/s of the last step, the load
# time and nvidia-smi's peak (100 ms sampling) above idle. GPU machine, repository root, .device/
# carried:
#
#   OUT=/tmp/out [CONFIG=configs/bench/gpt-oss-20b-attn-r8.yaml] bash launch/bench/gpt-oss.sh ["mbs:seq" ...]
#   (default config configs/bench/gpt-oss-20b.yaml; default runs 1:1024 1:2048 4:2048)
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
export MOEQ_CACHE_DIR=${MOEQ_CACHE_DIR:-/tmp/moeq-cache}
dir=${GPT_OSS_DIR:-/tmp/moeq-gpt-oss-20b-mxfp4}
config=${CONFIG:-configs/bench/gpt-oss-20b.yaml}
mkdir -p "$OUT/gpt-oss"
if [ ! -f "$dir/config.json" ]; then
  /usr/bin/time -f "synth: %e s, %M KB peak" .device/moeq synth --arch gpt_oss --preset gpt-oss-20b \
    --layout mxfp4 --dtype bfloat16 --seed 0 --out "$dir" 2>&1 | tail -2
fi
du -sh "$dir"
idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
for run in ${*:-1:1024 1:2048 4:2048}; do
  mbs=${run%%:*}; seq=${run##*:}
  conf=$OUT/gpt-oss/$(basename "$config" .yaml)-mbs$mbs-seq$seq.yaml
  sed -e "s#^micro_batch_size:.*#micro_batch_size: $mbs#" -e "s#^sequence_len:.*#sequence_len: $seq#" \
      -e "s#^base_model:.*#base_model: $dir#" "$config" > "$conf"
  rm -rf /tmp/moeq-bench/gpt-oss-20b
  log=${conf%.yaml}.log
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "${log%.log}.mem" &
  smi=$!
  .device/moeq train --config "$conf" > "$log" 2>&1
  rc=$?
  kill $smi; wait $smi 2>/dev/null
  peak=$(sort -n "${log%.log}.mem" | tail -1)
  echo "$(basename "$config" .yaml) mbs $mbs seq $seq: exit $rc, nvidia-smi peak $(( peak - idle )) MiB above idle ($idle MiB)"
  grep -E "frozen base:|model on|peak|step 6/" "$log" | cut -c1-220
  [ $rc -eq 0 ] || tail -5 "$log"
done
