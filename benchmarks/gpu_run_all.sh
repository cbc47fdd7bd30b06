#!/usr/bin/env bash
# Every GPU check of the kit in one run, for a session lent a GPU (15 minutes of device time):
#
#     bash benchmarks/gpu_run_all.sh "$OUT"        # on the device machine, from the repo root
#
# Each check writes its JSON (and a log) into OUT; a check that fails or runs past its time
# limit is reported and the next one still runs. Copy the figures into benchmarks/RESULTS.md
# with the card's name. Order: the checks of the open bars first.
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
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - start)) s; tail:"; tail -n 5 "$OUT/$name.log"
}
# The open bars first (issue 5: int4 GEMV; issue 10: GPT-2-small decode vs the bandwidth roofline, with the
# fused Triton step tuned on whole steps, with and without programmatic dependent launch, then Nsight Compute
# on both), 6 to 9 minutes; with ALL=1 also torch.compile's max-autotune mode of the
# decode step and the resolved matmul and attention checks (about 8 minutes more).
check() {  # name, seconds, script, arguments...
  local name=$1 limit=$2 script=$3; shift 3
  if [ -f "benchmarks/$script.py" ]; then
    run "$name" "$limit" python3 "benchmarks/$script.py" "$@"
  else
    echo "== $script: not in this checkout"
  fi
}
# quant first: about a minute, and its int4 bar is open too; serving writes its JSON after each variant, so a
# run cut short keeps the variants it finished (the fused step's first)
check gpu_check_quant 170 gpu_check_quant --out "$OUT"
check gpu_check_serving 300 gpu_check_serving --out "$OUT" --variants fused_tuned_greedy_x4_cuda_graph,fused_tuned_greedy_cuda_graph,fused_tuned_cuda_graph,fused_nopdl_tuned_cuda_graph,compiled_cuda_graph,cuda_graph
# what bounds the kernels of both open bars: Nsight Compute, one line a kernel (two files: ncu_summary.txt, ncu.tgz),
# in what is left of BUDGET less a minute for the kernel tests; RUN_NCU=0 leaves it out
left=$(( ${BUDGET:-580} - SECONDS - 60 ))
if [ "${RUN_NCU:-1}" = 1 ] && [ -f benchmarks/gpu_ncu.sh ] && [ "$left" -ge 90 ]; then
  echo "== gpu_ncu (${left}s at most)"
  NCU_SECONDS=$(( left > 270 ? 270 : left )) bash benchmarks/gpu_ncu.sh "$OUT"
else
  echo "== gpu_ncu: skipped (RUN_NCU=${RUN_NCU:-1}, ${left}s left)"
fi
if [ "${ALL:-0}" = 1 ]; then
  check gpu_check_serving_autotune 200 gpu_check_serving --out "$OUT/autotune" --variants compiled_cuda_graph \
    --mode max-autotune-no-cudagraphs
  check gpu_check 150 gpu_check --out "$OUT"
  check gpu_check_attention 120 gpu_check_attention --out "$OUT"
fi
# the kernel tests on CUDA (they run under the CPU interpreter everywhere else), in what is left of BUDGET
# seconds (default 580: one device call may run 600)
left=$(( ${BUDGET:-580} - SECONDS ))
if [ "$left" -gt 150 ]; then left=150; fi
if [ "$left" -ge 30 ]; then
  run pytest_cuda "$left" python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_decode_kernels.py \
    tests/test_quant.py -k "kernel or gemv"
else
  echo "== pytest_cuda: skipped, ${left}s left of the budget"
fi
