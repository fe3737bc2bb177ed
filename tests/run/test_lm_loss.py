"""The causal-LM loss from the labelled positions only (adalora.run.lm_loss): equal to transformers' own loss and
to the loss of the same rows right-padded, gradients included, on tiny Llama (rotary) and GPT-2 (absolute
positions) decoders; the LM head really runs on fewer positions; models without ``logits_to_keep`` still work."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from lm_helpers import word_tokenizer

from adalora.run.lm_data import LMExamples, encode_lm
from adalora.run.lm_loss import (
    IGNORE_INDEX,
    kept_positions,
    next_token_loss,
    position_ids,
    summed_nll,
    takes_logits_to_keep,
)

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = LMExamples(
    texts=(" yes", " A: no no", " the cat", " no"),
    prompts=("Q: the dog sat on the mat", "Q: the cat", "Q: a big dog ran to the mat", "Q: x"),
)


def left_padded(max_length: int = 24) -> dict[str, torch.Tensor]:
    return encode_lm(word_tokenizer(), EXAMPLES, max_length=max_length)


def right_padded(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same rows with their padding moved to the right (the layout transformers' loss needs no position ids
    for)."""
    shifts = (tensors["attention_mask"] == 0).sum(1)
    return {
        key: torch.stack([row.roll(-int(s)) for row, s in zip(value, shifts, strict=True)])
        for key, value in tensors.items()
    }


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.mark.parametrize("name", MODELS)
def test_loss_equals_transformers_loss_and_the_right_padded_loss_with_gradients(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    tensors = left_padded()
    right = right_padded(tensors)
    ours = next_token_loss(model, tensors)
    (ours_grad,) = torch.autograd.grad(ours, model.get_input_embeddings().weight)
    reference = model(**tensors, position_ids=position_ids(tensors["attention_mask"])).loss
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)
    # Right padding without position ids: what the loss was before rows were left-padded.
    before = model(**right).loss
    (before_grad,) = torch.autograd.grad(before, model.get_input_embeddings().weight)
    torch.testing.assert_close(ours, before, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(ours_grad).all()  # fully padded positions attend to nothing: no NaN leaks back
    torch.testing.assert_close(ours_grad, before_grad, atol=1e-6, rtol=1e-5)


def test_the_lm_head_runs_on_the_kept_positions_only():
    model = tiny_llama()
    tensors = left_padded(max_length=40)
    rows_seen: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: rows_seen.append(out.shape[1]))
    try:
        next_token_loss(model, tensors)
    finally:
        hook.remove()
    # Completions are at most 4 tokens (" A: no no" + EOS) in a row of 40: positions 35..39 -> 5, rounded to 8.
    assert rows_seen == [8] == [kept_positions(tensors["labels"])]


def test_kept_positions_by_hand():
    x = IGNORE_INDEX
    labels = torch.tensor([[x, x, x, x, x, 7, 8, 9], [x, x, x, x, x, x, x, 9]])
    # Label columns 5..7 are predicted from positions 4..6; keep positions 4..7 (the last predicts nothing).
    assert kept_positions(labels, multiple=1) == 4
    assert kept_positions(labels, multiple=8) == 8
    assert kept_positions(torch.arange(16).view(2, 8), multiple=1) == 8  # packed text: every position


def test_summed_nll_counts_the_labelled_tokens():
    model = tiny_llama()
    tensors = left_padded()
    total, tokens = summed_nll(model, tensors)
    assert tokens == int((tensors["labels"][:, 1:] != IGNORE_INDEX).sum()) == 2 + 4 + 3 + 2
    assert total / tokens == pytest.approx(float(next_token_loss(model, tensors)), rel=1e-6)


class NoKeepArgument(torch.nn.Module):
    """A causal LM whose forward knows nothing of ``logits_to_keep`` (returns every position's logits)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, position_ids):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def test_models_without_logits_to_keep_and_wrapped_models():
    model = tiny_llama()
    tensors = left_padded()
    plain = NoKeepArgument(model)
    assert not takes_logits_to_keep(plain)
    torch.testing.assert_close(next_token_loss(plain, tensors), next_token_loss(model, tensors))
    assert takes_logits_to_keep(torch.compile(model))  # the wrapper's forward is (*args, **kwargs): look inside
