"""How a per-module-rank AdaLoRA update is laid out as LoRA pairs so that a given reader computes it exactly.

Each module's update is ``scale * P diag(lambda) Q`` over its k kept triplets. A LoRA reader computes
``s_reader * lora_B @ lora_A`` where the reader chooses ``s_reader``; the readers differ in how:

- PEFT: ``lora_alpha / r`` per module, both looked up in ``alpha_pattern`` / ``rank_pattern`` by module name;
- llama.cpp: the one global ``lora_alpha`` divided by *that tensor's* rank k (diffusers, when it infers ranks
  from tensor shapes, does the same with a ``lora_alpha`` of its own choosing: docs/adapter-files.md);
- vLLM 0.32: PEFT's rule (it reads ``rank_pattern``/``alpha_pattern``; measured, docs/adapter-files.md); SGLang and
  older vLLM: the one global ``lora_alpha / r`` for every module, whatever its tensors' rank.

A layout chooses ``r``, ``lora_alpha`` and the factors so that ``s_reader * lora_B @ lora_A`` is our update in
every module, by folding the ratio of our scale to ``s_reader`` into lambda (so into ``lora_A``):

- ``compact``: each module keeps its rank k; ``lora_alpha = r`` = the most common kept rank; no
  ``alpha_pattern``. The folded factor is ``scale * k / lora_alpha``, so both PEFT's rule (``rank_pattern``
  gives k) and llama.cpp's rule (the tensor's rank is k) give ``scale``.
- ``uniform``: every module zero-padded to one rank R (default: the largest kept rank); ``r = lora_alpha = R``,
  no patterns; the folded factor is ``scale``. Every rule above reads ``R / R = 1``. Costs file size only: the
  padded rows of ``lora_A`` and columns of ``lora_B`` are zeros.

Modules whose rank went to 0 are left out of both.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import torch

from ..layers import KeptFactors
from .updates import ModuleUpdate

LORA_LAYOUTS = ("compact", "uniform")


@dataclass(frozen=True)
class LoRALayout:
    """LoRA pairs ready to be written, with the global values a config file states.

    Attributes:
        name: ``"compact"`` or ``"uniform"``.
        updates: the modules of rank > 0, with the scale folded into lambda (and zero-padded, for uniform);
            each one's ``factors.scale`` is the scale its reader applies (``lora_alpha / tensor rank``).
        r: the config's ``r``.
        lora_alpha: the config's one ``lora_alpha``.
        rank_pattern: ``{module: rank}`` of every module for compact, empty for uniform.
    """

    name: str
    updates: list[ModuleUpdate]
    r: int
    lora_alpha: int
    rank_pattern: dict[str, int]


def most_common_rank(ranks: list[int]) -> int:
    """The rank most modules have (the largest of those tied): the ``r`` PEFT and diffusers take as default."""
    counts = Counter(ranks)
    return max(counts, key=lambda k: (counts[k], k))


def lay_out(updates: list[ModuleUpdate], layout: str = "compact", rank: int | None = None) -> LoRALayout:
    """The LoRA pairs of ``updates`` in ``layout`` (see the module docstring).

    Args:
        updates: every adapted module's update (rank-0 modules are dropped here).
        layout: ``"compact"`` or ``"uniform"``.
        rank: uniform only: the rank R to pad to (default: the largest kept rank).

    Raises:
        ValueError: unknown layout, every rank 0, ``rank`` given with compact, or ``rank`` below the largest
            kept rank.
    """
    if layout not in LORA_LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; choose one of: {', '.join(LORA_LAYOUTS)}.")
    kept = [u for u in updates if u.rank > 0]
    if not kept:
        raise ValueError("every adapter has rank 0, so there is nothing to export as LoRA.")
    if layout == "compact":
        if rank is not None:
            raise ValueError(
                "a rank applies to the uniform layout only (compact keeps each module's own rank): "
                "drop --rank, or add --layout uniform."
            )
        r = most_common_rank([u.rank for u in kept])
        folded = [_fold(u, u.factors.scale * u.rank / r, r / u.rank) for u in kept]
        return LoRALayout("compact", folded, r, r, {u.name: u.rank for u in kept})
    largest = max(kept, key=lambda u: u.rank)
    if rank is None:
        rank = largest.rank
    if rank < largest.rank:
        raise ValueError(
            f"--rank {rank} is smaller than the largest kept rank, {largest.rank} (module '{largest.name}'): "
            f"padding cannot shrink a module. Use --rank {largest.rank} or more, or omit it."
        )
    folded = [_fold(u, u.factors.scale, 1.0, pad_to=rank) for u in kept]
    return LoRALayout("uniform", folded, rank, rank, {})


def _fold(update: ModuleUpdate, factor: float, reader_scale: float, pad_to: int | None = None) -> ModuleUpdate:
    """``update`` with lambda multiplied by ``factor`` (in float64, then back), zero-padded to ``pad_to`` triplets.

    ``reader_scale`` is recorded as the new ``factors.scale``: ``reader_scale * P diag(lambda') Q`` equals the
    original ``scale * P diag(lambda) Q`` because ``factor * ...`` was chosen so by the caller.
    """
    f = update.factors
    e = (f.E.to(torch.float64) * factor).to(f.E.dtype)
    p, q = f.P, f.Q
    if pad_to is not None and pad_to > f.rank:
        extra = pad_to - f.rank
        p = torch.cat([p, p.new_zeros(*p.shape[:-1], extra)], dim=-1)  # (..., d_out, k): (experts,) leading or not
        q = torch.cat([q, q.new_zeros(*q.shape[:-2], extra, q.shape[-1])], dim=-2)
        e = torch.cat([e, e.new_zeros(*e.shape[:-1], extra)], dim=-1)
    return dataclasses.replace(update, factors=KeptFactors(p, e, q, float(reader_scale)))
