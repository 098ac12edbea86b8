#!/usr/bin/env bash
# The first device call after stop 57 (stop 57's device time ran out before it; ≈ 5 minutes,
# 9 with the side by side — stop 57's calls: gpu-check 137 s, an A/B at mbs 8 ≈ 30–60 s, the
# kernel profile 45 s, the side by side ≈ 220 s): gpu-check on the binary whose defaults join
# q/k/v's adapters and put their updates in K (NOTES item 63), then the cross-entropy written
# over the logits (`MOEQ_CE_IN_PLACE=1`, NOTES item 65): its A/B at mbs 8 with both adapter
# sets (its losses must equal A's to every digit: the same bits), the kernel profile with it
# on (its kernel's time against the allocating kernel's 6.0 ms a 2-layer step), and the side
# by side with it on where the call's time (CALL_S) allows. Everything packed into
# $OUT/next-call3.tar.gz (the device returns at most 8 files). GPU machine, repository root,
# .device carried:
#
#   OUT=$OUT bash launch/bench/next-call3.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
deadline=$(( $(date +%s) + ${CALL_S:-570} ))
LIMIT=${LIMIT:-200} OUT=$OUT/check bash launch/bench/check-switches.sh -
tar -xzOf "$OUT/check/check-logs.tar.gz" check-0.log | grep -E "cross_entropy_rows 300 rows V 20000 BF16 in place"
for cfg in attn expert; do
  echo "== ce $cfg: MOEQ_CE_IN_PLACE=1 against 0"
  CFG=$cfg MOEQ_CE_IN_PLACE=1 A_ENV=MOEQ_CE_IN_PLACE=0 OUT=$OUT/ce-$cfg timeout 170 bash launch/bench/ab.sh 8 | tail -4
  # Cut off before its own archive: pack what it left.
  if [ -d "$OUT/ce-$cfg/ab" ]; then tar -czf "$OUT/ce-$cfg/ab-logs.tar.gz" -C "$OUT/ce-$cfg" ab && rm -rf "$OUT/ce-$cfg/ab"; fi
done
# The losses of A and B (the same bits expected).
for cfg in attn expert; do
  tar -xzf "$OUT/ce-$cfg/ab-logs.tar.gz" -C /tmp 2>/dev/null &&
    for f in /tmp/ab/mbs8-A1.log /tmp/ab/mbs8-B1.log; do echo "$cfg $(basename "$f"): $(grep -o 'loss [0-9.]*' "$f" | tr '\n' ' ')"; done
  rm -rf /tmp/ab
done
MOEQ_CE_IN_PLACE=1 LAYERS=2 OUT=$OUT/kp timeout 90 bash launch/bench/kernel-profile.sh 8 | grep -E "cross_entropy|ms of kernel time"
# The side by side only where the call's time (CALL_S, default 570 s) still holds it.
if [ $(( deadline - $(date +%s) )) -ge 280 ]; then
  MOEQ_CE_IN_PLACE=1 OUT=$OUT/sbs timeout 280 bash launch/bench/side-by-side.sh pair 4 8 > "$OUT/sbs.log" 2>&1
  grep -E "^\| (Unsloth|moeq)" "$OUT/sbs/table.md" || tail -5 "$OUT/sbs.log"
else
  echo "side by side skipped: $(( deadline - $(date +%s) )) s of the call left"
fi
tar -C "$OUT" -czf /tmp/next-call3.tar.gz . && mv /tmp/next-call3.tar.gz "$OUT/"
find "$OUT" -mindepth 1 -maxdepth 1 ! -name next-call3.tar.gz -exec rm -rf {} +
