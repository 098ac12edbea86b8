#!/usr/bin/env bash
# The seed stack (transformers + bitsandbytes + PEFT, launch/bench/seed_stack.py), Unsloth
# (launch/bench/unsloth_stack.py) and moeq (configs/bench/*.yaml) on one GPU, same shapes and
# settings, in one command. GPU machine, repository root, .device/ carried (MOEQ_CUDA_ENV=...
# launch/gpu-check.sh build; bitsandbytes: ../shared/gpu/fetch-bnb.sh .device/py; Unsloth:
# launch/bench/fetch-unsloth.sh):
#
#   OUT=/tmp/out bash launch/bench/side-by-side.sh [all|both|pair|seed|unsloth|moeq|keep|full|fullkeep] [micro-batch sizes...]
#   (TARGETS="attn" or "expert" runs one adapter set of the 12-layer runs; both by default)
#
# `all` runs the three stacks, `both` the seed stack and moeq, `pair` Unsloth and moeq. Unsloth loads its model once per
# adapter set and runs every micro-batch size in that process (its import alone takes ~35 s);
# its checkpoint (random bf16 weights, the shape of moeq's synth config) is written once into
# /tmp/moeq-unsloth-model by transformers on the GPU.
# `full` runs moeq alone at full depth (configs/bench/qwen3-30b-a3b-48l-*.yaml, weights drawn on
# the GPU), reported in a table of its own. `keep` runs both stacks without activation
# recompute (seed: no gradient checkpointing; moeq: gradient_checkpointing: false), q/k/v/o LoRA;
# `fullkeep` moeq alone at full depth without recompute.
#
# Each run's device memory is sampled by nvidia-smi every 100 ms (the driver's view, the same
# for both stacks); launch/bench/report.py turns the results into the BENCHMARKS.md table
# ($OUT/table.md). Logs and raw results are packed into $OUT/bench-logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
export PYTHONPATH=$PWD/.device/py
export MOEQ_CACHE_DIR=${MOEQ_CACHE_DIR:-/tmp/moeq-cache}
which=${1:-both}
shift || true
mbs_list=${*:-1 4}
# TARGETS: the adapter sets of the 12-layer runs (attn: q/k/v/o LoRA; expert: with expert LoRA).
targets_list=${TARGETS:-attn expert}
runs=$OUT/runs
mkdir -p "$runs"

# sampled NAME CMD...: runs CMD with its output in $runs/NAME.log and the GPU memory in use
# sampled into $runs/NAME.mem (MiB, one line per 100 ms).
sampled() {
  local name=$1
  shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$runs/$name.mem" &
  local smi=$! rc=0
  "$@" > "$runs/$name.log" 2>&1 || rc=$?
  kill "$smi" 2>/dev/null
  wait "$smi" 2>/dev/null
  echo "$name: exit $rc, $(tail -1 "$runs/$name.log" | cut -c1-160)"
  return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$runs/gpu.txt"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits > "$runs/idle.mem"
date -u +%Y-%m-%d > "$runs/date.txt"
python3 launch/bench/seed_stack.py --matmul-only --out "$runs/matmul.json" > /dev/null
# moeq_run NAME CONFIG MBS [YAML LINE]: moeq on CONFIG at micro-batch MBS (plus the line, own
# output_dir), metrics into $runs/NAME.jsonl.
moeq_run() {
  local name=$1 src=$2 mbs=$3 extra=${4:-} conf=$runs/$1.yaml
  sed -e "s/^micro_batch_size:.*/micro_batch_size: $mbs/" -e "s|^output_dir: *\(.*\)|output_dir: \1-$name|" \
    "$src" > "$conf"
  [ -n "$extra" ] && echo "$extra" >> "$conf"
  local dir
  dir=$(sed -n 's/^output_dir: *//p' "$conf")
  rm -rf "$dir"
  sampled "$name" .device/moeq train --config "$conf"
  cp "$dir/metrics.jsonl" "$runs/$name.jsonl" 2>/dev/null || true
  rm -rf "$dir"
}

keep="gradient_checkpointing: false"
case "$which" in
all | pair | unsloth)
  site=/tmp/moeq-unsloth-site model=/tmp/moeq-unsloth-model
  [ -d "$site/unsloth-site" ] || { mkdir -p "$site" && xz -dc .device/unsloth.tar.xz | tar -C "$site" -xf -; }
  if [ ! -f "$model/model.safetensors.index.json" ]; then
    .device/moeq synth --arch qwen3_moe --preset qwen3-30b-a3b --layers 12 --config-only --force --out "$model"
    python3 launch/bench/unsloth_stack.py --model "$model" --write-model
  fi
  for targets in $targets_list; do
    # shellcheck disable=SC2086
    HF_HUB_OFFLINE=1 PYTHONPATH=$site/unsloth-site sampled "unsloth-$targets" \
      python3 launch/bench/unsloth_stack.py --model "$model" --targets "$targets" --mbs $mbs_list --outdir "$runs"
  done
  ;;
esac
for mbs in $mbs_list; do
  case "$which" in
  both | all | seed)
    sampled "seed-mbs$mbs" python3 launch/bench/seed_stack.py --mbs "$mbs" --out "$runs/seed-mbs$mbs.json"
    ;;
  keep)
    sampled "seed-keep-mbs$mbs" python3 launch/bench/seed_stack.py --mbs "$mbs" --no-checkpointing \
      --out "$runs/seed-keep-mbs$mbs.json"
    moeq_run "moeq-attn-lora-keep-mbs$mbs" configs/bench/qwen3-30b-a3b-12l-attn-lora.yaml "$mbs" "$keep"
    ;;
  full)
    for cfg in attn-lora expert-lora; do
      moeq_run "moeq48-$cfg-mbs$mbs" configs/bench/qwen3-30b-a3b-48l-$cfg.yaml "$mbs"
    done
    ;;
  fullkeep)
    moeq_run "moeq48-attn-lora-keep-mbs$mbs" configs/bench/qwen3-30b-a3b-48l-attn-lora.yaml "$mbs" "$keep"
    ;;
  esac
  case "$which" in
  both | all | pair | moeq)
    for targets in $targets_list; do
      cfg=$targets-lora
      moeq_run "moeq-$cfg-mbs$mbs" configs/bench/qwen3-30b-a3b-12l-$cfg.yaml "$mbs"
    done
    ;;
  esac
done
python3 launch/bench/report.py "$runs" | tee "$OUT/table.md"
tar -czf "$OUT/bench-logs.tar.gz" -C "$OUT" runs && rm -rf "$runs"
