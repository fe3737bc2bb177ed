"""The defaults of ``adalora train`` that depend on the run: the learning rate, by method, and the settings whose
default differs between the two kinds of task (:data:`BY_TASK`).

The learning rate: one rule for every adapter method, by its adapter scale.

    lr = base(method) * min(1, s_ref(method) / s),    s = alpha / sqrt(r)

where r is the rank the scale alpha / r is applied at (LoRA: its rank; AdaLoRA and pruned LoRA: the initial rank).
Why this form: with Adam every parameter moves by about the learning rate per step whatever its gradient, and an
adapter's r rank-one terms add up like random vectors, so the change of a layer's output per step grows like
``lr * alpha / sqrt(r)`` (rsLoRA's rank-stabilised scale). ``base`` is the rate measured as good and safe at the
reference scale ``s_ref``; beyond it (smaller ranks, a larger alpha) the rate shrinks in proportion, so the step in
weight space never exceeds the measured one; below it the rate is not raised, as no larger rate was found safe.
Full fine-tuning has no adapter scale and one rate. The measurements behind each base and reference, and why
the scale itself stays PEFT's alpha / r: docs/cli.md, *Defaults that do not collapse*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# The two kinds of task (run/tasks.py): every built-in task and the user's labelled files, and next-token training.
CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"

# Settings whose default depends on the kind of task: {field of RunSettings: {kind: default}}; ``adalora train``
# starts from the defaults of the task it is given (settings.task_defaults) and its help shows each. The maximal
# length: a classification example is a sentence or two, while a decoder's example carries its prompt and answer
# and, through a chat template, role headers and a system prompt: SmolLM2's template makes a one-sentence question
# with the answer "Yes." 49 tokens (32 of them the template's), so 48 would cut the answer away. Batches are cut to
# their longest row (batches.py), so a longer limit costs only what the data needs (packed text: longer rows).
BY_TASK: dict[str, dict[str, Any]] = {
    "max_length": {CLASSIFICATION: 48, CAUSAL_LM: 128},
}


def kind_name(task: str) -> str:
    """The kind of the ``--task`` ``task``: causal-lm, or classification (every built-in task, and files)."""
    return CAUSAL_LM if task == CAUSAL_LM else CLASSIFICATION


def by_task(field: str) -> str:
    """The defaults of ``field`` (a key of :data:`BY_TASK`) in words, as ``--help`` shows them."""
    return ", ".join(f"{value} for {kind}" for kind, value in BY_TASK[field].items())


@dataclass(frozen=True)
class LearningRateRule:
    """``lr = base * min(1, reference_scale / (alpha / sqrt(r)))``; no scale (full fine-tuning): ``base``."""

    base: float
    reference_scale: float | None  # alpha / sqrt(r) at which ``base`` was measured; None = no adapter


def _scale_at(rank: int, alpha: float = 16.0) -> float:
    return alpha / math.sqrt(rank)


RULES: dict[str, LearningRateRule] = {
    "adalora": LearningRateRule(5e-3, _scale_at(3)),
    "lora": LearningRateRule(1e-3, _scale_at(2)),
    "pruned-lora": LearningRateRule(1e-3, _scale_at(3)),
    "full": LearningRateRule(5e-5, None),
}


def training_rank(method: str, lora_r: int | None, target_r: int | None, init_r: int) -> int | None:
    """The rank at which the adapter's scale alpha / r is applied: LoRA's fixed rank (``lora_r``, else
    ``target_r``), the initial rank for AdaLoRA and pruned LoRA, None for full fine-tuning (or a LoRA run
    without a rank, which the run rejects later with its own message)."""
    if method == "full":
        return None
    if method == "lora":
        return lora_r or target_r
    return init_r


def default_lr(method: str, rank: int | None, alpha: float = 16.0) -> float:
    """The default AdamW learning rate of ``method`` for an adapter of rank ``rank`` and scale alpha / rank.

    Args:
        method: adalora | lora | pruned-lora | full.
        rank: the rank the scale is applied at (:func:`training_rank`); ignored (may be None) for ``full``.
        alpha: the adapter's alpha (scale = alpha / rank).

    Returns:
        ``base * min(1, reference_scale / (alpha / sqrt(rank)))`` (module docstring).

    Raises:
        ValueError: unknown method, or a rank below 1 / a non-positive alpha for an adapter method.
    """
    if method not in RULES:
        raise ValueError(f"unknown method '{method}' for a default learning rate; choose one of {', '.join(RULES)}")
    rule = RULES[method]
    if rule.reference_scale is None:
        return rule.base
    if rank is None or rank < 1:
        raise ValueError(f"--method {method}: the adapter rank must be at least 1 for its learning rate, got {rank}")
    if not alpha > 0:
        raise ValueError(f"--alpha must be positive (the adapter scale is alpha / r), got {alpha}")
    return rule.base * min(1.0, rule.reference_scale / _scale_at(rank, alpha))


def describe_defaults() -> str:
    """One line for ``--lr``'s help: the base rates, from which rank they hold at alpha 16, and one example."""
    adapters = [m for m, rule in RULES.items() if rule.reference_scale is not None]
    bases = ", ".join(f"{m} {RULES[m].base:g}" for m in adapters)
    # alpha / sqrt(r) <= s_ref  <=>  r >= (alpha / s_ref)^2: the smallest rank at which the base rate holds
    ranks = ", ".join(f"{math.ceil((16.0 / RULES[m].reference_scale) ** 2 - 1e-9)}" for m in adapters)  # type: ignore[operator]
    return (
        f"default by method, for either task: {bases} at alpha 16 and rank >= {ranks} (LoRA: --lora-r; others: "
        f"--init-r), lowered in proportion to alpha/sqrt(r) beyond that (e.g. lora r=1: {default_lr('lora', 1):.2g}); "
        f"full {RULES['full'].base:g}; see docs/cli.md"
    )
