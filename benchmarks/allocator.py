"""allocator.step() against PEFT's update_and_allocate on DeBERTaV3-base-shaped adapters.

12 layers x {query, key, value, attention output (768 x 768), FFN in (768 -> 3072), FFN out (3072 -> 768)},
init rank 12: 72 adapted matrices, about 2.0M adapter parameters. Both libraries see the same weights and
gradients; calls alternate within one process and the median of many calls is reported, for a
non-masking and a masking step of the budgeting phase and for a final-phase step. The floor is the
same statistics update done in place on one contiguous buffer of the same total size.

``--profile`` times nothing: it runs our masking and non-masking steps under torch.profiler and prints (and writes
to ``benchmarks/results/allocator_profile_DEVICE.txt``) where the time goes, operation by operation.

Usage: python benchmarks/allocator.py [--repeats 50] [--device cpu|cuda] [--threads N] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, alternate, print_table, write_results

import adalora
from adalora.files.atomic import atomic_write

HIDDEN, FFN, LAYERS, INIT_R, TARGET_R = 768, 3072, 12, 12, 8
TARGETS = ["query", "key", "value", "attn_out", "ffn_in", "ffn_out"]
T, T_INIT, T_FINAL, DELTA_T = 1000, 100, 200, 10
MASK_STEP, PLAIN_STEP, FINAL_STEP = 500, 501, 900


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value, self.attn_out = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.ffn_in, self.ffn_out = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)


def deberta_shaped(device: str) -> nn.Module:
    return nn.ModuleList(Block() for _ in range(LAYERS)).to(device)


def build(device: str):
    import peft

    base = deberta_shaped(device)
    config = adalora.AdaLoRAConfig(
        target_modules=TARGETS,
        init_r=INIT_R,
        target_r=TARGET_R,
        warmup_steps=T_INIT,
        final_steps=T_FINAL,
        mask_interval=DELTA_T,
        total_steps=T,
    )
    peft_config = peft.AdaLoraConfig(
        target_modules=TARGETS,
        init_r=INIT_R,
        target_r=TARGET_R,
        tinit=T_INIT,
        tfinal=T_FINAL,
        deltaT=DELTA_T,
        total_step=T,
        lora_alpha=16,
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config)
    ours = adalora.inject(base, config)
    allocator = adalora.RankAllocator(ours, config)
    # Same weights and gradients on both sides: lambda nonzero, random gradients everywhere.
    generator = torch.Generator(device=device).manual_seed(0)
    inner = theirs.base_model.model
    with torch.no_grad():
        for name, adapter in zip(allocator.names, allocator.adapters, strict=True):
            peft_module = inner.get_submodule(name)
            for param, peft_name in ((adapter.P, "lora_B"), (adapter.E, "lora_E"), (adapter.Q, "lora_A")):
                param.normal_(generator=generator)
                param.grad = torch.randn(param.shape, generator=generator, device=device)
                target = getattr(peft_module, peft_name)["default"]
                target.copy_(param.view(target.shape))
                target.grad = param.grad.view(target.shape).clone()
    return ours, allocator, config, theirs


def floor_case(numel: int, device: str):
    weights, grads = torch.randn(numel, device=device), torch.randn(numel, device=device)
    ibar, ubar = torch.zeros(numel, device=device), torch.zeros(numel, device=device)
    # A scratch kept between calls, as the allocator keeps its workspace: a fresh 8 MB tensor per call would time
    # the memory allocator's page faults (on the CPU the floor then varied by 1.2-1.7 ms between runs).
    scratch = torch.empty(numel, device=device)

    def update() -> None:
        sensitivity = torch.mul(weights, grads, out=scratch).abs_()
        ibar.lerp_(sensitivity, 0.15)
        ubar.lerp_(sensitivity.sub_(ibar).abs_(), 0.15)

    return update


def profile_steps(steps: dict, device: str, repeats: int) -> None:
    """Print and write torch.profiler's per-operation table for each of ``steps`` (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    tables = []
    for name, step in steps.items():
        for _ in range(3):
            step()
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                step()
            if cuda:
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by=sort_by, row_limit=25)
        tables.append(f"our {name} step, {repeats} calls on {device}\n{table}")
        print(tables[-1])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"allocator_profile_{'cuda' if cuda else 'cpu'}.txt"
    atomic_write(path, lambda file: file.write("\n\n".join(tables).encode()))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="results name under benchmarks/results/ (default allocator_DEVICE)")
    parser.add_argument("--profile", action="store_true", help="profile our steps instead of timing them")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = args.device.startswith("cuda")

    ours, allocator, config, theirs = build(args.device)
    numel = allocator.tracker.numel
    peft_model = theirs.base_model

    def ours_at(step: int):
        def call() -> None:
            allocator.step_count = step
            allocator.step()

        return call

    def peft_at(step: int):
        return lambda: peft_model.update_and_allocate(step)

    if args.profile:
        profile_steps({"masking": ours_at(MASK_STEP), "no masking": ours_at(PLAIN_STEP)}, args.device, args.repeats)
        return

    budgeting = alternate(
        {
            "ours_plain": ours_at(PLAIN_STEP),
            "peft_plain": peft_at(PLAIN_STEP),
            "ours_mask": ours_at(MASK_STEP),
            "peft_mask": peft_at(MASK_STEP),
            "floor": floor_case(numel, args.device),
        },
        args.repeats,
        sync=sync,
    )
    # Enter the final phase on both sides (the forced allocation at T - t_f), then time a final-phase step.
    ours_at(T - T_FINAL)()
    peft_at(T - T_FINAL)()
    final = alternate({"ours_final": ours_at(FINAL_STEP), "peft_final": peft_at(FINAL_STEP)}, args.repeats, sync=sync)
    times = budgeting | final

    rows = []
    for label, key in (("budgeting, no masking", "plain"), ("budgeting, masking", "mask"), ("final phase", "final")):
        o, p = times[f"ours_{key}"], times[f"peft_{key}"]
        rows.append([label, f"{o * 1e3:.2f}", f"{p * 1e3:.2f}", f"{o / p:.3f}", f"{o / times['floor']:.2f}"])
    print(
        f"{len(allocator.adapters)} adapters, {numel / 1e6:.2f}M adapter parameters, device {args.device}, "
        f"median of {args.repeats} calls; floor (in-place update of one {numel / 1e6:.2f}M buffer): "
        f"{times['floor'] * 1e3:.2f} ms"
    )
    print_table(["step", "ours ms", "PEFT ms", "ours/PEFT", "ours/floor"], rows)
    path = write_results(
        args.out or f"allocator_{'cuda' if sync else 'cpu'}",
        {
            "device": args.device,
            "adapters": len(allocator.adapters),
            "adapter_parameters": numel,
            "repeats": args.repeats,
            "median_seconds": times,
            "ratios": {row[0]: {"ours_over_peft": float(row[3]), "ours_over_floor": float(row[4])} for row in rows},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
