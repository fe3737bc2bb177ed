"""Everything a run trains with, built from its settings: data and model loaded, the method applied (AdaLoRA,
LoRA, pruned LoRA or full fine-tuning), the optimizer, the LR schedule and the rank allocator. Nothing is
trained and nothing is written here."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..allocator import RankAllocator
from ..baselines import inject_lora, lora_config, pruned_lora_config
from ..config import AdaLoRAConfig
from ..inject import inject
from ..integrations.loop import count_optimizer_steps
from . import causal_lm
from .data import Task, builtin_task, encode, file_task
from .defaults import default_lr, training_rank
from .hardware import enable_gradient_checkpointing, resolve_device
from .models import head_modules, load_model, resolve_model_path, resolve_targets
from .quantize import drop_int8_cast_notices, quantize_model
from .settings import RunError, RunSettings
from .threads import default_threads
from .words import plural


@dataclass
class Setup:
    """What :func:`prepare` built: the model ready to train and everything the loop needs."""

    settings: RunSettings
    task: Task
    model_path: Path
    model: nn.Module
    tokenizer: Any
    train: dict[str, torch.Tensor]  # {name: (rows, max_length)}, labels (rows,)
    eval: dict[str, torch.Tensor]
    config: AdaLoRAConfig | None  # None for full fine-tuning
    allocator: RankAllocator | None  # AdaLoRA and pruned LoRA
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    batches_per_epoch: int
    derived: dict[str, Any]  # what run.json records beside the settings (compared on --resume)
    device: str = "cpu"  # where the model is (hardware.resolve_device of settings.device)


@dataclass
class _Inputs:
    """Data and model, before the method is applied."""

    task: Any  # Task, or causal_lm.LMTask
    model_path: Path
    tokenizer: Any
    model: nn.Module
    train: dict[str, torch.Tensor]
    eval: dict[str, torch.Tensor]
    fresh_weights: set[str]  # weights the checkpoint did not provide (a new classification head)


def load_task(settings: RunSettings) -> Task:
    """The classification task: the user's files, or a built-in task; cut to ``max_train``/``max_eval``."""
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


def load_inputs(settings: RunSettings) -> _Inputs:
    """Data first (so that a bad file is reported before a model loads), then the model, then the tensors."""
    if settings.task == causal_lm.CAUSAL_LM:  # rows are packed text or padded prompt/completion examples
        task, model_path, tokenizer, model, train, held_out = causal_lm.run_inputs(settings)
        return _Inputs(task, model_path, tokenizer, model, train, held_out, set())
    task = load_task(settings)
    model_path = resolve_model_path(settings.model)
    tokenizer, model, fresh = load_model(model_path, task.label_names)
    train = encode(tokenizer, task.train, settings.max_length)
    held_out = encode(tokenizer, task.eval, settings.max_length)
    return _Inputs(task, model_path, tokenizer, model, train, held_out, fresh)


def resolve_schedule(settings: RunSettings, steps: int, batches: int) -> tuple[int, int]:
    """(t_i, t_f) for T = ``steps``; fractions of T unless given in steps."""
    warmup = settings.warmup_steps if settings.warmup_steps is not None else round(settings.warmup_fraction * steps)
    final = settings.final_steps if settings.final_steps is not None else round(settings.final_fraction * steps)
    if steps <= warmup + final:
        raise RunError(
            f"training has {plural(steps, 'optimizer step')} ({plural(batches, 'batch', 'batches')} x "
            f"{plural(settings.epochs, 'epoch')}"
            f"{f' / {settings.grad_accum} accumulated' if settings.grad_accum > 1 else ''}), which leaves no "
            f"budget-decreasing phase after {warmup} warm-up and before {final} final steps: train longer "
            "(--epochs, more data, a smaller --batch-size) or shorten --warmup-steps/--final-steps"
        )
    return warmup, final


def warmup_then_decay(step: int, warmup: int, total: int) -> float:
    """LR factor: linear warm-up over ``warmup`` steps, then linear decay towards 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def apply_method(
    settings: RunSettings, model: nn.Module, heads: tuple[str, ...], steps: int, batches: int, derived: dict[str, Any]
) -> AdaLoRAConfig | None:
    """Make ``model`` train as ``settings.method`` says (adapters injected, or every weight trainable);
    records the targets and the schedule in ``derived``. Returns the adapter config (None for ``full``)."""
    if settings.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return None
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
        return config
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
    return config


def prepare(settings: RunSettings) -> Setup:
    """Load data and model, apply the method, build optimizer, LR scheduler and allocator (nothing trained).

    The torch thread count is ``settings.threads``, else the default of :func:`adalora.run.threads.choose_threads`.
    """
    settings.check()
    torch.set_num_threads(settings.threads or default_threads())
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)

    device = resolve_device(settings.device)
    inputs = load_inputs(settings)
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(inputs.model)
    rows = len(inputs.train["labels"])
    batches = rows // settings.batch_size
    if batches == 0:
        raise RunError(f"--batch-size {settings.batch_size} is larger than the {rows} training rows")
    steps = count_optimizer_steps(batches, settings.epochs, settings.grad_accum)
    heads = settings.modules_to_save
    if heads is None:
        heads = head_modules(inputs.model, inputs.fresh_weights)
    derived: dict[str, Any] = {
        "model_path": str(inputs.model_path),
        "task": inputs.task.name,
        "label_names": list(inputs.task.label_names),
        "train_examples": len(inputs.task.train),
        "eval_examples": len(inputs.task.eval),
        "total_steps": steps,
        "modules_to_save": list(heads),
        "examples_per_step": settings.batch_size * settings.grad_accum,  # --batch-size is the micro-batch
    }
    if settings.task == causal_lm.CAUSAL_LM:
        derived.update(train_rows=rows, eval_rows=len(inputs.eval["labels"]))
    # The default depends on the method and the adapter scale alpha / r (run/defaults.py).
    rank = training_rank(settings.method, settings.lora_r, settings.target_r, settings.init_r)
    lr = settings.lr if settings.lr is not None else default_lr(settings.method, rank or 1, settings.alpha)
    derived["lr"] = lr
    if settings.quantize != "none":
        # On the training device first: bitsandbytes quantizes its layers where they are (on a GPU when moved there).
        inputs.model.to(device)
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)
        quantized = quantize_model(inputs.model, settings.quantize, compute_dtype=compute, skip=heads)
        derived["quantized_layers"] = len(quantized)
        drop_int8_cast_notices()
    config = apply_method(settings, inputs.model, heads, steps, batches, derived)
    inputs.model.to(device)  # before the optimizer and the allocator, whose state lives beside the parameters

    trainable = [p for p in inputs.model.parameters() if p.requires_grad]
    derived["trainable_parameters"] = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=settings.weight_decay)
    warm = max(1, round(settings.lr_warmup_fraction * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_then_decay(step, warm, steps))
    allocator = None
    if config is not None and settings.method in ("adalora", "pruned-lora"):
        allocator = RankAllocator(inputs.model, config, optimizer=optimizer, on_misuse=settings.on_misuse)  # type: ignore[arg-type]
        derived.update(init_budget=allocator.init_budget, target_budget=allocator.target_budget)
    return Setup(
        settings, inputs.task, inputs.model_path, inputs.model, inputs.tokenizer, inputs.train, inputs.eval, config,
        allocator, optimizer, scheduler, steps, batches, derived, device,
    )  # fmt: skip
