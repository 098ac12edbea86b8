#!/usr/bin/env bash
# Where the GPU waits on the host: the 12-layer bench config (q/k/v/o LoRA, or expert LoRA with
# `expert`) at one micro-batch size under Nsight Systems (CUDA trace), then, over the last two
# of 5 steps, the kernels' busy time against the wall time and the largest idle gaps, each
# with the kernel that ended it (so the host code that held it up can be found). GPU machine,
# repository root, .device/ carried:
#
#   OUT=/tmp/out bash launch/bench/timeline.sh [mbs] [attn|expert]
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
export MOEQ_CACHE_DIR=${MOEQ_CACHE_DIR:-/tmp/moeq-cache}
mbs=${1:-4}
cfg=${2:-attn}
NSYS=$(command -v nsys || ls /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -1)
[ -n "$NSYS" ] || { echo "nsys not found"; exit 1; }
mkdir -p "$OUT/timeline"
conf=$OUT/timeline/mbs$mbs-$cfg.yaml
sed -e "s#^micro_batch_size:.*#micro_batch_size: $mbs#" -e "s#^max_steps:.*#max_steps: 5#" \
    -e "s#^warmup_steps:.*#warmup_steps: 1#" -e "s#^output_dir:.*#output_dir: /tmp/moeq-bench/timeline#" \
    configs/bench/qwen3-30b-a3b-12l-$cfg-lora.yaml > "$conf"
rm -rf /tmp/moeq-bench/timeline
"$NSYS" profile -t cuda -o /tmp/moeq-timeline --force-overwrite true \
  .device/moeq train --config "$conf" > "$OUT/timeline/train.log" 2>&1
echo "train exit $?"
grep "step 5/5" "$OUT/timeline/train.log"
"$NSYS" stats --report cuda_gpu_trace --format csv --output /tmp/moeq-gt /tmp/moeq-timeline.nsys-rep > /dev/null 2>&1
"$NSYS" stats --report cuda_api_sum --format csv --output /tmp/moeq-api /tmp/moeq-timeline.nsys-rep > /dev/null 2>&1
python3 - /tmp/moeq-gt_cuda_gpu_trace.csv /tmp/moeq-api_cuda_api_sum.csv <<'PY'
import csv, sys, collections
rows = list(csv.DictReader(open(sys.argv[1])))
ev = sorted((int(r["Start (ns)"]), int(r["Duration (ns)"]), r["Name"]) for r in rows)
# The last two steps: from the 4th-last "adamw" (or last optimizer kernel) boundary.
opt = [i for i, e in enumerate(ev) if e[2].startswith(("adamw_f32", "affine_f32"))]
marks = sorted(set(ev[i][0] for i in opt))
# Step ends: clusters of optimizer kernels separated by > 20 ms.
ends = [m for j, m in enumerate(marks) if j + 1 == len(marks) or marks[j + 1] - m > 20e6]
if len(ends) < 3:
    print("not enough steps found"); sys.exit()
t0, t1 = ends[-3], ends[-1]
win = [e for e in ev if t0 <= e[0] < t1]
busy, end = 0, t0
gaps = []
prev = "?"
for s, d, n in win:
    if s > end:
        gaps.append((s - end, n[:90], prev[:60]))
    busy += max(0, s + d - max(s, end))
    if s + d > end:
        end = s + d
        prev = n
wall = t1 - t0
print(f"2 steps: wall {wall/1e6:.1f} ms, GPU busy {busy/1e6:.1f} ms ({100*busy/wall:.0f}%), idle {(wall-busy)/1e6:.1f} ms in {len(gaps)} gaps")
big = [g for g in gaps if g[0] > 20e3]
print(f"gaps > 20 us: {len(big)}, {sum(g[0] for g in big)/1e6:.1f} ms")
by = collections.defaultdict(lambda: [0, 0])
for g, n, p in gaps:
    key = n.split("(")[0][:70]
    by[key][0] += g; by[key][1] += 1
print("idle before kernel (top 25):")
for k, (t, c) in sorted(by.items(), key=lambda kv: -kv[1][0])[:25]:
    print(f"  {t/2e6:7.2f} ms/step {c//2:5d}x  {k}")
print("largest single gaps:")
for g, n, p in sorted(gaps, reverse=True)[:12]:
    print(f"  {g/1e3:8.1f} us  before {n[:60]}  after {p}")
api = list(csv.DictReader(open(sys.argv[2])))
print("CUDA API (top 12 by total time, whole run):")
for r in api[:12]:
    print(f"  {float(r['Total Time (ns)'])/1e6:9.1f} ms {r['Num Calls']:>8} calls  {r['Name']}")
PY
