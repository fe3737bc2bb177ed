#!/usr/bin/env bash
# Every GPU check of the performance work in one run, for a session that is lent a GPU (aim: under 10 minutes on an
# H100/H200; the compiled runs take most of it). It uses the machine's own python3 and its torch, transformers
# and peft (nothing is installed: GPU machines here cannot reach a package index) and this checkout's src/.
#
#   bash benchmarks/gpu_checks.sh                     # results and a log under benchmarks/results/, a copy under $OUT
#   BUDGET=540 bash benchmarks/gpu_checks.sh          # stop starting steps after 540 s (the default)
#   DEVICE=cpu SMALL=1 bash benchmarks/gpu_checks.sh  # dry run of every step on the CPU at minimal sizes
#
# In order of what the GPU goals need most. Each step has its own time limit, cut to what is left of BUDGET seconds,
# and a step that would get under 20 s is skipped, so that one slow step cannot eat the rest and the whole run fits
# one device call:
# 1. the decoder-scale training step (SmolLM2-135M architecture, 210 adapters, batch 4 x 256): our AdaLoRA, our LoRA,
#    our compacted final phase, PEFT's AdaLoRA and LoRA, eager, step time and peak memory;
# 2. the same compiled (inductor), our AdaLoRA and LoRA only (compiling takes most of the time);
# 3. the MiniLM step eager, then compiled;
# 4. both with CUDA graphs (reduce-overhead), our AdaLoRA and LoRA only;
# 5. torch.profiler tables of our AdaLoRA and LoRA steps on both models (eager);
# 6. the CUDA tests (no host sync outside allocation steps, sharded/compaction on CUDA), the adapter-autograd and
#    compile tests; the allocator against PEFT and its profile;
# 7. quantized bases: tests/layers/test_quantized.py (its CUDA variants: bitsandbytes' CUDA kernels, bf16) and
#    benchmarks/quantized_memory.py on CUDA (peak memory and step time, SmolLM2-135M-shaped, fp32/bf16/4-bit);
# 8. mixture-of-experts: the experts' grouped products against the loop on CUDA (tests/layers/test_experts.py), and
#    benchmarks/moe_step.py (AdaLoRA and LoRA on a tiny-but-wide Qwen3-MoE, loop and grouped products).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
results=benchmarks/results
mkdir -p "$results"
budget=${BUDGET:-540}
scale=1
if [ -n "${SMALL:-}" ]; then  # a dry run: every command once, at sizes that take seconds (on a CPU, slowly)
  budget=${BUDGET:-3600}
  scale=4
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
deadline=$((SECONDS + budget))
step() {  # step SECONDS command...: run it with a time limit, log it, remember a failure and go on
  local limit=$(($1 * scale)) left=$((deadline - SECONDS))
  shift
  if [ "$left" -lt 20 ]; then
    echo "== skipped (budget spent): $*" | tee -a "$log"
    status=1
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== [${limit}s] $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== exit $rc: $*" | tee -a "$log"; status=1; }
}

if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee -a "$log" || exit 1
fi
ts=(benchmarks/train_step.py --device "$DEVICE")
ours=(--no-peft --no-full --cases "ours AdaLoRA" "ours LoRA")
graphs=(--compile --compile-mode reduce-overhead)
step 150 "$PY" "${ts[@]}" --model smollm2 "${layers[@]}" "${size[@]}" "${tag[@]}"
step 240 "$PY" "${ts[@]}" --model smollm2 "${layers[@]}" "${size[@]}" "${tag[@]}" --compile "${ours[@]}"
step 90 "$PY" "${ts[@]}" --model minilm "${size[@]}" "${tag[@]}"
step 120 "$PY" "${ts[@]}" --model minilm "${size[@]}" "${tag[@]}" --compile "${ours[@]}"
step 240 "$PY" "${ts[@]}" --model smollm2 "${layers[@]}" "${size[@]}" "${tag[@]}" "${graphs[@]}" "${ours[@]}"
step 120 "$PY" "${ts[@]}" --model minilm "${size[@]}" "${tag[@]}" "${graphs[@]}" "${ours[@]}"
step 60 "$PY" "${ts[@]}" --model smollm2 "${layers[@]}" "${size[@]}" "${tag[@]}" --profile --no-peft
step 60 "$PY" "${ts[@]}" --model minilm "${size[@]}" "${tag[@]}" --profile --no-peft
if [ "$DEVICE" = cuda ]; then
  step 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/layers/test_mixing.py tests/test_compile.py \
    tests/test_compact.py tests/files/test_adapter.py
  step 60 "$PY" benchmarks/allocator.py --device cuda "${rounds[@]}"
  step 60 "$PY" benchmarks/allocator.py --device cuda --repeats 20 --profile
  step 120 "$PY" -m pytest -q -p no:cacheprovider tests/layers/test_quantized.py
  step 150 "$PY" benchmarks/quantized_memory.py --device cuda --rounds 2 --steps 5 --batch 8 --length 256
  step 60 "$PY" -m pytest -q -p no:cacheprovider tests/layers/test_experts.py -k cuda
fi
moe=(--rounds 10)
[ -z "${SMALL:-}" ] || moe=(--rounds 1 --experts 8 --hidden 64)
step 120 "$PY" benchmarks/moe_step.py --device "$DEVICE" "${moe[@]}" "${tag[@]}"

if [ -n "${OUT:-}" ]; then  # one archive: the device tool brings back few files
  tar czf "$OUT/gpu_results.tgz" "$log" "$results"/*"$DEVICE"*.json "$results"/*"$DEVICE"*.txt 2>/dev/null
fi
exit $status
