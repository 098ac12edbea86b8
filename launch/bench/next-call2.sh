#!/usr/bin/env bash
# The A/Bs of what stop 56 wrote behind switches, no GPU having been lent (launch/bench/NOTES.md
# item 63), at micro-batch 8 (MBS to change), each ≈ 100–150 s (cut off at 170): next-call.sh
# runs `qkv buffers expert` after its gpu-check (as many as its time allows); a later call
# what it skipped, `joint in-k` to split qkv's effect, `atomic` before the side by side:
#   qkv      both of the next two against the defaults (q/k/v/o config);
#   joint    q/k/v's adapters' factor products joined (MOEQ_JOINT_LORA), q/k/v/o config;
#   in-k     their updates inside the base products' K too (MOEQ_JOINT_IN_K), against joint;
#   buffers  the experts' chunks in reused buffers (MOEQ_EXPERT_CHUNKS + MOEQ_CHUNK_BUFFERS)
#            beside the attention rerun, against the defaults (no chunks);
#   expert   joint and in K with expert adapters (CFG=expert), against the defaults;
#   atomic   `full_determinism: false` (cuDNN's atomic dq; B by the config key) against the
#            default deterministic backward (A: MOEQ_CUDNN_DETERMINISTIC=1 over the key).
# Everything under $OUT packed into $OUT/next-call2.tar.gz (the device returns at most 8
# files). GPU machine, repository root, .device carried:
#
#   OUT=$OUT [DEADLINE=epoch-s] bash launch/bench/next-call2.sh [qkv joint in-k buffers expert atomic]
# (default: all but qkv; an A/B that could not end before DEADLINE is skipped and says so).
set -uo pipefail
cd "$(dirname "$0")/../.."
ab() {
  local name=$1
  shift
  # DEADLINE (epoch seconds): skip an A/B that could not end before it (the call's limit).
  if [ -n "${DEADLINE:-}" ] && [ $(( $(date +%s) + 170 )) -gt "$DEADLINE" ]; then
    echo "== $name: skipped (not enough of the call's time left)"
    return
  fi
  echo "== $name: $*"
  env "$@" OUT="$OUT/$name" timeout 170 bash launch/bench/ab.sh ${MBS:-8} | tail -8
  # Cut off before its own archive: pack what it left (the device returns at most 8 files).
  if [ -d "$OUT/$name/ab" ]; then tar -czf "$OUT/$name/ab-logs.tar.gz" -C "$OUT/$name" ab && rm -rf "$OUT/$name/ab"; fi
}
for what in ${*:-joint in-k buffers expert atomic}; do
  case "$what" in
  qkv) ab qkv MOEQ_JOINT_LORA=1 MOEQ_JOINT_IN_K=1 "A_ENV=MOEQ_JOINT_LORA=0 MOEQ_JOINT_IN_K=0" ;;
  joint) ab joint MOEQ_JOINT_LORA=1 A_ENV=MOEQ_JOINT_LORA=0 ;;
  in-k) ab in-k MOEQ_JOINT_LORA=1 MOEQ_JOINT_IN_K=1 "A_ENV=MOEQ_JOINT_LORA=1 MOEQ_JOINT_IN_K=0" ;;
  buffers) ab buffers MOEQ_EXPERT_CHUNKS=1 MOEQ_CHUNK_BUFFERS=1 \
    "A_ENV=MOEQ_EXPERT_CHUNKS=0 MOEQ_CHUNK_BUFFERS=0" ;;
  expert) ab expert CFG=expert MOEQ_JOINT_LORA=1 MOEQ_JOINT_IN_K=1 \
    "A_ENV=MOEQ_JOINT_LORA=0 MOEQ_JOINT_IN_K=0" ;;
  atomic)
    # B by the config key (its log says so), A forced deterministic by the variable.
    mkdir -p "$OUT/atomic"
    sed '$a full_determinism: false' configs/bench/qwen3-30b-a3b-12l-attn-lora.yaml > "$OUT/atomic/config.yaml"
    ab atomic CONFIG="$OUT/atomic/config.yaml" A_ENV=MOEQ_CUDNN_DETERMINISTIC=1 ;;
  *) echo "error: '$what' is none of qkv, joint, in-k, buffers, expert, atomic" >&2; exit 2 ;;
  esac
done
# Inside next-call.sh (NESTED=1) that script packs everything.
if [ -z "${NESTED:-}" ]; then
  tar -C "$OUT" -czf /tmp/next-call2.tar.gz . && mv /tmp/next-call2.tar.gz "$OUT/"
  find "$OUT" -mindepth 1 -maxdepth 1 ! -name next-call2.tar.gz -exec rm -rf {} +
fi
