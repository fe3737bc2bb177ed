"""Peak memory and step time of QLoRA-style fine-tuning: SmolLM2-135M-shaped Llama on fp32, bf16 and 4-bit bases,
our AdaLoRA against our LoRA, and PEFT's AdaLoRA on the same 4-bit base.

The model has SmolLM2-135M's shape (30 layers, hidden 576, intermediate 1536, 9 heads, 3 key/value heads, vocabulary
49152, tied embeddings) with random weights (memory and time do not depend on the values). Adapters go on every
attention and MLP matrix (q, k, v, o, gate, up, down); AdaLoRA starts at rank 12 with an average final rank of 8,
LoRA has rank 8 (the same final budget); the adapters are float32 on every base. The 4-bit base is bitsandbytes
nf4 with double quantization, computing in bfloat16, everything else (embeddings, norms, output) in bfloat16, as
QLoRA does; the bf16 base is the whole model in bfloat16. A step is forward, backward, AdamW and, for AdaLoRA,
the orthogonality regulariser and an allocation (``mask_interval=1``: every timed step allocates, the worst case;
PEFT's ``deltaT=1`` likewise).

Every configuration runs in a fresh subprocess, and the rounds alternate between configurations so that machine
noise hits them alike. Memory on the CPU is the process's resident set: every worker imports the same libraries
(torch, transformers, peft, bitsandbytes, adalora), builds its model, then resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``) and trains; ``peak`` is the peak RSS during training (``VmHWM``) minus the RSS after
the imports, so it counts the model, activations, gradients, optimizer and allocator state, and not the libraries
or the transient float copy the 4-bit model was quantized from. On CUDA it is ``torch.cuda.max_memory_allocated``
over the training steps. Step time is the median over the timed steps of all rounds (the first step of each worker,
which allocates the optimizer state, is not timed).

Usage: python benchmarks/quantized_memory.py [--rounds 2] [--steps 3] [--batch 4] [--length 128] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
CASES = (
    "fp32 / ours AdaLoRA",
    "fp32 / ours LoRA",
    "bf16 / ours AdaLoRA",
    "bf16 / ours LoRA",
    "4-bit / ours AdaLoRA",
    "4-bit / ours LoRA",
    "4-bit / PEFT AdaLoRA",
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INIT_R, TARGET_R, TOTAL_STEPS = 12, 8, 1000


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_freed_memory() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so that RSS is what is in use
    except (OSError, AttributeError):
        pass


def worker(case: str, steps: int, batch: int, length: int, device: str) -> dict[str, object]:
    """One configuration in this process: build, inject, train ``steps + 1`` steps, measure."""
    import bitsandbytes  # noqa: F401  (imported by every worker, so that the RSS baseline is the same)
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import adalora
    from adalora.baselines import inject_lora, lora_config
    from adalora.run.quantize import quantize_model

    torch.manual_seed(0)
    cuda = device == "cuda"
    _release_freed_memory()
    rss_imports = _rss_mb()
    base, method = case.split(" / ")
    dtype = torch.float32 if base == "fp32" else torch.bfloat16
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.set_default_dtype(dtype)  # built directly in its dtype: no float32 copy of a bf16 model
    model = LlamaForCausalLM(config).to(device)
    torch.set_default_dtype(torch.float32)
    if base == "4-bit":
        quantize_model(model, "bnb-4bit", compute_dtype=torch.bfloat16)
    model.train()
    allocator = None
    if method == "ours AdaLoRA":
        ada = adalora.AdaLoRAConfig(
            target_modules=TARGETS, init_r=INIT_R, target_r=TARGET_R, total_steps=TOTAL_STEPS, warmup_steps=0,
            final_steps=TOTAL_STEPS // 2, mask_interval=1,
        )  # fmt: skip
        adalora.inject(model, ada)
        allocator = adalora.RankAllocator(model, ada)
    elif method == "ours LoRA":
        inject_lora(model, lora_config(TARGET_R, target_modules=TARGETS))
    else:
        peft_config = peft.AdaLoraConfig(
            target_modules=list(TARGETS), init_r=INIT_R, target_r=TARGET_R, total_step=TOTAL_STEPS, tinit=0,
            tfinal=TOTAL_STEPS // 2, deltaT=1, lora_alpha=16,
        )  # fmt: skip
        model = peft.get_peft_model(model, peft_config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (batch, length), device=device)

    def step(t: int) -> None:
        loss = model(input_ids=tokens, labels=tokens).loss  # PEFT's AdaLoRA adds its regulariser in forward
        if allocator is not None:
            loss = loss + allocator.regularization()
        loss.backward()
        optimizer.step()
        if allocator is not None:
            allocator.step()
        elif method == "PEFT AdaLoRA":
            model.base_model.update_and_allocate(t)
        optimizer.zero_grad(set_to_none=True)

    _release_freed_memory()
    rss_model = _rss_mb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    times = []
    for t in range(steps + 1):
        start = time.perf_counter()
        step(t)
        if cuda:
            torch.cuda.synchronize()
        if t:
            times.append(time.perf_counter() - start)
    result: dict[str, object] = {
        "case": case,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "step_s": times,
    }
    if cuda:
        result |= {
            "model_mb": cuda_before / 2**20,
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
            "memory": "torch.cuda.max_memory_allocated",
        }
    else:
        result |= {
            "model_mb": rss_model - rss_imports,
            "peak_mb": _rss_mb("VmHWM") - rss_imports,
            "memory": "peak RSS during training minus RSS after imports",
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per worker (after one untimed)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each worker (CPU)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(worker(args.worker, args.steps, args.batch, args.length, args.device)))
        return

    runs: dict[str, list[dict[str, object]]] = {case: [] for case in CASES}
    for round_ in range(args.rounds):
        for case in CASES:
            command = [sys.executable, __file__, "--worker", case, "--steps", str(args.steps), "--batch",
                       str(args.batch), "--length", str(args.length), "--device", args.device]  # fmt: skip
            if args.threads:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                sys.exit(f"{case}: the worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            runs[case].append(json.loads(line.removeprefix("RESULT ")))
            print(f"round {round_ + 1}/{args.rounds}  {case}: peak {runs[case][-1]['peak_mb']:.0f} MB", flush=True)

    summary = {}
    for case, results in runs.items():
        summary[case] = {
            "peak_mb": statistics.median(r["peak_mb"] for r in results),
            "model_mb": statistics.median(r["model_mb"] for r in results),
            "step_s": statistics.median(t for r in results for t in r["step_s"]),
            "trainable_parameters": results[0]["trainable_parameters"],
        }
    ours, lora, peft_ = (summary[f"4-bit / {m}"] for m in ("ours AdaLoRA", "ours LoRA", "PEFT AdaLoRA"))
    goals = {
        "4-bit: ours AdaLoRA peak < PEFT AdaLoRA peak": ours["peak_mb"] < peft_["peak_mb"],
        "4-bit: ours AdaLoRA peak <= 1.05 x ours LoRA peak": ours["peak_mb"] <= 1.05 * lora["peak_mb"],
        "4-bit: ours AdaLoRA step faster than PEFT AdaLoRA": ours["step_s"] < peft_["step_s"],
    }
    rows = [
        [case, f"{s['model_mb']:.0f}", f"{s['peak_mb']:.0f}", f"{s['step_s']:.2f}", f"{s['trainable_parameters']:,}"]
        for case, s in summary.items()
    ]
    sys.path.insert(0, str(HERE))
    from common import print_table, write_results

    print()
    print_table(["base / method", "model MB", "peak MB", "step s", "trainable"], rows)
    for goal, met in goals.items():
        print(f"{'met ' if met else 'MISSED'}  {goal}")
    print(
        f"ratios (4-bit): ours/PEFT peak {ours['peak_mb'] / peft_['peak_mb']:.3f}, ours AdaLoRA/LoRA peak "
        f"{ours['peak_mb'] / lora['peak_mb']:.3f}, ours/PEFT step {ours['step_s'] / peft_['step_s']:.3f}"
    )
    path = write_results(
        f"quantized_memory_{args.device}",
        {
            "settings": vars(args) | {"init_r": INIT_R, "target_r": TARGET_R, "targets": TARGETS},
            "memory": runs[CASES[0]][0]["memory"],
            "summary": summary,
            "goals": goals,
            "runs": runs,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
