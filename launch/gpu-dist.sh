#!/usr/bin/env bash
# Distributed paths on a GPU machine (one GPU is enough), repository root, after
# `launch/gpu-check.sh build` on the build machine:
#   1. `moeq nccl-check`: every NCCL collective against the CPU collective (one rank).
#   2. The trainer on one GPU twice: a plain process, and one rank that joins a job (RANK=0,
#      WORLD_SIZE=1) and so runs the distributed path through NCCL (dispatch/combine
#      all-to-all, gradient all-reduce, statistics all-gather). The losses must agree.
#   3. torchrun compatibility: `torchrun --nproc-per-node 2 --no-python moeq train` on the CPU
#      (CPU collective), against one CPU process with the same global batch.
#   4. Resume on the GPU: a run killed (SIGKILL) after its step-20 checkpoint and resumed ends
#      with the losses of an uninterrupted run (bf16: within 1e-2, reported exactly).
# Logs and metrics go to $OUT; the comparison lines are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/device-env.sh
export NCCL_NVLS_ENABLE=0 MOEQ_CACHE_DIR=${MOEQ_CACHE_DIR:-/tmp/moeq-cache}
PY=${PYTHON:-/opt/torch/.venv/bin/python}
work=/tmp/moeq-dist
rm -rf "$work" && mkdir -p "$work"
status=0

echo "== 1. nccl-check (one rank)"
timeout 180 .device/moeq nccl-check > "$OUT/nccl-check.log" 2>&1 || status=1
grep -E "PASS|FAIL|passed" "$OUT/nccl-check.log" | tail -20

# config NAME DEVICE MBS STEPS: the embedded default with another device, batch and length.
config() {
  sed -e "s|output_dir: outputs/tiny-cpu|output_dir: $work/$1|" -e "s/device: cpu/device: $2/" \
    -e "s/micro_batch_size: 8/micro_batch_size: $3/" -e "s/max_steps: 300/max_steps: $4/" \
    -e 's/logging_steps: 10/logging_steps: 1/' -e 's/save_steps: 100/save_steps: 1000/' \
    configs/tiny-cpu.yaml > "$work/$1.yaml"
  echo "pad_to_sequence_len: true" >> "$work/$1.yaml"
}
compare() { # compare A B TOL: per-step losses of two runs
  "$PY" - "$work/$1/metrics.jsonl" "$work/$2/metrics.jsonl" "$3" "$1 vs $2" <<'PY'
import json, sys
a, b, tol, what = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
def losses(path):  # by step; a resumed run appends, later records win
    by_step = {}
    for l in open(path):
        r = json.loads(l)
        if "loss" in r:
            by_step[r["step"]] = r["loss"]
    return [by_step[k] for k in sorted(by_step)]
la, lb = losses(a), losses(b)
worst = max(abs(x - y) / abs(y) for x, y in zip(la, lb))
ok = len(la) == len(lb) and worst <= tol
print(f"{'PASS' if ok else 'FAIL'}  {what}: {len(la)} steps, loss {lb[0]:.4f} -> {lb[-1]:.4f}, max relative difference {worst:.2e} (tol {tol:g})")
sys.exit(0 if ok else 1)
PY
}

echo "== 2. trainer on one GPU: plain vs one rank through NCCL"
config gpu-plain cuda 8 60
config gpu-nccl cuda 8 60
sed -i "s|$work/gpu-plain|$work/gpu-nccl|" "$work/gpu-nccl.yaml"
.device/moeq train --config "$work/gpu-plain.yaml" > "$OUT/gpu-plain.log" 2>&1 || status=1
RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$(( 20000 + RANDOM % 20000 )) MOEQ_JOB_TOKEN=gpu-dist \
  timeout 300 .device/moeq train --config "$work/gpu-nccl.yaml" > "$OUT/gpu-nccl.log" 2>&1 || status=1
grep -E "joined|trained|error" "$OUT/gpu-plain.log" "$OUT/gpu-nccl.log" | cut -c1-220
# bf16 on the GPU: the distributed path adds the same numbers in the same order; allow bf16 noise.
compare gpu-nccl gpu-plain 1e-2 || status=1
cp "$work/gpu-nccl/metrics.jsonl" "$OUT/gpu-nccl-metrics.jsonl" 2>/dev/null || true

echo "== 3. torchrun --no-python, 2 ranks on the CPU vs one process"
config cpu-one cpu 8 30
config cpu-torchrun cpu 4 30
TORCHRUN=${TORCHRUN:-$(dirname "$PY")/torchrun}
.device/moeq train --config "$work/cpu-one.yaml" > "$OUT/cpu-one.log" 2>&1 || status=1
timeout 300 "$TORCHRUN" --nproc-per-node 2 --master-port $(( 20000 + RANDOM % 20000 )) --no-python \
  .device/moeq train --config "$work/cpu-torchrun.yaml" > "$OUT/cpu-torchrun.log" 2>&1 || status=1
grep -E "joined|trained|error" "$OUT/cpu-torchrun.log" | cut -c1-220 | head -6
compare cpu-torchrun cpu-one 1e-5 || status=1
echo "== 4. one GPU: killed after the step-20 checkpoint and resumed, vs uninterrupted"
for name in gpu-straight gpu-resumed; do
  config $name cuda 8 60
  sed -i 's/save_steps: 1000/save_steps: 20/' "$work/$name.yaml"
done
echo "resume_from_checkpoint: auto" >> "$work/gpu-resumed.yaml"
.device/moeq train --config "$work/gpu-straight.yaml" > "$OUT/gpu-straight.log" 2>&1 || status=1
.device/moeq train --config "$work/gpu-resumed.yaml" > "$OUT/gpu-resumed.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do [ -e "$work/gpu-resumed/checkpoint-20/COMPLETE" ] && break; sleep 0.1; done
kill -9 $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
echo "killed at step $(grep -c '"loss"' "$work/gpu-resumed/metrics.jsonl")"
.device/moeq train --config "$work/gpu-resumed.yaml" >> "$OUT/gpu-resumed.log" 2>&1 || status=1
grep -E "resuming|trained|error" "$OUT/gpu-resumed.log" | cut -c1-200
compare gpu-resumed gpu-straight 1e-2 || status=1
echo "gpu-dist status $status"
exit "$status"
