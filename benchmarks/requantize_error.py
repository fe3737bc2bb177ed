"""Rounding error of ``merge(model, requantize=True)`` against the float merge, per quantization kind.

For SmolLM2-135M-shaped projections (576 x 576, 192 x 576, 1536 x 576, 576 x 1536) with Gaussian weights of
std 0.02 (Llama's initialisation) and a rank-8 update whose norm is 10% of the weight's, this measures
``||requantized(W_q + delta) - (W_q + delta)|| / ||W_q + delta||`` (the error requantizing adds to the merged
weight, W_q the dequantized base) next to ``||W_q - W|| / ||W||`` (the error of quantizing the base in the first
place), in Frobenius norm, on the CPU.

Usage: python benchmarks/requantize_error.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results

from adalora import AdaLoRAConfig, find_adapters, inject, merge
from adalora.run.quantize import quantize_model

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))
KINDS = ("bnb-4bit", "bnb-8bit", "torchao-nf4", "torchao-int8")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    torch.manual_seed(0)
    rows, results = [], {}
    for kind in KINDS:
        base_errors, requant_errors = [], []
        for d_out, d_in in SHAPES:
            weight = torch.randn(d_out, d_in) * 0.02
            model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
            model[0].weight.data.copy_(weight)
            quantize_model(model, kind)
            adapted = inject(model, AdaLoRAConfig(target_modules=("0",), init_r=8, target_r=4, total_steps=10,
                                                  warmup_steps=1, final_steps=1))  # fmt: skip
            adapter = find_adapters(adapted)[0][1]
            dense = adapter.dense_weight().float()
            with torch.no_grad():  # an update of 10% of the weight's norm
                adapter.E.fill_(1.0)
                adapter.E.mul_(0.1 * weight.norm() / adapter.delta_weight().norm())
            target = dense + adapter.delta_weight().detach()
            merged = merge(adapted, requantize=True)[0]
            requantized = _dequantize(merged)
            base_errors.append(relative(dense, weight))
            requant_errors.append(relative(requantized, target))
        results[kind] = {"base": max(base_errors), "requantize": max(requant_errors)}
        rows.append([kind, f"{max(base_errors):.4f}", f"{max(requant_errors):.4f}"])
    print_table(["kind", "quantizing the base (max rel. error)", "requantizing the merge (max rel. error)"], rows)
    print(f"wrote {write_results('requantize_error', {'shapes': SHAPES, 'errors': results})}")


def _dequantize(layer: nn.Module) -> torch.Tensor:
    """The float weight a quantized layer computes with (wrap it in an adapter, read its dense weight)."""
    wrapped = inject(nn.Sequential(layer), AdaLoRAConfig(target_modules=("0",), init_r=2, target_r=1,
                                                         total_steps=10, warmup_steps=1, final_steps=1))  # fmt: skip
    return find_adapters(wrapped)[0][1].dense_weight().float()


if __name__ == "__main__":
    main()
