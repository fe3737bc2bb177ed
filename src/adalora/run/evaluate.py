"""Scoring a model on the held-out split (accuracy for classification, perplexity for causal-lm), and the training
loss each task uses."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import causal_lm, lm_loss
from .batches import trim_padding
from .hardware import to_device

Evaluator = Callable[[nn.Module, dict[str, torch.Tensor], int], dict[str, float]]
Loss = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


@torch.inference_mode()
def evaluate(model: nn.Module, tensors: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
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


def primary_metric(task: str) -> str:
    """The eval metric a run reports: perplexity (lower is better) for causal-lm, accuracy otherwise."""
    return "perplexity" if task == causal_lm.CAUSAL_LM else "accuracy"


def evaluator(task: str) -> Evaluator:
    """The function that scores a model on ``task``'s held-out tensors."""
    return causal_lm.evaluate_perplexity if task == causal_lm.CAUSAL_LM else evaluate


def training_loss(task: str) -> Loss | None:
    """The training loss of ``task``'s batches: the next-token loss from the labelled positions only for
    causal-lm (:mod:`adalora.run.lm_loss`), else None (the model's own ``loss``)."""
    return lm_loss.next_token_loss if task == causal_lm.CAUSAL_LM else None
