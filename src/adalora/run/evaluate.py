"""Scoring a model on the held-out split: accuracy for classification, perplexity for causal-lm. Pure functions of
the model and pre-tokenised tensors (eval mode, no RNG used); the batches are moved to the model's device."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .batches import trim_padding
from .hardware import to_device
from .lm_loss import summed_nll

Evaluator = Callable[[nn.Module, dict[str, torch.Tensor], int], dict[str, float]]
_LOGITS_PER_CHUNK = 1 << 25  # perplexity forwards at most this many logits at once (128 MB in float32)


@torch.inference_mode()
def evaluate_accuracy(model: nn.Module, tensors: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on pre-tokenised tensors (eval mode, no RNG used).

    Args:
        tensors: ``input_ids`` etc. of shape ``(n, length)`` and ``labels`` of shape ``(n,)`` (moved to the
            model's device batch by batch).
        batch_size: rows per forward pass.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum, n = 0, 0.0, len(tensors["labels"])
    for start in range(0, n, batch_size):
        batch = to_device(
            trim_padding({key: value[start : start + batch_size] for key, value in tensors.items()}), device
        )
        out = model(**batch)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        loss_sum += float(out.loss) * len(batch["labels"])
    model.train(was_training)
    return {"accuracy": correct / n, "loss": loss_sum / n}


@torch.inference_mode()
def evaluate_perplexity(model: nn.Module, tensors: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    """Mean next-token NLL over every predicted token of ``tensors`` and its exponential, the perplexity.

    Tokens are weighted equally whatever row they are in (not rows equally, as averaging per-batch losses
    would). Batches are split further so that no forward holds more than ~32M logits (vocabularies are large).
    The LM head runs on the positions that predict a label only (:func:`adalora.run.lm_loss.summed_nll`).

    Args:
        model: a causal LM (see :func:`adalora.run.lm_loss.predictions`).
        tensors: :func:`adalora.run.lm_data.encode_lm` output.
        batch_size: rows per forward, at most.

    Returns:
        ``{"loss": mean NLL (nats), "perplexity": exp(loss), "tokens": predicted tokens}``.
    """
    was_training = model.training
    model.eval()
    n, length = tensors["input_ids"].shape
    vocab = _vocab_size(model)
    rows = max(1, min(batch_size, _LOGITS_PER_CHUNK // max(1, length * vocab)))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, n, rows):
        batch = to_device(trim_padding({key: value[start : start + rows] for key, value in tensors.items()}), device)
        nll, tokens = summed_nll(model, batch)
        total, count = total + nll, count + tokens
    model.train(was_training)
    loss = total / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": float(count)}


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and config is not None and hasattr(config, "get_text_config"):
        vocab = getattr(config.get_text_config(), "vocab_size", None)
    return int(vocab or 50_000)
