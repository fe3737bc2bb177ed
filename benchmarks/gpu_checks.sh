#!/usr/bin/env bash
# Every GPU check of the performance work in one run, for a session that is lent a GPU (about 10 minutes on an
# H100/H200; the compiled runs take most of it). It uses the machine's own python3 and its torch, transformers
# and peft (nothing is installed: GPU machines here cannot reach a package index) and this checkout's src/.
#
#   bash benchmarks/gpu_checks.sh            # results and a log under benchmarks/results/, copies under $OUT
#
# 1. the CUDA tests (no host sync outside allocation steps, sharded/compaction on CUDA) and the compile tests;
# 2. the allocator against PEFT and the floor, and a torch.profiler table of our masking/non-masking steps;
# 3. the MiniLM training step eager, then compiled (inductor), then compiled with CUDA graphs (reduce-overhead);
# 4. quantized bases: tests/test_quantized.py (its CUDA variants run here: bitsandbytes' CUDA kernels, bf16) and
#    benchmarks/quantized_memory.py on CUDA (peak torch.cuda memory and step time, SmolLM2-135M-shaped, fp32/bf16/4-bit).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
results=benchmarks/results
mkdir -p "$results"
log="$results/gpu_checks.log"
: >"$log"
status=0
step() {
  echo "== $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== exit $rc: $*" | tee -a "$log"; status=1; }
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee -a "$log" || exit 1
step "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_compile.py tests/test_compact.py tests/test_io.py
step "$PY" benchmarks/allocator.py --device cuda --repeats 100
step "$PY" benchmarks/allocator.py --device cuda --repeats 20 --profile
step "$PY" benchmarks/train_step.py --device cuda --rounds 20
step "$PY" benchmarks/train_step.py --device cuda --rounds 20 --compile --no-peft --no-full
step "$PY" benchmarks/train_step.py --device cuda --rounds 20 --compile --compile-mode reduce-overhead --no-peft --no-full
step "$PY" -m pytest -q -p no:cacheprovider tests/test_quantized.py
step "$PY" benchmarks/quantized_memory.py --device cuda --rounds 2 --steps 5 --batch 8 --length 256

if [ -n "${OUT:-}" ]; then  # the device tool brings back at most 8 files
  cp "$log" "$results"/allocator_cuda.json "$results"/allocator_profile_cuda.txt "$results"/train_step_cuda*.json \
    "$results"/quantized_memory_cuda.json \
    "$OUT"/ 2>/dev/null
fi
exit $status
