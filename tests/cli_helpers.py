"""Tiny on-disk assets for CLI tests: a random BERT with its own small WordPiece vocabulary, and data files."""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["good", "great", "fine", "happy", "lovely", "superb", "warm", "bright"]
NEGATIVE = ["bad", "awful", "poor", "sad", "dull", "boring", "cold", "grim"]
NEUTRAL = ["the", "film", "movie", "was", "plot", "actors", "story", "very", "quite", "and", "a", "is"]


def write_tiny_model(directory: Path, hidden: int = 32, layers: int = 2) -> Path:
    """A randomly initialised BERT (2 layers, hidden 32) and a fast WordPiece tokenizer over ~40 words."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *NEUTRAL, ",", "."]
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).bert.save_pretrained(directory)  # a base encoder, as on a model hub
    tokenizer.save_pretrained(directory)
    return directory


def sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Short sentences whose label is given by one sentiment word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [*rng.sample(NEUTRAL, 4), rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, int]], delimiter: str = ",") -> Path:
    lines = [f"text{delimiter}label"] + [f"{text}{delimiter}{label}" for text, label in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_train_args(model: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    """``adalora train`` on the tiny model and files: 48 examples, batches of 8, 2 epochs = 12 steps."""
    return [
        "train",
        "--model", str(model),
        "--train", str(data / "train.csv"),
        "--eval", str(data / "eval.csv"),
        "--output-dir", str(output_dir),
        "--epochs", "2",
        "--batch-size", "8",
        "--max-length", "16",
        "--init-r", "4",
        "--target-r", "2",
        "--mask-interval", "1",
        "--threads", "1",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def write_tiny_data(directory: Path, n_train: int = 48, n_eval: int = 16) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_csv(directory / "train.csv", sentences(n_train, seed=0))
    write_csv(directory / "eval.csv", sentences(n_eval, seed=1))
    return directory
