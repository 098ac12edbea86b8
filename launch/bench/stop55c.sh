#!/usr/bin/env bash
# One device call (stop 55, third): the side-by-side table with the new defaults (Unsloth and
# moeq, q/k/v/o and expert LoRA, mbs 4 and 8), then cuDNN's dP workspace raised (A 512 MiB,
# the default; B 1,024 and 2,048 = the whole batch at mbs 8) now that the attention outputs are
# not kept. Everything under $OUT packed into one archive (the device returns few files).
# GPU machine, repository root, .device carried.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=$OUT/sbs timeout ${SBS_LIMIT:-330} bash launch/bench/side-by-side.sh pair ${MBS:-4 8} | grep -v "^Writing\|it/s\]" | tail -20
cat "$OUT/sbs/table.md" 2>/dev/null
for mb in 1024 2048; do
  echo "== q/k/v/o mbs 8: A = dP workspace 512 MiB, B = $mb MiB"
  CFG=attn A_ENV=MOEQ_CUDNN_DP_MB=512 MOEQ_CUDNN_DP_MB=$mb OUT=$OUT/dp$mb timeout 120 \
    bash launch/bench/ab.sh 8
done
tar -C "$OUT" -czf /tmp/stop55c.tar.gz . && mv /tmp/stop55c.tar.gz "$OUT/"
