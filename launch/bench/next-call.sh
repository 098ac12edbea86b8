#!/usr/bin/env bash
# The first device call of the session after stop 55 (about 9 minutes of the 10 a call may
# take): gpu-check on the final binary (the defaults; the switch parsing changed after the last
# GPU run), where the step's peak is now (memory-profile with the layer backward split into its
# MLP's and the rest), and the standing side by side at mbs 4 and 8 (Unsloth and moeq, both
# adapter sets). Everything packed into one archive ($OUT/next-call.tar.gz: the device returns
# at most 8 files). GPU machine, repository root, .device carried:
#
#   OUT=$OUT bash launch/bench/next-call.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
LIMIT=${LIMIT:-220} OUT=$OUT/check bash launch/bench/check-switches.sh -
OUT=$OUT timeout 70 bash launch/bench/memory-profile.sh 8 | tail -14
OUT=$OUT/sbs timeout ${SBS_LIMIT:-280} bash launch/bench/side-by-side.sh pair 4 8 > /dev/null 2>&1
cat "$OUT/sbs/table.md" 2>/dev/null || echo "side by side: no table (cut off at ${SBS_LIMIT:-280} s?)"
tar -C "$OUT" -czf /tmp/next-call.tar.gz . && mv /tmp/next-call.tar.gz "$OUT/"
