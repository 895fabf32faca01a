#!/usr/bin/env bash
# One prepared call on a lent GPU machine: what it has, the GPU code paths checked, then timed.
#
#   bash experiments/device_check.sh [TOTAL_SECONDS]   (default 540; logs go to $OUT or /tmp)
#   STEPS="calib train" bash experiments/device_check.sh 300   # only those steps (a second call)
#
# Steps, each under its own time limit so that one failure still leaves the others' results:
#   env     GPU, driver, versions of jax / flax / optax / orbax
#   ktests  the kernel tests run the compiled kernels on a GPU (interpret mode elsewhere): Triton
#           qmatmul, Mosaic GPU wgmma GEMM and qmatmul_wgmma (Hopper), the selective scan forward
#           (both state layouts) and backward
#   kernels the open questions of experiments/bench_kernels.py, most open first: the 1-pass wgmma
#           GEMM (quantization inside, never run on a GPU) against the 2-pass one and bf16 at the
#           four Vim-B linears, batch 256; the scans with the channel-major default at the Vim
#           shapes the third session did not reach (Vim-T/B batch 64, Vim-T batch 256); Vim-T and
#           Vim-B end to end at batch 256 (bf16 vs W8A8 int on wgmma, 2-pass and 1-pass)
#   calib   experiments/bench_calibration.py: vim_tiny, 256 images, 100 steps per block (never
#           measured on a GPU: the third session spent its minutes on the scan)
#   itests  quantized_apply(mode="int") == mode="fake" on the micro model (Pallas path on GPU), and
#           every integer GEMM backend (xla, Triton, wgmma 2-pass and 1-pass: compiled on Hopper)
#           against the others
#           (16 passed in 163 s on the H200, third session, with the tile-layout scan)
#   train   the differentiable scan (calibration's: tile-layout and channel-major backward) and the
#           wgmma tile sweep (1-pass configs first)
# Run from the repository root; nothing is installed (PYTHONPATH points at the checkout).
# For a 15-minute device budget (machine start ~30-70 s, 2026-11-27), two calls:
#   bash experiments/device_check.sh 540                          (timeout_s 570: env .. calib)
#   STEPS="itests train" bash experiments/device_check.sh 300     (timeout_s 330)
# Measured on the H200 (2026-11-27): env 6 s, all kernel tests 136 s (second session); RTN scales
# for the e2e rows 26-29 s, each e2e forward compiles in 5-19 s; test_int_mode 163 s.
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
step ktests 170 $PY -m pytest -q -p no:cacheprovider -rf --tb=line tests/kernels
step kernels 200 $PY experiments/bench_kernels.py --quick --budget-s 180 --sections gemm scan e2e \
  --gemm-shapes vim_b:256 --gemm-variants wgmma-1pass wgmma bf16 \
  --scan-shapes vim_b:64 vim_t:64 vim_t:256 --e2e-models vim_tiny:256 vim_base:256 \
  --e2e-variants bf16 int-wgmma int-wgmma-1pass
step calib 170 $PY experiments/bench_calibration.py --model vim_tiny --num-calib 256 --epochs 100
step itests 200 $PY -m pytest -q -p no:cacheprovider -rf --tb=line tests/test_int_mode.py -s
step train 120 $PY experiments/bench_kernels.py --budget-s 100 --sections scan-train sweep-wgmma
echo "=== done after $(($(date +%s) - START))s"
