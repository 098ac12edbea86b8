#!/usr/bin/env bash
# The first device call after stop 56 (the device budget, after failed starts, allows about
# two calls): gpu-check on the final binary (the defaults; its new rows switch stop 56's
# changes on themselves — launch/bench/NOTES.md item 63 —: LIMIT 280), then stop 56's A/Bs at
# mbs 8 while the call's time lasts (CALL_S, default 570 s; AB, default `qkv buffers expert`:
# q/k/v's adapters joined and in K against the defaults, the chunks' reused buffers, the first
# with expert adapters — next-call2.sh says what each is; one that would not end in time is
# skipped and says so), between them the 4-bit expert op at four dequantization chunk sizes
# (≈ 1–2 minutes). Everything packed into one archive ($OUT/next-call.tar.gz: the
# device returns at most 8 files). The side by side after them: `OUT=$OUT/sbs bash
# launch/bench/side-by-side.sh pair 4 8` (≈ 280 s). GPU machine, repository root, .device
# carried:
#
#   OUT=$OUT bash launch/bench/next-call.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export DEADLINE=$(( $(date +%s) + ${CALL_S:-570} ))
LIMIT=${LIMIT:-280} OUT=$OUT/check bash launch/bench/check-switches.sh -
# The 4-bit expert op with smaller dequantization chunks: whether a chunk that stays in L2
# (50 MB on the H100) beats 256 MiB ones at mbs 8's rows (NOTES item 64; seconds each).
source launch/device-env.sh
for mb in 256 48 24 12; do
  echo "== MOEQ_DEQUANT_CHUNK_MB=$mb"
  MOEQ_DEQUANT_CHUNK_MB=$mb timeout 40 .device/moeq gpu-bench --experts 16384 --iters 20 2>&1 |
    grep -E "grouped_nf4|^error"
done
NESTED=1 OUT=$OUT bash launch/bench/next-call2.sh ${AB:-qkv buffers expert}
# One archive only (the device returns at most 8 files).
tar -C "$OUT" -czf /tmp/next-call.tar.gz . && mv /tmp/next-call.tar.gz "$OUT/"
find "$OUT" -mindepth 1 -maxdepth 1 ! -name next-call.tar.gz -exec rm -rf {} +
