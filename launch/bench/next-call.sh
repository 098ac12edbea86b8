#!/usr/bin/env bash
# The first device call of the session after stop 56 (≈ 8–9 minutes of the 10 a call may take):
# gpu-check on the final binary (the defaults; its new rows switch stop 56's changes on
# themselves — launch/bench/NOTES.md item 63 —, so they take longer than stop 55's 180 s: LIMIT
# 300), where the step's peak is now (memory-profile with the layer backward split into its
# MLP's and the rest), and the first of stop 56's A/Bs (q/k/v's adapters joined, mbs 8).
# Everything packed into one archive ($OUT/next-call.tar.gz: the device returns at most 8
# files; ≈ 300 + 70 + 170 s at most). The other A/Bs: next-call2.sh; the side by side after them: `OUT=$OUT/sbs bash
# launch/bench/side-by-side.sh pair 4 8` (≈ 280 s). GPU machine, repository root, .device
# carried:
#
#   OUT=$OUT bash launch/bench/next-call.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
LIMIT=${LIMIT:-300} OUT=$OUT/check bash launch/bench/check-switches.sh -
OUT=$OUT timeout 70 bash launch/bench/memory-profile.sh 8 | tail -14
NESTED=1 OUT=$OUT bash launch/bench/next-call2.sh joint
# One archive only (the device returns at most 8 files).
tar -C "$OUT" -czf /tmp/next-call.tar.gz . && mv /tmp/next-call.tar.gz "$OUT/"
find "$OUT" -mindepth 1 -maxdepth 1 ! -name next-call.tar.gz -exec rm -rf {} +
