#!/usr/bin/env bash
# This session's device calls, as steps run in the order named, each skipped when the call's
# time (CALL_S, default 570 s from the start) could not hold it:
#   check      gpu-check on the defaults ≈ 120 s warm (a cold machine's first run took over
#              200: it may take 320);
#   buffers    the experts' chunks in reused buffers with their rows gathered a chunk at a
#              time (the defaults) against none (`MOEQ_EXPERT_CHUNKS=0 MOEQ_CHUNK_BUFFERS=0`),
#              mbs 8 — its peak must stay under Unsloth's 9.15 GB; the losses equal ≈ 150 s;
#   kp         the kernel profile (2 layers, mbs 8) ≈ 65 s;
#   gemm       every grouped GEMM variant on the four expert products, whole layer and one
#              dequantization chunk of experts, at mbs 8, 4 and 1 (`expert-gemm.sh`) ≈ 60 s;
#   sbs        the side by side (`side-by-side.sh pair 4 8`) with SBS_ENV's switches ≈ 400 s
#              (Unsloth's first step compiles for ≈ 75 s an adapter set).
# Everything packed into $OUT/next-call4.tar.gz (the device returns at most 8 files). GPU
# machine, repository root, .device carried:
#
#   OUT=$OUT bash launch/bench/next-call4.sh check kp
#   OUT=$OUT CALL_S=590 bash launch/bench/next-call4.sh sbs
set -uo pipefail
cd "$(dirname "$0")/../.."
deadline=$(( $(date +%s) + ${CALL_S:-570} ))
fits() {
  if [ $(( deadline - $(date +%s) )) -lt "$1" ]; then
    echo "== $2: skipped ($(( deadline - $(date +%s) )) s of the call left, needs $1)"
    return 1
  fi
}
ab() {
  local name=$1
  shift
  fits 170 "$name" || return
  echo "== $name: $*"
  env "$@" OUT="$OUT/$name" timeout 170 bash launch/bench/ab.sh 8 | tail -4
  # Cut off before its own archive: pack what it left.
  if [ -d "$OUT/$name/ab" ]; then tar -czf "$OUT/$name/ab-logs.tar.gz" -C "$OUT/$name" ab && rm -rf "$OUT/$name/ab"; fi
  # The losses of each run (A and B of a change that keeps the bits must agree).
  tar -xzf "$OUT/$name/ab-logs.tar.gz" -C /tmp 2>/dev/null &&
    for f in /tmp/ab/mbs8-*.log; do echo "$name $(basename "$f"): $(grep -o 'loss [0-9.]*' "$f" | tr '\n' ' ')"; done
  rm -rf /tmp/ab
}
for step in "$@"; do
  case "$step" in
  check)
    fits 330 check || continue
    LIMIT=320 OUT=$OUT/check bash launch/bench/check-switches.sh -
    tar -xzOf "$OUT/check/check-logs.tar.gz" check-0.log |
      grep -E "rows by token in reused buffers BF16 dots true dxs|passed, .* failed" ;;
  buffers) ab buffers "A_ENV=MOEQ_EXPERT_CHUNKS=0 MOEQ_CHUNK_BUFFERS=0" ;;
  kp)
    fits 90 kp || continue
    LAYERS=2 OUT=$OUT/kp timeout 90 bash launch/bench/kernel-profile.sh 8 > "$OUT/kp.txt" 2>&1; head -30 "$OUT/kp.txt" ;;
  gemm)
    fits 100 gemm || continue
    SKIP_CHECK=1 OUT=$OUT timeout 100 bash launch/bench/expert-gemm.sh 16384 8192 2048 |
      grep -E "^expert|Hopper" ;;
  sbs)
    fits 400 sbs || continue
    read -ra envs <<< "${SBS_ENV:-MOEQ_UNSET=1}"
    env "${envs[@]}" OUT=$OUT/sbs timeout $(( deadline - $(date +%s) )) \
      bash launch/bench/side-by-side.sh pair 4 8 > "$OUT/sbs.log" 2>&1
    grep -E "^\| " "$OUT/sbs/table.md" || tail -5 "$OUT/sbs.log" ;;
  *) echo "error: '$step' is none of check, buffers, kp, gemm, sbs" >&2; exit 2 ;;
  esac
done
tar -C "$OUT" -czf /tmp/next-call4.tar.gz . && mv /tmp/next-call4.tar.gz "$OUT/"
find "$OUT" -mindepth 1 -maxdepth 1 ! -name next-call4.tar.gz -exec rm -rf {} +
