#!/usr/bin/env bash
# Every GPU check of the performance work in one run, for a session that is lent a GPU (aim: under 10 minutes on an
# H100/H200; the compiled runs take most of it). It uses the machine's own python3 and its torch, transformers
# and peft (nothing is installed: GPU machines here cannot reach a package index) and this checkout's src/.
#
#   bash benchmarks/gpu_checks.sh                     # results and a log under benchmarks/results/, a copy under $OUT
#   DEVICE=cpu SMALL=1 bash benchmarks/gpu_checks.sh  # dry run of every step on the CPU at minimal sizes
#
# In order of what the GPU goals need most (each step has its own time limit, so one slow step cannot eat the rest):
# 1. the decoder-scale training step (SmolLM2-135M architecture, 210 adapters, batch 4 x 256): our AdaLoRA, our LoRA,
#    our compacted final phase, PEFT's AdaLoRA and LoRA, eager, step time and peak memory;
# 2. the same compiled (inductor), then with CUDA graphs (reduce-overhead), our cases only;
# 3. the MiniLM step eager, compiled and with CUDA graphs;
# 4. torch.profiler tables of our AdaLoRA and LoRA steps on both models (eager);
# 5. the CUDA tests (no host sync outside allocation steps, sharded/compaction on CUDA), the adapter-autograd and
#    compile tests; the allocator against PEFT and its profile.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
results=benchmarks/results
mkdir -p "$results"
if [ -n "${SMALL:-}" ]; then  # a dry run: every command once, at sizes that take seconds
  size=(--rounds 1 --batch 2 --length 16)
  layers=(--layers 2)
  rounds=(--repeats 2)
  tag=(--tag _dryrun)
  log="$results/gpu_checks_dryrun.log"
else
  size=(--rounds 10)
  layers=()
  rounds=(--repeats 100)
  tag=()
  log="$results/gpu_checks.log"
fi
: >"$log"
status=0
step() {  # step SECONDS command...: run it with a time limit, log it, remember a failure and go on
  local limit=$1
  shift
  echo "== $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== exit $rc: $*" | tee -a "$log"; status=1; }
}

if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee -a "$log" || exit 1
fi
ts=(benchmarks/train_step.py --device "$DEVICE")
ours=(--no-peft --no-full)
step 150 "$PY" "${ts[@]}" --model smollm2 "${layers[@]}" "${size[@]}" "${tag[@]}"
step 200 "$PY" "${ts[@]}" --model smollm2 "${layers[@]}" "${size[@]}" "${tag[@]}" --compile "${ours[@]}"
step 200 "$PY" "${ts[@]}" --model smollm2 "${layers[@]}" "${size[@]}" "${tag[@]}" --compile --compile-mode reduce-overhead "${ours[@]}"
step 60 "$PY" "${ts[@]}" --model minilm "${size[@]}" "${tag[@]}"
step 120 "$PY" "${ts[@]}" --model minilm "${size[@]}" "${tag[@]}" --compile "${ours[@]}"
step 120 "$PY" "${ts[@]}" --model minilm "${size[@]}" "${tag[@]}" --compile --compile-mode reduce-overhead "${ours[@]}"
step 60 "$PY" "${ts[@]}" --model smollm2 "${layers[@]}" "${size[@]}" "${tag[@]}" --profile --no-peft
step 60 "$PY" "${ts[@]}" --model minilm "${size[@]}" "${tag[@]}" --profile --no-peft
if [ "$DEVICE" = cuda ]; then
  step 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_adapter_autograd.py tests/test_compile.py \
    tests/test_compact.py tests/test_io.py
  step 60 "$PY" benchmarks/allocator.py --device cuda "${rounds[@]}"
  step 60 "$PY" benchmarks/allocator.py --device cuda --repeats 20 --profile
fi

if [ -n "${OUT:-}" ]; then  # one archive: the device tool brings back few files
  tar czf "$OUT/gpu_results.tgz" "$log" "$results"/*"$DEVICE"*.json "$results"/*"$DEVICE"*.txt 2>/dev/null
fi
exit $status
