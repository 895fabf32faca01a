#!/usr/bin/env bash
# One prepared call on a lent GPU machine: what it has, the GPU code paths checked, then timed.
#
#   bash experiments/device_check.sh [TOTAL_SECONDS]   (default 540; logs go to $OUT or /tmp)
#   STEPS="calib train" bash experiments/device_check.sh 300   # only those steps (a second call)
#
# Steps, each under its own time limit so that one failure still leaves the others' results:
#   env     GPU, driver, versions of jax / flax / optax / orbax
#   ktests  the kernel tests run the compiled kernels on a GPU (interpret mode elsewhere): Triton
#           qmatmul, Mosaic GPU wgmma GEMM (Hopper), selective scan forward and backward
#   kernels the open questions of experiments/bench_kernels.py, most open first: Vim-S end to end
#           at batch 256 (bf16 vs W8A8 int on wgmma, every linear), wgmma vs bf16 at the four
#           Vim-S linears, the scan's tile / loop / exp2 sweep
#   itests  quantized_apply(mode="int") == mode="fake" on the micro model (Pallas path on GPU), and
#           every integer GEMM backend (xla, Triton, wgmma: compiled on Hopper) against the others
#           (did not finish in 110 s on the H200, 2026-11-27: it gets what the call has left)
#   calib   experiments/bench_calibration.py: vim_tiny, 256 images, 100 steps per block
#   train   the differentiable scan (calibration's) and the wgmma tile sweep
# Run from the repository root; nothing is installed (PYTHONPATH points at the checkout).
# For a 15-minute device budget (machine start ~30 s, 2026-11-27), two calls:
#   bash experiments/device_check.sh 480                          (timeout_s 510: env .. itests)
#   STEPS="calib train" bash experiments/device_check.sh 300      (timeout_s 330)
# Measured on the H200 (2026-11-27): env 6 s, ktests 136 s; RTN scales for the e2e rows 26 s,
# each e2e forward compiles in 5-19 s.
set -u
TOTAL=${1:-540}
OUT=${OUT:-/tmp/ptq4vm_device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
START=$(date +%s)

STEPS=${STEPS:-}
step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, print its tail
  local name=$1 limit=$2 left
  shift 2
  if [[ -n $STEPS && " $STEPS " != *" $name "* ]]; then return; fi
  left=$((TOTAL - ($(date +%s) - START) - 5))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then echo "=== $name skipped: no time left"; return; fi
  echo "=== $name (limit ${limit}s, t=$(($(date +%s) - START))s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "=== $name exit $? after $(($(date +%s) - START))s"
  grep -E "passed|failed|error|Error|FAIL|MISMATCH|\| e2e|first call|scales in|\| \*\*total|^# |exit" "$OUT/$name.log" | tail -n 25
}

step env 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
  --format=csv; $PY -c 'import sys, jax, flax, optax, orbax.checkpoint as o, numpy; \
  print(sys.version.split()[0], \"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", \
  optax.__version__, \"orbax\", o.__version__ if hasattr(o, \"__version__\") else \"?\", \
  \"numpy\", numpy.__version__, jax.devices())'"
step ktests 150 $PY -m pytest -q -p no:cacheprovider -rf --tb=line tests/kernels
step kernels 210 $PY experiments/bench_kernels.py --budget-s 185 --sections e2e gemm sweep-scan \
  --e2e-models vim_small:256 --e2e-variants bf16 int-wgmma --gemm-shapes vim_s:256 --gemm-variants wgmma bf16
step itests 300 $PY -m pytest -q -p no:cacheprovider -rf --tb=line tests/test_int_mode.py -s
step calib 200 $PY experiments/bench_calibration.py --model vim_tiny --num-calib 256 --epochs 100
step train 120 $PY experiments/bench_kernels.py --budget-s 100 --sections scan-train sweep-wgmma
echo "=== done after $(($(date +%s) - START))s"
