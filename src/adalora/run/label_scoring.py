"""Classification with a causal LM by scoring every label: the label chosen is the completion the model finds
most likely given the prompt.

For prompt ``p`` and candidate completions ``c_1 .. c_k`` (e.g. ``" spam"``, ``" ham"``), the score of ``c_j`` is
its log-likelihood ``sum_t log P(token_t | p, earlier tokens of c_j)`` over the tokens of ``c_j`` followed by
EOS, tokenised exactly as :func:`adalora.run.lm_data.encode_lm` tokenises a prompt/completion example for
training (prompt with the tokenizer's special tokens, completion without, then EOS). Counting EOS scores the
completion as a whole: a label that is a prefix of another (``"no"``, ``"not"``) is not favoured. Scores are
sums, not means over tokens: they are log-probabilities of the whole completion, so labels of different token
lengths compete on the same footing as the model's own probabilities.

Each prompt is encoded once: prompts are left-padded with explicit position ids (so a padded row computes what it
computes alone) and run with the key/value cache on; the cache is then repeated once per completion and all the
completions are scored in one forward from it. For ``k`` labels of a few tokens after a prompt of ``P`` tokens
that is ``P + k x (completion length)`` token positions per example instead of ``k x (P + completion length)``.
The LM head is applied to the prompt's last position only (``logits_to_keep=1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .lm_data import LMError, eos_id
from .lm_loss import forward_parameters, position_ids


def completion_token_ids(
    tokenizer: Any, prompts: Sequence[str], completions: Sequence[str]
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids per prompt, completion ids + EOS per completion), tokenised as for training.

    Raises:
        LMError: if the tokenizer has no EOS token, or a completion is empty.
    """
    eos = eos_id(tokenizer)
    prompt_ids = [list(ids) for ids in tokenizer(list(prompts), verbose=False)["input_ids"]]
    completion_ids = tokenizer(list(completions), add_special_tokens=False, verbose=False)["input_ids"]
    for text, ids in zip(completions, completion_ids, strict=True):
        if not ids:
            raise LMError(f"the completion {text!r} has no tokens; give every label a non-empty text")
    return prompt_ids, [[*ids, eos] for ids in completion_ids]


@torch.inference_mode()
def score_completions(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """Log-likelihood of every completion (+ EOS) given every prompt.

    Args:
        model: a causal LM taking ``input_ids``, ``attention_mask``, ``position_ids``, a key/value cache
            (:func:`cache_argument`), ``use_cache`` and ``logits_to_keep``, returning ``.logits`` of shape
            ``(batch, positions, vocab)`` and a cache with ``batch_repeat_interleave`` (transformers' decoders do).
        tokenizer: its tokenizer (EOS needed; pads with EOS when it has no pad token).
        prompts: ``n`` prompts.
        completions: ``k`` candidate completions, scored after every prompt (write the leading space).
        batch_size: (prompt, completion) pairs per forward: ``max(1, batch_size // k)`` prompts at a time.

    Returns:
        ``(n, k)`` float32 tensor of summed natural-log probabilities (on the CPU).

    Raises:
        LMError: if there is nothing to score or a completion is empty.
    """
    if not prompts or not completions:
        raise LMError("score_completions needs at least one prompt and one completion")
    prompt_ids, completion_ids = completion_token_ids(tokenizer, prompts, completions)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
    follow = Completions.of(completion_ids, pad)
    scores = torch.empty(len(prompts), len(completion_ids))
    was_training = model.training
    model.eval()
    step = max(1, batch_size // len(completion_ids))
    try:
        for start in range(0, len(prompts), step):
            rows = prompt_ids[start : start + step]
            scores[start : start + len(rows)] = _score_rows(model, rows, follow, pad)
    finally:
        model.train(was_training)
    return scores


@dataclass(frozen=True)
class Completions:
    """The ``k`` completions as tensors, right-padded to the longest one (``longest`` tokens, EOS included).

    Attributes:
        inputs: ``(k, longest - 1)`` every token but the last (which is only predicted), padded with ``pad``.
        mask: ``(k, longest - 1)`` 1 on the real input tokens.
        targets: ``(k, longest)`` every token, padded with 0.
        real: ``(k, longest)`` True on the real tokens.
    """

    inputs: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    real: torch.Tensor

    @classmethod
    def of(cls, completion_ids: list[list[int]], pad: int) -> Completions:
        # Every completion has at least one token and EOS, so longest >= 2.
        k, longest = len(completion_ids), max(len(ids) for ids in completion_ids)
        inputs = torch.full((k, longest - 1), pad, dtype=torch.long)
        mask = torch.zeros_like(inputs)
        targets = torch.zeros((k, longest), dtype=torch.long)
        real = torch.zeros((k, longest), dtype=torch.bool)
        for j, ids in enumerate(completion_ids):
            inputs[j, : len(ids) - 1], mask[j, : len(ids) - 1] = torch.tensor(ids[:-1]), 1
            targets[j, : len(ids)], real[j, : len(ids)] = torch.tensor(ids), True
        return cls(inputs, mask, targets, real)


def _score_rows(model: nn.Module, rows: list[list[int]], follow: Completions, pad: int) -> torch.Tensor:
    """``(len(rows), k)`` scores of every completion after each prompt of ``rows``: one forward of the prompts
    (left-padded, with the key/value cache), then one of every completion from the repeated cache."""
    device = next(model.parameters()).device
    k, longest = follow.targets.shape
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, length - len(row) :], mask[r, length - len(row) :] = torch.tensor(row), 1
    positions = position_ids(mask)  # left padding must not shift the real positions
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        logits_to_keep=1,
    )
    # Completion token 0 is predicted by the prompt's last position; token t > 0 by completion input t - 1.
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()  # (rows, vocab)
    picked = first.gather(-1, follow.targets[None, :, 0].expand(len(rows), -1))[..., None]  # (rows, k, 1)
    # Every prompt's cache once per completion: row r * k + j is (prompt r, completion j).
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    cache.batch_repeat_interleave(k)
    follow_mask = torch.cat([mask.repeat_interleave(k, 0), follow.mask.repeat(len(rows), 1)], 1)
    follow_positions = positions[:, -1:] + 1 + torch.arange(longest - 1)  # (rows, longest - 1)
    logits = model(
        input_ids=follow.inputs.repeat(len(rows), 1).to(device),
        attention_mask=follow_mask.to(device),
        position_ids=follow_positions.repeat_interleave(k, 0).to(device),
        use_cache=True,
        **{cache_argument(model): cache},
    ).logits
    rest = torch.log_softmax(logits.float(), dim=-1).cpu().view(len(rows), k, longest - 1, -1)
    later = rest.gather(-1, follow.targets[None, :, 1:, None].expand(len(rows), -1, -1, 1)).squeeze(-1)
    picked = torch.cat([picked, later], dim=2)  # (rows, k, longest)
    return picked.masked_fill(~follow.real, 0.0).sum(-1)


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes a key/value cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (earlier)."""
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


def label_accuracy(scores: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Share of rows whose highest-scoring completion is the gold label.

    Args:
        scores: ``(n, k)`` from :func:`score_completions`.
        labels: ``n`` gold indices into the completions.

    Raises:
        LMError: if the sizes disagree or a label is out of range.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if scores.dim() != 2 or len(labels) != scores.shape[0]:
        raise LMError(f"label_accuracy: {tuple(scores.shape)} scores for {len(labels)} labels; one row per label")
    if len(labels) and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise LMError(f"label_accuracy: labels must lie in 0..{scores.shape[1] - 1}")
    return float((scores.argmax(-1) == labels).float().mean()) if len(labels) else 0.0
