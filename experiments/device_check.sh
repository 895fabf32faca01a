#!/usr/bin/env bash
# One prepared call on a lent GPU machine: what it has, the GPU code paths checked, then timed.
#
#   bash experiments/device_check.sh [TOTAL_SECONDS]   (default 540; logs go to $OUT or /tmp)
#   STEPS="calib" bash experiments/device_check.sh 250   # only those steps (a second call)
#
# Steps, in this order, each under its own time limit so that one failure (or a hang) still
# leaves the others' results; a limit is cut to the time left, and the limits add up to more than
# one call's total on purpose: a step that ends early leaves its time to the next ones (in the
# first call below, calib runs only on what is left):
#   env     GPU, driver, versions of jax / flax / optax / orbax
#   kernels experiments/bench_gemm.py's rows at the eight Vim-S and Vim-B linears, batch 256: the
#           wgmma 2-pass kernel, XLA's bf16 dot on the integer codes (gemm="xla-bf16", exact;
#           meant for the narrow x_proj / dt_proj) and XLA's bf16 dot
#   e2e     experiments/bench_e2e.py, Vim-S batch 256 end to end: bf16 float, W8A8 int with
#           gemm="mixed" (wgmma for in_proj / out_proj, the bf16 dot for x_proj / dt_proj) and
#           with wgmma for every linear (RTN scales first; each forward compiles separately)
#   hopper  the Hopper GEMM tests compiled (tests/kernels/test_qmatmul_hopper.py)
#   itests  quantized_apply(mode="int") == mode="fake" on the micro model (Pallas path on GPU), and
#           every integer GEMM backend against the others, xla-bf16 and mixed among them
#   ktests  the other kernel tests compiled: the Triton qmatmul (fused and on codes), the bf16-dot
#           path, the selective scan forward (both layouts) and backward
#   mixer   experiments/bench_mixer.py --quick, the targets first: Vim-S and Vim-B at
#           batch 256 end to end (bf16 with a Pallas scan per direction, the pre-issue forward;
#           bf16 fused; W8A8 int fused), then the fused mixer kernel against the per-direction path
#           per block (Vim-S, Vim-B; the exp-throughput bound; dt_proj on chip or by XLA, x and z
#           in place or copied, out_proj's codes by an XLA pass or the kernel's epilogue); last, on
#           what time is left, the add + RMSNorm kernel against XLA's (float and in_proj codes)
#           and VMamba-T's four scans + merge, unfused against the fused kernel
#   mtests  the fused kernels' tests compiled: the mixer (kernel vs reference, integer dt_proj
#           feed, out_proj codes, gradients, goldens and int == fake through the model), then the
#           add + RMSNorm and VMamba's cross-scan (kernel, codes, gradients; goldens, int == fake)
#   calib   experiments/bench_calibration.py: vim_tiny, 256 images, 100 steps per block, the
#           official recipe (the first block includes compiling the training step)
# Run from the repository root; nothing is installed (PYTHONPATH points at the checkout).
# tests/test_experiments.py parses every command below and runs the kernels / e2e steps' variants
# in the CPU interpreter, so a typo here cannot waste the GPU's time.
# For a 15-minute device budget, two calls (BENCHMARKS.md has the step times of earlier runs):
#   bash experiments/device_check.sh 540                          (timeout_s 570: env .. ktests)
#   STEPS="calib" bash experiments/device_check.sh 250            (timeout_s 270)
# The fused mixer (issue 20) alone, one call under 8 minutes:
#   STEPS="env mixer mtests" bash experiments/device_check.sh 450 (timeout_s 480)
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
  grep -E "passed|failed|error|Error|FAIL|MISMATCH|\| e2e|\| gemm|\| mixer|first call|scales in|\| \*\*total|compilations|set-up|^# |exit" "$OUT/$name.log" | tail -n 40
}

step env 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
  --format=csv; $PY -c 'import sys, jax, flax, optax, orbax.checkpoint as o, numpy; \
  print(sys.version.split()[0], \"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", \
  optax.__version__, \"orbax\", o.__version__ if hasattr(o, \"__version__\") else \"?\", \
  \"numpy\", numpy.__version__, jax.devices())'"
step kernels 150 $PY experiments/bench_gemm.py --quick --budget-s 130 --sections gemm \
  --gemm-shapes vim_s:256 vim_b:256 --gemm-variants wgmma xla-bf16 bf16
step e2e 150 $PY experiments/bench_e2e.py --quick --budget-s 140 --sections e2e \
  --e2e-models vim_small:256 --e2e-variants bf16 int-mixed int-wgmma
step hopper 110 $PY -m pytest -q -p no:cacheprovider -rf --tb=line tests/kernels/test_qmatmul_hopper.py
step itests 180 $PY -m pytest -q -p no:cacheprovider -rf --tb=line tests/test_int_mode.py -s
step ktests 200 $PY -m pytest -q -p no:cacheprovider -rf --tb=line tests/kernels/test_selective_scan.py \
  tests/kernels/test_qmatmul.py
step mixer 260 $PY experiments/bench_mixer.py --quick --budget-s 240 --sections e2e-mixer mixer norm cross-scan \
  --e2e-models vim_small:256 vim_base:256 --mixer-shapes vim_s:256 vim_b:256
step mtests 150 $PY -m pytest -q -p no:cacheprovider -rf --tb=line tests/kernels/test_vim_mixer.py \
  tests/models/test_vim_fused_mixer.py tests/kernels/test_add_norm.py tests/kernels/test_cross_scan.py \
  tests/models/test_vmamba_fused_scan.py
step calib 240 $PY experiments/bench_calibration.py --model vim_tiny --num-calib 256 --epochs 100
echo "=== done after $(($(date +%s) - START))s"
