#!/usr/bin/env bash
# One device call for changes that wait behind switches (off by default until measured):
# gpu-check with every named switch on (its FAIL lines and summary printed; 300 s at most),
# then each switch's A/B on one binary (launch/bench/ab.sh: A = the switch's off value, B = on,
# alternating) over the given micro-batch sizes, logs under $OUT/<NAME>/. GPU machine,
# repository root, .device carried:
#
#   OUT=/tmp/out [CFG=expert] bash launch/bench/measure-switches.sh \
#     MOEQ_ROWS_BY_TOKEN=1:0 MOEQ_EXPERT_CHUNKS=1:0 MOEQ_LORA_IN_K=1:0@expert -- 4 8
#
# Each switch is NAME=ON:OFF, or NAME=ON:OFF@CFG to run its A/B on that bench config (CFG as
# ab.sh takes it: expert, attn, ...). A switch's A/B runs with the others at their defaults.
set -uo pipefail
cd "$(dirname "$0")/../.."
switches=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
  case "$1" in
  *=*:*) switches+=("$1") ;;
  *) echo "error: '$1' is not NAME=ON:OFF[@CFG] (e.g. MOEQ_ROWS_BY_TOKEN=1:0)" >&2; exit 2 ;;
  esac
  shift
done
[ "${1:-}" = -- ] && shift
[ ${#switches[@]} -gt 0 ] || { echo "error: name at least one switch NAME=ON:OFF" >&2; exit 2; }
on=()
for s in "${switches[@]}"; do on+=("${s%%:*}"); done
cfg_of() { case "$1" in *@*) echo "${1##*@}" ;; *) echo "${CFG:-attn}" ;; esac; }
source launch/device-env.sh
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$OUT/gpu.txt"
start=$(date +%s)
env "${on[@]}" timeout 300 .device/moeq gpu-check > "$OUT/gpu-check.log" 2>&1
echo "gpu-check (${on[*]}): exit $?, $(( $(date +%s) - start )) s"
grep -E "FAIL" "$OUT/gpu-check.log" | head -40
tail -3 "$OUT/gpu-check.log"
for s in "${switches[@]}"; do
  cfg=$(cfg_of "$s")
  s=${s%%@*}
  name=${s%%=*} values=${s#*=}
  mkdir -p "$OUT/$name"
  echo "== $name ($cfg): A $name=${values#*:}, B $name=${values%%:*}"
  env "$name=${values%%:*}" A_ENV="$name=${values#*:}" CFG="$cfg" OUT="$OUT/$name" bash launch/bench/ab.sh ${*:-4 8}
done
