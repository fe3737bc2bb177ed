"""Training steps of a mixture-of-experts decoder: our AdaLoRA against our LoRA on the same targets, with the experts'
products run as a loop over experts or as grouped matrix products.

The model is a tiny-but-wide Qwen3-MoE built from a config with random weights (timings and counts do not depend on
the values): ``--layers`` 2, hidden 256, 64 experts of width 128, 8 experts per token, vocabulary 1000, batch 4 x 64
tokens (2048 routed (token, expert) pairs per layer, 32 per expert on average). Both methods adapt what
``adalora train --task causal-lm`` adapts by default: the attention projections and every expert of both fused
expert weights (``experts``); LoRA is ours (:mod:`adalora.baselines`: SVD doublets with lambda fixed at 1), at the
same initial rank.

For each method and each way of running the per-expert products (``set_expert_matmul``: ``loop`` runs one product
per expert that received tokens, after one host sync per block to read the counts; ``grouped`` runs
``torch.nn.functional.grouped_mm`` over all experts at once), the script reports:

- ``step ms``: the median time of one optimizer step (forward, backward, AdamW, and for AdaLoRA the closed-form
  regulariser gradient, the importance update and, one step in ten, an allocation), all cases taking turns one step
  each per round so that machine noise hits them alike;
- ``ops / step``: the ATen operations one step dispatches (views and scalar reads left out), averaged over ten steps
  (one allocation included); on a GPU, where a step this small is bound by kernel launches, they are the cost.

Usage: python benchmarks/moe_step.py [--device cpu|cuda] [--threads N] [--rounds 8] [--experts 64]
                                     [--hidden 256] [--layers 2] [--init-r 8] [--target-r 4] [--tag SUFFIX]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, timed, write_results
from train_step import Case, count_ops

import adalora
from adalora.baselines import inject_lora, lora_config
from adalora.layers import set_expert_matmul
from adalora.run.settings import DEFAULT_TARGETS

TARGETS = DEFAULT_TARGETS["qwen3_moe"]
MATMULS = ("loop", "grouped")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=1000,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.hidden // 2,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        num_experts=args.experts,
        num_experts_per_tok=8,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config).to(args.device).train()


def build_cases(base: torch.nn.Module, args: argparse.Namespace) -> list[Case]:
    """AdaLoRA and LoRA, each with both matmuls; a budgeting phase (an allocation every 10 steps) covers the run."""
    config = adalora.AdaLoRAConfig(
        target_modules=TARGETS,
        init_r=args.init_r,
        target_r=args.target_r,
        warmup_steps=0,
        final_steps=100,
        mask_interval=10,
        total_steps=10_000,
    )
    cases = []
    for matmul in MATMULS:
        ours = adalora.inject(copy.deepcopy(base), config)
        set_expert_matmul(ours, matmul)
        cases.append(Case(f"ours AdaLoRA, {matmul}", ours, adalora.RankAllocator(ours, config)))
        lora = inject_lora(copy.deepcopy(base), lora_config(args.init_r, target_modules=TARGETS))
        set_expert_matmul(lora, matmul)
        cases.append(Case(f"ours LoRA, {matmul}", lora))
    return cases


def measure(cases: list[Case], ids: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per step of every case, the cases alternating one step each per round."""
    sync = args.device.startswith("cuda")
    for case in cases:  # warm-up: optimizer state, allocator workspace, kernels
        case.step(ids, ids)
    samples: dict[str, list[float]] = {case.name: [] for case in cases}
    for _ in range(args.rounds):
        for case in cases:
            samples[case.name].append(timed(lambda case=case: case.step(ids, ids), sync))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--init-r", type=int, default=8)
    parser.add_argument("--target-r", type=int, default=4)
    parser.add_argument("--tag", default="", help="suffix for the result file name (e.g. a machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = build_model(args)
    cases = build_cases(base, args)
    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0)).to(args.device)
    seconds = measure(cases, ids, args)
    ops, _ = count_ops(cases, ids, ids)
    rows, results = [], {}
    for case in cases:
        method, matmul = case.name.rsplit(", ", 1)
        lora = f"ours LoRA, {matmul}"
        results[case.name] = {
            "median_seconds": seconds[case.name],
            "over_our_lora": seconds[case.name] / seconds[lora],
            "ops_per_step": ops[case.name],
            "ops_over_our_lora": ops[case.name] / ops[lora],
            "trainable_parameters": sum(p.numel() for p in case.model.parameters() if p.requires_grad),
        }
        r = results[case.name]
        rows.append(
            [
                method,
                matmul,
                f"{r['median_seconds'] * 1e3:.1f}",
                f"{r['over_our_lora']:.3f}",
                f"{r['ops_per_step']:.0f}",
                f"{r['ops_over_our_lora']:.3f}",
            ]
        )
    print(
        f"Qwen3-MoE, {args.layers} layers, hidden {args.hidden}, {args.experts} experts (8 per token), batch 4 x 64, "
        f"init rank {args.init_r}, device {args.device}, {torch.get_num_threads()} threads, median of {args.rounds}"
    )
    print_table(["method", "matmul", "step ms", "/ our LoRA", "ops / step", "/ our LoRA"], rows)
    settings = {k: getattr(args, k) for k in ("device", "rounds", "experts", "hidden", "layers", "init_r", "target_r")}
    path = write_results(
        f"moe_step_{'cuda' if args.device.startswith('cuda') else 'cpu'}{args.tag}", settings | {"cases": results}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
