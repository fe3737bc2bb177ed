"""Input gradients of quantized layers before and after an evaluation, and what keeping 4-bit layers
differentiable costs an evaluation on the CPU.

A Llama of SmolLM2-135M's layer shape (hidden 576, intermediate 1536, 9 heads, 3 key/value heads; 2 layers, a
vocabulary of 1000, random weights) is quantized with each ``--quantize`` method and adapted on all seven
projections. For every adapter (lambda = 0, so its input gradient is its base's) the error is
``max |grad_in - g @ W|``, with ``g`` the gradient of its output and ``W`` the dequantized weight read before any
evaluation; the largest over the 14 adapters (and that over the largest ``|g @ W|``) is reported after one
training-mode backward (``before eval``) and after an eval-mode forward without gradients followed by one
(``after eval``), as ``adalora train`` runs them. ``bnb-4bit (kernel on)`` switches bitsandbytes' CPU inference
kernel back on after ``inject`` (what training did before ``keep_differentiable_layout``): on a CPU with
AVX512-BF16 its layers pass nothing to their input after an evaluation (relative error 1). The products compute
in ``--dtype`` (bfloat16 by default, as ``--precision bf16``: relative errors of ~4e-3 are its rounding).

The timing compares one evaluation forward (batch 8 x 128 tokens, eval mode, no gradients) of the 4-bit model with
the kernel kept off (the standard layout, as adalora trains) against the repacked kernel, medians of alternating
rounds.

Usage: python benchmarks/quantized_gradients.py [--dtype bfloat16|float32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate, print_table, write_results

from adalora import AdaLoRAConfig, find_adapters, inject
from adalora.layers.quantized import is_bnb_4bit
from adalora.run.quantize import quantize_model

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG = AdaLoRAConfig(target_modules=TARGETS, init_r=4, target_r=2, total_steps=10, warmup_steps=1, final_steps=1)
CASES = ("bnb-4bit", "bnb-4bit (kernel on)", "bnb-8bit", "torchao-nf4", "torchao-int8")


def llama(dtype: torch.dtype) -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=1000, hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def adapted(base: torch.nn.Module, case: str, dtype: torch.dtype) -> torch.nn.Module:
    model = copy.deepcopy(base)
    quantize_model(model, case.split()[0], compute_dtype=dtype)
    model = inject(model, CONFIG)
    if case.endswith("(kernel on)"):
        import bitsandbytes.functional as bnbf

        for module in model.modules():
            if is_bnb_4bit(module):
                module.support_avx512bf16_for_cpu = bnbf.has_avx512bf16()
    return model


def worst_error(model: torch.nn.Module, x: torch.Tensor, dense: dict[str, torch.Tensor]) -> tuple[float, float]:
    """The largest absolute and relative input-gradient errors over the adapters, one training-mode backward."""
    model.train()
    grads = {}
    hooks = [
        a.register_full_backward_hook(lambda m, gi, go, name=name: grads.__setitem__(name, (gi[0], go[0])))
        for name, a in find_adapters(model)
    ]
    embeds = model.get_input_embeddings()(x).detach().requires_grad_()
    model(inputs_embeds=embeds, labels=x).loss.backward()
    for hook in hooks:
        hook.remove()
    differences, scales = [], []
    for name, (grad_in, grad_out) in grads.items():
        expected = grad_out.float() @ dense[name]
        differences.append(float((grad_in.float() - expected).abs().max()))
        scales.append(float(expected.abs().max()))
    return max(differences), max(differences) / max(scales)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    base = llama(dtype)
    x = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    rows, errors = [], {}
    for case in CASES:
        model = adapted(base, case, dtype)
        dense = {name: a.dense_weight().float() for name, a in find_adapters(model)}
        before = worst_error(model, x, dense)
        model.eval()
        with torch.no_grad():
            model(input_ids=x)
        after = worst_error(model, x, dense)
        errors[case] = {
            "before_eval": {"abs": before[0], "rel": before[1]},
            "after_eval": {"abs": after[0], "rel": after[1]},
        }
        rows.append([case, *(f"{e:.2e}" for e in (*before, *after))])
    print_table(["base", "before eval: max |diff|", "relative", "after eval: max |diff|", "relative"], rows)

    batch = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(1))
    models = {case: adapted(base, case, dtype).eval() for case in ("bnb-4bit", "bnb-4bit (kernel on)")}

    def evaluation(model: torch.nn.Module):
        return lambda: model(input_ids=batch)

    with torch.no_grad():
        seconds = alternate({case: evaluation(m) for case, m in models.items()}, repeats=args.rounds, warmup=1)
    print_table(["4-bit evaluation forward (8 x 128 tokens)", "seconds"], [[c, f"{s:.3f}"] for c, s in seconds.items()])
    payload = {"dtype": args.dtype, "errors": errors, "eval_forward_seconds": seconds}
    print(f"wrote {write_results(f'quantized_gradients_cpu_{args.dtype}', payload)}")


if __name__ == "__main__":
    main()
