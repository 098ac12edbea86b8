#!/usr/bin/env bash
# Unsloth beside moeq on gpt-oss-20b's published shape at full depth (24 layers, 32 experts
# top-4), one command, same checkpoint: transformers writes random bf16 weights once (the
# layout gpt-oss's bf16 re-releases have: experts `[E, in, out]`), Unsloth loads it with
# `load_in_4bit` (launch/bench/unsloth_stack.py), moeq reads the same directory
# (configs/bench/gpt-oss-20b-attn-r16.yaml). LoRA r16 α32 on q/k/v/o, sequence 2048, random
# tokens; tokens/s (median after warm-up for Unsloth, the last of 6 steps for moeq) and the
# driver's peak memory. GPU machine, repository root, .device/ carried (with unsloth.tar.xz from
# launch/bench/fetch-unsloth.sh):
#
#   OUT=/tmp/out bash launch/bench/gpt-oss-unsloth.sh [micro-batch sizes...]   (default 1 4)
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
export MOEQ_CACHE_DIR=${MOEQ_CACHE_DIR:-/tmp/moeq-cache}
mbs_list=${*:-1 4}
site=/tmp/moeq-unsloth-site model=/tmp/moeq-gpt-oss-20b-bf16
mkdir -p "$OUT/gpt-oss-unsloth"
[ -d "$site/unsloth-site" ] || { mkdir -p "$site" && xz -dc .device/unsloth.tar.xz | tar -C "$site" -xf -; }
if [ ! -f "$model/model.safetensors.index.json" ]; then
  .device/moeq synth --arch gpt_oss --preset gpt-oss-20b --config-only --force --out "$model"
  python3 launch/bench/unsloth_stack.py --model "$model" --write-model
fi
du -sh "$model"
# shellcheck disable=SC2086
HF_HUB_OFFLINE=1 PYTHONPATH=$site/unsloth-site python3 launch/bench/unsloth_stack.py \
  --model "$model" --targets attn --mbs $mbs_list --outdir "$OUT/gpt-oss-unsloth" 2>&1 | tail -4
for mbs in $mbs_list; do
  f=$OUT/gpt-oss-unsloth/unsloth-attn-lora-mbs$mbs.json
  [ -f "$f" ] && python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('unsloth', r['versions']['unsloth'], 'mbs', r['mbs'], 'tok/s', round(r.get('tokens_per_s', 0)), 'peak GB', round(r.get('peak_gpu_mem_gb_driver', 0), 2), 'oom', r['oom'])" "$f"
done
idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
for mbs in $mbs_list; do
  conf=$OUT/gpt-oss-unsloth/moeq-mbs$mbs.yaml
  sed -e "s#^micro_batch_size:.*#micro_batch_size: $mbs#" -e "s#^base_model:.*#base_model: $model#" \
    configs/bench/gpt-oss-20b-attn-r16.yaml > "$conf"
  rm -rf /tmp/moeq-bench/gpt-oss-20b-attn-r16
  log=${conf%.yaml}.log
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "${log%.log}.mem" &
  smi=$!
  .device/moeq train --config "$conf" > "$log" 2>&1
  rc=$?
  kill $smi; wait $smi 2>/dev/null
  peak=$(sort -n "${log%.log}.mem" | tail -1)
  echo "moeq mbs $mbs: exit $rc, nvidia-smi peak $(( peak - idle )) MiB above idle ($idle MiB)"
  grep -E "frozen base:|step 6/" "$log" | cut -c1-200
  [ $rc -eq 0 ] || tail -5 "$log"
done
