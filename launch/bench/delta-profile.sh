#!/usr/bin/env bash
# Which kernels the gated delta rule's forms spend their time in: `moeq gpu-bench --delta-rule
# ROWS --iters 1` under Nsight Compute (every kernel timed alone, clocks left alone), summed per
# kernel name, largest first. GPU machine, repository root, .device/ carried:
#
#   OUT=/tmp/out [FORMS=chunks,recurrent] bash launch/bench/delta-profile.sh [rows]
#
# FORMS: the forms gpu-bench times (--delta-forms; all of them by default).
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/device-env.sh
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu not found"; exit 1; }
"$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --log-file "$OUT/delta-ncu.csv" \
  .device/moeq gpu-bench --delta-rule "${1:-1}" --iters 1 --delta-forms "${FORMS:-chunkwise,chunks,recurrent,chunked}" > "$OUT/delta-profile-bench.log" 2>&1
echo "gpu-bench exit $?"
python3 - "$OUT/delta-ncu.csv" <<'PY'
import csv, collections, sys
lines = open(sys.argv[1]).read().splitlines()
start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
rows = [r for r in csv.DictReader(lines[start:]) if r.get("Metric Name") == "gpu__time_duration.sum"]
unit = {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9}
per, count = collections.Counter(), collections.Counter()
for r in rows:
    name = r["Kernel Name"].split("(")[0][:70]
    per[name] += float(r["Metric Value"].replace(",", "")) * unit.get(r["Metric Unit"], 1)
    count[name] += 1
total = sum(per.values())
print(f"{len(rows)} kernels, {total / 1e6:.2f} ms in all")
for name, ns in per.most_common(40):
    print(f"{ns / 1e6:9.3f} ms {count[name]:6d}x  {name}")
PY
