#!/usr/bin/env bash
# gpu-check under several settings at once, to say which switch a failure belongs to before a
# default changes: every setting's run starts together on the one GPU (the checks are small;
# the CPU references share the cores), each limited to LIMIT seconds (default 500). Prints per
# setting its exit, seconds, FAIL lines (20 at most) and summary; logs (check-<i>.log) packed into $OUT/check-logs.tar.gz.
# Exits 1 if any setting's gpu-check failed or was cut off. GPU machine, repository root,
# .device carried:
#
#   OUT=/tmp/out bash launch/bench/check-switches.sh - MOEQ_ROUTER_CHOOSE=candle \
#     MOEQ_EXPERT_CHUNKS=1 "MOEQ_ROWS_BY_TOKEN=0 MOEQ_LORA_IN_K=0"
#
# Each argument is one setting: `-` (the defaults) or space-separated NAME=VALUE pairs.
# GPU_CHECK_ARGS passes arguments to every run (e.g. "--only train-step").
set -uo pipefail
cd "$(dirname "$0")/../.."
[ $# -gt 0 ] || { echo "error: name at least one setting (- for the defaults)" >&2; exit 2; }
for s in "$@"; do
  for kv in $s; do
    case "$kv" in
    - | *=*) ;;
    *) echo "error: '$kv' in '$s' is not NAME=VALUE (or - for the defaults)" >&2; exit 2 ;;
    esac
  done
done
source launch/device-env.sh
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$OUT/gpu.txt"
pids=()
i=0
for s in "$@"; do
  vars=()
  for kv in $s; do [ "$kv" = - ] || vars+=("$kv"); done
  (
    start=$(date +%s)
    # shellcheck disable=SC2086
    env "${vars[@]}" timeout "${LIMIT:-500}" .device/moeq gpu-check ${GPU_CHECK_ARGS:-} > "$OUT/check-$i.log" 2>&1
    echo "exit $?, $(( $(date +%s) - start )) s" >> "$OUT/check-$i.log"
  ) &
  pids+=($!)
  i=$(( i + 1 ))
done
wait "${pids[@]}"
i=0
status=0
for s in "$@"; do
  echo "== gpu-check [$s]: $(tail -1 "$OUT/check-$i.log")"
  grep -E "^FAIL" "$OUT/check-$i.log" | head -20
  grep -E "passed, [0-9]+ failed" "$OUT/check-$i.log" ||
    grep -E "^error: [a-z]" "$OUT/check-$i.log" | head -3 || echo "(no summary: cut off or stopped)"
  grep -qE "passed, 0 failed" "$OUT/check-$i.log" || status=1
  i=$(( i + 1 ))
done
# The device returns at most 8 files: the logs as one archive.
tar -czf "$OUT/check-logs.tar.gz" -C "$OUT" $(cd "$OUT" && ls check-*.log gpu.txt) && rm -f "$OUT"/check-*.log
exit $status
