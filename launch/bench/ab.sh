#!/usr/bin/env bash
# Two moeq binaries on the same 12-layer bench config (q/k/v/o LoRA by default), alternating A B A B, per
# micro-batch size: steady-state tokens/s (median of steps 3..8) and nvidia-smi's peak memory
# for each run — to tell a change's effect from run-to-run noise. GPU machine, repository root,
# .device/ carried with both binaries (A: .device/old/moeq.xz, B: .device/moeq.xz, packed as
# launch/gpu-check.sh build packs them):
#
#   OUT=/tmp/out [CFG=expert] bash launch/bench/ab.sh [micro-batch sizes...]
# Each run's log, config and memory samples are packed into $OUT/ab-logs.tar.gz.
#
# CFG=expert runs the q/k/v/o + expert LoRA config instead; CONFIG=file another config (BASE=dir
# its base_model). A_ENV="NAME=value ..." makes A the
# same binary as B run with those environment variables (e.g. A_ENV=MOEQ_GROUPED_GEMM=cublas:
# one binary, a switch's A/B; no .device/old needed).
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
export MOEQ_CACHE_DIR=${MOEQ_CACHE_DIR:-/tmp/moeq-cache}
a_env=${A_ENV:-}
if [ -z "$a_env" ]; then xz -dkf .device/old/moeq.xz && chmod +x .device/old/moeq; fi
mkdir -p "$OUT/ab"
idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
for mbs in ${*:-1}; do
  for round in 1 2; do
    for side in A B; do
      bin=.device/moeq
      envs=()
      [ "$side" = A ] && [ -z "$a_env" ] && bin=.device/old/moeq
      [ "$side" = A ] && [ -n "$a_env" ] && read -ra envs <<< "$a_env"
      name=mbs$mbs-$side$round
      conf=$OUT/ab/$name.yaml
      sed -e "s#^micro_batch_size:.*#micro_batch_size: $mbs#" -e "s#^output_dir:.*#output_dir: /tmp/moeq-bench/ab#" \
        -e "s#^base_model:\(.*\)#base_model: ${BASE:-\1}#" \
        "${CONFIG:-configs/bench/qwen3-30b-a3b-12l-${CFG:-attn}-lora.yaml}" > "$conf"
      rm -rf /tmp/moeq-bench/ab
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/ab/$name.mem" &
      smi=$!
      env "${envs[@]}" "$bin" train --config "$conf" > "$OUT/ab/$name.log" 2>&1
      rc=$?
      kill $smi; wait $smi 2>/dev/null
      python3 - "$name" "$rc" "$OUT/ab/$name.mem" "$idle" /tmp/moeq-bench/ab/metrics.jsonl <<'PY'
import json, statistics, sys
name, rc, mem, idle, metrics = sys.argv[1:]
peak = max(int(x) for x in open(mem).read().split()) - int(idle)
steps = [json.loads(l) for l in open(metrics) if '"step"' in l] if rc == "0" else []
tps = statistics.median(s["tokens_per_s"] for s in steps if s["step"] >= 3) if steps else 0
print(f"{name}: exit {rc}, {tps:,.0f} tok/s, peak {peak * 1.048576 / 1000:.2f} GB above idle")
PY
    done
  done
done
# The device returns at most 8 files: the runs' logs, configs and memory samples as one archive.
tar -czf "$OUT/ab-logs.tar.gz" -C "$OUT" ab && rm -rf "$OUT/ab"
