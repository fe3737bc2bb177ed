"""Next-token loss of a causal LM with the LM head applied only where a token is predicted.

A decoder's LM head maps every position's hidden state to the whole vocabulary (49,152 logits per position for
SmolLM2, 128,256 for Llama 3), but a prompt/completion row is trained on its completion only. Computing the
logits of the prompt positions too costs, for SmolLM2-135M, about a fifth of a training step's matrix work (its
head has 28M multiply-adds per position against 106M for all 30 layers) and, in memory, a ``(rows, length,
vocab)`` float32 tensor for the loss.

:func:`adalora.run.lm_data.encode_lm` pads rows on the left, so every row's completion ends in the batch's last
column; the loss asks the model for the logits of the last ``k`` positions only (transformers' ``logits_to_keep``),
``k`` reaching back to the first position that predicts a label in any row. Explicit position ids (counted from
each row's first real token) make a left-padded row compute what it computes alone, for rotary and absolute
position embeddings alike. The loss is the one transformers computes from ``labels`` (mean next-token NLL over
every labelled token of the batch), the same up to float rounding; packed text (labels everywhere) keeps every
position.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # label of positions without loss (prompt, padding): the ignore_index of HF's LM loss
KEEP_MULTIPLE = 8  # the kept positions are rounded up to this, so that a compiled model sees few distinct shapes


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(rows, length)`` positions counted from each row's first real token (0 on the left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module whose ``forward`` names the arguments: through DDP (``.module``) and torch.compile
    (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@functools.cache
def _forward_parameters(cls: type[nn.Module]) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def forward_parameters(model: nn.Module) -> frozenset[str]:
    """The argument names of the model's ``forward`` (seen through wrappers; looked up once per class, as it is
    asked every training step)."""
    return _forward_parameters(type(_unwrapped(model)))


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward can return the logits of the last positions only."""
    return "logits_to_keep" in forward_parameters(model)


def kept_positions(labels: torch.Tensor, multiple: int = KEEP_MULTIPLE) -> int:
    """How many trailing positions predict every label of ``labels`` ``(rows, length)``, the one after the last
    position included (position ``i`` predicts token ``i + 1``; the last position predicts nothing), rounded up to
    ``multiple`` and at most ``length``."""
    length = labels.shape[1]
    labelled = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    first = int(labelled.min()) if len(labelled) else length - 2  # first position that predicts a label
    needed = length - first
    return min(length, -(-needed // multiple) * multiple)


def predictions(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict labels, and those labels, from the kept positions only.

    Args:
        model: a causal LM taking ``input_ids``, ``attention_mask``, ``position_ids`` (and, if it can,
            ``logits_to_keep``), returning ``.logits`` of shape ``(rows, positions, vocab)``.
        batch: ``input_ids``, ``attention_mask`` and ``labels``, each ``(rows, length)``, labels -100 where no
            token is predicted (:func:`adalora.run.lm_data.encode_lm`; left padding keeps few positions, right
            padding is computed correctly too, with more positions kept).

    Returns:
        ``(logits, targets)``: float32 ``(rows, k - 1, vocab)`` and ``(rows, k - 1)``; ``logits[:, i]`` predicts
        ``targets[:, i]`` (-100: no loss there).
    """
    labels = batch["labels"]
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    inputs.setdefault("position_ids", position_ids(batch["attention_mask"]))
    keep = kept_positions(labels)
    if takes_logits_to_keep(model):
        inputs["logits_to_keep"] = keep
    logits = model(**inputs).logits[:, -keep:]  # a no-op when the model kept exactly these
    targets = labels[:, labels.shape[1] - keep + 1 :].to(logits.device)
    return logits[:, :-1].float(), targets


def next_token_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The training loss of a causal-LM batch (``fit``'s ``loss_fn``): the mean next-token NLL over its labelled
    tokens, what ``model(**batch).loss`` is in transformers, computed from the labelled positions only."""
    logits, targets = predictions(model, batch)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def summed_nll(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[float, int]:
    """(sum of the next-token NLL over the batch's labelled tokens, their number): for perplexity."""
    logits, targets = predictions(model, batch)
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return float(total.detach()), int((targets != IGNORE_INDEX).sum())
