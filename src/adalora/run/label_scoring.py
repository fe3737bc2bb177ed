"""Classification with a causal LM by scoring every label: the label chosen is the completion the model finds
most likely given the prompt.

For prompt ``p`` and candidate completions ``c_1 .. c_k`` (e.g. ``" spam"``, ``" ham"``), the score of ``c_j`` is
its log-likelihood ``sum_t log P(token_t | p, earlier tokens of c_j)`` over the tokens of ``c_j`` followed by
EOS, tokenised exactly as :func:`adalora.run.causal_lm.encode_lm` tokenises a prompt/completion example for
training (prompt with the tokenizer's special tokens, completion without, then EOS). Counting EOS scores the
completion as a whole: a label that is a prefix of another (``"no"``, ``"not"``) is not favoured. Scores are
sums, not means over tokens: they are log-probabilities of the whole completion, so labels of different token
lengths compete on the same footing as the model's own probabilities.

Sequences are left-padded with explicit position ids (so a padded row computes what it computes alone), and the
LM head is applied to the last positions only (``logits_to_keep``), which keeps memory at rows x completion
length x vocabulary rather than rows x sequence length x vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .causal_lm import LMError, _eos_id


def completion_token_ids(
    tokenizer: Any, prompts: Sequence[str], completions: Sequence[str]
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids per prompt, completion ids + EOS per completion), tokenised as for training.

    Raises:
        LMError: if the tokenizer has no EOS token, or a completion is empty.
    """
    eos = _eos_id(tokenizer)
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
        model: a causal LM taking ``input_ids``, ``attention_mask``, ``position_ids`` and ``logits_to_keep`` and
            returning ``.logits`` of shape ``(batch, kept positions, vocab)`` (transformers' decoders do).
        tokenizer: its tokenizer (EOS needed; pads with EOS when it has no pad token).
        prompts: ``n`` prompts.
        completions: ``k`` candidate completions, scored after every prompt (write the leading space).
        batch_size: sequences (prompt, completion pairs) per forward.

    Returns:
        ``(n, k)`` float32 tensor of summed natural-log probabilities (on the CPU).

    Raises:
        LMError: if there is nothing to score or a completion is empty.
    """
    if not prompts or not completions:
        raise LMError("score_completions needs at least one prompt and one completion")
    prompt_ids, completion_ids = completion_token_ids(tokenizer, prompts, completions)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(completions))]
    scores = torch.empty(len(prompts), len(completions))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            rows = [prompt_ids[i] + completion_ids[j] for i, j in chunk]
            length = max(len(row) for row in rows)
            # The last `keep` logits cover every completion token's prediction (position t predicts t + 1).
            keep = max(len(completion_ids[j]) for _, j in chunk) + 1
            input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for r, row in enumerate(rows):
                input_ids[r, length - len(row) :] = torch.tensor(row)
                mask[r, length - len(row) :] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the real positions
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=keep,
            ).logits.float()
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1).cpu()  # (rows, keep - 1, vocab)
            for r, (i, j) in enumerate(chunk):
                targets = torch.tensor(completion_ids[j])
                predicted = log_probs[r, keep - 1 - len(targets) :]  # predictions of the last len(targets) tokens
                scores[i, j] = predicted.gather(-1, targets[:, None]).sum()
    finally:
        model.train(was_training)
    return scores


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
