#!/usr/bin/env bash
# What holds a training step back besides its kernels: the 12-layer bench config (q/k/v/o LoRA,
# or `expert`) at one micro-batch size, with nvidia-smi sampling the SM clock, power and the
# active clock-event (throttle) reasons every 100 ms, and MOEQ_PHASE_TIMES=host (the host's time
# per phase and its waits on the device, nothing synchronized). Prints tokens/s (median of
# steps 3..), the samples' medians while the GPU is busy, and the host phase table. A kernel sum
# from `kernel-profile.sh` (ncu, kernels one at a time) below the step's wall time is either the
# GPU waiting on the host (host phases near the wall time, little waiting) or kernels running
# slower under sustained load (clock below the boost clock, power or thermal reasons active).
# GPU machine, repository root, .device/ carried:
#
#   OUT=/tmp/out bash launch/bench/clocks.sh [mbs] [attn|expert]
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
export MOEQ_CACHE_DIR=${MOEQ_CACHE_DIR:-/tmp/moeq-cache}
mbs=${1:-8}
cfg=${2:-attn}
mkdir -p "$OUT/clocks"
conf=$OUT/clocks/mbs$mbs-$cfg.yaml
sed -e "s#^micro_batch_size:.*#micro_batch_size: $mbs#" -e "s#^output_dir:.*#output_dir: /tmp/moeq-bench/clocks#" \
  "configs/bench/qwen3-30b-a3b-12l-$cfg-lora.yaml" > "$conf"
rm -rf /tmp/moeq-bench/clocks
q=clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,utilization.gpu,clocks_event_reasons.active
nvidia-smi --query-gpu=$q --format=csv,noheader,nounits -lms 100 > "$OUT/clocks/smi.csv" 2> "$OUT/clocks/smi.err" &
smi=$!
MOEQ_PHASE_TIMES=host .device/moeq train --config "$conf" > "$OUT/clocks/train.log" 2>&1
rc=$?
echo "train exit $rc"
kill $smi; wait $smi 2>/dev/null
head -2 "$OUT/clocks/smi.err"
python3 - "$OUT/clocks/smi.csv" /tmp/moeq-bench/clocks/metrics.jsonl "$rc" <<'PY'
import collections, json, os, statistics, sys
ok = sys.argv[3] == "0" and os.path.exists(sys.argv[2])
steps = [json.loads(l) for l in open(sys.argv[2]) if '"step"' in l] if ok else []
tps = [s["tokens_per_s"] for s in steps if s["step"] >= 3]
print(f"tokens/s median of steps 3..{len(steps)}: {statistics.median(tps):,.0f}" if tps else "no steps")
rows = []
for line in open(sys.argv[1]):
    f = [x.strip() for x in line.split(",")]
    try:
        rows.append((float(f[0]), float(f[1]), float(f[2]), float(f[3]), float(f[4]), float(f[5]), f[6]))
    except (ValueError, IndexError):
        pass
busy = [r for r in rows if r[5] >= 50]
print(f"{len(rows)} samples, {len(busy)} with utilization >= 50%")
if busy:
    med = lambda i: statistics.median(r[i] for r in busy)
    print(f"SM clock median {med(0):.0f} MHz (min {min(r[0] for r in busy):.0f}, max {max(r[0] for r in busy):.0f}; "
          f"max clock {busy[0][1]:.0f}), power median {med(2):.0f} W of {busy[0][3]:.0f}, "
          f"temperature median {med(4):.0f} C, utilization median {med(5):.0f}%")
    for reason, n in collections.Counter(r[6] for r in busy).most_common(5):
        print(f"  clock-event reasons {reason}: {n} samples")
PY
sed -n '/INFO phase times (host time/,/saved adapter/p' "$OUT/clocks/train.log" | grep -v 'saved adapter'
