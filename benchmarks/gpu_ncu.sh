#!/usr/bin/env bash
# Nsight Compute on the kernels of the two open bars, for a session lent a GPU (about 3 minutes):
#
#     NCU_SECONDS=240 bash benchmarks/gpu_ncu.sh "$OUT"   # on the device machine, from the repo root
#
# NCU_SECONDS (default 270) bounds the whole run: 60% of it for the decode step, the rest for the GEMVs.
# Profiles one token of the tuned fused decode step (issue 10) and the weight-only GEMVs at
# issue 5's shape (benchmarks/gpu_ncu.py says what exactly), prints one line a kernel (time,
# DRAM throughput, occupancy, registers, the costliest stall reasons) into OUT/ncu_summary.txt
# and packs ncu's CSVs and logs into OUT/ncu.tgz: two files, so that it fits beside
# gpu_run_all.sh's six in one call's eight.
set -u
OUT="${1:-ncu_out}"
mkdir -p "$OUT/ncu"
export PYTHONPATH="${PYTHONPATH:-}:$(pwd)" PYTHONUNBUFFERED=1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | sort -V | tail -n 1)  # the newest
if [ -z "$NCU" ]; then
  echo "ncu: not found" | tee "$OUT/ncu_summary.txt"
  exit 1
fi
METRICS="gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum"
METRICS="$METRICS,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size"
METRICS="$METRICS,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
total=${NCU_SECONDS:-270}
for what in decode:$((total * 6 / 10)) int4:$((total * 4 / 10)); do
  name=${what%%:*} limit=${what##*:}
  start=$SECONDS
  timeout -k 10 "$limit" "$NCU" --profile-from-start off --target-processes all --clock-control none \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
    --metrics "$METRICS" --print-units base --csv --page raw --log-file "$OUT/ncu/$name.csv" \
    python3 benchmarks/gpu_ncu.py "$name" > "$OUT/ncu/$name.log" 2>&1
  status=$?
  {
    echo "== $name: exit $status after $((SECONDS - start)) s"
    grep -v "^==PROF==" "$OUT/ncu/$name.log" | tail -n 12
    python3 benchmarks/gpu_ncu.py --summarize "$OUT/ncu/$name.csv"
  } | tee -a "$OUT/ncu_summary.txt"
  tar czf "$OUT/ncu.tgz" -C "$OUT" ncu  # after each target: a call cut short keeps what was done
done
rm -r "$OUT/ncu"
