"""The paper's baselines in the same harness: LoRA and structured pruning of LoRA (section 4.4).

LoRA's update ``B A`` is the SVD adapter's ``P diag(lambda) Q`` with lambda fixed at 1: ``B = P``
(``(d_out, r)``, zero at init, so the model starts as the base model) and ``A = Q`` (``(r, d_in)``,
Kaiming-uniform as in ``loralib``/PEFT). So a LoRA layer here *is* an :class:`~adalora.SVDAdapter` whose
lambda is a frozen vector of ones: injection, ``rank_mask``, saving, merging and ``disable_adapters``
all work unchanged, and the scale is LoRA's ``alpha / r``.

Structured pruning of LoRA reuses the AdaLoRA machinery as it is: the :class:`~adalora.RankAllocator`
scores doublet i by eq. 7 with ``s(lambda_i) = 0`` (lambda is frozen, so it has no sensitivity):
``S_i = mean_j s(B_ji) + mean_j s(A_ij)``, keeps the top-b(t) doublets under the same budget schedule,
and prunes the others by zeroing their lambda gate. A pruned doublet then gets no gradient and its score
decays: unlike an SVD triplet it does not come back (the paper's point about the SVD form).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import AdaLoRAConfig
from .inject import inject
from .layers import find_adapters, start_like_lora
from .metrics import METRICS


def lora_config(
    r: int,
    *,
    target_modules: Sequence[str] | str = ("query", "key", "value", "dense"),
    target_parameters: Sequence[str] = (),
    alpha: float = 16.0,
    dropout: float = 0.0,
    modules_to_save: Sequence[str] = (),
) -> AdaLoRAConfig:
    """The configuration that injects rank-``r`` LoRA layers (no allocation: the rank stays ``r``).

    ``AdaLoRAConfig`` requires a final budget; a LoRA run never builds an allocator, so the placeholder
    ``target_total_rank=1`` is never used. Only ``init_r``, ``alpha``, ``dropout`` and the module and parameter lists
    matter.
    """
    targets = target_modules if isinstance(target_modules, str) else tuple(target_modules)
    return AdaLoRAConfig(
        target_modules=targets,
        target_parameters=tuple(target_parameters),
        init_r=r,
        target_r=None,
        target_total_rank=1,
        total_steps=None,
        alpha=alpha,
        dropout=dropout,
        orth_reg_weight=0.0,
        modules_to_save=tuple(modules_to_save),
    )


@torch.no_grad()
def as_lora(model: nn.Module) -> nn.Module:
    """Turn every injected SVD adapter of ``model`` into a LoRA layer, in place.

    ``P`` (B) is zeroed, ``Q`` (A) gets LoRA's Kaiming-uniform init and lambda becomes a frozen vector of
    ones. The model still computes exactly the base model (B = 0).

    Raises:
        ValueError: if ``model`` has no adapters (call :func:`adalora.inject` first).
    """
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError("as_lora: the model has no adapters; call adalora.inject(model, config) first")
    for _, adapter in adapters:
        start_like_lora(*adapter.adapter_parameters())  # B = 0, A as loralib / PEFT (per expert of a fused weight)
        adapter.E.requires_grad_(False)
    return model


def inject_lora(model: nn.Module, config: AdaLoRAConfig) -> nn.Module:
    """``inject`` then :func:`as_lora`: plain LoRA of rank ``config.init_r`` on ``config.target_modules``."""
    return as_lora(inject(model, config))


def pruned_lora_config(config: AdaLoRAConfig) -> AdaLoRAConfig:
    """``config`` made fit for structured pruning of LoRA doublets.

    The orthogonality regulariser is switched off (B and A of LoRA have no orthogonality to keep, and pushing
    B away from its zero init would change the baseline), and the ``magnitude`` score is refused (lambda is
    fixed at 1 in LoRA, so |lambda| ranks nothing).
    """
    if METRICS[config.importance].reads_lambda_only:
        usable = ", ".join(name for name, m in METRICS.items() if not m.reads_lambda_only)
        raise ValueError(
            f"pruned LoRA: importance={config.importance!r} scores |lambda|, which LoRA does not have (it is fixed "
            f"at 1); use one of {usable}."
        )
    return config.replace(orth_reg_weight=0.0)
