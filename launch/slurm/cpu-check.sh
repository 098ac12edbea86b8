#!/usr/bin/env bash
# The SLURM templates on a real SLURM cluster, on CPUs (CI runs this after the tests): the
# templates' own lines, with the GPU requests taken out, submitted with `sbatch --wait` to a
# one-host cluster (started here, with its own SLURM_CONF, unless `sinfo` already answers;
# needs root and Debian's slurm-wlm and munge) and compared with one process of the same global batch:
#   1. one-node-8gpu.sbatch with 2 and 4 tasks, multi-node.sbatch with 2 (one node): losses
#      within 1e-5 relative of one process (summation order differs between world sizes);
#   2. scancel mid-run: the job and every rank end, the last checkpoint stays complete;
#   3. scontrol requeue mid-run: the requeued job resumes from the last complete checkpoint
#      (SLURM_RESTART_COUNT > 0) and ends bit for bit where an uninterrupted 2-task run ends.
#
#   MOEQ=target/debug/moeq bash launch/slurm/cpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
MOEQ=$(realpath "${MOEQ:?set MOEQ to the moeq binary}")
WORK=$(mktemp -d /tmp/moeq-slurm-check.XXXXXX)
fail() { echo "slurm check: FAILED: $*" >&2; exit 1; }
say() { echo "slurm check: $*"; }

start_cluster() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null ||
    fail "SLURM is not installed (apt-get install slurm-wlm munge)"
  [ "$(id -u)" = 0 ] || fail "starting a SLURM cluster needs root"
  local spool=${OWN_CONF%/*}
  mkdir -p /run/munge "$spool/ctld" "$spool/d"
  chown munge:munge /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    head -c 1024 /dev/urandom > /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  # One node of 4 CPUs whatever the machine has (config_overrides): ranks are CPU processes.
  # A configuration of its own (SLURM_CONF), so a site's /etc/slurm is never touched.
  export SLURM_CONF=$OWN_CONF
  cat > "$OWN_CONF" <<EOF
ClusterName=moeqcheck
SlurmctldHost=$(hostname)
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$spool/ctld
SlurmdSpoolDir=$spool/d
SlurmctldLogFile=$spool/slurmctld.log
SlurmdLogFile=$spool/slurmd.log
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$(hostname) CPUs=4 State=UNKNOWN
PartitionName=check Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  slurmctld
  slurmd
  for _ in $(seq 50); do
    sinfo -h -o %t 2>/dev/null | grep -q idle && return 0
    sleep 0.2
  done
  fail "the cluster did not come up: $(tail -3 $spool/slurmctld.log $spool/slurmd.log)"
}

OWN_CONF=/var/spool/moeq-slurm/slurm.conf
if [ -z "${SLURM_CONF:-}" ] && [ -f "$OWN_CONF" ]; then export SLURM_CONF=$OWN_CONF; fi
sinfo -h >/dev/null 2>&1 || start_cluster
say "cluster: $(sinfo -h -o '%P %D nodes, %c CPUs, %t')"

# A template with its GPU requests taken out; ranks per node from sbatch's --ntasks-per-node.
cpu_variant() {
  sed -e 's/^#SBATCH --ntasks-per-node=8.*/#SBATCH --ntasks-per-node=2/' \
      -e 's/--ntasks-per-node=8 /--ntasks-per-node=$SLURM_NTASKS_PER_NODE /' \
      -e 's/ --gpus-per-task=1//' -e '/^#SBATCH --gpus-per-task/d' \
      -e 's/^#SBATCH --cpus-per-task=.*/#SBATCH --cpus-per-task=1/' -e '/^#SBATCH --mem=0/d' \
      -e 's/^#SBATCH --nodes=2 .*/#SBATCH --nodes=1/' \
      "launch/slurm/$1" > "$WORK/$1"
  grep -q 'gpus' <(grep -v '^#' "$WORK/$1") && fail "$1: a GPU request is left in its CPU variant"
  echo "$WORK/$1"
}

# The tiny default config for `ranks` ranks of a 12-row global batch, 20 steps.
config() { # name ranks steps
  local rows=$(( 12 / $2 ))
  sed -e "s#^output_dir:.*#output_dir: $WORK/$1/out#" -e "s#^max_steps:.*#max_steps: $3#" \
      -e "s#^micro_batch_size:.*#micro_batch_size: $rows#" -e "s#^sequence_len:.*#sequence_len: 64#" \
      -e "s#^logging_steps:.*#logging_steps: 1#" -e "s#^eval_steps:.*#eval_steps: 1000#" \
      -e "s#^save_steps:.*#save_steps: 5#" -e "s#^warmup_steps:.*#warmup_steps: 4#" \
      configs/tiny-cpu.yaml > "$WORK/$1.yaml"
  echo "pad_to_sequence_len: true" >> "$WORK/$1.yaml"
  mkdir -p "$WORK/$1"
  echo "$WORK/$1.yaml"
}

# Losses of a run (metrics.jsonl; later records of a step win), one per line.
losses() {
  python3 -c '
import json, sys
by = {}
for l in open(sys.argv[1]):
    r = json.loads(l)
    if "loss" in r and "step" in r:
        by[r["step"]] = r["loss"]
print("\n".join(repr(by[s]) for s in sorted(by)))' "$WORK/$1/out/metrics.jsonl"
}

