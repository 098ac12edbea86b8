#!/usr/bin/env bash
# GPU checks for moeq: build and pack here, run on a GPU machine.
#
#   launch/gpu-check.sh build   # on the build machine: cargo build --features cuda,nccl (moeq and
#                               # moeq-launch), strip, xz into .device/ (git-ignored; carry it)
#   launch/gpu-check.sh run     # on the GPU machine, repository root: unpack .device/, run
#                               # `moeq gpu-check` (CUDA ops vs CPU references), log to $OUT
#   launch/gpu-check.sh nccl [N] # on the GPU machine: `moeq nccl-check` (NCCL collectives vs
#                               # the CPU collective) alone, then as N ranks started by hand
#                               # (default: the GPU count, at least 2; ranks share GPUs when
#                               # there are fewer, which NCCL may refuse), logs to $OUT
#
# build needs nvcc (CUDA 13.0 or older than the GPU machine's driver) on PATH; on a machine
# without a CUDA toolkit, MOEQ_CUDA_ENV names a script that prints the export lines for one
# (e.g. ../shared/gpu/cuda-build-env.sh). MOEQ_PROFILE picks the cargo profile (default dev:
# checks need correctness, not speed; benchmarks use release).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: launch/gpu-check.sh build|run|nccl [N]}
profile=${MOEQ_PROFILE:-dev}

case "$mode" in
build)
  if [ -n "${MOEQ_CUDA_ENV:-}" ]; then eval "$(bash "$MOEQ_CUDA_ENV")"; fi
  eval "$(bash launch/fetch-cutlass.sh)"
  eval "$(bash launch/fetch-cudnn.sh)"
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/moeq-target-cuda}
  cargo build --profile "$profile" --features cuda,nccl --bin moeq --bin moeq-launch
  dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
  mkdir -p .device
  for bin in moeq moeq-launch; do
    strip -o ".device/$bin" "$CARGO_TARGET_DIR/$dir/$bin"
    xz -f -T2 ".device/$bin"
  done
  ls -la .device/
  ;;
run | nccl)
  source launch/device-env.sh
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$OUT/gpu.txt"
  if [ "$mode" = run ]; then
    .device/moeq gpu-check 2>&1 | tee "$OUT/gpu-check.log"
    exit 0
  fi
  export NCCL_NVLS_ENABLE=0
  status=0
  echo "== nccl-check, one process" | tee "$OUT/nccl-check.log"
  timeout 180 .device/moeq nccl-check 2>&1 | tee -a "$OUT/nccl-check.log" || status=1
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  n=${2:-$(( gpus > 2 ? gpus : 2 ))}
  port=$(( 20000 + RANDOM % 20000 ))
  echo "== nccl-check, $n processes on $gpus GPU(s), MASTER_PORT=$port" | tee -a "$OUT/nccl-check.log"
  pids=()
  for r in $(seq 0 $(( n - 1 ))); do
    NCCL_DEBUG=${NCCL_DEBUG:-WARN} RANK=$r LOCAL_RANK=$r WORLD_SIZE=$n LOCAL_WORLD_SIZE=$n MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      timeout 180 .device/moeq nccl-check > "$OUT/nccl-rank$r.log" 2>&1 &
    pids+=($!)
  done
  for r in "${!pids[@]}"; do
    rc=0; wait "${pids[$r]}" || rc=$?
    sed "s/^/[rank $r] /" "$OUT/nccl-rank$r.log" | tee -a "$OUT/nccl-check.log"
    echo "[rank $r] exit $rc" | tee -a "$OUT/nccl-check.log"
    [ "$rc" = 0 ] || status=1
  done
  exit "$status"
  ;;
*)
  echo "usage: launch/gpu-check.sh build|run|nccl [N]" >&2
  exit 2
  ;;
esac
