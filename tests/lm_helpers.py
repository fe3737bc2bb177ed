"""Tiny causal-LM assets built in memory: a word-level tokenizer over a few words, question/answer rows a tiny
decoder learns in a few steps, a random decoder saved as a model directory, and the ``adalora train --task
causal-lm`` arguments that train it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adalora import RankAllocator

WORDS = ["<unk>", "<pad>", "</s>", "Q:", "A:", "the", "cat", "dog", "sat", "ran", "on", "mat", "yes", "no", "a", "to"]


def word_tokenizer():
    """A whitespace word-level fast tokenizer over WORDS (ids = positions), EOS ``</s>``, pad ``<pad>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


def qa_rows(n: int) -> list[dict[str, str]]:
    """Questions whose answer follows from the animal: a pattern a tiny model learns in a few steps."""
    return [
        {"prompt": f"Q: the {animal} sat", "completion": f" A: {answer}"}
        for animal, answer in [("cat", "yes"), ("dog", "no")] * (n // 2)
    ]


def write_tiny_lm(directory: Path, hidden: int = 32, model_type: str = "llama", **fields) -> Path:
    """A random 2-layer decoder over WORDS (a Llama, or ``model_type`` with more config ``fields``) with the word
    tokenizer, saved with ``save_pretrained``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    word_tokenizer().save_pretrained(directory)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(WORDS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=None,
        eos_token_id=WORDS.index("</s>"),
        pad_token_id=WORDS.index("<pad>"),
        **fields,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def qa_train_args(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    """``adalora train --task causal-lm`` on 60 question/answer rows (54 train, 6 held out), 2 epochs of 9 steps."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(60)))
    return [
        "train", "--task", "causal-lm", "--model", str(model), "--train", str(data), "--output-dir",
        str(tmp_path / "run"), "--max-length", "8", "--batch-size", "6", "--epochs", "2", "--init-r", "4",
        "--target-r", "2", "--lr", "2e-2", "--threads", "1", *extra,
    ]  # fmt: skip


def train_lm(model, config, steps, optimizer=None, allocator=None, seed=0):
    """``steps`` next-token steps on random tokens with the allocator; returns (optimizer, allocator)."""
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    allocator = allocator or RankAllocator(model, config, optimizer)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 100, (4, 9), generator=generator)
        model(ids, labels=ids).loss.backward()
        allocator.add_regularization_gradient()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
    return optimizer, allocator