compare() { # name reference relative-bound
  python3 - "$WORK/$1.losses" "$WORK/$2.losses" "$3" <<'EOF' || fail "$1: losses differ from $2"
import sys
a = [float(x) for x in open(sys.argv[1]).read().split()]
b = [float(x) for x in open(sys.argv[2]).read().split()]
bound = float(sys.argv[3])
assert len(a) == len(b) and a, f"{len(a)} losses vs {len(b)}"
worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
print(f"slurm check: {sys.argv[1].rsplit('/', 1)[1]}: {len(a)} losses, worst relative difference {worst:.2e} (bound {bound:g})")
assert worst <= bound
EOF
}

submit() { # template name ranks [sbatch args...]: sbatch --wait
  local t=$1 name=$2 n=$3
  shift 3
  CONFIG=$(config "$name" "$n" 20) MOEQ=$MOEQ sbatch --wait --parsable --ntasks-per-node="$n" \
    -o "$WORK/$name.out" "$@" "$(cpu_variant "$t")" > "$WORK/$name.id" ||
    fail "$name: job $(cat "$WORK/$name.id") failed: $(tail -5 "$WORK/$name.out")"
  losses "$name" > "$WORK/$name.losses"
}

# 1. One process, then the templates with 2 and 4 tasks.
"$MOEQ" train --config "$(config one 1 20)" > "$WORK/one.out" 2>&1 || fail "one process: $(tail -3 "$WORK/one.out")"
losses one > "$WORK/one.losses"
submit one-node-8gpu.sbatch two 2
compare two one 1e-5
submit one-node-8gpu.sbatch four 4
compare four one 1e-5
grep -q '^3: .*rank{rank=3}' "$WORK/four.out" || fail "four: no line of rank 3 labelled by srun"
submit multi-node.sbatch multi 2
compare multi one 1e-5

# A 2-task job of 40 steps, not waited for; returns when its step-`at` checkpoint is complete.
start_long() { # name at
  local cfg
  cfg=$(config "$1" 2 40)
  CONFIG=$cfg MOEQ=$MOEQ sbatch --parsable --ntasks-per-node=2 --open-mode=append \
    -o "$WORK/$1.out" "$(cpu_variant one-node-8gpu.sbatch)" > "$WORK/$1.id"
  for _ in $(seq 600); do
    [ -e "$WORK/$1/out/checkpoint-$2/COMPLETE" ] && return 0
    squeue -h -j "$(cat "$WORK/$1.id")" | grep -q . || fail "$1 ended before its step-$2 checkpoint: $(tail -5 "$WORK/$1.out")"
    sleep 0.1
  done
  fail "$1: no step-$2 checkpoint in 60 s"
}
gone() { # job id: waits until SLURM has forgotten the job's running state
  for _ in $(seq 300); do
    squeue -h -j "$1" 2>/dev/null | grep -q . || return 0
    sleep 0.1
  done
  fail "job $1 still in the queue after 30 s"
}

# The reference: 40 steps on 2 tasks, uninterrupted.
CONFIG=$(config long 2 40) MOEQ=$MOEQ sbatch --wait --parsable --ntasks-per-node=2 \
  -o "$WORK/long.out" "$(cpu_variant one-node-8gpu.sbatch)" > /dev/null || fail "long: $(tail -5 "$WORK/long.out")"
losses long > "$WORK/long.losses"

# 2. scancel mid-run.
start_long cancelled 10
id=$(cat "$WORK/cancelled.id")
scancel "$id"
gone "$id"
sleep 1
pgrep -f "$WORK/cancelled.yaml" >/dev/null && fail "cancelled: ranks still running after scancel"
[ -e "$WORK/cancelled/out/checkpoint-10/COMPLETE" ] || fail "cancelled: checkpoint-10 lost"
say "cancelled: job $id ended by scancel, no rank left, checkpoint-10 complete"

# 3. scontrol requeue mid-run: the job starts again and resumes.
start_long requeued 10
id=$(cat "$WORK/requeued.id")
scontrol requeue "$id"
# SLURM holds a requeued job back (BeginTime about two minutes on); let it start now.
released=no
for _ in $(seq 3000); do
  info=$(scontrol show job "$id" 2>/dev/null)
  state=$(grep -o 'JobState=[A-Z_]*' <<< "$info" | cut -d= -f2)
  restarts=$(grep -o 'Restarts=[0-9]*' <<< "$info" | cut -d= -f2)
  [ "${restarts:-0}" -ge 1 ] && [ "$state" = COMPLETED ] && break
  [ "$state" = FAILED ] || [ "$state" = CANCELLED ] && fail "requeued: job $state: $(tail -5 "$WORK/requeued.out")"
  if [ "$state" = PENDING ] && [ $released = no ] && grep -q 'Reason=BeginTime' <<< "$info"; then
    scontrol update JobId="$id" StartTime=now && released=yes
  fi
  sleep 0.1
done
[ "$state" = COMPLETED ] || fail "requeued: job $id is $state after 300 s"
grep -q 'resuming from .*checkpoint-' "$WORK/requeued.out" || fail "requeued: did not resume: $(tail -5 "$WORK/requeued.out")"
losses requeued > "$WORK/requeued.losses"
compare requeued long 0
cmp -s "$WORK/long/out/adapter_model.safetensors" "$WORK/requeued/out/adapter_model.safetensors" ||
  fail "requeued: final adapter differs from the uninterrupted run's"
say "requeued: job $id restarted by SLURM, resumed from $(grep -o 'resuming from [^ ]*' "$WORK/requeued.out" | tail -1 | cut -d' ' -f3), final adapter bit for bit"
rm -rf "$WORK"
say "all passed"
