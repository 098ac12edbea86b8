#!/usr/bin/env bash
# One device call for moeq's Hopper attention backward (ops::attn_sm90, off by default): the
# whole gpu-check with it on (its rows: every whole-row case without a window against the CPU,
# its rerun and other form bit for bit, against cuDNN's deterministic backward; 420 s at most —
# a stuck turn traps after 20 s, but a hang must not take the call), the attention
# bench at Qwen3-30B-A3B's, DeepSeek-V3's and GLM-4.7-Flash's shapes (cuDNN's backwards beside
# it, its gradients against cuDNN's deterministic ones; 120 s each at most; Qwen3's also with
# its dQ parts added at once, MOEQ_ATTN_BWD_STAGE=0), then training with and without it (ab.sh:
# A = MOEQ_ATTN_BWD=off, B = sm90, same binary), with one launch of the kernel under Nsight
# Compute before it. GPU machine, repository root, .device carried:
#
#   OUT=/tmp/out bash launch/bench/measure-attn.sh [micro-batch sizes...]   (default 8)
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$OUT/gpu.txt"
start=$(date +%s)
MOEQ_ATTN_BWD=sm90 timeout 420 .device/moeq gpu-check > "$OUT/gpu-check.log" 2>&1
echo "gpu-check (MOEQ_ATTN_BWD=sm90): exit $?, $(( $(date +%s) - start )) s"
grep -E "FAIL" "$OUT/gpu-check.log" | head -40
echo "rows of the Hopper backward: $(grep -cE "Hopper backward|rerun" "$OUT/gpu-check.log")"
tail -3 "$OUT/gpu-check.log"
for shape in "1 8 32,4,128,128" "0 8 32,4,128,128" "1 2 128,128,192,128" "1 4 20,20,256,256"; do
  read -r stage rows heads <<< "$shape"
  MOEQ_ATTN_BWD_STAGE=$stage timeout 120 .device/moeq gpu-bench --attention "$rows" \
    --attention-shape "$heads" 2>&1 | tee -a "$OUT/attention.log"
  echo "gpu-bench --attention $rows --attention-shape $heads (stage $stage): exit ${PIPESTATUS[0]}"
done
# Where the Hopper kernel's time goes: one launch at the Qwen3 shape under Nsight Compute (the
# warp stall reasons say whether the turns, the dQ adds' memory or the products hold it up).
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  MOEQ_ATTN_BWD=sm90 timeout 180 "$NCU" --kernel-name regex:attn_bwd_kernel --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
    --section Occupancy .device/moeq gpu-bench --attention 8 --attention-shape 32,4,128,128 \
    > "$OUT/attn-ncu.txt" 2>&1
  echo "ncu of the Hopper backward: exit $?"
  grep -E "Duration|Throughput|Stall|Warp Cycles|Issued|Registers|L2 Hit|Mem Busy" "$OUT/attn-ncu.txt" | head -40
else
  echo "ncu not found: no profile of the Hopper backward"
fi
MOEQ_ATTN_BWD=sm90 A_ENV=MOEQ_ATTN_BWD=off bash launch/bench/ab.sh ${*:-8}
