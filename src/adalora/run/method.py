"""The method stage of a run: AdaLoRA, LoRA, pruned LoRA or full fine-tuning applied to the loaded model, and the
optimizer, LR schedule and rank allocator that train it. Nothing is trained and nothing is written here.

The method's AdaLoRAConfig is the settings' one with what the run derives filled in: the targets and the task head
(model stage), T (the optimizer steps of the data) and t_i, t_f (fractions of T unless given in steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..allocator import RankAllocator
from ..baselines import inject_lora, lora_config, pruned_lora_config
from ..compact import resize_adapters
from ..config import AdaLoRAConfig
from ..files.rank_pattern import read_rank_pattern
from ..inject import inject
from ..integrations.loop import count_optimizer_steps
from ..layers import find_adapters
from .defaults import default_lr, training_rank
from .model import Model
from .settings import RunError, RunSettings
from .tasks import Data
from .words import plural


@dataclass
class Method:
    """What :func:`apply_method` built.

    Attributes:
        config: the adapters' configuration, every derived field filled in (None for full fine-tuning).
        optimizer: AdamW over the trainable parameters.
        scheduler: linear LR warm-up then decay (:func:`warmup_then_decay`), stepped per optimizer step.
        allocator: the rank allocator (AdaLoRA and pruned LoRA), else None.
        total_steps: T, the optimizer steps of the run.
        lr: the learning rate (``--lr``, else the method's default: defaults.py).
        trainable_parameters: how many numbers the optimizer trains.
    """

    config: AdaLoRAConfig | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    allocator: RankAllocator | None
    total_steps: int
    lr: float
    trainable_parameters: int


def apply_method(settings: RunSettings, data: Data, model: Model) -> Method:
    """Make ``model`` train as ``settings.method`` says, on its device, and build what trains it.

    Raises:
        RunError: in one line, if the data make no batch or leave no budgeting phase, or LoRA has no rank.
    """
    batches = data.rows // settings.batch_size
    if batches == 0:
        raise RunError(f"--batch-size {settings.batch_size} is larger than the {data.rows} training rows")
    steps = count_optimizer_steps(batches, settings.epochs, settings.grad_accum)
    config = adapt(settings, model, steps, batches)
    model.module.to(model.device)  # before the optimizer and the allocator, whose state lives beside the parameters
    trainable = [p for p in model.module.parameters() if p.requires_grad]
    given = settings.adalora
    # The default depends on the method and the adapter scale alpha / r (run/defaults.py).
    rank = training_rank(settings.method, settings.lora_r, given.target_r, given.init_r)
    lr = settings.lr if settings.lr is not None else default_lr(settings.method, rank or 1, given.alpha)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=settings.weight_decay)
    warm = max(1, round(settings.lr_warmup_fraction * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_then_decay(step, warm, steps))
    allocator = None
    if config is not None and settings.method in ("adalora", "pruned-lora"):
        allocator = RankAllocator(model.module, config, optimizer=optimizer, on_misuse=settings.on_misuse)  # type: ignore[arg-type]
    count = sum(p.numel() for p in trainable)
    return Method(config, optimizer, scheduler, allocator, steps, lr, count)


def adapt(settings: RunSettings, model: Model, steps: int, batches: int) -> AdaLoRAConfig | None:
    """Inject the method's adapters into ``model`` (or make every weight trainable, for ``full``); returns their
    config (None for ``full``)."""
    if settings.method == "full":
        for param in model.module.parameters():
            param.requires_grad_(True)
        return None
    given = settings.adalora
    if settings.method == "lora":
        rank = settings.lora_r or given.target_r
        if rank is None:
            raise RunError("--method lora needs a rank: give --lora-r (or --target-r)")
        ranks = read_pattern(settings.rank_pattern) if settings.rank_pattern else {}
        widest = max(ranks.values(), default=rank)
        config = lora_config(
            widest,
            target_modules=model.targets,
            target_parameters=given.target_parameters,
            alpha=given.alpha * widest / rank,  # every module at uniform LoRA's scale alpha / rank
            dropout=given.dropout,
            modules_to_save=model.heads,
        )
        inject_lora(model.module, config)
        if ranks:
            give_ranks(model.module, ranks, settings.rank_pattern)
        return config
    warmup, final = schedule(settings, steps, batches)
    config = given.replace(
        target_modules=model.targets,
        modules_to_save=model.heads,
        warmup_steps=warmup,
        final_steps=final,
        total_steps=steps,
    )
    if settings.method == "pruned-lora":
        config = pruned_lora_config(config)
        inject_lora(model.module, config)
    else:
        inject(model.module, config)
    return config


def read_pattern(path: str) -> dict[str, int]:
    try:
        return read_rank_pattern(path)
    except ValueError as error:
        raise RunError(str(error)) from None


def give_ranks(module: torch.nn.Module, ranks: dict[str, int], path: str) -> None:
    """Cut each LoRA adapter of ``module`` to its rank in the pattern (its first doublets: B = 0 and A is
    Kaiming-uniform either way, so this is LoRA started at that rank).

    Raises:
        RunError: if the pattern and the adapted modules differ (another model or other --target-modules).
    """
    adapted = {name for name, _ in find_adapters(module)}
    missing, foreign = sorted(adapted - set(ranks)), sorted(set(ranks) - adapted)
    if missing or foreign:
        raise RunError(
            f"--rank-pattern {path} does not fit this model's adapters: {len(foreign)} of its modules are not "
            f"adapted here (e.g. {foreign[:2]}) and {len(missing)} adapted modules have no rank in it (e.g. "
            f"{missing[:2]}); use the same model and --target-modules as the run that exported it"
        )
    resize_adapters(module, ranks)


def schedule(settings: RunSettings, steps: int, batches: int) -> tuple[int, int]:
    """(t_i, t_f) for T = ``steps``: the given ones, else fractions of T.

    Raises:
        RunError: if they leave no budget-decreasing phase, saying how long training is and how to fix it.
    """
    given, derived = settings.adalora, settings.derived
    warmup = round(settings.warmup_fraction * steps) if "warmup_steps" in derived else given.warmup_steps
    final = round(settings.final_fraction * steps) if "final_steps" in derived else given.final_steps
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
