#!/usr/bin/env bash
# The first device call after stop 56 (the device budget, after failed starts, allows about
# two calls): gpu-check on the final binary (the defaults; its new rows switch stop 56's
# changes on themselves — launch/bench/NOTES.md item 63 —: LIMIT 280), then stop 56's A/Bs at
# mbs 8 while the call's time lasts (CALL_S, default 570 s; AB, default `qkv buffers expert`:
# q/k/v's adapters joined and in K against the defaults, the chunks' reused buffers, the first
# with expert adapters — next-call2.sh says what each is; one that would not end in time is
# skipped and says so). Everything packed into one archive ($OUT/next-call.tar.gz: the
# device returns at most 8 files). The side by side after them: `OUT=$OUT/sbs bash
# launch/bench/side-by-side.sh pair 4 8` (≈ 280 s). GPU machine, repository root, .device
# carried:
#
#   OUT=$OUT bash launch/bench/next-call.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export DEADLINE=$(( $(date +%s) + ${CALL_S:-570} ))
LIMIT=${LIMIT:-280} OUT=$OUT/check bash launch/bench/check-switches.sh -
NESTED=1 OUT=$OUT bash launch/bench/next-call2.sh ${AB:-qkv buffers expert}
# One archive only (the device returns at most 8 files).
tar -C "$OUT" -czf /tmp/next-call.tar.gz . && mv /tmp/next-call.tar.gz "$OUT/"
find "$OUT" -mindepth 1 -maxdepth 1 ! -name next-call.tar.gz -exec rm -rf {} +
