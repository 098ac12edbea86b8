#!/usr/bin/env bash
# Which kernels a training step spends its GPU time in: the Qwen3-30B-A3B bench config cut to
# LAYERS layers (default 2: a 12-layer step takes ~170 s under ncu) (q/k/v/o LoRA, or expert
# LoRA with `expert`) at one micro-batch size, 2 steps, every kernel
# timed by Nsight Compute (gpu__time_duration, clocks left alone; kernels run one at a time, so
# this gives each kernel's own time, not the step's overlap). Prints the time per kernel name
# over the steps (everything after the last loading kernel), largest first, the matrix products
# by launch shape (grid and block: which products run under the dense rate), then the same run
# without ncu with MOEQ_PHASE_TIMES=1 (wall time per phase, to compare against the kernel sum:
# the difference is time the GPU waits on the host). GPU machine,
# repository root, .device/ carried:
#
#   OUT=/tmp/out [CONFIG=file] [BIN=.device/old/moeq] bash launch/bench/kernel-profile.sh [mbs] [attn|expert]
#
# BIN profiles another binary (default .device/moeq; launch/bench/kernel-ab.sh profiles both
# of an A/B pair).
# CONFIG profiles another config with a synth:// base instead, cut to LAYERS layers by the
# URL's `layers=` (e.g. configs/bench/qwen3.5-35b-a3b.yaml with LAYERS=4: three linear-attention
# layers and one full-attention layer).
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
export MOEQ_CACHE_DIR=${MOEQ_CACHE_DIR:-/tmp/moeq-cache}
mbs=${1:-4}
bin=${BIN:-.device/moeq}
[ -x "$bin" ] || { xz -dkf "$bin.xz" && chmod +x "$bin"; }
cfg=${2:-attn}
layers=${LAYERS:-2}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu not found"; exit 1; }
mkdir -p "$OUT/kprof"
conf=$OUT/kprof/mbs$mbs-$cfg.yaml
src=${CONFIG:-configs/bench/qwen3-30b-a3b-12l-$cfg-lora.yaml}
cut="s#layers=12#layers=$layers#"
[ -n "${CONFIG:-}" ] && cut="s#^\(base_model: synth://[^?]*?\)#\1layers=$layers\&#"
sed -e "$cut" -e "s#^micro_batch_size:.*#micro_batch_size: $mbs#" -e "s#^max_steps:.*#max_steps: 2#" \
    -e "s#^warmup_steps:.*#warmup_steps: 1#" -e "s#^output_dir:.*#output_dir: /tmp/moeq-bench/kprof#" \
    "$src" > "$conf"
rm -rf /tmp/moeq-bench/kprof
"$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --log-file "$OUT/kprof/ncu.csv" \
  "$bin" train --config "$conf" > "$OUT/kprof/train.log" 2>&1
echo "train exit $?"
python3 - "$OUT/kprof/ncu.csv" <<'PY'
import csv, collections, sys
lines = open(sys.argv[1]).read().splitlines()
start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
rows = [r for r in csv.DictReader(lines[start:]) if r.get("Metric Name") == "gpu__time_duration.sum"]
def ns(r):
    v = float(r["Metric Value"].replace(",", ""))
    return {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(r["Metric Unit"], 1) * v
# Loading ends with the last quantize or weight-drawing kernel (training dequantizes, so match
# the name's start).
loading = ("quantize_", "normal_")
last = max((i for i, r in enumerate(rows) if r["Kernel Name"].startswith(loading)), default=-1)
steps = rows[last + 1:]
by = collections.defaultdict(lambda: [0.0, 0])
for r in steps:
    name = r["Kernel Name"].split("(")[0][:100]
    by[name][0] += ns(r); by[name][1] += 1
total = sum(v[0] for v in by.values())
print(f"{len(rows)} kernels timed, {len(steps)} after loading: {total/1e6:.1f} ms of kernel time (2 steps + model build)")
for name, (t, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[:40]:
    print(f"{t/2e6:8.2f} ms/step {100*t/total:5.1f}% {n//2:6d}x/step  {name}")
# The matrix products by launch shape (grid and block tell the tile count and kernel): which
# products run under the dense rate.
# (CUTLASS's grouped kernel is persistent: its grid is the SM count whatever the shape, so its
# rows split by the full name — tile and layout — only.)
gemm = ("nvjet", "cutlass", "gemm", "splitK")
shapes = collections.defaultdict(lambda: [0.0, 0])
for r in steps:
    name = r["Kernel Name"]
    if any(g in name for g in gemm) and "sdpa" not in name:
        key = (name, r.get("Grid Size", "?"), r.get("Block Size", "?"))
        shapes[key][0] += ns(r); shapes[key][1] += 1
print("products by launch shape (ms/step, launches/step, µs a launch, grid, block, kernel):")
for (name, grid, block), (t, n) in sorted(shapes.items(), key=lambda kv: -kv[1][0])[:40]:
    short = name if len(name) <= 110 else name[:60] + " … " + name[-47:]
    print(f"{t/2e6:8.2f} {n//2:5d}x {t/max(n,1)/1e3:8.1f} µs  {grid:>16} {block:>12}  {short}")
PY
sed -i -e "s#^max_steps:.*#max_steps: 6#" -e "s#^warmup_steps:.*#warmup_steps: 2#" "$conf"
rm -rf /tmp/moeq-bench/kprof
MOEQ_PHASE_TIMES=1 "$bin" train --config "$conf" > "$OUT/kprof/phases.log" 2>&1
echo "phase-timed run exit $? ($layers layers, mbs $mbs, 6 steps)"
grep -A40 "phase times" "$OUT/kprof/phases.log" | cut -c1-140
