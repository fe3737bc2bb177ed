"""Default learning rates of ``adalora train``, per method and adapter scale.

An adapter's update is multiplied by its scale alpha / r, so at a fixed learning rate a smaller rank takes
larger steps in weight space: 8 at r = 2 against 2 at r = 8 with alpha = 16. With Adam, whose steps have a
fixed size per parameter whatever the gradient's, the change of a layer's output per step grows roughly like
``lr * alpha / sqrt(r)`` (the r rank-one terms add up like random vectors; this is the "rank-stabilised" scale
of rsLoRA). The default learning rate therefore depends on that rank-stabilised scale

    s = alpha / sqrt(r),    r = the rank the adapter trains at (LoRA: --lora-r; AdaLoRA and pruned LoRA:
                            --init-r, the rank of every matrix while the scale is applied),

through one rule for every adapter method::

    lr = base_lr(method) * min(1, reference_scale(method) / s)

``base_lr`` is the rate measured as safe and good at the reference rank; beyond the reference scale (smaller
ranks, or a larger --alpha) the rate shrinks in proportion, so the step in weight space stays at most the
measured one. At larger ranks the rate is not raised: the measurements found the collapse edge of LoRA at
about the same learning rate at r = 2 and r = 8, so a larger rate is not known to be safe there.

The measured basis (docs/cli.md, *Defaults that do not collapse*; runs of all-MiniLM-L6-v2 on 2,000
examples): LoRA collapsed to a constant prediction at lr 3e-3 at r = 2 and r = 8 alike, and at the previous
default 2e-3 in one of three seeds at r = 2; 1e-3 was the best learning rate found for LoRA at both ranks
on all three tasks tried and collapsed nowhere, so it is LoRA's base at r = 2 (s = 11.3). Pruned LoRA
collapsed at 3e-3 (TREC-6 and SMS spam) and never at 1e-3, at initial ranks 3 and 12: base 1e-3 at r = 3.
AdaLoRA (lambda starts at 0, so its update starts small) collapsed only at 3e-2 (and at 1e-2 without the
orthogonal regulariser): base 5e-3 at its r = 3 (init rank of the r = 2 budget), a margin of 6x. Full
fine-tuning has no adapter scale: 5e-5, the common BERT rate, which trained at every rate tried from 3e-5 to
3e-4 (collapse only at 1e-3).

rsLoRA's alternative, changing the scale itself to alpha / sqrt(r), is not offered: it changes what a
trained adapter means (its saved scale would no longer match PEFT's LoRA at the same alpha), while
adjusting the learning rate keeps every adapter comparable with PEFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

METHODS: tuple[str, ...] = ("adalora", "lora", "pruned-lora", "full")


@dataclass(frozen=True)
class LearningRateRule:
    """``lr = base * min(1, reference_scale / (alpha / sqrt(r)))``; no scale (full fine-tuning): ``base``."""

    base: float
    reference_scale: float | None  # alpha / sqrt(r) at which ``base`` was measured; None = no adapter


DEFAULT_LR: dict[str, float] = {}  # filled below: each method's base rate (the rate at its reference scale)


def _scale_at(rank: int, alpha: float = 16.0) -> float:
    return alpha / math.sqrt(rank)


RULES: dict[str, LearningRateRule] = {
    "adalora": LearningRateRule(5e-3, _scale_at(3)),
    "lora": LearningRateRule(1e-3, _scale_at(2)),
    "pruned-lora": LearningRateRule(1e-3, _scale_at(3)),
    "full": LearningRateRule(5e-5, None),
}
DEFAULT_LR.update({method: rule.base for method, rule in RULES.items()})


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
        raise ValueError(f"unknown method '{method}' for a default learning rate; choose one of {', '.join(METHODS)}")
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
        f"default by method: {bases} at alpha 16 and rank >= {ranks} (LoRA: --lora-r; others: --init-r), lowered "
        f"in proportion to alpha/sqrt(r) beyond that (e.g. lora r=1: {default_lr('lora', 1):.2g}); "
        f"full {RULES['full'].base:g}; see docs/cli.md"
    )
