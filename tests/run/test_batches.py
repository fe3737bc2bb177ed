"""Training batches (adalora.run.batches): order fixed by (seed, epoch), and padding columns cut (trailing or
leading) without changing what the model computes."""

from __future__ import annotations

import torch
from conftest import tiny_bert, tiny_llama
from lm_helpers import word_tokenizer

from adalora.run.batches import TensorBatches, trim_padding
from adalora.run.lm_data import LMExamples, encode_lm
from adalora.run.lm_loss import next_token_loss


def padded(lengths: list[int], width: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Rows of ids 5.. with the given real lengths, padded (id 0, mask 0) to ``width``; class labels."""
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        ids[i, cols] = torch.arange(5, 5 + n)
        mask[i, cols] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(len(lengths))}


def test_trim_keeps_every_real_token_and_rounds_to_the_multiple():
    batch = padded([3, 11, 6], width=32)
    out = trim_padding(batch, multiple=8)
    assert out["input_ids"].shape == (3, 16)  # longest row 11 -> 16
    assert torch.equal(out["input_ids"], batch["input_ids"][:, :16])
    assert torch.equal(out["attention_mask"].sum(1), torch.tensor([3, 11, 6]))
    assert torch.equal(out["labels"], batch["labels"])  # (rows,) class labels untouched
    assert trim_padding(padded([3], width=32), multiple=1)["input_ids"].shape == (1, 3)


def test_left_padding_loses_leading_columns():
    batch = padded([3, 11, 6], width=32, left=True)
    out = trim_padding(batch, multiple=8)
    assert torch.equal(out["input_ids"], batch["input_ids"][:, 16:])  # 11 -> 16, extra columns on the left
    assert torch.equal(out["attention_mask"].sum(1), torch.tensor([3, 11, 6]))
    assert trim_padding(padded([3, 5], width=32, left=True), multiple=1)["input_ids"].shape == (2, 5)


def test_full_rows_and_maskless_batches_are_kept_whole():
    assert trim_padding(padded([32, 4], width=32))["input_ids"].shape == (2, 32)
    assert trim_padding(padded([32, 4], width=32, left=True))["input_ids"].shape == (2, 32)
    no_mask = {"input_ids": torch.ones(2, 32, dtype=torch.long)}
    assert trim_padding(no_mask) is no_mask
    assert trim_padding(padded([0, 0], width=32))["input_ids"].shape == (2, 8)  # nothing real: one block


def test_causal_lm_loss_is_unchanged_by_the_cut():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    examples = LMExamples(
        texts=(" yes", " no no", " A: the cat", " no"), prompts=("Q: dog", "Q: the cat", "Q: a", "Q: x")
    )
    tensors = encode_lm(word_tokenizer(), examples, max_length=40)
    cut = trim_padding(tensors)
    assert cut["input_ids"].shape[1] < 40 and cut["labels"].shape == cut["input_ids"].shape
    with torch.no_grad():
        torch.testing.assert_close(next_token_loss(model, cut), next_token_loss(model, tensors), atol=1e-5, rtol=1e-5)


def test_classifier_logits_are_unchanged_by_the_cut():
    torch.manual_seed(0)
    model = tiny_bert().eval()
    batch = padded([3, 7, 5], width=24)
    batch["input_ids"] = batch["input_ids"] % 90 + 5
    cut = trim_padding(batch)
    assert cut["input_ids"].shape == (3, 8)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        short = model(input_ids=cut["input_ids"], attention_mask=cut["attention_mask"]).logits
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)


def test_batches_cover_each_row_once_per_epoch_in_a_seeded_order():
    tensors = padded([2, 9, 4, 17, 3, 8], width=24)
    batches = TensorBatches(tensors, batch_size=2, seed=3, epoch=1)
    again = TensorBatches(tensors, batch_size=2, seed=3, epoch=1)
    seen = torch.cat([b["labels"] for b in batches])
    assert sorted(seen.tolist()) == list(range(6))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True))
    for batch in batches:
        assert batch["input_ids"].shape[1] % 8 == 0
        assert torch.equal(batch["attention_mask"].sum(1), tensors["attention_mask"][batch["labels"]].sum(1))
