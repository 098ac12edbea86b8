#!/usr/bin/env bash
# The per-kernel profile (launch/bench/kernel-profile.sh: ncu, LAYERS layers, 2 steps) of both
# binaries of an A/B pair — A .device/old/moeq.xz, B .device/moeq.xz — then one table of the
# kernels' ms per step side by side (B − A), so each change of a set shows on its own kernels.
# GPU machine, repository root, .device carried:
#
#   OUT=/tmp/out [LAYERS=2] bash launch/bench/kernel-ab.sh [mbs] [attn|expert]
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
base=$OUT
for side in A B; do
  bin=.device/moeq
  [ "$side" = A ] && bin=.device/old/moeq
  mkdir -p "$base/$side"
  OUT=$base/$side BIN=$bin bash launch/bench/kernel-profile.sh "$@" > "$base/$side/profile.txt" 2>&1
  echo "$side: $(grep -m1 'kernels timed' "$base/$side/profile.txt")"
done
python3 - "$base/A/kprof/ncu.csv" "$base/B/kprof/ncu.csv" <<'PY'
import csv, collections, sys
def per_kernel(path):
    lines = open(path).read().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
    rows = [r for r in csv.DictReader(lines[start:]) if r.get("Metric Name") == "gpu__time_duration.sum"]
    unit = {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9}
    last = max((i for i, r in enumerate(rows) if r["Kernel Name"].startswith(("quantize_", "normal_"))), default=-1)
    by = collections.defaultdict(float)
    for r in rows[last + 1:]:
        by[r["Kernel Name"].split("(")[0][:80]] += unit.get(r["Metric Unit"], 1) * float(r["Metric Value"].replace(",", "")) / 2e6
    return by
a, b = per_kernel(sys.argv[1]), per_kernel(sys.argv[2])
print(f"total ms/step: A {sum(a.values()):.2f}  B {sum(b.values()):.2f}  B - A {sum(b.values()) - sum(a.values()):+.2f}")
names = sorted(set(a) | set(b), key=lambda k: -abs(b.get(k, 0) - a.get(k, 0)))
for k in names[:45]:
    print(f"{a.get(k, 0):8.3f} {b.get(k, 0):8.3f} {b.get(k, 0) - a.get(k, 0):+8.3f}  {k}")
PY
