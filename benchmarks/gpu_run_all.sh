#!/usr/bin/env bash
# Every GPU check of the kit in one run, for a session lent a GPU (15 minutes of device time):
#
#     bash benchmarks/gpu_run_all.sh "$OUT"        # on the device machine, from the repo root
#
# Each check writes its JSON (and a log) into OUT; a check that fails or runs past its time
# limit is reported and the next one still runs. Copy the figures into benchmarks/RESULTS.md
# with the card's name. Order: the cheapest and the ones with open bars first.
set -u
OUT="${1:-gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-}:$(pwd)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt" 2>&1
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - start)) s; tail:"; tail -n 5 "$OUT/$name.log"
}
# name:limit in seconds; the open bars first (matmul: issue 3), about 8 minutes in all at most
for entry in gpu_check:150 gpu_check_attention:120 gpu_check_serving:75 gpu_check_quant:110; do
  script=${entry%%:*} limit=${entry##*:}
  if [ -f "benchmarks/$script.py" ]; then
    run "$script" "$limit" python3 "benchmarks/$script.py" --out "$OUT"
  else
    echo "== $script: not in this checkout"
  fi
done
# the kernel tests on CUDA (they run under the CPU interpreter everywhere else)
run pytest_cuda 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py
