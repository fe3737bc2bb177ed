"""Helpers shared by the adapter tests: make injected adapters look trained and masked, and one trained adapter
of every layer type with the merged layer it must compute as."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora import find_adapters
from adalora.layers import SVDAdapter, SVDConv, SVDConv1D, SVDEmbedding, SVDLinear


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


def trained(adapter: SVDAdapter) -> SVDAdapter:
    """The adapter with lambda drawn from N(0, 1) and triplet 1 masked (lambda = 0), as after some training."""
    with torch.no_grad():
        adapter.E.normal_()
        adapter.E[1] = 0.0  # a masked triplet
    return adapter


def _linear(dtype: torch.dtype) -> tuple[SVDAdapter, torch.Tensor, object]:
    adapter = trained(SVDLinear.from_base(nn.Linear(7, 5).to(dtype).requires_grad_(False), r=3, scale=2.0))
    return adapter, torch.randn(2, 4, 7, dtype=dtype), lambda x, w: F.linear(x, w, adapter.bias)


def _conv1d(dtype: torch.dtype) -> tuple[SVDAdapter, torch.Tensor, object]:
    base = Conv1D(5, 7).to(dtype).requires_grad_(False)  # GPT-2: weight (d_in, d_out)
    nn.init.normal_(base.weight)
    adapter = trained(SVDConv1D.from_base(base, r=3, scale=0.5))
    return adapter, torch.randn(2, 4, 7, dtype=dtype), lambda x, w: x @ w + adapter.bias


def _conv(dtype: torch.dtype) -> tuple[SVDAdapter, torch.Tensor, object]:
    base = nn.Conv2d(4, 6, 3, padding=1).to(dtype).requires_grad_(False)
    adapter = trained(SVDConv.from_base(base, r=3, scale=1.5))
    return adapter, torch.randn(2, 4, 5, 5, dtype=dtype), lambda x, w: F.conv2d(x, w, adapter.bias, padding=1)


def _embedding(dtype: torch.dtype) -> tuple[SVDAdapter, torch.Tensor, object]:
    base = nn.Embedding(20, 6, padding_idx=3).to(dtype).requires_grad_(False)
    adapter = trained(SVDEmbedding.from_base(base, r=3, scale=0.5))
    ids = torch.tensor([[3, 1, 5, 3], [0, 19, 3, 2]])
    return adapter, ids, lambda x, w: F.embedding(x, w, padding_idx=3)


# Per layer type: (dtype) -> (adapter with lambda set and triplet 1 masked, an input, forward(x, merged weight)).
LAYERS = {"linear": _linear, "gpt2_conv1d": _conv1d, "conv2d": _conv, "embedding": _embedding}
