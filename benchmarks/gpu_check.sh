#!/usr/bin/env bash
# Everything to confirm on a GPU, in one prepared run of about 7-8 minutes (on
# an H100; every step has its own time limit and the run stops starting steps at $BUDGET_S):
#   1. the fused Triton kernels, compiled natively, against the PyTorch path (tests/test_kernels.py);
#   2. whole-model agreement of the backends at SiT-XL/2 width, fp32 and bf16 (check_backends.py);
#   3. dar bench, SiT-XL/2 and SiT-B/2 in bf16: step/memory/sampling ratios, images/s, MFU;
#   4. the same SiT-B/2 bench on the PyTorch backend (what the fused kernel buys);
#   5. our residual SiT-XL/2 against SiT's reference design in bf16.
# Reports go to $OUT (default runs/gpu_check): one log and a JSON per step. It uses the machine's own
# python3 and its packages (torch, triton, pytest, safetensors, torchdiffeq...), installing nothing.
#
#   OUT=runs/gpu_check bash benchmarks/gpu_check.sh
#   DEVICE=cpu SMALL=cpu LARGE=cpu TRITON_INTERPRET=1 bash benchmarks/gpu_check.sh   # dry run of the flow
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-sit-b2}
LARGE=${LARGE:-sit-xl2}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failures=0

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log it, never stop the script
  local name=$1 limit=$2 left=$((BUDGET_S - SECONDS))
  shift 2
  if ((left < 20)); then
    echo "== $name: skipped, ${left}s of the ${BUDGET_S}s budget left" | tee -a "$LOG"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s, at ${SECONDS}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after ${SECONDS}s" | tee -a "$LOG"
  ((rc == 0)) || failures=$((failures + 1))
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  $PY -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"
  git rev-parse HEAD 2>/dev/null || true
} 2>&1 | tee "$LOG"

step kernels 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py
step backends-fp32 60 $PY benchmarks/check_backends.py --preset "$LARGE" --device "$DEVICE" --precision fp32 \
  --backends torch,triton --batch 4 --json "$OUT/check_backends_fp32.json"
step backends-bf16 60 $PY benchmarks/check_backends.py --preset "$LARGE" --device "$DEVICE" --precision bf16 \
  --backends torch,triton --batch 4 --json "$OUT/check_backends_bf16.json"
step bench-large 180 $PY -m dar.cli bench --preset "$LARGE" --device "$DEVICE" --precision bf16 \
  --variants residual,static-c4,static_t-c4,dynamic-c4 --repeats 10 --warmup 3 --json "$OUT/bench_${LARGE}_bf16.json"
step bench-small 90 $PY -m dar.cli bench --preset "$SMALL" --device "$DEVICE" --precision bf16 \
  --variants residual,static-c4,static_t-c4,dynamic-c4 --repeats 20 --warmup 5 --json "$OUT/bench_${SMALL}_bf16.json"
step bench-small-torch 60 $PY -m dar.cli bench --preset "$SMALL" --device "$DEVICE" --precision bf16 --backend torch \
  --variants residual,static-c4,dynamic-c4 --repeats 20 --warmup 5 --json "$OUT/bench_${SMALL}_bf16_torch.json"
step reference 60 $PY benchmarks/bench_reference.py --preset "$LARGE" --device "$DEVICE" --precision bf16 \
  --repeats 10 --warmup 3 --json "$OUT/reference_${LARGE}_bf16.json"

echo "== done in ${SECONDS}s, $failures step(s) failed" | tee -a "$LOG"
exit $((failures > 0))
