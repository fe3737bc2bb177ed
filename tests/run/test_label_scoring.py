"""Label scoring by log-likelihood for causal LMs (adalora.run.label_scoring), against a reference that scores
each (prompt, completion) alone, unpadded, with full logits."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from lm_helpers import ids, word_tokenizer

from adalora.run.label_scoring import completion_token_ids, label_accuracy, score_completions
from adalora.run.lm_data import LMError

PROMPTS = ["Q: the cat sat on the mat", "Q: dog", "Q: the dog ran to a"]
COMPLETIONS = [" yes", " no no", " A: the cat"]  # 1, 2 and 3 tokens (+ EOS): lengths differ within a batch
EOS = 2  # "</s>" in WORDS


def reference(model, prompts, completions) -> torch.Tensor:
    """sum_t log P(completion token t | prompt, earlier tokens), EOS included, one unpadded sequence at a time."""
    out = torch.empty(len(prompts), len(completions))
    for i, prompt in enumerate(prompts):
        for j, completion in enumerate(completions):
            p, c = ids(prompt), [*ids(completion), EOS]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + c])).logits[0]
            log_probs = torch.log_softmax(logits.float(), -1)
            out[i, j] = sum(log_probs[len(p) - 1 + t, token] for t, token in enumerate(c))
    return out


def test_tokenised_as_for_training_with_eos_after_the_completion():
    prompts, completions = completion_token_ids(word_tokenizer(), ["Q: dog"], [" no no"])
    assert prompts == [ids("Q: dog")]
    assert completions == [[*ids("no no"), EOS]]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-rope", "gpt2-absolute-positions"])
@pytest.mark.parametrize("batch_size", [1, 4, 9])
def test_scores_match_one_sequence_at_a_time(make, batch_size):
    torch.manual_seed(0)
    model = make()
    got = score_completions(model, word_tokenizer(), PROMPTS, COMPLETIONS, batch_size=batch_size)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, reference(model, PROMPTS, COMPLETIONS), atol=1e-4, rtol=1e-5)


def test_model_mode_is_restored():
    model = tiny_llama().train()
    score_completions(model, word_tokenizer(), PROMPTS[:1], COMPLETIONS[:1])
    assert model.training


def test_accuracy_by_hand():
    scores = torch.tensor([[-1.0, -2.0], [-3.0, -0.5], [-0.1, -0.2], [-4.0, -4.5]])
    assert label_accuracy(scores, [0, 1, 1, 0]) == 0.75


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(LMError, match="one row per label"):
        label_accuracy(torch.zeros(2, 3), [0])
    with pytest.raises(LMError, match="0..2"):
        label_accuracy(torch.zeros(1, 3), [3])
    with pytest.raises(LMError, match="non-empty"):
        score_completions(tiny_llama(), word_tokenizer(), ["Q: dog"], [""])
    with pytest.raises(LMError, match="at least one"):
        score_completions(tiny_llama(), word_tokenizer(), [], [" yes"])
