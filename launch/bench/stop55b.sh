#!/usr/bin/env bash
# One device call (stop 55, second): the standing side-by-side table with the new defaults
# (Unsloth and moeq, q/k/v/o and expert LoRA, mbs 1 4 8), where mbs 8's peak is now
# (memory-profile), and the per-kernel profile of a 2-layer step at mbs 8. GPU machine,
# repository root, .device carried.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=$OUT/sbs timeout 400 bash launch/bench/side-by-side.sh pair ${MBS:-1 4 8} | tail -30
cat "$OUT/sbs/table.md" 2>/dev/null
OUT=$OUT timeout 80 bash launch/bench/memory-profile.sh 8 | tail -30
OUT=$OUT LAYERS=2 timeout 110 bash launch/bench/kernel-profile.sh 8 | head -45
