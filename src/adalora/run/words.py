"""Counts in messages: ``1 epoch``, ``2 epochs``."""

from __future__ import annotations


def plural(count: int, word: str, plural_form: str | None = None) -> str:
    """``count`` and ``word``, in the plural unless ``count`` is 1 (``plural_form`` for irregular words)."""
    return f"{count} {word if count == 1 else plural_form or word + 's'}"
