"""Helpers shared by the adapter-file tests: make injected adapters look trained and masked."""

from __future__ import annotations

import torch
from torch import nn

from adalora import find_adapters


@torch.no_grad()
def fake_training(model: nn.Module, ranks: list[int] | None = None, seed: int = 1) -> dict[str, int]:
    """Give every adapter non-zero P, E, Q and a random mask keeping ``ranks[i]`` triplets (lambda zeroed
    for the rest, as RankAllocator leaves them); also perturb any trainable non-adapter parameter (e.g. the
    classifier of ``modules_to_save``) so that forgetting to save it shows in the outputs.

    Returns:
        {module name: kept rank}.
    """
    generator = torch.Generator().manual_seed(seed)
    named = find_adapters(model)
    kept = {}
    for i, (name, adapter) in enumerate(named):
        r = adapter.r
        k = ranks[i % len(ranks)] if ranks is not None else int(torch.randint(0, r + 1, (1,), generator=generator))
        adapter.P.copy_(torch.randn(adapter.P.shape, generator=generator))
        adapter.Q.copy_(torch.randn(adapter.Q.shape, generator=generator) * 0.3)
        adapter.E.copy_(torch.randn(r, generator=generator))
        mask = torch.zeros(r, dtype=torch.bool)
        mask[torch.randperm(r, generator=generator)[:k]] = True
        adapter.rank_mask.copy_(mask)
        adapter.E.mul_(mask)
        kept[name] = k
    adapter_params = {id(p) for _, a in named for p in a.adapter_parameters()}
    for param in model.parameters():
        if param.requires_grad and id(param) not in adapter_params:
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return kept


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits
